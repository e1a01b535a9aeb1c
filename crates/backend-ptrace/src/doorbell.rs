//! Waking the tracer loop from another thread (a Ctrl-C handler, a UI).
//!
//! The loop sleeps in `waitpid` on its own tracees and children only
//! (`__WNOTHREAD`: it never reaps children of the rest of the program), and nothing
//! but a child's change of state ends that sleep. So the doorbell *is* a child: a tiny
//! process forked by the tracer thread that blocks reading a socket and stops itself
//! (`SIGSTOP`) for every byte written to it. The loop sees the stop, sends `SIGCONT`,
//! and looks at the request flag. A signal to the tracee could not do this: a tracee
//! in group-stop reports nothing until it is continued.
//!
//! The child must outlive whatever the terminal or a careless `kill` does, or an idle
//! attached program could only be left by killing it: it starts its own session (a
//! terminal's ^C, ^\ and hang-up go to the foreground process group, which it is no
//! longer in), ignores every signal that can be ignored, closes every other file
//! descriptor (it must not keep anybody's pipe open), and dies with its parent thread
//! (`PR_SET_PDEATHSIG`). If it dies anyway (`SIGKILL`), the loop sees its exit and forks
//! a new one on the same socket, so a ring that is already written is still heard.
//! The line is a socket pair, not a pipe: ringing after the tracer is gone fails
//! quietly (`MSG_NOSIGNAL`) instead of raising `SIGPIPE` in the ringing program.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use multiprobe_core::Result;

use crate::error;
use crate::sys::{self, Pid, Signal, Tid};

/// The detach request and the doorbell that wakes the loop for it.
#[derive(Debug, Default)]
pub(crate) struct Bell {
    flag: Arc<AtomicBool>,
    line: Option<Line>,
}

/// The socket pair and the child listening on it.
#[derive(Debug)]
struct Line {
    /// Handles write here.
    ring: Arc<OwnedFd>,
    /// The child reads here; kept to start a new child on the same line.
    listen: OwnedFd,
    /// The live child, if any (`None` once it was reaped and none could be forked).
    child: Option<Pid>,
}

impl Bell {
    /// A handle for the request; starts the doorbell the first time. Call on the
    /// tracer thread.
    pub(crate) fn handle(&mut self) -> Result<DetachHandle> {
        if self.line.is_none() {
            let (ring, listen) =
                sys::socket_pair().map_err(|e| error::sys(e, "create the doorbell socket"))?;
            let child = Some(start(&listen)?);
            self.line = Some(Line {
                ring: Arc::new(ring),
                listen,
                child,
            });
        }
        let line = self.line.as_ref().expect("just created");
        Ok(DetachHandle {
            flag: Arc::clone(&self.flag),
            ring: Arc::clone(&line.ring),
        })
    }

    /// Whether a detach was requested.
    pub(crate) fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// The request was served.
    pub(crate) fn clear(&self) {
        self.flag.store(false, Ordering::SeqCst);
    }

    fn is_child(&self, tid: Tid) -> bool {
        self.line.as_ref().and_then(|l| l.child) == Some(tid)
    }

    /// A stop of `tid`: if it is the doorbell's (a ring), let it wait for the next one
    /// and return true.
    pub(crate) fn on_stop(&self, tid: Tid) -> bool {
        if !self.is_child(tid) {
            return false;
        }
        // Our unreaped child: its pid cannot have been reused.
        let _ = sys::kill(tid, Signal::CONT);
        true
    }

    /// An exit of `tid`: if it is the doorbell's, start a new one on the same line (a
    /// ring already written is heard by it) and return true.
    pub(crate) fn on_exit(&mut self, tid: Tid) -> bool {
        if !self.is_child(tid) {
            return false;
        }
        let line = self.line.as_mut().expect("is_child");
        // Reaped: its pid may belong to another process now, never signal it again.
        line.child = start(&line.listen).ok();
        true
    }
}

/// Fork a doorbell child reading `listen`. Call on the tracer thread.
fn start(listen: &OwnedFd) -> Result<Pid> {
    let parent = std::process::id() as i32;
    let rfd = listen.as_raw_fd();
    // Every signal stays blocked from before the fork until the child ignores them all,
    // so none can kill it in between; the parent's mask is put back right after.
    // SAFETY: sigfillset and pthread_sigmask on local sets, valid pointers.
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    };
    // SAFETY: the child only makes async-signal-safe system calls (prctl, getppid,
    // setsid, sigaction, sigprocmask, dup2, close_range, read, kill) and returns, which
    // `sys::fork` turns into `_exit`.
    let pid = unsafe {
        sys::fork(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::getppid() != parent {
                return; // the tracer thread is gone already
            }
            libc::setsid();
            for sig in 1..=64 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    // Some numbers are reserved or invalid: their failure is harmless.
                    libc::signal(sig, libc::SIG_IGN);
                }
            }
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut());
            if libc::dup2(rfd, 0) != 0 {
                return;
            }
            libc::syscall(libc::SYS_close_range, 1u32, u32::MAX, 0u32);
            let mut b = 0u8;
            loop {
                match libc::read(0, (&mut b as *mut u8).cast(), 1) {
                    1 => {
                        libc::kill(libc::getpid(), libc::SIGSTOP);
                    }
                    -1 if *libc::__errno_location() == libc::EINTR => {}
                    _ => return,
                }
            }
        })
    };
    // SAFETY: restoring this thread's mask from a set pthread_sigmask filled.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    pid.map_err(|e| error::sys(e, "fork the doorbell"))
}

impl Drop for Bell {
    fn drop(&mut self) {
        let Some(child) = self.line.as_mut().and_then(|l| l.child.take()) else {
            return;
        };
        let _ = sys::kill(child, Signal::KILL);
        while let Ok(Some(w)) = sys::wait(Some(child), false) {
            if w.is_end() {
                break;
            }
        }
    }
}

/// Asks a running [`crate::Tracer`] loop to detach, from any thread — or from a signal
/// handler: [`DetachHandle::request`] only stores a flag and sends one byte.
///
/// The loop then removes every breakpoint, moves threads out of the out-of-line
/// slots, detaches, and returns [`crate::Stop::Detached`].
#[derive(Clone, Debug)]
pub struct DetachHandle {
    flag: Arc<AtomicBool>,
    ring: Arc<OwnedFd>,
}

impl DetachHandle {
    /// Request the detach. Returns at once; async-signal-safe.
    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        // A full socket already holds a ring, and a closed one means the tracer is
        // gone: either way there is nothing more to do.
        let _ = sys::send_byte(self.ring.as_fd());
    }

    /// Whether a detach was requested.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }

    /// Wake the loop without asking it to detach: a [`crate::Tracer::run_until`]
    /// sleeping while the program makes no hit checks its condition again (a timer,
    /// a live view). Returns at once; async-signal-safe.
    pub fn wake(&self) {
        let _ = sys::send_byte(self.ring.as_fd());
    }
}
