//! Hit counters, sharded per dispatching thread (see [`crate::shard`]), and the plain
//! values users read out of them. A handler's hits are not counted per handler but
//! derived from its site's walks ([`crate::tally`]); what is counted per handler is
//! what sets it apart from the walk: skips, misses and panics.
//!
//! Invariant: a counter line of shard `i` is written with a plain load+store only by
//! the `ThreadState` that owns shard `i` exclusively; everybody else uses `fetch_add`.
//! Readers sum all shards with relaxed loads, so a total read while threads are hitting
//! is a lower bound that is exact once they stop.

use crate::shard::{Shard, SHARDS};
use crate::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Statistics of one handler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HandlerStats {
    /// Hits whose pre-handler walk reached this handler while it was enabled.
    pub hits: u64,
    /// Hits that ran no handler because the thread was already dispatching (rule 6),
    /// or whose post-handler could not be scheduled.
    pub missed: u64,
    /// Calls into this handler that panicked (caught; rule 8).
    pub panics: u64,
    /// Calls whose entry ran this handler's pre-hook and whose return ran its return
    /// hook ([`crate::Handler::ret`]; contract rule 10).
    pub returns: u64,
    /// Calls whose entry ran the pre-hook but whose return could not be seen: the
    /// thread's return stack was full, the walk redirected, the call was skipped by a
    /// `longjmp` or an exception, the thread ended inside it (rule 10). A call in
    /// flight on another stack (a coroutine the program switched away from) can be
    /// counted here while it looks skipped, and moves to `returns` if it returns.
    pub returns_lost: u64,
}

/// Statistics of one probed address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SiteStats {
    /// The probed address.
    pub addr: u64,
    /// Hits at this address that dispatched (missed, reentrant hits excluded).
    pub hits: u64,
    /// Registered handlers.
    pub handlers: usize,
    /// Of which enabled.
    pub enabled: usize,
    /// Whether the breakpoint is in place.
    pub armed: bool,
}

#[inline]
pub(crate) fn bump(counter: &AtomicU64, shard: Shard) {
    if shard.exclusive {
        // Only the owner of this shard writes it (module invariant), and nested
        // dispatch on the owner's thread is LIFO, so load+store cannot lose an update.
        counter.store(counter.load(Relaxed).wrapping_add(1), Relaxed);
    } else {
        counter.fetch_add(1, Relaxed);
    }
}

/// A value on a 64-byte cache line of its own. Smaller than `crossbeam_utils::CachePadded`
/// (128 bytes on x86-64, to defeat the adjacent-line prefetcher): counters are
/// allocated per handler and per site, so their size is what a hundred thousand probes
/// cost in memory and page faults, and the prefetcher's pairing costs little here.
#[derive(Debug)]
#[repr(align(64))]
pub(crate) struct Line<T>(pub(crate) T);

impl<T> std::ops::Deref for Line<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

/// The counters of one shard of one handler, on a cache line of their own.
#[derive(Debug)]
struct HandlerLine {
    /// Walks that listed this handler but ended before it (a redirect).
    skipped: AtomicU64,
    missed: AtomicU64,
    panics: AtomicU64,
    returns: AtomicU64,
    returns_lost: AtomicU64,
    /// Returns counted lost and then seen after all (a suspect frame's call came back).
    returns_found: AtomicU64,
}

/// Per-handler counters.
#[derive(Debug)]
pub(crate) struct HandlerCounters {
    lines: [Line<HandlerLine>; SHARDS],
}

impl HandlerCounters {
    pub(crate) fn new() -> Self {
        HandlerCounters {
            lines: std::array::from_fn(|_| {
                Line(HandlerLine {
                    skipped: AtomicU64::new(0),
                    missed: AtomicU64::new(0),
                    panics: AtomicU64::new(0),
                    returns: AtomicU64::new(0),
                    returns_lost: AtomicU64::new(0),
                    returns_found: AtomicU64::new(0),
                })
            }),
        }
    }

    /// The walk ended before this handler: bumped inside the walk (so the plain store
    /// of an exclusive shard is safe, as for the walk counter).
    pub(crate) fn skipped(&self, shard: Shard) {
        bump(
            &self.lines[usize::from(shard.index) & (SHARDS - 1)].skipped,
            shard,
        );
    }

    /// Missed hits happen in nested dispatch, which may itself be interrupted by more
    /// nested dispatch touching the same counter, so they are always atomic.
    pub(crate) fn missed(&self, shard: Shard) {
        self.lines[usize::from(shard.index)]
            .missed
            .fetch_add(1, Relaxed);
    }

    pub(crate) fn panicked(&self, shard: Shard) {
        self.lines[usize::from(shard.index)]
            .panics
            .fetch_add(1, Relaxed);
    }

    /// A return hook ran (or is about to). Counted with the thread dispatching (its
    /// `active` set), like skips: the plain store of an exclusive shard is safe.
    pub(crate) fn returned(&self, shard: Shard) {
        bump(
            &self.lines[usize::from(shard.index) & (SHARDS - 1)].returns,
            shard,
        );
    }

    /// A return was lost. As for `returned`.
    pub(crate) fn lost(&self, shard: Shard) {
        bump(
            &self.lines[usize::from(shard.index) & (SHARDS - 1)].returns_lost,
            shard,
        );
    }

    /// A return counted lost came back after all (`crate::returns`, *Suspects*). As for
    /// `returned`.
    pub(crate) fn unlost(&self, shard: Shard) {
        bump(
            &self.lines[usize::from(shard.index) & (SHARDS - 1)].returns_found,
            shard,
        );
    }

    /// The statistics, given a way to read the walks that listed the handler. Skips are
    /// read first: a skip is counted after its walk, so the difference never counts a
    /// skip whose walk it missed.
    pub(crate) fn read(&self, walks: impl FnOnce() -> u64) -> HandlerStats {
        let mut s = HandlerStats::default();
        let mut skipped = 0;
        // Found first: a return is counted lost before it can be found again, so the
        // difference never goes below what was lost at some point.
        let found: u64 = self
            .lines
            .iter()
            .map(|l| l.returns_found.load(Relaxed))
            .sum();
        for l in &self.lines {
            skipped += l.skipped.load(Relaxed);
            s.missed += l.missed.load(Relaxed);
            s.panics += l.panics.load(Relaxed);
            s.returns += l.returns.load(Relaxed);
            s.returns_lost += l.returns_lost.load(Relaxed);
        }
        s.returns_lost = s.returns_lost.saturating_sub(found);
        s.hits = walks().saturating_sub(skipped);
        s
    }
}

/// A sharded counter: the walks of one site view.
#[derive(Debug)]
pub(crate) struct SiteCounter {
    lines: [Line<AtomicU64>; SHARDS],
}

impl SiteCounter {
    pub(crate) fn new() -> Self {
        SiteCounter {
            lines: std::array::from_fn(|_| Line(AtomicU64::new(0))),
        }
    }

    #[inline]
    pub(crate) fn hit(&self, shard: Shard) {
        bump(&self.lines[usize::from(shard.index) & (SHARDS - 1)], shard);
    }

    pub(crate) fn read(&self) -> u64 {
        self.lines.iter().map(|l| l.load(Relaxed)).sum()
    }
}
