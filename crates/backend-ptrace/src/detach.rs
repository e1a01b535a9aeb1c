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
//!    first, to be undone like any other trap — when pausing too, since the pause may
//!    be the one that writes a jump over that `int3`.
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

use std::sync::Arc;
use std::time::{Duration, Instant};

use multiprobe_core::{Error, Result};
use multiprobe_x86::SlotKind;

use crate::backend::{Status, INT3};
use crate::error;
use crate::inject;
use crate::regs::{self, from_core, to_core};
use crate::sys::{self, Errno, Event, Signal, Tid, UserOffset, Wait, SI_KERNEL};
use crate::tracer::{ExitStatus, Stop, Tracer};
use crate::xol::PAGE;

/// How long stopping every thread may take before the threads that have not reported
/// are checked (are they still there, still ours?), and before giving up.
const CHECK_AFTER: Duration = Duration::from_secs(2);
const GIVE_UP_AFTER: Duration = Duration::from_secs(20);

impl Tracer {
    /// Detach now: remove every breakpoint and let the process run on untraced.
    /// Handlers are not run again. Errors are reported after everything possible was
    /// done; a process that is already gone is not an error.
    pub fn detach(mut self) -> Result<()> {
        self.detach_now()
    }

    pub(crate) fn detach_now(&mut self) -> Result<()> {
        let attached = self.shared.lock().status == Status::Attached;
        if !attached && self.family.members.is_empty() {
            return Ok(());
        }
        // Children forked while the family is being stopped are freed, not followed.
        self.follow_forks(false);
        let mut result = self.stop_all(true);
        while !self.family.members.is_empty() {
            let r = self.with_follower(0, Tracer::detach_stopped);
            result = result.and(r);
            self.family.members.remove(0);
        }
        if attached && !self.is_gone() {
            result = result.and(self.detach_stopped());
        }
        for child in self.children.take_all() {
            self.free_child(child, None);
        }
        self.bell.clear();
        result
    }

    /// Steps 2 to 4 for this process, every thread of which is held (step 1).
    fn detach_stopped(&mut self) -> Result<()> {
        if self.shared.lock().status != Status::Attached || self.is_gone() {
            return Ok(());
        }
        self.restore_returns_at_detach();
        // Jumps out, threads out of the trampolines, and what the tracee wrote read.
        self.unjump_all();
        self.restore_shadow_returns();
        self.final_drain();
        let moved = self.move_out_of_slots();
        let keep_pages = *moved.as_ref().unwrap_or(&true);
        let restored = self.restore_code();
        self.lower_semaphores();
        self.trap.restore_at_detach(&self.threads);
        // One thread makes every call of the detach: after an injected call it sits in
        // a system-call stop, which `held_thread` does not take (the only thread of a
        // single-threaded program would be refused for the second).
        let injector = self.held_thread();
        self.drop_area(injector.as_ref());
        if !keep_pages {
            self.unmap_xol(injector.as_ref());
        }
        {
            let mut st = self.shared.lock();
            st.status = Status::Detached;
            st.code = None;
            st.armed.clear();
            st.xol.clear();
            st.semaphores.clear();
        }
        self.shared.quiet.end();
        let pid = self.shared.pid;
        let mut detached = Ok(());
        for (tid, th) in self.threads.take_all() {
            if th.is_held() {
                if let Err(e) = th.detach(tid) {
                    detached = detached.and(Err(error::sys(e, "detach a thread")));
                }
            }
        }
        // Signals that could not ride on a signal-delivery-stop: sent again.
        for (tid, sig) in std::mem::take(&mut self.resend) {
            let _ = sys::tgkill(pid, tid, sig);
        }
        moved.map(drop).and(restored).and(detached)
    }

    /// Stop every thread and keep it stopped until the next run; returns the stop that
    /// came first if the process ended meanwhile. Handlers are not run while stopping:
    /// a thread that trapped on a breakpoint (or a slot's trailing `int3`) is put back on
    /// it, to trap again — and be served — when resumed.
    pub fn pause(&mut self) -> Result<Option<Stop>> {
        if let (Some(status), true) = (self.exit_status(), self.family.members.is_empty()) {
            return Ok(Some(Stop::Exited(status)));
        }
        self.stop_all(false)?;
        Ok(self
            .exit_status()
            .filter(|_| self.family.members.is_empty())
            .map(Stop::Exited))
    }

    /// Interrupt every running thread and wait until all are held. `detaching`: traps
    /// are undone for good (see `rewind_trap`).
    ///
    /// Bounded: a thread that cannot be interrupted is checked at once (gone, or no
    /// longer ours: forgotten; anything else is an error); threads that have not
    /// reported after [`CHECK_AFTER`] are checked the same way, and after
    /// [`GIVE_UP_AFTER`] the ones still missing are an error (they stay traced and
    /// running; the rest is detached as usual).
    fn stop_all(&mut self, detaching: bool) -> Result<()> {
        let mut result = self.interrupt_running();
        for i in 0..self.family.members.len() {
            let r = self.with_follower(i, Tracer::interrupt_running);
            result = result.and(r);
        }
        let start = Instant::now();
        let mut checked = false;
        while !self.family_held() {
            let w = match self.aside.pop_wait() {
                Some(w) => w,
                None => match sys::wait(None, true) {
                    Ok(Some(w)) => w,
                    Ok(None) => {
                        let waited = start.elapsed();
                        if waited > GIVE_UP_AFTER {
                            let mut missing = self.threads.running();
                            for m in &self.family.members {
                                missing.extend(m.threads.running());
                            }
                            return Err(Error::Backend(format!(
                                "threads {missing:?} of process {} did not stop within {} s",
                                self.pid(),
                                GIVE_UP_AFTER.as_secs()
                            )));
                        }
                        if waited > CHECK_AFTER && !checked {
                            checked = true;
                            for tid in self.threads.running() {
                                self.forget_if_lost(tid);
                            }
                            for i in 0..self.family.members.len() {
                                self.with_follower(i, |m| {
                                    for tid in m.threads.running() {
                                        m.forget_if_lost(tid);
                                    }
                                });
                            }
                        }
                        std::thread::sleep(Duration::from_micros(200));
                        continue;
                    }
                    Err(Errno::CHILD) => {
                        if !self.is_gone() {
                            self.gone(ExitStatus::Unknown);
                        }
                        for m in &mut self.family.members {
                            if !m.is_gone() {
                                m.gone(ExitStatus::Unknown);
                            }
                        }
                        return Ok(());
                    }
                    Err(e) => return Err(error::sys(e, "wait while stopping the threads")),
                },
            };
            let tid = w.tid();
            match (self.threads.contains(tid), self.follower_of(tid)) {
                (false, Some(i)) => self.with_follower(i, |m| m.hold(w, detaching))?,
                _ => self.hold(w, detaching)?,
            }
            if self.is_gone() && self.family.members.iter().all(|m| m.is_gone()) {
                return Ok(());
            }
        }
        result
    }

    /// Interrupt every running thread of this process (step 1's first half).
    fn interrupt_running(&mut self) -> Result<()> {
        let mut result = Ok(());
        for tid in self.threads.running() {
            match sys::interrupt(tid) {
                Ok(()) => {}
                // Gone or exiting: its exit report comes, unless it is not ours at all.
                Err(Errno::SRCH) => self.forget_if_lost(tid),
                Err(e) => {
                    result = Err(error::sys(e, format_args!("stop thread {tid:?}")));
                    self.forget_if_lost(tid);
                }
            }
        }
        result
    }

    /// Whether every thread of every process of the family is held.
    fn family_held(&self) -> bool {
        self.threads.all_held() && self.family.members.iter().all(|m| m.threads.all_held())
    }

    /// `tid` could not be interrupted or did not report: forget it if it no longer
    /// exists or is not traced by this thread any more (then it never reports).
    fn forget_if_lost(&mut self, tid: Tid) {
        let status = format!("/proc/{}/task/{}/status", self.pid(), tid.as_raw_pid());
        let ours = std::fs::read_to_string(status).ok().is_some_and(|s| {
            let tracer = s
                .lines()
                .find_map(|l| l.strip_prefix("TracerPid:"))
                .and_then(|v| v.trim().parse::<i32>().ok());
            let zombie = s
                .lines()
                .find_map(|l| l.strip_prefix("State:"))
                .is_some_and(|v| v.trim_start().starts_with(['Z', 'X']));
            tracer == Some(std::process::id() as i32) && !zombie
        });
        if !ours {
            self.threads.remove(tid);
        }
    }

    /// Take one report while stopping: never run handlers, just hold the thread.
    fn hold(&mut self, w: Wait, detaching: bool) -> Result<()> {
        if w.is_end() || matches!(w, Wait::Event(_, Event::Exec)) {
            // Exits go through the normal path (which also notices the process's end);
            // the main process's new image is held by the exec handling (nothing of ours
            // is in it) and reported at the next run, for its user to place probes in
            // it (a follower's queue goes to the first tracer's: hence ProcessExec);
            // an exec'ing vfork child is let go (or, followed while pausing, reported
            // at the next run).
            match self.handle(w)? {
                Some(stop @ Stop::Forked { .. }) => self.family.queued.push(stop),
                Some(Stop::Exec { unregistered }) => self.family.queued.push(Stop::ProcessExec {
                    pid: self.pid(),
                    unregistered,
                }),
                _ => {}
            }
            return Ok(());
        }
        let tid = w.tid();
        if self.bell.on_stop(tid) {
            return Ok(());
        }
        if !self.threads.contains(tid) && !self.adopt(tid, w) {
            return Ok(());
        }
        let mut deliver = None;
        let mut group = false;
        match w {
            Wait::Signal(_, Signal::TRAP) => {
                if !self.rewind_trap(tid, detaching) {
                    deliver = Some(Signal::TRAP);
                }
            }
            Wait::Signal(_, sig) => deliver = Some(sig),
            Wait::Syscall(_) => {}
            Wait::Event(_, Event::Stop(sig)) => {
                group = sig.is_stop();
                if !group && sigtrap_pending(self.pid(), tid) {
                    // It executed an `int3` (ours, most likely) just before the
                    // interrupt stopped it: the interrupt is reported before the signal
                    // is. Held like this it stands one byte past the site with the
                    // SIGTRAP still to come: once detached that signal would kill the
                    // program, and a pause that promotes the site would leave it in the
                    // middle of the jump written there (or an injected system call on
                    // it would take the signal). Let it report the signal first (it
                    // runs no instruction before that); that stop is undone like any
                    // trap while stopping, which puts it back on the site.
                    return self.resume(tid, None);
                }
            }
            Wait::Event(_, Event::Clone) => {
                if let Ok(new) = sys::event_pid(tid) {
                    self.claim_only(tid, new);
                }
            }
            Wait::Event(_, ev @ (Event::Fork | Event::Vfork)) => {
                if let Ok(child) = sys::event_pid(tid) {
                    let vfork = ev == Event::Vfork;
                    if self.new_child(child, vfork, tid)? {
                        // Followed (pausing, not detaching): reported at the next run.
                        let parent = self.pid();
                        let child = child.as_raw_pid();
                        self.family.queued.push(Stop::Forked {
                            parent,
                            child,
                            execed: false,
                        });
                    }
                    if vfork {
                        // It was resumed by new_child; stop it again to detach it.
                        if sys::interrupt(child).is_err() {
                            self.forget_if_lost(child);
                        }
                    }
                }
            }
            Wait::Event(..) => {}
            Wait::Exited(..) | Wait::Killed(..) => unreachable!("handled above"),
        }
        if let Some(th) = self.threads.get_mut(tid) {
            if group {
                th.hold_group_stop();
            } else {
                th.hold(deliver);
            }
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
        if self.rewind_return(tid, &ur, detaching) {
            return true;
        }
        let th = self.threads.known(tid);
        if let Some(top) = th.slots.last() {
            let trap = top.slots().trap_after.filter(|s| s.contains(ur.rip - 1));
            let mut regs = to_core(&ur);
            if top.kind == SlotKind::TrapAfter
                && trap.is_some_and(|t| t.fixup_trap(ur.rip, &mut regs))
            {
                if detaching {
                    // The post-handlers are not run any more (the step is abandoned).
                    if let Some(sig) = th
                        .slots
                        .pop()
                        .and_then(|t| t.deferred)
                        .and_then(|i| i.signal())
                    {
                        self.resend.push((tid, sig));
                    }
                    let _ = sys::set_regs(tid, &from_core(&ur, &regs));
                } else {
                    let _ = sys::poke_user(tid, UserOffset::RIP, ur.rip - 1);
                }
                self.restore_trap(tid);
                return true;
            }
        }
        th.prune(ur.rip);
        let addr = ur.rip.wrapping_sub(1);
        let st = self.shared.lock();
        let ours = st.armed.contains_key(&addr) || st.history.contains_key(&addr);
        drop(st);
        let kernel = sys::sig_info(tid).is_ok_and(|s| s.code == SI_KERNEL);
        if ours && kernel {
            if detaching {
                // A hit that comes too late to be served: counted as missed.
                if let Some(th) = self.threads.get(tid) {
                    self.dispatcher.miss(&th.ts, addr);
                }
            }
            let _ = sys::poke_user(tid, UserOffset::RIP, addr);
            self.restore_trap(tid);
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
        for tid in self.threads.tids() {
            let Ok(ur) = sys::get_regs(tid) else {
                continue;
            };
            let th = self.threads.known(tid);
            th.ts.abandon();
            th.prune(ur.rip);
            let inside = th
                .slots
                .last()
                .filter(|t| !t.suspended && t.slots().contains(ur.rip))
                .map(|t| Arc::clone(&t.site));
            if let Some(site) = inside {
                let deferred = th.slots.pop().and_then(|t| t.deferred);
                if let Some(sig) = deferred.and_then(|i| i.signal()) {
                    self.resend.push((tid, sig));
                }
                if let Err(e) = self.step_out(tid, &site) {
                    result = result.and(Err(e));
                }
            }
            let Some(th) = self.threads.get_mut(tid) else {
                continue;
            };
            for s in std::mem::take(&mut th.slots) {
                keep_pages = true;
                if let Some(sig) = s.deferred.and_then(|i| i.signal()) {
                    self.resend.push((tid, sig));
                }
                if s.kind == SlotKind::TrapAfter {
                    let mut st = self.shared.lock();
                    let trap = s.slots().trap_after.expect("entered");
                    let plan = &s.site.plan;
                    if let Ok(jump) = plan.build_slot(SlotKind::JumpBack, trap.addr()) {
                        let _ = st.write_slot(jump.addr(), jump.bytes());
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
            if sys::single_step(tid, None).is_err() {
                break;
            }
            match sys::wait(Some(tid), false) {
                Ok(Some(Wait::Signal(_, Signal::TRAP))) => {}
                Ok(Some(Wait::Signal(_, sig))) => {
                    if let Some(th) = self.threads.get_mut(tid) {
                        th.hold(Some(sig));
                    }
                }
                Ok(Some(w)) if w.is_end() => {
                    self.aside.push_wait(w);
                    return Ok(());
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        match sys::get_regs(tid) {
            Ok(ur) if slots.contains(ur.rip) => Err(Error::Backend(format!(
                "thread {tid:?} could not be moved out of an out-of-line slot at {:#x}",
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
        let maps = error::maps(self.pid())?;
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
    /// unused mapping). Pages the program unmapped itself are not there to unmap.
    /// A held thread to inject system calls on, and its registers: one in a trap or
    /// interrupt stop — never one held at an event stop inside a system call (a
    /// `clone` reported while stopping everyone: its pending exit would be taken for
    /// the injected call's, and the program's `clone` would return the injected call's
    /// entry value) — preferably not inside an interrupted system call.
    pub(crate) fn held_thread(&self) -> Option<(Tid, sys::UserRegs)> {
        let mut best = None;
        for (tid, th) in self.threads.iter() {
            if !th.is_held() || !crate::sigtrap::injectable(tid) {
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
        best
    }

    fn unmap_xol(&mut self, injector: Option<&(Tid, sys::UserRegs)>) {
        let pages = self.shared.lock().xol.pages();
        if pages.is_empty() {
            return;
        }
        let Ok(maps) = error::maps(self.pid()) else {
            return;
        };
        let pages: Vec<u64> = pages
            .into_iter()
            .filter(|&p| maps.find(p).is_some_and(|r| r.exec && r.inode == 0))
            .collect();
        let Some(&(tid, saved)) = injector else {
            return;
        };
        let insn = {
            let st = self.shared.lock();
            match st.usable() {
                Ok(code) => self.injector.insn(self.shared.pid, code),
                Err(e) => Err(e),
            }
        };
        let Ok(insn) = insn else {
            return;
        };
        let pid = self.shared.pid;
        for page in pages {
            let args = [page, PAGE, 0, 0, 0, 0];
            if inject::syscall(
                pid,
                tid,
                &saved,
                insn,
                libc::SYS_munmap,
                args,
                &mut self.aside,
            )
            .is_err()
            {
                break;
            }
        }
        // A signal that arrived during the injection is sent again after the detach (the
        // thread now sits in a system-call stop, which cannot deliver one).
        for sig in self.aside.take_signals(tid) {
            self.resend.push((tid, sig));
        }
    }
}

/// Whether thread `tid` of `pid` has a SIGTRAP pending that it does not block (read
/// from `/proc`; false if that cannot be read).
fn sigtrap_pending(pid: i32, tid: Tid) -> bool {
    let path = format!("/proc/{pid}/task/{}/status", tid.as_raw_pid());
    let Ok(status) = std::fs::read_to_string(path) else {
        return false;
    };
    let bit = 1u64 << (libc::SIGTRAP - 1);
    let mask = |key| crate::sigtrap::status_mask(&status, key);
    mask("SigPnd:") & bit != 0 && mask("SigBlk:") & bit == 0
}

impl Drop for Tracer {
    fn drop(&mut self) {
        // Never leave the process stopped or with a breakpoint in it.
        let _ = self.detach_now();
    }
}
