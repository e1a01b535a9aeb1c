//! Signals to multiprobe: every one that would end it detaches first, from before the
//! first breakpoint is written to the end.
//!
//! A signal whose default action ends a process would otherwise kill multiprobe with its
//! `int3`s still in the program, which then dies of SIGTRAP at its next hit. So the
//! handler is installed before the program is spawned or attached to ([`install`]), and
//! it only records the signal and asks the tracer loop to detach through the backend's
//! async-signal-safe [`DetachHandle`] ([`arm`]); a placement in progress stops between
//! two sites. After the detach (every original byte back, the program running on
//! untraced) multiprobe prints its summary and ends as the signal would have ended it:
//!
//! | signal | `attach` | `run` |
//! |---|---|---|
//! | SIGINT | detach, exit 0 | the program gets it (from the terminal; or forwarded, when it was sent to multiprobe alone) and decides; multiprobe serves on. A second one detaches (the program runs on) and multiprobe dies of SIGINT |
//! | SIGTERM | detach, exit 0 | detach, send SIGTERM to the program, die of SIGTERM |
//! | SIGHUP, SIGQUIT, SIGABRT, SIGUSR1, SIGUSR2, SIGALRM, SIGVTALRM, SIGPROF, SIGIO, SIGPWR, SIGSTKFLT, SIGXCPU, SIGRTMIN..SIGRTMAX | detach, die of it | detach, send it to the program unless the terminal sent it there already, die of it |
//! | SIGXFSZ | ignored: `-o` reaching `ulimit -f` is a write error (EFBIG), reported at the end | same |
//! | SIGPIPE | ignored (Rust's runtime does): a closed pipe is a write error | same |
//! | ignored when multiprobe started (`nohup`) | stays ignored | same; the program inherits that |
//!
//! Why `run` passes the signal on: `multiprobe run -- CMD` stands in for `CMD`, so a
//! signal meant to end it is meant for the program — a closed terminal or ssh session
//! must not leave a spawned program running on where it would have died unprobed. It is
//! what strace does for the command it started (gdb kills it; passing the signal lets a
//! program that ignores or handles it, a `nohup`'d one say, decide as it would have). It
//! is sent after the detach, so the program meets it unprobed. A signal the terminal
//! generated (`si_code` SI_KERNEL: ^C, ^\, a hang-up) went to the whole foreground
//! process group, the program included, and is not sent again; one sent with `kill` to
//! the process group reaches the program twice (strace has the same limit).
//!
//! `attach` ends with exit status 0 on SIGINT and SIGTERM because they are how an
//! attach session is meant to be ended; the others are incidents its caller should see.
//!
//! Not covered: SIGKILL and SIGSTOP cannot be caught (a spawned program dies with
//! multiprobe through the backend's PTRACE_O_EXITKILL; an attached one is detached by the
//! kernel with its breakpoints left in), and a fault of multiprobe's own (SIGSEGV,
//! SIGBUS, SIGILL, SIGFPE, SIGTRAP, SIGSYS) is a crash where nothing can be trusted to
//! detach.

use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU8, Ordering::SeqCst};
use std::sync::OnceLock;

use multiprobe_backend_ptrace::DetachHandle;
pub use multiprobe_backend_ptrace::Signal;

use crate::Mode;

/// A signal by its name, `SIGKILL`, `SIGRTMIN+2` (the backend's [`Signal`] says
/// `signal 9 (Killed)`; people who send signals know them by these names).
pub fn name(sig: Signal) -> String {
    const NAMES: [&str; 31] = [
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2",
        "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG",
        "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
    ];
    let n = sig.as_raw();
    match NAMES.get((n - 1) as usize) {
        Some(name) => format!("SIG{name}"),
        None if n >= libc::SIGRTMIN() => format!("SIGRTMIN+{}", n - libc::SIGRTMIN()),
        None => format!("signal {n}"),
    }
}

/// The signal that ended the session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ending {
    /// Which.
    pub signal: Signal,
    /// The terminal (the kernel) sent it, to the whole foreground process group.
    pub from_terminal: bool,
}

/// The signals handled: every one whose default action ends the process and that is
/// not a fault of multiprobe's own.
fn handled() -> impl Iterator<Item = i32> {
    [
        libc::SIGHUP,
        libc::SIGINT,
        libc::SIGQUIT,
        libc::SIGABRT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGTERM,
        libc::SIGSTKFLT,
        libc::SIGXCPU,
        libc::SIGVTALRM,
        libc::SIGPROF,
        libc::SIGIO,
        libc::SIGPWR,
    ]
    .into_iter()
    .chain(libc::SIGRTMIN()..=libc::SIGRTMAX())
}

const RUN: u8 = 1;
const ATTACH: u8 = 2;
/// In [`ENDING`], beside the signal number: it came from the terminal.
const FROM_TERMINAL: i32 = 1 << 16;

/// This process (a child forked before its exec must not act on our handler).
static OURS: AtomicI32 = AtomicI32::new(0);
static MODE: AtomicU8 = AtomicU8::new(0);
/// `run`: the program, for passing on a SIGINT sent to multiprobe alone.
static PROGRAM: AtomicI32 = AtomicI32::new(0);
static INTERRUPTS: AtomicU32 = AtomicU32::new(0);
/// The first signal that ends the session (0: none yet), with [`FROM_TERMINAL`].
static ENDING: AtomicI32 = AtomicI32::new(0);
static HANDLE: OnceLock<DetachHandle> = OnceLock::new();

/// The handler: only atomics, `kill`, and the backend's async-signal-safe detach
/// request; `errno` is saved and restored for the interrupted code.
extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: `__errno_location` returns this thread's errno, valid for the thread's
    // life; reading and writing it is what every signal handler that makes system calls
    // must do.
    let errno = unsafe { *libc::__errno_location() };
    // SAFETY: getpid has no preconditions.
    if unsafe { libc::getpid() } == OURS.load(SeqCst) {
        // SAFETY: with SA_SIGINFO the kernel passes a valid siginfo (checked for null
        // all the same).
        let from_terminal = !info.is_null() && unsafe { (*info).si_code } == libc::SI_KERNEL;
        handle(sig, from_terminal);
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

fn handle(sig: i32, from_terminal: bool) {
    if sig == libc::SIGINT && MODE.load(SeqCst) == RUN && INTERRUPTS.fetch_add(1, SeqCst) == 0 {
        let program = PROGRAM.load(SeqCst);
        if !from_terminal && program > 0 {
            // SAFETY: kill is async-signal-safe; `program` is our unreaped child (a
            // zombie at worst), so the pid cannot belong to another process.
            unsafe { libc::kill(program, libc::SIGINT) };
        }
        return;
    }
    let code = sig | if from_terminal { FROM_TERMINAL } else { 0 };
    let _ = ENDING.compare_exchange(0, code, SeqCst, SeqCst);
    if let Some(h) = HANDLE.get() {
        h.request();
    }
}

/// Install the handlers (and ignore SIGXFSZ) for a session of `mode`: call before the
/// program is spawned or attached to. A signal ignored when multiprobe started stays
/// ignored.
pub fn install(mode: Mode) {
    // SAFETY: getpid has no preconditions.
    OURS.store(unsafe { libc::getpid() }, SeqCst);
    MODE.store(
        match mode {
            Mode::Run => RUN,
            Mode::Attach => ATTACH,
        },
        SeqCst,
    );
    for sig in handled() {
        // SAFETY: querying and setting dispositions with fully initialized `sigaction`
        // structs; the handler is async-signal-safe (see `on_signal`), and blocks every
        // signal while it runs (`sigfillset`), so it never nests.
        unsafe {
            let mut old: libc::sigaction = std::mem::zeroed();
            if libc::sigaction(sig, std::ptr::null(), &mut old) != 0
                || old.sa_sigaction == libc::SIG_IGN
            {
                continue;
            }
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
            libc::sigfillset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    // SAFETY: ignoring a signal involves no handler code.
    unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
}

/// The tracer exists: signals now ask `handle` to detach (and one that came already
/// does so at once). `program`: for `run`, the spawned program.
pub fn arm(handle: DetachHandle, program: Option<i32>) {
    PROGRAM.store(program.unwrap_or(0), SeqCst);
    let _ = HANDLE.set(handle);
    // A signal between `install` and here found no handle: ask now. (One that arrives
    // from here on finds it; asking twice is harmless.)
    if ENDING.load(SeqCst) != 0 {
        if let Some(h) = HANDLE.get() {
            h.request();
        }
    }
}

/// The signal that ended the session, if one did.
pub fn ending() -> Option<Ending> {
    let code = ENDING.load(SeqCst);
    Signal::from_raw(code & !FROM_TERMINAL).map(|signal| Ending {
        signal,
        from_terminal: code & FROM_TERMINAL != 0,
    })
}

/// `run`, after the detach: pass `ending` on to the program (see the module docs).
pub fn pass_on(program: i32, ending: Ending) {
    if ending.from_terminal || ending.signal == Signal::INT {
        return;
    }
    // SAFETY: `program` is our child and not reaped (the session ended by detaching), so
    // the pid is still its own; kill touches no memory.
    unsafe { libc::kill(program, ending.signal.as_raw()) };
}

/// End this process killed by `sig`, as the traced program was (a shell then sees
/// exactly what it would have seen unprobed) or as the signal that ended the session
/// would have ended it. Falls back to exit status 128 + `sig`.
pub fn die_of(sig: Signal) -> ExitCode {
    // SAFETY: restoring the default action, unblocking and raising the signal on
    // ourselves; a core dump of multiprobe is not what the user asked for, so turn it off.
    unsafe {
        let lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &lim);
        libc::signal(sig.as_raw(), libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig.as_raw());
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig.as_raw());
    }
    ExitCode::from((128 + sig.as_raw()).clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_named() {
        let named = |n| name(Signal::from_raw(n).unwrap());
        assert_eq!(named(9), "SIGKILL");
        assert_eq!(named(libc::SIGHUP), "SIGHUP");
        assert_eq!(named(libc::SIGSYS), "SIGSYS");
        assert_eq!(named(libc::SIGRTMIN() + 2), "SIGRTMIN+2");
    }
}
