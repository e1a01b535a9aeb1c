//! A sleepable-RCU read domain whose read side is async-signal-safe.
//!
//! Readers (dispatch, possibly inside a signal handler) bracket every use of the
//! published table with [`Domain::enter`] / [`Domain::exit`]: no lock, no allocation,
//! no system call, no free. Writers unlink objects, then wait — or poll — until every
//! reader that could have seen them has left, and only then free them, in thread
//! context.
//!
//! Design (SRCU with two epochs and sharded counters):
//! * `flips` counts epoch changes; its low bit is the current epoch.
//! * `readers[e][s]` counts readers of shard `s` inside epoch `e`.
//! * `enter`: read the epoch `e`, increment `readers[e][s]`, re-read the epoch; if it
//!   changed, undo and retry. A reader that passes has therefore observed epoch `e` *after*
//!   its increment (both sequentially consistent), so a writer either sees the
//!   increment, or flipped before the re-read and the reader sees everything the writer
//!   published before that flip.
//! * Invariant: `flips` moves from `f` to `f + 1` only after `readers[(f + 1) & 1]`
//!   summed to zero while `flips == f` (a CAS on the exact value enforces it).
//! * Consequence: an object unlinked while `flips == k` can be freed once `flips >= k + 2`.
//!   Readers that could see it entered during epoch `k & 1` or earlier; the flip to
//!   `k + 1` required epoch `(k + 1) & 1` drained (readers from before `k`), and the flip
//!   to `k + 2` required epoch `k & 1` drained.
//!
//! Waiting never needs the writer lock, so a slow reader delays only the writer that
//! waits for it, not registration in general.

use crossbeam_utils::CachePadded;

use crate::shard::{Shard, SHARDS};
use crate::sync::atomic::{
    AtomicU64, AtomicUsize,
    Ordering::{Relaxed, Release, SeqCst},
};
use crate::sync::{backoff, held};

/// Proof of an open read section: which counter to decrement on exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ReadToken {
    epoch: u8,
    shard: Shard,
}

/// The epoch counters of one table.
#[derive(Debug)]
pub(crate) struct Domain {
    flips: AtomicU64,
    readers: [[CachePadded<AtomicUsize>; SHARDS]; 2],
}

impl Domain {
    pub(crate) fn new() -> Self {
        Domain {
            flips: AtomicU64::new(0),
            readers: std::array::from_fn(|_| {
                std::array::from_fn(|_| CachePadded::new(AtomicUsize::new(0)))
            }),
        }
    }

    /// Open a read section. Async-signal-safe; lock-free (retries only while a writer
    /// flips the epoch under it).
    #[inline]
    pub(crate) fn enter(&self, shard: Shard) -> ReadToken {
        loop {
            let epoch = (self.flips.load(SeqCst) & 1) as u8;
            let counter = &self.readers[usize::from(epoch)][usize::from(shard.index)];
            counter.fetch_add(1, SeqCst);
            if (self.flips.load(SeqCst) & 1) as u8 == epoch {
                held::inc();
                return ReadToken { epoch, shard };
            }
            counter.fetch_sub(1, Release);
        }
    }

    /// Close a read section opened by [`Domain::enter`] on this domain.
    #[inline]
    pub(crate) fn exit(&self, token: ReadToken) {
        held::dec();
        let counter = &self.readers[usize::from(token.epoch)][usize::from(token.shard.index)];
        if token.shard.exclusive {
            // Only this shard's owner writes the counter; nested sections on its thread
            // are LIFO and have restored the value they found.
            counter.store(counter.load(Relaxed).wrapping_sub(1), Release);
        } else {
            counter.fetch_sub(1, Release);
        }
    }

    /// The current flip count. Objects unlinked now may be freed once
    /// [`Domain::completed`] reports `now + 2`.
    pub(crate) fn now(&self) -> u64 {
        self.flips.load(SeqCst)
    }

    fn drained(&self, epoch: usize) -> bool {
        self.readers[epoch].iter().all(|c| c.load(SeqCst) == 0)
    }

    /// Advance the epoch as far as possible without waiting (at most two flips) and
    /// return the flip count reached.
    pub(crate) fn poll(&self) -> u64 {
        for _ in 0..2 {
            let f = self.flips.load(SeqCst);
            if !self.drained(((f + 1) & 1) as usize) {
                break;
            }
            // A concurrent flipper may win; then the count moved anyway.
            let _ = self.flips.compare_exchange(f, f + 1, SeqCst, SeqCst);
        }
        self.flips.load(SeqCst)
    }

    /// Whether objects unlinked when [`Domain::now`] returned `stamp` may be freed.
    pub(crate) fn completed(&self, stamp: u64, flips: u64) -> bool {
        flips >= stamp + 2
    }

    /// Whether no read section is open in either epoch.
    pub(crate) fn idle(&self) -> bool {
        self.drained(0) && self.drained(1)
    }

    /// Wait until no read section is open.
    pub(crate) fn wait_idle(&self) {
        let mut spins = 0;
        while !self.idle() {
            backoff(&mut spins);
        }
    }

    /// Wait until objects unlinked at `stamp` may be freed. Must not be called with a
    /// read section open on this thread (it would wait for itself).
    pub(crate) fn wait(&self, stamp: u64) {
        let mut spins = 0;
        while !self.completed(stamp, self.poll()) {
            backoff(&mut spins);
        }
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
        let stamp = d.now();
        let t = d.enter(s);
        // The reader holds the current epoch: at most one flip (away from it) is possible.
        let f = d.poll();
        assert!(
            !d.completed(stamp, f),
            "grace period passed with a reader inside"
        );
        d.exit(t);
        assert!(d.completed(stamp, d.poll()));
        d.wait(d.now());
        shard::release(s);
    }
}
