//! Many thousands of probes: placing them costs time linear in their number. Alone in
//! its test binary, so that no other test of this crate runs beside the measurement.

mod common;

use std::time::{Duration, Instant};

use common::*;
use multiprobe_test_targets::bin;

/// How long `run` takes, start to end, with `n` probes on one function.
fn place(n: usize) -> Duration {
    let single = bin("mp-single");
    let mut args: Vec<&str> = vec!["run"];
    for _ in 0..n {
        args.extend(["-p", "mp_add"]);
    }
    args.extend(["--", single.to_str().unwrap(), "--iters", "1"]);
    let t = Instant::now();
    let out = run(&args);
    let d = t.elapsed();
    let stderr = text(&out.stderr);
    assert!(
        out.status.success(),
        "{}",
        stderr.lines().last().unwrap_or("")
    );
    assert_eq!(rows(&stderr, ":mp_add").len(), n);
    d
}

/// 10,000 probes on one function cost about ten times 1,000 (linear), not a hundred
/// (quadratic: 47 s against 0.4 s in a debug build before). The bound is generous:
/// whole runs, start-up included, each size the best of two, measured alternately so a
/// change in the machine's load hits both: 10,000 within 30 times 1,000.
#[test]
fn placing_ten_times_more_probes_costs_about_ten_times_more() {
    let (mut small, mut large) = (Duration::MAX, Duration::MAX);
    for _ in 0..2 {
        small = small.min(place(1000));
        large = large.min(place(10_000));
    }
    let ratio = large.as_secs_f64() / small.as_secs_f64();
    eprintln!("1,000 probes: {small:?}; 10,000: {large:?}; ratio {ratio:.1}");
    assert!(
        ratio < 30.0,
        "1,000 probes: {small:?}; 10,000: {large:?}; ratio {ratio:.1}"
    );
}
