//! A tight dispatch loop for instruction-count profiling (callgrind), not a benchmark:
//! `valgrind --tool=callgrind target/release/examples/hit_loop N HANDLERS`.

use std::hint::black_box;

use multiprobe_core::backend::{NoMemory, PreOutcome, ThreadState};
use multiprobe_core::testing::TestBackend;
use multiprobe_core::{Hit, Registry, Regs};

fn handler(h: &mut Hit<'_>) {
    black_box(h.regs().rdi);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let n: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000_000);
    let handlers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let r = Registry::new(TestBackend::new());
    let target = 0x10_0000 + 5_000 * 16;
    for i in 0..10_000u64 {
        let addr = 0x10_0000 + i * 16;
        let k = if addr == target { handlers } else { 1 };
        for _ in 0..k {
            let _ = r.register(addr, handler).expect("register").into_id();
        }
    }
    let d = r.dispatcher();
    let ts = ThreadState::new();
    let mut regs = Regs::default();
    for _ in 0..n {
        regs.rip = target;
        match d.pre(&ts, black_box(target), 1, &mut regs, &NoMemory) {
            PreOutcome::Step(s) => drop(s),
            _ => unreachable!(),
        }
    }
}
