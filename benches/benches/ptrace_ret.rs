//! Cost of a return-probed call with the ptrace backend against an entry-only probe on
//! the same function, and against the unprobed call, measured in the same run on the same
//! tracee (`mp-bench`, which calls a site N times per command and answers when done).
//!
//! * `direct/{imul,push}`: the call with no probe armed (the tracee still traced).
//! * `entry/{imul,push}`: one handler that counts at the entry (one stop per call).
//! * `entry+ret/{imul,push}`: one handler with a pre-hook and a return hook that counts
//!   the returns: the entry stop swaps the return address for the trampoline, and the
//!   return comes back through a second stop.
//!
//! `imul` is `mp_bench_fn` (its first instruction runs from the jump-back slot), `push`
//! is `mp_bench_push` (`push rbx` first: emulated, as at most function entries). The
//! routines are interleaved round by round (31 rounds of 2000 calls each) and each ratio is
//! the median of the per-round ratios, so load that comes and goes hits both sides alike.
//! The bench pins itself and its tracee to one CPU (see `ptrace_hit.rs` for why).
//!
//! Run: `cargo bench -p multiprobe-benches --bench ptrace_ret`

use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use multiprobe_backend_ptrace::{PtraceBackend, Tracer};
use multiprobe_benches::ptrace::{ask, command, done, pin_and_say};
use multiprobe_benches::{fmt_ns, median};
use multiprobe_core::{FnHandler, PreAction, Registration};

const HITS: u64 = 2000;
const ROUNDS: usize = 31;
/// The tracee's site numbers, and their names.
const SITES: [(u8, &str, &str); 2] = [(1, "mp_bench_fn", "imul"), (2, "mp_bench_push", "push")];

#[derive(Clone, Copy, PartialEq, Debug)]
enum Mode {
    Direct,
    Entry,
    EntryRet,
}

struct Site {
    code: u8,
    entry: Registration<PtraceBackend>,
    ret: Registration<PtraceBackend>,
    entries: Arc<AtomicU64>,
    returns: Arc<AtomicU64>,
}

struct Bench {
    t: Tracer,
    child: Child,
    sites: Vec<Site>,
}

impl Bench {
    fn new() -> Bench {
        let mut t = Tracer::spawn(&mut command()).unwrap();
        let child = t.take_child().unwrap();
        let sites = SITES
            .iter()
            .map(|&(code, sym, _)| {
                let addr = t.resolve(sym).unwrap();
                let entries = Arc::new(AtomicU64::new(0));
                let returns = Arc::new(AtomicU64::new(0));
                let e = Arc::clone(&entries);
                let entry = t
                    .registry()
                    .register(addr, move |_| {
                        e.fetch_add(1, Relaxed);
                    })
                    .unwrap();
                let r = Arc::clone(&returns);
                let h = FnHandler::new()
                    .pre(|_| PreAction::Continue)
                    .ret(move |_, _| {
                        r.fetch_add(1, Relaxed);
                    });
                let ret = t.registry().register_handler(addr, h).unwrap();
                Site {
                    code,
                    entry,
                    ret,
                    entries,
                    returns,
                }
            })
            .collect();
        Bench { t, child, sites }
    }

    fn run(&mut self, site: usize, mode: Mode, n: u64) -> Duration {
        let s = &self.sites[site];
        for (r, on) in [
            (&s.entry, mode == Mode::Entry),
            (&s.ret, mode == Mode::EntryRet),
        ] {
            if on { r.enable() } else { r.disable() }.unwrap();
        }
        let (count, code) = match mode {
            Mode::Direct => (None, s.code),
            Mode::Entry => (Some(Arc::clone(&s.entries)), s.code),
            Mode::EntryRet => (Some(Arc::clone(&s.returns)), s.code),
        };
        let target = count.as_ref().map_or(0, |c| c.load(Relaxed)) + n;
        let start = Instant::now();
        ask(&mut self.child, code, n);
        // Direct: nothing to serve, but the tracee is resumed if it was held (its first
        // run after the spawn).
        let stop = self
            .t
            .run_until(|| count.as_ref().is_none_or(|c| c.load(Relaxed) >= target))
            .unwrap();
        assert!(stop.is_none(), "the tracee stopped: {stop:?}");
        done(&mut self.child);
        start.elapsed()
    }
}

fn main() {
    pin_and_say("tracee");
    let mut b = Bench::new();
    const MODES: [Mode; 3] = [Mode::Direct, Mode::Entry, Mode::EntryRet];
    // Warm up: slots, the trampoline and the unwinder hooks are placed at first hits.
    for site in 0..SITES.len() {
        for m in MODES {
            b.run(site, m, 200);
        }
    }
    let mut per_call = vec![vec![Vec::new(); MODES.len()]; SITES.len()];
    for _ in 0..ROUNDS {
        for (site, times) in per_call.iter_mut().enumerate() {
            for (m, mode) in MODES.iter().enumerate() {
                let d = b.run(site, *mode, HITS);
                times[m].push(d.as_secs_f64() * 1e9 / HITS as f64);
            }
        }
    }
    for (site, times) in per_call.iter().enumerate() {
        let name = SITES[site].2;
        for (m, mode) in MODES.iter().enumerate() {
            println!(
                "INTERLEAVED {mode:?}/{name}: median {} per call over {ROUNDS} rounds of {HITS}",
                fmt_ns(median(times[m].clone()))
            );
        }
        let ratio = |a: usize, z: usize| {
            median(times[a].iter().zip(&times[z]).map(|(x, y)| x / y).collect())
        };
        let r = ratio(2, 1);
        println!(
            "RATIO entry+ret/{name} / entry/{name} (target <= 2.0): {r:.3} {}",
            if r <= 2.0 { "met" } else { "MISSED" }
        );
        println!("RATIO entry/{name} / direct/{name}: {:.3}", ratio(1, 0));
        println!("RATIO entry+ret/{name} / direct/{name}: {:.3}", ratio(2, 0));
    }
    let s = &b.sites;
    let (e, r) = (
        s.iter().map(|s| s.ret.stats().unwrap().hits).sum::<u64>(),
        s.iter()
            .map(|s| s.ret.stats().unwrap().returns)
            .sum::<u64>(),
    );
    println!("CHECK entry+ret hits {e}, returns {r} (equal: every call paired)");
}
