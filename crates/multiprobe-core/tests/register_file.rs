#![cfg(not(loom))]

//! Lazy registers: dispatch fetches a hit's registers only when a handler asks, gives
//! every handler of the hit the same copy, and tells a moved `rip` (a redirect) without
//! fetching.

use std::cell::{Cell, OnceCell};
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use multiprobe_core::backend::{NoMemory, PreOutcome, RegisterFile, ThreadState};
use multiprobe_core::testing::TestBackend;
use multiprobe_core::{Fault, FaultAction, FnHandler, Hit, Registry, Regs};

const A: u64 = 0x40_1000;

/// A thread whose registers cost a fetch, as with ptrace: counts the fetches.
struct Lazy {
    thread: Regs,
    view: OnceCell<Regs>,
    fetches: Cell<u32>,
}

impl Lazy {
    fn new(rip: u64) -> Lazy {
        Lazy {
            thread: Regs {
                rip,
                rdi: 7,
                rsi: 8,
                ..Regs::default()
            },
            view: OnceCell::new(),
            fetches: Cell::new(0),
        }
    }
}

impl RegisterFile for Lazy {
    fn regs(&self) -> &Regs {
        self.view.get_or_init(|| {
            self.fetches.set(self.fetches.get() + 1);
            self.thread
        })
    }
    fn regs_mut(&mut self) -> &mut Regs {
        self.regs();
        self.view.get_mut().expect("just fetched")
    }
    fn fetched(&self) -> Option<&Regs> {
        self.view.get()
    }
}

fn counter(c: &Arc<AtomicU64>) -> impl Fn(&mut Hit<'_>) + Send + Sync + 'static {
    let c = Arc::clone(c);
    move |_: &mut Hit<'_>| {
        c.fetch_add(1, SeqCst);
    }
}

fn pre(r: &Registry<TestBackend>, ts: &ThreadState, regs: &mut Lazy) -> &'static str {
    let d = r.dispatcher();
    let outcome = match d.pre(ts, A, 1, regs, &NoMemory) {
        PreOutcome::NotOurs => "not ours",
        PreOutcome::Redirect => "redirect",
        PreOutcome::Step(s) => {
            if s.wants_post() {
                s.defer_post();
                "step+post"
            } else {
                "step"
            }
        }
    };
    outcome
}

#[test]
fn counting_handlers_fetch_nothing() {
    let r = Registry::new(TestBackend::new());
    let ts = ThreadState::new();
    let c = Arc::new(AtomicU64::new(0));
    let _g: Vec<_> = (0..3)
        .map(|_| r.register(A, counter(&c)).unwrap())
        .collect();
    let _p = r
        .register_handler(A, FnHandler::new().post(counter(&c)))
        .unwrap();
    for _ in 0..5 {
        let mut regs = Lazy::new(A);
        assert_eq!(pre(&r, &ts, &mut regs), "step+post");
        assert!(r.dispatcher().post(&ts, A, 1, &mut regs, &NoMemory));
        assert_eq!(regs.fetches.get(), 0);
        assert!(regs.fetched().is_none());
    }
    assert_eq!(c.load(SeqCst), 5 * 4, "every handler ran");
}

#[test]
fn the_first_reader_fetches_once_and_every_handler_shares_the_copy() {
    let r = Registry::new(TestBackend::new());
    let ts = ThreadState::new();
    let c = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let _a = r.register(A, counter(&c)).unwrap();
    let s1 = Arc::clone(&seen);
    let _b = r
        .register(A, move |h| {
            s1.lock().unwrap().push(h.arg(0).unwrap());
            h.regs_mut().rsi += 100;
        })
        .unwrap();
    let s2 = Arc::clone(&seen);
    let _c = r
        .register(A, move |h| {
            let r = h.regs();
            s2.lock().unwrap().extend([r.rip, r.rsi]);
        })
        .unwrap();
    let mut regs = Lazy::new(A);
    assert_eq!(pre(&r, &ts, &mut regs), "step");
    assert_eq!(regs.fetches.get(), 1);
    assert_eq!(*seen.lock().unwrap(), vec![7, A, 108]);
    let after = regs.fetched().expect("fetched");
    assert_eq!(
        (after.rsi, after.rip),
        (108, A),
        "the change is there to write back"
    );
    assert_eq!(c.load(SeqCst), 1);
}

#[test]
fn a_moved_rip_redirects_and_an_unmoved_one_does_not() {
    let r = Registry::new(TestBackend::new());
    let ts = ThreadState::new();
    let c = Arc::new(AtomicU64::new(0));
    let _reader = r
        .register(A, |h| assert_eq!(h.regs().rip, h.addr()))
        .unwrap();
    let mover = r.register(A, |h| h.regs_mut().rip = 0x5000).unwrap();
    let _after = r.register(A, counter(&c)).unwrap();
    let mut regs = Lazy::new(A);
    assert_eq!(pre(&r, &ts, &mut regs), "redirect");
    assert_eq!(regs.fetched().map(|r| r.rip), Some(0x5000));
    assert_eq!(c.load(SeqCst), 0, "the walk ended at the mover");
    assert_eq!(regs.fetches.get(), 1);

    // Fetched but not moved: the walk goes on.
    drop(mover);
    let mut regs = Lazy::new(A);
    assert_eq!(pre(&r, &ts, &mut regs), "step");
    assert_eq!(c.load(SeqCst), 1);
}

#[test]
fn fault_handlers_fetch_on_demand() {
    let r = Registry::new(TestBackend::new());
    let ts = ThreadState::new();
    let asked = Arc::new(AtomicU64::new(0));
    let seen = Arc::new(AtomicU64::new(0));
    let a = Arc::clone(&asked);
    let _first = r
        .register_handler(
            A,
            FnHandler::new().fault(move |_, _| {
                a.fetch_add(1, SeqCst);
                FaultAction::NotHandled
            }),
        )
        .unwrap();
    let fault = Fault {
        signal: 11,
        code: 1,
        addr: 0,
    };
    let d = r.dispatcher();
    let mut regs = Lazy::new(A);
    assert_eq!(
        d.fault(&ts, A, 1, &mut regs, &NoMemory, &fault),
        FaultAction::NotHandled
    );
    assert_eq!((asked.load(SeqCst), regs.fetches.get()), (1, 0));

    let s = Arc::clone(&seen);
    let _second = r
        .register_handler(
            A,
            FnHandler::new().fault(move |h, _| {
                s.store(h.regs().rip, SeqCst);
                FaultAction::Handled
            }),
        )
        .unwrap();
    let mut regs = Lazy::new(A);
    assert_eq!(
        d.fault(&ts, A, 1, &mut regs, &NoMemory, &fault),
        FaultAction::Handled
    );
    assert_eq!((regs.fetches.get(), seen.load(SeqCst)), (1, A));
}

#[test]
fn formatting_a_hit_does_not_fetch() {
    let r = Registry::new(TestBackend::new());
    let ts = ThreadState::new();
    let out = Arc::new(Mutex::new(Vec::new()));
    let o = Arc::clone(&out);
    let _g = r
        .register(A, move |h| {
            o.lock().unwrap().push(format!("{h:?}"));
            let _ = h.regs();
            o.lock().unwrap().push(format!("{h:?}"));
        })
        .unwrap();
    let mut regs = Lazy::new(A);
    assert_eq!(pre(&r, &ts, &mut regs), "step");
    let out = out.lock().unwrap();
    assert!(out[0].contains("not fetched"), "{}", out[0]);
    assert!(out[1].contains("rdi: 7"), "{}", out[1]);
    assert_eq!(regs.fetches.get(), 1);
}

#[test]
fn plain_regs_are_always_fetched() {
    let mut regs = Regs {
        rip: A,
        ..Regs::default()
    };
    assert_eq!(regs.fetched().map(|r| r.rip), Some(A));
    regs.regs_mut().rax = 3;
    assert_eq!(RegisterFile::regs(&regs).rax, 3);
}
