//! The process-wide list of attached registries, as the signal path sees it.
//!
//! One SIGTRAP handler serves every [`crate::SigtrapBackend`] in the process, so it needs
//! each backend's [`Dispatcher`] without locking. Each attached dispatcher is boxed and
//! *leaked* into a fixed array of atomic pointers; a dropped backend clears its entry,
//! and a later backend may take the entry over. A signal handler that loaded the old
//! pointer just before still uses a valid object, because it is never freed. The leak is
//! a few KiB per registry ever created (the dispatcher keeps its empty table alive);
//! programs create a handful.

use std::sync::atomic::{AtomicPtr, AtomicUsize, Ordering};
use std::sync::Mutex;

use multiprobe_core::backend::Dispatcher;

use crate::site::Site;

/// How many backends can be alive at once.
pub(crate) const MAX: usize = 64;

static ENTRIES: [AtomicPtr<Dispatcher<Site>>; MAX] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; MAX];
/// One past the highest entry ever used: the signal path scans `..HIGH`.
static HIGH: AtomicUsize = AtomicUsize::new(0);
static LOCK: Mutex<()> = Mutex::new(());

/// Publish `d`; returns its entry index, or `None` if all entries are taken.
pub(crate) fn attach(d: Dispatcher<Site>) -> Option<usize> {
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let i = ENTRIES
        .iter()
        .position(|e| e.load(Ordering::Relaxed).is_null())?;
    let p = Box::into_raw(Box::new(d));
    ENTRIES[i].store(p, Ordering::Release);
    HIGH.fetch_max(i + 1, Ordering::Release);
    Some(i)
}

/// Withdraw entry `i` (the object stays allocated: module docs).
pub(crate) fn detach(i: usize) {
    let _g = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    ENTRIES[i].store(std::ptr::null_mut(), Ordering::Release);
}

/// Entry `i`, if attached.
pub(crate) fn get(i: usize) -> Option<&'static Dispatcher<Site>> {
    let p = ENTRIES.get(i)?.load(Ordering::Acquire);
    // SAFETY: non-null entries point to leaked, never-freed dispatchers.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// Every attached dispatcher. Async-signal-safe.
#[inline]
pub(crate) fn each() -> impl Iterator<Item = &'static Dispatcher<Site>> {
    ENTRIES[..HIGH.load(Ordering::Acquire)]
        .iter()
        .filter_map(|e| {
            let p = e.load(Ordering::Acquire);
            // SAFETY: non-null entries point to leaked, never-freed dispatchers.
            (!p.is_null()).then(|| unsafe { &*p })
        })
}
