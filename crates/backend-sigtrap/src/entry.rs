//! The trampoline path: the entry points a promoted site's trampoline calls, on the
//! probed thread, in thread context, with the thread's registers in a
//! [`multiprobe_x86::Frame`] on its own stack.
//!
//! [`pre`] runs the pre-handlers through the core's dispatch (unchanged: it is
//! async-signal-safe, so running it in thread context is trivially fine), lets the
//! shared decision (`multiprobe_x86::continue_hit`, as the trap path does) pick how the
//! hit continues, and returns the trampoline's exit code: the relocated region, the
//! post copy (whose stub calls [`post`]), or a redirect. Handlers' register changes are
//! made in the frame, which the trampoline restores.
//!
//! Invariants:
//! * The contract of the trap path holds here too: a hit that arrives while this
//!   thread is already inside our machinery (this entry, or the SIGTRAP handler) runs no
//!   handlers and is counted as missed, and the instruction still runs; a hit inside a
//!   handler is the core's to count (rule 6); `errno` is the program's on return.
//! * Nothing here allocates, locks or makes a system call on its own; it imports only
//!   the leaf modules the signal path imports (plus the trampoline's description).

use std::sync::atomic::Ordering;

use multiprobe_core::backend::PreOutcome;
use multiprobe_x86::{continue_hit, Continue, Emulate, Frame, Via, Ways};

use crate::memory::LocalMemory;
use crate::tramps::TrampInfo;
use crate::{collect, context, dispatchers, signals, thread};

const MEM: LocalMemory = LocalMemory::installed();

/// The pre entry ([`multiprobe_x86::Entry`]): `ctx` is the site's [`TrampInfo`].
///
/// # Safety
/// Called only by a trampoline built for `ctx`, with its frame.
pub(crate) unsafe extern "C" fn pre(frame: *mut Frame, ctx: u64, _event: u64) -> u64 {
    let _errno = signals::ErrnoGuard::save();
    // SAFETY: the trampoline passes its frame (ours for the call) and the leaked info it
    // was built with.
    let (f, info) = unsafe { (&mut *frame, &*(ctx as *const TrampInfo)) };
    let exit = pre_hit(f, info);
    // A handler may have asked for a removal, which only thread context finishes.
    collect::ring_if_pending();
    exit
}

fn pre_hit(f: &mut Frame, info: &TrampInfo) -> u64 {
    let t = info.map();
    f.regs.fs_base = context::fs_base();
    thread::with_state(|ts| {
        let Some(_inside) = thread::Machinery::enter() else {
            // Our own machinery hit a probe: run nothing, count the miss.
            for d in dispatchers::each() {
                if d.miss(ts, info.addr) {
                    break;
                }
            }
            return f.leave(t, false, &MEM);
        };
        let tid = thread::tid();
        // The registry that armed the site first (one lookup on the usual hit), then
        // the others.
        let owner = dispatchers::get(info.block.owner.load(Ordering::Relaxed));
        for d in owner.into_iter().chain(dispatchers::each()) {
            let step = match d.pre(ts, info.addr, tid, &mut f.regs, &MEM) {
                PreOutcome::NotOurs => continue,
                PreOutcome::Redirect => {
                    let to = t.resume_target(f.regs.rip);
                    return f.continue_at(to, &MEM);
                }
                PreOutcome::Step(step) => step,
            };
            let ways = Ways {
                plan: &info.block.plan,
                jump_back: None,
                trap_after: None,
                trampoline: Some(t),
            };
            let post = step.wants_post();
            return match continue_hit(&ways, post, Emulate::ForPost, &mut f.regs, &MEM) {
                Continue::Emulated { post } => {
                    if post && step.defer_post() {
                        d.post(ts, info.addr, tid, &mut f.regs, &MEM);
                    }
                    // Usually at the continuation now: the direct exit, any rsp.
                    f.leave(t, false, &MEM)
                }
                Continue::OutOfLine {
                    via: Via::RegionPost,
                    ..
                } => {
                    let deferred = step.defer_post();
                    f.leave(t, deferred, &MEM)
                }
                // The plain copy (a post that cannot run is given up: its emulation
                // failed, the instruction is about to fault).
                _ => {
                    drop(step);
                    f.leave(t, false, &MEM)
                }
            };
        }
        // Unregistered meanwhile (the jump is about to be taken out): run the region.
        f.leave(t, false, &MEM)
    })
}

/// The post entry: the first instruction ran from the post copy; the frame's `rip` is
/// where the original code continues.
///
/// # Safety
/// As for [`pre`].
pub(crate) unsafe extern "C" fn post(frame: *mut Frame, ctx: u64, _event: u64) -> u64 {
    let _errno = signals::ErrnoGuard::save();
    // SAFETY: as in `pre`.
    let (f, info) = unsafe { (&mut *frame, &*(ctx as *const TrampInfo)) };
    let t = info.map();
    f.regs.fs_base = context::fs_base();
    let tid = thread::tid();
    thread::with_state(|ts| {
        let _inside = thread::Machinery::enter();
        let owner = dispatchers::get(info.block.owner.load(Ordering::Relaxed));
        for d in owner.into_iter().chain(dispatchers::each()) {
            if d.post(ts, info.addr, tid, &mut f.regs, &MEM) {
                break;
            }
        }
    });
    collect::ring_if_pending();
    f.leave_after(t, t.continuation(), &MEM)
}
