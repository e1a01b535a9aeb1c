//! SIGSEGV/SIGBUS/SIGFPE/SIGILL: acting only on faults of our guarded copy or of a
//! displaced instruction running in a slot; everything else goes, untouched, to the
//! action that was installed before ours (see [`crate::signals`]).
//!
//! A fault in a slot is reported as if the instruction had faulted at its original
//! address: `Slot::fixup_ip` rewrites the registers to the equivalent original state
//! (`rip` = the probed address), the fault handlers run ([`Dispatcher::fault`]), and if
//! none handled it the signal is delivered to the program with those registers — to its
//! handler, or, under the default action, re-raised so that it takes effect when the
//! thread resumes at the probed address (the core dump shows `rip` there).
//!
//! [`Dispatcher::fault`]: multiprobe_core::backend::Dispatcher::fault

use std::sync::Once;

use libc::{c_int, c_void, siginfo_t, ucontext_t};
use multiprobe_core::{Fault, FaultAction};

use crate::memory::LocalMemory;
use crate::{collect, context, dispatchers, memory, signals, slots, thread, threads, tramps};

const FAULT_SIGNALS: [c_int; 4] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL];

static INSTALL: Once = Once::new();

/// Install the fault handlers (once per process).
pub(crate) fn install() {
    INSTALL.call_once(|| {
        for s in FAULT_SIGNALS {
            // SIGSEGV and SIGBUS on the alternate stack, like Rust's own SIGSEGV
            // handler, so a stack overflow still reaches the program's handler. SIGFPE
            // and SIGILL never report an overflow; SIGFPE also carries the promotion's
            // thread check, which parks the thread in the handler: the thread's own
            // stack, not a small alternate one, holds that.
            let on_stack = matches!(s, libc::SIGSEGV | libc::SIGBUS);
            signals::install(s, on_fault, on_stack).expect("installing a fault handler");
        }
    });
}

impl LocalMemory {
    /// Guarded memory of this process. Installs the backend's fault handlers if they are
    /// not yet installed.
    pub fn new() -> Self {
        install();
        LocalMemory::installed()
    }
}

impl Default for LocalMemory {
    fn default() -> Self {
        Self::new()
    }
}

/// The fault handler's entry (reserved against probing).
pub(crate) fn handler_entry() -> u64 {
    on_fault as *const () as u64
}

extern "C" fn on_fault(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    let _errno = signals::ErrnoGuard::save();
    // SAFETY: the kernel passes valid pointers to an SA_SIGINFO handler.
    let (si, uc) = unsafe { (&mut *info, &mut *ctx.cast::<ucontext_t>()) };
    let rip = context::rip(uc);
    // A promotion's thread check first: it may interrupt anything, the guarded copy
    // included, and is no fault of it.
    if sig == threads::SIGNAL && threads::on_check(si, uc) {
        return; // parked and released
    }
    // Only a fault the kernel raised (positive si_code) is the guarded copy's.
    if let Some(fix) = memory::fixup_for(rip).filter(|_| si.si_code > 0) {
        context::set_rip(uc, fix);
        return;
    }
    if let Some(t) = tramps::lookup(rip) {
        let mut regs = context::load(uc);
        if let Some(first) = t.map().fixup(&mut regs) {
            // SAFETY: our handler's own arguments.
            unsafe { fault_in_copy(sig, si, info, ctx, t, regs, first) };
            return;
        }
    }
    if let Some(b) = slots::lookup(rip) {
        if let Some(slot) = b.slot_at(rip) {
            let mut regs = context::load(uc);
            if slot.fixup_ip(&mut regs) {
                let fault = Fault {
                    signal: sig,
                    code: si.si_code,
                    // SAFETY: `si_addr` is valid to read for every fault signal.
                    addr: unsafe { si.si_addr() } as u64,
                };
                let mem = LocalMemory::installed();
                let tid = thread::tid();
                let handled = thread::with_state(|ts| {
                    dispatchers::each().any(|d| {
                        d.fault(ts, b.addr, tid, &mut regs, &mem, &fault) == FaultAction::Handled
                    })
                });
                context::store(uc, &regs);
                collect::ring_if_pending();
                if handled {
                    return;
                }
                if matches!(sig, libc::SIGILL | libc::SIGFPE) {
                    // These report the faulting instruction's address.
                    set_si_addr(si, b.addr);
                }
                // SAFETY: our handler's own arguments, with the registers moved back.
                unsafe { signals::deliver(sig, info, ctx) };
                return;
            }
        }
    }
    // SAFETY: our handler's own arguments.
    let _ = unsafe { signals::chain(sig, info, ctx) };
}

/// A fault in a trampoline's relocated copy, `regs` moved back to the original
/// instruction: the fault handlers for the probed instruction itself (`first`), then,
/// unless handled, the program gets the signal as if unprobed. If the program's handler
/// returns to an instruction inside the region (its bytes are the jump now), the thread
/// goes on from the relocated copy of it instead.
///
/// # Safety
/// `info` and `ctx` are our handler's arguments, `si` and `uc`'s owners.
unsafe fn fault_in_copy(
    sig: c_int,
    si: &mut siginfo_t,
    info: *mut siginfo_t,
    ctx: *mut c_void,
    t: &crate::tramps::TrampInfo,
    mut regs: multiprobe_core::Regs,
    first: bool,
) {
    // SAFETY: `ctx` is our handler's ucontext (caller contract).
    let uc = unsafe { &mut *ctx.cast::<ucontext_t>() };
    let fault = Fault {
        signal: sig,
        code: si.si_code,
        // SAFETY: `si_addr` is valid to read for every fault signal.
        addr: unsafe { si.si_addr() } as u64,
    };
    let handled = first && {
        let mem = LocalMemory::installed();
        let tid = thread::tid();
        thread::with_state(|ts| {
            dispatchers::each()
                .any(|d| d.fault(ts, t.addr, tid, &mut regs, &mem, &fault) == FaultAction::Handled)
        })
    };
    context::store(uc, &regs);
    collect::ring_if_pending();
    if !handled {
        if matches!(sig, libc::SIGILL | libc::SIGFPE) {
            set_si_addr(si, regs.rip);
        }
        // SAFETY: our handler's own arguments, with the registers moved back.
        unsafe { signals::deliver(sig, info, ctx) };
    }
    let back = context::rip(uc);
    let to = t.map().resume_target(back);
    if to != back {
        context::set_rip(uc, to);
    }
}

/// Overwrite `si_addr` (the first field of the fault union, right after the header).
fn set_si_addr(si: &mut siginfo_t, addr: u64) {
    // SAFETY: for fault signals `si_addr` is a pointer-sized field at the start of the
    // union that follows the three `int`s of the header (offset 16 on x86-64), inside
    // the 128-byte siginfo.
    unsafe {
        let p = (si as *mut siginfo_t).cast::<u8>().add(16).cast::<u64>();
        p.write_unaligned(addr);
    }
}
