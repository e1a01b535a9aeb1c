//! The return actions: `ret` (a line per call with its return value), `latency` (a
//! histogram per row of the time from entry to return) and `args:N,ret` (one ltrace-style
//! line per call: `f(0x1, 0x2) = 0x3`). Each is one handler with a return hook: its
//! pre-hook, at the function's entry, leaves the entry's time and the arguments in the
//! call's [`CallData`]; its return hook, when that call returns, reads the return value
//! (`rax`) and makes the line or counts the time.
//!
//! The histogram ([`Latency`]) has power-of-two buckets of nanoseconds, as bpftrace's
//! `hist()`: bucket 0 counts 0, bucket `k >= 1` counts `[2^(k-1), 2^k)`. It is atomics
//! only (return hooks of several threads may count at once with an in-process backend).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::OnceLock;
use std::time::{Instant, SystemTime};

use multiprobe_backend_ptrace::collect::LatencyHist;
use multiprobe_core::{CallData, Handler, Hit, PreAction, Request};
use serde::Serialize;

use crate::actions::Binding;
use crate::lines::{self, Who};
use crate::spec::Action;

/// Buckets: 0, then one per bit of a `u64` (as the tracee's histograms have).
const BUCKETS: usize = multiprobe_backend_ptrace::collect::HIST_BUCKETS;

/// Nanoseconds on a monotonic clock (since the first call).
fn now_ns() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    // Never 0 at an entry: 0 marks call data a pre-hook did not fill.
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// The bucket of `ns` (the same as the tracee's histograms).
fn bucket(ns: u64) -> usize {
    LatencyHist::bucket(ns)
}

/// `[low, high)` of bucket `k` (`high` saturates for the last one).
fn bounds(k: usize) -> (u64, u64) {
    match k {
        0 => (0, 1),
        64 => (1 << 63, u64::MAX),
        k => (1 << (k - 1), 1 << k),
    }
}

/// A row's latency histogram (module docs).
#[derive(Debug)]
pub struct Latency {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum: AtomicU64,
    min: AtomicU64,
    max: AtomicU64,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            count: AtomicU64::new(0),
            sum: AtomicU64::new(0),
            min: AtomicU64::new(u64::MAX),
            max: AtomicU64::new(0),
        }
    }
}

/// One bucket of a [`Hist`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Bucket {
    /// Lowest value counted here (ns).
    pub low: u64,
    /// One past the highest (ns).
    pub high: u64,
    /// Calls counted here.
    pub count: u64,
}

/// A histogram as the summary shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hist {
    /// Always `"ns"`.
    pub unit: &'static str,
    /// Calls timed.
    pub count: u64,
    /// Shortest, mean, longest (ns); absent with no call timed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min: Option<u64>,
    /// Mean (ns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub avg: Option<u64>,
    /// Longest (ns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// From the lowest bucket that counted to the highest, zeros between included.
    pub buckets: Vec<Bucket>,
}

impl Latency {
    /// Count one call of `ns` nanoseconds.
    pub fn record(&self, ns: u64) {
        self.buckets[bucket(ns)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum.fetch_add(ns, Relaxed);
        self.min.fetch_min(ns, Relaxed);
        self.max.fetch_max(ns, Relaxed);
    }

    /// What it counted so far.
    pub fn snapshot(&self) -> Hist {
        self.snapshot_with(&[])
    }

    /// What it counted so far, with the histograms `more` (collected in a tracee).
    pub fn snapshot_with(&self, more: &[LatencyHist]) -> Hist {
        let count = self.count.load(Relaxed);
        let mut h = LatencyHist {
            buckets: std::array::from_fn(|k| self.buckets[k].load(Relaxed)),
            sum: self.sum.load(Relaxed),
            min_max: (count > 0).then(|| (self.min.load(Relaxed), self.max.load(Relaxed))),
        };
        for m in more {
            h.add(m);
        }
        let counts = h.buckets;
        let count = h.count();
        let first = counts.iter().position(|&c| c > 0);
        let last = counts.iter().rposition(|&c| c > 0);
        let buckets = match (first, last) {
            (Some(f), Some(l)) => (f..=l)
                .map(|k| {
                    let (low, high) = bounds(k);
                    Bucket {
                        low,
                        high,
                        count: counts[k],
                    }
                })
                .collect(),
            _ => Vec::new(),
        };
        Hist {
            unit: "ns",
            count,
            min: h.min_max.map(|(lo, _)| lo),
            avg: (count > 0).then(|| h.sum / count),
            max: h.min_max.map(|(_, hi)| hi),
            buckets,
        }
    }
}

/// A power of two as bpftrace labels it: `512`, `1K`, `4M`, `2G`.
fn pow2_label(v: u64) -> String {
    for (shift, unit) in [
        (60, "E"),
        (50, "P"),
        (40, "T"),
        (30, "G"),
        (20, "M"),
        (10, "K"),
    ] {
        if v >= 1 << shift && v.is_multiple_of(1 << shift) {
            return format!("{}{unit}", v >> shift);
        }
    }
    v.to_string()
}

/// A duration in nanoseconds, for people: `850ns`, `12.3us`, `1.05ms`, `2.50s`.
pub fn duration(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns}ns"),
        1_000..=999_999 => format!("{:.1}us", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.2}ms", ns as f64 / 1e6),
        _ => format!("{:.2}s", ns as f64 / 1e9),
    }
}

/// The histogram as text, bpftrace's `hist()` layout (values in ns), after a line with
/// min, avg and max.
pub fn hist_text(h: &Hist) -> String {
    let mut out = String::new();
    if let (Some(min), Some(avg), Some(max)) = (h.min, h.avg, h.max) {
        out.push_str(&format!(
            "  min {}  avg {}  max {}  (ns buckets)\n",
            duration(min),
            duration(avg),
            duration(max)
        ));
    }
    let top = h.buckets.iter().map(|b| b.count).max().unwrap_or(0).max(1);
    let labels: Vec<String> = h
        .buckets
        .iter()
        .map(|b| match b.low {
            0 | 1 if b.high == b.low + 1 => format!("[{}]", b.low),
            _ => format!("[{}, {})", pow2_label(b.low), pow2_label(b.high)),
        })
        .collect();
    let w = labels.iter().map(String::len).max().unwrap_or(0);
    // The count column is as wide as the largest count (at least bpftrace's 8), so the
    // bars stay aligned past 99,999,999 calls.
    let cw = top.to_string().len().max(8);
    for (b, label) in h.buckets.iter().zip(&labels) {
        let bar = "@".repeat(((b.count * 52).div_ceil(top)) as usize);
        out.push_str(&format!("  {label:<w$} {:>cw$} |{bar:<52}|\n", b.count));
    }
    out
}

/// The registration of return action `binding.action` at `addr`.
pub fn request(addr: u64, binding: Binding) -> Request {
    Request::handler(addr, RetHandler { b: binding })
}

/// One return action of one probe.
#[derive(Debug)]
pub struct RetHandler {
    b: Binding,
}

impl RetHandler {
    fn args(&self) -> u8 {
        match self.b.action {
            Action::Call(n) => n,
            _ => 0,
        }
    }

    /// The per-call line at the return.
    fn line(&self, hit: &Hit<'_>, data: &CallData, ret: u64, ns: Option<u64>) -> String {
        let b = &self.b;
        let n = usize::from(self.args());
        ret_line(&RetLine {
            who: Who {
                pid: b.pid,
                tid: hit.tid(),
                time: b.time.then(SystemTime::now),
            },
            site: hit.addr(),
            label: &b.label,
            action: b.action,
            json: b.sink.json(),
            args: &data[1..=n],
            ret,
            ns,
            when: SystemTime::now(),
        })
    }
}

/// What one `ret` or `args:N,ret` line shows (from a return hook or a record the
/// tracee wrote).
pub(crate) struct RetLine<'a> {
    pub who: Who,
    pub site: u64,
    pub label: &'a str,
    pub action: Action,
    pub json: bool,
    /// The call's arguments (`args:N,ret`; ignored for `ret`).
    pub args: &'a [u64],
    pub ret: u64,
    pub ns: Option<u64>,
    /// When it returned.
    pub when: SystemTime,
}

/// The per-call line of a return: `label(args) = ret <latency>` (or its JSON object).
pub(crate) fn ret_line(l: &RetLine<'_>) -> String {
    let call = matches!(l.action, Action::Call(_));
    let ret = l.ret;
    if l.json {
        let mut v = serde_json::json!({
            "type": "hit",
            "time": lines::epoch_seconds(l.when),
            "pid": l.who.pid,
            "tid": l.who.tid,
            "site": format!("{:#x}", l.site),
            "symbol": l.label,
            "action": l.action.to_string(),
            "ret": format!("{ret:#x}"),
        });
        if let Some(ns) = l.ns {
            v["latency_ns"] = ns.into();
        }
        if call {
            v["args"] = l.args.iter().map(|a| format!("{a:#x}")).collect();
        }
        return v.to_string();
    }
    let mut s = l.who.prefix();
    s.push_str(l.label);
    if call {
        let list: Vec<String> = l.args.iter().map(|a| format!("{a:#x}")).collect();
        s.push_str(&format!("({})", list.join(", ")));
    }
    s.push_str(&format!(" = {ret:#x}"));
    if let Some(ns) = l.ns {
        s.push_str(&format!(" <{}>", duration(ns)));
    }
    s
}

impl Handler for RetHandler {
    fn pre(&self, hit: &mut Hit<'_>) -> PreAction {
        let b = &self.b;
        if !b.ctx.filters.is_empty() && !b.ctx.passes(hit) {
            b.state.filtered.fetch_add(1, Relaxed);
            hit.skip_return();
            return PreAction::Continue;
        }
        let mut args = [0u64; 7];
        for (i, a) in args.iter_mut().enumerate().take(usize::from(self.args())) {
            // An argument that cannot be read shows as 0 (the registers always can).
            *a = b.ctx.args.get(hit, i).unwrap_or(0);
        }
        if let Some(d) = hit.call_data_mut() {
            d[0] = now_ns();
            d[1..8].copy_from_slice(&args);
        }
        PreAction::Continue
    }

    fn ret(&self, hit: &mut Hit<'_>, data: &CallData) {
        let ns = (data[0] != 0).then(|| now_ns().saturating_sub(data[0]));
        let b = &self.b;
        match b.action {
            Action::Latency => {
                if let Some(ns) = ns {
                    b.state.latency.record(ns);
                }
            }
            _ => {
                let ret = hit.regs().rax;
                b.sink.hit_line(|| self.line(hit, data, ret, ns));
            }
        }
    }

    fn has_ret(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_powers_of_two() {
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(1), 1);
        assert_eq!((bucket(2), bucket(3), bucket(4)), (2, 2, 3));
        for k in 1..64 {
            let (low, high) = bounds(k);
            assert_eq!((bucket(low), bucket(high - 1), bucket(high)), (k, k, k + 1));
        }
        assert_eq!(bounds(bucket(u64::MAX)), (1 << 63, u64::MAX));
    }

    #[test]
    fn bars_stay_aligned_past_eight_digit_counts() {
        let bucket = |low, high, count| Bucket { low, high, count };
        let h = Hist {
            unit: "ns",
            count: 123_456_794,
            min: Some(600),
            avg: Some(700),
            max: Some(1500),
            buckets: vec![bucket(512, 1024, 123_456_789), bucket(1024, 2048, 5)],
        };
        let text = hist_text(&h);
        let bars: Vec<usize> = text.lines().skip(1).map(|l| l.find('|').unwrap()).collect();
        assert_eq!(bars.len(), 2, "{text}");
        assert_eq!(bars[0], bars[1], "{text}");
        assert!(text.contains(" 123456789 |"), "{text}");
    }

    #[test]
    fn histogram_snapshot_and_text() {
        let l = Latency::default();
        assert_eq!(l.snapshot().count, 0);
        assert!(l.snapshot().buckets.is_empty() && l.snapshot().min.is_none());
        for ns in [1_100_000, 10_100_000, 10_200_000, 100_500_000] {
            l.record(ns);
        }
        let h = l.snapshot();
        assert_eq!(
            (h.count, h.min, h.max),
            (4, Some(1_100_000), Some(100_500_000))
        );
        assert_eq!(h.avg, Some(121_900_000 / 4));
        assert_eq!(h.buckets.first().unwrap().low, 1 << 20);
        assert_eq!(h.buckets.last().unwrap().high, 1 << 27);
        assert_eq!(h.buckets.len(), 7);
        let counts: Vec<u64> = h.buckets.iter().map(|b| b.count).collect();
        assert_eq!(counts, [1, 0, 0, 2, 0, 0, 1]);
        let text = hist_text(&h);
        assert!(
            text.contains("min 1.10ms  avg 30.48ms  max 100.50ms"),
            "{text}"
        );
        assert!(text.contains("[1M, 2M)"), "{text}");
        assert!(text.contains("[8M, 16M)"), "{text}");
        assert!(text.contains(&format!("|{}|", "@".repeat(52))), "{text}");
        assert_eq!(pow2_label(512), "512");
        assert_eq!(pow2_label(1 << 30), "1G");
    }
}
