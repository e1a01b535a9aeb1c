//! Cost of one hit with the ptrace backend, against raw ptrace loops measured in the
//! same run on the same tracee (`mp-bench`, which calls a site N times per command).
//!
//! * `floor`: an `int3` over a one-byte `nop`, and per hit only `waitpid` +
//!   `PTRACE_CONT` — the least any ptrace breakpoint can cost.
//! * `two-stop/{nop,imul}`: the classic scheme (restore the byte, back up `rip`,
//!   single-step, re-insert, continue) at each site.
//! * `multiprobe/{1,3}h/{nop,imul}`: a registered probe with 1 or 3 counting
//!   handlers. The `nop` site is emulated; the `imul` site runs from the jump-back
//!   slot of the XOL page. Both one stop per hit.
//!
//! Run: `cargo bench -p multiprobe-benches --bench ptrace_hit`

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::Criterion;
use multiprobe_backend_ptrace::baseline::RawTarget;
use multiprobe_backend_ptrace::Tracer;
use multiprobe_benches::Ratios;
use multiprobe_core::Hit;

const NOP: u8 = 0;
const IMUL: u8 = 1;

fn command() -> Command {
    let mut c = Command::new(multiprobe_test_targets::bin("mp-bench"));
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    c
}

/// Ask the tracee for `n` calls of `site`.
fn ask(child: &mut std::process::Child, site: u8, n: u64) {
    let mut cmd = [0u8; 9];
    cmd[0] = site;
    cmd[1..].copy_from_slice(&n.to_le_bytes());
    child.stdin.as_mut().unwrap().write_all(&cmd).unwrap();
}

fn done(child: &mut std::process::Child) {
    let mut b = [0u8];
    child.stdout.as_mut().unwrap().read_exact(&mut b).unwrap();
}

fn raw(c: &mut Criterion, r: &Ratios) {
    let (mut t, resolve) = RawTarget::spawn(&mut command()).unwrap();
    let nop = resolve("mp_bench_nop").unwrap();
    let imul = resolve("mp_bench_fn").unwrap();
    let mut g = c.benchmark_group("ptrace");
    let orig = t.insert(nop).unwrap();
    g.bench_function("floor", |b| {
        r.measure(b, "floor", |n| {
            let start = Instant::now();
            ask(t.child(), NOP, n);
            t.one_stop(n).unwrap();
            done(t.child());
            start.elapsed()
        })
    });
    g.bench_function("two-stop/nop", |b| {
        r.measure(b, "two-stop/nop", |n| {
            let start = Instant::now();
            ask(t.child(), NOP, n);
            t.two_stop(nop, orig, n).unwrap();
            done(t.child());
            start.elapsed()
        })
    });
    t.remove(nop, orig).unwrap();
    let orig = t.insert(imul).unwrap();
    g.bench_function("two-stop/imul", |b| {
        r.measure(b, "two-stop/imul", |n| {
            let start = Instant::now();
            ask(t.child(), IMUL, n);
            t.two_stop(imul, orig, n).unwrap();
            done(t.child());
            start.elapsed()
        })
    });
    t.remove(imul, orig).unwrap();
    g.finish();
}

fn multiprobe(c: &mut Criterion, r: &Ratios) {
    let mut t = Tracer::spawn(&mut command()).unwrap();
    let mut child = t.take_child().unwrap();
    let mut g = c.benchmark_group("ptrace");
    for (site, sym, label) in [(NOP, "mp_bench_nop", "nop"), (IMUL, "mp_bench_fn", "imul")] {
        let addr = t.resolve(sym).unwrap();
        for handlers in [1, 3] {
            let count = Arc::new(AtomicU64::new(0));
            let guards: Vec<_> = (0..handlers)
                .map(|_| {
                    let c = Arc::clone(&count);
                    t.registry()
                        .register(addr, move |h: &mut Hit<'_>| {
                            std::hint::black_box(h.regs().rdi);
                            c.fetch_add(1, Relaxed);
                        })
                        .unwrap()
                })
                .collect();
            let name = format!("multiprobe/{handlers}h/{label}");
            g.bench_function(&name, |b| {
                r.measure(b, &name, |n| {
                    let target = count.load(Relaxed) + n * handlers;
                    let start = Instant::now();
                    ask(&mut child, site, n);
                    let stop = t.run_until(|| count.load(Relaxed) >= target).unwrap();
                    assert!(stop.is_none());
                    done(&mut child);
                    start.elapsed()
                })
            });
            drop(guards);
        }
    }
    g.finish();
}

fn main() {
    let mut c = Criterion::default()
        .sample_size(20)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let r = Ratios::new();
    raw(&mut c, &r);
    multiprobe(&mut c, &r);
    c.final_summary();
    r.print_means();
    for h in ["1h", "3h"] {
        for s in ["nop", "imul"] {
            r.ratio(
                &format!("multiprobe {h} {s} / one-stop floor (target <= 1.15)"),
                &format!("multiprobe/{h}/{s}"),
                "floor",
            );
        }
    }
    for s in ["nop", "imul"] {
        r.ratio(
            &format!("two-stop {s} / multiprobe 1h {s} (target >= 2.3)"),
            &format!("two-stop/{s}"),
            &format!("multiprobe/1h/{s}"),
        );
    }
}
