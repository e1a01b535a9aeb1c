//! Shards: how dispatching threads avoid writing to each other's cache lines.
//!
//! Every per-hit write (read-section counters, hit counters) goes to the line of the
//! hitting thread's shard. A [`crate::backend::ThreadState`] claims a shard the first time it
//! dispatches. If a shard is still free it claims it *exclusively*: no other thread
//! writes that shard's lines, so its counters can be bumped with a plain load and store
//! instead of a locked read-modify-write. Nested dispatch on the same thread (a signal
//! handler interrupting a handler) is strictly LIFO and restores what it changed, so
//! exclusivity holds across it. The first [`SHARED`] shards are never claimed
//! exclusively: threads that find no free shard, and thread-context readers, share
//! those round-robin with atomic read-modify-writes. (An exclusively owned shard is
//! never written by anyone else, or its owner's plain stores could lose updates.)
//!
//! Claiming is a CAS on a process-wide bit mask, which is async-signal-safe.

use crate::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use crate::sync::{model_static, MODELLED};

/// Number of shards. Small under loom to keep the model's state space small.
pub(crate) const SHARDS: usize = if MODELLED { 2 } else { 8 };
/// Shards `0..SHARED` are shared, never claimed exclusively.
pub(crate) const SHARED: usize = if MODELLED { 1 } else { 2 };
const CLAIMABLE: u32 = ((1u32 << SHARDS) - 1) & !((1u32 << SHARED) - 1);

// Under loom the claims are per model execution, so every execution starts alike.
model_static! {
    /// Bit `i` set: shard `i` is owned exclusively by some `ThreadState`.
    static CLAIMED: AtomicU32 = AtomicU32::new(0);
}
model_static! {
    /// Round-robin cursor for threads that find every shard taken.
    static NEXT_SHARED: AtomicUsize = AtomicUsize::new(0);
}

/// A thread's shard and whether it owns it alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Shard {
    pub(crate) index: u8,
    pub(crate) exclusive: bool,
}

impl Shard {
    const SET: u8 = 0x80;
    const EXCLUSIVE: u8 = 0x40;

    /// One byte, never 0 (0 means "no shard yet" where it is stored: `ThreadState`).
    pub(crate) const fn to_bits(self) -> u8 {
        Self::SET | if self.exclusive { Self::EXCLUSIVE } else { 0 } | self.index
    }

    /// The shard `to_bits` encoded, or `None` for 0.
    pub(crate) const fn from_bits(bits: u8) -> Option<Shard> {
        if bits & Self::SET == 0 {
            return None;
        }
        Some(Shard {
            index: bits & !(Self::SET | Self::EXCLUSIVE),
            exclusive: bits & Self::EXCLUSIVE != 0,
        })
    }
}

/// Claim a shard: a free one exclusively if there is one, otherwise a shared one.
pub(crate) fn claim() -> Shard {
    let mut cur = CLAIMED.load(Ordering::Relaxed);
    loop {
        let free = !cur & CLAIMABLE;
        if free == 0 {
            return shared();
        }
        let bit = free.trailing_zeros();
        match CLAIMED.compare_exchange_weak(
            cur,
            cur | (1 << bit),
            Ordering::Acquire,
            Ordering::Relaxed,
        ) {
            Ok(_) => {
                return Shard {
                    index: bit as u8,
                    exclusive: true,
                }
            }
            Err(now) => cur = now,
        }
    }
}

/// A shared shard, for a thread that cannot or need not own one.
#[allow(clippy::modulo_one)] // one shared shard under loom
pub(crate) fn shared() -> Shard {
    let index = (NEXT_SHARED.fetch_add(1, Ordering::Relaxed) % SHARED) as u8;
    Shard {
        index,
        exclusive: false,
    }
}

/// Give back an exclusively claimed shard. The caller must not write its lines again
/// with plain stores.
pub(crate) fn release(shard: Shard) {
    if shard.exclusive {
        CLAIMED.fetch_and(!(1u32 << shard.index), Ordering::Release);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn exclusive_claims_are_distinct_until_exhausted_then_shared() {
        // Other tests may hold claims concurrently, so only relative facts are checked.
        let mut got = Vec::new();
        loop {
            let s = claim();
            if !s.exclusive {
                assert!(usize::from(s.index) < SHARED);
                break;
            }
            assert!(usize::from(s.index) >= SHARED);
            assert!(!got.iter().any(|g: &Shard| g.index == s.index));
            got.push(s);
        }
        assert!(got.len() <= SHARDS);
        for s in got {
            release(s);
        }
    }
}
