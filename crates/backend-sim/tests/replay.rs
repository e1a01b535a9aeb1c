//! The fuzz targets' checks without a fuzzer: the committed seed corpus of each
//! target (`fuzz/corpus/<target>/`) plus a few thousand generated inputs, each run
//! through exactly what the target runs (`scenario::run_ops` / `run_protocol`: the
//! reference model in lockstep, the transparency oracle, the final restore).
//!
//! `MULTIPROBE_SIM_CASES` sets how many generated inputs per target (default 1500).

use std::path::PathBuf;

use arbitrary::{Arbitrary, Unstructured};
use multiprobe_backend_sim::handlers::quiet_injected_panics;
use multiprobe_backend_sim::machine::Rng;
use multiprobe_backend_sim::scenario::{run_ops, run_protocol, Coverage, OpsCase, ProtocolCase};

fn run(target: &str, data: &[u8]) -> Result<Coverage, String> {
    let mut u = Unstructured::new(data);
    match target {
        "ops" => match OpsCase::arbitrary(&mut u) {
            Ok(case) => run_ops(&case),
            Err(_) => Ok(Coverage::default()),
        },
        _ => match ProtocolCase::arbitrary(&mut u) {
            Ok(case) => run_protocol(&case),
            Err(_) => Ok(Coverage::default()),
        },
    }
}

fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let d = std::fs::read(&p).unwrap();
            (p, d)
        })
        .collect()
}

fn generated(target: &str, seed: u64) -> Coverage {
    quiet_injected_panics();
    let n: usize = std::env::var("MULTIPROBE_SIM_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1500);
    let mut rng = Rng::new(seed);
    let mut total = Coverage::default();
    for k in 0..n {
        let len = 16 + rng.below(1500);
        let data: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        match run(target, &data) {
            Ok(c) => add(&mut total, &c),
            Err(e) => panic!(
                "{target} generated case {k} (seed {seed:#x}) diverged: {e}\ninput: {data:?}"
            ),
        }
    }
    total
}

fn add(t: &mut Coverage, c: &Coverage) {
    t.ops_ok += c.ops_ok;
    t.ops_err += c.ops_err;
    t.dispatches += c.dispatches;
    t.reexecuted += c.reexecuted;
    t.posts += c.posts;
    t.slot_faults += c.slot_faults;
    t.redirects += c.redirects;
    t.inside_dispatch += c.inside_dispatch;
    t.set_enabled_inside += c.set_enabled_inside;
    t.removals += c.removals;
    t.changed_while_pending += c.changed_while_pending;
    t.returns += c.returns;
    t.returns_lost += c.returns_lost;
    t.oracle |= c.oracle;
    t.retired += c.retired;
}

fn replay_corpus(target: &str) -> Coverage {
    quiet_injected_panics();
    let files = corpus(target);
    assert!(!files.is_empty(), "no committed corpus for {target}");
    let mut total = Coverage::default();
    for (path, data) in files {
        match run(target, &data) {
            Ok(c) => add(&mut total, &c),
            Err(e) => panic!("{}: {e}", path.display()),
        }
    }
    total
}

/// The generated inputs must reach every part of the protocol, or the test is vacuous.
fn assert_reached(c: &Coverage) {
    assert!(
        c.dispatches > 0 && c.posts > 0 && c.slot_faults > 0,
        "{c:?}"
    );
    assert!(
        c.redirects > 0 && c.reexecuted > 0 && c.inside_dispatch > 0,
        "{c:?}"
    );
    assert!(c.set_enabled_inside > 0 && c.removals > 0, "{c:?}");
    assert!(c.changed_while_pending > 0 && c.oracle, "{c:?}");
    assert!(c.returns > 0 && c.returns_lost > 0, "{c:?}");
}

#[test]
fn ops_generated_cases_match_the_model_and_the_oracle() {
    let c = generated("ops", 0x0b5);
    eprintln!("ops: {c:?}");
    assert_reached(&c);
}

#[test]
fn protocol_generated_cases_match_the_model_and_the_oracle() {
    let c = generated("protocol", 0x9207);
    eprintln!("protocol: {c:?}");
    assert_reached(&c);
}

#[test]
fn ops_corpus_replays_clean() {
    let c = replay_corpus("ops");
    assert!(c.dispatches > 0, "{c:?}");
}

#[test]
fn protocol_corpus_replays_clean() {
    let c = replay_corpus("protocol");
    assert!(c.dispatches > 0, "{c:?}");
}
