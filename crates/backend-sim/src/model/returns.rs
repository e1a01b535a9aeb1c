//! The model's return stacks (rule 10; the parent module's docs, *Returns*): plain
//! vectors of frames per CPU, sized in the words the core's would take.

use multiprobe_core::backend::{return_frame_words, RetOutcome};
use multiprobe_core::{HandlerId, Memory};

use super::steps::Cursor;
use super::Model;
use crate::cpu::RETURN_WORDS;
use crate::ctx::{Call, Ended, Hook};
use crate::memory::{within, Region, SimMemory, RET_TRAMPOLINE};

/// One call in flight whose return is awaited.
#[derive(Clone, Debug)]
pub(super) struct MFrame {
    /// Its return address's slot (the entry's stack pointer).
    pub(super) sp: u64,
    /// The probed function.
    pub(super) addr: u64,
    /// The handlers whose return hooks are due, with the token each pre-hook left.
    pub(super) consumers: Vec<(HandlerId, u64)>,
    /// Counted lost already, kept because its slot still led to the trampoline where a
    /// dead frame would be (the core's *suspects*); un-counted if it returns.
    pub(super) suspect: bool,
}

impl Model {
    /// Whether `id` would be counted or called at a return: registered, not removed.
    fn awaits(&self, id: HandlerId) -> bool {
        self.index.contains_key(&id) && self.live(id)
    }

    /// Count the frame's returns lost for its handlers still registered, unless it is
    /// a suspect (counted already).
    fn lose(&mut self, f: &MFrame) {
        if f.suspect {
            return;
        }
        for &(id, _) in &f.consumers {
            if self.awaits(id) {
                self.count(id, |s| s.returns_lost += 1);
                self.lost_seen += 1;
            }
        }
    }

    /// Frame `i` of CPU `cpu` is a suspect from now on (counted lost once).
    fn suspect(&mut self, cpu: usize, i: usize) {
        let f = self.stacks[cpu][i].clone();
        self.lose(&f);
        self.stacks[cpu][i].suspect = true;
    }

    /// A return handler's pre-hook kept a record, but it cannot be armed.
    pub(super) fn lose_one(&mut self, id: HandlerId) {
        self.count(id, |s| s.returns_lost += 1);
        self.lost_seen += 1;
    }

    fn used_words(&self, cpu: usize) -> usize {
        self.stacks[cpu]
            .iter()
            .map(|f| return_frame_words(f.consumers.len()))
            .sum()
    }

    /// CPU `cpu` is about to make a micro-step with its stack pointer at `sp`, where
    /// memory holds `word` (the driver says so before each one).
    pub fn before_step(&mut self, cpu: usize, sp: u64, word: Option<u64>) {
        self.slot_before[cpu] = word.map(|w| (sp, w));
    }

    /// Before the walk of a dispatch with `rets` return handlers enabled, the thread at
    /// `sp`: drop the dead frames (from the top, while their slot is not above `sp`:
    /// the slot no longer holds the trampoline; one below `sp` that still does is a
    /// suspect), and say whether a frame of `rets` records fits.
    ///
    /// The model sees memory after the core armed this call, so for a frame at `sp` it
    /// asks what the slot held before the dispatch ([`Model::before_step`]): something
    /// else, a `call` overwrote it and the frame is dead; the trampoline, this entry
    /// came by a tail call from inside that frame's call (in the simulated programs, a
    /// handler's redirect to another probed address with the same stack) and the frame
    /// is live, as in the core.
    pub(super) fn begin_arming(
        &mut self,
        cpu: usize,
        sp: u64,
        rets: usize,
        mem: &SimMemory,
    ) -> bool {
        let slot_held_tramp = self.slot_before[cpu] == Some((sp, RET_TRAMPOLINE));
        let mut i = self.stacks[cpu].len();
        while i > 0 {
            i -= 1;
            let f = &self.stacks[cpu][i];
            if f.sp > sp {
                break;
            }
            let mem: &dyn Memory = mem;
            let held_tramp = if f.sp == sp {
                slot_held_tramp
            } else {
                mem.read_u64(f.sp) == Ok(RET_TRAMPOLINE)
            };
            if !held_tramp {
                let f = self.stacks[cpu].remove(i);
                self.lose(&f);
            } else if f.sp < sp {
                self.suspect(cpu, i);
            }
        }
        // A suspect at `sp` under a frame above it: the call that brought this entry
        // wrote its slot (unless it still held the trampoline: a tail call), so it is
        // dead.
        if !slot_held_tramp {
            self.stacks[cpu].retain(|f| !(f.suspect && f.sp == sp));
        }
        self.used_words(cpu) + return_frame_words(rets) <= RETURN_WORDS
    }

    /// After the walk: push the frame of `kept` records (not redirected), or lose them.
    pub(super) fn finish_arming(
        &mut self,
        cpu: usize,
        sp: u64,
        addr: u64,
        kept: Vec<(HandlerId, u64)>,
        redirected: bool,
        mem: &SimMemory,
    ) {
        if kept.is_empty() {
            return;
        }
        let mem: &dyn Memory = mem;
        // The swap reads and writes the slot (the handlers' view of memory).
        let writable = mem.read_u64(sp).is_ok() && within(sp, 8, Region::Data);
        if redirected || !writable {
            for (id, _) in kept {
                self.lose_one(id);
            }
            return;
        }
        self.stacks[cpu].push(MFrame {
            sp,
            addr,
            consumers: kept,
            suspect: false,
        });
    }

    /// CPU `cpu` arrived at the trampoline with `rsp`, and the core said `outcome`.
    pub(super) fn on_return(
        &mut self,
        cur: &mut Cursor<'_>,
        cpu: usize,
        rsp: u64,
        outcome: RetOutcome,
        mem: &SimMemory,
    ) -> Result<(), String> {
        let slot = rsp.wrapping_sub(8);
        let stack = &self.stacks[cpu];
        let found = stack.iter().rposition(|f| f.sp == slot).or_else(|| {
            let run = stack.iter().rev().take_while(|f| f.sp < rsp).count();
            let i = stack.len().checked_sub(run)?;
            (run > 0 && slot.wrapping_sub(stack[i].sp) <= 0xffff).then_some(i)
        });
        let expected = if found.is_some() {
            RetOutcome::Returned
        } else {
            RetOutcome::Unknown
        };
        if expected != outcome {
            return Err(format!(
                "return at rsp {rsp:#x} on cpu {cpu}: core said {outcome:?}, model {expected:?}"
            ));
        }
        let Some(i) = found else { return Ok(()) };
        // Above it: dropped, or kept as suspects while their slot leads to the trampoline.
        let mem: &dyn Memory = mem;
        let mut j = self.stacks[cpu].len();
        while j > i + 1 {
            j -= 1;
            if mem.read_u64(self.stacks[cpu][j].sp) == Ok(RET_TRAMPOLINE) {
                self.suspect(cpu, j);
            } else {
                let f = self.stacks[cpu].remove(j);
                self.lose(&f);
            }
        }
        let f = self.stacks[cpu].remove(i);
        if f.suspect {
            for &(id, _) in &f.consumers {
                if self.awaits(id) {
                    self.count(id, |s| s.returns_lost -= 1);
                    self.lost_seen -= 1;
                }
            }
        }
        for (id, token) in f.consumers {
            if !self.awaits(id) {
                continue;
            }
            self.count(id, |s| s.returns += 1);
            self.returns_seen += 1;
            match self.hook(cur, cpu, id, Hook::Ret, f.addr)? {
                (Ended::Panic, _) => self.count(id, |s| s.panics += 1),
                (Ended::Normal, Some((got, _))) if got == token => {}
                (Ended::Normal, got) => {
                    return Err(format!(
                        "return hook of {id} got call data {got:?}, its pre-hook left {token}"
                    ))
                }
                (other, _) => return Err(format!("a return hook of {id} ended {other:?}")),
            }
        }
        Ok(())
    }

    /// CPU `cpu` ended (halted or faulted): its calls in flight never return.
    pub fn thread_ended(&mut self, cpu: usize) {
        for f in std::mem::take(&mut self.stacks[cpu]) {
            self.lose(&f);
        }
    }

    /// Calls in flight on CPU `cpu` the model awaits.
    pub fn returns_in_flight(&self, cpu: usize) -> usize {
        self.stacks[cpu].len()
    }
}

/// What the trace says a pre-hook of a return handler left, if it did.
pub(super) fn data_of(call: &Call) -> Option<(u64, bool)> {
    match *call {
        Call::Data { value, skipped, .. } => Some((value, skipped)),
        _ => None,
    }
}
