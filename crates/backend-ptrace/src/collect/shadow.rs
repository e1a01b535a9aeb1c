//! The tracer's side of `ret` collectors in the tracee: the shadow stacks' mapping
//! (`multiprobe_x86::collect::shadow`), and putting original return addresses back
//! where the program or an unwinder must see them.
//!
//! * The mapping is made in the tracee (an injected `mmap`, private and anonymous) the
//!   first time a site with a `ret` collector is promoted; if that fails, the reason is
//!   kept and such sites stay on the one-stop path (whose returns the core pairs).
//! * **Leaving** (detach, a fork child freed of probes): every slot of a call in flight
//!   that holds a return code's address gets its original return address back, so the
//!   program returns where it would have; those calls are unobserved.
//! * **Unwinders** (`returns.rs` hooks them): before one runs on a thread, that
//!   thread's slots get their originals back; where the program goes on (a catch, the
//!   walk's return), the calls still in flight above the stack pointer are armed again.
//!
//! * **A thread that ended** (its exit reported) frees its block: the calls in flight
//!   in it never return (counted lost in their collectors now, as the tracee's code
//!   would), and the block goes back to the pool. A program that makes threads all its
//!   life would otherwise fill every block with dead threads' fs bases, and the calls of
//!   its later threads would all be lost. No live thread can have that fs base: a new
//!   one that reuses the dead one's TLS comes from a clone the tracer notes (the fs
//!   base is then its own, and the block is left alone) and holds at its first stop.
//!
//! Invariant: a slot is written only when it holds exactly what we put there (the
//! return code's address for a restore, the original for a re-arm), so a slot the
//! program reused since is never touched.

use multiprobe_core::Memory;
use multiprobe_x86::collect::shadow::{
    block_header, block_offset, blocks_of, in_flight, InFlight, BUSY, DEPTH, FRAMES, FRAME_LEN,
    OWNER, SHADOW_LEN, THREADS,
};

use crate::error;
use crate::inject;
use crate::sys::{Tid, UserRegs};
use crate::tracer::Tracer;

/// The shadow stacks of the current image, as far as they got.
#[derive(Debug, Default, Clone)]
pub(crate) enum ShadowState {
    #[default]
    NotTried,
    Failed(String),
    Mapped(u64),
}

/// The calls in flight of every block at `shadow` (those of the thread whose fs base is
/// `only`, if given: only the blocks that thread looks at, `blocks_of`), read with
/// `read`, each with its block's address.
fn calls_in_flight(
    shadow: u64,
    only: Option<u64>,
    read: &dyn Fn(u64, &mut [u8]) -> bool,
) -> Vec<(u64, Vec<InFlight>)> {
    let blocks: Vec<usize> = match only {
        Some(fs) => blocks_of(fs).collect(),
        None => (0..THREADS).collect(),
    };
    let mut all = Vec::new();
    for i in blocks {
        let at = shadow + block_offset(i) as u64;
        let mut head = [0u8; 16];
        if !read(at, &mut head) {
            continue;
        }
        let (owner, depth) = block_header(&head);
        if owner == 0 || only.is_some_and(|fs| fs != owner) {
            continue;
        }
        let n = (depth as usize).min(FRAMES);
        let mut frames = vec![0u8; n * FRAME_LEN];
        if n == 0 || read(at + FRAME_LEN as u64, &mut frames) {
            all.push((at, in_flight(&frames)));
        }
    }
    all
}

/// What to write into the return slots of calls in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Put {
    /// The original return address, where the slot holds the return code.
    Originals,
    /// The return code again, where a slot above this stack pointer holds the
    /// original (the program goes on there after an unwinder ran).
    CodeAbove(u64),
}

/// Do `put` to the calls in flight of every block at `shadow` (of the thread whose fs
/// base is `only`, if given), through `read` and `write` of the process's memory.
fn rewrite(
    shadow: u64,
    only: Option<u64>,
    put: Put,
    read: &dyn Fn(u64, &mut [u8]) -> bool,
    write: &dyn Fn(u64, &[u8]) -> bool,
) {
    let mut calls: Vec<InFlight> = calls_in_flight(shadow, only, read)
        .into_iter()
        .flat_map(|(_, c)| c)
        .collect();
    if put == Put::Originals {
        // Innermost first: frames chained at one slot (a tail call between two
        // return-probed functions) unwind it in turn, to the outermost's original.
        calls.reverse();
    }
    for c in calls {
        let (from, to) = match put {
            Put::Originals => (c.code, c.ret),
            Put::CodeAbove(sp) if c.slot > sp => (c.ret, c.code),
            Put::CodeAbove(_) => continue,
        };
        let mut now = [0u8; 8];
        if from != 0 && read(c.slot, &mut now) && u64::from_le_bytes(now) == from {
            let _ = write(c.slot, &to.to_le_bytes());
        }
    }
}

impl Tracer {
    /// The shadow stacks' address in the tracee, mapping them on a held thread first if
    /// needed (every thread of the process is held).
    pub(crate) fn ensure_shadow(&mut self) -> std::result::Result<u64, String> {
        if let Some(done) = self.shadow_done() {
            return done;
        }
        let Some((tid, ur)) = self.held_thread() else {
            return Err(String::new()); // no thread can make a call now: later
        };
        self.ensure_shadow_on(tid, &ur)
    }

    fn shadow_done(&self) -> Option<std::result::Result<u64, String>> {
        match &self.shared.lock().collect.shadow {
            ShadowState::Mapped(a) => Some(Ok(*a)),
            ShadowState::Failed(why) => Some(Err(why.clone())),
            ShadowState::NotTried => None,
        }
    }

    /// [`Tracer::ensure_shadow`] on the stopped thread `tid` (registers `ur`).
    pub(crate) fn ensure_shadow_on(
        &mut self,
        tid: Tid,
        ur: &UserRegs,
    ) -> std::result::Result<u64, String> {
        if let Some(done) = self.shadow_done() {
            return done;
        }
        let pid = self.shared.pid;
        let made = (|| -> multiprobe_core::Result<u64> {
            let insn = {
                let st = self.shared.lock();
                let code = st.usable()?;
                self.injector.insn(pid, code)?
            };
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
            let args = [0, SHADOW_LEN as u64, rw, flags as u64, u64::MAX, 0];
            inject::syscall(pid, tid, ur, insn, libc::SYS_mmap, args, &mut self.aside)?
                .map_err(|e| error::sys(e, "mmap the shadow stacks in the tracee"))
        })();
        for sig in self.aside.take_signals(tid) {
            self.resend.push((tid, sig));
        }
        let state = match made {
            Ok(a) => ShadowState::Mapped(a),
            Err(e) => ShadowState::Failed(format!("no shadow stacks in the tracee: {e}")),
        };
        self.shared.lock().collect.shadow = state;
        self.shadow_done().expect("just set")
    }

    /// Leaving the process with every thread held outside our code: the original return
    /// addresses go back into every armed slot of every thread.
    pub(crate) fn restore_shadow_returns(&self) {
        for_calls(&self.shared, &self.mem, None, Put::Originals);
    }

    /// A fork child (memory `code`) freed of probes: its copy of the stacks and of the
    /// shadow stacks describe the forker's calls in flight; put their originals back
    /// before its copy of the trampolines goes.
    pub(crate) fn restore_shadow_in_child(&self, code: &crate::mem::CodeMemory) {
        let Some(shadow) = shadow_of(&self.shared) else {
            return;
        };
        let read = |a: u64, b: &mut [u8]| code.read(a, b).is_ok();
        let write = |a: u64, b: &[u8]| code.write(a, b).is_ok();
        rewrite(shadow, None, Put::Originals, &read, &write);
    }

    /// Thread `tid` ended: free its block (module docs, "A thread that ended").
    pub(crate) fn shadow_thread_gone(&self, tid: Tid) {
        let st = self.shared.lock();
        let (ShadowState::Mapped(shadow), super::AreaState::Mapped(area)) =
            (&st.collect.shadow, &st.collect.area)
        else {
            return;
        };
        let Some(fs) = st.collect.threads.fs_of(tid.as_raw_pid()) else {
            return;
        };
        let read = |a: u64, b: &mut [u8]| self.mem.read(a, b).is_ok();
        if let Some((at, calls)) = calls_in_flight(*shadow, Some(fs), &read).pop() {
            // Suspects are counted lost already.
            for word in calls.iter().filter(|c| !c.suspect).flat_map(|c| c.lost) {
                super::reader::count_lost_at(area, word);
            }
            // The depth first: a thread that claims the block finds its stack empty.
            let _ = self.mem.write(at + DEPTH as u64, &0u64.to_le_bytes());
            let _ = self.mem.write(at + BUSY as u64, &0u64.to_le_bytes());
            let _ = self.mem.write(at + OWNER as u64, &0u64.to_le_bytes());
        }
    }
}

pub(super) fn shadow_of(shared: &crate::backend::Shared) -> Option<u64> {
    match shared.lock().collect.shadow {
        ShadowState::Mapped(a) => Some(a),
        _ => None,
    }
}

/// Do `put` to the calls in flight of the process (of the thread whose fs base is
/// `only`, if given) through `mem`. The unwinder hooks (`returns.rs`) ask for one
/// thread: [`Put::Originals`] before an unwinder runs, [`Put::CodeAbove`] where the
/// program goes on.
pub(crate) fn for_calls(
    shared: &crate::backend::Shared,
    mem: &dyn Memory,
    only: Option<u64>,
    put: Put,
) {
    let Some(shadow) = shadow_of(shared) else {
        return;
    };
    let read = |a: u64, b: &mut [u8]| mem.read(a, b).is_ok();
    let write = |a: u64, b: &[u8]| mem.write(a, b).is_ok();
    rewrite(shadow, only, put, &read, &write);
}

#[cfg(test)]
mod tests {
    use super::*;
    use multiprobe_x86::collect::shadow::{F_CODE, F_RET, F_RSP};
    use std::cell::RefCell;
    use std::collections::HashMap;

    /// A process's memory as a map of 8-byte words.
    struct Words(RefCell<HashMap<u64, u64>>);

    impl Words {
        fn read(&self, a: u64, b: &mut [u8]) -> bool {
            for (i, c) in b.chunks_mut(8).enumerate() {
                let w = self
                    .0
                    .borrow()
                    .get(&(a + 8 * i as u64))
                    .copied()
                    .unwrap_or(0);
                c.copy_from_slice(&w.to_le_bytes()[..c.len()]);
            }
            true
        }
        fn write(&self, a: u64, b: &[u8]) -> bool {
            self.0
                .borrow_mut()
                .insert(a, u64::from_le_bytes(b.try_into().unwrap()));
            true
        }
        fn set(&self, a: u64, v: u64) {
            self.0.borrow_mut().insert(a, v);
        }
        fn get(&self, a: u64) -> u64 {
            self.0.borrow().get(&a).copied().unwrap_or(0)
        }
    }

    #[test]
    fn chained_frames_at_one_slot_are_restored_and_rearmed_in_turn() {
        // A tail call: the outer call's frame (its return code A) and the inner's (code
        // B) at one slot; the inner's original is A, the slot holds B.
        let (shadow, fs, slot) = (0x10_0000u64, 0x7f00_1234_5000u64, 0x7ffd_0000u64);
        let (orig, a, b) = (0x40_1000u64, 0x50_0000u64, 0x50_1000u64);
        let m = Words(RefCell::default());
        let block = shadow + block_offset(blocks_of(fs).next().unwrap()) as u64;
        m.set(block + OWNER as u64, fs);
        m.set(block + DEPTH as u64, 2);
        for (k, (ret, code)) in [(orig, a), (a, b)].into_iter().enumerate() {
            let f = block + (FRAME_LEN * (k + 1)) as u64;
            m.set(f + F_RET as u64, ret);
            m.set(f + F_RSP as u64, slot);
            m.set(f + F_CODE as u64, code);
        }
        m.set(slot, b);
        let read = |at: u64, buf: &mut [u8]| m.read(at, buf);
        let write = |at: u64, buf: &[u8]| m.write(at, buf);
        rewrite(shadow, Some(fs), Put::Originals, &read, &write);
        assert_eq!(m.get(slot), orig, "the outermost call's original");
        rewrite(shadow, Some(fs), Put::CodeAbove(slot - 8), &read, &write);
        assert_eq!(
            m.get(slot),
            b,
            "armed again: the innermost call's return code"
        );
    }
}
