//! What the core's tests share: a log handlers write to, a counting handler, a step left
//! between its `pre` and its `post`, and a test backend shared with the test.

#![allow(dead_code)] // each test file uses some of these

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use multiprobe_core::backend::{Backend, Dispatcher, NoMemory, PreOutcome, ThreadState};
use multiprobe_core::testing::{TestBackend, TestSite};
use multiprobe_core::{Handler, HandlerId, Hit, Regs};

/// Lines handlers write, in order.
pub type Log = Arc<Mutex<Vec<String>>>;

/// An empty [`Log`].
pub fn log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

/// What `l` holds, leaving it empty.
pub fn taken(l: &Log) -> Vec<String> {
    std::mem::take(&mut *l.lock().unwrap())
}

/// A pre-handler that adds one to `calls` at every hit.
pub fn counting(calls: &Arc<AtomicU64>) -> impl Fn(&mut Hit<'_>) + Send + Sync + 'static {
    let c = Arc::clone(calls);
    move |_| {
        c.fetch_add(1, SeqCst);
    }
}

/// A hit at `addr` by thread `tid` (on `ts`) that must be a step offered a post, which
/// it defers: the registers to give its `post`.
pub fn deferred_pre(d: &Dispatcher<TestSite>, ts: &ThreadState, addr: u64, tid: u32) -> Regs {
    let mut regs = Regs {
        rip: addr,
        ..Regs::default()
    };
    match d.pre(ts, addr, tid, &mut regs, &NoMemory) {
        PreOutcome::Step(s) => {
            assert!(s.wants_post());
            assert!(s.defer_post());
        }
        other => panic!("{other:?}"),
    }
    regs
}

/// What a [`Shared`] backend does when told a site's enabled handlers after a change.
pub type Told = Box<dyn Fn(u64, &[(HandlerId, &dyn Handler)]) + Send + Sync>;

/// A [`TestBackend`] shared with the test, so it can be inspected after the registry is
/// gone, that hands every `handlers_changed` to `told`.
pub struct Shared {
    pub backend: Arc<TestBackend>,
    pub told: Told,
}

impl Shared {
    /// `backend`, told nothing.
    pub fn new(backend: Arc<TestBackend>) -> Self {
        Self::telling(backend, |_, _| {})
    }

    /// `backend`, telling `told` every change of a site's enabled handlers.
    pub fn telling(
        backend: Arc<TestBackend>,
        told: impl Fn(u64, &[(HandlerId, &dyn Handler)]) + Send + Sync + 'static,
    ) -> Self {
        Self {
            backend,
            told: Box::new(told),
        }
    }
}

impl Backend for Shared {
    type Site = TestSite;
    fn attach(&self, d: Dispatcher<TestSite>) {
        self.backend.attach(d)
    }
    fn prepare(&self, addr: u64) -> multiprobe_core::Result<TestSite> {
        self.backend.prepare(addr)
    }
    fn arm(&self, addr: u64, s: &TestSite) -> multiprobe_core::Result<()> {
        self.backend.arm(addr, s)
    }
    fn disarm(&self, addr: u64, s: &TestSite) -> multiprobe_core::Result<()> {
        self.backend.disarm(addr, s)
    }
    fn handlers_changed(&self, addr: u64, _: &TestSite, enabled: &[(HandlerId, &dyn Handler)]) {
        (self.told)(addr, enabled)
    }
}
