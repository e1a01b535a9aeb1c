//! The shared area's layout and the record format: byte offsets the generated code and
//! the reader agree on. Nothing here touches memory; see the `reader` module for that.
//!
//! ```text
//! 0     header   magic u64, version u32, cell size u32, ring cells u32, counter slots u32
//! 64    head     u64: reservations made by producers (the tracee), one cache line
//! 128   tail     u64: cells consumed by the reader (the tracer), one cache line
//! 192   counters per slot, COUNTER_STRIPES cache lines each: line 0 holds hits u64,
//!       dropped u64, faulted u64, returns lost u64, live u64; line s (1..) holds
//!       the hits of stripe s
//! ..    histograms per slot (`latency`), COUNTER_STRIPES of HIST_LEN bytes each
//!       (striped by thread like `hits`): 65 buckets u64 (0, then [2^(k-1), 2^k)
//!       ns), sum u64, max u64, u64::MAX - min u64 (0: none yet)
//! ..    cells    ring cells of CELL_LEN bytes, 64-byte aligned
//! ```
//!
//! A cell (all fields little-endian, 8-byte aligned):
//!
//! ```text
//! 0   seq     u64  commit word: reservation number + 1 once complete, stored last
//! 8   tsc     u64  rdtsc at the hit
//! 16  thread  u64  the hitting thread's fs base
//! 24  site    u32
//! 28  slot    u32
//! 32  len     u16  bytes of data that are valid
//! 34  flags   u16  bit 0: faulted (a `mem:` copy hit a bad address; data holds the
//!                  bytes read before the fault)
//! 40  ptr     u64  `mem:` the pointer the bytes were read from (the argument's value);
//!                  0 for every other action
//! 48  data    up to RECORD_DATA_MAX bytes
//! ```
//!
//! Head and tail live on their own cache lines so the producers' CAS on head does not
//! bounce the line the reader writes; counters get their own lines per slot so two
//! collectors hit on different cores do not share a line. `hits` is striped by thread
//! (a hash of the fs base picks the line): one counter that every thread of a busy
//! program bumped was a cache line bouncing between cores on every hit (60 ns a hit for
//! `sort --parallel=2` on `strcoll`, against 5 ns on one thread). The reader sums the
//! stripes; `dropped` and `faulted` are rare and stay on line 0.

/// `MPCOLLCT` in little-endian: the area's first word.
pub const AREA_MAGIC: u64 = u64::from_le_bytes(*b"MPCOLLCT");
/// Version of this layout, in the header.
pub const AREA_VERSION: u32 = 3;

/// Length of a ring cell.
pub const CELL_LEN: usize = 256;
/// log2 of [`CELL_LEN`].
pub(crate) const CELL_SHIFT: u32 = 8;
/// Where a cell's data starts.
pub const RECORD_HEADER_LEN: usize = 48;
/// Most data bytes one record carries (a `mem:` length must not exceed it).
pub const RECORD_DATA_MAX: usize = CELL_LEN - RECORD_HEADER_LEN;
/// Most ring cells an area can have (the generated mask is a 32-bit immediate).
pub const MAX_RING_CELLS: u32 = 1 << 24;
/// Most counter slots an area can have.
pub const MAX_COUNTER_SLOTS: u32 = 1 << 16;

/// Header field offsets.
pub(crate) mod hdr {
    pub const MAGIC: usize = 0;
    pub const VERSION: usize = 8;
    pub const CELL_LEN: usize = 12;
    pub const CELLS: usize = 16;
    pub const SLOTS: usize = 20;
    pub const HEAD: usize = 64;
    pub const TAIL: usize = 128;
    pub const COUNTERS: usize = 192;
}

/// Cell field offsets.
pub(crate) mod cell {
    pub const SEQ: usize = 0;
    pub const TSC: usize = 8;
    pub const THREAD: usize = 16;
    pub const SITE: usize = 24;
    pub const LEN: usize = 32;
    pub const FLAGS: usize = 34;
    pub const PTR: usize = 40;
    pub const DATA: usize = super::RECORD_HEADER_LEN;
}

/// Cache lines per counter slot, and so stripes of its `hits` (a power of two).
pub const COUNTER_STRIPES: usize = 8;
/// Length of one counter slot's stripe (a cache line) and its fields.
pub(crate) const STRIPE_LEN: usize = 64;
/// Length of one counter slot.
pub(crate) const COUNTER_LEN: usize = COUNTER_STRIPES * STRIPE_LEN;
pub(crate) const HITS: usize = 0;
pub(crate) const DROPPED: usize = 8;
pub(crate) const FAULTED: usize = 16;
/// Calls whose return a `ret` collector could not see (line 0): the shadow stack was
/// full, or the call was skipped by a `longjmp` or an exception.
pub(crate) const LOST: usize = 24;
/// Nonzero while the slot's `ret` collector may write records at returns (line 0):
/// the tracer clears it when the collector leaves the site, so calls still in flight
/// return unobserved (rule 10's quiescence).
pub(crate) const LIVE: usize = 32;

/// Length of one stripe of a slot's histogram (nine cache lines). Striped because
/// two threads timing the same function bounced one histogram's lines between their
/// cores (`sort` with `strcoll` timed: 160 ns a call).
pub(crate) const HIST_LEN: usize = 576;
/// Offsets in a histogram: the buckets, then sum, max and `u64::MAX - min`.
pub(crate) const HIST_SUM: usize = 65 * 8;
pub(crate) const HIST_MAX: usize = HIST_SUM + 8;
pub(crate) const HIST_MIN_INV: usize = HIST_MAX + 8;
const _: () = assert!(HIST_MIN_INV + 8 <= HIST_LEN);

/// Bit 0 of a cell's flags.
pub const FLAG_FAULTED: u16 = 1;

const PAGE: usize = 4096;

/// Where everything lies in an area of `ring_cells` cells and `counter_slots` counter
/// slots. Plain data: the tracer builds one, maps [`AreaLayout::size`] bytes, and gives
/// the same layout to the code generator and the reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AreaLayout {
    cells: u32,
    slots: u32,
}

impl AreaLayout {
    /// The layout of an area with a ring of `ring_cells` cells and `counter_slots`
    /// counter slots.
    ///
    /// # Panics
    /// When `ring_cells` is not a power of two in `2..=MAX_RING_CELLS`, or
    /// `counter_slots` is not in `1..=MAX_COUNTER_SLOTS`: both are the tracer's choice,
    /// not user input.
    pub fn new(ring_cells: u32, counter_slots: u32) -> Self {
        assert!(
            ring_cells.is_power_of_two() && (2..=MAX_RING_CELLS).contains(&ring_cells),
            "ring cells must be a power of two in 2..={MAX_RING_CELLS}, not {ring_cells}"
        );
        assert!(
            (1..=MAX_COUNTER_SLOTS).contains(&counter_slots),
            "counter slots must be in 1..={MAX_COUNTER_SLOTS}, not {counter_slots}"
        );
        AreaLayout {
            cells: ring_cells,
            slots: counter_slots,
        }
    }

    /// Number of ring cells (a power of two).
    pub fn ring_cells(&self) -> u32 {
        self.cells
    }

    /// Number of counter slots.
    pub fn counter_slots(&self) -> u32 {
        self.slots
    }

    /// Bytes to map: a page multiple.
    pub fn size(&self) -> usize {
        (self.cells_offset() + self.cells as usize * CELL_LEN).next_multiple_of(PAGE)
    }

    /// Offset of the producers' reservation counter.
    pub fn head_offset(&self) -> usize {
        hdr::HEAD
    }

    /// Offset of the reader's consumption counter.
    pub fn tail_offset(&self) -> usize {
        hdr::TAIL
    }

    /// Offset of counter slot `slot`'s `hits` of stripe 0 (then `dropped`, `faulted`, 8
    /// bytes each); the hits of stripe `s` are at `s *` 64 bytes from it.
    pub fn counter_offset(&self, slot: u32) -> usize {
        hdr::COUNTERS + slot as usize * COUNTER_LEN
    }

    /// Offset of counter slot `slot`'s live word (see [`crate::collect::Action::Ret`]):
    /// the tracer stores nonzero while the collector is on its site.
    pub fn live_offset(&self, slot: u32) -> usize {
        self.counter_offset(slot) + LIVE
    }

    /// Offset of stripe 0 of counter slot `slot`'s latency histogram; stripe `s` is
    /// `s *` 576 bytes (one stripe's length) from it.
    pub fn hist_offset(&self, slot: u32) -> usize {
        hdr::COUNTERS
            + self.slots as usize * COUNTER_LEN
            + slot as usize * COUNTER_STRIPES * HIST_LEN
    }

    /// Offset of the first ring cell.
    pub fn cells_offset(&self) -> usize {
        self.hist_offset(self.slots).next_multiple_of(64)
    }

    /// Offset of ring cell `i` (`i < ring_cells`).
    pub fn cell_offset(&self, i: u32) -> usize {
        self.cells_offset() + (i & (self.cells - 1)) as usize * CELL_LEN
    }

    /// The header's first 24 bytes as the area must hold them before any trampoline
    /// runs (the rest of a fresh mapping is zero): magic, version, cell length, cells,
    /// slots.
    pub fn header(&self) -> [u8; 24] {
        let mut h = [0u8; 24];
        h[hdr::MAGIC..8].copy_from_slice(&AREA_MAGIC.to_le_bytes());
        h[hdr::VERSION..12].copy_from_slice(&AREA_VERSION.to_le_bytes());
        h[hdr::CELL_LEN..16].copy_from_slice(&(CELL_LEN as u32).to_le_bytes());
        h[hdr::CELLS..20].copy_from_slice(&self.cells.to_le_bytes());
        h[hdr::SLOTS..24].copy_from_slice(&self.slots.to_le_bytes());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_are_aligned_and_inside_the_mapping() {
        let l = AreaLayout::new(1024, 3);
        assert_eq!(l.size() % PAGE, 0);
        assert_eq!(l.cells_offset() % 64, 0);
        assert_eq!(l.counter_offset(2) + COUNTER_LEN, l.hist_offset(0));
        assert_eq!(
            l.hist_offset(2) + COUNTER_STRIPES * HIST_LEN,
            l.cells_offset()
        );
        assert_eq!(COUNTER_LEN, COUNTER_STRIPES * 64);
        assert!(COUNTER_STRIPES.is_power_of_two());
        assert_eq!(
            l.cell_offset(1023) + CELL_LEN,
            l.cells_offset() + 1024 * CELL_LEN
        );
        assert!(l.cell_offset(1023) + CELL_LEN <= l.size());
        assert_eq!(l.cell_offset(1024), l.cells_offset(), "indices wrap");
        assert_eq!(RECORD_DATA_MAX, 208);
        assert_eq!(1 << CELL_SHIFT, CELL_LEN);
    }

    #[test]
    #[should_panic(expected = "power of two")]
    fn a_ring_that_is_not_a_power_of_two_is_refused() {
        AreaLayout::new(1000, 1);
    }
}
