//! The real primitives (see the facade's docs).

pub(crate) use std::sync::{atomic, Mutex, MutexGuard};

/// Atomics outside the model (see the facade's docs): the real ones here too.
pub(crate) mod unmodelled {
    pub(crate) use std::sync::atomic::{AtomicBool, AtomicU64};
}

/// The asymmetric barriers of [`crate::srcu`].
pub(crate) mod barrier {
    pub(crate) use super::super::membarrier::{heavy, init, light};
}

/// Whether this is a loom model build (no).
pub(crate) const MODELLED: bool = false;

/// A `static` (the real one).
macro_rules! model_static {
    ($(#[$m:meta])* static $name:ident: $t:ty = $init:expr;) => {
        $(#[$m])* static $name: $t = $init;
    };
}
pub(crate) use model_static;

/// A `thread_local!` `Cell` with a `const` initializer: no lazy initialization, no
/// destructor, so a signal handler may touch it.
macro_rules! thread_local_cell {
    ($name:ident: $t:ty = $init:expr) => {
        std::thread_local! {
            static $name: Cell<$t> = const { Cell::new($init) };
        }
    };
}
pub(crate) use thread_local_cell;

/// Back off inside a wait loop (grace periods). Spins briefly, then yields, then sleeps,
/// so a writer waiting for a preempted reader does not burn a core.
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

/// A retired object's poison flag: nothing in real builds (freed objects are simply
/// freed; see the model's).
#[derive(Debug)]
pub(crate) struct Poison;

impl Poison {
    pub(crate) fn new() -> Self {
        Poison
    }
    /// Mark the object released (its grace period passed).
    #[inline(always)]
    pub(crate) fn set(&self) {}
    /// Check that a reader may still use the object.
    #[inline(always)]
    pub(crate) fn check(&self) {}
}

/// Free what a grace period released.
#[inline]
pub(crate) fn free<T>(released: Box<T>) {
    drop(released);
}

/// Thread-context index (handler id → record). Never touched on the dispatch path.
pub(crate) mod index {
    use std::hash::Hash;

    #[derive(Debug)]
    pub(crate) struct Index<K: Eq + Hash, V>(dashmap::DashMap<K, V>);

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
}
