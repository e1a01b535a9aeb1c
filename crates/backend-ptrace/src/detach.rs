//! Detaching: leave the process running as if it had never been probed.
//!
//! Order matters:
//! 1. Stop every thread (`PTRACE_INTERRUPT`), handling what arrives meanwhile without
//!    running handlers: a thread that trapped on one of our breakpoints is rewound to
//!    the breakpoint's address (it will execute the restored instruction), one at a
//!    slot's trailing `int3` is moved to where the original code continues, a signal
//!    is kept to be delivered at detach, new threads and vfork children are stopped
//!    too, fork children are freed as usual. A thread whose interrupt stop came right
//!    after it executed an `int3` (its SIGTRAP still pending) is let report the SIGTRAP
//!    first, to be undone like any other trap.
//! 2. Move every thread that is inside a slot to the equivalent original address
//!    ([`multiprobe_x86::Slot::fixup_ip`], single-stepping to the next boundary when
//!    it is in the middle of the slot's code) and end its deferred steps. A thread that
//!    a signal handler took out of a slot will return into it: its slot is made to work
//!    without the tracer, and the XOL pages stay mapped.
//! 3. Restore every original byte; unmap the XOL pages with an injected `munmap`
//!    (unless step 2 keeps them).
//! 4. `PTRACE_DETACH` every thread with its pending signal; the kernel puts threads
//!    of a group-stopped process back into group-stop.
//!
//! Steps 3 and 4 are attempted even when an earlier step failed, so a tracer error
//! (or a panic unwinding through the tracer's drop) leaves no breakpoint behind.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use multiprobe_core::{Error, Result};
use multiprobe_x86::SlotKind;

use crate::backend::{Status, INT3};
use crate::inject;
use crate::regs::{self, from_core, to_core};
use crate::sys::{self, Errno, Tid, Wait};
use crate::tracer::{FilterGone, Stop, Thread, Tracer};
use crate::xol::PAGE;

const PTRACE_EVENT_STOP: i32 = 128;
use crate::tracer::RIP;

impl Tracer {
    /// Detach now: remove every breakpoint and let the process run on untraced.
    /// Handlers are not run again. Errors are reported after everything possible was
    /// done; a process that is already gone is not an error.
    pub fn detach(mut self) -> Result<()> {
        self.detach_now()
    }

    pub(crate) fn detach_now(&mut self) -> Result<()> {
        if self.shared.lock().status != Status::Attached {
            return Ok(());
        }
        let stopped = self.stop_all(true);
        if self.exit.is_some() {
            return Ok(());
        }
        let moved = self.move_out_of_slots();
        let keep_pages = *moved.as_ref().unwrap_or(&true);
        let restored = self.restore_code();
        if !keep_pages {
            self.unmap_xol();
        }
        {
            let mut st = self.shared.lock();
            st.status = Status::Detached;
            st.code = None;
            st.armed.clear();
            st.xol.clear();
        }
        let pid = self.pid();
        for (tid, th) in self.threads.drain() {
            th.ts.abandon();
            let _ = sys::detach(tid, th.held.unwrap_or(0));
        }
        // Signals that could not ride on a signal-delivery-stop: sent again.
        for (tid, sig) in std::mem::take(&mut self.resend) {
            let _ = sys::tgkill(pid, tid, sig);
        }
        for (child, _) in std::mem::take(&mut self.orphans) {
            self.free_child(child);
        }
        self.detach_flag.store(false, Ordering::SeqCst);
        stopped.and(moved.map(drop)).and(restored)
    }

    /// Stop every thread and keep it stopped until the next run; returns the stop that
    /// came first if the process ended meanwhile. Handlers are not run while stopping:
    /// a thread that trapped on a breakpoint (or a slot's trailing `int3`) is put back on
    /// it, to trap again — and be served — when resumed.
    pub fn pause(&mut self) -> Result<Option<Stop>> {
        if let Some(status) = self.exit {
            return Ok(Some(Stop::Exited(status)));
        }
        self.stop_all(false)?;
        Ok(self.exit.map(Stop::Exited))
    }

    /// Interrupt every running thread and wait until all are held. `detaching`: traps
    /// are undone for good (see `rewind_trap`).
    fn stop_all(&mut self, detaching: bool) -> Result<()> {
        let running: Vec<Tid> = self
            .threads
            .iter()
            .filter(|(_, t)| t.held.is_none())
            .map(|(&t, _)| t)
            .collect();
        for tid in running {
            if sys::interrupt(tid) == Err(Errno::ESRCH) {
                // Exiting: its report comes below.
            }
        }
        while self.threads.values().any(|t| t.held.is_none()) {
            let w = match self.aside.waits.pop_front() {
                Some(w) => w,
                None => match sys::wait(-1, false) {
                    Ok(Some(w)) => w,
                    Ok(None) => continue,
                    Err(Errno::ECHILD) => {
                        self.gone(crate::ExitStatus::Signal(0));
                        return Ok(());
                    }
                    Err(e) => return Err(crate::error::sys(e, "wait while detaching")),
                },
            };
            self.hold(w, detaching)?;
            if self.exit.is_some() {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Take one report while stopping: never run handlers, just hold the thread.
    fn hold(&mut self, w: Wait, detaching: bool) -> Result<()> {
        let (tid, sig, event) = match w {
            Wait::Stopped { tid, sig, event } => (tid, sig, event),
            // Exits go through the normal path (which also notices the process's end).
            _ => {
                self.handle(w)?;
                return Ok(());
            }
        };
        if let Some(bell) = &self.doorbell {
            if bell.pid == tid {
                bell.rearm();
                return Ok(());
            }
        }
        if !self.threads.contains_key(&tid) && !self.adopt(tid, w)? {
            return Ok(());
        }
        let mut deliver = 0;
        let mut group = false;
        match event {
            0 if sig == libc::SIGTRAP && !self.rewind_trap(tid, detaching) => {
                deliver = libc::SIGTRAP
            }
            0 if sig == libc::SIGTRAP => {}
            0 if sig == libc::SIGTRAP | 0x80 => {}
            0 => deliver = sig,
            PTRACE_EVENT_STOP => {
                group = is_stop(sig);
                if detaching && !group && sigtrap_pending(self.pid(), tid) {
                    // It executed an `int3` (ours, most likely) just before the
                    // interrupt stopped it: the interrupt is reported before the signal
                    // is, and once detached the pending SIGTRAP would kill the program.
                    // Let it report the signal (it runs no instruction before that);
                    // that stop is handled as any trap while stopping.
                    return sys::cont(tid, 0)
                        .filter_gone()
                        .map_err(|e| crate::error::sys(e, "let a pending trap be reported"));
                }
            }
            libc::PTRACE_EVENT_CLONE => {
                if let Ok(new) = sys::event_msg(tid) {
                    let new = new as Tid;
                    self.threads.entry(new).or_insert_with(|| Thread::new(None));
                }
            }
            libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK => {
                if let Ok(child) = sys::event_msg(tid) {
                    let vfork = event == libc::PTRACE_EVENT_VFORK;
                    self.new_child(child as Tid, vfork)?;
                    if vfork {
                        // It was resumed by new_child; stop it again to detach it.
                        let _ = sys::interrupt(child as Tid);
                    }
                }
            }
            libc::PTRACE_EVENT_EXEC => {
                // The main process's new image is held by the exec handling (nothing of
                // ours is in it); an exec'ing vfork child is let go.
                self.handle(w)?;
                return Ok(());
            }
            _ => {}
        }
        if let Some(th) = self.threads.get_mut(&tid) {
            th.held = Some(deliver);
            th.group_stop = group;
        }
        Ok(())
    }

    /// A thread stopped with SIGTRAP while stopping: if it is one of our traps, undo it
    /// and return true. Detaching, the thread is put where it would be without the
    /// probe (a hit counted as missed; a post-handler not run). Otherwise it is put back
    /// on the `int3`, to trap again — and be served — when resumed.
    fn rewind_trap(&mut self, tid: Tid, detaching: bool) -> bool {
        let Ok(ur) = sys::get_regs(tid) else {
            return true;
        };
        let th = self.threads.get_mut(&tid).expect("adopted");
        if let Some(top) = th.slots.last() {
            let trap = top.slots().trap_after.filter(|s| s.contains(ur.rip - 1));
            let mut regs = to_core(&ur);
            if top.kind == SlotKind::TrapAfter
                && trap.is_some_and(|t| t.fixup_trap(ur.rip, &mut regs))
            {
                if detaching {
                    // The post-handlers are not run any more (the step is abandoned).
                    if let Some(info) = th.slots.pop().and_then(|t| t.deferred) {
                        self.resend.push((tid, info.signo()));
                    }
                    let _ = sys::set_regs(tid, &from_core(&ur, &regs));
                } else {
                    let _ = sys::poke_user(tid, RIP, ur.rip - 1);
                }
                return true;
            }
        }
        th.prune(ur.rip);
        let addr = ur.rip.wrapping_sub(1);
        let st = self.shared.lock();
        let ours = st.armed.contains_key(&addr) || st.history.contains_key(&addr);
        drop(st);
        let kernel = sys::sig_info(tid).is_ok_and(|s| s.code == sys::SI_KERNEL);
        if ours && kernel {
            if detaching {
                // A hit that comes too late to be served: counted as missed.
                if let Some(th) = self.threads.get(&tid) {
                    self.dispatcher.miss(&th.ts, addr);
                }
            }
            let _ = sys::poke_user(tid, RIP, addr);
            return true;
        }
        false
    }

    /// Step 2: no thread may stay inside a slot. Returns whether the XOL pages must stay
    /// mapped: a thread interrupted inside a slot by a signal whose handler is still
    /// running will return into it. Such a trap-after slot is rewritten as a jump-back
    /// one at the same address (same relocated instruction, then a jump instead of the
    /// `int3` nobody would handle).
    fn move_out_of_slots(&mut self) -> Result<bool> {
        let mut result = Ok(());
        let mut keep_pages = false;
        let tids: Vec<Tid> = self.threads.keys().copied().collect();
        for tid in tids {
            let Ok(ur) = sys::get_regs(tid) else {
                continue;
            };
            let th = self.threads.get_mut(&tid).expect("listed");
            th.ts.abandon();
            th.prune(ur.rip);
            let inside = th
                .slots
                .last()
                .filter(|t| !t.suspended && t.slots().contains(ur.rip))
                .map(|t| Arc::clone(&t.site));
            if let Some(site) = inside {
                if let Some(info) = th.slots.pop().and_then(|t| t.deferred) {
                    self.resend.push((tid, info.signo()));
                }
                if let Err(e) = self.step_out(tid, &site) {
                    result = result.and(Err(e));
                }
            }
            let th = self.threads.get_mut(&tid).expect("listed");
            for s in std::mem::take(&mut th.slots) {
                keep_pages = true;
                if let Some(info) = s.deferred {
                    self.resend.push((tid, info.signo()));
                }
                if s.kind == SlotKind::TrapAfter {
                    let st = self.shared.lock();
                    let trap = s.slots().trap_after.expect("entered");
                    let plan = &s.site.plan;
                    if let (Ok(code), Ok(jump)) = (
                        st.usable(),
                        plan.build_slot(SlotKind::JumpBack, trap.addr()),
                    ) {
                        let _ = code.write(jump.addr(), jump.bytes());
                    }
                }
            }
        }
        result.map(|()| keep_pages)
    }

    /// Move `tid`, stopped inside a slot of `site`, to the equivalent original place.
    fn step_out(&mut self, tid: Tid, site: &Arc<crate::backend::SiteInner>) -> Result<()> {
        let slots = site.slots.get().expect("entered");
        for _ in 0..16 {
            let Ok(ur) = sys::get_regs(tid) else {
                return Ok(());
            };
            let Some(slot) = slots.slot_of(ur.rip) else {
                return Ok(()); // out already
            };
            let mut regs = to_core(&ur);
            if slot.fixup_ip(&mut regs) {
                let _ = sys::set_regs(tid, &from_core(&ur, &regs));
                return Ok(());
            }
            // Between two of the slot's instructions: one step further.
            if sys::single_step(tid, 0).is_err() {
                break;
            }
            match sys::wait(tid, false) {
                Ok(Some(Wait::Stopped { sig, event: 0, .. })) if sig != libc::SIGTRAP => {
                    if let Some(th) = self.threads.get_mut(&tid) {
                        th.held = Some(sig);
                    }
                }
                Ok(Some(Wait::Stopped { .. })) => {}
                Ok(Some(w)) => {
                    self.aside.waits.push_back(w);
                    return Ok(());
                }
                _ => break,
            }
        }
        match sys::get_regs(tid) {
            Ok(ur) if slots.contains(ur.rip) => Err(Error::Backend(format!(
                "thread {tid} could not be moved out of an out-of-line slot at {:#x}",
                ur.rip
            ))),
            _ => Ok(()),
        }
    }

    /// Step 3a: every original byte back.
    fn restore_code(&mut self) -> Result<()> {
        let st = self.shared.lock();
        let Ok(code) = st.usable() else {
            return Ok(());
        };
        // A breakpoint whose code was unloaded (or replaced) went with it.
        let maps = crate::error::maps(self.pid())?;
        let mut result = Ok(());
        for (&addr, armed) in &st.armed {
            let mut now = [0u8];
            if !armed.still_mapped(&maps, addr)
                || (code.read(addr, &mut now).is_ok() && now[0] != INT3)
            {
                continue;
            }
            if let Err(e) = code.write(addr, &[armed.orig]) {
                result = result.and(Err(e));
            }
        }
        result
    }

    /// Step 3b: take the XOL pages away (best effort: a page left behind is only an
    /// unused mapping).
    fn unmap_xol(&mut self) {
        let pages = self.shared.lock().xol.pages();
        let Some(&gadget) = pages.first() else {
            return;
        };
        // Prefer a thread that is not inside an interrupted system call.
        let mut best = None;
        for (&tid, th) in &self.threads {
            if th.held.is_none() {
                continue;
            }
            if let Ok(r) = sys::get_regs(tid) {
                let clean = !regs::in_restartable_syscall(&r);
                if best.is_none() || clean {
                    best = Some((tid, r));
                }
                if clean {
                    break;
                }
            }
        }
        let Some((tid, saved)) = best else {
            return;
        };
        for &page in pages.iter().rev() {
            let args = [page, PAGE, 0, 0, 0, 0];
            if inject::syscall(tid, &saved, gadget, libc::SYS_munmap, args, &mut self.aside)
                .is_err()
            {
                break;
            }
        }
        // A signal that arrived during the injection is sent again after the detach (the
        // thread now sits in a system-call stop, which cannot deliver one).
        let (mine, others): (Vec<_>, Vec<_>) =
            self.aside.signals.drain(..).partition(|&(t, _)| t == tid);
        self.aside.signals = others;
        self.resend.extend(mine);
    }
}

/// Whether thread `tid` of `pid` has a SIGTRAP pending that it does not block (read
/// from `/proc`; false if that cannot be read).
fn sigtrap_pending(pid: Tid, tid: Tid) -> bool {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/status")) else {
        return false;
    };
    let mask = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
            .unwrap_or(0)
    };
    let bit = 1u64 << (libc::SIGTRAP - 1);
    mask("SigPnd:") & bit != 0 && mask("SigBlk:") & bit == 0
}

fn is_stop(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // Never leave the process stopped or with a breakpoint in it.
        let _ = self.detach_now();
        self.doorbell = None;
    }
}
