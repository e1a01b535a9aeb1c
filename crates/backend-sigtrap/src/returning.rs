//! Return probes: the entry point of the process's return trampoline
//! (`multiprobe_x86::build_return_trampoline`), where every return-probed call returns
//! to — from trap sites and promoted sites alike — in thread context, on the returning
//! thread, with its registers in a [`multiprobe_x86::Frame`] on its own stack.
//!
//! At a call's entry the core swaps the return address at `[rsp]` for the trampoline's
//! entry (through [`LocalMemory`]) and keeps it on the thread's return stack (given to
//! each thread by `crate::thread`). At the return, [`ret`] asks each registry
//! ([`multiprobe_core::backend::Dispatcher::ret`]) to find the call by its stack pointer,
//! run the return hooks and put the original return address into the frame's `rip`;
//! the trampoline restores every register from the frame and continues there.
//!
//! Invariants:
//! * The trampoline is never freed or changed: a thread may return through it long
//!   after every return probe is gone (its return slot was swapped while one was there).
//! * A return whose call no registry claims (its registry was dropped) still goes to the
//!   original address ([`multiprobe_core::backend::ThreadState::pop_return`]); one that
//!   no frame explains (the program switched stacks under the return stack's feet, or
//!   wrote the trampoline's address itself) cannot be resumed anywhere right: the process
//!   is aborted with a message, as a corrupted return address would crash it.
//! * As for `crate::entry`: nothing here allocates, locks or makes a system call
//!   (except the abort); the imports are the signal path's leaf modules.

use std::sync::atomic::{AtomicU64, Ordering};

use multiprobe_core::backend::RetOutcome;
use multiprobe_x86::{Frame, ReturnTrampoline};

use crate::memory::LocalMemory;
use crate::{collect, context, dispatchers, signals, thread};

const MEM: LocalMemory = LocalMemory::installed();

/// The trampoline's exit-by-trap `int3` address (0: no trampoline yet).
static TRAP: AtomicU64 = AtomicU64::new(0);

/// The trampoline is placed: remember its trap exit, and send threads' returns there.
pub(crate) fn installed(t: &'static ReturnTrampoline) {
    TRAP.store(t.trap, Ordering::Release);
    thread::set_return_trampoline(t.entry);
}

/// Whether a SIGTRAP reporting `trap_ip` is the return trampoline's exit by trap (then
/// `rsp` is at its frame). Async-signal-safe.
pub(crate) fn is_trap_exit(trap_ip: u64) -> bool {
    let t = TRAP.load(Ordering::Acquire);
    t != 0 && trap_ip.wrapping_sub(1) == t
}

/// The return trampoline's entry point ([`multiprobe_x86::Entry`], `EVENT_RET`).
///
/// # Safety
/// Called only by the return trampoline, with its frame.
pub(crate) unsafe extern "C" fn ret(frame: *mut Frame, _ctx: u64, _event: u64) -> u64 {
    let _errno = signals::ErrnoGuard::save();
    // SAFETY: the trampoline passes its frame, ours for the call.
    let f = unsafe { &mut *frame };
    f.regs.fs_base = context::fs_base();
    let tid = thread::tid();
    let rsp = f.regs.rsp;
    let resumed = thread::with_state(|ts| {
        // A probe hit in the code below (a probed libc function, say) runs nothing. The
        // return itself is the thread's own and is handled in any case.
        let _inside = thread::Machinery::enter();
        for d in dispatchers::each() {
            match d.ret(ts, tid, &mut f.regs, &MEM) {
                RetOutcome::Returned => return true,
                RetOutcome::NotOurs => continue,
                RetOutcome::Unknown => return false,
            }
        }
        // No live registry claims the call: back to its caller, running nothing.
        match ts.pop_return(rsp) {
            Some(to) => {
                f.regs.rip = to;
                true
            }
            None => false,
        }
    });
    if !resumed {
        lost_return(rsp);
    }
    collect::ring_if_pending();
    let to = f.regs.rip;
    f.continue_at(to, &MEM)
}

/// A thread at the return trampoline with nowhere to go (module invariants).
#[cold]
fn lost_return(rsp: u64) -> ! {
    let mut msg = *b"multiprobe: a return through the return trampoline matches no recorded call (rsp 0x0000000000000000); aborting\n";
    let at = msg
        .windows(2)
        .position(|w| w == b"0x")
        .expect("the message has the number")
        + 2;
    for i in 0..16 {
        let nibble = (rsp >> (60 - 4 * i)) & 0xf;
        msg[at + i] = b"0123456789abcdef"[nibble as usize];
    }
    // SAFETY: writing a local buffer to stderr, then aborting: both async-signal-safe.
    unsafe {
        libc::write(2, msg.as_ptr().cast(), msg.len());
        libc::abort()
    }
}
