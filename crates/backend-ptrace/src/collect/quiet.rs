//! Rule 3 (quiescence) for collectors that run in the tracee.
//!
//! A jumped site's list changes by an `int3` over its jump, written at once from the
//! changing thread; a tracee thread that had already taken the jump runs the old
//! trampoline's actions to their end, and would write a record of a handler whose
//! `unregister` returned meanwhile. So `unregister` waits ([`Quiet::wait`], the
//! backend's [`multiprobe_core::backend::Backend::quiesce`]) until the tracer has
//! stopped every thread once after the change and let each one standing in action
//! code run out of it ([`Tracer::finish_actions`](crate::tracer::Tracer)): from then
//! on no thread can be in the old actions (one stopped before the jump fetches the
//! `int3` when resumed).
//!
//! Invariants:
//! * `changes` counts the changes of jumped sites' lists; `settled` is the largest
//!   count every change up to which the tracer has made safe. `settled <= changes`,
//!   except after [`Quiet::end`], when nothing of ours runs in the process any more.
//! * A waiter never waits on the tracer thread itself (its loop is not running while
//!   it waits) and never holds the backend's state lock.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::thread::ThreadId;

/// How often a waiter wakes the tracer's loop again.
const NUDGE_EVERY: std::time::Duration = std::time::Duration::from_millis(10);

/// The changes of in-tracee lists and how far the tracer has made them safe.
#[derive(Debug)]
pub(crate) struct Quiet {
    changes: AtomicU64,
    settled: Mutex<u64>,
    cv: Condvar,
    /// The thread that runs the tracer's loop (waiting there would wait forever).
    tracer: ThreadId,
}

impl Quiet {
    /// For a tracer whose loop runs on the calling thread.
    pub(crate) fn new() -> Quiet {
        Quiet {
            changes: AtomicU64::new(0),
            settled: Mutex::new(0),
            cv: Condvar::new(),
            tracer: std::thread::current().id(),
        }
    }

    /// A jumped site's list changed (its `int3` is written).
    pub(crate) fn changed(&self) {
        self.changes.fetch_add(1, Ordering::AcqRel);
    }

    /// The changes so far: what a pause that starts now can settle.
    pub(crate) fn target(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    /// Whether changes up to `target` are still to be settled.
    pub(crate) fn behind(&self, target: u64) -> bool {
        *self.lock() < target
    }

    /// Every change up to `target` is safe: no thread is in old action code.
    pub(crate) fn settle(&self, target: u64) {
        let mut s = self.lock();
        if *s < target {
            *s = target;
            self.cv.notify_all();
        }
    }

    /// The process is gone, detached, or replaced its image: none of our code runs in
    /// it, so no change is left to wait for.
    pub(crate) fn end(&self) {
        *self.lock() = u64::MAX;
        self.cv.notify_all();
    }

    /// Back to tracking changes (a new image gets trampolines again).
    pub(crate) fn restart(&self) {
        let mut s = self.lock();
        *s = self.changes.load(Ordering::Acquire);
        self.cv.notify_all();
    }

    /// Wait until every change made before this call is settled, calling `nudge` (which
    /// wakes the tracer's loop) every few milliseconds meanwhile: a loop that put the
    /// rework off (the program's turn after a long pause) sleeps until something wakes
    /// it, and a promoted program makes no stops. On the tracer thread it returns at
    /// once: its loop, which settles, is not running (the process is held between
    /// runs, and a thread left in old action code finishes the hit that began before
    /// the change when the next run resumes it).
    pub(crate) fn wait(&self, nudge: impl Fn()) {
        let target = self.target();
        if std::thread::current().id() == self.tracer {
            return;
        }
        let mut s = self.lock();
        while *s < target {
            let (next, timeout) = self
                .cv
                .wait_timeout(s, NUDGE_EVERY)
                .unwrap_or_else(|p| p.into_inner());
            s = next;
            if timeout.timed_out() && *s < target {
                drop(s);
                nudge();
                s = self.lock();
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, u64> {
        // A plain number: a panic elsewhere cannot leave it inconsistent.
        self.settled.lock().unwrap_or_else(|p| p.into_inner())
    }
}
