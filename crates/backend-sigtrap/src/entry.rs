//! The trampoline path: the entry points a promoted site's trampoline calls, on the
//! probed thread, in thread context, with the thread's registers in a
//! [`multiprobe_x86::Frame`] on its own stack.
//!
//! [`pre`] runs the hit through the core's dispatch (async-signal-safe, so running it
//! in thread context is trivially fine) in one call, `Dispatcher::pre_step_post`: the
//! pre-handlers, then the shared decision (`multiprobe_x86::continue_hit`, as the trap
//! path does) of how the hit continues, and, when that is to emulate the first
//! instruction (a hit with post-handlers), the post-handlers right after it in the same
//! walk of the site. It returns the trampoline's exit code: the relocated region, the
//! continuation after an emulated instruction, the post copy (whose stub calls
//! [`post`]), or a redirect. Handlers' register changes are made in the frame, which
//! the trampoline restores.
//!
//! Invariants:
//! * The contract of the trap path holds here too: a hit that arrives while this
//!   thread is already inside our machinery (this entry, or the SIGTRAP handler) runs no
//!   handlers and is counted as missed, and the instruction still runs; a hit inside a
//!   handler is the core's to count (rule 6); `errno` is the program's on return.
//! * Nothing here allocates, locks or makes a system call on its own; it imports only
//!   the leaf modules the signal path imports (plus the trampoline's description).

use std::sync::atomic::Ordering;

use multiprobe_core::backend::{Dispatcher, Ran, Stepped, ThreadState};
use multiprobe_x86::{continue_hit, Continue, Emulate, Frame, Trampoline, Via, Ways};

use crate::memory::LocalMemory;
use crate::site::Site;
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

#[inline(always)]
fn pre_hit(f: &mut Frame, info: &TrampInfo) -> u64 {
    f.regs.fs_base = context::fs_base();
    thread::with_state(|ts| {
        let Some(_inside) = thread::Machinery::enter() else {
            return missed(ts, f, info);
        };
        let tid = thread::tid();
        // The registry that armed the site first (one lookup on the usual hit), then
        // the others.
        let owner = info.block.owner.load(Ordering::Relaxed);
        if let Some(d) = dispatchers::get(owner) {
            if let Some(exit) = hit_in(d, ts, f, info, tid) {
                return exit;
            }
        }
        others(ts, f, info, tid)
    })
}

/// Our own machinery hit a probe: run nothing, count the miss.
#[cold]
#[inline(never)]
fn missed(ts: &ThreadState, f: &mut Frame, info: &TrampInfo) -> u64 {
    for d in dispatchers::each() {
        if d.miss(ts, info.addr) {
            break;
        }
    }
    f.leave(info.map(), false, &MEM)
}

/// The site's owner did not know it (it was re-armed by another registry): ask them all.
#[cold]
#[inline(never)]
fn others(ts: &ThreadState, f: &mut Frame, info: &TrampInfo, tid: u32) -> u64 {
    for d in dispatchers::each() {
        if let Some(exit) = hit_in(d, ts, f, info, tid) {
            return exit;
        }
    }
    // Unregistered meanwhile (the jump is about to be taken out): run the region.
    f.leave(info.map(), false, &MEM)
}

/// The hit, if `d` has a probe at the site: the trampoline's exit code.
///
/// Pre-handlers, then the shared decision of how the hit continues: with post-handlers
/// it is to emulate the first instruction where that can be done, and then the core
/// runs the post-handlers right after it, in the same call (one walk of the site's
/// view, nothing deferred); otherwise the relocated copies: the plain one, or the post
/// copy whose stub calls [`post`] (for a deferred step).
#[inline(always)]
fn hit_in(
    d: &Dispatcher<Site>,
    ts: &ThreadState,
    f: &mut Frame,
    info: &TrampInfo,
    tid: u32,
) -> Option<u64> {
    let t = info.map();
    let stepped = d.pre_step_post(ts, info.addr, tid, &mut f.regs, &MEM, |_, regs, post| {
        let how = if post {
            decide_with_post(info, t, regs)
        } else {
            // Folds to the plain copy.
            continue_hit(&ways(info, t), false, Emulate::ForPost, regs, &MEM)
        };
        match how {
            Continue::Emulated { .. } => Ran::Here,
            // The post copy brings the thread to the post stub; anything else is the
            // plain copy (a post that cannot run is given up: its emulation failed,
            // the instruction is about to fault).
            Continue::OutOfLine { via, .. } => Ran::OutOfLine {
                back: via == Via::RegionPost,
            },
            Continue::InPlace { .. } => Ran::OutOfLine { back: false },
        }
    });
    Some(match stepped {
        Stepped::NotOurs => return None,
        Stepped::Redirect => {
            let to = t.resume_target(f.regs.rip);
            f.continue_at(to, &MEM)
        }
        // Emulated, posts run: usually at the continuation now, the direct exit.
        Stepped::Done => f.leave(t, false, &MEM),
        Stepped::OutOfLine { deferred } => f.leave(t, deferred, &MEM),
    })
}

/// What a promoted site has for continuing a hit: its trampoline's copies (`t`, its
/// map, looked up once per hit).
#[inline(always)]
fn ways<'a>(info: &'a TrampInfo, t: &'a Trampoline) -> Ways<'a> {
    Ways {
        plan: &info.block.plan,
        jump_back: None,
        trap_after: None,
        trampoline: Some(t),
    }
}

/// How a hit with post-handlers continues: usually the first instruction emulated
/// (inline: a call would cost as much as the emulation of a `push`).
#[inline(always)]
fn decide_with_post(
    info: &TrampInfo,
    t: &Trampoline,
    regs: &mut multiprobe_core::Regs,
) -> Continue {
    continue_hit(&ways(info, t), true, Emulate::ForPost, regs, &MEM)
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
