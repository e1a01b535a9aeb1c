//! Ctrl-C, and dying of the same signal as the traced program.
//!
//! `attach`: SIGINT or SIGTERM asks the tracer loop to detach (through the backend's
//! signal-safe `DetachHandle`); the process runs on and the summary is printed.
//! `run`: the terminal sends SIGINT to the whole foreground group, so the program gets
//! it too and decides what to do; we keep serving it. A second SIGINT (a program that
//! ignores the first) detaches, leaving the program running, and prints the summary.

use std::fmt;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::OnceLock;

use multiprobe_backend_ptrace::{DetachHandle, Tracer};

/// A signal number, shown by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Signal(i32);

impl Signal {
    /// The signal numbered `n`, if there is one.
    pub fn new(n: i32) -> Option<Signal> {
        (1..=libc::SIGRTMAX()).contains(&n).then_some(Signal(n))
    }

    /// Its number.
    pub fn number(self) -> i32 {
        self.0
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [&str; 31] = [
            "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV",
            "USR2", "PIPE", "ALRM", "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN",
            "TTOU", "URG", "XCPU", "XFSZ", "VTALRM", "PROF", "WINCH", "IO", "PWR", "SYS",
        ];
        match NAMES.get((self.0 - 1) as usize) {
            Some(n) => write!(f, "SIG{n}"),
            None if self.0 >= libc::SIGRTMIN() => {
                write!(f, "SIGRTMIN+{}", self.0 - libc::SIGRTMIN())
            }
            None => write!(f, "signal {}", self.0),
        }
    }
}

static HANDLE: OnceLock<DetachHandle> = OnceLock::new();
static PRESSES: AtomicU32 = AtomicU32::new(0);
static ATTACHED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(sig: libc::c_int) {
    let presses = PRESSES.fetch_add(1, Ordering::SeqCst) + 1;
    let detach = ATTACHED.load(Ordering::SeqCst) || sig == libc::SIGTERM || presses >= 2;
    if detach {
        if let Some(h) = HANDLE.get() {
            // Async-signal-safe by the backend's contract.
            h.request();
        }
    }
}

/// Route SIGINT/SIGTERM to `tracer`'s detach. `attached`: the first signal detaches.
pub fn install(tracer: &mut Tracer, attached: bool) {
    ATTACHED.store(attached, Ordering::SeqCst);
    match tracer.detach_handle() {
        Ok(h) => {
            let _ = HANDLE.set(h);
        }
        Err(e) => {
            eprintln!("multiprobe: Ctrl-C will not detach cleanly: {e}");
            return;
        }
    }
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: installing a handler that only touches atomics and the backend's
        // async-signal-safe detach request.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as usize;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// End this process killed by `sig`, as the traced program was (a shell then sees
/// exactly what it would have seen unprobed). Falls back to exit status 128 + `sig`.
pub fn die_of(sig: Signal) -> ExitCode {
    // SAFETY: restoring the default action, unblocking and raising the signal on
    // ourselves; a core dump of multiprobe is not what the user asked for, so turn it off.
    unsafe {
        let lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        libc::setrlimit(libc::RLIMIT_CORE, &lim);
        libc::signal(sig.0, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig.0);
        libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig.0);
    }
    ExitCode::from((128 + sig.0).clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_are_named() {
        assert_eq!(Signal::new(9).unwrap().to_string(), "SIGKILL");
        assert_eq!(Signal::new(libc::SIGHUP).unwrap().to_string(), "SIGHUP");
        assert_eq!(Signal::new(libc::SIGSYS).unwrap().to_string(), "SIGSYS");
        let rt = Signal::new(libc::SIGRTMIN() + 2).unwrap();
        assert_eq!(rt.to_string(), "SIGRTMIN+2");
        assert_eq!(Signal::new(0), None);
        assert_eq!(Signal::new(libc::SIGRTMAX() + 1), None);
    }
}
