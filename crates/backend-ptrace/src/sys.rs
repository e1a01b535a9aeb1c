//! The thin typed layer over the system calls this backend makes: ptrace, waitpid,
//! signals, remote memory. Every `unsafe` block of the crate's process control lives
//! here, each next to the one fact that makes it sound.
//!
//! Errors come back as [`Errno`], a plain value; nothing outside reads the global
//! `errno`. Mapping to the core's error enum happens in [`crate::error`].

use std::io;

/// A kernel thread id (or process id: the id of its leader).
pub type Tid = i32;

/// An `errno` value from a failed system call.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const EPERM: Errno = Errno(libc::EPERM);
    pub const ESRCH: Errno = Errno(libc::ESRCH);
    pub const EINTR: Errno = Errno(libc::EINTR);
    pub const ECHILD: Errno = Errno(libc::ECHILD);

    fn last() -> Errno {
        Errno(
            io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        )
    }

    /// As a standard I/O error.
    pub fn io(self) -> io::Error {
        io::Error::from_raw_os_error(self.0)
    }
}

impl std::fmt::Debug for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.io())
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self, f)
    }
}

pub type SysResult<T> = Result<T, Errno>;

fn check(r: libc::c_long) -> SysResult<libc::c_long> {
    if r == -1 {
        Err(Errno::last())
    } else {
        Ok(r)
    }
}

/// The registers as `PTRACE_GETREGS` returns them.
pub type UserRegs = libc::user_regs_struct;

/// `PTRACE_O_*` options this backend sets on every tracee.
pub const OPTIONS: libc::c_int = libc::PTRACE_O_TRACESYSGOOD
    | libc::PTRACE_O_TRACECLONE
    | libc::PTRACE_O_TRACEFORK
    | libc::PTRACE_O_TRACEVFORK
    | libc::PTRACE_O_TRACEEXEC;

/// Raw ptrace with an address and data argument.
///
/// Every request this module makes goes through here, and is counted (see
/// [`Requests`]). The kernel validates `tid` and the request; the pointers passed in
/// `addr`/`data` are the caller's concern, which is why the wrappers below are the only
/// users.
fn ptrace(req: libc::c_uint, tid: Tid, addr: usize, data: usize) -> SysResult<libc::c_long> {
    count(req);
    // SAFETY: ptrace with these requests reads or writes at most the buffer `data`
    // points to, which each caller below provides with the right size (or passes an
    // integer where the request takes one).
    check(unsafe { libc::ptrace(req, tid, addr, data) })
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

impl std::ops::Add for Requests {
    type Output = Requests;
    fn add(self, o: Requests) -> Requests {
        Requests {
            get_regs: self.get_regs + o.get_regs,
            set_regs: self.set_regs + o.set_regs,
            peek_user: self.peek_user + o.peek_user,
            poke_user: self.poke_user + o.poke_user,
            get_sig_info: self.get_sig_info + o.get_sig_info,
            cont: self.cont + o.cont,
            other: self.other + o.other,
        }
    }
}

impl std::ops::Sub for Requests {
    type Output = Requests;
    fn sub(self, o: Requests) -> Requests {
        Requests {
            get_regs: self.get_regs - o.get_regs,
            set_regs: self.set_regs - o.set_regs,
            peek_user: self.peek_user - o.peek_user,
            poke_user: self.poke_user - o.poke_user,
            get_sig_info: self.get_sig_info - o.get_sig_info,
            cont: self.cont - o.cont,
            other: self.other - o.other,
        }
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

/// Attach to `tid` without stopping it (`PTRACE_SEIZE`), with [`OPTIONS`].
pub fn seize(tid: Tid) -> SysResult<()> {
    ptrace(libc::PTRACE_SEIZE, tid, 0, OPTIONS as usize).map(drop)
}

/// Stop a seized, running thread (`PTRACE_INTERRUPT`); it reports `PTRACE_EVENT_STOP`.
pub fn interrupt(tid: Tid) -> SysResult<()> {
    ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0).map(drop)
}

/// Resume a stopped thread, delivering `sig` (0 for none).
pub fn cont(tid: Tid, sig: i32) -> SysResult<()> {
    ptrace(libc::PTRACE_CONT, tid, 0, sig as usize).map(drop)
}

/// Resume until the next system call entry or exit.
pub fn cont_syscall(tid: Tid, sig: i32) -> SysResult<()> {
    ptrace(libc::PTRACE_SYSCALL, tid, 0, sig as usize).map(drop)
}

/// Execute one instruction.
pub fn single_step(tid: Tid, sig: i32) -> SysResult<()> {
    ptrace(libc::PTRACE_SINGLESTEP, tid, 0, sig as usize).map(drop)
}

/// Leave a thread in group-stop but let it report the next event (`PTRACE_LISTEN`).
pub fn listen(tid: Tid) -> SysResult<()> {
    ptrace(libc::PTRACE_LISTEN, tid, 0, 0).map(drop)
}

/// Stop tracing a stopped thread; it resumes, receiving `sig` (0 for none).
pub fn detach(tid: Tid, sig: i32) -> SysResult<()> {
    ptrace(libc::PTRACE_DETACH, tid, 0, sig as usize).map(drop)
}

/// The thread's general registers.
pub fn get_regs(tid: Tid) -> SysResult<UserRegs> {
    // SAFETY: user_regs_struct is plain integers; all-zero is a valid value.
    let mut regs: UserRegs = unsafe { std::mem::zeroed() };
    ptrace(
        libc::PTRACE_GETREGS,
        tid,
        0,
        &mut regs as *mut UserRegs as usize,
    )?;
    Ok(regs)
}

/// Set the thread's general registers.
pub fn set_regs(tid: Tid, regs: &UserRegs) -> SysResult<()> {
    ptrace(
        libc::PTRACE_SETREGS,
        tid,
        0,
        regs as *const UserRegs as usize,
    )
    .map(drop)
}

/// Read one register: `offset` is the byte offset of a field in [`UserRegs`]
/// (`PTRACE_PEEKUSER`). Two thirds of the cost of `PTRACE_GETREGS` here: what a hit
/// reads when no handler wants the registers (only `rip`, to know where it is).
pub fn peek_user(tid: Tid, offset: usize) -> SysResult<u64> {
    count(libc::PTRACE_PEEKUSER);
    let mut word: u64 = 0;
    // SAFETY: the raw system call (not glibc's wrapper, whose return value cannot tell
    // a word of all ones from an error) stores the word at `data`, which points to a
    // u64 that lives across the call.
    check(unsafe {
        libc::syscall(
            libc::SYS_ptrace,
            libc::PTRACE_PEEKUSER,
            tid,
            offset,
            &mut word as *mut u64,
        )
    })?;
    Ok(word)
}

/// Set one register: `offset` is the byte offset of a field in [`UserRegs`]
/// (`PTRACE_POKEUSER`). A third of the cost of `PTRACE_SETREGS` here, which is what
/// makes the common write-back — only `rip` moved — cheap.
pub fn poke_user(tid: Tid, offset: usize, value: u64) -> SysResult<()> {
    ptrace(libc::PTRACE_POKEUSER, tid, offset, value as usize).map(drop)
}

/// The extra word of the last `PTRACE_EVENT_*` stop (a new thread's id, the former id
/// of a thread that exec'd, ...).
pub fn event_msg(tid: Tid) -> SysResult<u64> {
    let mut msg: libc::c_ulong = 0;
    ptrace(
        libc::PTRACE_GETEVENTMSG,
        tid,
        0,
        &mut msg as *mut libc::c_ulong as usize,
    )?;
    Ok(msg)
}

/// What a signal-delivery-stop is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SigInfo {
    pub signo: i32,
    pub code: i32,
    /// `si_addr` (fault address) for fault signals, else 0.
    pub addr: u64,
    /// `si_pid` for signals sent by a process, else 0.
    pub pid: i32,
}

/// `si_code` of signals the kernel raises itself (an `int3`, a general protection fault).
pub use libc::SI_KERNEL;

/// The siginfo of the signal a thread is stopped for. `EINVAL` in group-stop.
pub fn sig_info(tid: Tid) -> SysResult<SigInfo> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value.
    let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
    ptrace(
        libc::PTRACE_GETSIGINFO,
        tid,
        0,
        &mut si as *mut libc::siginfo_t as usize,
    )?;
    let is_fault = matches!(
        si.si_signo,
        libc::SIGSEGV | libc::SIGBUS | libc::SIGILL | libc::SIGFPE | libc::SIGTRAP
    );
    let sent = si.si_code <= 0;
    Ok(SigInfo {
        signo: si.si_signo,
        code: si.si_code,
        addr: if is_fault && !sent {
            // SAFETY: the kernel fills si_addr for the fault signals it raises itself.
            unsafe { si.si_addr() as u64 }
        } else {
            0
        },
        pid: if sent {
            // SAFETY: signals sent by a process (si_code <= 0) carry si_pid.
            unsafe { si.si_pid() }
        } else {
            0
        },
    })
}

/// The complete siginfo of a signal-delivery-stop, kept to deliver the signal later
/// exactly as it was.
#[derive(Clone, Copy)]
pub struct RawSigInfo(pub libc::siginfo_t);

impl RawSigInfo {
    pub fn signo(&self) -> i32 {
        self.0.si_signo
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
pub fn sig_info_raw(tid: Tid) -> SysResult<RawSigInfo> {
    // SAFETY: siginfo_t is plain data; all-zero is a valid value.
    let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
    ptrace(
        libc::PTRACE_GETSIGINFO,
        tid,
        0,
        &mut si as *mut libc::siginfo_t as usize,
    )?;
    Ok(RawSigInfo(si))
}

/// Replace the siginfo of the signal `tid` is stopped for (at a signal-delivery-stop,
/// the signal then delivered with `cont(tid, info.signo())` carries exactly `info`).
pub fn set_sig_info(tid: Tid, info: &RawSigInfo) -> SysResult<()> {
    ptrace(
        libc::PTRACE_SETSIGINFO,
        tid,
        0,
        &info.0 as *const libc::siginfo_t as usize,
    )
    .map(drop)
}

/// How a waited-for thread changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wait {
    /// It exited with this code.
    Exited(Tid, i32),
    /// It was killed by this signal.
    Signaled(Tid, i32),
    /// It stopped. `sig` is `WSTOPSIG` (`SIGTRAP | 0x80` for a syscall-stop), `event`
    /// the `PTRACE_EVENT_*` in bits 16.. of the status (0 for a signal-delivery-stop).
    Stopped { tid: Tid, sig: i32, event: i32 },
}

impl Wait {
    pub fn tid(&self) -> Tid {
        match *self {
            Wait::Exited(t, _) | Wait::Signaled(t, _) | Wait::Stopped { tid: t, .. } => t,
        }
    }
}

/// Wait for a change of `tid` (-1: any) among the calling thread's own tracees and
/// children (`__WALL | __WNOTHREAD`: never another thread's children). `WUNTRACED`
/// also reports stops of untraced children (the doorbell). Retries `EINTR`.
pub fn wait(tid: Tid, nohang: bool) -> SysResult<Option<Wait>> {
    let flags =
        libc::__WALL | libc::__WNOTHREAD | libc::WUNTRACED | if nohang { libc::WNOHANG } else { 0 };
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int to the valid pointer it is given.
        let r = unsafe { libc::waitpid(tid, &mut status, flags) };
        if r == -1 {
            let e = Errno::last();
            if e == Errno::EINTR {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Ok(None);
        }
        let w = if libc::WIFEXITED(status) {
            Wait::Exited(r, libc::WEXITSTATUS(status))
        } else if libc::WIFSIGNALED(status) {
            Wait::Signaled(r, libc::WTERMSIG(status))
        } else if libc::WIFSTOPPED(status) {
            Wait::Stopped {
                tid: r,
                sig: libc::WSTOPSIG(status),
                event: status >> 16,
            }
        } else {
            continue; // WIFCONTINUED is not asked for.
        };
        return Ok(Some(w));
    }
}

/// Send `sig` to one thread of process `tgid`.
pub fn tgkill(tgid: Tid, tid: Tid, sig: i32) -> SysResult<()> {
    // SAFETY: tgkill takes plain integers.
    check(unsafe { libc::syscall(libc::SYS_tgkill, tgid, tid, sig) }).map(drop)
}

/// Send `sig` to a process.
pub fn kill(pid: Tid, sig: i32) -> SysResult<()> {
    // SAFETY: kill takes plain integers.
    check(unsafe { libc::kill(pid, sig) } as libc::c_long).map(drop)
}

/// Read `buf.len()` bytes of `pid`'s memory at `addr`, with the target's own page
/// protections (`process_vm_readv`). Returns how many were read.
pub fn vm_read(pid: Tid, addr: u64, buf: &mut [u8]) -> SysResult<usize> {
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: the local iovec covers exactly `buf`, which is writable for its length;
    // the remote one is only an address in the other process, checked by the kernel.
    let r = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    check(r as libc::c_long).map(|n| n as usize)
}

/// Write `data` into `pid`'s memory at `addr`, with the target's own page protections
/// (`process_vm_writev`: read-only pages fail). Returns how many were written.
pub fn vm_write(pid: Tid, addr: u64, data: &[u8]) -> SysResult<usize> {
    let local = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    let remote = libc::iovec {
        iov_base: addr as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: the local iovec covers exactly `data`, only read by this call; the remote
    // one is only an address in the other process, checked by the kernel.
    let r = unsafe { libc::process_vm_writev(pid, &local, 1, &remote, 1, 0) };
    check(r as libc::c_long).map(|n| n as usize)
}

/// Fork a child that runs `child` and must never return into Rust code that is not
/// async-signal-safe. For the doorbell only.
///
/// # Safety
/// `child` runs in a copy of this multi-threaded process where only the calling thread
/// exists: it may only make async-signal-safe calls. The child exits when it returns.
pub unsafe fn fork(child: impl FnOnce()) -> SysResult<Tid> {
    // SAFETY: the caller guarantees that the child side only does what is safe after a
    // fork in a multi-threaded process; it never returns into the caller's code.
    unsafe {
        match libc::fork() {
            -1 => Err(Errno::last()),
            0 => {
                child();
                libc::_exit(127)
            }
            p => Ok(p),
        }
    }
}

/// A pipe, both ends close-on-exec: `(read, write)`.
pub fn pipe() -> SysResult<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the valid two-element array.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } as libc::c_long)?;
    // SAFETY: both fds were just created and are owned by nobody else.
    Ok(unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    })
}

/// `write(2)` of a few bytes; async-signal-safe.
pub fn write_fd(fd: std::os::fd::BorrowedFd<'_>, data: &[u8]) -> SysResult<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: the buffer is valid for `data.len()` bytes; the fd is borrowed, so open.
    let r = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
    check(r as libc::c_long).map(|n| n as usize)
}

/// `read(2)`, retrying `EINTR`.
pub fn read_fd(fd: std::os::fd::BorrowedFd<'_>, buf: &mut [u8]) -> SysResult<usize> {
    use std::os::fd::AsRawFd;
    loop {
        // SAFETY: the buffer is valid and writable for its length; the fd is open.
        let r = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        match check(r as libc::c_long) {
            Err(Errno::EINTR) => continue,
            r => return r.map(|n| n as usize),
        }
    }
}
