//! The tracee's own signals, and the ones that meet a thread inside an out-of-line slot:
//! a fault of the displaced instruction (delivered as if unprobed, at the probed
//! address, after the fault handlers), an asynchronous signal (held back until the
//! instruction ran when the thread was just entering the slot; otherwise delivered
//! there, the thread returning into the slot), or a fault because the program unmapped
//! our page (never delivered: the page is mapped again at the same address with the
//! same bytes, or, if that cannot be, the thread is moved back to the original code and
//! the page's sites step in place from then on).

use multiprobe_core::{Fault, FaultAction, Result};
use multiprobe_x86::{Class, RelocatedKind, SlotKind};

use crate::error;
use crate::regs::{from_core, to_core};
use crate::sys::{self, SigInfo, Signal, Tid, UserOffset, UserRegs};
use crate::thread::{gone_is_ok, InSlot};
use crate::tracer::Tracer;

impl Tracer {
    pub(crate) fn on_signal(&mut self, tid: Tid, sig: Signal) -> Result<()> {
        if matches!(sig, Signal::SEGV | Signal::BUS) && self.action_fault(tid) {
            // A collecting action's access to a bad pointer: resumed past it, counted
            // faulted by the trampoline; the program never sees it.
            return self.resume(tid, None);
        }
        let th = self.threads.known(tid);
        if th.slots.is_empty() {
            return self.resume(tid, Some(sig));
        }
        let Ok(ur) = sys::get_regs(tid) else {
            return Ok(()); // gone; its exit will be reported
        };
        th.prune(ur.rip);
        let Some(top) = th.slots.last_mut().filter(|t| t.slots().contains(ur.rip)) else {
            return self.resume(tid, Some(sig));
        };
        let si = sys::sig_info(tid).ok();
        let fault = sig.is_fault() && si.is_some_and(|s| s.code > 0);
        if fault {
            let si = si.expect("checked");
            let top = th.slots.pop().expect("just seen");
            if sig == Signal::SEGV && si.addr == ur.rip && self.page_unmapped(ur.rip) {
                return self.page_gone(tid, top, ur);
            }
            return self.fault_in_slot(tid, &top, ur, sig, si);
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
                let e = |e| error::sys(e, "defer a signal");
                if slot.kind() == SlotKind::JumpBack {
                    gone_is_ok(sys::poke_user(tid, UserOffset::RIP, trap.addr())).map_err(e)?;
                    top.kind = SlotKind::TrapAfter;
                }
                top.deferred = Some(info);
                return self.resume(tid, None);
            }
        }
        // Past the relocated instruction of a jump-back slot, move the thread to the
        // equivalent original place. Otherwise leave it there (past the instruction of
        // a trap-after slot, the post-handlers are still to come): the signal handler
        // returns into the slot.
        let mut regs = to_core(&ur);
        if ur.rip != slot.addr() && slot.kind() == SlotKind::JumpBack && slot.fixup_ip(&mut regs) {
            th.slots.pop();
            gone_is_ok(sys::set_regs(tid, &from_core(&ur, &regs)))
                .map_err(|e| error::sys(e, "set registers"))?;
        } else {
            top.suspended = true;
        }
        self.resume(tid, Some(sig))
    }

    /// The displaced instruction faulted in its slot: the fault handlers run with
    /// `rip` at the probed address, and unless one handles it the signal is delivered
    /// there, as if the program had never been probed.
    fn fault_in_slot(
        &mut self,
        tid: Tid,
        top: &InSlot,
        ur: UserRegs,
        sig: Signal,
        si: SigInfo,
    ) -> Result<()> {
        let mut regs = to_core(&ur);
        if let Some(slot) = top.slots().slot_of(ur.rip) {
            slot.fixup_ip(&mut regs);
        }
        let fault = Fault {
            signal: sig.as_raw(),
            code: si.code,
            addr: si.addr,
        };
        let th = self.threads.known(tid);
        let action = self.dispatcher.fault(
            &th.ts,
            top.site.addr,
            tid.as_raw_pid() as u32,
            &mut regs,
            &self.mem,
            &fault,
        );
        gone_is_ok(sys::set_regs(tid, &from_core(&ur, &regs)))
            .map_err(|e| error::sys(e, "set registers"))?;
        match action {
            FaultAction::NotHandled => self.resume(tid, Some(sig)),
            FaultAction::Handled => self.resume(tid, None),
        }
    }

    /// Whether `addr`, in one of our XOL pages, is no longer mapped (the program
    /// unmapped the page, or mapped something else over it).
    fn page_unmapped(&self, addr: u64) -> bool {
        if !self.shared.lock().xol.contains(addr) {
            return false;
        }
        match error::maps(self.pid()) {
            Ok(maps) => maps
                .find(addr)
                .is_none_or(|r| !r.exec || r.inode != 0 || !r.path.is_empty()),
            Err(_) => false,
        }
    }

    /// The thread `tid` was sent into a slot of a page the program has since unmapped,
    /// and faulted fetching it. The fault is ours: the program never sees it. Map the
    /// page again where it was, with what it held, and let the thread go on there; if
    /// that cannot be, mark the page dead and finish the instruction in place.
    fn page_gone(&mut self, tid: Tid, top: InSlot, ur: UserRegs) -> Result<()> {
        let Some((base, bytes)) = self.shared.lock().xol.page_holding(ur.rip) else {
            return self.resume(tid, Some(Signal::SEGV));
        };
        let again = self.map_page(tid, &ur, base).and_then(|_| {
            let st = self.shared.lock();
            st.usable()?.write(base, &bytes)
        });
        if again.is_ok() {
            self.threads.known(tid).slots.push(top);
            return self.resume(tid, None);
        }
        self.shared.lock().xol.mark_dead(base);
        let slot = *top.slots().slot_of(ur.rip).expect("inside");
        let mut regs = to_core(&ur);
        if !slot.fixup_ip(&mut regs) {
            // Not at an instruction boundary of the slot: nothing sound to do but what
            // the program would have seen had the code been its own.
            return self.resume(tid, Some(Signal::SEGV));
        }
        gone_is_ok(sys::set_regs(tid, &from_core(&ur, &regs)))
            .map_err(|e| error::sys(e, "set registers"))?;
        if regs.rip == top.site.addr {
            // The instruction did not run: run it where it is, without a second hit.
            let post = top.kind == SlotKind::TrapAfter;
            return self.step_over_original(tid, &top.site, post);
        }
        if top.kind == SlotKind::TrapAfter {
            let th = self.threads.known(tid);
            let addr = top.site.addr;
            self.dispatcher
                .post(&th.ts, addr, tid.as_raw_pid() as u32, &mut regs, &self.mem);
            gone_is_ok(sys::set_regs(tid, &from_core(&ur, &regs)))
                .map_err(|e| error::sys(e, "set registers"))?;
        }
        self.resume(tid, None)
    }
}
