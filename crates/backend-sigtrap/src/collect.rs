//! The thread that finishes in thread context what handlers asked for from inside a
//! signal handler: removals (`PreAction::Remove`, `unregister` or a guard dropped in a
//! handler), which the core can only request there. Its work is the core's
//! [`Dispatcher::collect`](multiprobe_core::Dispatcher::collect) on every registry:
//! forget the removed handlers, disarm the sites left without one — so a probe whose
//! last handler removed itself stops trapping soon after, without the program calling
//! into the registry.
//!
//! The signal path rings a bell after a hit if some registry has requests pending: a
//! futex word, and one `FUTEX_WAKE` system call (async-signal-safe) when it was not
//! already ringing. The thread waits on it otherwise, so it costs nothing while idle.
//!
//! It blocks every signal but the synchronous ones (a fault or trap there must not be
//! forced to the default action), so the program's own signals keep going to its own
//! threads. After `fork` the child has no such thread until it creates another backend;
//! its registries still collect at their next operation.

use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};
use std::sync::Mutex;

use crate::dispatchers;

/// 1 while requests wait for the thread.
static BELL: AtomicU32 = AtomicU32::new(0);
/// The process the thread runs in (0: none yet); a forked child has none.
static RUNNING_IN: AtomicI32 = AtomicI32::new(0);
static START: Mutex<()> = Mutex::new(());

/// Start the thread unless this process has it. Thread context; idempotent.
pub(crate) fn start() {
    // SAFETY: no preconditions.
    let pid = unsafe { libc::getpid() };
    if RUNNING_IN.load(Ordering::Acquire) == pid {
        return;
    }
    let _g = START.lock().unwrap_or_else(|p| p.into_inner());
    if RUNNING_IN.load(Ordering::Acquire) == pid {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("multiprobe-collect".into())
        .spawn(run);
    // Without it, removals are still finished by the registries' next operations.
    if spawned.is_ok() {
        RUNNING_IN.store(pid, Ordering::Release);
    }
}

/// After a hit: wake the thread if some registry has removals to finish.
/// Async-signal-safe (and a system call only when the bell was not ringing yet).
#[inline]
pub(crate) fn ring_if_pending() {
    if dispatchers::each().any(|d| d.removals_pending()) && BELL.swap(1, Ordering::Release) == 0 {
        futex(libc::FUTEX_WAKE, 1);
    }
}

fn futex(op: libc::c_int, val: u32) {
    // SAFETY: a futex operation on a static word; no other memory is touched.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            BELL.as_ptr(),
            op | libc::FUTEX_PRIVATE_FLAG,
            val,
            std::ptr::null::<libc::timespec>(),
        )
    };
}

fn block_asynchronous_signals() {
    // SAFETY: building a local sigset and setting this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut set);
        for s in [
            libc::SIGTRAP,
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGFPE,
            libc::SIGILL,
        ] {
            libc::sigdelset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

fn run() {
    block_asynchronous_signals();
    loop {
        if BELL.swap(0, Ordering::Acquire) == 0 {
            // Sleeps only while the bell is still 0: a ring after the swap wakes us.
            futex(libc::FUTEX_WAIT, 0);
            continue;
        }
        for d in dispatchers::each() {
            d.collect();
        }
    }
}
