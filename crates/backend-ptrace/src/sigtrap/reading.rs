//! What `/proc` says about a thread's SIGTRAP, and when that can be believed.
//!
//! The kernel renders a thread's `SigPnd`, `SigBlk`, `SigIgn` and `SigCgt` under its
//! `siglock` (`task_sig` in `fs/proc/array.c`), the lock `force_sig_info_to_task` holds
//! while it resets a forced trap's SIGTRAP and queues it, and that `get_signal` holds
//! from dequeuing the signal to entering the ptrace stop (`ptrace_stop` sets
//! `TASK_TRACED` before it lets go). So one reading is one consistent snapshot, and a
//! trap of ours that has reset the thread's state but not yet been served by the tracer
//! (*in flight*) is, at the moment of the reading, either still pending in the thread
//! (`SigPnd`: our traps are thread-directed) or the thread is already in a ptrace stop,
//! which only the tracer can end. The state is rendered before the snapshot is taken,
//! so whether the thread is stopped is read again afterwards ([`settled`]).

use crate::sys::{Pid, Tid};

/// SIGTRAP's bit in a signal set.
pub(super) const TRAP_BIT: u64 = 1 << (libc::SIGTRAP - 1);

/// Every signal but `SIGKILL` and `SIGSTOP` (which cannot be blocked). C libraries and
/// runtimes block all of these around `clone` (glibc and Go all 64, musl its
/// application signals and then all), so a thread seen with this mask may be in the
/// middle of creating a thread, about to put its real mask back. (A glibc program that
/// blocks everything itself has 32 and 33 left out — glibc keeps its internal signals
/// unblocked — and is not taken for this.)
const ALL: u64 = !((1 << (libc::SIGKILL - 1)) | (1 << (libc::SIGSTOP - 1)));

/// The process's action for SIGTRAP, as far as `/proc` (or an injected
/// `rt_sigaction`) tells it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Disposition {
    /// `SIG_DFL` (the kernel's reset leaves this).
    #[default]
    Default,
    /// `SIG_IGN`.
    Ignored,
    /// A handler.
    Caught,
}

/// One snapshot of a thread's signal state.
#[derive(Clone, Copy, Debug)]
pub(super) struct Reading {
    /// The signals pending for the thread itself (not the process's shared ones).
    pending: u64,
    /// Its mask.
    mask: u64,
    /// The process's action for SIGTRAP.
    pub(super) disposition: Disposition,
}

impl Reading {
    /// The thread's snapshot; `None` if it is gone.
    pub(super) fn of(pid: Pid, tid: Tid) -> Option<Reading> {
        let s = std::fs::read_to_string(task_path(pid, tid, "status")).ok()?;
        let disposition = if status_mask(&s, "SigIgn:") & TRAP_BIT != 0 {
            Disposition::Ignored
        } else if status_mask(&s, "SigCgt:") & TRAP_BIT != 0 {
            Disposition::Caught
        } else {
            Disposition::Default
        };
        Some(Reading {
            pending: status_mask(&s, "SigPnd:"),
            mask: status_mask(&s, "SigBlk:"),
            disposition,
        })
    }

    /// The thread blocks SIGTRAP (always the program's own doing: a trap of ours only
    /// ever unblocks it).
    pub(super) fn blocks(&self) -> bool {
        self.mask & TRAP_BIT != 0
    }

    /// Everything is blocked: the thread may be creating a thread (see [`ALL`]).
    pub(super) fn all_blocked(&self) -> bool {
        self.mask & ALL == ALL
    }

    /// A SIGTRAP is pending for the thread: a trap of ours may be in flight.
    pub(super) fn trap_pending(&self) -> bool {
        self.pending & TRAP_BIT != 0
    }
}

/// Whether thread `tid`, which the tracer has resumed, is not in a ptrace stop now.
/// Read after a [`Reading`] of it that showed no SIGTRAP pending, this proves that no
/// trap of ours was in flight in it when that reading was taken: such a trap would
/// have held it stopped until the tracer serves it.
pub(super) fn settled(pid: Pid, tid: Tid) -> bool {
    let Ok(stat) = std::fs::read_to_string(task_path(pid, tid, "stat")) else {
        return false;
    };
    // `pid (comm) S ...`: the state follows the last ')' (comm may hold anything).
    stat.rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next())
        .is_some_and(|state| state != "t")
}

fn task_path(pid: Pid, tid: Tid, file: &str) -> String {
    format!(
        "/proc/{}/task/{}/{file}",
        pid.as_raw_pid(),
        tid.as_raw_pid()
    )
}

/// The hexadecimal signal set after `key` in a `/proc/.../status` text.
pub(crate) fn status_mask(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glibcs_transient_mask_is_all_blocked_and_a_programs_own_block_all_is_not() {
        let reading = |mask| Reading {
            pending: 0,
            mask,
            disposition: Disposition::Default,
        };
        // What /proc shows for a thread inside glibc's pthread_create.
        assert!(reading(0xffff_ffff_fffb_feff).all_blocked());
        // sigfillset + pthread_sigmask under glibc: 32 and 33 stay unblocked.
        let own = reading(0xffff_fffe_7ffb_feff);
        assert!(!own.all_blocked());
        assert!(own.blocks());
        assert!(!reading(0).blocks());
    }

    #[test]
    fn a_status_line_is_read_as_hex() {
        let s = "Name:\tx\nSigPnd:\t0000000000000010\nSigBlk:\t0000000000000000\n";
        assert_eq!(status_mask(s, "SigPnd:"), 0x10);
        assert_eq!(status_mask(s, "SigBlk:"), 0);
        assert_eq!(status_mask(s, "SigIgn:"), 0);
    }
}
