//! The one place that decides which synchronization primitives the crate uses, as
//! tokio's `src/loom` does: the real ones (`real.rs`), or under `--cfg loom` the [loom]
//! models of them (`model.rs`), so the real code (not a copy of it) is model-checked.
//! Everything else in the crate imports these names from here, never from `std::sync`,
//! `std::thread_local!` or `loom` directly; `clippy.toml` makes that an error (checked
//! on the model build, where the names here are loom's).
//!
//! What the switch covers:
//! * [`atomic`], [`Mutex`]: the atomics and locks of the concurrency protocol (the
//!   read domain, the table's pointers, counters, the writer lock).
//! * `barrier`: the asymmetric barriers of the read side (`membarrier` for real;
//!   `SeqCst` fences, the ordering membarrier provides, in the model).
//! * `held`: the per-thread count of open read sections (a thread-local).
//! * [`backoff`]: waiting in a grace period (under loom every round yields, which lets
//!   loom run the other threads).
//! * `model_static!`: process-wide statics (the shard claims), per model execution under
//!   loom so that every execution starts alike.
//! * [`Poison`] and [`free`]: under loom what a grace period released is poisoned and
//!   leaked instead of freed, so a reader that comes too late fails the model instead of
//!   reading freed memory.
//! * `index::Index`: the thread-context handler index (`dashmap` for real; a loom mutex
//!   around a `HashMap` in the model, since dashmap's locks would block loom's
//!   scheduler).
//!
//! What deliberately stays outside the model: [`Arc`] and [`OnceLock`], std's in both
//! builds (only writers touch reference counts, under the writer mutex or after a
//! grace period), and the `unmodelled` atomics, which are written under the writer lock
//! and read only by thread-context queries (modelling them would only grow loom's
//! state space; in the model build they are thin wrappers, so clippy can tell them
//! from a stray std atomic).

// The one module allowed to name the primitives directly.
#![allow(
    clippy::disallowed_types,
    clippy::disallowed_methods,
    clippy::disallowed_macros
)]

#[cfg(not(loom))]
mod membarrier;
#[cfg(not(loom))]
mod real;
#[cfg(not(loom))]
pub(crate) use real::*;

#[cfg(loom)]
mod model;
#[cfg(loom)]
pub(crate) use model::*;

pub(crate) use std::sync::{Arc, OnceLock};

/// What a thread shares with its own signal handlers only, never with other threads:
/// the cells of `ThreadState`, ordered against the rest by compiler-only fences. A
/// signal handler on the thread sees the thread's accesses in program order at an
/// instruction boundary, so no hardware fence is needed, only that the compiler keep
/// the order (`atomic_signal_fence` in C++). Std's atomics in both builds: they must be
/// `const` (a `ThreadState` lives in a `const`-initialized thread-local), and loom
/// cannot deliver a signal anyway. Types of their own, so clippy can tell them from a
/// std atomic named elsewhere.
pub(crate) mod same_thread {
    use std::sync::atomic::{self, Ordering};

    /// A `bool` a thread shares with its own signal handlers.
    #[derive(Debug)]
    pub(crate) struct AtomicBool(atomic::AtomicBool);

    impl AtomicBool {
        pub(crate) const fn new(v: bool) -> Self {
            AtomicBool(atomic::AtomicBool::new(v))
        }
        #[inline(always)]
        pub(crate) fn load(&self, o: Ordering) -> bool {
            self.0.load(o)
        }
        #[inline(always)]
        pub(crate) fn store(&self, v: bool, o: Ordering) {
            self.0.store(v, o)
        }
    }

    /// A `u8` a thread shares with its own signal handlers.
    #[derive(Debug)]
    pub(crate) struct AtomicU8(atomic::AtomicU8);

    impl AtomicU8 {
        pub(crate) const fn new(v: u8) -> Self {
            AtomicU8(atomic::AtomicU8::new(v))
        }
        #[inline(always)]
        pub(crate) fn load(&self, o: Ordering) -> u8 {
            self.0.load(o)
        }
        #[inline(always)]
        pub(crate) fn store(&self, v: u8, o: Ordering) {
            self.0.store(v, o)
        }
        pub(crate) fn compare_exchange(
            &self,
            current: u8,
            new: u8,
            success: Ordering,
            failure: Ordering,
        ) -> Result<u8, u8> {
            self.0.compare_exchange(current, new, success, failure)
        }
    }

    /// A `usize` a thread shares with its own signal handlers.
    #[derive(Debug)]
    pub(crate) struct AtomicUsize(atomic::AtomicUsize);

    impl AtomicUsize {
        pub(crate) const fn new(v: usize) -> Self {
            AtomicUsize(atomic::AtomicUsize::new(v))
        }
        #[inline(always)]
        pub(crate) fn load(&self, o: Ordering) -> usize {
            self.0.load(o)
        }
        #[inline(always)]
        pub(crate) fn store(&self, v: usize, o: Ordering) {
            self.0.store(v, o)
        }
        /// Atomic against a signal handler on the same thread (a single locked
        /// instruction); relaxed, as nothing else orders against it.
        pub(crate) fn compare_exchange(&self, current: usize, new: usize) -> Result<usize, usize> {
            self.0
                .compare_exchange(current, new, Ordering::Relaxed, Ordering::Relaxed)
        }
    }

    /// Keep the compiler from moving memory accesses across this point, as a signal
    /// handler on this thread would see them; no instruction is emitted.
    #[inline(always)]
    pub(crate) fn signal_fence() {
        atomic::compiler_fence(Ordering::SeqCst);
    }
}

/// Per-OS-thread count of open read sections, used only to refuse to wait for a grace
/// period that the calling thread itself is holding open (rule 3: no deadlock when a
/// handler unregisters). Const-initialized and without a destructor, so touching it
/// from a signal handler is async-signal-safe (static TLS, no lazy allocation).
pub(crate) mod held {
    use std::cell::Cell;

    super::thread_local_cell!(HELD: u32 = 0);

    #[inline]
    pub(crate) fn inc() {
        HELD.with(|h| h.set(h.get().wrapping_add(1)));
    }
    #[inline]
    pub(crate) fn dec() {
        HELD.with(|h| h.set(h.get().wrapping_sub(1)));
    }
    pub(crate) fn any() -> bool {
        HELD.with(|h| h.get() != 0)
    }
}
