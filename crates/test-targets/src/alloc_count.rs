//! A global allocator that counts the allocations and frees of the threads that ask it
//! to, for tests that check a path allocates nothing (a dispatch, a removal from inside
//! a handler: code that may run in a signal handler). A test binary installs it:
//!
//! ```ignore
//! #[global_allocator]
//! static GLOBAL: multiprobe_test_targets::alloc_count::Counting =
//!     multiprobe_test_targets::alloc_count::Counting;
//! ```
//!
//! and measures with [`allocations`]. Counting is per thread (other threads of the test
//! may allocate meanwhile); the count itself is one process-wide atomic.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

/// The system allocator, counting the calls of threads inside [`allocations`].
#[derive(Debug)]
pub struct Counting;

std::thread_local! {
    static COUNT: Cell<bool> = const { Cell::new(false) };
}
static ALLOCS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; counting touches a
// const-initialized thread-local and an atomic, neither of which allocates.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNT.with(Cell::get) {
            ALLOCS.fetch_add(1, SeqCst);
        }
        // SAFETY: forwarded contract.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        if COUNT.with(Cell::get) {
            ALLOCS.fetch_add(1, SeqCst);
        }
        // SAFETY: forwarded contract.
        unsafe { System.dealloc(p, l) }
    }
}

/// `f`'s result and how many allocations and frees it made on this thread (always 0
/// unless [`Counting`] is the global allocator).
pub fn allocations<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let before = ALLOCS.load(SeqCst);
    COUNT.with(|c| c.set(true));
    let r = f();
    COUNT.with(|c| c.set(false));
    (r, ALLOCS.load(SeqCst) - before)
}
