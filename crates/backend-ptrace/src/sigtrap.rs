//! Undoing what our breakpoints do to the program's SIGTRAP.
//!
//! An `int3` raises a *forced* SIGTRAP, and the kernel's rule for those
//! (`force_sig_info_to_task`) is: if the thread blocks SIGTRAP, or the process ignores
//! it, set the process's action to `SIG_DFL` and unblock it in that thread — a handler
//! is reset too when the thread blocks the signal. The tracer then swallows the signal,
//! but the change stays: the program's own later `raise(SIGTRAP)` would kill it. So
//! after each trap of ours in a thread that blocks SIGTRAP, or in a process that
//! ignores it, the guard puts back what the program had before the thread runs on: the
//! mask with `PTRACE_SETSIGMASK`, the action with an injected `rt_sigaction` (see
//! `sigtrap/action.rs`). Programs that neither block nor ignore SIGTRAP — nearly all —
//! pay nothing: not one request per hit.
//!
//! # What the guard knows, and when it learns it
//!
//! A trap changes exactly two things, and only in one direction: the trapping
//! thread's SIGTRAP bit is cleared, and the action becomes `SIG_DFL`. So a reading that
//! shows SIGTRAP blocked, ignored or caught is always the program's own setting and is
//! always believed. A reading that shows it unblocked or default is believed only when
//! no trap of ours can be *in flight* (raised, not yet served) where it counts — in
//! the thread, for its mask; in any thread, for the process's action — which
//! `sigtrap/reading.rs` can tell from a snapshot. Otherwise what was known stands.
//!
//! Readings are taken:
//! * when the tracer starts and at an exec ([`TrapGuard::start`]): no probe can have
//!   hit yet, every reading is believed;
//! * for each new thread, before it has run an instruction: its mask is the one it
//!   inherited, or — inherited from a creator in the middle of `pthread_create`,
//!   everything blocked — the creator's as known; such a thread's first stop, when it
//!   comes before the clone event that names the creator, is held until that event
//!   ([`TrapGuard::adopted`], [`TrapGuard::new_thread`]), and it is never read again
//!   while it runs;
//! * each time [`Tracer::run`] or [`Tracer::run_until`] starts ([`TrapGuard::refresh`]);
//! * the action, in a process that catches SIGTRAP, at each of the program's own
//!   SIGTRAPs (`sigtrap/deliver.rs`).
//!
//! A handler's address cannot be read from `/proc`, and once a blocking thread's trap
//! has reset it, from nowhere. So when the process catches SIGTRAP and some thread
//! blocks it, the guard reads the whole action with an injected `rt_sigaction` at the
//! next of these points where a thread is stopped (and at attach, stopping the process
//! for it), and at every restore swaps the action back with one `rt_sigaction` that
//! also returns the one it replaces: an action the program set since (a handler where
//! the reset left `SIG_DFL`, other flags) is kept, not overwritten.
//!
//! A handler without `SA_NODEFER` blocks SIGTRAP while it runs: the program's own
//! SIGTRAP is delivered so that the tracer sees the handler's mask and action as it
//! starts (`sigtrap/deliver.rs`), and that thread's hits check whether the handler
//! survived them until one shows it did (it returned).
//!
//! What remains (also in the crate docs): a program that starts or stops blocking
//! SIGTRAP in a thread (`sigprocmask`), or changes its action, between two readings is
//! not seen until the next — a hit meanwhile restores what was known; a handler
//! installed and lost to a blocking thread's hit before any reading cannot be put back;
//! a handler of another signal whose mask holds SIGTRAP is not known to block it; two
//! threads hitting at once, one inside the SIGTRAP handler, may leave that one's mask
//! unblocked for the rest of the handler; nothing is injected into a thread under
//! seccomp, so the action is not restored there.

mod action;
mod deliver;
mod reading;

use std::collections::HashSet;

use crate::sys::{self, Pid, Tid};
use crate::thread::{Kind, Thread, Threads};
use crate::tracer::Tracer;
use action::{Action, SIG_DFL, SIG_IGN};
use reading::{settled, Disposition, Reading, TRAP_BIT};

pub(crate) use reading::status_mask;

/// What the program has set for SIGTRAP, as last learned (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct TrapGuard {
    /// Threads that block SIGTRAP.
    blocked: HashSet<Tid>,
    /// The process's action.
    disposition: Disposition,
    /// The whole action as last read, when it was: its flags, mask and restorer (which
    /// a reset keeps) and, caught, the handler's address (which a reset loses).
    action: Option<Action>,
    /// New threads whose first stop came before their creator's clone event: held
    /// until it comes.
    unclaimed: HashSet<Tid>,
    /// New threads announced by their creator's clone event whose first stop has not
    /// been seen yet.
    fresh: HashSet<Tid>,
    /// Threads that entered the program's SIGTRAP handler with SIGTRAP blocked and have
    /// not been seen out of it (see `sigtrap/deliver.rs`).
    in_handler: HashSet<Tid>,
}

impl TrapGuard {
    /// Learn everything afresh from `tids` of `pid`, at a point where no trap of ours
    /// can be in flight: the tracer starts (nothing can be armed yet), or an exec (one
    /// thread left, none of our breakpoints in the new image).
    pub(crate) fn start(&mut self, pid: Pid, tids: &[Tid]) {
        *self = TrapGuard::default();
        for &tid in tids {
            if let Some(r) = Reading::of(pid, tid) {
                self.set_blocked(tid, r.blocks());
                self.disposition = r.disposition;
            }
        }
    }

    /// Read again what the threads show, at the start of a run (see the module docs
    /// for what is believed).
    pub(crate) fn refresh(&mut self, pid: Pid, threads: &Threads) {
        let mut shows_default = false;
        for (tid, th) in threads.iter() {
            if th.kind() != Kind::Thread {
                continue; // a vfork child: another process, with its own actions
            }
            let Some(r) = Reading::of(pid, tid) else {
                continue;
            };
            if r.all_blocked() {
                // Maybe creating a thread, its real mask put back in a moment: no news.
            } else if r.blocks() {
                self.blocked.insert(tid);
            } else if !r.trap_pending() && (th.is_held() || settled(pid, tid)) {
                self.blocked.remove(&tid);
            }
            match r.disposition {
                Disposition::Default => shows_default = true,
                d => self.learned(d),
            }
        }
        if shows_default && self.disposition != Disposition::Default && quiet(pid, threads, None) {
            self.learned(Disposition::Default);
        }
    }

    /// Thread `new`'s creator `creator` reported its clone event (the creator is
    /// stopped there). `known`: `new` was seen before (its first stop came first, or it
    /// was found at attach). Decides `new`'s entry unless it was decided already;
    /// returns whether `new` is held waiting for this.
    pub(crate) fn new_thread(&mut self, pid: Pid, creator: Tid, new: Tid, known: bool) -> bool {
        if self.unclaimed.remove(&new) {
            self.set_blocked(new, self.blocked.contains(&creator));
            return true;
        }
        if !known {
            // Not stopped yet, but it runs nothing before its first stop.
            self.fresh.insert(new);
            self.decide(pid, new, creator);
        }
        false
    }

    /// New thread `tid` of `pid` stopped for the first time, before its creator's clone
    /// event (nothing it ran yet). Returns whether it must wait for that event: it
    /// inherited a mask with everything blocked, which only its creator's entry can
    /// tell about. Meanwhile the leader's entry stands in.
    pub(crate) fn adopted(&mut self, pid: Pid, tid: Tid) -> bool {
        if self.decide(pid, tid, pid) {
            self.unclaimed.insert(tid);
            return true;
        }
        false
    }

    /// Decide what `new`, which has run nothing yet, blocks: what it inherited, or —
    /// inherited from a creator inside pthread_create (C libraries block everything
    /// around clone, and the new thread puts the creator's mask back first thing) —
    /// `creator`'s entry. Returns whether it took `creator`'s entry.
    fn decide(&mut self, pid: Pid, new: Tid, creator: Tid) -> bool {
        let Some(r) = Reading::of(pid, new) else {
            return false;
        };
        if r.disposition != Disposition::Default {
            // A default one may be another thread's trap in flight: no news.
            self.learned(r.disposition);
        }
        let inherited = r.all_blocked();
        let blocks = if inherited {
            self.blocked.contains(&creator)
        } else {
            r.blocks()
        };
        self.set_blocked(new, blocks);
        inherited
    }

    /// Whether this stop of `tid` is the first of a thread announced by a clone event.
    pub(crate) fn first_stop(&mut self, tid: Tid) -> bool {
        self.fresh.remove(&tid)
    }

    /// Thread `tid` is gone.
    pub(crate) fn forget(&mut self, tid: Tid) {
        self.blocked.remove(&tid);
        self.unclaimed.remove(&tid);
        self.fresh.remove(&tid);
        self.in_handler.remove(&tid);
    }

    fn set_blocked(&mut self, tid: Tid, blocks: bool) {
        if blocks {
            self.blocked.insert(tid);
        } else {
            self.blocked.remove(&tid);
        }
    }

    /// The process's action is now `d`: a handler learned anew (maybe another one than
    /// before) has its address read again.
    fn learned(&mut self, d: Disposition) {
        if d != self.disposition {
            self.disposition = d;
            if d == Disposition::Caught {
                self.action = None;
            }
        }
    }

    /// The whole action was read.
    fn learned_action(&mut self, a: Action) {
        self.disposition = a.disposition();
        self.action = Some(a);
    }

    /// Whether a trap of `tid` may change anything to put back.
    fn wanted(&self, tid: Tid) -> bool {
        match self.disposition {
            Disposition::Ignored => true,
            Disposition::Caught => self.blocked.contains(&tid) || self.in_handler.contains(&tid),
            Disposition::Default => self.blocked.contains(&tid),
        }
    }

    /// Whether a hit could reset a handler whose address is what the guard would need
    /// to put it back: then it is read (again) where a thread is stopped.
    pub(crate) fn needs_action(&self) -> bool {
        self.disposition == Disposition::Caught && !self.blocked.is_empty()
    }

    /// At detach: every held thread's mask as the program had it (the action is put
    /// back after each trap already).
    pub(crate) fn restore_at_detach(&self, threads: &Threads) {
        for (tid, th) in threads.iter() {
            if th.is_held() && self.blocked.contains(&tid) {
                if let Ok(mask) = sys::get_sigmask(tid) {
                    let _ = sys::set_sigmask(tid, mask | TRAP_BIT);
                }
            }
        }
    }
}

/// Whether no trap of ours can be in flight in any thread of `threads` (but `except`)
/// now: none has a SIGTRAP pending, and every one the tracer has resumed is out of
/// ptrace stops.
fn quiet(pid: Pid, threads: &Threads, except: Option<Tid>) -> bool {
    threads.iter().all(|(tid, th)| {
        th.kind() != Kind::Thread
            || Some(tid) == except
            || Reading::of(pid, tid)
                .is_none_or(|r| !r.trap_pending() && (th.is_held() || settled(pid, tid)))
    })
}

impl Tracer {
    /// Thread `tid` is stopped by a trap of ours: put back what the kernel's forced-trap
    /// rule changed (see the module docs). Best effort: a thread that is gone needs
    /// nothing, one under seccomp gets its mask back but not the action.
    pub(crate) fn restore_trap(&mut self, tid: Tid) {
        if !self.trap.wanted(tid) {
            return;
        }
        let blocks = self.trap.blocked.contains(&tid) || self.still_in_handler(tid);
        if blocks {
            if let Ok(mask) = sys::get_sigmask(tid) {
                let _ = sys::set_sigmask(tid, mask | TRAP_BIT);
            }
        }
        let handler = match self.trap.disposition {
            Disposition::Ignored => Some(SIG_IGN),
            // Never read: lost (a limit in the module docs).
            Disposition::Caught if blocks => self.trap.action.map(|a| a.handler),
            _ => None,
        };
        if let Some(handler) = handler {
            let _ = self.put_back_action(tid, handler);
        }
    }

    /// Thread `tid`, last seen entering the SIGTRAP handler with SIGTRAP blocked, is
    /// stopped by a trap of ours: did it block SIGTRAP still? Then the trap reset the
    /// handler; otherwise it left it (the thread returned from the handler).
    fn still_in_handler(&mut self, tid: Tid) -> bool {
        if !self.trap.in_handler.contains(&tid) {
            return false;
        }
        let pid = self.shared.pid;
        match Reading::of(pid, tid).map(|r| r.disposition) {
            Some(Disposition::Default) => {
                // Reset: by this trap, or by one of another thread not served yet — then
                // that thread's restore puts the handler back, and this one's mask stays
                // as the kernel left it.
                quiet(pid, &self.threads, Some(tid))
            }
            d => {
                self.trap.in_handler.remove(&tid);
                if let Some(d) = d {
                    self.trap.learned(d);
                }
                false
            }
        }
    }

    /// After a reset, make `handler` SIGTRAP's handler again, on thread `tid`.
    fn put_back_action(&mut self, tid: Tid, handler: u64) -> multiprobe_core::Result<()> {
        let by = self.caller(tid)?;
        let base = match self.trap.action {
            Some(a) => a,
            // The reset kept flags, mask and restorer: read them once.
            None => self.sigaction(&by, None)?,
        };
        let want = base.with_handler(handler);
        let old = self.sigaction(&by, Some(want))?;
        let now = if old == want || old.handler == SIG_DFL && same_but_handler(old, want) {
            want
        } else if old.handler != SIG_DFL {
            // The program set an action after the reset: it stands.
            self.sigaction(&by, Some(old))?;
            old
        } else {
            // The program changed the action since it was read (other flags): its
            // flags stand; the handler it had at the trap cannot be known, the one
            // last read is the best there is.
            let fixed = old.with_handler(handler);
            self.sigaction(&by, Some(fixed))?;
            fixed
        };
        self.trap.learned_action(now);
        Ok(())
    }

    /// Read the whole action with the stopped thread `tid` if the guard needs it (see
    /// [`TrapGuard::needs_action`]). The thread must be in a stop where a system call
    /// can be injected without losing a signal (a trap, an interrupt or the first stop
    /// of a new thread; not a system call's event stop).
    pub(crate) fn learn_action(&mut self, tid: Tid) {
        if self.trap.needs_action() {
            self.read_action(tid);
        }
    }

    /// Read the whole action with the stopped thread `tid` (see
    /// [`Tracer::learn_action`] for the stops that serve).
    pub(crate) fn read_action(&mut self, tid: Tid) {
        if let Ok(by) = self.caller(tid) {
            if let Ok(a) = self.sigaction(&by, None) {
                self.trap.learned_action(a);
            }
        }
    }

    /// Read the action at the start of a run, with a thread the loop holds, if one can
    /// serve (see [`Tracer::learn_action`]).
    pub(crate) fn learn_action_if_held(&mut self) {
        if !self.trap.needs_action() {
            return;
        }
        let held = self
            .threads
            .iter()
            .find(|&(tid, th)| th.kind() == Kind::Thread && th.holds_nothing() && injectable(tid))
            .map(|(tid, _)| tid);
        if let Some(tid) = held {
            self.learn_action(tid);
        }
    }

    /// Thread `new`'s creator `creator` reported its clone event: track `new`, decide
    /// what it blocks, and let it go if it was held waiting for this (the loop serves
    /// events; while stopping every thread, `hold` keeps it held instead).
    pub(crate) fn claim_thread(&mut self, creator: Tid, new: Tid) -> multiprobe_core::Result<()> {
        if self.claim_only(creator, new) {
            self.learn_action(new);
            if let Some(th) = self.threads.get_mut(new) {
                th.resume(new)
                    .map_err(|e| crate::error::sys(e, "resume a new thread"))?;
            }
        }
        Ok(())
    }

    /// Like [`Tracer::claim_thread`], but leave `new` as it is; whether it is held
    /// waiting for this.
    pub(crate) fn claim_only(&mut self, creator: Tid, new: Tid) -> bool {
        let known = self.threads.contains(new);
        self.threads.add(new, Thread::running(Kind::Thread));
        self.trap.new_thread(self.shared.pid, creator, new, known)
    }
}

/// Whether the held thread `tid` is in a stop where a system call can be injected: a
/// trap, the end of a single step (detach steps threads out of slots and trampolines:
/// on a loaded machine every thread but one, the one whose injected call ended in a
/// system-call stop, can be there, and the last out-of-line page was left mapped) or
/// an interrupt (`PTRACE_EVENT_STOP`) — not an event stop inside a system call (clone,
/// fork, exec), whose own result would land on top of the injected one. A step ends
/// after the instruction, so even one over a `syscall` is not inside it.
pub(crate) fn injectable(tid: Tid) -> bool {
    let trap = libc::SIGTRAP;
    sys::sig_info(tid).is_ok_and(|s| {
        s.signo == trap
            && (s.code == sys::SI_KERNEL
                || s.code == sys::TRAP_TRACE
                || s.code == trap | (libc::PTRACE_EVENT_STOP << 8))
    })
}

/// Whether `a` and `b` differ at most in their handler.
fn same_but_handler(a: Action, b: Action) -> bool {
    a.with_handler(SIG_DFL) == b.with_handler(SIG_DFL)
}
