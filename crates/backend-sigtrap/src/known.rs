//! Every address this process ever armed, as a lock-free set the signal path can read.
//!
//! A `SIGTRAP` whose probe is gone is either a hit racing a disarm (the thread trapped
//! on our `int3` just before the original byte was put back: re-execute it) or someone
//! else's breakpoint (hand it on). The byte in memory cannot always tell: `int 3` encoded
//! as `cd 03` traps with `rip` after a `03`, which is not `0xcc` either. So a trap is
//! treated as a racing hit only at an address we armed at some point.
//!
//! An open-addressing hash set of `AtomicU64` in zero-initialized static memory (pages
//! are only touched as entries land on them). Entries are inserted in thread context
//! (under the backend's arm lock) and never removed. When the set is full, insertion
//! fails and [`contains`] answers `true` for everything, falling back to the byte check
//! alone (what Linux uprobes does).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const CAP: usize = 1 << 16;

static SET: [AtomicU64; CAP] = [const { AtomicU64::new(0) }; CAP];
static OVERFLOW: AtomicBool = AtomicBool::new(false);

fn hash(a: u64) -> usize {
    (a.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - CAP.trailing_zeros())) as usize
}

/// Remember `addr` (non-zero). Thread context; callers serialize.
pub(crate) fn insert(addr: u64) {
    debug_assert_ne!(addr, 0);
    let mut i = hash(addr);
    // Stop at 3/4 load: probing stays short.
    for _ in 0..CAP / 4 * 3 {
        match SET[i].load(Ordering::Relaxed) {
            0 => {
                SET[i].store(addr, Ordering::Release);
                return;
            }
            a if a == addr => return,
            _ => i = (i + 1) % CAP,
        }
    }
    OVERFLOW.store(true, Ordering::Release);
}

/// Whether `addr` was ever inserted (or the set overflowed). Async-signal-safe.
pub(crate) fn contains(addr: u64) -> bool {
    if OVERFLOW.load(Ordering::Acquire) {
        return true;
    }
    let mut i = hash(addr);
    loop {
        match SET[i].load(Ordering::Acquire) {
            0 => return false,
            a if a == addr => return true,
            _ => i = (i + 1) % CAP,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inserted_addresses_are_found_and_others_are_not() {
        // Addresses no other test arms (never executable memory).
        let base = 0xdead_0000_0000u64;
        for k in 0..100 {
            insert(base + k * 7);
        }
        for k in 0..100 {
            assert!(contains(base + k * 7));
            assert!(!contains(base + k * 7 + 3));
        }
    }
}
