//! The per-thread return stack (a shadow stack): what return probes keep of each call
//! in flight, between its entry and its return.
//!
//! When a hit runs the pre-hook of a handler with a return hook, the core swaps the
//! call's return address at `[rsp]` for the backend's return trampoline and pushes a
//! *frame* here: the original return address, the entry's stack pointer (the address of
//! that slot), the probed address, the table that owns the frame, and one *consumer*
//! record per handler whose return hook is due — its id and the [`CallData`] its
//! pre-hook left. When the thread arrives at the trampoline, the frame whose slot it
//! returned through is found by its stack pointer, its return hooks run (found by id in
//! the current table, inside a read section of their own: nothing is held across the
//! call) and the thread continues at the original address (`crate::returning`).
//!
//! # Layout
//!
//! Frames are variable-length, in a bounded array of words the backend provides
//! ([`crate::backend::ThreadState::reserve_returns`], or lent memory): consumer records
//! first, then the five-word header, so the top frame's header ends at `top` and frames
//! are walked from the top down. Nothing is allocated on the hit path; a frame that does
//! not fit is not pushed (its returns are lost, the call runs unchanged).
//!
//! # Which frames are dead
//!
//! A call skipped by `longjmp` or an exception never comes back through its slot. Its
//! frame is recognised by its stack pointer (the kernel's `arch_uretprobe_is_alive`)
//! and dropped, counted lost (`crate::returning` does both):
//! * at a return through the slot at `sp`: the frames above the one recorded at `sp`
//!   (deeper calls the stack has unwound past) whose slot no longer holds the
//!   trampoline;
//! * at an entry whose return address is at `sp`: the frames from the top down, until one
//!   whose slot lies above `sp`, whose slot is at or below `sp` and no longer holds the
//!   trampoline. A frame at `sp` whose slot holds the trampoline is live: this entry
//!   came by a tail call (`jmp`) from inside its call (a `call` would have written its
//!   own return address there). The new frame's original return address is then the
//!   trampoline: its return comes back to the trampoline once more, for the outer frame
//!   (the kernel's uretprobes call such frames "chained").
//!
//! # Suspects
//!
//! A frame either scan finds where a dead one would be (above the returning frame, or
//! below the entry's slot) whose slot *still holds the trampoline* cannot be told apart
//! by its stack pointer alone: it is dead with its slot not yet overwritten (the usual
//! `longjmp`), or live on another stack — a coroutine the program switched away from
//! (`swapcontext`, green threads) or the interrupted code under a signal handler on an
//! alternate stack. Dropping a live frame would leave its call nowhere to return to
//! (the program would have to be stopped); so such a frame is kept, and counted lost
//! at once (a *suspect*, flagged in its header), which is the right count for the dead
//! case. If it does return after all, the count is taken back and the return counted
//! and dispatched as any other. A dead suspect goes at a later scan that finds its slot
//! overwritten (counted once) — or, under the frame of an outer call, at the next
//! entry whose `call` wrote its slot — or when its thread's calls are abandoned.
//!
//! Invariants:
//! * A frame is dropped only when its call can no longer return through the trampoline
//!   (its slot holds something else), when it returns, or with all of its thread's
//!   frames (abandoned: the thread is gone, or a tracer leaves after restoring them).
//! * A frame's returns are counted lost at most once, and a suspect's count is taken
//!   back only by its own return.
//! * The trampoline address is written into a slot only by the push of its frame, or by
//!   [`ReturnStack::rehijack`] into a slot [`ReturnStack::unhijack`] restored (flagged).
//! * Frames are pushed, popped and dropped only by their own thread while its
//!   `ThreadState` is dispatching (`active` set: a dispatch nested in a signal handler
//!   then runs no handler and never touches this stack), or in thread context while no
//!   dispatch runs on it (a tracer between stops, a thread's exit).

use std::cell::Cell;

use crate::handler::{CallData, CALL_DATA_WORDS};
use crate::memory::Memory;
use crate::sync::same_thread::{signal_fence, AtomicUsize};

const HEADER: usize = 5;
const RET: usize = 0;
const SP: usize = 1;
const ADDR: usize = 2;
const OWNER: usize = 3;
const META: usize = 4;
/// Words of one consumer record: the handler id, then its [`CallData`].
const CONSUMER: usize = 1 + CALL_DATA_WORDS;
/// `META`: the frame's slot holds the original return address again ([`ReturnStack::unhijack`]).
const UNHIJACKED: u64 = 1 << 32;
/// `META`: the frame's returns are counted lost already: a scan found it where a dead
/// frame would be, its slot still holding the trampoline (module docs, *Suspects*).
const SUSPECT: u64 = 1 << 33;
const COUNT: u64 = 0xffff_ffff;

/// Words a frame with `consumers` consumer records takes on a return stack (to size a
/// stack: [`crate::backend::ThreadState::reserve_returns`]).
pub const fn frame_words(consumers: usize) -> usize {
    HEADER + consumers * CONSUMER
}

/// A default size for a thread's return stack, in words (512 KiB): more than 4,000
/// calls in flight with one return handler each.
pub const DEFAULT_WORDS: usize = 64 * 1024;

/// One frame, read out of the stack.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    /// First word (its first consumer record).
    pub(crate) start: usize,
    /// One past its header.
    pub(crate) end: usize,
    pub(crate) ret: u64,
    pub(crate) sp: u64,
    pub(crate) addr: u64,
    pub(crate) owner: u64,
    pub(crate) consumers: usize,
    pub(crate) unhijacked: bool,
    /// Counted lost already; un-counted if it returns after all.
    pub(crate) suspect: bool,
}

impl Frame {
    /// Word index of consumer `k`'s record (its id; the data follows).
    fn consumer(&self, k: usize) -> usize {
        self.start + k * CONSUMER
    }
}

/// A thread's return stack (module docs). Part of its `ThreadState`.
#[derive(Debug)]
pub(crate) struct ReturnStack {
    /// Address of the storage (`Cell<u64>` words), 0 for none. A same-thread atomic: a
    /// backend lending storage from a signal handler may race a nested signal doing the
    /// same ([`ReturnStack::lend`]).
    base: AtomicUsize,
    /// Words of storage.
    cap: Cell<usize>,
    /// Words in use.
    top: Cell<usize>,
    /// Whether `base` is a `Box<[Cell<u64>]>` of ours (else it is lent).
    owned: Cell<bool>,
    /// The backend's return trampoline (0: none yet; returns are then lost).
    trampoline: Cell<u64>,
    /// Whether a frame may be a suspect (set with one, cleared when the stack empties):
    /// only then does an entry look past the frames above it for a suspect at its slot.
    suspects: Cell<bool>,
}

impl ReturnStack {
    pub(crate) const fn new() -> Self {
        ReturnStack {
            base: AtomicUsize::new(0),
            cap: Cell::new(0),
            top: Cell::new(0),
            owned: Cell::new(false),
            trampoline: Cell::new(0),
            suspects: Cell::new(false),
        }
    }

    pub(crate) fn trampoline(&self) -> u64 {
        self.trampoline.get()
    }

    pub(crate) fn set_trampoline(&self, addr: u64) {
        self.trampoline.set(addr);
    }

    pub(crate) fn has_storage(&self) -> bool {
        self.base.load(std::sync::atomic::Ordering::Relaxed) != 0
    }

    /// Storage of `words` of our own, unless there is some already. Thread context.
    pub(crate) fn reserve(&self, words: usize) {
        if self.has_storage() || words == 0 {
            return;
        }
        let b: Box<[Cell<u64>]> = (0..words).map(|_| Cell::new(0)).collect();
        let p = Box::into_raw(b).cast::<Cell<u64>>() as usize;
        self.cap.set(words);
        self.owned.set(true);
        signal_fence();
        self.base.store(p, std::sync::atomic::Ordering::Relaxed);
    }

    /// Use `words` words at `ptr` as storage, unless there is some already (then false,
    /// and nothing changed: the caller keeps its memory). Async-signal-safe.
    ///
    /// # Safety
    /// `ptr` is valid for reads and writes of `words` `u64`s, aligned, and used by
    /// nothing else until the `ThreadState` holding this stack is dropped (the caller
    /// frees it after that).
    pub(crate) unsafe fn lend(&self, ptr: *mut u64, words: usize) -> bool {
        if words == 0 || self.has_storage() {
            return false;
        }
        // Claim first (a nested signal that lends meanwhile finds it taken), then size
        // it: frames are pushed only once `cap` is set, by this thread, after the claim.
        self.cap.set(0);
        signal_fence();
        if self.base.compare_exchange(0, ptr as usize).is_err() {
            return false;
        }
        signal_fence();
        self.owned.set(false);
        self.cap.set(words);
        true
    }

    fn word(&self, i: usize) -> &Cell<u64> {
        debug_assert!(i < self.cap.get());
        let base = self.base.load(std::sync::atomic::Ordering::Relaxed) as *const Cell<u64>;
        // SAFETY: `base` holds `cap` words (`reserve`/`lend`) for the stack's life, and
        // every index used is below `top <= cap` or checked against `cap` by `room`.
        unsafe { &*base.add(i) }
    }

    /// The frame whose header ends at `end`, if `end` is past the stack's bottom.
    fn frame_ending(&self, end: usize) -> Option<Frame> {
        let h = end.checked_sub(HEADER)?;
        let meta = self.word(h + META).get();
        let consumers = (meta & COUNT) as usize;
        Some(Frame {
            start: h - consumers * CONSUMER,
            end,
            ret: self.word(h + RET).get(),
            sp: self.word(h + SP).get(),
            addr: self.word(h + ADDR).get(),
            owner: self.word(h + OWNER).get(),
            consumers,
            unhijacked: meta & UNHIJACKED != 0,
            suspect: meta & SUSPECT != 0,
        })
    }

    /// The innermost frame.
    pub(crate) fn top(&self) -> Option<Frame> {
        self.frame_ending(self.top.get())
    }

    /// Every frame, innermost first.
    pub(crate) fn frames(&self) -> impl Iterator<Item = Frame> + '_ {
        std::iter::successors(self.top(), |f| self.frame_ending(f.start))
    }

    /// Whether any frame is pushed.
    pub(crate) fn is_empty(&self) -> bool {
        self.top.get() == 0
    }

    /// Number of frames pushed (for tests and stats: walks the stack).
    pub(crate) fn depth(&self) -> usize {
        self.frames().count()
    }

    /// The handler ids of `f`'s consumers (0: skipped).
    pub(crate) fn consumer_ids<'s>(&'s self, f: &Frame) -> impl Iterator<Item = u64> + 's {
        let f = *f;
        (0..f.consumers).map(move |k| self.word(f.consumer(k)).get())
    }

    /// Whether `f` is the innermost frame (none above it).
    #[inline]
    pub(crate) fn is_top(&self, f: &Frame) -> bool {
        self.top.get() == f.end
    }

    /// Consumer `k` of `f`: its handler id (0: skipped) and its data, in place. The
    /// data stays valid and unchanged until `f` is dropped: only this thread changes the
    /// stack, while dispatching (module invariants), and a return hook's own calls are
    /// not armed (rule 6).
    #[inline]
    pub(crate) fn consumer_ref(&self, f: &Frame, k: usize) -> (u64, &CallData) {
        let i = f.consumer(k);
        let data = self.word(i + 1).as_ptr().cast::<CallData>();
        // SAFETY: `CALL_DATA_WORDS` `Cell<u64>` words from `i + 1` lie inside the frame
        // (below its header, inside `cap`); `Cell<u64>` has `u64`'s layout; nothing
        // writes them while the reference lives (see above).
        (self.word(i).get(), unsafe { &*data })
    }

    /// Whether a frame may be a suspect.
    #[inline]
    pub(crate) fn has_suspects(&self) -> bool {
        self.suspects.get()
    }

    /// The words in use are `top` from now on (fewer than before).
    fn shrink_to(&self, top: usize) {
        self.top.set(top);
        if top == 0 {
            self.suspects.set(false);
        }
    }

    /// Drop `f` and every frame above it.
    pub(crate) fn truncate_to(&self, f: &Frame) {
        self.shrink_to(f.start);
    }

    /// Drop every frame.
    pub(crate) fn clear(&self) {
        self.shrink_to(0);
    }

    /// Remove frame `f` from wherever it is: the frames above it move down over it.
    pub(crate) fn remove(&self, f: &Frame) {
        let top = self.top.get();
        let len = f.end - f.start;
        for i in f.end..top {
            self.word(i - len).set(self.word(i).get());
        }
        self.shrink_to(top - len);
    }

    /// A `call` wrote the return slot at `sp` (it holds something else than the
    /// trampoline now): drop the suspects recorded there, wherever they are (counted
    /// lost already). An entry at `sp` finds those above any frame of an outer call
    /// itself; these are the ones under such a frame, left by a `longjmp` loop whose
    /// skipped slots nothing else overwrote.
    pub(crate) fn drop_suspects_at(&self, sp: u64) {
        let mut next = self.top();
        while let Some(f) = next {
            next = self.below(&f);
            if f.suspect && f.sp == sp {
                self.remove(&f);
            }
        }
    }

    /// The frame below `f`, if any.
    pub(crate) fn below(&self, f: &Frame) -> Option<Frame> {
        self.frame_ending(f.start)
    }

    /// Room for a frame of `consumers` records above the top, and where it starts.
    pub(crate) fn room(&self, consumers: usize) -> Option<usize> {
        let start = self.top.get();
        let need = frame_words(consumers);
        (self.has_storage() && start.checked_add(need)? <= self.cap.get()).then_some(start)
    }

    /// Record `k` of a frame being built at `start` (inside [`ReturnStack::room`]): a
    /// zeroed [`CallData`] for the handler's pre-hook.
    pub(crate) fn consumer_data(&self, start: usize, k: usize) -> *mut CallData {
        let i = start + k * CONSUMER;
        for j in 0..CALL_DATA_WORDS {
            self.word(i + 1 + j).set(0);
        }
        // `Cell<u64>` has the layout of `u64`; the pre-hook writes through this while no
        // other access to these words happens (the walk's contract).
        self.word(i + 1).as_ptr().cast::<CallData>()
    }

    /// The handler id of record `k` of the frame being built at `start`.
    pub(crate) fn consumer_id_at(&self, start: usize, k: usize) -> u64 {
        self.word(start + k * CONSUMER).get()
    }

    /// Record `k` of the frame being built at `start` is handler `id`'s.
    pub(crate) fn set_consumer(&self, start: usize, k: usize, id: u64) {
        self.word(start + k * CONSUMER).set(id);
    }

    /// Push the frame built at `start` with `consumers` records.
    pub(crate) fn commit(
        &self,
        start: usize,
        consumers: usize,
        ret: u64,
        sp: u64,
        addr: u64,
        owner: u64,
    ) {
        let h = start + consumers * CONSUMER;
        self.word(h + RET).set(ret);
        self.word(h + SP).set(sp);
        self.word(h + ADDR).set(addr);
        self.word(h + OWNER).set(owner);
        self.word(h + META).set(consumers as u64);
        self.top.set(h + HEADER);
    }

    fn set_unhijacked(&self, f: &Frame, on: bool) {
        let m = self.word(f.end - HEADER + META);
        m.set(if on {
            m.get() | UNHIJACKED
        } else {
            m.get() & !UNHIJACKED
        });
    }

    /// Flag `f` as counted lost (module docs, *Suspects*).
    pub(crate) fn set_suspect(&self, f: &Frame) {
        let m = self.word(f.end - HEADER + META);
        m.set(m.get() | SUSPECT);
        self.suspects.set(true);
    }

    /// Drop `f`: the frames above it move down over it, unless it is the innermost.
    pub(crate) fn take(&self, f: &Frame) {
        if self.is_top(f) {
            self.truncate_to(f);
        } else {
            self.remove(f);
        }
    }

    /// The frame a thread that arrived at the trampoline with `rsp` (after the `ret`)
    /// returned through: the innermost one recorded at `rsp - 8`; else — a `ret imm16`
    /// popped more — the outermost of the innermost frames below `rsp`, if it is within
    /// 64 KiB of it. `None`: no call was recorded there.
    pub(crate) fn returning(&self, rsp: u64) -> Option<Frame> {
        let slot = rsp.wrapping_sub(8);
        // The usual case first: the innermost frame is the call returning (no frame to
        // walk past, none dead above it).
        let top = self.top()?;
        if top.sp == slot {
            return Some(top);
        }
        self.returning_below(top, rsp)
    }

    /// [`ReturnStack::returning`] when the innermost frame `top` is not recorded at
    /// `rsp - 8` (out of line: a skipped call, or a `ret imm16`).
    #[cold]
    #[inline(never)]
    fn returning_below(&self, top: Frame, rsp: u64) -> Option<Frame> {
        let slot = rsp.wrapping_sub(8);
        let frames = std::iter::successors(Some(top), |f| self.frame_ending(f.start));
        if let Some(f) = frames.clone().find(|f| f.sp == slot) {
            return Some(f);
        }
        let below = frames.take_while(|f| f.sp < rsp).last()?;
        (slot.wrapping_sub(below.sp) <= 0xffff).then_some(below)
    }

    /// Put the original return address back into the slot of every frame whose slot
    /// holds the trampoline (for an unwinder about to walk the stack, or a tracer
    /// leaving): flagged, so [`ReturnStack::rehijack`] can undo it. Returns how many.
    pub(crate) fn unhijack(&self, mem: &dyn Memory) -> usize {
        let tramp = self.trampoline.get();
        let mut n = 0;
        for f in self.frames() {
            if !f.unhijacked
                && mem.read_u64(f.sp) == Ok(tramp)
                && mem.write_u64(f.sp, f.ret).is_ok()
            {
                self.set_unhijacked(&f, true);
                n += 1;
            }
        }
        n
    }

    /// Swap the trampoline back into the slots [`ReturnStack::unhijack`] restored, of the
    /// frames whose slot lies above `sp` (still live) and still holds the original
    /// address. Returns how many.
    pub(crate) fn rehijack(&self, sp: u64, mem: &dyn Memory) -> usize {
        let tramp = self.trampoline.get();
        let mut n = 0;
        for f in self.frames() {
            if f.unhijacked
                && f.sp > sp
                && mem.read_u64(f.sp) == Ok(f.ret)
                && mem.write_u64(f.sp, tramp).is_ok()
            {
                self.set_unhijacked(&f, false);
                n += 1;
            }
        }
        n
    }
}

impl Drop for ReturnStack {
    fn drop(&mut self) {
        let base = self.base.load(std::sync::atomic::Ordering::Relaxed);
        if base != 0 && self.owned.get() {
            let slice = std::ptr::slice_from_raw_parts_mut(base as *mut Cell<u64>, self.cap.get());
            // SAFETY: `reserve` made it from a `Box<[Cell<u64>]>` of `cap` words, and
            // nothing uses it after the stack is dropped.
            drop(unsafe { Box::from_raw(slice) });
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::memory::MemoryError;

    struct Words(std::cell::RefCell<Vec<u64>>);
    impl Memory for Words {
        fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
            let w = self.0.borrow();
            let v = w
                .get(addr as usize / 8)
                .ok_or(MemoryError::Unmapped(addr))?;
            buf.copy_from_slice(&v.to_le_bytes()[..buf.len()]);
            Ok(())
        }
        fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
            let mut w = self.0.borrow_mut();
            let v = w
                .get_mut(addr as usize / 8)
                .ok_or(MemoryError::NotWritable(addr))?;
            let mut b = v.to_le_bytes();
            b[..data.len()].copy_from_slice(data);
            *v = u64::from_le_bytes(b);
            Ok(())
        }
    }

    fn push(s: &ReturnStack, sp: u64, ids: &[u64]) -> Frame {
        let start = s.room(ids.len()).expect("room");
        for (k, &id) in ids.iter().enumerate() {
            // SAFETY: a fresh record of this frame.
            unsafe { (*s.consumer_data(start, k))[0] = id * 10 };
            s.set_consumer(start, k, id);
        }
        s.commit(start, ids.len(), 0x1000 + sp, sp, 0x40, 7);
        s.top().unwrap()
    }

    #[test]
    fn frames_push_find_and_drop_in_lifo_order() {
        let s = ReturnStack::new();
        assert!(s.room(1).is_none(), "no storage: no room");
        s.reserve(frame_words(2) * 3);
        let a = push(&s, 800, &[1, 2]);
        let b = push(&s, 720, &[3]);
        let c = push(&s, 640, &[]);
        assert_eq!(s.depth(), 3);
        assert_eq!(s.consumer_ref(&a, 1), (2, &[20, 0, 0, 0, 0, 0, 0, 0]));
        assert_eq!(s.consumer_ids(&b).collect::<Vec<_>>(), [3]);
        // A return through the innermost slot finds its frame.
        assert_eq!(s.returning(648), Some(c));
        // A return through b's slot finds b; c above it is dead.
        assert_eq!(s.returning(728), Some(b));
        // `ret 16` popped 16 more: the outermost frame below rsp within reach.
        assert_eq!(s.returning(744), Some(b));
        assert_eq!(s.returning(900), Some(a));
        assert_eq!(
            s.returning(0x20_0000),
            None,
            "beyond 64 KiB of the last frame below"
        );
        assert_eq!(
            s.frames().map(|f| f.sp).collect::<Vec<_>>(),
            [640, 720, 800]
        );
        assert_eq!(s.top().unwrap().ret, c.ret);
        s.truncate_to(&b);
        assert_eq!(s.top(), Some(a));
        assert!(s.room(2).is_some() && s.room(20).is_none());
        s.clear();
        assert!(s.is_empty());
    }

    #[test]
    fn unhijack_restores_and_rehijack_swaps_back_only_live_frames() {
        let words = Words(std::cell::RefCell::new(vec![0; 200]));
        let mem: &dyn Memory = &words;
        let s = ReturnStack::new();
        s.reserve(DEFAULT_WORDS);
        s.set_trampoline(0xdead);
        let outer = push(&s, 800, &[1]);
        let inner = push(&s, 720, &[1]);
        mem.write_u64(800, 0xdead).unwrap();
        mem.write_u64(720, 0xdead).unwrap();
        assert_eq!(s.unhijack(mem), 2);
        assert_eq!(mem.read_u64(800), Ok(outer.ret));
        assert_eq!(mem.read_u64(720), Ok(inner.ret));
        assert_eq!(s.unhijack(mem), 0, "flagged frames are not restored twice");
        // Caught at sp 760: the inner call is gone, the outer one lives on.
        assert_eq!(s.rehijack(760, mem), 1);
        assert_eq!(mem.read_u64(800), Ok(0xdead));
        assert_eq!(mem.read_u64(720), Ok(inner.ret));
        assert!(s.frames().all(|f| f.unhijacked == (f.sp == 720)));
    }
}
