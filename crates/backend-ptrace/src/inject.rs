//! Running a system call in the tracee: `mmap` for the XOL page, `munmap` at detach
//! and in forked children.
//!
//! The thread must be in a ptrace-stop. Its registers are saved, the call's number and
//! arguments loaded, `rip` pointed at a `syscall` instruction of the tracee's own
//! executable memory (the vDSO's, or another executable mapping's: the bytes `0f 05`
//! anywhere will do, since the thread stops at the system call's exit and never
//! executes what follows; never one in a page of ours, which a fork child or a program
//! that unmapped it does not have; checked before every use), and the thread resumed
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
//!
//! An injection never loops and never hurts: it is refused for a thread under seccomp
//! (the call could kill the program), gives up when the thread faults at the injected
//! instruction (that fault is ours and is dropped), and gives up after a bounded number
//! of stops; the registers are put back in every case.

use std::collections::VecDeque;

use multiprobe_core::{Error, Result};

use crate::error;
use crate::mem::CodeMemory;
use crate::regs;
use crate::sys::{self, Errno, Pid, Signal, Tid, UserRegs, Wait};

/// Events met while a thread was busy with an injection: they belong to the main loop.
#[derive(Debug, Default)]
pub(crate) struct Aside {
    /// Waits the main loop has not seen (the thread exited or was killed meanwhile).
    waits: VecDeque<Wait>,
    /// Signals that arrived for a thread during an injection, to deliver afterwards.
    signals: Vec<(Tid, Signal)>,
}

impl Aside {
    pub(crate) fn push_wait(&mut self, w: Wait) {
        self.waits.push_back(w);
    }

    pub(crate) fn pop_wait(&mut self) -> Option<Wait> {
        self.waits.pop_front()
    }

    /// Whether an exit of `tid` was set aside.
    pub(crate) fn has_end_of(&self, tid: Tid) -> bool {
        self.waits.iter().any(|w| w.tid() == tid && w.is_end())
    }

    pub(crate) fn push_signal(&mut self, tid: Tid, sig: Signal) {
        self.signals.push((tid, sig));
    }

    /// The oldest signal held back for `tid`.
    pub(crate) fn take_signal(&mut self, tid: Tid) -> Option<Signal> {
        let i = self.signals.iter().position(|&(t, _)| t == tid)?;
        Some(self.signals.remove(i).1)
    }

    /// Every signal held back for `tid`.
    pub(crate) fn take_signals(&mut self, tid: Tid) -> Vec<Signal> {
        let (mine, others) = std::mem::take(&mut self.signals)
            .into_iter()
            .partition(|&(t, _)| t == tid);
        self.signals = others;
        mine.into_iter().map(|(_, s)| s).collect()
    }
}

/// Where injected system calls execute: a `syscall` instruction of the process's own
/// (the vDSO's, normally), never one in a page of ours — a fork child, or a program
/// that unmapped our page, does not have those.
#[derive(Debug, Default)]
pub(crate) struct Injector {
    insn: Option<u64>,
}

impl Injector {
    /// The address of a `syscall` instruction in the memory `code` (of process `pid`),
    /// checked to be there now.
    pub(crate) fn insn(&mut self, pid: Pid, code: &CodeMemory) -> Result<u64> {
        if let Some(a) = self.insn.filter(|&a| holds_syscall(code, a)) {
            return Ok(a);
        }
        let maps = error::maps(pid.as_raw_pid())?;
        self.insn = find_syscall_insn(&maps, |a, b| code.read(a, b));
        self.insn
            .ok_or_else(|| Error::Backend("no syscall instruction in the tracee".into()))
    }

    /// A new image: what was found in the old one means nothing.
    pub(crate) fn forget(&mut self) {
        self.insn = None;
    }
}

/// Whether `code` holds a `syscall` instruction at `addr`.
pub(crate) fn holds_syscall(code: &CodeMemory, addr: u64) -> bool {
    let mut b = [0u8; 2];
    code.read(addr, &mut b).is_ok() && b == [0x0f, 0x05]
}

/// Whether thread `tid` of `pid` runs under seccomp (strict mode or a filter): then
/// a system call we make it execute may kill it, and none is injected.
pub(crate) fn under_seccomp(pid: Pid, tid: Tid) -> bool {
    let path = format!(
        "/proc/{}/task/{}/status",
        pid.as_raw_pid(),
        tid.as_raw_pid()
    );
    let Ok(status) = std::fs::read_to_string(path) else {
        return false; // gone: the injection fails on its own
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp:"))
        .is_some_and(|v| v.trim() != "0")
}

/// The most stops an injection takes before it gives up: two are its own (entry and
/// exit); the rest are signals and events that arrive meanwhile. A thread flooded with
/// signals makes the injection fail, never loop.
const MAX_STOPS: usize = 64;

/// Run `nr(args)` on `tid` (of process `pid`), stopped with registers `saved`,
/// executing the `syscall` instruction at `insn`. Returns the call's result
/// (`Err(errno)` for -4095..-1). Afterwards the thread is stopped again with `saved`
/// (restart rule applied) in place — also when the injection failed.
///
/// Refused for a thread under seccomp. Gives up when the thread faults at the injected
/// instruction (the fault is ours and is not delivered) or takes more than
/// [`MAX_STOPS`] stops.
pub(crate) fn syscall(
    pid: Pid,
    tid: Tid,
    saved: &UserRegs,
    insn: u64,
    nr: i64,
    args: [u64; 6],
    aside: &mut Aside,
) -> Result<Result<u64, Errno>> {
    if under_seccomp(pid, tid) {
        return Err(Error::Backend(format!(
            "thread {} runs under seccomp: no system call is injected into it",
            tid.as_raw_pid()
        )));
    }
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
    let e = |e: Errno| {
        error::sys(
            e,
            format_args!("inject a system call into thread {}", tid.as_raw_pid()),
        )
    };
    sys::set_regs(tid, &r).map_err(e)?;
    let ran = run_to_exit(tid, insn, aside);
    let out = match ran {
        Ok(()) => sys::get_regs(tid).map_err(e),
        Err(err) => Err(err),
    };
    if aside.has_end_of(tid) {
        return Err(Error::ProcessGone);
    }
    // Put the thread back as it was, whatever happened.
    let restored = sys::set_regs(tid, &regs::restart_applied(saved)).map_err(e);
    let out = out?;
    restored?;
    let v = out.rax as i64;
    Ok(if (-4095..0).contains(&v) {
        Err(Errno::from_raw_os_error(-v as i32))
    } else {
        Ok(out.rax)
    })
}

/// Resume `tid` through the system call's entry and exit stops.
fn run_to_exit(tid: Tid, insn: u64, aside: &mut Aside) -> Result<()> {
    let e = |e: Errno| error::sys(e, format_args!("resume thread {}", tid.as_raw_pid()));
    let mut syscall_stops = 0;
    for _ in 0..MAX_STOPS {
        sys::cont_syscall(tid, None).map_err(e)?;
        let w = sys::wait(Some(tid), false)
            .map_err(e)?
            .ok_or(Error::ProcessGone)?;
        match w {
            Wait::Syscall(_) => {
                syscall_stops += 1;
                if syscall_stops == 2 {
                    return Ok(());
                }
            }
            Wait::Signal(_, sig) if sig.is_fault() && from_fault(tid) => {
                // Our instruction faulted (its page is not there, say): ours to drop.
                return Err(Error::Backend(format!(
                    "the injected system call faulted at {insn:#x} ({sig})"
                )));
            }
            // A signal arrived first: hold it back, deliver it after.
            Wait::Signal(_, sig) => aside.push_signal(tid, sig),
            // An event or group stop: go on with the call.
            Wait::Event(..) => {}
            Wait::Exited(..) | Wait::Killed(..) => {
                aside.push_wait(w);
                return Err(Error::ProcessGone);
            }
        }
    }
    Err(Error::Backend(format!(
        "the injected system call in thread {} did not complete within {MAX_STOPS} stops",
        tid.as_raw_pid()
    )))
}

/// Whether the signal `tid` is stopped for was raised by the kernel for an instruction
/// it executed (not sent by a process).
fn from_fault(tid: Tid) -> bool {
    sys::sig_info(tid).is_ok_and(|s| s.code > 0)
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
