//! A sleepable-RCU read domain whose read side is async-signal-safe.
//!
//! Readers (dispatch, possibly inside a signal handler) bracket every use of the
//! published table with a [`ReadToken`]: [`Domain::enter`] returns it, dropping it
//! leaves the section. No lock, no allocation, no system call, no free. Writers unlink
//! objects, then wait — or poll — until every reader that could have seen them has
//! left, and only then free them, in thread context.
//!
//! A token is the section: it cannot be copied or cloned, so a section is left exactly
//! once (crossbeam-epoch's `Guard` works the same way), and it is neither `Send` nor
//! `Sync`, so it is left on the thread — and through the shard — that entered. A lost
//! token would hold every later grace period open; the type makes losing one take an
//! explicit `mem::forget`.
//!
//! Design (SRCU with two epochs, sharded counters and asymmetric barriers):
//! * `flips` counts epoch changes; its low bit is the current epoch.
//! * `readers[e][s]` counts readers of shard `s` inside epoch `e`.
//! * `enter`: read the epoch `e`, increment `readers[e][s]`, light barrier, re-read the
//!   epoch; if it changed, undo and retry. Then read the table.
//! * `poll` (writer side, serialized by the `grace` mutex): heavy barrier, then if the
//!   non-current epoch has no readers, flip to it.
//! * The barriers pair up (the store-buffering pattern, see `sync::membarrier`): for a
//!   reader's increment and a writer's check of that counter that follows an unlink, either
//!   the check sees the increment, or the reader's table reads see the unlink. Likewise
//!   for the reader's epoch re-read against a flip, so a reader never settles in an
//!   epoch that a check has already passed.
//! * An object unlinked before the stamp [`Domain::stamp`] returned `k` (read under the
//!   `grace` mutex, so later flips happen after the unlink) may be freed once
//!   `flips >= k + 2`: the flip to `k + 1` checked one epoch and the flip to `k + 2` the
//!   other, both after the unlink.
//!
//! Waiting never needs the registry's writer lock, so a slow reader delays only the
//! writer that waits for it.

use std::ptr::NonNull;

use crossbeam_utils::CachePadded;

use crate::shard::{Shard, SHARDS};
use crate::sync::atomic::{
    AtomicU64, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use crate::sync::same_thread::signal_fence;
use crate::sync::{backoff, barrier, held, Mutex};

/// An open read section of one [`Domain`]; dropping it leaves the section (module docs).
///
/// Invariant: `domain` points to a live domain for as long as the token exists, because
/// a domain is not dropped while any section of it is open ([`Domain::close`], which
/// `Drop` of both the domain and its table run first).
#[must_use = "dropping the token leaves the read section at once"]
#[derive(Debug)]
pub(crate) struct ReadToken {
    domain: NonNull<Domain>,
    epoch: u8,
    shard: Shard,
}

impl ReadToken {
    /// The domain this section is open on.
    pub(crate) fn domain(&self) -> *const Domain {
        self.domain.as_ptr()
    }

    /// The shard its counter is on (the thread's).
    #[inline]
    pub(crate) fn shard(&self) -> Shard {
        self.shard
    }
}

impl Drop for ReadToken {
    #[inline]
    fn drop(&mut self) {
        // SAFETY: the domain outlives its open sections (type invariant).
        let domain = unsafe { self.domain.as_ref() };
        domain.leave(self.epoch, self.shard);
    }
}

/// The epoch counters of one table.
#[derive(Debug)]
pub(crate) struct Domain {
    flips: AtomicU64,
    /// `readers[epoch * SHARDS + shard]`; flat and a power of two long, so indexing with
    /// a mask needs no bounds check on the hot path.
    readers: [CachePadded<AtomicUsize>; 2 * SHARDS],
    /// Serializes flips and stamps (writer side only).
    grace: Mutex<()>,
}

impl Domain {
    pub(crate) fn new() -> Self {
        barrier::init();
        Domain {
            flips: AtomicU64::new(0),
            readers: std::array::from_fn(|_| CachePadded::new(AtomicUsize::new(0))),
            grace: Mutex::new(()),
        }
    }

    /// Open a read section. Async-signal-safe; lock-free (retries only while a writer
    /// flips the epoch under it).
    #[inline]
    pub(crate) fn enter(&self, shard: Shard) -> ReadToken {
        // This thread counts as holding a section from before its counter is raised
        // until after it is lowered again (`leave`), never the other way round: a signal
        // handler that interrupts us in between and asks `held::any()` (an unregister from
        // a handler, a fork hook) must refuse to wait rather than wait for the section
        // this very thread is opening. The compiler fences keep the two in that order
        // as the signal handler sees them; no other thread reads `held`.
        held::inc();
        signal_fence();
        loop {
            let epoch = (self.flips.load(Relaxed) & 1) as u8;
            let counter = self.counter(epoch, shard);
            if shard.exclusive {
                // Only this shard's owner writes the counter, with a plain load and
                // store. A signal handler that interrupts between the two may open and
                // close sections of its own on the same counter: it always leaves it as
                // it found it (its sections end before it returns, innermost first), so
                // the store below loses nothing.
                counter.store(counter.load(Relaxed).wrapping_add(1), Relaxed);
            } else {
                counter.fetch_add(1, Relaxed);
            }
            barrier::light();
            if (self.flips.load(Relaxed) & 1) as u8 == epoch {
                return ReadToken {
                    domain: NonNull::from(self),
                    epoch,
                    shard,
                };
            }
            Self::release(counter, shard);
        }
    }

    /// Leave the section of a token (its `Drop`).
    #[inline]
    fn leave(&self, epoch: u8, shard: Shard) {
        Self::release(self.counter(epoch, shard), shard);
        signal_fence();
        held::dec();
    }

    #[inline(always)]
    fn counter(&self, epoch: u8, shard: Shard) -> &AtomicUsize {
        const _: () = assert!(SHARDS.is_power_of_two());
        let i = (usize::from(epoch) * SHARDS + usize::from(shard.index)) & (2 * SHARDS - 1);
        &self.readers[i]
    }

    /// Decrement with release ordering, so everything the reader did happens before a
    /// writer's acquire load that sees the count drop.
    #[inline]
    fn release(counter: &AtomicUsize, shard: Shard) {
        if shard.exclusive {
            counter.store(counter.load(Relaxed).wrapping_sub(1), Release);
        } else {
            counter.fetch_sub(1, Release);
        }
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, ()> {
        self.grace.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The stamp of objects unlinked before this call: they may be freed once
    /// [`Domain::completed`] says so for it.
    pub(crate) fn stamp(&self) -> u64 {
        let _g = self.lock();
        self.flips.load(Relaxed)
    }

    fn drained(&self, epoch: usize) -> bool {
        self.readers[epoch * SHARDS..(epoch + 1) * SHARDS]
            .iter()
            .all(|c| c.load(Acquire) == 0)
    }

    /// Advance the epoch as far as possible without waiting (at most two flips) and
    /// return the flip count reached.
    pub(crate) fn poll(&self) -> u64 {
        let _g = self.lock();
        for _ in 0..2 {
            barrier::heavy();
            let f = self.flips.load(Relaxed);
            if !self.drained(((f + 1) & 1) as usize) {
                break;
            }
            self.flips.store(f + 1, Relaxed);
        }
        self.flips.load(Relaxed)
    }

    /// Whether objects stamped `stamp` may be freed, given `flips` from [`Domain::poll`].
    pub(crate) fn completed(&self, stamp: u64, flips: u64) -> bool {
        flips >= stamp + 2
    }

    /// Wait until objects stamped `stamp` may be freed. Must not be called with a read
    /// section open on this thread (it would wait for itself).
    pub(crate) fn wait(&self, stamp: u64) {
        let mut spins = 0;
        while !self.completed(stamp, self.poll()) {
            backoff(&mut spins);
        }
    }

    /// Zero every reader count: only valid when no thread of the process holds a read
    /// section (the child of a fork, whose other threads are gone, when the forking
    /// thread holds none).
    pub(crate) fn forget_readers(&self) {
        for c in &self.readers {
            c.store(0, Release);
        }
    }

    /// Whether no read section is open in either epoch.
    pub(crate) fn idle(&self) -> bool {
        barrier::heavy();
        self.drained(0) && self.drained(1)
    }

    /// Before the domain (or what it protects) goes: wait until no read section of it is
    /// open. A deferred step (see `ThreadState`) may hold one; its owner will close it,
    /// and freeing first would make that a use after free.
    pub(crate) fn close(&self) {
        if self.idle() {
            return;
        }
        if held::any() {
            // This thread holds a section (maybe of this domain) and can never close it
            // while it waits here: freeing is unsound and waiting deadlocks.
            eprintln!("multiprobe: a probe table was dropped inside one of its own hits");
            std::process::abort();
        }
        let mut spins = 0;
        while !self.idle() {
            backoff(&mut spins);
        }
    }
}

impl Drop for Domain {
    fn drop(&mut self) {
        // Tokens point here (`ReadToken`'s invariant).
        self.close();
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::shard;

    #[test]
    fn poll_advances_only_past_drained_epochs() {
        let d = Domain::new();
        let s = shard::claim();
        let stamp = d.stamp();
        let t = d.enter(s);
        // The reader holds the current epoch: at most one flip (away from it) is possible.
        let f = d.poll();
        assert!(
            !d.completed(stamp, f),
            "grace period passed with a reader inside"
        );
        drop(t);
        assert!(d.completed(stamp, d.poll()));
        d.wait(d.stamp());
        shard::release(s);
    }
}
