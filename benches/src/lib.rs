//! Shared helpers of the benchmarks: each bench measures multiprobe and its baseline in
//! the same run and prints the ratio, because these machines are shared and noisy.

use std::time::Duration;

/// Print `name: ratio` of two criterion-measured mean times, for BENCHMARKS.md.
pub fn report_ratio(name: &str, ours: Duration, baseline: Duration) {
    let r = ours.as_secs_f64() / baseline.as_secs_f64();
    println!("RATIO {name}: {r:.3} (ours {ours:?} / baseline {baseline:?})");
}
