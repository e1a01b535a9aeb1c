//! A preallocated, lock-free ring for handing data out of signal context.
//!
//! Handlers run inside the SIGTRAP handler, where they may not allocate, lock or do I/O.
//! A [`HitRing`] is allocated up front (thread context); handlers [`HitRing::push`]
//! `Copy` records into it, and an ordinary thread [`HitRing::pop`]s them and does the
//! slow work (printing, aggregating, sending).
//!
//! It is D. Vyukov's bounded MPMC queue: each cell has a sequence number telling whether
//! it is free for the producer of lap `n` or full for the consumer of lap `n`; producers
//! and consumers claim positions with a CAS. `push` never waits: when the ring is full
//! the record is dropped and counted ([`HitRing::dropped`]), so a slow reader can never
//! stall a probed thread. A push interrupted by a signal whose handler pushes again on
//! the same thread is fine: the inner push claims the next position; a reader just sees
//! the outer one as "not yet" until the interrupted push completes.

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use crossbeam_utils::CachePadded;
use multiprobe_core::{HandlerId, Hit, SYSV_ARGS};

struct Cell<T> {
    seq: AtomicUsize,
    val: UnsafeCell<MaybeUninit<T>>,
}

/// A fixed-capacity multi-producer multi-consumer ring of `T`s whose `push` is
/// async-signal-safe (no lock, no allocation, no system call, never blocks).
pub struct HitRing<T> {
    cells: Box<[Cell<T>]>,
    mask: usize,
    tail: CachePadded<AtomicUsize>,
    head: CachePadded<AtomicUsize>,
    dropped: CachePadded<AtomicU64>,
}

// SAFETY: a value is moved into a cell by one producer and out of it by one consumer,
// each after claiming the position exclusively; the sequence number's Release/Acquire
// orders the value's write before its read. `T: Send` suffices for that hand-over.
unsafe impl<T: Send> Sync for HitRing<T> {}
// SAFETY: owns `T`s only.
unsafe impl<T: Send> Send for HitRing<T> {}

impl<T: Copy> HitRing<T> {
    /// A ring holding up to `capacity` records (rounded up to a power of two, at least 2).
    pub fn new(capacity: usize) -> Self {
        let cap = capacity.max(2).next_power_of_two();
        HitRing {
            cells: (0..cap)
                .map(|i| Cell {
                    seq: AtomicUsize::new(i),
                    val: UnsafeCell::new(MaybeUninit::uninit()),
                })
                .collect(),
            mask: cap - 1,
            tail: CachePadded::new(AtomicUsize::new(0)),
            head: CachePadded::new(AtomicUsize::new(0)),
            dropped: CachePadded::new(AtomicU64::new(0)),
        }
    }

    /// How many records fit.
    pub fn capacity(&self) -> usize {
        self.mask + 1
    }

    /// Append `v`; returns false (and counts a drop) if the ring is full.
    /// Async-signal-safe and lock-free.
    pub fn push(&self, v: T) -> bool {
        let mut pos = self.tail.load(Ordering::Relaxed);
        loop {
            let cell = &self.cells[pos & self.mask];
            let seq = cell.seq.load(Ordering::Acquire);
            let diff = seq.wrapping_sub(pos) as isize;
            if diff == 0 {
                match self.tail.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: position `pos` is claimed by this producer alone until
                        // the sequence store below hands it to a consumer.
                        unsafe { (*cell.val.get()).write(v) };
                        cell.seq.store(pos.wrapping_add(1), Ordering::Release);
                        return true;
                    }
                    Err(now) => pos = now,
                }
            } else if diff < 0 {
                self.dropped.fetch_add(1, Ordering::Relaxed);
                return false;
            } else {
                pos = self.tail.load(Ordering::Relaxed);
            }
        }
    }

    /// Take the oldest record, if one is ready.
    pub fn pop(&self) -> Option<T> {
        let mut pos = self.head.load(Ordering::Relaxed);
        loop {
            let cell = &self.cells[pos & self.mask];
            let seq = cell.seq.load(Ordering::Acquire);
            let diff = seq.wrapping_sub(pos.wrapping_add(1)) as isize;
            if diff == 0 {
                match self.head.compare_exchange_weak(
                    pos,
                    pos.wrapping_add(1),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // SAFETY: the producer's Release store of `seq` published the
                        // value; this consumer claimed the position alone.
                        let v = unsafe { (*cell.val.get()).assume_init() };
                        cell.seq
                            .store(pos.wrapping_add(self.mask + 1), Ordering::Release);
                        return Some(v);
                    }
                    Err(now) => pos = now,
                }
            } else if diff < 0 {
                return None;
            } else {
                pos = self.head.load(Ordering::Relaxed);
            }
        }
    }

    /// Take every record that is ready, oldest first. Thread context (allocates).
    pub fn drain(&self) -> Vec<T> {
        std::iter::from_fn(|| self.pop()).collect()
    }

    /// Records lost because the ring was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

impl<T> std::fmt::Debug for HitRing<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HitRing")
            .field("capacity", &(self.mask + 1))
            .field("dropped", &self.dropped.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A ready-made record of one hit: what most tracing handlers want to hand out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HitRecord {
    /// The probed address.
    pub addr: u64,
    /// The thread that hit it.
    pub tid: u32,
    /// The handler that recorded it.
    pub handler: HandlerId,
    /// The six System V integer argument registers (meaningful at a function entry).
    pub args: [u64; 6],
    /// Stack pointer at the hit.
    pub rsp: u64,
    /// Return value register (meaningful in a post-handler after a `ret`).
    pub rax: u64,
    /// Time stamp counter at the hit (`rdtsc`), for ordering and rough timing.
    pub tsc: u64,
}

impl HitRecord {
    /// Capture `hit`. Async-signal-safe.
    pub fn of(hit: &Hit<'_>) -> Self {
        let r = hit.regs();
        HitRecord {
            addr: hit.addr(),
            tid: hit.tid(),
            handler: hit.handler_id(),
            args: SYSV_ARGS.map(|g| r.gpr(g)),
            rsp: r.rsp,
            rax: r.rax,
            // SAFETY: `rdtsc` is available on every x86-64 CPU and has no side effects.
            tsc: unsafe { core::arch::x86_64::_rdtsc() },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn fifo_drops_when_full_and_wraps() {
        let r = HitRing::new(3);
        assert_eq!(r.capacity(), 4);
        for i in 0..4u32 {
            assert!(r.push(i));
        }
        assert!(!r.push(99));
        assert_eq!(r.dropped(), 1);
        assert_eq!(r.pop(), Some(0));
        assert!(r.push(4));
        assert_eq!(r.drain(), vec![1, 2, 3, 4]);
        assert_eq!(r.pop(), None);
        for lap in 0..10u32 {
            assert!(r.push(lap));
            assert_eq!(r.pop(), Some(lap));
        }
    }

    #[test]
    fn concurrent_producers_lose_nothing_that_was_accepted() {
        let r = Arc::new(HitRing::<u64>::new(1 << 10));
        let producers: Vec<_> = (0..3u64)
            .map(|t| {
                let r = Arc::clone(&r);
                std::thread::spawn(move || {
                    let mut accepted = 0u64;
                    for i in 0..20_000u64 {
                        if r.push(t << 32 | i) {
                            accepted += 1;
                        }
                    }
                    accepted
                })
            })
            .collect();
        let mut got = Vec::new();
        while producers.iter().any(|p| !p.is_finished()) {
            got.extend(r.drain());
        }
        let accepted: u64 = producers.into_iter().map(|p| p.join().unwrap()).sum();
        got.extend(r.drain());
        assert_eq!(got.len() as u64, accepted);
        assert_eq!(accepted + r.dropped(), 60_000);
        // Per producer, order is preserved.
        for t in 0..3u64 {
            let mine: Vec<u64> = got
                .iter()
                .filter(|v| *v >> 32 == t)
                .map(|v| v & 0xffff_ffff)
                .collect();
            assert!(mine.windows(2).all(|w| w[0] < w[1]));
        }
    }
}
