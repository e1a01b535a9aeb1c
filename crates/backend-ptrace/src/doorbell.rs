//! Waking the tracer loop from another thread (a Ctrl-C handler, a UI).
//!
//! The loop sleeps in `waitpid` on its own tracees and children only
//! (`__WNOTHREAD`: it never reaps children of the rest of the program), and nothing
//! but a child's change of state ends that sleep. So the doorbell *is* a child: a tiny
//! process forked by the tracer thread that blocks reading a pipe and stops itself
//! (`SIGSTOP`) for every byte written to it. The loop sees the stop, sends `SIGCONT`,
//! and looks at the request flag. A signal to the tracee could not do this: a tracee
//! in group-stop reports nothing until it is continued.
//!
//! The child closes every other file descriptor (it must not keep anybody's pipe
//! open), dies with its parent thread (`PR_SET_PDEATHSIG`), and exits when the pipe's
//! write end is closed; the tracer kills and reaps it when dropped.

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use multiprobe_core::Result;

use crate::error;
use crate::sys::{self, Tid};

#[derive(Debug)]
pub(crate) struct Doorbell {
    pub(crate) pid: Tid,
    /// The loop reaped it already (its pid may belong to another process now).
    pub(crate) reaped: bool,
    bell: Arc<OwnedFd>,
}

impl Doorbell {
    /// Fork the doorbell child. Call on the tracer thread.
    pub(crate) fn new() -> Result<Doorbell> {
        let (r, w) = sys::pipe().map_err(|e| error::sys(e, "create the doorbell pipe"))?;
        let parent = std::process::id() as i32;
        let rfd = r.as_raw_fd();
        // SAFETY: the child only makes async-signal-safe system calls (prctl, getppid,
        // dup2, close_range, read, kill) and returns, which `sys::fork` turns into
        // `_exit`.
        let pid = unsafe {
            sys::fork(move || {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                if libc::getppid() != parent || libc::dup2(rfd, 0) != 0 {
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
        }
        .map_err(|e| error::sys(e, "fork the doorbell"))?;
        drop(r);
        Ok(Doorbell {
            pid,
            reaped: false,
            bell: Arc::new(w),
        })
    }

    /// The stop the loop saw was the doorbell's: let it wait for the next ring.
    pub(crate) fn rearm(&self) {
        let _ = sys::kill(self.pid, libc::SIGCONT);
    }

    pub(crate) fn handle(&self, flag: &Arc<AtomicBool>) -> DetachHandle {
        DetachHandle {
            flag: Arc::clone(flag),
            bell: Arc::clone(&self.bell),
        }
    }
}

impl Drop for Doorbell {
    fn drop(&mut self) {
        if self.reaped {
            return;
        }
        let _ = sys::kill(self.pid, libc::SIGKILL);
        while let Ok(Some(w)) = sys::wait(self.pid, false) {
            if !matches!(w, sys::Wait::Stopped { .. }) {
                break;
            }
        }
    }
}

/// Asks a running [`crate::Tracer`] loop to detach, from any thread — or from a signal
/// handler: [`DetachHandle::request`] only stores a flag and writes one byte.
///
/// The loop then removes every breakpoint, moves threads out of the out-of-line
/// slots, detaches, and returns [`crate::Stop::Detached`].
#[derive(Clone, Debug)]
pub struct DetachHandle {
    flag: Arc<AtomicBool>,
    bell: Arc<OwnedFd>,
}

impl DetachHandle {
    /// Request the detach. Returns at once; async-signal-safe.
    pub fn request(&self) {
        self.flag.store(true, Ordering::SeqCst);
        // A full pipe already holds a ring, and a closed one means the tracer is gone:
        // either way there is nothing more to do.
        let _ = sys::write_fd(self.bell.as_fd(), &[1]);
    }

    /// Whether a detach was requested.
    pub fn requested(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}
