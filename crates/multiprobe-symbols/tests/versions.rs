//! A name that the C library exports under two versions (`pthread_cond_timedwait@GLIBC_2.2.5`
//! and `@@GLIBC_2.3.2`) means its default version, as the linker and bpftrace take it.

use multiprobe_symbols::ElfSymbols;

const LIBC: &str = "/lib/x86_64-linux-gnu/libc.so.6";

#[test]
fn a_versioned_libc_function_resolves_to_its_default_version() {
    let Ok(libc) = ElfSymbols::load(LIBC) else {
        println!("SKIPPED: no {LIBC} on this machine");
        return;
    };
    for name in [
        "pthread_cond_timedwait",
        "pthread_cond_wait",
        "pthread_cond_signal",
    ] {
        let all: Vec<u64> = libc
            .funcs()
            .iter()
            .filter(|f| f.name == name)
            .map(|f| f.addr)
            .collect();
        if all.len() < 2 {
            println!("SKIPPED {name}: one version only in this libc");
            continue;
        }
        let found = libc.by_name(name);
        assert_eq!(found.len(), 1, "{name}: {found:?}");
        // The default (newer) version is the larger, current implementation; the old
        // one is a compatibility wrapper.
        let newest = libc
            .funcs()
            .iter()
            .filter(|f| f.name == name)
            .max_by_key(|f| f.size)
            .unwrap();
        assert_eq!(found[0].addr, newest.addr, "{name}");
    }
}
