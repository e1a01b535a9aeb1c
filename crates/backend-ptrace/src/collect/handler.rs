//! Collecting handlers as values: [`Collect`], what one does at a hit ([`Action`]), its
//! counters and its records.
//!
//! A `Collect` is an ordinary [`Handler`]: registered beside closures, its `pre` runs
//! in the tracer on the one-stop path and collects there (reading the registers and
//! memory of the stopped thread). The backend also recognises it
//! ([`Handler::as_any`]) and, at a site where every enabled handler is one, runs the
//! same action inside the tracee instead (see the module docs of [`crate::collect`]).
//! Either way the counts and records land in the same `Collect`: what a user reads does
//! not depend on the path a site took.
//!
//! Invariants:
//! * `hits` counts every `pre` (every hit of the one-stop path that reached it);
//!   `faulted` those whose memory read failed (the record is still produced, marked
//!   faulted); `dropped` the records that found the queue full (never blocking).
//! * The queue holds at most [`QUEUE_CAP`] records; records are appended in the order
//!   their hits were served on the tracer thread.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use multiprobe_core::{Handler, HandlerId, Hit, PreAction, Regs};
pub use multiprobe_x86::collect::{LatencyHist, HIST_BUCKETS};

/// The most records one collector keeps between drains before it drops (and counts)
/// new ones.
pub const QUEUE_CAP: usize = 1 << 16;

/// The most bytes a `mem` action copies (what one record of the tracee's ring holds).
pub const MEM_MAX: u16 = multiprobe_x86::collect::RECORD_DATA_MAX as u16;

/// What a collecting handler does at each hit (the generated code's actions: see
/// [`multiprobe_x86::collect::Action`]).
pub use multiprobe_x86::collect::Action;

/// What a record carries, by action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RecordData {
    /// [`Action::Args`]: the arguments, first one first.
    Args(Vec<u64>),
    /// [`Action::Regs`]: the registers at the hit (`rip` is the probed address).
    Regs(Box<Regs>),
    /// [`Action::Mem`]: the pointer (the argument's value) and the bytes read from it;
    /// when the read faulted ([`Record::faulted`]), those read before the fault (none
    /// on the one-stop path).
    Mem {
        /// Where the bytes were read from.
        ptr: u64,
        /// The bytes.
        bytes: Vec<u8>,
    },
    /// [`Action::Ret`]: a call that returned (the record's time is the return's).
    Return {
        /// `rax` at the return: the return value.
        ret: u64,
        /// From the entry to the return, in nanoseconds.
        latency_ns: u64,
        /// The six integer argument registers at the entry.
        args: [u64; 6],
    },
}

/// One hit's record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// The thread (its kernel tid, as `ps -L` shows it).
    pub tid: i32,
    /// When, on `CLOCK_MONOTONIC`, in nanoseconds.
    pub time_ns: u64,
    /// The probed address.
    pub addr: u64,
    /// The handler that produced it.
    pub handler: HandlerId,
    /// The data.
    pub data: RecordData,
    /// A `mem` action whose read faulted (the program went on unharmed).
    pub faulted: bool,
}

/// A collector's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CollectStats {
    /// Hits that ran the action.
    pub hits: u64,
    /// Records lost because the queue (or the tracee's ring) was full.
    pub dropped: u64,
    /// Actions whose memory access faulted.
    pub faulted: u64,
    /// `ret`: calls seen returning (in the tracee; on the one-stop path the core's
    /// handler stats count them).
    pub returns: u64,
    /// `ret`: calls whose return could not be seen in the tracee: its shadow stack was
    /// full, or a `longjmp` or an exception skipped the return.
    pub returns_lost: u64,
}

impl std::ops::Add for CollectStats {
    type Output = CollectStats;
    fn add(self, o: CollectStats) -> CollectStats {
        CollectStats {
            hits: self.hits + o.hits,
            dropped: self.dropped + o.dropped,
            faulted: self.faulted + o.faulted,
            returns: self.returns + o.returns,
            returns_lost: self.returns_lost + o.returns_lost,
        }
    }
}

/// A collecting handler: register it with
/// [`multiprobe_core::Registry::register_handler`] (keep a clone to read it). Cheap to
/// clone; clones are the same collector.
///
/// Register one `Collect` at one address of one process: a second registration of the
/// same value still collects (into the same counters), but the backend runs such a
/// value only on the one-stop path.
#[derive(Clone, Debug)]
pub struct Collect(pub(crate) Arc<Inner>);

#[derive(Debug)]
pub(crate) struct Inner {
    pub(crate) action: Action,
    /// One-stop path counters (the tracee's share is read from its area).
    pub(crate) hits: AtomicU64,
    pub(crate) dropped: AtomicU64,
    pub(crate) faulted: AtomicU64,
    pub(crate) returns: AtomicU64,
    /// `ret` records drained from the tracee so far (its returns are these and its
    /// drops).
    pub(crate) tracee_returns: AtomicU64,
    /// `ret` calls still in flight at the last final drain (exit, exec, detach): they
    /// never return to us, so they count lost.
    pub(crate) tracee_ended_in_flight: AtomicU64,
    /// `latency`: the one-stop path's histogram, and the tracee's as last drained.
    pub(crate) hist: Mutex<(LatencyHist, LatencyHist)>,
    pub(crate) queue: Mutex<VecDeque<Record>>,
    /// Where the backend bound it: process, counter slot, handler id (set once, at its
    /// first registration's `handlers_changed`).
    pub(crate) bound: OnceLock<Binding>,
    /// Counts and records the tracee produced, as last drained into this collector.
    pub(crate) area: Mutex<CollectStats>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Binding {
    pub(crate) pid: i32,
    #[allow(
        dead_code,
        reason = "the trampoline's counter slot, added with promotion"
    )]
    pub(crate) slot: u32,
    pub(crate) id: HandlerId,
}

impl Collect {
    fn new(action: Action) -> Collect {
        Collect(Arc::new(Inner {
            action,
            hits: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            faulted: AtomicU64::new(0),
            returns: AtomicU64::new(0),
            tracee_returns: AtomicU64::new(0),
            tracee_ended_in_flight: AtomicU64::new(0),
            hist: Mutex::new((LatencyHist::EMPTY, LatencyHist::EMPTY)),
            queue: Mutex::new(VecDeque::new()),
            bound: OnceLock::new(),
            area: Mutex::new(CollectStats::default()),
        }))
    }

    /// Count hits.
    pub fn count() -> Collect {
        Collect::new(Action::Count)
    }

    /// Record the first `n` integer arguments (1..=6); `None` for any other `n`.
    pub fn args(n: u8) -> Option<Collect> {
        (1..=6).contains(&n).then(|| Collect::new(Action::Args(n)))
    }

    /// Record the registers.
    pub fn regs() -> Collect {
        Collect::new(Action::Regs)
    }

    /// Record `len` bytes (1..=[`MEM_MAX`]) at the pointer in argument `arg` (1..=6);
    /// `None` outside those ranges.
    pub fn mem(arg: u8, len: u16) -> Option<Collect> {
        ((1..=6).contains(&arg) && (1..=MEM_MAX).contains(&len))
            .then(|| Collect::new(Action::Mem { arg, len }))
    }

    /// Record every call's return: its value, its latency and its arguments
    /// ([`RecordData::Return`]). Register it at a function's entry.
    pub fn ret() -> Collect {
        Collect::new(Action::Ret)
    }

    /// Time every call from its entry to its return into a histogram (power-of-two
    /// buckets of nanoseconds, [`Collect::histogram`]); no records. Register it at a
    /// function's entry.
    pub fn latency() -> Collect {
        Collect::new(Action::Latency)
    }

    /// A `latency` collector's histogram so far, both paths merged (drain first for
    /// the tracee's latest: [`crate::collect::Collection::drain`]).
    pub fn histogram(&self) -> LatencyHist {
        let h = lock(&self.0.hist);
        let mut both = h.0;
        both.add(&h.1);
        both
    }

    /// What it does.
    pub fn action(&self) -> Action {
        self.0.action
    }

    /// Its counters: the one-stop path's plus what was drained from the tracee so far
    /// (drain first — [`crate::collect::Collection::drain`] — for up-to-date figures
    /// of a promoted site).
    pub fn stats(&self) -> CollectStats {
        let i = &self.0;
        let own = CollectStats {
            hits: i.hits.load(Relaxed),
            dropped: i.dropped.load(Relaxed),
            faulted: i.faulted.load(Relaxed),
            returns: i.returns.load(Relaxed),
            returns_lost: 0,
        };
        own + *lock(&i.area)
    }

    /// Take the records collected so far (oldest first). Records the tracee wrote are
    /// here once drained ([`crate::collect::Collection::drain`]).
    pub fn take_records(&self) -> Vec<Record> {
        lock(&self.0.queue).drain(..).collect()
    }

    /// The handler id it was first registered under, once it was.
    pub fn handler_id(&self) -> Option<HandlerId> {
        self.0.bound.get().map(|b| b.id)
    }

    /// Append `rec` (or count it dropped).
    pub(crate) fn push(&self, rec: Record) {
        let mut q = lock(&self.0.queue);
        if q.len() >= QUEUE_CAP {
            self.0.dropped.fetch_add(1, Relaxed);
        } else {
            q.push_back(rec);
        }
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `CLOCK_MONOTONIC` now, in nanoseconds.
pub(crate) fn monotonic_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

impl Handler for Collect {
    /// The one-stop path: the same action, in the tracer.
    fn pre(&self, hit: &mut Hit<'_>) -> PreAction {
        let i = &self.0;
        i.hits.fetch_add(1, Relaxed);
        let mut faulted = false;
        let data = match i.action {
            Action::Count => return PreAction::Continue,
            Action::Ret | Action::Latency => {
                let mut d = [0u64; 7];
                d[0] = monotonic_ns();
                for (k, a) in d[1..].iter_mut().enumerate() {
                    *a = hit.regs().arg(k).unwrap_or(0);
                }
                if let Some(cd) = hit.call_data_mut() {
                    cd[..7].copy_from_slice(&d);
                }
                return PreAction::Continue;
            }
            Action::Args(n) => RecordData::Args(
                (0..n as usize)
                    .map(|k| hit.regs().arg(k).unwrap_or(0))
                    .collect(),
            ),
            Action::Regs => RecordData::Regs(Box::new(*hit.regs())),
            Action::Mem { arg, len } => {
                let ptr = hit.regs().arg(arg as usize - 1).unwrap_or(0);
                let mut buf = vec![0; len as usize];
                if hit.mem().read(ptr, &mut buf).is_err() {
                    faulted = true;
                    i.faulted.fetch_add(1, Relaxed);
                    buf.clear();
                }
                RecordData::Mem { ptr, bytes: buf }
            }
        };
        self.push(Record {
            tid: hit.tid() as i32,
            time_ns: monotonic_ns(),
            addr: hit.addr(),
            handler: hit.handler_id(),
            data,
            faulted,
        });
        PreAction::Continue
    }

    /// The one-stop path of [`Action::Ret`]: the call's entry left its time and
    /// arguments in `data`.
    fn ret(&self, hit: &mut Hit<'_>, data: &multiprobe_core::CallData) {
        let i = &self.0;
        i.returns.fetch_add(1, Relaxed);
        let now = monotonic_ns();
        if i.action == Action::Latency {
            lock(&i.hist).0.record(now.saturating_sub(data[0]));
            return;
        }
        let mut args = [0u64; 6];
        args.copy_from_slice(&data[1..7]);
        self.push(Record {
            tid: hit.tid() as i32,
            time_ns: now,
            addr: hit.addr(),
            handler: hit.handler_id(),
            data: RecordData::Return {
                ret: hit.regs().rax,
                latency_ns: now.saturating_sub(data[0]),
                args,
            },
            faulted: false,
        });
    }

    fn has_ret(&self) -> bool {
        self.0.action.at_return()
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}
