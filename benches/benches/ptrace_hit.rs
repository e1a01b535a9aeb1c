//! Cost of one hit with the ptrace backend, against raw ptrace loops measured in the
//! same run on the same kind of tracee (`mp-bench`, which calls a site N times per
//! command and answers when done).
//!
//! * `floor`: an `int3` over a one-byte `nop`, and per hit only `waitpid` +
//!   `PTRACE_CONT` — the least any ptrace breakpoint can cost.
//! * `floor+rip`: the floor plus `PTRACE_PEEKUSER` of `rip` at each stop — the least a
//!   hit costs when the tracer must learn which probe the thread stopped at.
//! * `floor+regs`: the floor plus `PTRACE_GETREGS` at each stop — the least a hit can
//!   cost when handlers read the registers.
//! * `two-stop/{nop,imul}`: the classic scheme (restore the byte, back up `rip`,
//!   single-step, re-insert, continue) at each site.
//! * `multiprobe/rdi/{1,3}h/{nop,imul}`: a registered probe with 1 or 3 handlers that
//!   each read `rdi` (so the registers are fetched, once per hit) and count.
//! * `multiprobe/count/{1,3}h/{nop,imul}`: the same with handlers that only count (no
//!   register is fetched).
//!
//! The `nop` site is emulated (and, being one byte long, needs the signal's `si_code`
//! to tell our trap from a sent SIGTRAP); the `imul` site runs from the jump-back slot
//! of the XOL page. Both are one stop per hit. The `REQUESTS` lines give the ptrace
//! requests each variant made per hit in the interleaved phase.
//!
//! Criterion measures each routine on its own. The `RATIO` lines come from a second
//! phase that interleaves the routines round by round (each round: every routine,
//! `HITS` hits) and takes the median of the per-round ratios, so that load from other
//! users of the machine, which comes and goes, hits both sides of a ratio alike.
//!
//! The bench pins itself, and so the tracees it spawns, to the CPU it starts on. On an
//! otherwise idle VM a tracer and its tracee on two vCPUs wake each other through a
//! halted vCPU at every stop, and a round trip costs ~70 µs instead of ~4 µs (measured:
//! every routine then takes 67–77 µs and the ratios mean nothing); on one CPU a stop is
//! two context switches, as when the other vCPU is busy.
//!
//! Run: `cargo bench -p multiprobe-benches --bench ptrace_hit`

use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use multiprobe_backend_ptrace::baseline::{requests, RawTarget, Requests};
use multiprobe_backend_ptrace::{PtraceBackend, Tracer};
use multiprobe_benches::ptrace::{ask, command, done, pin_and_say};
use multiprobe_benches::{fmt_ns, median, Ratios};
use multiprobe_core::Registration;

const NOP: u8 = 0;
const IMUL: u8 = 1;
const HITS: u64 = 2000;
const ROUNDS: usize = 31;

/// The raw loops, on their own tracee.
struct Raw {
    t: RawTarget,
    nop: (u64, u8),
    imul: (u64, u8),
}

impl Raw {
    fn new() -> Raw {
        let (t, addrs) =
            RawTarget::spawn(&mut command(), &["mp_bench_nop", "mp_bench_fn"]).unwrap();
        let (nop, imul) = (addrs[0], addrs[1]);
        let nop = (nop, t.insert(nop).unwrap());
        let imul = (imul, t.insert(imul).unwrap());
        Raw { t, nop, imul }
    }

    /// `n` hits of the `nop` site, each stop served by `serve` (one of
    /// [`RawTarget::one_stop`], [`RawTarget::one_stop_rip`], [`RawTarget::one_stop_regs`]).
    fn floor(
        &mut self,
        n: u64,
        serve: fn(&RawTarget, u64) -> multiprobe_core::Result<()>,
    ) -> Duration {
        let start = Instant::now();
        ask(self.t.child(), NOP, n);
        serve(&self.t, n).unwrap();
        done(self.t.child());
        start.elapsed()
    }

    fn two_stop(&mut self, site: u8, n: u64) -> Duration {
        let (addr, orig) = if site == NOP { self.nop } else { self.imul };
        let start = Instant::now();
        ask(self.t.child(), site, n);
        self.t.two_stop(addr, orig, n).unwrap();
        done(self.t.child());
        start.elapsed()
    }
}

/// What a handler does besides counting its hits.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    /// Reads `rdi`: the registers are fetched.
    Rdi,
    /// Nothing: no register is fetched.
    Count,
}

const KINDS: [Kind; 2] = [Kind::Rdi, Kind::Count];

/// multiprobe on its own tracee: on each site, three handlers of each kind, of which
/// only those of the routine's kind are enabled (the first one, or all three).
struct Multi {
    t: Tracer,
    child: Child,
    /// Per site and kind: the hits of the first handler.
    first: [[Arc<AtomicU64>; 2]; 2],
    /// Per site and kind: the three registrations.
    regs: [[Vec<Registration<PtraceBackend>>; 2]; 2],
}

impl Multi {
    fn new() -> Multi {
        let mut t = Tracer::spawn(&mut command()).unwrap();
        let child = t.take_child().unwrap();
        let mut first: [[Arc<AtomicU64>; 2]; 2] = Default::default();
        let mut regs: [[Vec<Registration<PtraceBackend>>; 2]; 2] = Default::default();
        for (site, sym) in ["mp_bench_nop", "mp_bench_fn"].into_iter().enumerate() {
            let addr = t.resolve(sym).unwrap();
            for (k, kind) in KINDS.into_iter().enumerate() {
                for i in 0..3 {
                    let c = Arc::new(AtomicU64::new(0));
                    if i == 0 {
                        first[site][k] = Arc::clone(&c);
                    }
                    let r = match kind {
                        Kind::Rdi => t.registry().register(addr, move |h| {
                            std::hint::black_box(h.regs().rdi);
                            c.fetch_add(1, Relaxed);
                        }),
                        Kind::Count => t.registry().register(addr, move |_| {
                            c.fetch_add(1, Relaxed);
                        }),
                    };
                    regs[site][k].push(r.unwrap());
                }
            }
        }
        Multi {
            t,
            child,
            first,
            regs,
        }
    }

    /// Enable the first `n` handlers of `kind` at `site`, and no other there.
    fn handlers(&self, site: u8, kind: Kind, n: usize) {
        for (k, rs) in KINDS.iter().zip(&self.regs[usize::from(site)]) {
            for (i, r) in rs.iter().enumerate() {
                if *k == kind && i < n {
                    r.enable()
                } else {
                    r.disable()
                }
                .unwrap();
            }
        }
    }

    fn hits(&mut self, site: u8, kind: Kind, n: u64) -> Duration {
        let count = &self.first[usize::from(site)][kind as usize];
        let target = count.load(Relaxed) + n;
        let start = Instant::now();
        ask(&mut self.child, site, n);
        let stop = self.t.run_until(|| count.load(Relaxed) >= target).unwrap();
        assert!(stop.is_none(), "the tracee stopped: {stop:?}");
        done(&mut self.child);
        start.elapsed()
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Routine {
    Floor,
    FloorRip,
    FloorRegs,
    TwoStop(u8),
    Multi(Kind, usize, u8),
}

impl Routine {
    const ALL: [Routine; 13] = [
        Routine::Floor,
        Routine::FloorRip,
        Routine::FloorRegs,
        Routine::TwoStop(NOP),
        Routine::TwoStop(IMUL),
        Routine::Multi(Kind::Rdi, 1, NOP),
        Routine::Multi(Kind::Rdi, 3, NOP),
        Routine::Multi(Kind::Rdi, 1, IMUL),
        Routine::Multi(Kind::Rdi, 3, IMUL),
        Routine::Multi(Kind::Count, 1, NOP),
        Routine::Multi(Kind::Count, 3, NOP),
        Routine::Multi(Kind::Count, 1, IMUL),
        Routine::Multi(Kind::Count, 3, IMUL),
    ];

    fn name(self) -> String {
        let site = |s| if s == NOP { "nop" } else { "imul" };
        match self {
            Routine::Floor => "floor".into(),
            Routine::FloorRip => "floor+rip".into(),
            Routine::FloorRegs => "floor+regs".into(),
            Routine::TwoStop(s) => format!("two-stop/{}", site(s)),
            Routine::Multi(k, h, s) => {
                let k = if k == Kind::Rdi { "rdi" } else { "count" };
                format!("multiprobe/{k}/{h}h/{}", site(s))
            }
        }
    }

    fn run(self, raw: &mut Raw, multi: &mut Multi, n: u64) -> Duration {
        match self {
            Routine::Floor => raw.floor(n, RawTarget::one_stop),
            Routine::FloorRip => raw.floor(n, RawTarget::one_stop_rip),
            Routine::FloorRegs => raw.floor(n, RawTarget::one_stop_regs),
            Routine::TwoStop(s) => raw.two_stop(s, n),
            Routine::Multi(k, h, s) => {
                multi.handlers(s, k, h);
                multi.hits(s, k, n)
            }
        }
    }
}

fn main() {
    pin_and_say("tracees");
    let mut c = multiprobe_benches::criterion(20, 500, 3);
    let r = Ratios::new();
    let mut raw = Raw::new();
    let mut multi = Multi::new();
    {
        let mut g = c.benchmark_group("ptrace");
        for routine in Routine::ALL {
            let name = routine.name();
            g.bench_function(&name, |b| {
                r.measure(b, &name, |n| routine.run(&mut raw, &mut multi, n))
            });
        }
        g.finish();
    }
    c.final_summary();
    r.print_means();

    // Interleaved rounds: per-hit times of every routine, round by round, and the
    // ptrace requests of multiprobe's.
    let mut per_hit: Vec<Vec<f64>> = vec![Vec::new(); Routine::ALL.len()];
    let mut spent = vec![Requests::default(); Routine::ALL.len()];
    for _ in 0..ROUNDS {
        for (i, routine) in Routine::ALL.iter().enumerate() {
            let before = requests();
            let d = routine.run(&mut raw, &mut multi, HITS);
            spent[i] = spent[i] + (requests() - before);
            per_hit[i].push(d.as_secs_f64() * 1e9 / HITS as f64);
        }
    }
    let idx = |r: Routine| Routine::ALL.iter().position(|&x| x == r).unwrap();
    for (i, routine) in Routine::ALL.iter().enumerate() {
        println!(
            "INTERLEAVED {}: median {} per hit over {ROUNDS} rounds of {HITS}",
            routine.name(),
            fmt_ns(median(per_hit[i].clone()))
        );
    }
    let n = (ROUNDS as u64 * HITS) as f64;
    for (i, routine) in Routine::ALL.iter().enumerate() {
        if let Routine::Multi(..) = routine {
            let r = spent[i];
            println!(
                "REQUESTS {} per hit: GETREGS {:.2}, PEEKUSER {:.2}, POKEUSER {:.2}, \
                 SETREGS {:.2}, GETSIGINFO {:.2}, CONT {:.2}, other {:.2}",
                routine.name(),
                r.get_regs as f64 / n,
                r.peek_user as f64 / n,
                r.poke_user as f64 / n,
                r.set_regs as f64 / n,
                r.get_sig_info as f64 / n,
                r.cont as f64 / n,
                r.other as f64 / n,
            );
        }
    }
    let ratio = |a: Routine, b: Routine| {
        let v = per_hit[idx(a)]
            .iter()
            .zip(&per_hit[idx(b)])
            .map(|(x, y)| x / y)
            .collect();
        median(v)
    };
    for kind in KINDS {
        for s in [NOP, IMUL] {
            for h in [1, 3] {
                let m = Routine::Multi(kind, h, s);
                let r = ratio(m, Routine::Floor);
                println!(
                    "RATIO {} / floor (target <= 1.15): {r:.3} {}",
                    m.name(),
                    if r <= 1.15 { "met" } else { "MISSED" }
                );
            }
        }
    }
    println!(
        "RATIO floor+rip / floor (where a hit is, alone): {:.3}",
        ratio(Routine::FloorRip, Routine::Floor)
    );
    println!(
        "RATIO floor+regs / floor (the registers alone): {:.3}",
        ratio(Routine::FloorRegs, Routine::Floor)
    );
    for s in [NOP, IMUL] {
        let (two, m) = (Routine::TwoStop(s), Routine::Multi(Kind::Rdi, 1, s));
        println!(
            "RATIO {} / {} (target >= 2.3): {:.3}",
            two.name(),
            m.name(),
            ratio(two, m)
        );
    }
}
