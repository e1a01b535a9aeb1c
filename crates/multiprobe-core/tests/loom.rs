//! loom models of the core's concurrency protocol, run on the real code: under
//! `--cfg loom` the crate's atomics, mutexes and thread-locals come from loom (see the
//! `sync` facade), and retired table buckets are poisoned and leaked instead of freed,
//! so a reader that touches one after its grace period fails the model.
//!
//! loom cannot deliver a signal, so a signal handler is modelled as another reader
//! thread: dispatch is the same code either way.
//!
//! Run: `RUSTFLAGS="--cfg loom" cargo test -p multiprobe-core --release --test loom`

#![cfg(loom)]

use std::sync::Arc;

use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::thread;

use multiprobe_core::backend::{PreOutcome, ThreadState};
use multiprobe_core::testing::{HitResult, TestBackend, TestStack};
use multiprobe_core::{CallData, FnHandler, Hit, PreAction, Registry, Regs};

const A: u64 = 0x1000;

fn model(f: impl Fn() + Sync + Send + 'static) {
    let mut b = loom::model::Builder::new();
    if b.preemption_bound.is_none() {
        b.preemption_bound = Some(3);
    }
    b.check(f);
}

fn counting(calls: &Arc<AtomicUsize>, gone: &Arc<AtomicBool>) -> impl Fn(&mut Hit<'_>) {
    let (c, g) = (Arc::clone(calls), Arc::clone(gone));
    move |_: &mut Hit<'_>| {
        assert!(
            !g.load(SeqCst),
            "rule 3: a handler ran after unregister returned"
        );
        c.fetch_add(1, SeqCst);
    }
}

/// Rule 3 against a hit: once `unregister` returns the handler never runs, its stats are
/// final, and the hit never touches a freed (poisoned) bucket.
#[test]
fn dispatch_racing_unregister() {
    model(|| {
        let r = Registry::new(TestBackend::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let gone = Arc::new(AtomicBool::new(false));
        let g = r.register(A, counting(&calls, &gone)).unwrap();
        let r2 = r.clone();
        let t = thread::spawn(move || {
            let ts = ThreadState::new();
            let mut regs = Regs::default();
            r2.backend().hit(&ts, 1, A, &mut regs)
        });
        let stats = g.unregister().unwrap();
        gone.store(true, SeqCst);
        let res = t.join().unwrap();
        assert_eq!(stats.hits as usize, calls.load(SeqCst));
        match res {
            HitResult::Stepped { .. } => assert_eq!(calls.load(SeqCst), 1),
            HitResult::NoTrap | HitResult::Reexecuted => assert_eq!(calls.load(SeqCst), 0),
            other => panic!("{other:?}"),
        }
    });
}

/// Two readers and a writer on the RCU domain: the writer replaces the bucket the
/// readers are using (a second handler at the same address), then removes it again,
/// waiting for the grace period and reclaiming. The readers must never see a reclaimed
/// bucket, and the permanent handler runs on every trap.
#[test]
fn two_readers_and_a_writer() {
    model(|| {
        let r = Registry::new(TestBackend::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let never = Arc::new(AtomicBool::new(false));
        let _keep = r.register(A, counting(&calls, &never)).unwrap();
        let readers: Vec<_> = (0..2u32)
            .map(|tid| {
                let r = r.clone();
                thread::spawn(move || {
                    let ts = ThreadState::new();
                    let mut regs = Regs::default();
                    r.backend().trap(&ts, tid, A, &mut regs)
                })
            })
            .collect();
        let extra_calls = Arc::new(AtomicUsize::new(0));
        let extra_gone = Arc::new(AtomicBool::new(false));
        let extra = r.register(A, counting(&extra_calls, &extra_gone)).unwrap();
        let s = extra.unregister().unwrap();
        extra_gone.store(true, SeqCst);
        for t in readers {
            assert_eq!(t.join().unwrap(), HitResult::Stepped { post: false });
        }
        assert_eq!(calls.load(SeqCst), 2);
        assert_eq!(s.hits as usize, extra_calls.load(SeqCst));
    });
}

/// Enable/disable racing a hit: a handler's post runs if and only if its pre ran in the
/// same hit, whatever the interleaving, and disabling the only handler disarms.
#[test]
fn enable_disable_racing_a_hit() {
    model(|| {
        let r = Registry::new(TestBackend::new());
        let pres = Arc::new(AtomicUsize::new(0));
        let posts = Arc::new(AtomicUsize::new(0));
        let (p1, p2) = (Arc::clone(&pres), Arc::clone(&posts));
        let g = r
            .register_handler(
                A,
                FnHandler::new()
                    .pre(move |_| {
                        p1.fetch_add(1, SeqCst);
                        PreAction::Continue
                    })
                    .post(move |_| {
                        p2.fetch_add(1, SeqCst);
                    }),
            )
            .unwrap();
        let r2 = r.clone();
        let t = thread::spawn(move || {
            let ts = ThreadState::new();
            let mut regs = Regs::default();
            r2.backend().hit(&ts, 1, A, &mut regs)
        });
        g.disable().unwrap();
        g.enable().unwrap();
        let res = t.join().unwrap();
        assert_eq!(pres.load(SeqCst), posts.load(SeqCst), "{res:?}");
        match res {
            HitResult::Stepped { post: true } => assert_eq!(pres.load(SeqCst), 1),
            // Trapped while disabled: the instruction ran, no handler did.
            HitResult::Stepped { post: false } | HitResult::NoTrap | HitResult::Reexecuted => {
                assert_eq!(pres.load(SeqCst), 0)
            }
            other => panic!("{other:?}"),
        }
        drop(g);
    });
}

/// Rule 4: a hit that begins after `register` returned (ordered by a flag) runs it.
#[test]
fn visibility_after_register_returns() {
    model(|| {
        let r = Registry::new(TestBackend::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let never = Arc::new(AtomicBool::new(false));
        let registered = Arc::new(AtomicBool::new(false));
        let (r2, reg2, c2) = (r.clone(), Arc::clone(&registered), Arc::clone(&calls));
        let t = thread::spawn(move || {
            let ts = ThreadState::new();
            let mut regs = Regs::default();
            let before = c2.load(SeqCst);
            if reg2.load(SeqCst) {
                assert_eq!(
                    r2.backend().hit(&ts, 1, A, &mut regs),
                    HitResult::Stepped { post: false }
                );
                assert_eq!(c2.load(SeqCst), before + 1);
            }
        });
        let g = r.register(A, counting(&calls, &never)).unwrap();
        registered.store(true, SeqCst);
        t.join().unwrap();
        drop(g);
    });
}

/// Rule 3 against a deferred step: unregister waits until the thread that is between
/// its pre and its post has finished the post.
#[test]
fn unregister_waits_for_a_deferred_step() {
    model(|| {
        let r = Registry::new(TestBackend::new());
        let post_done = Arc::new(AtomicBool::new(false));
        let pd = Arc::clone(&post_done);
        let g = r
            .register_handler(A, FnHandler::new().post(move |_| pd.store(true, SeqCst)))
            .unwrap();
        let d = r.dispatcher();
        let entered = Arc::new(AtomicBool::new(false));
        let e2 = Arc::clone(&entered);
        let t = thread::spawn(move || {
            let ts = ThreadState::new();
            let mut regs = Regs {
                rip: A,
                ..Regs::default()
            };
            match d.pre(&ts, A, 1, &mut regs, &multiprobe_core::backend::NoMemory) {
                PreOutcome::Step(s) => {
                    assert!(s.wants_post());
                    s.defer_post();
                    e2.store(true, SeqCst);
                    regs.rip = A + 1;
                    assert!(d.post(&ts, A, 1, &mut regs, &multiprobe_core::backend::NoMemory));
                }
                PreOutcome::NotOurs => {}
                PreOutcome::Redirect => panic!("nobody redirects"),
            };
        });
        // Wait until the hitter is between pre and post (or never found the site).
        let _ = entered.load(SeqCst);
        let was_pending = entered.load(SeqCst);
        g.unregister().unwrap();
        if was_pending {
            assert!(
                post_done.load(SeqCst),
                "unregister returned before the pending post ran"
            );
        }
        t.join().unwrap();
    });
}

/// Derived hit counts (one walk counter per view, `tally`) against a hit racing a new
/// view: every handler's count is the calls it got — a lower bound while the hit runs,
/// exact once it is over — whichever view the hit walked.
#[test]
fn hit_counts_while_views_change() {
    model(|| {
        let r = Registry::new(TestBackend::new());
        let (a_calls, b_calls) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let never = Arc::new(AtomicBool::new(false));
        let a = r.register(A, counting(&a_calls, &never)).unwrap();
        let r2 = r.clone();
        let t = thread::spawn(move || {
            let ts = ThreadState::new();
            let mut regs = Regs::default();
            r2.backend().hit(&ts, 1, A, &mut regs)
        });
        let b = r.register(A, counting(&b_calls, &never)).unwrap();
        let during = a.stats().unwrap().hits;
        assert!(during <= 1, "{during}");
        assert!(matches!(t.join().unwrap(), HitResult::Stepped { .. }));
        assert_eq!(a.stats().unwrap().hits, 1);
        assert_eq!(a_calls.load(SeqCst), 1);
        assert_eq!(b.stats().unwrap().hits as usize, b_calls.load(SeqCst));
        assert_eq!(r.site(A).unwrap().hits, 1);
        assert_eq!(b.unregister().unwrap().hits as usize, b_calls.load(SeqCst));
        assert_eq!(a.unregister().unwrap().hits, 1);
    });
}

/// `PreAction::Remove` (the lock-free request: the handler's flag, the table's gate, the
/// stack) racing a hit on another thread and a writer that registers a second handler
/// at the site — copying the view that lists the removed one — then collects: a hit
/// ordered after the request (by a flag) never calls it, whichever view it walks, and
/// once collected and synchronized the registry has forgotten it and the site lives on
/// for the other handler.
#[test]
fn a_handler_removing_itself_races_a_hit_and_a_writer() {
    model(|| {
        let r = Registry::new(TestBackend::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let asked = Arc::new(AtomicBool::new(false));
        let c = Arc::clone(&calls);
        let id = r
            .register_handler(
                A,
                FnHandler::new().pre(move |_: &mut Hit<'_>| {
                    c.fetch_add(1, SeqCst);
                    PreAction::Remove
                }),
            )
            .unwrap()
            .into_id();
        let (r1, a1) = (r.clone(), Arc::clone(&asked));
        let first = thread::spawn(move || {
            let ts = ThreadState::new();
            let mut regs = Regs::default();
            let res = r1.backend().hit(&ts, 1, A, &mut regs);
            a1.store(true, SeqCst);
            res
        });
        let (r2, a2, c2) = (r.clone(), Arc::clone(&asked), Arc::clone(&calls));
        let second = thread::spawn(move || {
            let ts = ThreadState::new();
            let mut regs = Regs::default();
            if a2.load(SeqCst) {
                let before = c2.load(SeqCst);
                r2.backend().hit(&ts, 2, A, &mut regs);
                assert_eq!(
                    c2.load(SeqCst),
                    before,
                    "called after its removal was asked"
                );
            }
        });
        let never = Arc::new(AtomicBool::new(false));
        let other_calls = Arc::new(AtomicUsize::new(0));
        let other = r.register(A, counting(&other_calls, &never)).unwrap();
        assert_eq!(first.join().unwrap(), HitResult::Stepped { post: false });
        second.join().unwrap();
        let n = calls.load(SeqCst);
        assert!((1..=2).contains(&n), "{n}");
        r.collect().unwrap();
        r.synchronize().unwrap();
        assert!(r.stats(id).is_err(), "forgotten once collected");
        let ts = ThreadState::new();
        let mut regs = Regs::default();
        let before = other_calls.load(SeqCst);
        assert_eq!(
            r.backend().hit(&ts, 3, A, &mut regs),
            HitResult::Stepped { post: false }
        );
        assert_eq!(calls.load(SeqCst), n);
        assert_eq!(other_calls.load(SeqCst), before + 1);
        drop(other);
    });
}

/// Rule 10's quiescence against a call in flight on another thread: its entry ran the
/// handler's pre-hook (or missed the site), and it returns while the handler is being
/// unregistered. Once `unregister` returned the return hook never runs; whatever the
/// interleaving the call returns to its caller, and the final stats count the return
/// exactly when the hook ran.
#[test]
fn a_return_racing_unregister() {
    model(|| {
        let r = Registry::new(TestBackend::new());
        let calls = Arc::new(AtomicUsize::new(0));
        let gone = Arc::new(AtomicBool::new(false));
        let (c, g) = (Arc::clone(&calls), Arc::clone(&gone));
        let probe = r
            .register_handler(
                A,
                FnHandler::new().ret(move |_: &mut Hit<'_>, _: &CallData| {
                    assert!(
                        !g.load(SeqCst),
                        "rule 10: a return hook ran after unregister returned"
                    );
                    c.fetch_add(1, SeqCst);
                }),
            )
            .unwrap();
        let r2 = r.clone();
        let t = thread::spawn(move || {
            let ts = ThreadState::new();
            ts.reserve_returns(64);
            let stack = TestStack::new();
            let mut regs = Regs {
                rsp: 0x8000,
                ..Regs::default()
            };
            r2.backend().call(&ts, 1, A, 0x99, &mut regs, &stack);
            let out = r2.backend().ret(&ts, 1, &mut regs, &stack);
            assert_eq!(regs.rip, 0x99, "the call returns to its caller ({out:?})");
            assert_eq!(ts.returns_in_flight(), 0);
        });
        let stats = probe.unregister().unwrap();
        gone.store(true, SeqCst);
        t.join().unwrap();
        assert_eq!(stats.returns as usize, calls.load(SeqCst));
        assert!(stats.returns <= stats.hits);
    });
}
