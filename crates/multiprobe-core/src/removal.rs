//! Removing a handler from inside a dispatch without a lock or an allocation: what
//! [`crate::PreAction::Remove`] does, and an unregister from a handler of a backend that
//! dispatches in signal handlers.
//!
//! A *request* has three parts, all atomics, so it may be made anywhere, a signal handler
//! that interrupted the registry's writer included:
//! * the handler's `requested` flag, set once: every walk that can still reach the
//!   handler skips it from then on, so it is never called again;
//! * the table's *gate*: requests whose handler some view a reader can reach may still
//!   list. Walks look at handlers' flags only while it is open (not zero), so a table with
//!   no removal in flight pays one load per hit for all of this, not one per handler;
//! * a lock-free stack of the requested entries (pushed by requesters, emptied whole by
//!   the writer, so no ABA), each holding a strong reference the requester took, so the
//!   writer finds them without scanning and they outlive their unlinking.
//!
//! The writer *collects* in thread context, under its lock (the registry's collection
//! points: every operation that changes the table, `Registry::collect`,
//! `Dispatcher::collect`): it takes the whole stack, unregisters each handler still
//! registered (the last one at a site disarms it), and closes the gate by that many once
//! the grace period of those unlinks has passed — once no reader can reach a view that
//! lists them.
//!
//! Invariants: an entry is pushed at most once (only the request that sets its flag
//! pushes it); the gate is at least the number of requested entries listed by a view
//! some reader can reach (it is raised before the push, lowered only after a grace
//! period that follows the unlink).

use crate::sync::atomic::{
    AtomicBool, AtomicPtr, AtomicUsize,
    Ordering::{Acquire, Relaxed, Release},
};
use crate::sync::{Arc, Mutex};
use crate::table::HandlerEntry;

/// A handler's side of a request (a field of its entry).
///
/// Invariant: `home` is the requests of the table the entry is registered in, and is
/// dereferenced only by a request made through a view of that table, inside one of its
/// read sections — while the table is certainly alive. (So the walk needs nothing but the
/// entry to make one: a live value fewer in the hot loop.)
#[derive(Debug)]
pub(crate) struct Mark {
    requested: AtomicBool,
    /// The next entry down the stack, while this one is on it.
    next: AtomicPtr<HandlerEntry>,
    home: *const Removals,
}

// SAFETY: `home` is only an address of a `Removals` (atomics, `Sync`) dereferenced under
// the type's invariant; the rest are atomics.
unsafe impl Send for Mark {}
// SAFETY: as above.
unsafe impl Sync for Mark {}

impl Mark {
    /// The mark of an entry of the table whose requests are `home`.
    pub(crate) fn new(home: &Removals) -> Self {
        Mark {
            requested: AtomicBool::new(false),
            next: AtomicPtr::new(std::ptr::null_mut()),
            home,
        }
    }

    /// Request the removal of the handler whose entry (an `Arc`'s data) this mark is in.
    ///
    /// # Safety
    /// As for [`Removals::request`], and `entry` is reached through a view of the table
    /// the entry is registered in (the type's invariant).
    pub(crate) unsafe fn request(entry: *const HandlerEntry) -> bool {
        // SAFETY: caller contract: the entry is alive, and so is its table.
        unsafe { (*(*entry).mark.home).request(entry) }
    }

    /// Whether removal was requested. Read by walks only while the gate is open.
    #[inline]
    pub(crate) fn requested(&self) -> bool {
        self.requested.load(Relaxed)
    }
}

/// A table's requests: the gate and the stack.
#[derive(Debug)]
pub(crate) struct Removals {
    gate: AtomicUsize,
    head: AtomicPtr<HandlerEntry>,
}

impl Removals {
    pub(crate) fn new() -> Self {
        Removals {
            gate: AtomicUsize::new(0),
            head: AtomicPtr::new(std::ptr::null_mut()),
        }
    }

    /// Whether walks must look at handlers' flags (some request is in flight).
    #[inline]
    pub(crate) fn gate_open(&self) -> bool {
        self.gate.load(Relaxed) != 0
    }

    /// Whether requests wait for the writer. Async-signal-safe.
    #[inline]
    pub(crate) fn pending(&self) -> bool {
        !self.head.load(Relaxed).is_null()
    }

    /// Request the removal of the handler whose entry `entry` is. Async-signal-safe:
    /// atomics only. Returns false if it was requested before (nothing more to do).
    ///
    /// # Safety
    /// `entry` is the data pointer of an `Arc<HandlerEntry>` that stays alive for the call
    /// (a view that lists it, reached inside a read section).
    pub(crate) unsafe fn request(&self, entry: *const HandlerEntry) -> bool {
        // SAFETY: alive for the call (caller contract).
        let e = unsafe { &*entry };
        if e.mark.requested.swap(true, Relaxed) {
            return false;
        }
        // Open the gate before the entry can be found (and, after a grace period,
        // the gate lowered for it): it never goes below the count of listed requests.
        self.gate.fetch_add(1, Relaxed);
        // The stack's reference: an atomic increment, no allocation.
        // SAFETY: `entry` is an `Arc`'s data pointer, alive now (caller contract).
        unsafe { Arc::increment_strong_count(entry) };
        let p = entry.cast_mut();
        let mut head = self.head.load(Relaxed);
        loop {
            e.mark.next.store(head, Relaxed);
            match self.head.compare_exchange_weak(head, p, Release, Relaxed) {
                Ok(_) => return true,
                Err(now) => head = now,
            }
        }
    }

    /// Take every request made so far (thread context: dropping what it yields may free).
    pub(crate) fn take(&self) -> Taken {
        Taken(self.head.swap(std::ptr::null_mut(), Acquire))
    }

    /// `n` taken requests are no longer listed by any view a reader can reach.
    pub(crate) fn release(&self, n: usize) {
        self.gate.fetch_sub(n, Release);
    }
}

impl Drop for Removals {
    fn drop(&mut self) {
        // Give back the references of requests nobody collected.
        for _ in self.take() {}
    }
}

/// Requests taken off the stack, most recent first; each comes with the reference the
/// requester took.
#[derive(Debug)]
pub(crate) struct Taken(*mut HandlerEntry);

impl Iterator for Taken {
    type Item = Arc<HandlerEntry>;

    fn next(&mut self) -> Option<Arc<HandlerEntry>> {
        if self.0.is_null() {
            return None;
        }
        // SAFETY: every pointer on the stack came from `Arc::into_raw` in `request`, and
        // `take` moved the whole list out of the table: this iterator owns each of those
        // references once. The push's `Release` and the take's `Acquire` order the `next`
        // link it reads.
        let entry = unsafe { Arc::from_raw(self.0) };
        self.0 = entry.mark.next.load(Relaxed);
        Some(entry)
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        for _ in self.by_ref() {}
    }
}

/// How a `Dispatcher`, which only has the table, reaches its registry to collect: an
/// erased pointer to the registry's state and the functions that work on it. Present from
/// `Registry::new` until the registry's drop begins; the mutex is held while they run,
/// and the drop takes it first (`clear`), so the pointer is never used on a registry
/// that is going or gone.
#[derive(Debug)]
pub(crate) struct Collector {
    slot: Mutex<Option<Hooks>>,
}

/// See [`Collector`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct Hooks {
    pub(crate) target: *const (),
    /// Collect under the writer lock; the stamp of what it unlinked.
    pub(crate) collect: unsafe fn(*const ()) -> u64,
    /// Free what has passed its grace period (and lower the gate for it).
    pub(crate) reclaim: unsafe fn(*const ()),
}

// SAFETY: `target` points to a registry's `Inner`, which is `Send + Sync`, and is only
// used through `hooks`, under the mutex, while that registry lives (type docs).
unsafe impl Send for Hooks {}

impl Collector {
    pub(crate) fn new() -> Self {
        Collector {
            slot: Mutex::new(None),
        }
    }

    fn lock(&self) -> crate::sync::MutexGuard<'_, Option<Hooks>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set(&self, hooks: Hooks) {
        *self.lock() = Some(hooks);
    }

    /// The registry is going: wait for a collection in progress, and allow no more.
    pub(crate) fn clear(&self) {
        *self.lock() = None;
    }

    /// Collect, if the registry is still there. Thread context.
    pub(crate) fn collect(&self) -> Option<u64> {
        let g = self.lock();
        let h = (*g)?;
        // SAFETY: the registry lives while its hooks are set and we hold the mutex.
        Some(unsafe { (h.collect)(h.target) })
    }

    /// Reclaim, if the registry is still there. Thread context.
    pub(crate) fn reclaim(&self) {
        let g = self.lock();
        if let Some(h) = *g {
            // SAFETY: as in `collect`.
            unsafe { (h.reclaim)(h.target) };
        }
    }
}
