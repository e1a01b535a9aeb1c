//! Dispatch cost of the core, against the 2005 design measured in the same run.
//!
//! * `ours/N`: one hit (pre walk, boosted step) at a site with N handlers, among 10,000
//!   armed sites, through `Dispatcher::pre`.
//! * `rwlock/N`: the same with the 2005 kprobes design — a global reader-writer lock over
//!   a map of handler lists — and the same handlers and per-handler hit counters;
//!   each sample paired with one of `ours/N` (see `Ratios::measure_paired`).
//! * `arcswap/N`: the same map published through `arc_swap::ArcSwap` (writers would
//!   swap in a new map), `load` on every hit: the design card's snapshot without the
//!   core's SRCU read side. Also paired with `ours/N`. The core cannot use it on the
//!   hot path: `load` takes a thread-local debt slot allocated on a thread's first use,
//!   and dropping its guard may free, so it is not async-signal-safe.
//! * `direct/N`: calling the N handlers directly: the floor.
//! * `*-2threads`: two threads hitting the same site at once; time per hit.
//!
//! Run: `cargo bench -p multiprobe-benches --bench core_dispatch`

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Barrier, RwLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use multiprobe_benches::Ratios;
use multiprobe_core::backend::{Dispatcher, NoMemory, PreOutcome, ThreadState};
use multiprobe_core::testing::TestBackend;
use multiprobe_core::{Hit, Registry, Regs};

const SITES: u64 = 10_000;
const BASE: u64 = 0x10_0000;
const TARGET: u64 = BASE + 5_000 * 16;
const COUNTS: [usize; 3] = [1, 4, 16];

fn handler(h: &mut Hit<'_>) {
    black_box(h.regs().rdi);
}

fn our_hits(
    d: &Dispatcher<multiprobe_core::testing::TestSite>,
    ts: &ThreadState,
    n: u64,
) -> Duration {
    let mut regs = Regs::default();
    let t = Instant::now();
    for _ in 0..n {
        regs.rip = TARGET;
        match d.pre(ts, black_box(TARGET), 1, &mut regs, &NoMemory) {
            PreOutcome::Step(s) => drop(s),
            _ => unreachable!(),
        }
    }
    t.elapsed()
}

/// A handler of the legacy design, with its hit counter.
type LegacyHandler = (Box<dyn Fn(&mut Regs) + Send + Sync>, AtomicU64);
type Legacy = RwLock<HashMap<u64, Vec<LegacyHandler>>>;
type DirectCall = Box<dyn Fn(&mut Regs)>;

type Handlers = HashMap<u64, Vec<LegacyHandler>>;

fn legacy_table(handlers_at_target: usize) -> Legacy {
    RwLock::new(handler_map(handlers_at_target))
}

fn arcswap_table(handlers_at_target: usize) -> ArcSwap<Handlers> {
    ArcSwap::from_pointee(handler_map(handlers_at_target))
}

/// Every site with one handler, `TARGET` with `handlers_at_target`, each with its counter.
fn handler_map(handlers_at_target: usize) -> Handlers {
    let mut m: Handlers = HashMap::new();
    for i in 0..SITES {
        let addr = BASE + i * 16;
        let n = if addr == TARGET {
            handlers_at_target
        } else {
            1
        };
        let v = (0..n)
            .map(|_| {
                let f: Box<dyn Fn(&mut Regs) + Send + Sync> = Box::new(|r: &mut Regs| {
                    black_box(r.rdi);
                });
                (f, AtomicU64::new(0))
            })
            .collect();
        m.insert(addr, v);
    }
    m
}

/// Run a site's handlers as the baselines do: count, call.
#[inline(always)]
fn run_legacy(handlers: &[LegacyHandler], regs: &mut Regs) {
    for (f, hits) in handlers {
        hits.fetch_add(1, Relaxed);
        f(regs);
    }
}

fn legacy_hits(t: &Legacy, n: u64) -> Duration {
    let mut regs = Regs::default();
    let start = Instant::now();
    for _ in 0..n {
        let g = t.read().unwrap();
        if let Some(v) = g.get(&black_box(TARGET)) {
            run_legacy(v, &mut regs);
        }
    }
    start.elapsed()
}

fn arcswap_hits(t: &ArcSwap<Handlers>, n: u64) -> Duration {
    let mut regs = Regs::default();
    let start = Instant::now();
    for _ in 0..n {
        let g = t.load();
        if let Some(v) = g.get(&black_box(TARGET)) {
            run_legacy(v, &mut regs);
        }
    }
    start.elapsed()
}

/// Run `f` on this thread and a helper thread at once; return this thread's time.
fn two_threads(n: u64, f: impl Fn(u64) -> Duration + Send + Sync + Clone + 'static) -> Duration {
    let barrier = Arc::new(Barrier::new(2));
    let (b2, f2) = (Arc::clone(&barrier), f.clone());
    let other = std::thread::spawn(move || {
        b2.wait();
        f2(n)
    });
    barrier.wait();
    let d = f(n);
    other.join().unwrap();
    d
}

fn registry_with(handlers_at_target: usize) -> Registry<TestBackend> {
    let r = Registry::new(TestBackend::new());
    for i in 0..SITES {
        let addr = BASE + i * 16;
        let n = if addr == TARGET {
            handlers_at_target
        } else {
            1
        };
        for _ in 0..n {
            let _ = r.register(addr, handler).unwrap().into_id();
        }
    }
    r
}

thread_local! {
    static TS: ThreadState = const { ThreadState::new() };
}

fn main() {
    let mut c = multiprobe_benches::criterion(100, 500, 2);
    let ratios = Ratios::new();

    let mut g = c.benchmark_group("dispatch");
    for &n in &COUNTS {
        let r = registry_with(n);
        let d = r.dispatcher();
        let ts = ThreadState::new();
        let legacy = legacy_table(n);
        let arcswap = arcswap_table(n);
        let direct: Vec<DirectCall> = (0..n)
            .map(|_| {
                Box::new(|r: &mut Regs| {
                    black_box(r.rdi);
                }) as DirectCall
            })
            .collect();
        let direct_calls = |iters: u64| {
            let mut regs = Regs::default();
            let t = Instant::now();
            for _ in 0..iters {
                for f in black_box(&direct) {
                    f(&mut regs);
                }
            }
            t.elapsed()
        };
        let (rw, sw) = (format!("rwlock/{n}"), format!("arcswap/{n}"));
        g.bench_function(format!("ours/{n}"), |b| {
            ratios.measure_paired_with(
                b,
                &format!("ours/{n}"),
                &mut [
                    (&rw, &mut |iters| legacy_hits(&legacy, iters)),
                    (&sw, &mut |iters| arcswap_hits(&arcswap, iters)),
                ],
                |iters| our_hits(&d, &ts, iters),
            )
        });
        g.bench_function(format!("direct/{n}"), |b| {
            ratios.measure(b, &format!("direct/{n}"), direct_calls)
        });
    }
    {
        let r = registry_with(1);
        let d = r.dispatcher();
        let legacy = Arc::new(legacy_table(1));
        let arcswap = Arc::new(arcswap_table(1));
        g.bench_function("ours-2threads/1", |b| {
            ratios.measure_paired_with(
                b,
                "ours-2threads/1",
                &mut [
                    ("rwlock-2threads/1", &mut |iters| {
                        let l = Arc::clone(&legacy);
                        two_threads(iters, move |n| legacy_hits(&l, n))
                    }),
                    ("arcswap-2threads/1", &mut |iters| {
                        let s = Arc::clone(&arcswap);
                        two_threads(iters, move |n| arcswap_hits(&s, n))
                    }),
                ],
                |iters| {
                    let d = d.clone();
                    two_threads(iters, move |n| TS.with(|ts| our_hits(&d, ts, n)))
                },
            )
        });
    }
    g.finish();
    c.final_summary();

    ratios.print_means();
    for &n in &COUNTS {
        ratios.paired_ratio(&format!("ours/{n}"), &format!("rwlock/{n}"));
        ratios.paired_ratio(&format!("ours/{n}"), &format!("arcswap/{n}"));
    }
    ratios.paired_ratio("ours-2threads/1", "arcswap-2threads/1");
    ratios.check("rwlock-2threads/1", "ours-2threads/1", 1.0, false);
    if let Some(r) = ratios.paired_ratio("ours-2threads/1", "rwlock-2threads/1") {
        let speedup = 1.0 / r;
        println!(
            "TARGET rwlock / ours with 2 threads hitting >= 5: {speedup:.2}x {}",
            if speedup >= 5.0 { "met" } else { "MISSED" }
        );
    }
    if let (Some(one), Some(sixteen)) = (ratios.mean_ns("ours/1"), ratios.mean_ns("ours/16")) {
        let extra = (sixteen - one) / 15.0;
        println!(
            "TARGET one handler among 10k sites <= 15 ns: {one:.2} ns {}",
            if one <= 15.0 { "met" } else { "MISSED" }
        );
        println!(
            "TARGET each extra handler <= 2 ns: {extra:.2} ns {}",
            if extra <= 2.0 { "met" } else { "MISSED" }
        );
    }
    if let (Some(one), Some(sixteen)) = (ratios.mean_ns("direct/1"), ratios.mean_ns("direct/16")) {
        println!(
            "FLOOR a direct call per extra handler: {:.2} ns",
            (sixteen - one) / 15.0
        );
    }
}
