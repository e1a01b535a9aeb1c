//! The tracee's own signals, and the ones that meet a thread inside an out-of-line slot:
//! a fault of the displaced instruction (delivered as if unprobed, at the probed
//! address, after the fault handlers), or an asynchronous signal (held back until the
//! instruction ran when the thread was just entering the slot; otherwise delivered
//! there, the thread returning into the slot).

use multiprobe_core::{Fault, FaultAction, Result};
use multiprobe_x86::{Class, RelocatedKind, SlotKind};

use crate::error;
use crate::regs::{from_core, to_core};
use crate::sys::{self, Tid, UserRegs};
use crate::tracer::{FilterGone, InSlot, Tracer, RIP};

impl Tracer {
    pub(crate) fn on_signal(&mut self, tid: Tid, sig: i32) -> Result<()> {
        let th = self.threads.get_mut(&tid).expect("adopted");
        if th.slots.is_empty() {
            return self.resume(tid, sig);
        }
        let Ok(ur) = sys::get_regs(tid) else {
            return Ok(()); // gone; its exit will be reported
        };
        th.prune(ur.rip);
        let Some(top) = th.slots.last_mut().filter(|t| t.slots().contains(ur.rip)) else {
            return self.resume(tid, sig);
        };
        let si = sys::sig_info(tid).ok();
        let fault = matches!(
            sig,
            libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE
        ) && si.is_some_and(|s| s.code > 0);
        if fault {
            let top = th.slots.pop().expect("just seen");
            return self.fault_in_slot(tid, &top, ur, sig, si.expect("checked"));
        }
        // An asynchronous signal caught the thread inside the slot.
        let slot = *top.slots().slot_of(ur.rip).expect("contained");
        let plan = &top.site.plan;
        // At its start, nothing ran yet: let the instruction run in the trap-after
        // slot first and deliver the signal, exactly as it came, at its trailing `int3`
        // with `rip` back in the original code — so the program's handler never sees a
        // slot address. Not for a `syscall`, which may block: the signal must be able
        // to interrupt it.
        let deferrable = ur.rip == slot.addr()
            && top.deferred.is_none()
            && plan.has_trap_after_slot()
            && plan.class() != Class::Relocated(RelocatedKind::Syscall);
        if deferrable {
            if let (Ok(info), Some(trap)) = (sys::sig_info_raw(tid), top.slots().trap_after) {
                let e = |e| error::sys(e, format_args!("defer a signal of thread {tid}"));
                if slot.kind() == SlotKind::JumpBack {
                    sys::poke_user(tid, RIP, trap.addr())
                        .filter_gone()
                        .map_err(e)?;
                    top.kind = SlotKind::TrapAfter;
                }
                top.deferred = Some(info);
                return sys::cont(tid, 0).filter_gone().map_err(e);
            }
        }
        // Past the relocated instruction of a jump-back slot, move the thread to the
        // equivalent original place. Otherwise leave it there (past the instruction of
        // a trap-after slot, the post-handlers are still to come): the signal handler
        // returns into the slot.
        let mut regs = to_core(&ur);
        if ur.rip != slot.addr() && slot.kind() == SlotKind::JumpBack && slot.fixup_ip(&mut regs) {
            th.slots.pop();
            sys::set_regs(tid, &from_core(&ur, &regs))
                .filter_gone()
                .map_err(|e| error::sys(e, "set registers"))?;
        } else {
            top.suspended = true;
        }
        self.resume(tid, sig)
    }

    /// The displaced instruction faulted in its slot: the fault handlers run with
    /// `rip` at the probed address, and unless one handles it the signal is delivered
    /// there, as if the program had never been probed.
    fn fault_in_slot(
        &mut self,
        tid: Tid,
        top: &InSlot,
        ur: UserRegs,
        sig: i32,
        si: sys::SigInfo,
    ) -> Result<()> {
        let mut regs = to_core(&ur);
        if let Some(slot) = top.slots().slot_of(ur.rip) {
            slot.fixup_ip(&mut regs);
        }
        let fault = Fault {
            signal: sig,
            code: si.code,
            addr: si.addr,
        };
        let th = self.threads.get_mut(&tid).expect("known");
        let action = self.dispatcher.fault(
            &th.ts,
            top.site.addr,
            tid as u32,
            &mut regs,
            &self.mem,
            &fault,
        );
        sys::set_regs(tid, &from_core(&ur, &regs))
            .filter_gone()
            .map_err(|e| error::sys(e, "set registers"))?;
        match action {
            FaultAction::NotHandled => self.resume(tid, sig),
            FaultAction::Handled => self.resume(tid, 0),
        }
    }
}
