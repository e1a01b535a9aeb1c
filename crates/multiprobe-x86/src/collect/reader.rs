//! The reader of an area: counters, and the ring drained in order (see the module docs
//! of `collect` for the protocol and what it assumes about dead producers).
//!
//! The area is memory another process writes at any time, so every access is an
//! atomic load or store of an aligned `u64` ([`AreaReader::new`] takes the area as
//! `&[AtomicU64]`): no data race in Rust's sense, whatever the producers do. A record
//! is copied out of its cell before the cell is handed back, and [`RecordRef`] borrows
//! that copy, never the shared memory.

use std::sync::atomic::{AtomicU64, Ordering};

use super::layout::{
    cell, hdr, AreaLayout, AREA_MAGIC, AREA_VERSION, CELL_LEN, COUNTER_STRIPES, DROPPED, FAULTED,
    FLAG_FAULTED, HIST_LEN, HIST_MAX, HIST_MIN_INV, HIST_SUM, HITS, LOST, RECORD_DATA_MAX,
    STRIPE_LEN,
};

/// One collector's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Counters {
    /// Hits of the site while the collector was in its trampoline.
    pub hits: u64,
    /// Records not written because the ring was full.
    pub dropped: u64,
    /// Records whose `mem:` copy faulted (committed with [`RecordRef::faulted`]).
    pub faulted: u64,
    /// `ret`: calls whose return could not be seen (module docs of `collect`). The
    /// returns seen are not counted here: each is a record or one of `dropped`.
    pub returns_lost: u64,
}

/// Buckets of a [`LatencyHist`]: 0 ns, then one per bit of a `u64`.
pub const HIST_BUCKETS: usize = 65;

/// A `latency` collector's histogram, in nanoseconds: bucket 0 counts 0, bucket
/// `k >= 1` counts `[2^(k-1), 2^k)` (bpftrace's `hist()`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LatencyHist {
    /// Calls per bucket.
    pub buckets: [u64; HIST_BUCKETS],
    /// Their total time.
    pub sum: u64,
    /// The shortest and longest, if any call was timed.
    pub min_max: Option<(u64, u64)>,
}

impl LatencyHist {
    /// Nothing counted.
    pub const EMPTY: LatencyHist = LatencyHist {
        buckets: [0; HIST_BUCKETS],
        sum: 0,
        min_max: None,
    };

    /// Calls timed.
    pub fn count(&self) -> u64 {
        self.buckets.iter().fold(0u64, |a, &b| a.wrapping_add(b))
    }

    /// The bucket of `ns`: 0 for 0, else `k` for `[2^(k-1), 2^k)`.
    pub fn bucket(ns: u64) -> usize {
        (64 - ns.leading_zeros()) as usize
    }

    /// Count one call of `ns` nanoseconds.
    pub fn record(&mut self, ns: u64) {
        self.buckets[Self::bucket(ns)] += 1;
        self.sum = self.sum.wrapping_add(ns);
        self.min_max = Some(
            self.min_max
                .map_or((ns, ns), |(l, h)| (l.min(ns), h.max(ns))),
        );
    }

    /// Count `other`'s calls too (another stripe, path or process).
    pub fn add(&mut self, other: &LatencyHist) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a = a.wrapping_add(b);
        }
        self.sum = self.sum.wrapping_add(other.sum);
        self.min_max = match (self.min_max, other.min_max) {
            (Some((l1, h1)), Some((l2, h2))) => Some((l1.min(l2), h1.max(h2))),
            (x, y) => x.or(y),
        };
    }
}

/// A committed record, copied out of its cell.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordRef<'a> {
    /// `rdtsc` at the hit.
    pub tsc: u64,
    /// The hitting thread's fs base.
    pub thread: u64,
    /// The site index of the trampoline that wrote it.
    pub site: u32,
    /// The collector's counter slot.
    pub slot: u32,
    /// The action's data: arguments or registers as little-endian `u64`s, or memory.
    pub data: &'a [u8],
    /// A `mem:` copy faulted: `data` holds the bytes read before the fault.
    pub faulted: bool,
    /// `mem:` the pointer the bytes were read from (the argument's value); 0 for the
    /// other actions.
    pub ptr: u64,
}

/// Why an area cannot be read with a layout.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AreaError {
    /// The memory is shorter than the layout's size.
    #[error("the area is {len} bytes, the layout needs {need}")]
    TooShort {
        /// Its length in bytes.
        len: usize,
        /// The layout's size.
        need: usize,
    },
    /// The header does not describe this layout (not initialised, or another version).
    #[error("the area's header does not match the layout (magic, version, cells or slots)")]
    BadHeader,
}

/// Reads an area through memory the caller mapped (see the module docs).
#[derive(Debug)]
pub struct AreaReader<'a> {
    mem: &'a [AtomicU64],
    layout: AreaLayout,
    /// The next reservation number to consume (mirrors the area's tail).
    tail: u64,
    abandoned: u64,
    buf: [u8; RECORD_DATA_MAX],
}

impl<'a> AreaReader<'a> {
    /// A reader over `mem`, the whole area as `u64` words, whose header must be the
    /// layout's ([`AreaLayout::header`]). Continues from the area's tail, so a reader
    /// made after another goes on where that one stopped.
    pub fn new(mem: &'a [AtomicU64], layout: &AreaLayout) -> Result<Self, AreaError> {
        let len = mem.len() * 8;
        if len < layout.size() {
            return Err(AreaError::TooShort {
                len,
                need: layout.size(),
            });
        }
        let w0 = mem[hdr::MAGIC / 8].load(Ordering::Relaxed);
        let w1 = mem[hdr::VERSION / 8].load(Ordering::Relaxed);
        let w2 = mem[hdr::CELLS / 8].load(Ordering::Relaxed);
        let expect = layout.header();
        let word = |i: usize| u64::from_le_bytes(expect[i * 8..i * 8 + 8].try_into().unwrap());
        if [w0, w1, w2] != [word(0), word(1), word(2)] || w0 != AREA_MAGIC {
            return Err(AreaError::BadHeader);
        }
        debug_assert_eq!(w1 as u32, AREA_VERSION);
        let tail = mem[hdr::TAIL / 8].load(Ordering::Acquire);
        Ok(AreaReader {
            mem,
            layout: *layout,
            tail,
            abandoned: 0,
            buf: [0; RECORD_DATA_MAX],
        })
    }

    /// A reader over `len` bytes at `ptr`.
    ///
    /// # Safety
    /// `ptr` must be 8-byte aligned and `len` bytes from it readable and writable for
    /// `'a` (a `MAP_SHARED` mapping of the area that stays mapped), accessed by others
    /// only atomically or by other processes.
    pub unsafe fn from_raw(
        ptr: *const u8,
        len: usize,
        layout: &AreaLayout,
    ) -> Result<Self, AreaError> {
        // SAFETY: the caller guarantees alignment, validity and lifetime; `AtomicU64`
        // has the layout of `u64`, and every access through the slice is atomic.
        let mem = unsafe { std::slice::from_raw_parts(ptr.cast::<AtomicU64>(), len / 8) };
        Self::new(mem, layout)
    }

    fn word(&self, off: usize) -> &AtomicU64 {
        &self.mem[off / 8]
    }

    /// Counter slot `slot`'s counters (`hits` summed over its stripes).
    ///
    /// # Panics
    /// When `slot` is not below the layout's counter slots.
    pub fn counters(&self, slot: u32) -> Counters {
        assert!(slot < self.layout.counter_slots(), "no counter slot {slot}");
        let base = self.layout.counter_offset(slot);
        Counters {
            hits: (0..COUNTER_STRIPES)
                .map(|s| {
                    self.word(base + s * STRIPE_LEN + HITS)
                        .load(Ordering::Relaxed)
                })
                .fold(0u64, u64::wrapping_add),
            dropped: self.word(base + DROPPED).load(Ordering::Relaxed),
            faulted: self.word(base + FAULTED).load(Ordering::Relaxed),
            returns_lost: self.word(base + LOST).load(Ordering::Relaxed),
        }
    }

    /// Counter slot `slot`'s latency histogram ([`crate::collect::Action::Latency`]).
    ///
    /// # Panics
    /// When `slot` is not below the layout's counter slots.
    pub fn histogram(&self, slot: u32) -> LatencyHist {
        assert!(slot < self.layout.counter_slots(), "no counter slot {slot}");
        let mut h = LatencyHist::EMPTY;
        for stripe in 0..COUNTER_STRIPES {
            let base = self.layout.hist_offset(slot) + stripe * HIST_LEN;
            let ld = |o: usize| self.word(base + o).load(Ordering::Relaxed);
            let min_inv = ld(HIST_MIN_INV);
            h.add(&LatencyHist {
                buckets: std::array::from_fn(|k| ld(8 * k)),
                sum: ld(HIST_SUM),
                min_max: (min_inv != 0).then(|| (u64::MAX - min_inv, ld(HIST_MAX))),
            });
        }
        h
    }

    /// Let slot `slot`'s `ret` collector see returns (`true`), or make the calls still
    /// in flight return unobserved (`false`): the live word the return code checks.
    ///
    /// # Panics
    /// When `slot` is not below the layout's counter slots.
    pub fn set_live(&self, slot: u32, live: bool) {
        assert!(slot < self.layout.counter_slots(), "no counter slot {slot}");
        self.word(self.layout.live_offset(slot))
            .store(u64::from(live), Ordering::Release);
    }

    /// Reservations the producers have made so far (records written, being written, or
    /// abandoned; dropped ones are not reserved).
    pub fn reserved(&self) -> u64 {
        self.word(hdr::HEAD).load(Ordering::Acquire)
    }

    /// Cells skipped by [`AreaReader::drain_stopped`] because their producer never
    /// committed them.
    pub fn abandoned(&self) -> u64 {
        self.abandoned
    }

    /// Call `f` with every committed record, in reservation order, up to the first cell
    /// not committed yet (its producer is still writing it, or died: module docs), and
    /// hand the cells back to the producers. Returns how many records `f` saw.
    pub fn drain(&mut self, f: impl FnMut(RecordRef<'_>)) -> usize {
        self.drain_inner(false, f)
    }

    /// [`AreaReader::drain`] for when no producer can be between a claim and a commit
    /// (the process is dead, or all its threads are stopped outside the action code):
    /// uncommitted cells up to the head are skipped and counted in
    /// [`AreaReader::abandoned`], so the ring is empty afterwards.
    pub fn drain_stopped(&mut self, f: impl FnMut(RecordRef<'_>)) -> usize {
        self.drain_inner(true, f)
    }

    fn drain_inner(&mut self, stopped: bool, mut f: impl FnMut(RecordRef<'_>)) -> usize {
        let cells = u64::from(self.layout.ring_cells());
        // A head beyond tail + cells is impossible in a sane area; never read more.
        let head = self.reserved().min(self.tail + cells);
        let mut n = 0;
        while self.tail < head {
            let pos = self.tail;
            let base = self.layout.cell_offset(pos as u32);
            let seq = self.word(base + cell::SEQ).load(Ordering::Acquire);
            if seq == pos + 1 {
                let rec = self.copy_out(base);
                // The copy is done: the cell goes back to the producers before `f`
                // runs, so a slow consumer keeps the ring as free as possible.
                self.advance();
                f(RecordRef {
                    data: &self.buf[..rec.len],
                    ..rec.record
                });
                n += 1;
            } else if stopped {
                self.abandoned += 1;
                self.advance();
            } else {
                break;
            }
        }
        n
    }

    fn advance(&mut self) {
        self.tail += 1;
        self.word(hdr::TAIL).store(self.tail, Ordering::Release);
    }

    /// Copy the committed cell at `base` into `self.buf`.
    fn copy_out(&mut self, base: usize) -> Copied {
        let mem = self.mem;
        let ld = |o: usize| mem[(base + o) / 8].load(Ordering::Relaxed);
        let tsc = ld(cell::TSC);
        let thread = ld(cell::THREAD);
        let ids = ld(cell::SITE);
        let lf = ld(cell::LEN);
        let ptr = ld(cell::PTR);
        let len = usize::from(lf as u16).min(RECORD_DATA_MAX);
        let flags = (lf >> (8 * (cell::FLAGS - cell::LEN))) as u16;
        for (i, chunk) in self.buf[..len.next_multiple_of(8).min(RECORD_DATA_MAX)]
            .chunks_mut(8)
            .enumerate()
        {
            let w = ld(cell::DATA + 8 * i).to_le_bytes();
            chunk.copy_from_slice(&w[..chunk.len()]);
        }
        const { assert!(cell::DATA + RECORD_DATA_MAX <= CELL_LEN) };
        Copied {
            record: RecordRef {
                tsc,
                thread,
                site: ids as u32,
                slot: (ids >> 32) as u32,
                data: &[],
                faulted: flags & FLAG_FAULTED != 0,
                ptr,
            },
            len,
        }
    }
}

struct Copied {
    record: RecordRef<'static>,
    len: usize,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An area in plain memory, its header written.
    fn area(layout: &AreaLayout) -> Vec<AtomicU64> {
        let mem: Vec<AtomicU64> = (0..layout.size() / 8).map(|_| AtomicU64::new(0)).collect();
        for (w, c) in mem.iter().zip(layout.header().chunks(8)) {
            w.store(u64::from_le_bytes(c.try_into().unwrap()), Ordering::Relaxed);
        }
        mem
    }

    /// What the generated code does, step by step: claim (head += 1), then later fill
    /// and commit reservation `pos` with `data` as its one word.
    fn claim(mem: &[AtomicU64]) -> u64 {
        mem[hdr::HEAD / 8].fetch_add(1, Ordering::SeqCst)
    }

    fn commit(mem: &[AtomicU64], layout: &AreaLayout, pos: u64, data: u64, len: u64) {
        let base = layout.cell_offset(pos as u32);
        let w = |o: usize, v: u64| mem[(base + o) / 8].store(v, Ordering::SeqCst);
        w(cell::TSC, 100 + pos);
        w(cell::THREAD, 0x7000);
        w(cell::SITE, 9 << 32 | 4);
        w(cell::LEN, len);
        w(cell::PTR, 0x5000 + pos);
        w(cell::DATA, data);
        w(cell::SEQ, pos + 1);
    }

    #[test]
    fn drain_stops_at_an_uncommitted_cell_and_drain_stopped_skips_it() {
        let layout = AreaLayout::new(8, 1);
        let mem = area(&layout);
        let mut r = AreaReader::new(&mem, &layout).unwrap();
        let (a, b, c) = (claim(&mem), claim(&mem), claim(&mem));
        commit(&mem, &layout, a, 11, 8);
        commit(&mem, &layout, c, 33, 8);
        // `b`'s producer died between its claim and its commit.
        let mut got = Vec::new();
        let rec = |got: &mut Vec<_>, rec: RecordRef<'_>| {
            got.push((
                rec.tsc,
                rec.site,
                rec.slot,
                rec.thread,
                rec.ptr,
                rec.data.to_vec(),
            ))
        };
        assert_eq!(r.drain(|x| rec(&mut got, x)), 1);
        assert_eq!(r.drain(|x| rec(&mut got, x)), 0, "waits in front of b");
        assert_eq!(r.abandoned(), 0);
        assert_eq!(r.drain_stopped(|x| rec(&mut got, x)), 1);
        assert_eq!(r.abandoned(), 1);
        assert_eq!(
            got,
            [
                (100, 4, 9, 0x7000, 0x5000, 11u64.to_le_bytes().to_vec()),
                (102, 4, 9, 0x7000, 0x5002, 33u64.to_le_bytes().to_vec())
            ]
        );
        let _ = b;
        // The tail is in the area: a new reader goes on from there, and the cells are
        // free for the next lap (a stale seq of the last lap is not taken as committed).
        assert_eq!(mem[hdr::TAIL / 8].load(Ordering::SeqCst), 3);
        let mut r2 = AreaReader::new(&mem, &layout).unwrap();
        assert_eq!(r2.drain(|_| panic!("nothing new")), 0);
        for i in 0..8 {
            let p = claim(&mem);
            assert_eq!(p, 3 + i);
            commit(&mem, &layout, p, p, 8);
        }
        let mut seen = Vec::new();
        r2.drain(|x| seen.push(u64::from_le_bytes(x.data.try_into().unwrap())));
        assert_eq!(seen, (3..11).collect::<Vec<_>>());
    }

    #[test]
    fn a_corrupt_area_gives_wrong_records_never_a_panic() {
        let layout = AreaLayout::new(4, 1);
        let mem = area(&layout);
        let mut r = AreaReader::new(&mem, &layout).unwrap();
        // A length beyond the cell, and a head far beyond tail + cells.
        let p = claim(&mem);
        commit(&mem, &layout, p, 5, u64::MAX);
        mem[hdr::HEAD / 8].store(u64::MAX - 1, Ordering::SeqCst);
        let mut lens = Vec::new();
        r.drain(|x| lens.push(x.data.len()));
        assert_eq!(lens, [RECORD_DATA_MAX]);
        r.drain_stopped(|_| {});
        assert_eq!(
            r.abandoned(),
            4,
            "at most one lap from the tail is ever read"
        );
    }

    #[test]
    fn a_wrong_or_missing_header_is_refused() {
        let layout = AreaLayout::new(8, 2);
        let mem = area(&layout);
        assert!(AreaReader::new(&mem, &AreaLayout::new(16, 2)).is_err());
        assert!(AreaReader::new(&mem, &AreaLayout::new(8, 3)).is_err());
        assert!(matches!(
            AreaReader::new(&mem[..8], &layout),
            Err(AreaError::TooShort { .. })
        ));
        mem[0].store(0, Ordering::SeqCst);
        assert_eq!(
            AreaReader::new(&mem, &layout).unwrap_err(),
            AreaError::BadHeader
        );
    }
}
