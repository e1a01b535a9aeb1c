//! The typed layer over the system calls this backend makes: ptrace, waitpid, signals,
//! remote memory. Every `unsafe` block of the crate's process control lives here, each
//! next to the one fact that makes it sound.
//!
//! Types: thread and process ids are rustix's [`Pid`] (never 0, never negative); a
//! signal is a [`Signal`] and "no signal" is `None` (never a 0); failures are rustix's
//! [`Errno`]; a `waitpid` report is decoded once, into [`Wait`]. The one raw entry point,
//! [`ptrace`], is `unsafe`: whether a request is sound depends on what its pointers
//! point to, which only its caller knows. Nothing outside reads the global `errno`;
//! mapping to the core's error enum happens in [`crate::error`].

use std::ffi::c_void;
use std::num::NonZeroI32;
use std::os::fd::{AsFd, OwnedFd};

pub(crate) use rustix::io::Errno;
pub(crate) use rustix::process::Pid;

/// A kernel thread id (or process id: the id of its leader).
pub(crate) type Tid = Pid;

pub(crate) type SysResult<T> = Result<T, Errno>;

/// `pid` as a [`Pid`]; `None` for 0 and negative numbers.
pub(crate) fn pid(raw: i32) -> Option<Pid> {
    Pid::from_raw(raw)
}

/// A signal number, 1 to 64 — the real-time ones included, which the tracee may use
/// and which must pass through unchanged. (rustix's and nix's signal types do not take
/// every real-time signal safely; a tracer only carries signals between the kernel and
/// the tracee, so a plain checked number is the right type.)
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Signal(NonZeroI32);

impl Signal {
    /// `SIGHUP`: Hang-up.
    pub const HUP: Signal = Signal::named(libc::SIGHUP);
    /// `SIGINT`: Interrupt (Ctrl-C).
    pub const INT: Signal = Signal::named(libc::SIGINT);
    /// `SIGILL`: Illegal instruction.
    pub const ILL: Signal = Signal::named(libc::SIGILL);
    /// `SIGTRAP`: Trace/breakpoint trap.
    pub const TRAP: Signal = Signal::named(libc::SIGTRAP);
    /// `SIGBUS`: Bus error.
    pub const BUS: Signal = Signal::named(libc::SIGBUS);
    /// `SIGFPE`: Arithmetic fault.
    pub const FPE: Signal = Signal::named(libc::SIGFPE);
    /// `SIGKILL`: Kill (cannot be caught).
    pub const KILL: Signal = Signal::named(libc::SIGKILL);
    /// `SIGSEGV`: Segmentation fault.
    pub const SEGV: Signal = Signal::named(libc::SIGSEGV);
    /// `SIGTERM`: Termination request.
    pub const TERM: Signal = Signal::named(libc::SIGTERM);
    /// `SIGCONT`: Continue a stopped process.
    pub const CONT: Signal = Signal::named(libc::SIGCONT);
    /// `SIGSTOP`: Stop (cannot be caught).
    pub const STOP: Signal = Signal::named(libc::SIGSTOP);
    /// `SIGTSTP`: Terminal stop (Ctrl-Z).
    pub const TSTP: Signal = Signal::named(libc::SIGTSTP);
    /// `SIGTTIN`: Background read from the terminal.
    pub const TTIN: Signal = Signal::named(libc::SIGTTIN);
    /// `SIGTTOU`: Background write to the terminal.
    pub const TTOU: Signal = Signal::named(libc::SIGTTOU);

    const fn named(n: i32) -> Signal {
        match NonZeroI32::new(n) {
            Some(n) => Signal(n),
            None => panic!("signal 0"),
        }
    }

    /// The signal numbered `n`; `None` for 0 ("no signal") and numbers out of range.
    pub fn from_raw(n: i32) -> Option<Signal> {
        (1..=64)
            .contains(&n)
            .then(|| Signal(NonZeroI32::new(n).expect("in range")))
    }

    /// Its number.
    pub fn as_raw(self) -> i32 {
        self.0.get()
    }

    /// Whether it stops the process by default (and so starts a group-stop).
    pub fn is_stop(self) -> bool {
        [Signal::STOP, Signal::TSTP, Signal::TTIN, Signal::TTOU].contains(&self)
    }

    /// Whether the kernel raises it for a faulting instruction (when `si_code > 0`).
    pub fn is_fault(self) -> bool {
        [Signal::SEGV, Signal::BUS, Signal::ILL, Signal::FPE].contains(&self)
    }
}

impl std::fmt::Debug for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // SAFETY: strsignal returns a pointer to a static or thread-local string, read at
        // once; it is only called from thread context (formatting allocates anyway).
        let name = unsafe { std::ffi::CStr::from_ptr(libc::strsignal(self.as_raw())) };
        write!(f, "signal {} ({})", self.as_raw(), name.to_string_lossy())
    }
}

/// The `errno` of the system call that just failed on this thread.
fn last_errno() -> Errno {
    Errno::from_raw_os_error(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

/// The raw number to pass for "deliver this signal, or none".
fn sig_data(sig: Option<Signal>) -> usize {
    sig.map_or(0, |s| s.as_raw() as usize)
}

/// The registers as `PTRACE_GETREGS` returns them.
pub(crate) type UserRegs = libc::user_regs_struct;

/// Byte offset of a field of [`UserRegs`], for `PTRACE_PEEKUSER`/`POKEUSER`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct UserOffset(usize);

impl UserOffset {
    /// `rip`.
    pub(crate) const RIP: UserOffset = UserOffset(16 * 8);

    /// Field `i` of [`UserRegs`] in memory order (every field is 8 bytes).
    pub(crate) fn field(i: usize) -> UserOffset {
        assert!(i < std::mem::size_of::<UserRegs>() / 8);
        UserOffset(i * 8)
    }
}

/// `PTRACE_O_*` options set on every tracee.
pub(crate) const OPTIONS: libc::c_int = libc::PTRACE_O_TRACESYSGOOD
    | libc::PTRACE_O_TRACECLONE
    | libc::PTRACE_O_TRACEFORK
    | libc::PTRACE_O_TRACEVFORK
    | libc::PTRACE_O_TRACEEXEC;

/// Raw ptrace. Counts the request (see [`Requests`]).
///
/// # Safety
/// For requests that read or write through `addr` or `data` (`GETREGS`, `SETREGS`,
/// `GETSIGINFO`, `SETSIGINFO`, `GETEVENTMSG`, `GETSIGMASK`, ...), the pointer must be
/// valid for that request's size and access; for the others they are plain integers.
unsafe fn ptrace(
    req: libc::c_uint,
    tid: Tid,
    addr: *mut c_void,
    data: *mut c_void,
) -> SysResult<()> {
    count(req);
    // SAFETY: the caller vouches for the pointers; the kernel checks the rest.
    let r = unsafe { libc::ptrace(req, tid.as_raw_pid(), addr, data) };
    if r == -1 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// ptrace with integer arguments only.
fn ptrace_int(req: libc::c_uint, tid: Tid, addr: usize, data: usize) -> SysResult<()> {
    debug_assert!(!matches!(
        req,
        libc::PTRACE_GETREGS
            | libc::PTRACE_SETREGS
            | libc::PTRACE_GETSIGINFO
            | libc::PTRACE_SETSIGINFO
            | libc::PTRACE_GETEVENTMSG
            | libc::PTRACE_PEEKUSER
    ));
    // SAFETY: the requests passed here (SEIZE, INTERRUPT, CONT, SYSCALL, SINGLESTEP,
    // LISTEN, DETACH, POKEUSER) take integers in `addr` and `data`, never pointers.
    unsafe { ptrace(req, tid, addr as *mut c_void, data as *mut c_void) }
}

/// How many ptrace requests of each kind the calling thread made (ptrace takes
/// requests only from the tracer's own thread, so these are its tracer's). What a hit
/// costs besides its stop is these requests; tests and benchmarks read them through
/// `multiprobe_backend_ptrace::baseline::requests`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Requests {
    /// `PTRACE_GETREGS`: all registers.
    pub get_regs: u64,
    /// `PTRACE_SETREGS`.
    pub set_regs: u64,
    /// `PTRACE_PEEKUSER`: one register (`rip`, at a trap).
    pub peek_user: u64,
    /// `PTRACE_POKEUSER`: one register.
    pub poke_user: u64,
    /// `PTRACE_GETSIGINFO`.
    pub get_sig_info: u64,
    /// `PTRACE_CONT`.
    pub cont: u64,
    /// Every other request.
    pub other: u64,
}

impl Requests {
    fn zip(self, o: Requests, f: impl Fn(u64, u64) -> u64) -> Requests {
        Requests {
            get_regs: f(self.get_regs, o.get_regs),
            set_regs: f(self.set_regs, o.set_regs),
            peek_user: f(self.peek_user, o.peek_user),
            poke_user: f(self.poke_user, o.poke_user),
            get_sig_info: f(self.get_sig_info, o.get_sig_info),
            cont: f(self.cont, o.cont),
            other: f(self.other, o.other),
        }
    }
}

impl std::ops::Add for Requests {
    type Output = Requests;
    fn add(self, o: Requests) -> Requests {
        self.zip(o, |a, b| a + b)
    }
}

impl std::ops::Sub for Requests {
    type Output = Requests;
    fn sub(self, o: Requests) -> Requests {
        self.zip(o, |a, b| a - b)
    }
}

std::thread_local! {
    /// Per kind, in the order of [`Requests`]' fields.
    static REQUESTS: [std::cell::Cell<u64>; 7] = const { [const { std::cell::Cell::new(0) }; 7] };
}

fn count(req: libc::c_uint) {
    let i = match req {
        libc::PTRACE_GETREGS => 0,
        libc::PTRACE_SETREGS => 1,
        libc::PTRACE_PEEKUSER => 2,
        libc::PTRACE_POKEUSER => 3,
        libc::PTRACE_GETSIGINFO => 4,
        libc::PTRACE_CONT => 5,
        _ => 6,
    };
    REQUESTS.with(|c| c[i].set(c[i].get() + 1));
}

/// The requests the calling thread made so far.
pub fn requests() -> Requests {
    REQUESTS.with(|c| Requests {
        get_regs: c[0].get(),
        set_regs: c[1].get(),
        peek_user: c[2].get(),
        poke_user: c[3].get(),
        get_sig_info: c[4].get(),
        cont: c[5].get(),
        other: c[6].get(),
    })
}

/// Attach to `tid` without stopping it (`PTRACE_SEIZE`) with `options`.
pub(crate) fn seize(tid: Tid, options: libc::c_int) -> SysResult<()> {
    ptrace_int(libc::PTRACE_SEIZE, tid, 0, options as usize)
}

/// Stop a seized, running thread (`PTRACE_INTERRUPT`); it reports `PTRACE_EVENT_STOP`.
pub(crate) fn interrupt(tid: Tid) -> SysResult<()> {
    ptrace_int(libc::PTRACE_INTERRUPT, tid, 0, 0)
}

/// Resume a stopped thread, delivering `sig`.
pub(crate) fn cont(tid: Tid, sig: Option<Signal>) -> SysResult<()> {
    ptrace_int(libc::PTRACE_CONT, tid, 0, sig_data(sig))
}

/// Resume until the next system call entry or exit.
pub(crate) fn cont_syscall(tid: Tid, sig: Option<Signal>) -> SysResult<()> {
    ptrace_int(libc::PTRACE_SYSCALL, tid, 0, sig_data(sig))
}

/// Execute one instruction.
pub(crate) fn single_step(tid: Tid, sig: Option<Signal>) -> SysResult<()> {
    ptrace_int(libc::PTRACE_SINGLESTEP, tid, 0, sig_data(sig))
}

/// Leave a thread in group-stop but let it report the next event (`PTRACE_LISTEN`).
pub(crate) fn listen(tid: Tid) -> SysResult<()> {
    ptrace_int(libc::PTRACE_LISTEN, tid, 0, 0)
}

/// Stop tracing a stopped thread; it resumes, receiving `sig`.
pub(crate) fn detach(tid: Tid, sig: Option<Signal>) -> SysResult<()> {
    ptrace_int(libc::PTRACE_DETACH, tid, 0, sig_data(sig))
}

/// The thread's general registers.
pub(crate) fn get_regs(tid: Tid) -> SysResult<UserRegs> {
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    let mut regs: UserRegs = unsafe { std::mem::zeroed() };
    // SAFETY: GETREGS writes one user_regs_struct at `data`, which points to one.
    unsafe {
        ptrace(
            libc::PTRACE_GETREGS,
            tid,
            std::ptr::null_mut(),
            (&mut regs as *mut UserRegs).cast(),
        )
    }?;
    Ok(regs)
}

/// Set the thread's general registers.
pub(crate) fn set_regs(tid: Tid, regs: &UserRegs) -> SysResult<()> {
    // SAFETY: SETREGS only reads one user_regs_struct at `data`, which points to one.
    unsafe {
        ptrace(
            libc::PTRACE_SETREGS,
            tid,
            std::ptr::null_mut(),
            (regs as *const UserRegs).cast_mut().cast(),
        )
    }
}

/// Read one register (`PTRACE_PEEKUSER`). Two thirds of the cost of `PTRACE_GETREGS`
/// here: what a hit reads when no handler wants the registers (only `rip`, to know
/// where it is).
pub(crate) fn peek_user(tid: Tid, offset: UserOffset) -> SysResult<u64> {
    count(libc::PTRACE_PEEKUSER);
    let mut word: u64 = 0;
    // SAFETY: the raw system call (not glibc's wrapper, whose return value cannot tell
    // a word of all ones from an error) stores the word at `data`, which points to a
    // u64 that lives across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_ptrace,
            libc::PTRACE_PEEKUSER,
            tid.as_raw_pid(),
            offset.0,
            &mut word as *mut u64,
        )
    };
    if r == -1 {
        return Err(last_errno());
    }
    Ok(word)
}

/// Set one register (`PTRACE_POKEUSER`). A third of the cost of `PTRACE_SETREGS` here,
/// which is what makes the common write-back — only `rip` moved — cheap.
pub(crate) fn poke_user(tid: Tid, offset: UserOffset, value: u64) -> SysResult<()> {
    ptrace_int(libc::PTRACE_POKEUSER, tid, offset.0, value as usize)
}

/// The extra word of the last `PTRACE_EVENT_*` stop (a new thread's id, ...).
pub(crate) fn event_msg(tid: Tid) -> SysResult<u64> {
    let mut msg: libc::c_ulong = 0;
    // SAFETY: GETEVENTMSG writes one unsigned long at `data`, which points to one.
    unsafe {
        ptrace(
            libc::PTRACE_GETEVENTMSG,
            tid,
            std::ptr::null_mut(),
            (&mut msg as *mut libc::c_ulong).cast(),
        )
    }?;
    Ok(msg)
}

/// The new thread or process an event stop names, as a [`Pid`].
pub(crate) fn event_pid(tid: Tid) -> SysResult<Pid> {
    let msg = event_msg(tid)?;
    i32::try_from(msg).ok().and_then(pid).ok_or(Errno::INVAL)
}

/// A thread's blocked-signal mask, as a bit set (bit `n - 1` for signal `n`).
pub(crate) fn get_sigmask(tid: Tid) -> SysResult<u64> {
    let mut mask: u64 = 0;
    // SAFETY: GETSIGMASK writes `addr` (8) bytes at `data`, which points to a u64.
    unsafe {
        ptrace(
            libc::PTRACE_GETSIGMASK,
            tid,
            8 as *mut c_void,
            (&mut mask as *mut u64).cast(),
        )
    }?;
    Ok(mask)
}

/// Set a stopped thread's blocked-signal mask.
pub(crate) fn set_sigmask(tid: Tid, mask: u64) -> SysResult<()> {
    let mut mask = mask;
    // SAFETY: SETSIGMASK reads `addr` (8) bytes at `data`, which points to a u64.
    unsafe {
        ptrace(
            libc::PTRACE_SETSIGMASK,
            tid,
            8 as *mut c_void,
            (&mut mask as *mut u64).cast(),
        )
    }
}

/// What a signal-delivery-stop is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct SigInfo {
    pub(crate) signo: i32,
    pub(crate) code: i32,
    /// `si_addr` (fault address) for fault signals, else 0.
    pub(crate) addr: u64,
}

/// `si_code` of signals the kernel raises itself (an `int3`, a general protection fault).
pub(crate) use libc::SI_KERNEL;
/// `si_code` of the SIGTRAP that ends a single step.
pub(crate) use libc::TRAP_TRACE;

/// The siginfo of the signal a thread is stopped for. `EINVAL` in group-stop.
pub(crate) fn sig_info(tid: Tid) -> SysResult<SigInfo> {
    let si = sig_info_raw(tid)?.0;
    let is_fault = matches!(
        si.si_signo,
        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGTRAP
    );
    Ok(SigInfo {
        signo: si.si_signo,
        code: si.si_code,
        addr: if is_fault && si.si_code > 0 {
            // SAFETY: the kernel fills si_addr for the fault signals it raises itself.
            unsafe { si.si_addr() as u64 }
        } else {
            0
        },
    })
}

/// The complete siginfo of a signal-delivery-stop, kept to deliver the signal later
/// exactly as it was.
#[derive(Clone, Copy)]
pub(crate) struct RawSigInfo(libc::siginfo_t);

impl RawSigInfo {
    pub(crate) fn signal(&self) -> Option<Signal> {
        Signal::from_raw(self.0.si_signo)
    }
}

impl std::fmt::Debug for RawSigInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawSigInfo")
            .field("signo", &self.0.si_signo)
            .field("code", &self.0.si_code)
            .finish_non_exhaustive()
    }
}

/// The siginfo of the signal `tid` is stopped for, whole.
pub(crate) fn sig_info_raw(tid: Tid) -> SysResult<RawSigInfo> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value.
    let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: GETSIGINFO writes one siginfo_t at `data`, which points to one.
    unsafe {
        ptrace(
            libc::PTRACE_GETSIGINFO,
            tid,
            std::ptr::null_mut(),
            (&mut si as *mut libc::siginfo_t).cast(),
        )
    }?;
    Ok(RawSigInfo(si))
}

/// Replace the siginfo of the signal `tid` is stopped for (at a signal-delivery-stop,
/// the signal then delivered with `cont(tid, info.signal())` carries exactly `info`).
pub(crate) fn set_sig_info(tid: Tid, info: &RawSigInfo) -> SysResult<()> {
    // SAFETY: SETSIGINFO only reads one siginfo_t at `data`, which points to one.
    unsafe {
        ptrace(
            libc::PTRACE_SETSIGINFO,
            tid,
            std::ptr::null_mut(),
            (&info.0 as *const libc::siginfo_t).cast_mut().cast(),
        )
    }
}

/// A `PTRACE_EVENT_*` stop.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    Clone,
    Fork,
    Vfork,
    Exec,
    /// `PTRACE_EVENT_STOP`: a group-stop (with the stop signal), or an interrupt, a
    /// new thread's first stop or a listen notification (with `SIGTRAP`).
    Stop(Signal),
    /// Any other event (`VFORK_DONE`, `EXIT`, `SECCOMP`: not asked for).
    Other(i32),
}

/// How a waited-for thread changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Wait {
    /// It exited with this code.
    Exited(Tid, i32),
    /// It was killed by this signal.
    Killed(Tid, Signal),
    /// A signal-delivery-stop (or, for an untraced child, a plain stop).
    Signal(Tid, Signal),
    /// A system-call entry or exit stop (`PTRACE_O_TRACESYSGOOD`).
    Syscall(Tid),
    /// An event stop.
    Event(Tid, Event),
}

impl Wait {
    pub(crate) fn tid(&self) -> Tid {
        match *self {
            Wait::Exited(t, _)
            | Wait::Killed(t, _)
            | Wait::Signal(t, _)
            | Wait::Syscall(t)
            | Wait::Event(t, _) => t,
        }
    }

    /// Whether the thread is gone (exited or killed).
    pub(crate) fn is_end(&self) -> bool {
        matches!(self, Wait::Exited(..) | Wait::Killed(..))
    }

    fn decode(tid: Tid, status: i32) -> Option<Wait> {
        let sig = |n| Signal::from_raw(n);
        if libc::WIFEXITED(status) {
            return Some(Wait::Exited(tid, libc::WEXITSTATUS(status)));
        }
        if libc::WIFSIGNALED(status) {
            return Some(Wait::Killed(tid, sig(libc::WTERMSIG(status))?));
        }
        if !libc::WIFSTOPPED(status) {
            return None; // WIFCONTINUED is not asked for.
        }
        let stop = libc::WSTOPSIG(status);
        let event = status >> 16;
        Some(match event {
            0 if stop == libc::SIGTRAP | 0x80 => Wait::Syscall(tid),
            0 => Wait::Signal(tid, sig(stop)?),
            libc::PTRACE_EVENT_CLONE => Wait::Event(tid, Event::Clone),
            libc::PTRACE_EVENT_FORK => Wait::Event(tid, Event::Fork),
            libc::PTRACE_EVENT_VFORK => Wait::Event(tid, Event::Vfork),
            libc::PTRACE_EVENT_EXEC => Wait::Event(tid, Event::Exec),
            libc::PTRACE_EVENT_STOP => Wait::Event(tid, Event::Stop(sig(stop)?)),
            e => Wait::Event(tid, Event::Other(e)),
        })
    }
}

/// Wait for a change of `tid` (`None`: any) among the calling thread's own tracees and
/// children (`__WALL | __WNOTHREAD`: never another thread's children). `WUNTRACED`
/// also reports stops of untraced children (the doorbell). Retries `EINTR`.
pub(crate) fn wait(tid: Option<Tid>, nohang: bool) -> SysResult<Option<Wait>> {
    let flags =
        libc::__WALL | libc::__WNOTHREAD | libc::WUNTRACED | if nohang { libc::WNOHANG } else { 0 };
    let target = Pid::as_raw(tid);
    let target = if target == 0 { -1 } else { target };
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int to the valid pointer it is given.
        let r = unsafe { libc::waitpid(target, &mut status, flags) };
        if r == -1 {
            let e = last_errno();
            if e == Errno::INTR {
                continue;
            }
            return Err(e);
        }
        let Some(who) = pid(r) else {
            return Ok(None); // WNOHANG and nothing to report
        };
        if let Some(w) = Wait::decode(who, status) {
            return Ok(Some(w));
        }
    }
}

/// Send `sig` to one thread of process `tgid`.
pub(crate) fn tgkill(tgid: Pid, tid: Tid, sig: Signal) -> SysResult<()> {
    // SAFETY: tgkill takes plain integers.
    let r = unsafe {
        libc::syscall(
            libc::SYS_tgkill,
            tgid.as_raw_pid(),
            tid.as_raw_pid(),
            sig.as_raw(),
        )
    };
    if r == -1 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// Send `sig` to a process.
pub(crate) fn kill(pid: Pid, sig: Signal) -> SysResult<()> {
    // SAFETY: kill takes plain integers.
    if unsafe { libc::kill(pid.as_raw_pid(), sig.as_raw()) } == -1 {
        Err(last_errno())
    } else {
        Ok(())
    }
}

/// Read `buf.len()` bytes of `pid`'s memory at `addr`, with the target's own page
/// protections (`process_vm_readv`). Returns how many were read.
pub(crate) fn vm_read(pid: Pid, addr: u64, buf: &mut [u8]) -> SysResult<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the local iovec covers exactly `buf`, which is writable for its length;
    // the remote one is only an address in the other process, checked by the kernel.
    let r = unsafe { libc::process_vm_readv(pid.as_raw_pid(), &local, 1, &remote, 1, 0) };
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(r as usize)
    }
}

/// Write `data` into `pid`'s memory at `addr`, with the target's own page protections
/// (`process_vm_writev`: read-only pages fail). Returns how many were written.
pub(crate) fn vm_write(pid: Pid, addr: u64, data: &[u8]) -> SysResult<usize> {
    let local = libc::iovec {
        iov_base: data.as_ptr().cast_mut().cast(),
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut c_void,
        iov_len: data.len(),
    };
    // SAFETY: the local iovec covers exactly `data`, only read by this call; the remote
    // one is only an address in the other process, checked by the kernel.
    let r = unsafe { libc::process_vm_writev(pid.as_raw_pid(), &local, 1, &remote, 1, 0) };
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(r as usize)
    }
}

/// Fork a child that runs `child` and never returns into the caller. For the doorbell
/// only.
///
/// # Safety
/// `child` runs in a copy of this multi-threaded process where only the calling thread
/// exists: it may only make async-signal-safe calls. The child exits when it returns.
pub(crate) unsafe fn fork(child: impl FnOnce()) -> SysResult<Pid> {
    // SAFETY: the caller guarantees that the child side only does what is safe after a
    // fork in a multi-threaded process; it never returns into the caller's code.
    unsafe {
        match libc::fork() {
            -1 => Err(last_errno()),
            0 => {
                child();
                libc::_exit(127)
            }
            p => Ok(pid(p).expect("fork returns a positive pid to the parent")),
        }
    }
}

/// A pipe, both ends close-on-exec: `(read, write)`.
pub(crate) fn pipe() -> SysResult<(OwnedFd, OwnedFd)> {
    rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)
}

/// A connected pair of stream sockets, close-on-exec (the doorbell's line: unlike a
/// pipe, writing to it after the other end closed fails without raising `SIGPIPE`).
pub(crate) fn socket_pair() -> SysResult<(OwnedFd, OwnedFd)> {
    use rustix::net::{AddressFamily, SocketFlags, SocketType};
    rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::STREAM,
        SocketFlags::CLOEXEC,
        None,
    )
}

/// Send one byte without raising `SIGPIPE`, without blocking; async-signal-safe.
pub(crate) fn send_byte(fd: std::os::fd::BorrowedFd<'_>) -> SysResult<usize> {
    use rustix::net::SendFlags;
    rustix::net::send(fd, &[1], SendFlags::NOSIGNAL | SendFlags::DONTWAIT)
}

/// `write(2)` of a few bytes; async-signal-safe.
pub(crate) fn write_fd(fd: impl AsFd, data: &[u8]) -> SysResult<usize> {
    rustix::io::write(fd, data)
}

/// `read(2)`, retrying `EINTR`.
pub(crate) fn read_fd(fd: impl AsFd, buf: &mut [u8]) -> SysResult<usize> {
    loop {
        match rustix::io::read(fd.as_fd(), &mut *buf) {
            Err(Errno::INTR) => continue,
            r => return r,
        }
    }
}
