//! Shared helpers of the benchmarks.
//!
//! Every benchmark measures multiprobe and its baseline in the same run and prints the
//! ratio, because these machines are shared and noisy: an absolute time alone means
//! little. [`Ratios`] records, next to what criterion reports, the mean time per
//! iteration of every measured routine, so the bench can print `RATIO` lines at the end.
//!
//! [`Ratios::measure_paired`] goes further: every sample of a routine is immediately
//! preceded by a sample of its baseline with the same iteration count, so load that comes
//! and goes on the machine hits both alike, and [`Ratios::paired_ratio`] divides over
//! those pairs. Unpaired ratios moved by up to 40% with load here; paired ones by a few
//! percent.

pub mod ptrace;
pub mod uprobe;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{Bencher, BenchmarkGroup};
use multiprobe_core::{CallData, FnHandler, Handler, Hit, PreAction};

/// Mean time per iteration of named routines, accumulated over criterion's samples.
#[derive(Debug, Default)]
pub struct Ratios {
    totals: Mutex<BTreeMap<String, (Duration, u64)>>,
}

fn paired_key(ours: &str, base: &str) -> String {
    format!("{ours} vs {base}")
}

impl Ratios {
    /// A fresh recorder.
    pub fn new() -> Self {
        Self::default()
    }

    /// Measure `routine(iters) -> elapsed` with criterion and record it under `name`.
    pub fn measure(
        &self,
        b: &mut Bencher<'_, WallTime>,
        name: &str,
        mut routine: impl FnMut(u64) -> Duration,
    ) {
        b.iter_custom(|iters| {
            let d = routine(iters);
            self.add(name, d, iters);
            d
        });
    }

    /// Measure `ours` with criterion under `name`, each sample preceded by a sample of
    /// `base` with the same iteration count, recorded as the baseline paired with it.
    pub fn measure_paired(
        &self,
        b: &mut Bencher<'_, WallTime>,
        name: &str,
        base_name: &str,
        ours: impl FnMut(u64) -> Duration,
        mut base: impl FnMut(u64) -> Duration,
    ) {
        self.measure_paired_with(b, name, &mut [(base_name, &mut base)], ours);
    }

    /// Bench `name` in group `g`: [`Ratios::measure_paired`] of `ours` against `base`
    /// (recorded as `base_name`).
    pub fn bench_paired(
        &self,
        g: &mut BenchmarkGroup<'_, WallTime>,
        name: &str,
        base_name: &str,
        mut ours: impl FnMut(u64) -> Duration,
        mut base: impl FnMut(u64) -> Duration,
    ) {
        g.bench_function(name, |b| {
            self.measure_paired(b, name, base_name, &mut ours, &mut base)
        });
    }

    /// [`Ratios::measure_paired`] against several baselines: each sample of `ours` is
    /// preceded by one sample of every baseline, in order, with the same iteration count.
    pub fn measure_paired_with(
        &self,
        b: &mut Bencher<'_, WallTime>,
        name: &str,
        bases: &mut [(&str, &mut dyn FnMut(u64) -> Duration)],
        mut ours: impl FnMut(u64) -> Duration,
    ) {
        let keys: Vec<String> = bases.iter().map(|(n, _)| paired_key(name, n)).collect();
        self.measure(b, name, |iters| {
            for ((_, base), key) in bases.iter_mut().zip(&keys) {
                let d = base(iters);
                self.add(key, d, iters);
            }
            ours(iters)
        });
    }

    fn add(&self, name: &str, d: Duration, iters: u64) {
        let mut t = self.totals.lock().unwrap();
        let e = t.entry(name.to_string()).or_default();
        e.0 += d;
        e.1 += iters;
    }

    /// `ours` over the baseline samples paired with it; prints a `RATIO` line.
    pub fn paired_ratio(&self, ours: &str, base: &str) -> Option<f64> {
        let o = self.mean_ns(ours)?;
        let b = self.mean_ns(&paired_key(ours, base))?;
        let r = o / b;
        println!(
            "RATIO {ours} / {base}: {r:.3}  ({} / {}, paired samples)",
            fmt_ns(o),
            fmt_ns(b)
        );
        Some(r)
    }

    /// Print whether the paired ratio meets a target (`<= target` when `at_most`).
    pub fn check(&self, ours: &str, base: &str, target: f64, at_most: bool) -> Option<bool> {
        let r = self.paired_ratio(ours, base)?;
        let ok = if at_most { r <= target } else { r >= target };
        println!(
            "TARGET {ours} / {base} {} {target}: {}",
            if at_most { "<=" } else { ">=" },
            if ok { "met" } else { "MISSED" }
        );
        Some(ok)
    }

    /// Mean nanoseconds per iteration of `name`, if it was measured.
    pub fn mean_ns(&self, name: &str) -> Option<f64> {
        let t = self.totals.lock().unwrap();
        let &(d, n) = t.get(name)?;
        (n > 0).then(|| d.as_secs_f64() * 1e9 / n as f64)
    }

    /// Print `RATIO label: ours/baseline` and return the ratio.
    pub fn ratio(&self, label: &str, ours: &str, baseline: &str) -> Option<f64> {
        let (o, b) = (self.mean_ns(ours)?, self.mean_ns(baseline)?);
        let r = o / b;
        println!(
            "RATIO {label}: {r:.3}  ({ours} {} / {baseline} {})",
            fmt_ns(o),
            fmt_ns(b)
        );
        Some(r)
    }

    /// Print every recorded mean.
    pub fn print_means(&self) {
        let names: Vec<String> = self.totals.lock().unwrap().keys().cloned().collect();
        for name in names {
            if let Some(ns) = self.mean_ns(&name) {
                println!("MEAN {name}: {} per iteration", fmt_ns(ns));
            }
        }
    }
}

/// Criterion as the benches here run it: `samples` samples (criterion's default is 100),
/// warmed up for `warm_up_ms` and measured for `measure_s` each, then whatever the
/// command line says.
pub fn criterion(samples: usize, warm_up_ms: u64, measure_s: u64) -> criterion::Criterion {
    criterion::Criterion::default()
        .sample_size(samples)
        .warm_up_time(Duration::from_millis(warm_up_ms))
        .measurement_time(Duration::from_secs(measure_s))
        .configure_from_args()
}

/// A bench function of the sigtrap benches: takes and returns an integer.
pub type Target = unsafe extern "C" fn(u64) -> u64;

/// The time of `iters` calls of `f`, each with its iteration number.
pub fn calls(f: Target, iters: u64) -> Duration {
    let f = black_box(f);
    let t = Instant::now();
    for i in 0..iters {
        // SAFETY: the bench functions take and return integers.
        black_box(unsafe { f(black_box(i)) });
    }
    t.elapsed()
}

std::thread_local! {
    static MINE: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Count one on this thread's own counter (a thread-local cell), the way a hot counter
/// avoids sharing a cache line between threads.
#[inline]
pub fn count_on_this_thread() {
    MINE.with(|c| c.set(c.get() + 1));
}

/// What [`count_on_this_thread`] counted on this thread so far.
pub fn counted_on_this_thread() -> u64 {
    MINE.with(std::cell::Cell::get)
}

/// A counting handler that reads the first argument and counts per thread
/// ([`count_on_this_thread`]).
pub fn tls_counter(h: &mut Hit<'_>) {
    black_box(h.regs().rdi);
    count_on_this_thread();
}

/// [`tls_counter`] with a post-handler that reads `rax` and counts too.
pub fn tls_with_post() -> impl Handler {
    FnHandler::new()
        .pre(|_h: &mut Hit<'_>| {
            count_on_this_thread();
            PreAction::Continue
        })
        .post(|h: &mut Hit<'_>| {
            black_box(h.regs().rax);
            count_on_this_thread();
        })
}

/// A handler that keeps the first argument in its call data and counts, with a return
/// hook that reads the return value and that argument and counts too.
pub fn tls_with_return() -> impl Handler {
    FnHandler::new()
        .pre(|h: &mut Hit<'_>| {
            let a = h.regs().rdi;
            if let Some(d) = h.call_data_mut() {
                d[0] = a;
            }
            count_on_this_thread();
            PreAction::Continue
        })
        .ret(|h: &mut Hit<'_>, d: &CallData| {
            black_box((h.regs().rax, d[0]));
            count_on_this_thread();
        })
}

/// `12.34 ns`, `5.67 µs` or `8.90 ms`.
pub fn fmt_ns(ns: f64) -> String {
    if ns < 1e3 {
        format!("{ns:.2} ns")
    } else if ns < 1e6 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{:.2} ms", ns / 1e6)
    }
}

/// The release executable `bin` of workspace package `package`, built on first use into
/// the target directory of the running bench (benches of one package cannot name another
/// package's binaries).
pub fn workspace_bin(package: &str, bin: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe has a parent").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.pop();
    }
    let target = dir
        .parent()
        .expect("profile dir has a parent")
        .to_path_buf();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let status = std::process::Command::new(cargo)
        .args(["build", "--quiet", "--release", "-p", package, "--bin", bin])
        .arg("--target-dir")
        .arg(&target)
        .status()
        .expect("run cargo");
    assert!(status.success(), "building {package}/{bin} failed");
    target.join("release").join(bin)
}

/// The median of `v` (which must not be empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The workspace README's library example, run as a doctest here: this package depends
/// on the backends and is never published, so the README outside any crate's directory
/// is always at hand.
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct WorkspaceReadme;
