//! Registration cost as the table grows: the per-operation cost of registering and then
//! unregistering (waiting for the grace period) one probe with 100, 10,000 and 100,000
//! probes already registered, and of registering N probes one by one and removing them
//! with one batch. Target: per-op cost at 100k <= 3x the cost at 100.
//!
//! Run: `cargo bench -p multiprobe-benches --bench core_register`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::Criterion;
use multiprobe_benches::Ratios;
use multiprobe_core::testing::TestBackend;
use multiprobe_core::{Hit, Registry};

const SIZES: [u64; 3] = [100, 10_000, 100_000];

fn handler(h: &mut Hit<'_>) {
    black_box(h.addr());
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    let ratios = Ratios::new();

    let mut g = c.benchmark_group("register");
    g.sample_size(20);
    for &n in &SIZES {
        let r = Registry::new(TestBackend::new());
        for i in 0..n {
            let _ = r.register(0x100_0000 + i * 16, handler).unwrap().into_id();
        }
        let mut next = 0x4000_0000u64;
        let name = format!("one-more/{n}");
        g.bench_function(&name, |b| {
            ratios.measure(b, &name, |iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    next += 16;
                    let reg = r.register(next, handler).unwrap();
                    black_box(reg.unregister().unwrap());
                }
                t.elapsed()
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("register-bulk");
    g.sample_size(10);
    for &n in &SIZES {
        let name = format!("bulk/{n}");
        g.bench_function(&name, |b| {
            ratios.measure(b, &name, |iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let r = Registry::new(TestBackend::new());
                    let t = Instant::now();
                    let ids: Vec<_> = (0..n)
                        .map(|i| r.register(0x100_0000 + i * 16, handler).unwrap().into_id())
                        .collect();
                    r.unregister_batch(&ids).unwrap();
                    total += t.elapsed();
                }
                // Per probe: one registration plus its share of the batch removal.
                total / n as u32
            })
        });
    }
    g.finish();
    c.final_summary();

    ratios.print_means();
    ratios.ratio(
        "register+unregister one probe, 10k vs 100",
        "one-more/10000",
        "one-more/100",
    );
    ratios.ratio(
        "register+unregister one probe, 100k vs 100 (target <= 3)",
        "one-more/100000",
        "one-more/100",
    );
    ratios.ratio("bulk per probe, 10k vs 100", "bulk/10000", "bulk/100");
    ratios.ratio(
        "bulk per probe, 100k vs 100 (target <= 3)",
        "bulk/100000",
        "bulk/100",
    );
}
