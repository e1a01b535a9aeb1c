//! Every address this process ever armed, as a lock-free set the signal path can read.
//!
//! A `SIGTRAP` whose probe is gone is either a hit racing a disarm (the thread trapped
//! on our `int3` just before the original byte was put back: re-execute it) or someone
//! else's breakpoint (hand it on). The byte in memory cannot always tell: `int 3` encoded
//! as `cd 03` traps with `rip` after a `03`, which is not `0xcc` either. So a trap is
//! treated as a racing hit only at an address we armed at some point.
//!
//! An open-addressing hash set of `AtomicU64` in zero-initialized static memory (pages
//! are only touched as entries land on them). Entries are inserted in thread context,
//! by any number of backends at once (each registry prepares under its own lock, not a
//! shared one), and never removed. When the set is full, insertion fails and
//! [`contains`] answers `true` for everything, falling back to the byte check alone
//! (what Linux uprobes does).
//!
//! Invariant: an entry goes from 0 to an address once, by compare-and-swap, and never
//! changes again; so two inserts racing for the same free entry cannot overwrite each
//! other (the loser moves on to the next entry), and an address found once is found
//! for ever. An address is inserted before its `int3` is written (in `prepare`), and the
//! `Release` of the swap pairs with the `Acquire` loads of [`contains`].

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

const CAP: usize = 1 << 16;

static SET: [AtomicU64; CAP] = [const { AtomicU64::new(0) }; CAP];
static OVERFLOW: AtomicBool = AtomicBool::new(false);

const FIB: u64 = 0x9E37_79B9_7F4A_7C15;

fn hash(a: u64) -> usize {
    (a.wrapping_mul(FIB) >> (64 - CAP.trailing_zeros())) as usize
}

/// Remember `addr` (non-zero). Lock-free; any number of threads may insert at once.
pub(crate) fn insert(addr: u64) {
    debug_assert_ne!(addr, 0);
    let mut i = hash(addr);
    // Stop at 3/4 load: probing stays short.
    for _ in 0..CAP / 4 * 3 {
        let seen = match SET[i].compare_exchange(0, addr, Ordering::Release, Ordering::Acquire) {
            Ok(_) => return,
            Err(seen) => seen,
        };
        if seen == addr {
            return;
        }
        i = (i + 1) % CAP;
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

    /// Two registries prepare at once, so inserts race: threads insert addresses that
    /// all hash to the same slot, so every one of them competes for the same free
    /// entries of one probe sequence. None may be lost.
    #[test]
    fn concurrent_inserts_into_one_probe_sequence_lose_nothing() {
        const THREADS: usize = 4;
        const EACH: usize = 48;
        // `hash` keeps the top bits of `a * FIB`; multiplying by the inverse of FIB
        // (odd, so invertible mod 2^64: Newton's iteration) gives addresses whose product
        // has chosen top bits.
        let mut inv = FIB;
        for _ in 0..6 {
            inv = inv.wrapping_mul(2u64.wrapping_sub(FIB.wrapping_mul(inv)));
        }
        for round in 0..16u64 {
            // A slot per round; the low bits pick distinct addresses (none of them code).
            let slot = 0x1234 + round * 0x100;
            let colliding: Vec<u64> = (1..=(THREADS * EACH) as u64)
                .map(|j| inv.wrapping_mul((slot << 48) | (0xa5a5 << 24) | j))
                .collect();
            assert!(colliding.iter().all(|&a| hash(a) == slot as usize));
            let barrier = std::sync::Barrier::new(THREADS);
            std::thread::scope(|s| {
                for chunk in colliding.chunks(EACH) {
                    let barrier = &barrier;
                    s.spawn(move || {
                        barrier.wait();
                        for &a in chunk {
                            insert(a);
                        }
                    });
                }
            });
            let lost: Vec<u64> = colliding
                .iter()
                .copied()
                .filter(|&a| !contains(a))
                .collect();
            assert!(
                lost.is_empty(),
                "round {round}: lost {} of {}",
                lost.len(),
                colliding.len()
            );
        }
    }
}
