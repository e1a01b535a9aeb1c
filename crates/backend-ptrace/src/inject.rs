//! Running a system call in the tracee: `mmap` for the XOL page, `munmap` at detach
//! and in forked children.
//!
//! The thread must be in a ptrace-stop. Its registers are saved, the call's number and
//! arguments loaded, `rip` pointed at a `syscall` instruction already in the tracee's
//! executable memory (an XOL page's gadget, or one found in the vDSO or another
//! executable mapping: the bytes `0f 05` anywhere will do, since the thread stops at
//! the system call's exit and never executes what follows), and the thread resumed
//! with `PTRACE_SYSCALL` to its entry and exit stops. No byte of the tracee's code is
//! changed. Then the saved registers are written back — with the kernel's restart rule
//! applied if the stop was inside an interrupted system call (see
//! [`crate::regs::restart_applied`]).
//!
//! `orig_rax` is set to -1 for the injection, so the kernel's own restart logic, which
//! runs when the thread leaves its current stop, leaves the loaded registers alone.
//! Applying the restart rule ourselves afterwards is needed when the thread is then
//! resumed with `PTRACE_CONT`; `PTRACE_DETACH` wakes it with a signal check, and the
//! kernel would apply the rule itself — harmless after ours, since `rax` then holds a
//! system call number, not an `-ERESTART*` code.

use std::collections::VecDeque;

use multiprobe_core::{Error, Result};

use crate::error;
use crate::regs;
use crate::sys::{self, Errno, Tid, UserRegs, Wait};

/// Events met while a thread was busy with an injection: they belong to the main loop.
#[derive(Debug, Default)]
pub(crate) struct Aside {
    /// Waits the main loop has not seen (the thread exited or was killed meanwhile).
    pub(crate) waits: VecDeque<Wait>,
    /// Signals that arrived for a thread during an injection, to deliver afterwards.
    pub(crate) signals: Vec<(Tid, i32)>,
}

const SYSCALL_STOP: i32 = libc::SIGTRAP | 0x80;

/// Run `nr(args)` on `tid`, stopped with registers `saved`, executing the `syscall`
/// instruction at `insn`. Returns the call's result (`Err(errno)` for -4095..-1).
/// Afterwards the thread is stopped again with `saved` (restart rule applied) in place.
pub(crate) fn syscall(
    tid: Tid,
    saved: &UserRegs,
    insn: u64,
    nr: i64,
    args: [u64; 6],
    aside: &mut Aside,
) -> Result<Result<u64, Errno>> {
    let mut r = *saved;
    r.rax = nr as u64;
    r.orig_rax = u64::MAX;
    r.rdi = args[0];
    r.rsi = args[1];
    r.rdx = args[2];
    r.r10 = args[3];
    r.r8 = args[4];
    r.r9 = args[5];
    r.rip = insn;
    let e = |e: Errno| error::sys(e, format_args!("inject a system call into thread {tid}"));
    sys::set_regs(tid, &r).map_err(e)?;
    sys::cont_syscall(tid, 0).map_err(e)?;
    wait_syscall_stop(tid, aside)?; // entry
    sys::cont_syscall(tid, 0).map_err(e)?;
    wait_syscall_stop(tid, aside)?; // exit
    let out = sys::get_regs(tid).map_err(e)?;
    sys::set_regs(tid, &regs::restart_applied(saved)).map_err(e)?;
    let v = out.rax as i64;
    Ok(if (-4095..0).contains(&v) {
        Err(Errno(-v as i32))
    } else {
        Ok(out.rax)
    })
}

fn wait_syscall_stop(tid: Tid, aside: &mut Aside) -> Result<()> {
    loop {
        let w = sys::wait(tid, false)
            .map_err(|e| error::sys(e, format_args!("wait for thread {tid}")))?
            .ok_or(Error::ProcessGone)?;
        match w {
            Wait::Stopped { sig, event: 0, .. } if sig == SYSCALL_STOP => return Ok(()),
            Wait::Stopped { sig, event: 0, .. } => {
                // A signal arrived first: hold it back, deliver it after.
                aside.signals.push((tid, sig));
            }
            Wait::Stopped { .. } => {} // an event or group stop: go on with the call
            Wait::Exited(..) | Wait::Signaled(..) => {
                aside.waits.push_back(w);
                return Err(Error::ProcessGone);
            }
        }
        sys::cont_syscall(tid, 0)
            .map_err(|e| error::sys(e, format_args!("resume thread {tid}")))?;
    }
}

/// Find the bytes of a `syscall` instruction in the tracee's executable memory,
/// preferring the vDSO (small, always there). `read` reads tracee memory.
pub(crate) fn find_syscall_insn(
    maps: &multiprobe_symbols::Maps,
    read: impl Fn(u64, &mut [u8]) -> Result<()>,
) -> Option<u64> {
    let mut regions: Vec<_> = maps.regions.iter().filter(|r| r.exec && r.read).collect();
    regions.sort_by_key(|r| (r.path != "[vdso]", r.end - r.start));
    for r in regions {
        let len = (r.end - r.start).min(4 << 20);
        let mut buf = vec![0; len as usize];
        if read(r.start, &mut buf).is_err() {
            continue;
        }
        if let Some(i) = buf.windows(2).position(|w| w == [0x0f, 0x05]) {
            return Some(r.start + i as u64);
        }
    }
    None
}
