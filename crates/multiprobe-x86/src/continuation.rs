//! The one place that decides how a hit continues once its pre-handlers ran: emulate
//! the displaced instruction, run it from the jump-back slot, from the trap-after slot,
//! or from a trampoline's relocated copy (plain, or the post copy whose stub runs the
//! post-handlers without a second trap), or, with nothing out of line yet, in place.
//!
//! Every backend calls [`continue_hit`] with what it has built for the site ([`Ways`])
//! and how much emulating costs it ([`Emulate`]); it only carries the answer out:
//! `Step::defer_post` when [`Continue`] says `post`, set `rip` to `at`, or run the
//! post-handlers at once after an emulation. Heap-free and async-signal-safe when the
//! backend's `Memory` is.
//!
//! The order of preference: a post-handler that can run without another trap beats one
//! that needs it (emulation with the posts right after, or the trampoline's post copy,
//! before the trap-after slot); a copy that jumps back costs nothing over another; a
//! post-handler is given up only where no variant can run it, which happens when the
//! instruction leaves through a computed target (`ret`, `jmp [mem]`, `call [mem]`),
//! and its emulation failed because it is about to fault.

use multiprobe_core::{Memory, Regs};

use crate::plan::{Class, EmulatedKind, Plan};
use crate::slot::Slot;
use crate::trampoline::Trampoline;

/// What a backend has built for a site.
#[derive(Clone, Copy, Debug)]
pub struct Ways<'a> {
    /// The displaced instruction.
    pub plan: &'a Plan,
    /// Its jump-back slot, if placed.
    pub jump_back: Option<&'a Slot>,
    /// Its trap-after slot, if placed (and the instruction has one).
    pub trap_after: Option<&'a Slot>,
    /// The site's trampoline, if built (its relocated copies serve trap hits too).
    pub trampoline: Option<&'a Trampoline>,
}

/// How much emulation costs a backend, relative to running a copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Emulate {
    /// Emulating is cheap (the registers are at hand, memory is a guarded copy): do it
    /// whenever the instruction can be emulated. In-process traps.
    First,
    /// Emulating costs register fetches and writes (ptrace): only when it saves a stop
    /// (post-handlers run right after), for a nop (nothing to fetch), or when there is
    /// no copy to run.
    WhenCheaper,
    /// Copies are free (a trampoline, in thread context already): emulate only to run
    /// post-handlers at once, which is cheaper than the post copy's second state save.
    ForPost,
}

/// Which copy a hit continues in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// The jump-back slot.
    JumpBack,
    /// The trap-after slot: its `int3` brings the thread back for the post-handlers.
    TrapAfter,
    /// The trampoline's plain relocated copy.
    Region,
    /// The trampoline's post copy: the first instruction, then the post stub.
    RegionPost,
}

/// What to do, decided by [`continue_hit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Continue {
    /// Emulated: the registers hold the state after the instruction. `post`: run the
    /// post-handlers now (`defer_post`, then `post`).
    Emulated {
        /// Post-handlers to run now.
        post: bool,
    },
    /// Resume at `at`, the copy `via`. `post`: defer the step; the copy brings the
    /// thread back for the post-handlers. Otherwise end the step now.
    OutOfLine {
        /// The copy's address.
        at: u64,
        /// Which copy.
        via: Via,
        /// Whether the post-handlers will run.
        post: bool,
    },
    /// No copy exists yet: execute the instruction at its own address (ptrace
    /// restores the byte and single-steps). `post` as for `OutOfLine`.
    InPlace {
        /// Post-handlers after the step.
        post: bool,
    },
}

/// Decide how the hit continues (module docs). `regs` are the registers after the
/// pre-handlers; they change only for [`Continue::Emulated`] (on a failed emulation
/// nothing changed, and a copy runs, where the CPU raises the fault).
#[inline]
pub fn continue_hit(
    ways: &Ways<'_>,
    want_post: bool,
    emulate: Emulate,
    regs: &mut Regs,
    mem: &dyn Memory,
) -> Continue {
    let plan = ways.plan;
    let post_copy = ways.trampoline.filter(|t| t.has_post());
    let copies = ways.jump_back.is_some() || ways.trampoline.is_some();
    let try_emulate = plan.is_emulated()
        && match emulate {
            Emulate::First => true,
            Emulate::WhenCheaper => {
                want_post || !copies || plan.class() == Class::Emulated(EmulatedKind::Nop)
            }
            Emulate::ForPost => want_post,
        };
    if try_emulate && plan.emulate(regs, mem).is_ok() {
        return Continue::Emulated { post: want_post };
    }
    if want_post {
        if let Some(t) = post_copy {
            return Continue::OutOfLine {
                at: t.post_copy(),
                via: Via::RegionPost,
                post: true,
            };
        }
        if let Some(s) = ways.trap_after {
            return Continue::OutOfLine {
                at: s.addr(),
                via: Via::TrapAfter,
                post: true,
            };
        }
    }
    if let Some(s) = ways.jump_back {
        return Continue::OutOfLine {
            at: s.addr(),
            via: Via::JumpBack,
            post: false,
        };
    }
    if let Some(t) = ways.trampoline {
        return Continue::OutOfLine {
            at: t.copy_of(0),
            via: Via::Region,
            post: false,
        };
    }
    Continue::InPlace { post: want_post }
}
