//! Three independent handlers on one address, one breakpoint underneath, driven from
//! four threads through the test backend. Shows the order of the walk, per-handler and
//! per-site statistics, and that the breakpoint byte comes and goes with the handlers.
//!
//! Run: `cargo run --release -p multiprobe-core --example three_handlers`

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use multiprobe_core::backend::ThreadState;
use multiprobe_core::testing::{TestBackend, INT3};
use multiprobe_core::{FnHandler, PreAction, Registry, Regs};

const ADDR: u64 = 0x40_1000;

fn main() -> Result<(), multiprobe_core::Error> {
    let registry = Registry::new(TestBackend::new());

    // 1: counts hits per thread parity.
    let odd = Arc::new(AtomicU64::new(0));
    let o = Arc::clone(&odd);
    let counter = registry.register(ADDR, move |hit| {
        if hit.tid() % 2 == 1 {
            o.fetch_add(1, Relaxed);
        }
    })?;
    // 2: sums the first argument (rdi).
    let sum = Arc::new(AtomicU64::new(0));
    let s = Arc::clone(&sum);
    let args = registry.register(ADDR, move |hit| {
        s.fetch_add(hit.regs().rdi, Relaxed);
    })?;
    // 3: a pre and a post: runs after the instruction, sees rip moved past it.
    let posts = Arc::new(AtomicU64::new(0));
    let p = Arc::clone(&posts);
    let around = registry.register_handler(
        ADDR,
        FnHandler::new()
            .pre(|_| PreAction::Continue)
            .post(move |hit| {
                assert_eq!(hit.regs().rip, ADDR + 1);
                p.fetch_add(1, Relaxed);
            }),
    )?;
    println!(
        "3 handlers registered at {ADDR:#x}; breakpoint byte is {:#04x} (int3 = {INT3:#04x})",
        registry.backend().byte(ADDR)
    );

    let threads: Vec<_> = (0..4u32)
        .map(|tid| {
            let r = registry.clone();
            std::thread::spawn(move || {
                let ts = ThreadState::new();
                for i in 0..25_000u64 {
                    let mut regs = Regs {
                        rdi: i % 10,
                        ..Regs::default()
                    };
                    r.backend().hit(&ts, tid, ADDR, &mut regs);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("hitting thread panicked");
    }

    let site = registry.site(ADDR).expect("site is registered");
    println!(
        "site {ADDR:#x}: {} hits, {} handlers",
        site.hits, site.handlers
    );
    for info in registry.handlers() {
        println!(
            "  handler {}: hits {} missed {} panics {}",
            info.id, info.stats.hits, info.stats.missed, info.stats.panics
        );
    }
    println!(
        "odd-thread hits {}, sum of rdi {}, post-handler runs {}",
        odd.load(Relaxed),
        sum.load(Relaxed),
        posts.load(Relaxed)
    );

    let stats = registry.unregister_all(vec![counter, args, around])?;
    println!(
        "unregistered all ({} final hits each); breakpoint byte is back to {:#04x}",
        stats[0].hits,
        registry.backend().byte(ADDR)
    );
    Ok(())
}
