//! A return-probed call against the same call with an entry probe only, and against a
//! direct call, in the in-process backend's two modes, measured in the same run (issue
//! 15's target: a return probe costs at most 2x its entry probe alone, as the kernel's
//! uretprobe against its uprobe).
//!
//! * `promoted entry`: one pre-handler on a promoted (trap-free) site, counting per
//!   thread; `promoted entry+return`: one handler with a pre-hook (counts, keeps `rdi`
//!   in the call's data) and a return hook (counts, reads `rax` and the data) on an
//!   identical function: the entry through the site's trampoline, the return through the
//!   return trampoline. Each sample of `entry+return` is preceded by one of `entry` and
//!   one of `unprobed` (an identical function never probed).
//! * `trap entry`, `trap entry+return`: the same on `int3` sites (`imul`, relocated:
//!   one trap at the entry; the return goes through the return trampoline, no trap).
//! * `kernel uretprobe` / `kernel uprobe`: tracefs probes on identical functions (the
//!   uretprobe traps at the entry and at the return), when tracefs allows.
//!
//! Run: `cargo bench -p multiprobe-benches --bench sigtrap_return`

use multiprobe_backend_sigtrap::{Mode, SigtrapBackend};
use multiprobe_benches::uprobe::KernelUprobe;
use multiprobe_benches::{calls, tls_counter, tls_with_return, Ratios, Target};
use multiprobe_core::Registry;

/// Identical functions `$name...`, each with the instructions `$body` (one string).
macro_rules! twins {
    ($body:literal; $($name:literal),*) => {
        core::arch::global_asm!(
            ".pushsection .text.mp_bench_ret,\"ax\",@progbits",
            $(
                concat!(".globl ", $name),
                concat!(".type ", $name, ",@function"),
                ".p2align 4",
                concat!($name, ":"),
                $body,
                concat!(".size ", $name, ", . - ", $name),
            )*
            ".popsection",
        );
    };
}

// Promotable: `push rbx; mov rbx, rdi; lea rax, [rbx + 7]` is the region.
twins!("push rbx\nmov rbx, rdi\nlea rax, [rbx + 7]\npop rbx\nret";
    "mp_r_jentry", "mp_r_jboth", "mp_r_twin", "mp_r_kentry", "mp_r_kboth");
// Trap sites: a relocated first instruction, one trap at the entry.
twins!("imul rax, rdi, 7\nret"; "mp_r_tentry", "mp_r_tboth");

extern "C" {
    fn mp_r_jentry(x: u64) -> u64;
    fn mp_r_jboth(x: u64) -> u64;
    fn mp_r_twin(x: u64) -> u64;
    fn mp_r_kentry(x: u64) -> u64;
    fn mp_r_kboth(x: u64) -> u64;
    fn mp_r_tentry(x: u64) -> u64;
    fn mp_r_tboth(x: u64) -> u64;
}

fn addr(f: Target) -> u64 {
    f as *const () as u64
}

fn main() {
    let mut c = multiprobe_benches::criterion(100, 300, 2);
    let ratios = Ratios::new();
    let jreg = Registry::new(SigtrapBackend::with_promotion(true));
    let treg = Registry::new(SigtrapBackend::with_promotion(false));
    let guards = vec![
        jreg.register(addr(mp_r_jentry), tls_counter).unwrap(),
        jreg.register_handler(addr(mp_r_jboth), tls_with_return())
            .unwrap(),
        treg.register(addr(mp_r_tentry), tls_counter).unwrap(),
        treg.register_handler(addr(mp_r_tboth), tls_with_return())
            .unwrap(),
    ];
    for f in [mp_r_jentry as Target, mp_r_jboth] {
        assert_eq!(
            jreg.backend().mode_at(addr(f)),
            Some(Mode::Jump),
            "the site must be promoted"
        );
    }
    for f in [mp_r_tentry as Target, mp_r_tboth] {
        assert!(matches!(
            treg.backend().mode_at(addr(f)),
            Some(Mode::Trap(_))
        ));
    }
    let mut g = c.benchmark_group("sigtrap-return");
    for (mode, entry, both) in [
        ("promoted", mp_r_jentry as Target, mp_r_jboth as Target),
        ("trap", mp_r_tentry, mp_r_tboth),
    ] {
        let name = format!("{mode} entry+return");
        let base = format!("{mode} entry");
        g.bench_function(&name, |b| {
            ratios.measure_paired_with(
                b,
                &name,
                &mut [
                    (&base, &mut |n| calls(entry, n)),
                    ("unprobed", &mut |n| calls(mp_r_twin, n)),
                ],
                |n| calls(both, n),
            )
        });
        ratios.bench_paired(
            &mut g,
            &base,
            "unprobed",
            |n| calls(entry, n),
            |n| calls(mp_r_twin, n),
        );
    }
    let kernel = KernelUprobe::new("ret_entry", addr(mp_r_kentry))
        .and_then(|p| KernelUprobe::new_return("ret_both", addr(mp_r_kboth)).map(|r| (p, r)));
    match &kernel {
        Ok(_) => {
            g.bench_function("kernel uretprobe", |b| {
                ratios.measure_paired_with(
                    b,
                    "kernel uretprobe",
                    &mut [
                        ("kernel uprobe", &mut |n| calls(mp_r_kentry, n)),
                        ("promoted entry+return", &mut |n| calls(mp_r_jboth, n)),
                    ],
                    |n| calls(mp_r_kboth, n),
                )
            });
        }
        Err(e) => println!("NOTE kernel uprobes not measured: {e}"),
    }
    g.finish();
    c.final_summary();
    drop(kernel);
    let stats: Vec<_> = guards.iter().map(|g| g.stats().unwrap()).collect();
    // Every entry of the return-probed functions returned through its hook.
    for s in [stats[1], stats[3]] {
        assert!(
            s.hits > 0 && s.returns == s.hits && s.returns_lost == 0,
            "{s:?}"
        );
    }
    drop(guards);
    ratios.print_means();
    for mode in ["promoted", "trap"] {
        let both = format!("{mode} entry+return");
        let entry = format!("{mode} entry");
        ratios.check(&both, &entry, 2.0, true);
        ratios.paired_ratio(&both, "unprobed");
        ratios.paired_ratio(&entry, "unprobed");
    }
    ratios.paired_ratio("kernel uretprobe", "kernel uprobe");
    ratios.paired_ratio("kernel uretprobe", "promoted entry+return");
}
