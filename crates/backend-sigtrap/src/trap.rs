//! The SIGTRAP handler: the hot path of every hit.
//!
//! A trap is ours when the kernel reports an `int3` (`si_code == SI_KERNEL`) and either
//! (a) the `int3` is a probe's breakpoint: `rip - 1` is a registered address, or
//! (b) it is the trailing `int3` of a trap-after slot: `rip - 1` is in slot memory.
//!
//! (a) Pre-handlers run through [`Dispatcher::pre`]; then the displaced instruction runs
//! exactly once: emulated on the registers (one trap, and post-handlers, if any, right
//! after), or out of line — the jump-back slot when no post-handler is registered (one
//! trap), else the trap-after slot (`Step::defer_post`), whose `int3` brings us to (b).
//! The variant is chosen per hit from the snapshot, so a post-handler registered after
//! a site was boosted still runs.
//!
//! (b) `Slot::fixup_trap` moves `rip` back into the original code, then
//! [`Dispatcher::post`] runs the post-handlers.
//!
//! Anything else is not ours: a racing disarm (the byte is back, or re-armed: re-execute
//! the instruction at `rip - 1`), or someone else's trap, handed to the previous action.
//!
//! A trap inside our own machinery (a probed libc function our code called, say) runs
//! no handlers: the instruction is just executed, so dispatch can never recurse into
//! itself. It is told apart from a hit in another signal's handler that interrupted
//! ours by the signal mask (see `on_sigtrap`); such a hit, which the mask cannot tell
//! apart (an `SA_NODEFER` handler with an empty mask), is executed without running
//! handlers and without being counted. Handlers calling probed code are caught by the
//! core (counted as missed).
//!
//! Everything here is async-signal-safe: no lock, no allocation, no system call on the
//! paths of a hit (only handing a foreign signal on makes system calls).

use std::cell::Cell;
use std::sync::atomic::{compiler_fence, Ordering};
use std::sync::Once;

use libc::{c_int, c_void, siginfo_t, ucontext_t, SI_KERNEL};
use multiprobe_core::backend::{PreOutcome, ThreadState};
use multiprobe_core::Regs;
use multiprobe_x86::{Continue, Emulate, Frame, INT3};

use crate::memory::LocalMemory;
use crate::site::BlockInfo;
use crate::{
    collect, context, dispatchers, known, returning, signals, site, slots, thread, tramps,
};

std::thread_local! {
    /// Depth of our SIGTRAP handler on this thread (no destructor: signal-safe TLS).
    static IN_TRAP: Cell<u32> = const { Cell::new(0) };
    /// Signal mask (signals 1-64) of the code the innermost trap of ours interrupted.
    static TRAP_MASK: Cell<u64> = const { Cell::new(0) };
    /// `int3` traps this thread took into our handler (ours or not).
    static TRAPS: Cell<u64> = const { Cell::new(0) };
}

/// `int3` traps the calling thread has taken into the backend's handler.
pub(crate) fn traps_on_this_thread() -> u64 {
    TRAPS.with(Cell::get)
}

static INSTALL: Once = Once::new();

/// Traps that found their probe gone (or replaced) and re-executed the instruction.
pub(crate) static REEXECUTED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Install the SIGTRAP handler (once per process).
pub(crate) fn install() {
    INSTALL.call_once(|| {
        // Not on the alternate stack: dispatch and user handlers may need more than the
        // few KiB an alternate stack usually has.
        signals::install(libc::SIGTRAP, on_sigtrap, false).expect("installing the SIGTRAP handler");
    });
}

/// Whether `addr` is the first instruction of one of our signal handlers.
pub(crate) fn is_handler_entry(addr: u64) -> bool {
    addr == on_sigtrap as *const () as u64 || addr == crate::fault::handler_entry()
}

const MEM: LocalMemory = LocalMemory::installed();

extern "C" fn on_sigtrap(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let _errno = signals::ErrnoGuard::save();
    // SAFETY: the kernel passes valid siginfo and ucontext pointers to an SA_SIGINFO
    // handler, exclusively ours for the duration of the call.
    let (si, uc) = unsafe { (&*info, &mut *ctx.cast::<ucontext_t>()) };
    let ours = si.si_code == SI_KERNEL && {
        TRAPS.with(|t| t.set(t.get() + 1));
        let mask = mask_word(uc);
        let depth = IN_TRAP.with(|d| d.replace(d.get() + 1));
        let outer_mask = TRAP_MASK.with(|m| m.replace(mask));
        // Our handler changes no signal mask, so a trap raised by our own code runs
        // under the mask of the trap it is nested in; a trap from another signal's
        // handler that interrupted ours normally runs with that signal blocked, and is
        // an ordinary hit (the core nests such dispatches).
        let machinery = (depth > 0 && mask == outer_mask) || thread::Machinery::inside();
        // What a thread check must know: whether this handler saw the latest trampoline
        // (read before it looks at any site).
        let prev = thread::trap_started(site::PUBLISHED.load(Ordering::Acquire));
        // A trap our own trap path raises is a signal on this thread: it must find both
        // cells raised before any of that code runs, and the outer values back only once
        // all of it is done (the compiler must not move the cells across it).
        compiler_fence(Ordering::SeqCst);
        let ours = thread::with_state(|ts| on_int3(ts, uc, machinery));
        compiler_fence(Ordering::SeqCst);
        thread::trap_done(prev);
        TRAP_MASK.with(|m| m.set(outer_mask));
        IN_TRAP.with(|d| d.set(depth));
        ours
    };
    if ours {
        // A handler may have asked for a removal, which only thread context finishes.
        collect::ring_if_pending();
    } else {
        // SAFETY: our handler's own arguments.
        let _ = unsafe { signals::chain(sig, info, ctx) };
    }
}

/// Handle an `int3` that stopped at `uc`'s `rip`. Returns false if it is not ours.
#[inline]
fn on_int3(ts: &ThreadState, uc: &mut ucontext_t, machinery: bool) -> bool {
    let rip = context::rip(uc);
    let a = rip.wrapping_sub(1);
    if let Some(info) = slots::lookup(a) {
        return after_slot(ts, uc, info, rip);
    }
    if let Some(t) = tramps::lookup(a) {
        return t.map().is_trap_exit(rip) && frame_exit(uc);
    }
    if returning::is_trap_exit(rip) {
        return frame_exit(uc);
    }
    let tid = thread::tid();
    let mut regs = context::load(uc);
    regs.rip = a;
    if machinery && !ts.in_handler() {
        // A trap inside our own trap path: execute the instruction, run nothing.
        return step_quietly(uc, a, &mut regs);
    }
    for d in dispatchers::each() {
        let step = match d.pre(ts, a, tid, &mut regs, &MEM) {
            PreOutcome::NotOurs => continue,
            PreOutcome::Redirect => {
                context::store(uc, &regs);
                return true;
            }
            PreOutcome::Step(step) => step,
        };
        let info = step.site().info;
        match multiprobe_x86::continue_hit(
            &info.ways(),
            step.wants_post(),
            Emulate::First,
            &mut regs,
            &MEM,
        ) {
            Continue::Emulated { post } => {
                // Post-handlers right after the emulated instruction (if they run at
                // all: `defer_post` says).
                if post && step.defer_post() {
                    d.post(ts, a, tid, &mut regs, &MEM);
                }
                regs.rip = info.resume_target(regs.rip);
            }
            Continue::OutOfLine { at, post, .. } => {
                // A copy that brings the thread back for the posts only if the step was
                // deferred (with no room left on this thread for it, its posts are
                // counted missed and it takes the jump-back slot).
                regs.rip = if !post || step.defer_post() {
                    at
                } else {
                    info.boost.addr()
                };
            }
            // Every site has its slots (built at prepare).
            Continue::InPlace { .. } => regs.rip = info.boost.addr(),
        }
        context::store(uc, &regs);
        return true;
    }
    not_ours(uc, a)
}

/// A trampoline's exit by trap (a handler moved `rsp` where no other exit can go):
/// `rsp` points at the trampoline's frame; the thread resumes with every register as the
/// frame holds it (the vector state was restored before the `int3`). The caller checked
/// that the `int3` is a trampoline's trap exit (a site's, or the return trampoline's).
fn frame_exit(uc: &mut ucontext_t) -> bool {
    let at = context::load(uc).rsp;
    let mut frame = [0u8; std::mem::size_of::<Frame>()];
    if multiprobe_core::Memory::read(&MEM, at, &mut frame).is_err() {
        return false;
    }
    // SAFETY: `Frame` is plain old data (`repr(C)` u64 fields) and `frame` has its size.
    let frame: Frame = unsafe { std::ptr::read_unaligned(frame.as_ptr().cast()) };
    context::store(uc, &frame.regs);
    true
}

/// The trailing `int3` of a trap-after slot: back to the original code, then the
/// post-handlers.
fn after_slot(ts: &ThreadState, uc: &mut ucontext_t, info: &BlockInfo, rip: u64) -> bool {
    let mut regs = context::load(uc);
    let Some(post) = &info.post else { return false };
    if !post.fixup_trap(rip, &mut regs) {
        return false;
    }
    let tid = thread::tid();
    for d in dispatchers::each() {
        if d.post(ts, info.addr, tid, &mut regs, &MEM) {
            break;
        }
    }
    regs.rip = info.resume_target(regs.rip);
    context::store(uc, &regs);
    true
}

/// The first word (signals 1-64) of the mask the interrupted code ran under.
fn mask_word(uc: &ucontext_t) -> u64 {
    // SAFETY: `sigset_t` is at least 8 bytes of plain data; the kernel's mask is its
    // first word on x86-64.
    unsafe {
        (&uc.uc_sigmask as *const libc::sigset_t)
            .cast::<u64>()
            .read_unaligned()
    }
}

/// Execute the instruction at `a` without dispatching (nested trap in our own code).
fn step_quietly(uc: &mut ucontext_t, a: u64, regs: &mut Regs) -> bool {
    for d in dispatchers::each() {
        let Some(info) = d.with_site(a, |s| s.info) else {
            continue;
        };
        match multiprobe_x86::continue_hit(&info.ways(), false, Emulate::First, regs, &MEM) {
            Continue::OutOfLine { at, .. } => regs.rip = at,
            Continue::InPlace { .. } => regs.rip = info.boost.addr(),
            Continue::Emulated { .. } => regs.rip = info.resume_target(regs.rip),
        }
        context::store(uc, regs);
        return true;
    }
    not_ours(uc, a)
}

/// No probe at `a` (any more). Re-execute if it was a probe racing its removal.
fn not_ours(uc: &mut ucontext_t, a: u64) -> bool {
    if !known::contains(a) {
        return false;
    }
    let mut b = [0u8];
    if multiprobe_core::Memory::read(&MEM, a, &mut b).is_err() {
        return false;
    }
    // The original byte is back (disarmed), or a probe was armed there again since.
    if b[0] != INT3 || dispatchers::each().any(|d| d.contains(a)) {
        REEXECUTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        context::set_rip(uc, a);
        return true;
    }
    false
}
