#![cfg(not(loom))]

//! Removing handlers from inside a dispatch: [`PreAction::Remove`] (any backend), and
//! `unregister` / a guard's drop / the other registry operations called from a handler
//! of a backend that dispatches in signal handlers, where nothing may lock or allocate —
//! checked here with a counting allocator and with the registry's own lock held by the
//! interrupted code, as a signal handler would find it.

use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};

use multiprobe_core::backend::{Backend, Dispatcher, ThreadState};
use multiprobe_core::testing::{Event, HitResult, TestBackend, TestSite, INT3, ORIGINAL};
use multiprobe_core::{Error, FnHandler, HandlerId, Hit, PreAction, Registry, Regs};
use multiprobe_test_targets::alloc_count::{allocations, Counting};

const A: u64 = 0x40_1000;
const B: u64 = 0x40_2000;

/// Counts the allocations and frees of the threads inside `allocations`.
#[global_allocator]
static GLOBAL: Counting = Counting;

/// The "no allocation" checks below mean something: the counter is installed and counts.
#[test]
fn the_allocation_counter_counts() {
    let ((), n) = allocations(|| drop(std::hint::black_box(Box::new(7u64))));
    assert_eq!(n, 2, "one allocation and one free");
}

fn hit(
    r: &Registry<impl Backend<Site = TestSite> + AsTest>,
    ts: &ThreadState,
    a: u64,
) -> HitResult {
    let mut regs = Regs::default();
    r.backend().test().hit(ts, 1, a, &mut regs)
}

trait AsTest {
    fn test(&self) -> &TestBackend;
}
impl AsTest for TestBackend {
    fn test(&self) -> &TestBackend {
        self
    }
}

fn counter() -> (Arc<AtomicU64>, Arc<AtomicU64>) {
    let c = Arc::new(AtomicU64::new(0));
    (Arc::clone(&c), c)
}

#[test]
fn a_handler_that_removes_itself_is_never_called_again_and_the_last_one_disarms() {
    let r = Registry::new(TestBackend::new());
    let ts = ThreadState::new();
    let (pre1, p1) = counter();
    let (post1, q1) = counter();
    let (pre2, p2) = counter();
    let once = r
        .register_handler(
            A,
            FnHandler::new()
                .pre(move |_: &mut Hit<'_>| {
                    p1.fetch_add(1, SeqCst);
                    PreAction::Remove
                })
                .post(move |_: &mut Hit<'_>| {
                    q1.fetch_add(1, SeqCst);
                }),
        )
        .unwrap();
    let twice = r
        .register(A, move |_: &mut Hit<'_>| {
            p2.fetch_add(1, SeqCst);
        })
        .unwrap();
    let (once_id, twice_id) = (once.id(), twice.id());
    let d = r.dispatcher();
    // The hit that asks: the walk goes on; its own post does not run.
    assert_eq!(hit(&r, &ts, A), HitResult::Stepped { post: true });
    assert_eq!(
        (pre1.load(SeqCst), post1.load(SeqCst), pre2.load(SeqCst)),
        (1, 0, 1)
    );
    assert!(
        d.removals_pending(),
        "the bookkeeping waits for thread context"
    );
    // Later hits never call it, and do not count it.
    for _ in 0..3 {
        hit(&r, &ts, A);
    }
    assert_eq!(
        (pre1.load(SeqCst), post1.load(SeqCst), pre2.load(SeqCst)),
        (1, 0, 4)
    );
    assert_eq!(r.stats(once_id).unwrap().hits, 1);
    assert_eq!(r.stats(twice_id).unwrap().hits, 4);
    // The bookkeeping: the registry forgets it; the site stays armed for the other.
    assert_eq!(r.collect().unwrap(), 1);
    assert!(!d.removals_pending());
    assert!(matches!(r.stats(once_id), Err(Error::UnknownHandler(_))));
    assert_eq!(r.site(A).unwrap().handlers, 1);
    assert_eq!(r.backend().byte(A), INT3);
    // Its guard no longer knows it: dropping it is harmless, unregistering says so.
    assert!(matches!(once.unregister(), Err(Error::UnknownHandler(_))));
    let _ = twice.into_id();
    // The last one removes itself: its site is disarmed by the next operation.
    let _last = r
        .register_handler(A, FnHandler::new().pre(|_: &mut Hit<'_>| PreAction::Remove))
        .unwrap()
        .into_id();
    r.unregister(twice_id).unwrap();
    assert_eq!(hit(&r, &ts, A), HitResult::Stepped { post: false });
    let other = r.register(B, |_: &mut Hit<'_>| {}).unwrap();
    assert!(
        r.site(A).is_none(),
        "the next operation finished the removal"
    );
    assert_eq!(r.backend().byte(A), ORIGINAL);
    assert_eq!(hit(&r, &ts, A), HitResult::NoTrap);
    other.unregister().unwrap();
    r.synchronize().unwrap();
    assert!(r.backend().events().contains(&Event::Release(A)));
}

#[test]
fn the_dispatcher_finishes_removals_in_thread_context() {
    let r = Registry::new(TestBackend::new());
    let ts = ThreadState::new();
    let id = r
        .register_handler(A, FnHandler::new().pre(|_: &mut Hit<'_>| PreAction::Remove))
        .unwrap()
        .into_id();
    let d = r.dispatcher();
    assert!(!d.collect(), "nothing to do yet");
    hit(&r, &ts, A);
    assert_eq!(r.backend().byte(A), INT3);
    // What a backend's thread does when `removals_pending` said so.
    assert!(d.collect());
    assert_eq!(
        r.backend().byte(A),
        ORIGINAL,
        "the last handler gone: disarmed"
    );
    assert!(matches!(r.unregister(id), Err(Error::UnknownHandler(_))));
    // A removal that no one collects is dropped with the registry.
    let id = r
        .register_handler(B, FnHandler::new().pre(|_: &mut Hit<'_>| PreAction::Remove))
        .unwrap()
        .into_id();
    hit(&r, &ts, B);
    let _ = id;
    drop(r);
    assert!(
        !d.collect(),
        "the registry is gone: nothing to collect into"
    );
}

#[test]
fn redirecting_and_removing_at_once_does_both() {
    let r = Registry::new(TestBackend::new());
    let ts = ThreadState::new();
    let (later, l) = counter();
    r.register_handler(
        A,
        FnHandler::new().pre(|h: &mut Hit<'_>| {
            h.regs_mut().rip = 0x5000;
            PreAction::Remove
        }),
    )
    .unwrap()
    .into_id();
    let id = r
        .register(A, move |_: &mut Hit<'_>| {
            l.fetch_add(1, SeqCst);
        })
        .unwrap()
        .into_id();
    let mut regs = Regs::default();
    assert_eq!(r.backend().hit(&ts, 1, A, &mut regs), HitResult::Redirected);
    assert_eq!((regs.rip, later.load(SeqCst)), (0x5000, 0));
    assert_eq!(hit(&r, &ts, A), HitResult::Stepped { post: false });
    assert_eq!(later.load(SeqCst), 1);
    assert_eq!(r.collect().unwrap(), 1);
    assert_eq!(r.handlers().len(), 1);
    r.unregister(id).unwrap();
}

// ---- a backend that dispatches in signal handlers ------------------------------------

/// The registry its handlers reach (set once the registry exists).
static REG: OnceLock<Registry<Reentrant>> = OnceLock::new();

std::thread_local! {
    static TS: ThreadState = const { ThreadState::new() };
}

/// A test backend that dispatches in signal handlers and, while the registry holds its
/// writer lock to arm `A`, takes a hit at `B` on the same thread — as a signal handler
/// interrupting the registry's own code (inside `arm`, or `malloc` under it) would.
struct Reentrant(TestBackend);

impl AsTest for Reentrant {
    fn test(&self) -> &TestBackend {
        &self.0
    }
}

impl Backend for Reentrant {
    type Site = TestSite;
    fn attach(&self, d: Dispatcher<TestSite>) {
        self.0.attach(d)
    }
    fn dispatches_in_signal_handlers(&self) -> bool {
        self.0.dispatches_in_signal_handlers()
    }
    fn prepare(&self, addr: u64) -> multiprobe_core::Result<TestSite> {
        self.0.prepare(addr)
    }
    fn arm(&self, addr: u64, s: &TestSite) -> multiprobe_core::Result<()> {
        self.0.arm(addr, s)?;
        if addr == A {
            let mut regs = Regs::default();
            TS.with(|ts| self.0.hit(ts, 1, B, &mut regs));
        }
        Ok(())
    }
    fn disarm(&self, addr: u64, s: &TestSite) -> multiprobe_core::Result<()> {
        self.0.disarm(addr, s)
    }
}

/// What the handler at `B` found, calling the registry from inside.
#[derive(Debug, Default)]
struct Inside {
    unregister: Option<(Result<(), String>, usize)>,
    batch: Option<(Result<(), String>, usize)>,
    enable: Option<Result<(), String>>,
    stats: Option<Result<(), String>>,
    drop_guard: Option<usize>,
}

fn brief<T>(r: multiprobe_core::Result<T>) -> Result<(), String> {
    r.map(|_| ()).map_err(|e| format!("{e:?}"))
}

#[test]
fn from_inside_a_signal_handler_the_registry_neither_locks_nor_allocates() {
    let r = REG.get_or_init(|| Registry::new(Reentrant(TestBackend::in_signal_handlers())));
    let (c_calls, c1) = counter();
    let (d_calls, d1) = counter();
    let c = r
        .register(0x40_3000, move |_: &mut Hit<'_>| {
            c1.fetch_add(1, SeqCst);
        })
        .unwrap()
        .into_id();
    let dd = r
        .register(0x40_4000, move |_: &mut Hit<'_>| {
            d1.fetch_add(1, SeqCst);
        })
        .unwrap()
        .into_id();
    let guarded = Arc::new(Mutex::new(Some(
        r.register(0x40_5000, |_: &mut Hit<'_>| {}).unwrap(),
    )));
    let guarded_id = guarded.lock().unwrap().as_ref().unwrap().id();
    let inside = Arc::new(Mutex::new(Inside::default()));
    let (ins, g2) = (Arc::clone(&inside), Arc::clone(&guarded));
    r.register(B, move |_: &mut Hit<'_>| {
        let reg = REG.get().unwrap();
        // In this order (a struct literal evaluates its fields as written).
        let out = Inside {
            unregister: Some({
                let (res, n) = allocations(|| reg.unregister(c));
                (brief(res), n)
            }),
            batch: Some({
                let ids = [dd];
                let (res, n) = allocations(|| reg.unregister_batch(&ids));
                (brief(res), n)
            }),
            enable: Some(brief(reg.enable(c))),
            stats: Some(brief(reg.stats(c))),
            drop_guard: Some({
                let g = g2.lock().unwrap().take();
                allocations(|| drop(g)).1
            }),
        };
        *ins.lock().unwrap() = out;
    })
    .unwrap()
    .into_id();
    // Arming `A` hits `B` while this thread holds the registry's lock: a handler there
    // that locked would deadlock. Run it where a hang fails instead of stalling.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let g = r.register(A, |_: &mut Hit<'_>| {}).map(|g| g.into_id());
        tx.send(g.is_ok()).unwrap();
    });
    match rx.recv_timeout(std::time::Duration::from_secs(20)) {
        Ok(ok) => assert!(ok),
        Err(_) => panic!("a registry call from inside the handler waited for the registry's lock"),
    }
    let got = std::mem::take(&mut *inside.lock().unwrap());
    let inside_dispatch = |id: HandlerId| Err(format!("{:?}", Error::InsideDispatch(id)));
    assert_eq!(got.unregister, Some((inside_dispatch(c), 0)));
    assert_eq!(got.batch, Some((inside_dispatch(dd), 0)));
    assert_eq!(
        got.drop_guard,
        Some(0),
        "a guard's drop inside allocates nothing"
    );
    for (what, res) in [("enable", got.enable), ("stats", got.stats)] {
        assert_eq!(
            res,
            Some(Err(format!("{:?}", Error::SignalContext(what)))),
            "{what}"
        );
    }
    // Requested, not yet collected: still listed, but hits no longer call them.
    let ts = ThreadState::new();
    assert_eq!(r.site(0x40_3000).unwrap().handlers, 1);
    for a in [0x40_3000, 0x40_4000, 0x40_5000] {
        assert_eq!(hit(r, &ts, a), HitResult::Stepped { post: false });
    }
    assert_eq!((c_calls.load(SeqCst), d_calls.load(SeqCst)), (0, 0));
    // Thread context: the bookkeeping, the breakpoints go.
    assert_eq!(r.collect().unwrap(), 3);
    for (a, id) in [(0x40_3000, c), (0x40_4000, dd), (0x40_5000, guarded_id)] {
        assert_eq!(r.backend().test().byte(a), ORIGINAL, "{a:#x}");
        assert!(matches!(r.stats(id), Err(Error::UnknownHandler(_))));
    }
}
