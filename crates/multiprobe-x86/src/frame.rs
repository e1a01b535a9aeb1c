//! The trampoline's frame, as the backend's entry point sees it, and how a hit leaves
//! the trampoline.
//!
//! A trampoline builds the frame on the probed thread's own stack, below its red zone:
//!
//! ```text
//!   R = rsp at the probed address
//!   [R - 128, R)        the red zone: the program's, never touched
//!   [R - 136, R - 128)  Frame::resume: where an exit by `ret 128` goes
//!   [R - 296, R - 136)  Frame::regs: multiprobe_core::Regs (repr(C)), rip = the probed
//!                       address, rsp = R, fs_base/gs_base 0 (the backend fills them)
//!   below               the vector state (XSAVE area or register copies), 64-aligned,
//!                       then the entry point's own stack
//! ```
//!
//! The entry point returns one of the `EXIT_*` codes, and the trampoline restores every
//! register from the frame (so handlers' changes take effect) and leaves accordingly.
//! [`Frame::leave`] picks the code from what the handlers did:
//!
//! * nothing moved: [`EXIT_REGION`] (run the relocated region, jump back) or
//!   [`EXIT_POST`] (the relocated first instruction, then the post stub);
//! * `rip` at the first instruction's continuation (it was emulated in the entry, with
//!   its post-handlers right after): [`EXIT_NEXT`], `rsp` loaded from the frame's field
//!   (above `rsp` at that moment) and a direct `jmp` — no `ret`, so the return stack
//!   predictor stays in step with the program's calls;
//! * `rip` moved, `rsp` not: `resume = rip`, [`EXIT_RESUME`]. After restoring, the
//!   trampoline's `rsp` is `R - 136`, and `ret 128` reads the resume slot *at* `rsp`
//!   (never below it, so a signal arriving meanwhile cannot clobber it) and leaves
//!   `rsp = R`. Nothing is written below `R - 128`'s red zone... nor into it.
//! * `rsp` moved up (to `S >= R + 8`: a handler that returned from the function, or
//!   popped something): the new `rip` is written at `S - 136`, `resume = S - 136`, and
//!   [`EXIT_RESUME_STACK`]: `pop rsp` (now `S - 136`) then `ret 128` (reads `[S - 136]`,
//!   which is at `rsp`, and leaves `rsp = S`). `S - 136` is below the new red zone and
//!   above the whole frame, so the write clobbers neither the program's live data nor
//!   what the trampoline has yet to restore.
//! * anything else (`rsp` moved down, or onto another stack, where `S - 136` could lie
//!   inside the frame or below the trampoline's own `rsp` where a signal may overwrite
//!   it; or the write failed): [`EXIT_TRAP`]. The trampoline restores the vector state
//!   and executes `int3` with `rsp` at the frame; the backend's trap handler sets every
//!   register from [`Frame::regs`] (the signal frame lies below `rsp - 128`, so the
//!   frame survives it).
//!
//! A resume address in the region's interior (a handler that sent the thread to the
//! region's second instruction, or the first instruction emulated) is mapped to the
//! same point of the relocated copy: the interior holds the jump's bytes.

use multiprobe_core::{Memory, Regs};

use crate::trampoline::Trampoline;

/// Bytes from the frame's start up to the probed thread's `rsp` (`R` above).
pub const FRAME_TO_RSP: u64 = 296;
/// The red zone the trampoline skips (System V ABI).
pub const RED_ZONE: u64 = 128;
/// `ret 128` pops the 8-byte resume slot and the red zone: the slot is this far below
/// the `rsp` it leaves.
const RESUME_BELOW: u64 = RED_ZONE + 8;

/// Run the relocated region (rip and rsp unchanged).
pub const EXIT_REGION: u64 = 0;
/// Run the relocated first instruction, then the post stub.
pub const EXIT_POST: u64 = 1;
/// Resume at [`Frame::resume`] with the original `rsp`.
pub const EXIT_RESUME: u64 = 2;
/// `pop rsp; ret 128`: [`Frame::resume`] holds the new `rsp - 136`, where the new `rip`
/// was written.
pub const EXIT_RESUME_STACK: u64 = 3;
/// `int3` with `rsp` at the frame: the backend loads every register from it.
pub const EXIT_TRAP: u64 = 4;
/// Continue where the original code goes on after the first instruction
/// ([`Trampoline::continuation`]), with `rsp` from the frame (any value): a direct
/// `jmp`. For a first instruction emulated with its post-handlers run in the entry.
pub const EXIT_NEXT: u64 = 5;

/// The event an entry point is called for (its third argument).
pub const EVENT_PRE: u64 = 0;
/// After the relocated first instruction: the post-handlers' turn; `regs.rip` is
/// where the original code continues.
pub const EVENT_POST: u64 = 1;

/// At the return trampoline ([`crate::build_return_trampoline`]): a return-probed call
/// returned; `regs.rip` is the trampoline's entry, `regs.rsp` the stack pointer after the
/// `ret`. The entry sets `rip` to the original return address and leaves by
/// [`Frame::continue_at`].
pub const EVENT_RET: u64 = 2;

/// What the trampoline saved, in the layout it pushes (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Frame {
    /// The probed thread's registers; handlers' changes are restored from here.
    pub regs: Regs,
    /// The exit slot (see the module docs).
    pub resume: u64,
}

const _: () = assert!(std::mem::size_of::<Frame>() as u64 + RED_ZONE == FRAME_TO_RSP);

/// The signature of a backend's entry point: `(frame, ctx, event) -> exit code`. `ctx`
/// is what the backend gave [`crate::TrampolineSpec::ctx`]; `event` is [`EVENT_PRE`] or
/// [`EVENT_POST`].
pub type Entry = unsafe extern "C" fn(frame: *mut Frame, ctx: u64, event: u64) -> u64;

impl Frame {
    /// The probed thread's `rsp` when it entered the trampoline (`R`).
    #[inline]
    pub fn entry_rsp(&self) -> u64 {
        self as *const Frame as u64 + FRAME_TO_RSP
    }

    /// The exit code for the registers as the handlers left them (module docs), writing
    /// [`Frame::resume`] and, for a moved stack, the new `rip` below it (through `mem`,
    /// so a bad stack fails cleanly and exits by trap). `post`: the hit still wants its
    /// post-handlers and nothing moved (the region's first instruction runs from the
    /// post copy). `rip` unchanged with `rsp` changed runs the region on the new stack.
    #[inline]
    pub fn leave(&mut self, t: &Trampoline, post: bool, mem: &dyn Memory) -> u64 {
        let rip = self.regs.rip;
        if rip == t.region().addr() && self.regs.rsp == self.entry_rsp() {
            return if post && t.has_post() {
                EXIT_POST
            } else {
                EXIT_REGION
            };
        }
        if rip == t.continuation() {
            return EXIT_NEXT;
        }
        self.leave_moved(t, post, mem)
    }

    /// [`Frame::leave`] for a hit that moved `rip` elsewhere, or `rsp` (out of line:
    /// most hits do neither).
    #[inline(never)]
    fn leave_moved(&mut self, t: &Trampoline, post: bool, mem: &dyn Memory) -> u64 {
        let rip = self.regs.rip;
        let at_start = rip == t.region().addr();
        let target = if at_start && post && t.has_post() {
            t.post_copy()
        } else {
            t.resume_target(rip)
        };
        self.continue_at(target, mem)
    }

    /// The exit code for a post stub (the frame's `rip` was `continuation`, where the
    /// original code goes on after the first instruction): [`EXIT_REGION`] continues
    /// there when the post-handlers moved neither `rip` nor `rsp`.
    #[inline]
    pub fn leave_after(&mut self, t: &Trampoline, continuation: u64, mem: &dyn Memory) -> u64 {
        if self.regs.rip == continuation {
            return if self.regs.rsp == self.entry_rsp() {
                EXIT_REGION
            } else {
                EXIT_NEXT
            };
        }
        let target = t.resume_target(self.regs.rip);
        self.continue_at(target, mem)
    }

    /// The exit code that resumes at `rip` (already mapped out of the region's interior)
    /// with `regs.rsp`.
    #[inline]
    pub fn continue_at(&mut self, rip: u64, mem: &dyn Memory) -> u64 {
        let r = self.entry_rsp();
        let rsp = self.regs.rsp;
        if rsp == r {
            self.resume = rip;
            return EXIT_RESUME;
        }
        if rsp >= r + 8 {
            let slot = rsp - RESUME_BELOW;
            if mem.write_u64(slot, rip).is_ok() {
                self.resume = slot;
                return EXIT_RESUME_STACK;
            }
        }
        self.regs.rip = rip;
        EXIT_TRAP
    }
}
