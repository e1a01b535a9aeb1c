//! Actions that collect in the tracee (`count`, `args:N`, `regs`, `mem:ARG:LEN`, and the
//! return actions `ret`, `latency`, `args:N,ret`): the command's side of
//! backend-ptrace's [`Collect`] handlers.
//!
//! Such an action is registered as a [`Collect`] value instead of a closure
//! ([`collector`] decides), so a site whose every action collects is promoted by the
//! backend and served without a stop; a site that also has an action which needs the
//! tracer (`str:`, `ustack`, a condition, a return action) takes the one-stop path,
//! where the same collectors run in the tracer. The counts and records are the same
//! either way, and so are the lines: [`Collected::print`] turns records into exactly
//! the lines the closures print (the same [`crate::lines`] functions, the same
//! rate limit through [`Sink::hit_line`], the same JSON `hit` objects).
//!
//! Records reach the command when drained: a drain thread ([`Drainer`]) takes them every
//! [`DRAIN_EVERY`] while the tracer thread sleeps in `waitpid`, and the command drains
//! once more when the tracer loop returns (exit, detach) and at each `exec`, so no record
//! written before is lost. Lines of one drain are printed in the order of their
//! timestamps.
//!
//! `--stop` keeps every action a closure (the one-stop path for everything).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::iter::Peekable;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use multiprobe_backend_ptrace::collect::{
    Action as CollectAction, Collect, Collection, Record, RecordData, MEM_MAX,
};
use multiprobe_backend_ptrace::DetachHandle;

use crate::actions::{Args, Binding, SiteCtx};
use crate::lines::{self, args_line, mem_lines, regs_line, Who};
use crate::sink::Sink;
use crate::spec::Action;

/// How often the drain thread takes the records (the tracee's ring holds them until
/// then: at 1 M records a second, 10 ms is a hundredth of its capacity).
pub const DRAIN_EVERY: Duration = Duration::from_millis(10);

/// While a drain's lines are printed, the rings are drained again every this many lines:
/// formatting is slower than a busy program makes records (~1 µs a line against 1 M
/// records a second), and the rings must not fill meanwhile. What is drained then waits
/// in the collectors for the next print.
const DRAIN_WHILE_PRINTING: usize = 512;

/// The [`Collect`] handler for `action` at a site with context `ctx`, if it can collect
/// (in the tracee when its site is promoted): plain `count`, `args:N` (N <= 6), `regs`
/// and `mem:ARG:LEN` (ARG <= 6), at a function's System V arguments and with no
/// condition (conditions are evaluated in the tracer).
pub fn collector(action: Action, ctx: &SiteCtx) -> Option<Collect> {
    if !ctx.filters.is_empty() || !matches!(ctx.args, Args::Abi) {
        return None;
    }
    match action {
        Action::Count => Some(Collect::count()),
        Action::Args(n) => Collect::args(n),
        Action::Regs => Some(Collect::regs()),
        Action::Mem { arg, len } if len <= MEM_MAX => Collect::mem(arg + 1, len),
        // One record at each return: its value, latency and the entry's arguments.
        Action::Ret => Some(Collect::ret()),
        // A histogram in the tracee: no records, none dropped.
        Action::Latency => Some(Collect::latency()),
        Action::Call(n) if n <= 6 => Some(Collect::ret()),
        _ => None,
    }
}

/// What a record's lines need of its row.
#[derive(Debug)]
struct Printer {
    collect: Collect,
    action: Action,
    label: Arc<str>,
    pid: i32,
    sink: Arc<Sink>,
    time: bool,
}

/// Every collector of the session whose action prints, to turn its records into lines.
#[derive(Debug, Default)]
pub struct Collected {
    printers: Mutex<Vec<Printer>>,
    /// The drain handles of the processes traced (one tracer: one handle).
    drains: Mutex<Vec<Collection>>,
    /// One print at a time, so lines keep their order.
    printing: Mutex<()>,
}

impl Collected {
    /// `collect` was registered for `b`'s row: print its records.
    pub fn add(&self, collect: &Collect, b: &Binding) {
        if matches!(
            collect.action(),
            CollectAction::Count | CollectAction::Latency
        ) {
            return; // nothing to print: counters, a histogram
        }
        lock(&self.printers).push(Printer {
            collect: collect.clone(),
            action: b.action,
            label: Arc::clone(&b.label),
            pid: b.pid,
            sink: Arc::clone(&b.sink),
            time: b.time,
        });
    }

    /// Drain through `collection` too (the tracer's handle).
    pub fn drain_from(&self, collection: Collection) {
        lock(&self.drains).push(collection);
    }

    /// Whether the tracer has sites to promote or demote (it does that between
    /// events: a program that makes none needs a wake-up).
    fn rework_pending(&self) -> bool {
        lock(&self.drains).iter().any(Collection::rework_pending)
    }

    /// Move what the tracees wrote into the collectors (out of the rings, which are
    /// then free for more).
    fn drain(&self) {
        for d in lock(&self.drains).iter() {
            d.drain();
        }
    }

    /// Move what the tracees wrote into the collectors, then print every record taken,
    /// in time order across collectors and in the ring's order within one. Any thread.
    ///
    /// A merge, not a sort: each collector's records are in the order their cells
    /// were claimed, which is the order of one thread's calls; their timestamps come
    /// from a TSC conversion resampled at every drain, so records of two drains (this
    /// one and those made while the last lines were printed) can be a few
    /// microseconds out of step, and sorting by them would swap calls.
    pub fn print(&self) {
        let _one = lock(&self.printing);
        self.drain();
        let printers = lock(&self.printers);
        let mut lists: Vec<Peekable<std::vec::IntoIter<Record>>> = printers
            .iter()
            .map(|p| p.collect.take_records().into_iter().peekable())
            .collect();
        // (time of the list's first record, the list)
        let mut heads: BinaryHeap<Reverse<(u64, usize)>> = BinaryHeap::new();
        for (i, l) in lists.iter_mut().enumerate() {
            if let Some(r) = l.peek() {
                heads.push(Reverse((r.time_ns, i)));
            }
        }
        if heads.is_empty() {
            return;
        }
        let clock = Clock::now();
        // One sink serves the session: its lines go out in large writes, not one each
        // (a write per line kept this thread from draining 1 M records a second).
        printers[0].sink.batch(|| {
            let mut k = 0usize;
            while let Some(Reverse((_, i))) = heads.pop() {
                k += 1;
                if k.is_multiple_of(DRAIN_WHILE_PRINTING) {
                    self.drain();
                }
                if let Some(r) = lists[i].next() {
                    printers[i].print(&r, &clock);
                }
                if let Some(r) = lists[i].peek() {
                    heads.push(Reverse((r.time_ns, i)));
                }
            }
        });
    }
}

/// `CLOCK_MONOTONIC` to wall-clock time, from one pair of readings.
struct Clock {
    wall: SystemTime,
    mono_ns: u64,
}

impl Clock {
    fn now() -> Clock {
        let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
        Clock {
            wall: SystemTime::now(),
            mono_ns: t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64,
        }
    }

    fn wall(&self, mono_ns: u64) -> SystemTime {
        let back = Duration::from_nanos(self.mono_ns.saturating_sub(mono_ns));
        self.wall.checked_sub(back).unwrap_or(self.wall)
    }
}

impl Printer {
    fn print(&self, r: &Record, clock: &Clock) {
        let when = clock.wall(r.time_ns);
        let who = Who {
            pid: self.pid,
            tid: r.tid as u32,
            time: self.time.then_some(when),
        };
        let json = |fields: serde_json::Value| {
            crate::actions::hit_json(
                self.pid,
                r.tid as u32,
                r.addr,
                &self.label,
                self.action,
                when,
                fields,
            )
        };
        let label = &*self.label;
        match (&r.data, self.action) {
            (RecordData::Args(vals), _) => self.sink.hit_line(|| {
                if self.sink.json() {
                    let v: Vec<String> = vals.iter().map(|v| format!("{v:#x}")).collect();
                    json(serde_json::json!({ "args": v }))
                } else {
                    let args: Vec<Result<u64, String>> = vals.iter().map(|&v| Ok(v)).collect();
                    args_line(&who, label, &args)
                }
            }),
            (RecordData::Regs(regs), _) => self.sink.hit_line(|| {
                if self.sink.json() {
                    json(serde_json::json!({ "regs": lines::regs_json(regs) }))
                } else {
                    regs_line(&who, label, regs)
                }
            }),
            (RecordData::Mem { ptr, bytes }, Action::Mem { arg, len }) => {
                self.sink.hit_line(|| {
                    let read: Result<&[u8], String> = if r.faulted {
                        Err(format!("cannot read {len} bytes at {ptr:#x}: bad address"))
                    } else {
                        Ok(bytes)
                    };
                    if self.sink.json() {
                        let m = lines::mem_json(*ptr, len, read.as_deref().map_err(String::as_str));
                        json(serde_json::json!({ "mem": m }))
                    } else {
                        mem_lines(&who, label, arg, *ptr, read.map_err(|e| e.clone()))
                    }
                })
            }
            (
                RecordData::Return {
                    ret,
                    latency_ns,
                    args,
                },
                Action::Ret | Action::Call(_),
            ) => self.sink.hit_line(|| {
                let n = match self.action {
                    Action::Call(n) => usize::from(n).min(args.len()),
                    _ => 0,
                };
                crate::returning::ret_line(&crate::returning::RetLine {
                    who,
                    site: r.addr,
                    label,
                    action: self.action,
                    json: self.sink.json(),
                    args: &args[..n],
                    ret: *ret,
                    ns: Some(*latency_ns),
                    when,
                })
            }),
            _ => {}
        }
    }
}

/// Prints the collected records every [`DRAIN_EVERY`] until dropped (and once more then).
pub struct Drainer {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    collected: Arc<Collected>,
}

impl Drainer {
    /// Start the drain thread for `collected`; it wakes the tracer loop through
    /// `wake` when sites wait to be promoted.
    pub fn start(collected: Arc<Collected>, wake: Option<DetachHandle>) -> Drainer {
        let stop = Arc::new(AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let c = Arc::clone(&collected);
        let thread = std::thread::Builder::new()
            .name("multiprobe-drain".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::park_timeout(DRAIN_EVERY);
                    c.print();
                    if let Some(w) = wake.as_ref().filter(|_| c.rework_pending()) {
                        w.wake();
                    }
                }
            })
            .ok();
        Drainer {
            stop,
            thread,
            collected,
        }
    }
}

impl Drop for Drainer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        self.collected.print();
    }
}

impl std::fmt::Debug for Drainer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Drainer").finish_non_exhaustive()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
