//! Draining the tracee's ring into the collectors, from any thread ([`Collection`]).
//!
//! One reader at a time per area (the ring has one consumer: its `tail`), enforced by
//! the area's reader lock; the tracer thread drains at exit, exec and detach, and a
//! user's thread (the command's ticker) whenever it likes. A record names its
//! collector by counter slot, its site by index and its thread by fs base: the slot
//! table, the site table and the fs-base history (see [`Threads`]) turn those into a
//! [`Record`] like the one-stop path makes. A record of a collector that left its site
//! before the record's timestamp is dropped (rule 3: it was being written by a thread
//! still in the old trampoline when the change was made).
//!
//! `unsafe` here: viewing the tracer's mapping of the area as `[AtomicU64]`.

use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Weak};

use multiprobe_core::Regs;
use multiprobe_x86::collect::{AreaReader, RecordRef, REGS_ORDER};

use super::handler::{lock, Action, CollectStats, Inner, Record, RecordData};
use super::{Area, AreaState};
use crate::backend::Shared;

/// fs base → thread id, with history: a TCB address reused by a later thread resolves
/// by the record's TSC.
///
/// Threads are noted when the tracer stops them all (promotion) and at their clone
/// (its TLS argument). A thread seen before its TLS was set up (fs base 0: the main
/// thread of a program spawned at its first instruction, before the dynamic loader
/// ran) is the owner of any fs base nobody else has — the one case where a thread's fs
/// base changes after we looked, short of a program that sets it itself
/// (`arch_prctl`), whose records then name that thread too (a known limit).
#[derive(Clone, Debug, Default)]
pub(crate) struct Threads {
    /// fs base → (TSC from which it belonged to the thread, tid), oldest first.
    by_fs: HashMap<u64, Vec<(u64, i32)>>,
    /// A thread last seen without TLS.
    unset: Option<i32>,
}

impl Threads {
    /// Thread `tid` has fs base `fs` from now on.
    pub(crate) fn note(&mut self, fs: u64, tid: i32) {
        if fs == 0 {
            self.unset = Some(tid);
            return;
        }
        let v = self.by_fs.entry(fs).or_default();
        if v.last().is_none_or(|&(_, t)| t != tid) {
            v.push((super::clock::rdtsc(), tid));
        }
    }

    /// The fs base thread `tid` has, if it was noted and no later thread has it since.
    pub(crate) fn fs_of(&self, tid: i32) -> Option<u64> {
        self.by_fs
            .iter()
            .find(|(_, v)| v.last().is_some_and(|&(_, t)| t == tid))
            .map(|(&fs, _)| fs)
    }

    /// The thread that had fs base `fs` at `tsc` (0 if none is known).
    pub(crate) fn tid(&self, fs: u64, tsc: u64) -> i32 {
        let Some(v) = self.by_fs.get(&fs) else {
            return self.unset.unwrap_or(0);
        };
        v.iter()
            .rev()
            .find(|&&(since, _)| since <= tsc)
            .or(v.first())
            .map_or(0, |&(_, t)| t)
    }
}

/// A handle on the data the collectors of one traced process gather: `Send + Sync`,
/// cheap to clone, usable from any thread while the tracer loop runs (see
/// [`crate::Tracer::collection`]).
#[derive(Clone, Debug)]
pub struct Collection {
    pub(crate) shared: Arc<Shared>,
}

impl Collection {
    /// Whether sites wait to be promoted (or demoted), and it is their turn: the tracer
    /// does that between
    /// events, so a program that makes none (it is idle, or every hit is served in the
    /// tracee) needs a [`crate::DetachHandle::wake`] for it.
    pub fn rework_pending(&self) -> bool {
        self.shared
            .collect_dirty
            .load(std::sync::atomic::Ordering::Acquire)
            && self
                .shared
                .lock()
                .collect
                .rework_after
                .is_none_or(|t| std::time::Instant::now() >= t)
    }

    /// Move every complete record the tracee wrote so far into its collector (read
    /// them with [`super::Collect::take_records`]) and refresh the collectors'
    /// counters ([`super::Collect::stats`]). Returns how many records it moved. Never
    /// waits for the tracee; a record still being written stays for the next drain.
    pub fn drain(&self) -> usize {
        drain(&self.shared, false)
    }
}

/// The drain (`stopped`: no thread of the tracee can be writing a record — it is dead
/// or every thread is stopped outside the action code — so unfinished cells are
/// skipped instead of waited for).
pub(crate) fn drain(shared: &Shared, stopped: bool) -> usize {
    let (area, slots, sites, threads) = {
        let st = shared.lock();
        let c = &st.collect;
        let AreaState::Mapped(a) = &c.area else {
            return 0;
        };
        (
            a.clone(),
            c.slots.clone(),
            c.sites.clone(),
            c.threads.clone(),
        )
    };
    drain_area(&area, &slots, &sites, &threads, stopped)
}

/// The area's mapping in the tracer, as the atomics it must be accessed through.
fn words_of(area: &Area) -> &[AtomicU64] {
    let words = area.map.len() / 8;
    // SAFETY: the mapping is `words * 8` bytes, 8-aligned (page-aligned), and lives as
    // long as `area.map` (borrowed for the slice's life); every access through the
    // slice is atomic, which is what memory the tracee writes concurrently needs.
    unsafe { std::slice::from_raw_parts(area.map.as_ptr().cast::<AtomicU64>(), words) }
}

/// Let the `ret` collector at `slot` see returns, or not (its live word: see
/// `multiprobe_x86::collect`, "Returns").
pub(crate) fn set_live(area: &Area, slot: u32, live: bool) {
    if slot < area.layout.counter_slots() {
        if let Ok(r) = AreaReader::new(words_of(area), &area.layout) {
            r.set_live(slot, live);
        }
    }
}

/// Count one call lost at the counter word the tracee's frame names (`word`, its
/// address in the tracee): the same atomic add the tracee's code makes. Ignores a word
/// outside the area (the frame's bytes are the tracee's, not trusted).
pub(crate) fn count_lost_at(area: &Area, word: u64) {
    let Some(off) = word.checked_sub(area.tracee) else {
        return;
    };
    if off % 8 == 0 {
        if let Some(w) = words_of(area).get((off / 8) as usize) {
            w.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

pub(crate) fn drain_area(
    area: &Area,
    slots: &[Weak<Inner>],
    sites: &[u64],
    threads: &Threads,
    stopped: bool,
) -> usize {
    let mut clock = lock(&area.clock);
    clock.resample();
    let mem = words_of(area);
    let Ok(mut reader) = AreaReader::new(mem, &area.layout) else {
        return 0; // not ours any more (never happens: we wrote the header)
    };
    let cols: Vec<Option<Arc<Inner>>> = slots.iter().map(Weak::upgrade).collect();
    let mut take = |r: RecordRef<'_>| {
        let Some(Some(c)) = cols.get(r.slot as usize) else {
            return;
        };
        let Some(b) = c.bound.get() else {
            return;
        };
        if c.action == Action::Ret {
            c.tracee_returns
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let rec = Record {
            tid: threads.tid(r.thread, r.tsc),
            time_ns: clock.ns(r.tsc),
            addr: sites.get(r.site as usize).copied().unwrap_or(0),
            handler: b.id,
            data: decode(c.action, &r, &clock),
            faulted: r.faulted,
        };
        super::Collect(Arc::clone(c)).push(rec);
    };
    let n = if stopped {
        reader.drain_stopped(&mut take)
    } else {
        reader.drain(&mut take)
    };
    // Collectors bound past the area's counters never ran in the tracee (`classify`).
    let counted = area.layout.counter_slots() as usize;
    for (slot, c) in cols.iter().enumerate().take(counted) {
        if let Some(c) = c {
            let k = reader.counters(slot as u32);
            let (returns, returns_lost) = if c.action.at_return() {
                let returns = if c.action == Action::Latency {
                    let h = reader.histogram(slot as u32);
                    lock(&c.hist).1 = h;
                    h.count()
                } else {
                    c.tracee_returns.load(std::sync::atomic::Ordering::Relaxed) + k.dropped
                };
                // A final drain (the process is dead or being left, or its image
                // replaced): the calls still in flight never return to us (a thread
                // ended inside one, `exit` was called from one): lost.
                let ended = &c.tracee_ended_in_flight;
                if stopped {
                    let in_flight = k.hits.saturating_sub(returns + k.returns_lost);
                    ended.store(in_flight, std::sync::atomic::Ordering::Relaxed);
                }
                let ended = ended.load(std::sync::atomic::Ordering::Relaxed);
                (returns, k.returns_lost + ended)
            } else {
                (0, 0)
            };
            *lock(&c.area) = CollectStats {
                hits: k.hits,
                dropped: k.dropped,
                faulted: k.faulted,
                returns,
                returns_lost,
            };
        }
    }
    n
}

fn words(data: &[u8]) -> impl Iterator<Item = u64> + '_ {
    data.chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
}

/// The record's data as the one-stop path gives it.
fn decode(action: Action, r: &RecordRef<'_>, clock: &super::clock::Clock) -> RecordData {
    match action {
        Action::Count | Action::Args(_) => RecordData::Args(words(r.data).collect()),
        Action::Regs => {
            let w: Vec<u64> = words(r.data).collect();
            let mut regs = Regs::default();
            for (i, g) in REGS_ORDER.iter().enumerate() {
                *regs.gpr_mut(*g) = w.get(i).copied().unwrap_or(0);
            }
            regs.rip = w.get(16).copied().unwrap_or(0);
            regs.rflags = w.get(17).copied().unwrap_or(0);
            regs.fs_base = r.thread;
            RecordData::Regs(Box::new(regs))
        }
        Action::Mem { .. } => RecordData::Mem {
            ptr: r.ptr,
            bytes: r.data.to_vec(),
        },
        Action::Ret | Action::Latency => {
            let w: Vec<u64> = words(r.data).collect();
            let at = |i: usize| w.get(i).copied().unwrap_or(0);
            let mut args = [0u64; 6];
            for (k, a) in args.iter_mut().enumerate() {
                *a = at(3 + k);
            }
            RecordData::Return {
                ret: at(1),
                latency_ns: clock.ns(r.tsc).saturating_sub(clock.ns(at(0))),
                args,
            }
        }
    }
}
