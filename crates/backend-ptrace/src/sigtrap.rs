//! Undoing what our breakpoints do to the program's SIGTRAP.
//!
//! An `int3` raises a *forced* SIGTRAP, and the kernel's rule for those
//! (`force_sig_info_to_task`) is: if the thread blocks SIGTRAP, or the process ignores
//! it, set its action to the default and unblock it in that thread. The tracer then
//! swallows the signal, but the change stays: the program's own later `raise(SIGTRAP)`
//! would kill it. So after every trap of ours in a thread that blocks SIGTRAP, or in a
//! process that ignores it, the guard puts back what the program had: the thread's mask
//! with `PTRACE_SETSIGMASK`, the ignored action with an injected `rt_sigaction` (the
//! kernel keeps the action's flags, mask and restorer; only the handler is reset, and
//! it is put back as `SIG_IGN`). Programs that neither block nor ignore SIGTRAP — nearly
//! all — pay nothing.
//!
//! What the program had is read from `/proc` (`SigBlk` per thread, `SigIgn` for the
//! process) when the tracer starts, at every exec, for each new thread (whose mask is
//! its creator's: see [`TrapGuard::new_thread`]), and each time [`Tracer::run`] or [`Tracer::run_until`] starts (all
//! threads are then running or held, none half-way through a trap). A fork child
//! inherits the action and masks of the moment it was forked, which the guard restores
//! before a trapped thread runs on. So a program that starts with SIGTRAP blocked or
//! ignored (inherited through exec, as from a launcher that ignores it), or that had
//! set it so before it was attached to, keeps it so exactly. A program that starts to
//! block
//! or ignore SIGTRAP between two of these moments is not seen until the next; a thread
//! that blocks it *and* has a handler for it loses the handler at a hit (the kernel
//! resets it, and its address cannot be read back): its mask is restored, the handler
//! not. Both are limits, stated here and in the crate docs.

use std::collections::HashSet;

use crate::inject;
use crate::sys::{self, Pid, Signal, Tid};
use crate::thread::Threads;
use crate::tracer::Tracer;

const TRAP_BIT: u64 = 1 << (libc::SIGTRAP - 1);
/// Every standard signal but `SIGKILL` and `SIGSTOP` (which cannot be blocked): the mask
/// of a thread in the middle of `pthread_create`.
const TRANSIENT: u64 = 0x7fff_ffff & !(1 << (libc::SIGKILL - 1)) & !(1 << (libc::SIGSTOP - 1));

/// What the program had set for SIGTRAP, as last read.
#[derive(Debug, Default)]
pub(crate) struct TrapGuard {
    /// The process ignores SIGTRAP (`SIG_IGN`).
    ignored: bool,
    /// Threads that block SIGTRAP.
    blocked: HashSet<Tid>,
}

/// The hexadecimal signal set after `key` in a `/proc/.../status` text.
pub(crate) fn status_mask(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

fn task_status(pid: Pid, tid: Tid) -> Option<String> {
    let path = format!(
        "/proc/{}/task/{}/status",
        pid.as_raw_pid(),
        tid.as_raw_pid()
    );
    std::fs::read_to_string(path).ok()
}

impl TrapGuard {
    /// Read the disposition of process `pid` and the masks of its threads `tids`.
    pub(crate) fn refresh(&mut self, pid: Pid, tids: &[Tid]) {
        self.blocked.clear();
        self.ignored = false;
        for &tid in tids {
            if let Some(s) = task_status(pid, tid) {
                self.ignored |= status_mask(&s, "SigIgn:") & TRAP_BIT != 0;
                if status_mask(&s, "SigBlk:") & TRAP_BIT != 0 {
                    self.blocked.insert(tid);
                }
            }
        }
    }

    /// Thread `new` was created by `parent` (which is stopped at the clone event).
    /// C libraries block every signal around `clone` and the new thread restores the
    /// creator's mask when it starts, so what `/proc` shows now is that transient
    /// everything-blocked set for both: then the new thread gets the creator's entry as
    /// last read; any other mask is the new thread's own.
    pub(crate) fn new_thread(&mut self, pid: Pid, parent: Tid, new: Tid) {
        let Some(s) = task_status(pid, new) else {
            return;
        };
        self.ignored = status_mask(&s, "SigIgn:") & TRAP_BIT != 0;
        let mask = status_mask(&s, "SigBlk:");
        let blocked = if mask & TRANSIENT == TRANSIENT {
            self.blocked.contains(&parent)
        } else {
            mask & TRAP_BIT != 0
        };
        if blocked {
            self.blocked.insert(new);
        } else {
            self.blocked.remove(&new);
        }
    }

    /// Whether anything is to be restored after a trap of `tid`.
    fn wanted(&self, tid: Tid) -> bool {
        self.ignored || self.blocked.contains(&tid)
    }

    /// At detach: every thread's mask as the program had it (the action is restored
    /// after each trap already).
    pub(crate) fn restore_at_detach(&self, _pid: Pid, threads: &Threads) {
        for (tid, th) in threads.iter() {
            if th.is_held() && self.blocked.contains(&tid) {
                if let Ok(mask) = sys::get_sigmask(tid) {
                    let _ = sys::set_sigmask(tid, mask | TRAP_BIT);
                }
            }
        }
    }
}

impl Tracer {
    /// Thread `tid` is stopped by a trap of ours: put back what the kernel's forced-trap
    /// rule changed (see the module docs). Best effort: a thread that is gone needs
    /// nothing.
    pub(crate) fn restore_trap(&mut self, tid: Tid) {
        if !self.trap.wanted(tid) {
            return;
        }
        if self.trap.blocked.contains(&tid) {
            if let Ok(mask) = sys::get_sigmask(tid) {
                let _ = sys::set_sigmask(tid, mask | TRAP_BIT);
            }
        }
        if self.trap.ignored {
            let _ = self.ignore_sigtrap(tid);
        }
    }

    /// Make SIGTRAP ignored again, keeping the flags, mask and restorer the kernel left:
    /// `rt_sigaction(SIGTRAP, NULL, &old)`, then `rt_sigaction(SIGTRAP, &old', NULL)`
    /// with the handler `SIG_IGN`, both executed by `tid` with the action in scratch
    /// space below its stack's red zone (which a signal frame would overwrite anyway).
    fn ignore_sigtrap(&mut self, tid: Tid) -> multiprobe_core::Result<()> {
        use multiprobe_core::Memory;
        let saved = sys::get_regs(tid).map_err(|e| crate::error::sys(e, "read registers"))?;
        let insn = {
            let st = self.shared.lock();
            let code = st.usable()?;
            self.injector.insn(self.shared.pid, code)?
        };
        let scratch = (saved.rsp - 128 - 64) & !15;
        let pid = self.shared.pid;
        let nr = libc::SYS_rt_sigaction;
        let trap = Signal::TRAP.as_raw() as u64;
        let read = [trap, 0, scratch, 8, 0, 0];
        inject::syscall(pid, tid, &saved, insn, nr, read, &mut self.aside)?
            .map_err(|e| crate::error::sys(e, "read the SIGTRAP action"))?;
        let ign = (libc::SIG_IGN as u64).to_le_bytes();
        self.mem
            .write(scratch, &ign)
            .map_err(|e| multiprobe_core::Error::Backend(e.to_string()))?;
        let write = [trap, scratch, 0, 8, 0, 0];
        inject::syscall(pid, tid, &saved, insn, nr, write, &mut self.aside)?
            .map_err(|e| crate::error::sys(e, "ignore SIGTRAP again"))?;
        Ok(())
    }
}
