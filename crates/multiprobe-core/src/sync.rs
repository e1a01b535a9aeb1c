//! The one place that decides which synchronization primitives the crate uses.
//!
//! Under `--cfg loom` every atomic, mutex and thread-local that takes part in the
//! concurrency protocol comes from [loom], so the real code (not a copy of it) is
//! model-checked, as tokio does with its `src/loom` facade. Everything else in the
//! crate imports these names from here and never from `std::sync` directly.
//!
//! Two things deliberately stay outside the model: `std::sync::Arc` (only writers
//! touch reference counts, always under the writer mutex or after a grace period)
//! and the process-wide shard allocator in [`crate::shard`] (an id allocator whose
//! interleavings do not matter for correctness).

#[cfg(loom)]
pub(crate) use loom::sync::{atomic, Mutex, MutexGuard};
#[cfg(not(loom))]
pub(crate) use std::sync::{atomic, Mutex, MutexGuard};

/// Thread-context index (handler id → record). `dashmap` in real builds; under loom a
/// loom mutex around a `HashMap`, because dashmap's shard locks are invisible to loom and
/// would block its scheduler. Never touched on the dispatch path.
pub(crate) mod index {
    use std::hash::Hash;

    #[cfg(not(loom))]
    #[derive(Debug)]
    pub(crate) struct Index<K: Eq + Hash, V>(dashmap::DashMap<K, V>);

    #[cfg(not(loom))]
    impl<K: Eq + Hash, V: Clone> Index<K, V> {
        pub(crate) fn new() -> Self {
            Self(dashmap::DashMap::new())
        }
        pub(crate) fn get(&self, k: &K) -> Option<V> {
            self.0.get(k).map(|v| v.value().clone())
        }
        pub(crate) fn insert(&self, k: K, v: V) {
            self.0.insert(k, v);
        }
        pub(crate) fn remove(&self, k: &K) -> Option<V> {
            self.0.remove(k).map(|(_, v)| v)
        }
        pub(crate) fn contains(&self, k: &K) -> bool {
            self.0.contains_key(k)
        }
        pub(crate) fn len(&self) -> usize {
            self.0.len()
        }
        pub(crate) fn values(&self) -> Vec<V> {
            self.0.iter().map(|e| e.value().clone()).collect()
        }
    }

    #[cfg(loom)]
    #[derive(Debug)]
    pub(crate) struct Index<K: Eq + Hash, V>(super::Mutex<std::collections::HashMap<K, V>>);

    #[cfg(loom)]
    impl<K: Eq + Hash, V: Clone> Index<K, V> {
        pub(crate) fn new() -> Self {
            Self(super::Mutex::new(std::collections::HashMap::new()))
        }
        pub(crate) fn get(&self, k: &K) -> Option<V> {
            self.0.lock().unwrap().get(k).cloned()
        }
        pub(crate) fn insert(&self, k: K, v: V) {
            self.0.lock().unwrap().insert(k, v);
        }
        pub(crate) fn remove(&self, k: &K) -> Option<V> {
            self.0.lock().unwrap().remove(k)
        }
        pub(crate) fn contains(&self, k: &K) -> bool {
            self.0.lock().unwrap().contains_key(k)
        }
        pub(crate) fn len(&self) -> usize {
            self.0.lock().unwrap().len()
        }
        pub(crate) fn values(&self) -> Vec<V> {
            self.0.lock().unwrap().values().cloned().collect()
        }
    }
}

/// Back off inside a wait loop (grace periods). Spins briefly, then yields, then sleeps,
/// so a writer waiting for a preempted reader does not burn a core. Under loom every
/// iteration yields, which is what lets loom explore the other threads.
#[cfg(not(loom))]
pub(crate) fn backoff(iteration: &mut u32) {
    *iteration = iteration.saturating_add(1);
    if *iteration < 64 {
        std::hint::spin_loop();
    } else if *iteration < 128 {
        std::thread::yield_now();
    } else {
        std::thread::sleep(std::time::Duration::from_micros(50));
    }
}

#[cfg(loom)]
pub(crate) fn backoff(iteration: &mut u32) {
    *iteration = iteration.saturating_add(1);
    loom::thread::yield_now();
}

/// Per-OS-thread count of open read sections, used only to refuse to wait for a grace
/// period that the calling thread itself is holding open (rule 3: no deadlock when a
/// handler unregisters). Const-initialized and without a destructor, so touching it
/// from a signal handler is async-signal-safe (static TLS, no lazy allocation).
pub(crate) mod held {
    use std::cell::Cell;

    #[cfg(not(loom))]
    std::thread_local! {
        static HELD: Cell<u32> = const { Cell::new(0) };
    }
    #[cfg(loom)]
    loom::thread_local! {
        static HELD: Cell<u32> = Cell::new(0);
    }

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
