//! Write the fuzz targets' seed corpus: random inputs, kept when they reach a part of
//! the protocol the kept ones reach less (a greedy cover of `Coverage`'s counters).
//!
//! `cargo run -p multiprobe-backend-sim --example seed_corpus -- fuzz/corpus`
//! (deterministic: the same files every time).

use std::path::PathBuf;

use arbitrary::{Arbitrary, Unstructured};
use multiprobe_backend_sim::handlers::quiet_injected_panics;
use multiprobe_backend_sim::machine::Rng;
use multiprobe_backend_sim::scenario::{run_ops, run_protocol, Coverage, OpsCase, ProtocolCase};

const KEEP: usize = 24;
const TRIES: usize = 4000;

fn counters(c: &Coverage) -> [u32; 10] {
    [
        c.dispatches,
        c.reexecuted,
        c.posts,
        c.slot_faults,
        c.redirects,
        c.inside_dispatch,
        c.changed_while_pending,
        u32::from(c.oracle),
        c.returns,
        c.returns_lost,
    ]
}

fn main() {
    quiet_injected_panics();
    let root = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "fuzz/corpus".into()),
    );
    for target in ["ops", "protocol"] {
        let mut rng = Rng::new(0x5eed ^ target.len() as u64);
        let mut kept: Vec<(Vec<u8>, Coverage)> = Vec::new();
        let mut best = [0u32; 10];
        for _ in 0..TRIES {
            let len = 64 + rng.below(1200);
            let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
            let mut u = Unstructured::new(&data);
            let cov = if target == "ops" {
                OpsCase::arbitrary(&mut u).map(|c| run_ops(&c))
            } else {
                ProtocolCase::arbitrary(&mut u).map(|c| run_protocol(&c))
            };
            let Ok(Ok(cov)) = cov else { continue };
            let k = counters(&cov);
            // Keep it if it beats the best so far on some counter (first KEEP only).
            if kept.len() < KEEP && k.iter().zip(best).any(|(a, b)| *a > b) {
                for (b, a) in best.iter_mut().zip(k) {
                    *b = (*b).max(a);
                }
                kept.push((data, cov));
            }
        }
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        for (i, (data, cov)) in kept.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{i:02}")), data).unwrap();
            println!("{target} seed-{i:02}: score {} {cov:?}", cov.score());
        }
    }
}
