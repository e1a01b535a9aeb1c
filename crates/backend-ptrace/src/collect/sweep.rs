//! The tracer's answers to the shadow-stack code's questions (the `int3`s of
//! [`multiprobe_x86::collect::Ask`]): what the code in the tracee cannot decide alone,
//! because it would have to read return slots that may lie on another stack, or move
//! frames that are not the innermost.
//!
//! The rules (the same as the core's return stack, `multiprobe_core`'s *Suspects*), for
//! an entry or a return at slot `S`:
//! * Frames are grouped by slot. In each group, newest first, the newest frame is live
//!   if its slot holds its return code, and each older one if it is chained to the one
//!   kept before it (its return code is that frame's original return address: a tail
//!   call). The others are dead: a `call` overwrote the slot, or the program returned
//!   through it. At a return, the newest frame at `S` is the one returning; the chain
//!   starts from it.
//! * A live frame below `S`, where a call skipped by a `longjmp` would be, is a
//!   *suspect*: dead with its slot not yet overwritten, or live on another stack (a
//!   coroutine the program switched away from). It is kept and counted lost once; its
//!   return, if it comes, takes the count back (the tracee's return code does).
//! * Frames above `S` that are not suspects are outer calls: kept, not read.
//! * Dead frames are counted lost (unless suspects: counted already) and removed; at a
//!   return, the returning frame goes on top, so the code finds it innermost.
//!
//! Slots are read through the tracer (a read of an unmapped stack fails: the frame is
//! dead), never by the tracee. When another entry or return of the thread is under way
//! (the block's `busy` word: the ask comes from a signal handler's call nested in it),
//! nothing is moved, since the interrupted code holds frame addresses: an entry only
//! marks the innermost frame a suspect, and a return is sent to its original address
//! unobserved (its frame is found dead later and counted lost).

use multiprobe_core::Memory;
use multiprobe_x86::collect::shadow::{
    block_offset, blocks_of, frames_of, FrameBytes, BUSY, DEPTH, FRAMES, FRAME_LEN, OWNER,
};
use multiprobe_x86::collect::Ask;

use crate::sys::{self, Tid};
use crate::tracer::Tracer;

/// What the thread asked about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// An entry whose return slot is this.
    Entry(u64),
    /// A return through this slot.
    Return(u64),
}

/// The block after a sweep.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Swept {
    /// The frames, outermost first.
    pub(crate) frames: Vec<FrameBytes>,
    /// Counter words to count one loss in each (a word twice: twice).
    pub(crate) lost: Vec<u64>,
}

/// Sweep `frames` (outermost first) for `ev` (module docs), reading slots with `read`.
/// `None` for a return that matches no frame.
pub(crate) fn sweep(
    frames: &[FrameBytes],
    ev: Event,
    read: &dyn Fn(u64) -> Option<u64>,
) -> Option<Swept> {
    let (s, returning) = match ev {
        Event::Entry(s) => (s, None),
        Event::Return(s) => (s, Some(frames.iter().rposition(|f| f.slot() == s)?)),
    };
    let mut keep = vec![true; frames.len()];
    let mut out = Swept {
        frames: Vec::new(),
        lost: Vec::new(),
    };
    let mut suspects = Vec::new();
    // Newest first, one group per slot: what the newest kept frame there chains to.
    let mut chain: Vec<(u64, Option<u64>)> = Vec::new();
    for i in (0..frames.len()).rev() {
        let f = &frames[i];
        let slot = f.slot();
        if slot > s && !f.suspect() && !chain.iter().any(|&(g, _)| g == slot) {
            // An outer call (or the first of a group of them): not read.
            chain.push((slot, Some(f.ret())));
            continue;
        }
        let live = match chain.iter_mut().find(|(g, _)| *g == slot) {
            Some((_, next)) => {
                let chained = *next == Some(f.code());
                if chained {
                    *next = Some(f.ret());
                }
                chained
            }
            None => {
                let live = returning == Some(i) || read(slot) == Some(f.code());
                chain.push((slot, live.then(|| f.ret())));
                live
            }
        };
        if !live {
            keep[i] = false;
            if !f.suspect() {
                out.lost.extend(f.lost_words());
            }
        } else if slot < s && !f.suspect() {
            suspects.push(i);
            out.lost.extend(f.lost_words());
        }
    }
    for (i, f) in frames.iter().enumerate() {
        if keep[i] && returning != Some(i) {
            let mut f = *f;
            if suspects.contains(&i) {
                f.set_suspect();
            }
            out.frames.push(f);
        }
    }
    if let Some(i) = returning {
        out.frames.push(frames[i]);
    }
    Some(out)
}

impl Tracer {
    /// What the shadow-stack code asks by an `int3` at `addr`, if that is one.
    pub(crate) fn shadow_ask_at(&self, addr: u64) -> Option<Ask> {
        let st = self.shared.lock();
        st.collect.trampolines.iter().find_map(|m| m.ask(addr))
    }

    /// `tid` stopped at an `int3` by which the shadow-stack code asks `ask` (module
    /// docs); `ur` its registers. Answers and resumes it.
    pub(crate) fn shadow_ask(
        &mut self,
        tid: Tid,
        mut ur: sys::UserRegs,
        ask: Ask,
    ) -> multiprobe_core::Result<()> {
        let block = match ask {
            Ask::Entry => Some(ur.rdi),
            Ask::Return { .. } => self.block_of(ur.fs_base),
        };
        let answer = block.and_then(|b| self.answer(b, ask, &mut ur));
        if answer.is_none() {
            if let Ask::Return { broken } = ask {
                ur.rip = broken;
            }
        }
        crate::thread::gone_is_ok(sys::set_regs(tid, &ur))
            .map_err(|e| crate::error::sys(e, "set registers"))?;
        self.resume(tid, None)
    }

    /// The block of the thread whose fs base is `fs`, if it has one.
    fn block_of(&self, fs: u64) -> Option<u64> {
        let shadow = super::shadow::shadow_of(&self.shared)?;
        let mem: &dyn Memory = &self.mem;
        blocks_of(fs)
            .map(|i| shadow + block_offset(i) as u64)
            .find(|&at| mem.read_u64(at + OWNER as u64) == Ok(fs))
    }

    /// Sweep `block` for `ask` and write it back, with `ur` as the thread goes on.
    /// `None`: a return that matches no frame (or a block that cannot be read).
    fn answer(&self, block: u64, ask: Ask, ur: &mut sys::UserRegs) -> Option<()> {
        let shadow = super::shadow::shadow_of(&self.shared)?;
        let len = multiprobe_x86::collect::shadow::SHADOW_LEN as u64;
        if block.wrapping_sub(shadow) >= len {
            return None; // not a block of ours: leave the thread as it is
        }
        let mem: &dyn Memory = &self.mem;
        let depth = (mem.read_u64(block + DEPTH as u64).ok()? as usize).min(FRAMES);
        let busy = mem.read_u64(block + BUSY as u64).ok()?;
        let mut bytes = vec![0u8; depth * FRAME_LEN];
        self.mem.read(block + FRAME_LEN as u64, &mut bytes).ok()?;
        let frames: Vec<FrameBytes> = frames_of(&bytes).collect();
        let read = |a: u64| mem.read_u64(a).ok();
        let count = |words: &[u64]| {
            let st = self.shared.lock();
            if let super::AreaState::Mapped(area) = &st.collect.area {
                for &w in words {
                    super::reader::count_lost_at(area, w);
                }
            }
        };
        let frame_at = |k: usize| block + (FRAME_LEN * (k + 1)) as u64;
        let (ev, nested) = match ask {
            // The entry's own operation is under way (busy 1); a return asks with its
            // own ended (busy 0).
            Ask::Entry => (Event::Entry(ur.rsi), busy > 1),
            Ask::Return { .. } => (Event::Return(ur.rsp.wrapping_sub(8)), busy > 0),
        };
        if nested {
            match ev {
                Event::Entry(_) => {
                    let mut top = *frames.last()?;
                    if !top.suspect() {
                        count(&top.lost_words().collect::<Vec<_>>());
                        top.set_suspect();
                        self.mem.write(frame_at(depth - 1), &top.0).ok()?;
                    }
                }
                Event::Return(s) => {
                    let f = frames.iter().rev().find(|f| f.slot() == s)?;
                    ur.rip = f.ret();
                }
            }
            return Some(());
        }
        let swept = sweep(&frames, ev, &read)?;
        let mut out = Vec::with_capacity(swept.frames.len() * FRAME_LEN);
        for f in &swept.frames {
            out.extend_from_slice(&f.0);
        }
        // Frames first, then the depth: the thread is stopped, and so is every frame's
        // reader in it.
        if !out.is_empty() {
            self.mem.write(block + FRAME_LEN as u64, &out).ok()?;
        }
        let n = swept.frames.len() as u64;
        self.mem
            .write(block + DEPTH as u64, &n.to_le_bytes())
            .ok()?;
        count(&swept.lost);
        if matches!(ask, Ask::Entry) {
            ur.rdx = n;
        }
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use multiprobe_x86::collect::shadow::{F_CODE, F_LOST, F_RET, F_RSP};

    const LOST: u64 = 0x9000;

    fn frame(slot: u64, code: u64, ret: u64) -> FrameBytes {
        let mut f = FrameBytes([0; FRAME_LEN]);
        f.set_word(F_RSP, slot);
        f.set_word(F_CODE, code);
        f.set_word(F_RET, ret);
        f.set_word(F_LOST, LOST + slot);
        f
    }

    fn slots(s: &Swept) -> Vec<(u64, bool)> {
        s.frames.iter().map(|f| (f.slot(), f.suspect())).collect()
    }

    #[test]
    fn a_longjmp_loses_the_skipped_calls_once_and_keeps_the_outer_return() {
        // outer at 1000 called via (900), which called jumper (800); jumper longjmped
        // into outer, which returns. jumper's slot was overwritten since, via's not.
        let frames = [frame(1000, 0xa, 1), frame(900, 0xb, 2), frame(800, 0xc, 3)];
        let mem = |a: u64| Some(if a == 900 { 0xb } else { 0 });
        let s = sweep(&frames, Event::Return(1000), &mem).unwrap();
        assert_eq!(slots(&s), [(900, true), (1000, false)], "outer on top");
        assert_eq!(s.lost, [LOST + 800, LOST + 900]);
        // Again, at the next entry below via's slot: via is a suspect already.
        let again = sweep(&s.frames[..1], Event::Entry(950), &mem).unwrap();
        assert_eq!(slots(&again), [(900, true)]);
        assert!(again.lost.is_empty(), "counted once");
        // Once its slot is overwritten, it goes, without a second count.
        let gone = sweep(&s.frames[..1], Event::Entry(950), &|_| Some(0)).unwrap();
        assert!(gone.frames.is_empty() && gone.lost.is_empty());
    }

    #[test]
    fn a_call_on_another_stack_survives_and_a_newer_call_at_its_slot_ends_it() {
        // A call at 5000 on stack A; inside it, on stack B (below), a call at 2000 that
        // switched back to A; A's call returns.
        let frames = [frame(5000, 0xa, 1), frame(2000, 0xb, 2)];
        let mem = |a: u64| Some(if a == 2000 { 0xb } else { 0 });
        let s = sweep(&frames, Event::Return(5000), &mem).unwrap();
        assert_eq!(slots(&s), [(2000, true), (5000, false)]);
        // A second frame at B's slot (a call made after a longjmp there wrote it): the
        // older one at that slot is dead.
        let frames = [
            frame(2000, 0xb, 2),
            frame(2000, 0xb, 7),
            frame(1900, 0xd, 4),
        ];
        let s = sweep(&frames, Event::Entry(2500), &|a| {
            Some(if a == 2000 { 0xb } else { 0 })
        })
        .unwrap();
        assert_eq!(slots(&s), [(2000, true)]);
        assert_eq!(s.lost, [LOST + 1900, LOST + 2000, LOST + 2000]);
    }

    #[test]
    fn chained_frames_at_one_slot_stay_together() {
        // A tail call: outer (code 0xa) and inner (code 0xb, its original 0xa) at 1000;
        // the slot holds 0xb. An entry below that is not a call from them (a longjmp
        // target's) keeps both as suspects.
        let frames = [
            frame(1000, 0xa, 1),
            frame(1000, 0xb, 0xa),
            frame(900, 0xc, 3),
        ];
        let mem = |a: u64| Some(if a == 1000 { 0xb } else { 0 });
        let s = sweep(&frames, Event::Entry(1100), &mem).unwrap();
        assert_eq!(slots(&s), [(1000, true), (1000, true)]);
        // Returning through the slot: the inner is the one returning, the outer chained.
        let s = sweep(&frames, Event::Return(1000), &mem).unwrap();
        assert_eq!(slots(&s), [(1000, false), (1000, false)]);
        assert_eq!(s.frames[1].code(), 0xb, "the returning call innermost");
        assert_eq!(s.lost, [LOST + 900]);
        assert_eq!(sweep(&frames, Event::Return(1234), &mem), None);
    }
}
