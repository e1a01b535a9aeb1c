//! Registration cost as the table grows: the per-operation cost of registering and then
//! unregistering (waiting for the grace period) one probe with 100, 10,000 and 100,000
//! probes already registered, and of registering N probes one by one and removing them
//! with one batch. Target: per-op cost at 100k <= 3x the cost at 100.
//!
//! Run: `cargo bench -p multiprobe-benches --bench core_register`

use std::hint::black_box;
use std::time::{Duration, Instant};

use multiprobe_benches::Ratios;
use multiprobe_core::testing::TestBackend;
use multiprobe_core::{Hit, Registry};

const SIZES: [u64; 3] = [100, 10_000, 100_000];

fn handler(h: &mut Hit<'_>) {
    black_box(h.addr());
}

fn main() {
    let mut c = multiprobe_benches::criterion(100, 500, 3);
    let ratios = Ratios::new();

    // Registries of every size stay alive, so each sample at N is paired with one at 100.
    let registries: Vec<(u64, Registry<TestBackend>)> = SIZES
        .iter()
        .map(|&n| {
            let r = Registry::new(TestBackend::new());
            for i in 0..n {
                let _ = r.register(0x100_0000 + i * 16, handler).unwrap().into_id();
            }
            (n, r)
        })
        .collect();
    let next = std::cell::Cell::new(0x4000_0000u64);
    let one_more = |r: &Registry<TestBackend>, iters: u64| {
        let t = Instant::now();
        for _ in 0..iters {
            next.set(next.get() + 16);
            let reg = r.register(next.get(), handler).unwrap();
            black_box(reg.unregister().unwrap());
        }
        t.elapsed()
    };
    let bulk = |n: u64, iters: u64| {
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
    };

    let mut g = c.benchmark_group("register");
    g.sample_size(20);
    let small = &registries[0].1;
    for (n, r) in &registries[1..] {
        let name = format!("one-more/{n}");
        ratios.bench_paired(
            &mut g,
            &name,
            "one-more/100",
            |i| one_more(r, i),
            |i| one_more(small, i),
        );
    }
    g.finish();

    let mut g = c.benchmark_group("register-bulk");
    g.sample_size(10);
    for &n in &SIZES[1..] {
        let name = format!("bulk/{n}");
        // The baseline registers as many probes in total, 100 per registry, so both
        // sides of a pair do the same amount of work at different table sizes.
        let k = (n / 100) as u32;
        ratios.bench_paired(
            &mut g,
            &name,
            "bulk/100",
            |i| bulk(n, i),
            |i| bulk(100, i * u64::from(k)) / k,
        );
    }
    g.finish();
    c.final_summary();

    ratios.print_means();
    ratios.paired_ratio("one-more/10000", "one-more/100");
    ratios.check("one-more/100000", "one-more/100", 3.0, true);
    ratios.paired_ratio("bulk/10000", "bulk/100");
    ratios.check("bulk/100000", "bulk/100", 3.0, true);
}
