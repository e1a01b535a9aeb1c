//! Landing pads read from a real C++ library's unwind tables: functions with cleanups
//! or catch blocks have them, inside the function, and none is unreadable.

use multiprobe_symbols::{ElfSymbols, LandingPads};

#[test]
fn libstdcxx_functions_have_readable_landing_pads_inside_them() {
    let Some(path) = [
        "/usr/lib/x86_64-linux-gnu/libstdc++.so.6",
        "/usr/lib64/libstdc++.so.6",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists()) else {
        eprintln!("no libstdc++.so.6 on this machine: nothing to read; skipped");
        return;
    };
    let syms = ElfSymbols::load(path).unwrap();
    let (mut with, mut unknown) = (0, 0);
    for f in syms.funcs() {
        match syms.landing_pads(f.addr) {
            LandingPads::At(pads) => {
                with += 1;
                for p in pads {
                    assert!(
                        p > f.addr && p < f.addr + f.size + 0x10000,
                        "{}: landing pad {p:#x} far from {:#x}+{:#x}",
                        f.name,
                        f.addr,
                        f.size
                    );
                }
            }
            LandingPads::Unknown => unknown += 1,
            LandingPads::None => {}
        }
    }
    assert!(with > 200, "only {with} functions with landing pads");
    assert_eq!(unknown, 0, "unreadable unwind entries");
    // A function that is not in the file at all has none.
    assert_eq!(syms.landing_pads(1), LandingPads::None);
}
