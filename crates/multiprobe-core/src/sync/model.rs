//! The loom models of the primitives (see the facade's docs).

pub(crate) use loom::sync::{atomic, Mutex, MutexGuard};

/// Atomics outside the model (see the facade's docs): std's, behind types of their own
/// so that clippy can tell them from a std atomic named outside the facade.
pub(crate) mod unmodelled {
    use std::sync::atomic::{self, Ordering};

    /// A std `AtomicBool` the model does not see.
    #[derive(Debug, Default)]
    pub(crate) struct AtomicBool(atomic::AtomicBool);

    impl AtomicBool {
        pub(crate) const fn new(v: bool) -> Self {
            AtomicBool(atomic::AtomicBool::new(v))
        }
        pub(crate) fn load(&self, o: Ordering) -> bool {
            self.0.load(o)
        }
        pub(crate) fn store(&self, v: bool, o: Ordering) {
            self.0.store(v, o)
        }
    }

    /// A std `AtomicU64` the model does not see.
    #[derive(Debug, Default)]
    pub(crate) struct AtomicU64(atomic::AtomicU64);

    impl AtomicU64 {
        pub(crate) const fn new(v: u64) -> Self {
            AtomicU64(atomic::AtomicU64::new(v))
        }
        pub(crate) fn fetch_add(&self, v: u64, o: Ordering) -> u64 {
            self.0.fetch_add(v, o)
        }
    }
}

/// The barriers of [`crate::srcu`] as `SeqCst` fences: the ordering `membarrier`
/// provides, and what loom can check (loom treats `SeqCst` accesses as `AcqRel`, but
/// models fences).
pub(crate) mod barrier {
    use loom::sync::atomic::{fence, Ordering};

    pub(crate) fn init() {}

    pub(crate) fn light() {
        fence(Ordering::SeqCst);
    }

    pub(crate) fn heavy() {
        fence(Ordering::SeqCst);
    }
}

/// Whether this is a loom model build (yes: keep state spaces small).
pub(crate) const MODELLED: bool = true;

/// A static initialized anew in every model execution.
macro_rules! model_static {
    ($(#[$m:meta])* static $name:ident: $t:ty = $init:expr;) => {
        loom::lazy_static! {
            $(#[$m])* static ref $name: $t = $init;
        }
    };
}
pub(crate) use model_static;

/// A loom thread-local `Cell` (loom's macro takes no `const` initializer).
macro_rules! thread_local_cell {
    ($name:ident: $t:ty = $init:expr) => {
        loom::thread_local! {
            static $name: Cell<$t> = Cell::new($init);
        }
    };
}
pub(crate) use thread_local_cell;

/// Every round of a wait loop yields to the other modelled threads.
pub(crate) fn backoff(iteration: &mut u32) {
    *iteration = iteration.saturating_add(1);
    loom::thread::yield_now();
}

/// Set when the grace period of a retired object passed; readers check it. A loom
/// atomic, so that checking it is a point where loom may run the writer (which is what
/// lets a model catch a reader that keeps a bucket past its grace period).
#[derive(Debug)]
pub(crate) struct Poison(atomic::AtomicBool);

impl Poison {
    pub(crate) fn new() -> Self {
        Poison(atomic::AtomicBool::new(false))
    }
    /// Mark the object released (its grace period passed).
    pub(crate) fn set(&self) {
        self.0.store(true, atomic::Ordering::SeqCst);
    }
    /// Fail the model if a reader uses the object after its grace period.
    pub(crate) fn check(&self) {
        assert!(
            !self.0.load(atomic::Ordering::SeqCst),
            "a reader used an object after its grace period"
        );
    }
}

/// Leak what a grace period released (see [`Poison`]).
pub(crate) fn free<T>(released: Box<T>) {
    std::mem::forget(released);
}

/// Thread-context index: a loom mutex around a `HashMap`.
pub(crate) mod index {
    use std::hash::Hash;

    #[derive(Debug)]
    pub(crate) struct Index<K: Eq + Hash, V>(super::Mutex<std::collections::HashMap<K, V>>);

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
