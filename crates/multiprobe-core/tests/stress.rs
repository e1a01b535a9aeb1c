#![cfg(not(loom))]

//! Two threads hit one probed address (and a second, churning one) while a third
//! registers and unregisters 10,000 times. Counts must be exact per the contract:
//! every hit of the permanent handler is counted, a churned handler runs exactly as
//! often as its final stats say and never after `unregister` returned, and the
//! breakpoint at the churned address is never found unowned.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use multiprobe_core::backend::ThreadState;
use multiprobe_core::testing::{HitResult, TestBackend};
use multiprobe_core::{FnHandler, Registry, Regs};

const SHARED: u64 = 0x7000_0000;
const CHURN: u64 = 0x7000_1000;
const HITS_PER_THREAD: u64 = 200_000;
const CHURN_ROUNDS: u64 = 10_000;

#[test]
fn two_hitters_and_a_churning_registrar_keep_exact_counts() {
    let r = Registry::new(TestBackend::new());
    let permanent_calls = Arc::new(AtomicU64::new(0));
    let pc = Arc::clone(&permanent_calls);
    let permanent = r
        .register_handler(
            SHARED,
            FnHandler::new()
                .pre(move |_| {
                    pc.fetch_add(1, SeqCst);
                    multiprobe_core::PreAction::Continue
                })
                .post(|_| {}),
        )
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));

    let hitters: Vec<_> = (0..2u32)
        .map(|tid| {
            let r = r.clone();
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let ts = ThreadState::new();
                let mut regs = Regs::default();
                let mut stepped = 0u64;
                let mut churn_seen = [0u64; 3];
                for i in 0.. {
                    if i >= HITS_PER_THREAD && stop.load(SeqCst) {
                        break;
                    }
                    assert_eq!(
                        r.backend().hit(&ts, tid, SHARED, &mut regs),
                        HitResult::Stepped { post: true }
                    );
                    stepped += 1;
                    match r.backend().hit(&ts, tid, CHURN, &mut regs) {
                        HitResult::NoTrap => churn_seen[0] += 1,
                        HitResult::Stepped { .. } => churn_seen[1] += 1,
                        HitResult::Reexecuted => churn_seen[2] += 1,
                        other => panic!("a trap at the churned address was {other:?}"),
                    }
                }
                (stepped, churn_seen)
            })
        })
        .collect();

    let churn_calls_total = Arc::new(AtomicU64::new(0));
    let mut churn_hits_total = 0;
    for round in 0..CHURN_ROUNDS {
        let calls = Arc::new(AtomicU64::new(0));
        let gone = Arc::new(AtomicBool::new(false));
        let (c, g, t) = (
            Arc::clone(&calls),
            Arc::clone(&gone),
            Arc::clone(&churn_calls_total),
        );
        let reg = r
            .register(CHURN, move |_| {
                assert!(!g.load(SeqCst), "a handler ran after unregister returned");
                c.fetch_add(1, SeqCst);
                t.fetch_add(1, SeqCst);
            })
            .unwrap();
        // Alternate between the two removal paths every other round.
        let stats = if round % 2 == 0 {
            reg.unregister().unwrap()
        } else {
            let id = reg.into_id();
            r.unregister_batch(&[id]).unwrap()[0]
        };
        gone.store(true, SeqCst);
        assert_eq!(stats.hits, calls.load(SeqCst), "final stats are exact");
        assert_eq!(stats.missed, 0);
        churn_hits_total += stats.hits;
    }
    stop.store(true, SeqCst);
    let mut total = 0;
    let mut churn_stepped = 0;
    for h in hitters {
        let (stepped, churn_seen) = h.join().unwrap();
        total += stepped;
        churn_stepped += churn_seen[1];
    }
    let s = permanent.stats().unwrap();
    assert_eq!(s.hits, total);
    assert_eq!(s.missed, 0);
    assert_eq!(permanent_calls.load(SeqCst), total);
    assert_eq!(r.site(SHARED).unwrap().hits, total);
    assert_eq!(churn_calls_total.load(SeqCst), churn_hits_total);
    // Every trap that found a site ran the (single) churned handler.
    assert_eq!(churn_stepped, churn_hits_total);
    assert!(r.site(CHURN).is_none());
    assert_eq!(r.backend().byte(CHURN), multiprobe_core::testing::ORIGINAL);
}
