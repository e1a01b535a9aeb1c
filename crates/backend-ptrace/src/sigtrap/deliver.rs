//! The program's own SIGTRAP, delivered into its handler.
//!
//! A handler runs with SIGTRAP blocked unless it was installed with `SA_NODEFER`, so a
//! hit inside it (the handler calls a probed function) is a hit of a thread that blocks
//! SIGTRAP, which resets the handler. The tracer therefore delivers the program's own
//! SIGTRAP, in a process that catches it, with `PTRACE_SINGLESTEP`: once the kernel has
//! set up the handler's frame it reports a stop before the handler's first instruction
//! (`signal_delivered`), where the thread's mask is the handler's and the action is what
//! the delivery left (already reset if `SA_RESETHAND`). Both are read there — the whole
//! action with an injected `rt_sigaction` (a program's own SIGTRAP is rare; this keeps
//! the guard's copy up to date), the mask with `PTRACE_GETSIGMASK`. A thread that then
//! blocks SIGTRAP is *in its handler* for the guard until one of its hits shows the
//! handler survived it (see `Tracer::restore_trap`).

use multiprobe_core::Result;

use super::reading::{Disposition, Reading, TRAP_BIT};
use crate::sys::{self, Signal, Tid, SI_KERNEL};
use crate::thread::Kind;
use crate::tracer::Tracer;

impl Tracer {
    /// Deliver the SIGTRAP thread `tid` is stopped for, which is the program's own.
    pub(crate) fn deliver_own_trap(&mut self, tid: Tid) -> Result<()> {
        // (`None` for a vfork child: not a task of the process.)
        if let Some(r) = Reading::of(self.shared.pid, tid) {
            if r.disposition != Disposition::Default {
                self.trap.learned(r.disposition);
            }
        }
        let thread = self
            .threads
            .get(tid)
            .is_some_and(|t| t.kind() == Kind::Thread);
        if !thread
            || self.trap.disposition != Disposition::Caught
            || self.trap.blocked.contains(&tid)
        {
            // A vfork child is another process, with its own copy of the actions.
            return self.resume(tid, Some(Signal::TRAP));
        }
        let Some(_at_entry) = self.step_once(tid, Some(Signal::TRAP))? else {
            return self.resume(tid, None); // gone, or it would not step
        };
        if self.aside.has_end_of(tid) {
            return Ok(());
        }
        if sys::sig_info(tid).is_ok_and(|s| s.code == SI_KERNEL) {
            // No handler ran after all (the program changed its action meanwhile) and
            // the one instruction stepped was an `int3`: a trap like any other.
            return self.on_trap(tid);
        }
        self.read_action(tid);
        if sys::get_sigmask(tid).is_ok_and(|m| m & TRAP_BIT != 0) {
            self.trap.in_handler.insert(tid);
        }
        self.resume(tid, None)
    }
}
