#![cfg(not(loom))]

//! Rule 10 of the contract (return probes), through the test backend: a call's entry
//! and its return paired, with what the entry hook left; order, recursion, quiescence,
//! enable/disable, reentrancy, calls skipped by a longjmp, a full return stack, bad
//! addresses, and the unwinder's restore.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use multiprobe_core::backend::{return_frame_words, RetOutcome, ThreadState};
use multiprobe_core::testing::{
    Event, HitResult, RetResult, TestBackend, TestStack, RET_TRAMPOLINE,
};
use multiprobe_core::{
    CallData, Error, FnHandler, Handler, Hit, PreAction, Registration, Registry, Regs,
};

use common::{log, taken, Log};

const F: u64 = 0x40_1000;
const G: u64 = 0x40_2000;
const TOP: u64 = 0x7000_0000;

/// A handler that keeps `rdi` at the entry and logs `ret NAME(rdi) = rax` at the return.
fn pair(l: &Log, name: &'static str) -> impl Handler {
    let l = Arc::clone(l);
    FnHandler::new()
        .pre(|hit| {
            let a = hit.regs().rdi;
            hit.call_data_mut().expect("a return hook's data")[0] = a;
            PreAction::Continue
        })
        .ret(move |hit, data: &CallData| {
            l.lock()
                .unwrap()
                .push(format!("ret {name}({}) = {}", data[0], hit.regs().rax));
        })
}

/// A registry with a [`pair`] named `f` at `F`: the registry, the log, the probe.
fn pair_at_f() -> (Registry<TestBackend>, Log, Registration<TestBackend>) {
    let r = Registry::new(TestBackend::new());
    let l = log();
    let h = r.register_handler(F, pair(&l, "f")).unwrap();
    (r, l, h)
}

struct Thread {
    ts: ThreadState,
    regs: Regs,
    stack: TestStack,
}

impl Thread {
    fn new() -> Thread {
        Thread {
            ts: ThreadState::new(),
            regs: Regs {
                rsp: TOP,
                ..Regs::default()
            },
            stack: TestStack::new(),
        }
    }

    /// Call `addr` with `arg` from `from`.
    fn call(&mut self, r: &Registry<TestBackend>, addr: u64, arg: u64, from: u64) -> HitResult {
        self.regs.rdi = arg;
        r.backend()
            .call(&self.ts, 1, addr, from, &mut self.regs, &self.stack)
    }

    /// Return `value`.
    fn ret(&mut self, r: &Registry<TestBackend>, value: u64) -> RetResult {
        self.regs.rax = value;
        r.backend().ret(&self.ts, 1, &mut self.regs, &self.stack)
    }
}

#[test]
fn a_return_hook_sees_the_return_value_the_caller_and_what_the_entry_left() {
    let (r, l, h) = pair_at_f();
    let mut t = Thread::new();
    assert_eq!(t.call(&r, F, 7, 0x1234), HitResult::Stepped { post: false });
    assert_eq!(
        t.stack.word(TOP - 8),
        RET_TRAMPOLINE,
        "the return address was swapped"
    );
    assert_eq!(t.ts.returns_in_flight(), 1);
    assert_eq!(t.ret(&r, 49), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(t.regs.rip, 0x1234, "back to the caller");
    assert_eq!(t.regs.rsp, TOP);
    assert_eq!(taken(&l), ["ret f(7) = 49"]);
    assert_eq!(t.ts.returns_in_flight(), 0);
    let s = h.unregister().unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (1, 1, 0));
}

#[test]
fn recursion_a_thousand_deep_pairs_every_call_innermost_first() {
    let (r, l, h) = pair_at_f();
    let mut t = Thread::new();
    for depth in 0..1000 {
        t.call(&r, F, depth, 0x5000 + depth);
    }
    assert_eq!(t.ts.returns_in_flight(), 1000);
    for depth in (0..1000).rev() {
        assert_eq!(
            t.ret(&r, depth * 2),
            RetResult::Trampoline(RetOutcome::Returned)
        );
        assert_eq!(t.regs.rip, 0x5000 + depth);
    }
    let got = taken(&l);
    assert_eq!(got.len(), 1000);
    assert_eq!(got[0], "ret f(999) = 1998");
    assert_eq!(got[999], "ret f(0) = 0");
    let s = h.unregister().unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (1000, 1000, 0));
}

#[test]
fn return_hooks_of_one_call_run_in_registration_order_and_may_change_the_value() {
    let r = Registry::new(TestBackend::new());
    let l = log();
    let _a = r.register_handler(F, pair(&l, "a")).unwrap();
    let _plain = r.register(F, |_| {}).unwrap();
    let _b = r
        .register_handler(
            F,
            FnHandler::new().ret(|hit, _: &CallData| hit.regs_mut().rax += 1),
        )
        .unwrap();
    let _c = r.register_handler(F, pair(&l, "c")).unwrap();
    let mut t = Thread::new();
    t.call(&r, F, 3, 0x99);
    t.ret(&r, 10);
    assert_eq!(taken(&l), ["ret a(3) = 10", "ret c(3) = 11"]);
    assert_eq!(t.regs.rax, 11, "the caller sees the changed value");
}

#[test]
fn after_unregister_returns_no_return_hook_runs_and_the_call_returns_where_it_should() {
    let (r, l, h) = pair_at_f();
    let keep = r.register_handler(F, pair(&l, "keep")).unwrap();
    let mut t = Thread::new();
    t.call(&r, F, 1, 0x77);
    let s = h.unregister().unwrap();
    assert_eq!(
        (s.hits, s.returns, s.returns_lost),
        (1, 0, 0),
        "in flight: neither"
    );
    keep.unregister().unwrap();
    assert!(r.is_empty());
    // The site is gone; the call still returns through the trampoline to its caller.
    assert_eq!(t.ret(&r, 5), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(t.regs.rip, 0x77);
    assert!(taken(&l).is_empty());
}

#[test]
fn unregister_from_another_thread_while_two_threads_have_calls_in_flight() {
    let r = Registry::new(TestBackend::new());
    let calls = Arc::new(AtomicU64::new(0));
    let gone = Arc::new(AtomicBool::new(false));
    let (c, g) = (Arc::clone(&calls), Arc::clone(&gone));
    let h = r
        .register_handler(
            F,
            FnHandler::new().ret(move |_, _: &CallData| {
                assert!(
                    !g.load(SeqCst),
                    "a return hook ran after unregister returned"
                );
                c.fetch_add(1, SeqCst);
            }),
        )
        .unwrap();
    let entered = Arc::new(std::sync::Barrier::new(3));
    let unregistered = Arc::new(std::sync::Barrier::new(3));
    let threads: Vec<_> = (0..2)
        .map(|i| {
            let (r, e, u) = (r.clone(), Arc::clone(&entered), Arc::clone(&unregistered));
            std::thread::spawn(move || {
                let mut t = Thread::new();
                // One call returns before the unregister, one after.
                t.call(&r, F, i, 0x100);
                t.call(&r, F, i, 0x200);
                assert_eq!(t.ret(&r, 0), RetResult::Trampoline(RetOutcome::Returned));
                e.wait();
                u.wait();
                assert_eq!(t.ret(&r, 0), RetResult::Trampoline(RetOutcome::Returned));
                assert_eq!(t.regs.rip, 0x100, "the program runs on");
                assert_eq!(t.ts.returns_in_flight(), 0);
            })
        })
        .collect();
    entered.wait();
    let s = h.unregister().unwrap();
    gone.store(true, SeqCst);
    unregistered.wait();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(calls.load(SeqCst), 2);
    assert_eq!((s.hits, s.returns), (4, 2));
}

#[test]
fn a_call_entered_while_enabled_returns_to_its_hook_after_a_disable_and_not_the_other_way() {
    let (r, l, h) = pair_at_f();
    let _other = r.register(F, |_| {}).unwrap(); // keeps the site armed
    let mut t = Thread::new();
    t.call(&r, F, 1, 0x10);
    h.disable().unwrap();
    t.call(&r, F, 2, 0x20); // its entry does not run the disabled pre: no return armed
    h.enable().unwrap();
    assert_eq!(
        t.ret(&r, 0),
        RetResult::Plain,
        "the inner call was never armed"
    );
    assert_eq!(t.ret(&r, 0), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(taken(&l), ["ret f(1) = 0"]);
    let s = h.stats().unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (1, 1, 0));
}

#[test]
fn calls_skipped_by_a_longjmp_are_recognised_by_their_stack_pointer_and_counted_lost() {
    let (r, l, hf) = pair_at_f();
    let hg = r.register_handler(G, pair(&l, "g")).unwrap();
    let mut t = Thread::new();
    // f -> g -> g, then g longjmps back into f, which returns.
    t.call(&r, F, 1, 0x10);
    let in_f = t.regs.rsp;
    t.regs.rsp -= 32;
    t.call(&r, G, 2, 0x20);
    t.call(&r, G, 3, 0x30);
    t.regs.rsp = in_f;
    assert_eq!(t.ret(&r, 9), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(t.regs.rip, 0x10);
    assert_eq!(taken(&l), ["ret f(1) = 9"]);
    let (sf, sg) = (hf.stats().unwrap(), hg.stats().unwrap());
    assert_eq!((sf.returns, sf.returns_lost), (1, 0));
    assert_eq!((sg.hits, sg.returns, sg.returns_lost), (2, 0, 2));
    // Their slots still lead to the trampoline (nothing overwrote them yet), so they
    // are kept, counted lost already: they could be calls on another stack.
    assert_eq!(t.ts.returns_in_flight(), 2);
    // A function that longjmps out every time, called again and again at one depth:
    // each entry finds the previous frame's slot overwritten and drops it, and the
    // code that runs meanwhile overwrites the deeper slots.
    for i in 0..100 {
        t.regs.rsp = TOP;
        t.call(&r, G, i, 0x40);
        for slot in (TOP - 256..TOP - 8).step_by(8) {
            t.stack.set_word(slot, 0x5eed);
        }
    }
    assert_eq!(
        t.ts.returns_in_flight(),
        1,
        "a never-returning function leaks nothing"
    );
    assert_eq!(
        hg.stats().unwrap().returns_lost,
        2 + 99,
        "each skipped call counted lost once"
    );
}

#[test]
fn a_call_in_flight_on_another_stack_survives_returns_and_entries_on_this_one() {
    // Coroutines (swapcontext): f is called on stack A and switches to stack B inside
    // the call; there g is called and switches back to A inside its call; f returns,
    // f and g are called again on A; then B resumes and g returns. Stack B lies below
    // A here, so g's frame sits where a call skipped by a longjmp would.
    let (r, l, hf) = pair_at_f();
    let hg = r.register_handler(G, pair(&l, "g")).unwrap();
    let mut t = Thread::new();
    let b = TOP - 0x10_0000;
    t.call(&r, F, 1, 0x10);
    let a = t.regs.rsp;
    t.regs.rsp = b;
    t.call(&r, G, 2, 0x20);
    let in_g = t.regs.rsp;
    t.regs.rsp = a;
    assert_eq!(t.ret(&r, 11), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(t.regs.rip, 0x10);
    assert_eq!(
        t.stack.word(in_g),
        RET_TRAMPOLINE,
        "g's call still leads back"
    );
    assert_eq!(
        hg.stats().unwrap().returns_lost,
        1,
        "counted lost while it may be dead"
    );
    t.call(&r, F, 3, 0x30);
    assert_eq!(t.ret(&r, 33), RetResult::Trampoline(RetOutcome::Returned));
    t.call(&r, G, 4, 0x40);
    assert_eq!(t.ret(&r, 44), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(t.regs.rip, 0x40);
    // Back on B: g returns to its caller there.
    t.regs.rsp = in_g;
    assert_eq!(t.ret(&r, 22), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(t.regs.rip, 0x20);
    assert_eq!(
        taken(&l),
        [
            "ret f(1) = 11",
            "ret f(3) = 33",
            "ret g(4) = 44",
            "ret g(2) = 22"
        ]
    );
    let (sf, sg) = (hf.stats().unwrap(), hg.stats().unwrap());
    assert_eq!((sf.hits, sf.returns, sf.returns_lost), (2, 2, 0));
    assert_eq!(
        (sg.hits, sg.returns, sg.returns_lost),
        (2, 2, 0),
        "the lost count taken back"
    );
    assert_eq!(t.ts.returns_in_flight(), 0);
}

#[test]
fn a_frame_below_the_stack_pointer_still_leading_to_the_trampoline_is_kept() {
    // Code on an alternate stack above the thread's stack calls a probed function while
    // a call on the thread's stack is in flight: that frame is live, its slot below.
    let (r, l, _h) = pair_at_f();
    let mut t = Thread::new();
    t.call(&r, F, 1, 0x10);
    let main = t.regs.rsp;
    t.regs.rsp = TOP + 0x10_0000; // the alternate stack
    t.call(&r, F, 2, 0x20);
    assert_eq!(t.ts.returns_in_flight(), 2);
    t.ret(&r, 0);
    assert_eq!(t.regs.rip, 0x20);
    t.regs.rsp = main;
    assert_eq!(t.ret(&r, 0), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(t.regs.rip, 0x10);
    assert_eq!(taken(&l), ["ret f(2) = 0", "ret f(1) = 0"]);
}

#[test]
fn a_full_return_stack_counts_the_return_lost_and_leaves_the_call_alone() {
    let (r, _, h) = pair_at_f();
    let mut t = Thread::new();
    t.ts.reserve_returns(2 * return_frame_words(1));
    for i in 0..3 {
        t.call(&r, F, i, 0x100 + i);
    }
    assert_eq!(
        t.stack.word(t.regs.rsp),
        0x102,
        "the third call keeps its return address"
    );
    assert_eq!(t.ret(&r, 0), RetResult::Plain);
    assert_eq!(t.ret(&r, 0), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(t.ret(&r, 0), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(t.regs.rip, 0x100);
    let s = h.stats().unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (3, 2, 1));
}

#[test]
fn without_a_return_stack_or_a_trampoline_returns_are_lost() {
    let (r, _, h) = pair_at_f();
    let mut regs = Regs {
        rsp: TOP,
        ..Regs::default()
    };
    // The plain hit path: no return stack on this thread state.
    let ts = ThreadState::new();
    assert_eq!(
        r.backend().hit(&ts, 1, F, &mut regs),
        HitResult::Stepped { post: false }
    );
    assert_eq!(h.stats().unwrap().returns_lost, 1);
}

#[test]
fn a_return_probe_where_no_function_starts_is_a_clear_error_and_changes_nothing() {
    let r = Registry::new(TestBackend::new());
    r.backend().set_function_entries([F]);
    let before = r.backend().events();
    let err = r
        .register_handler(G, FnHandler::new().ret(|_, _: &CallData| {}))
        .unwrap_err();
    assert!(
        matches!(err, Error::NotFunctionEntry { addr: G, .. }),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("not a function's first instruction"),
        "{err}"
    );
    assert!(r.is_empty() && r.site(G).is_none());
    let events = r.backend().events();
    assert!(
        !events[before.len()..]
            .iter()
            .any(|e| matches!(e, Event::Arm(_))),
        "nothing armed: {events:?}"
    );
    // Entry-only handlers are fine there, and return probes at the entry.
    r.register(G, |_| {}).unwrap().unregister().unwrap();
    r.register_handler(F, FnHandler::new().ret(|_, _: &CallData| {}))
        .unwrap()
        .unregister()
        .unwrap();
}

#[test]
fn a_redirected_walk_arms_no_return_and_counts_it_lost() {
    let (r, _, h) = pair_at_f();
    let _now = r
        .register(F, |hit| {
            let _ = hit.return_now(0);
        })
        .unwrap();
    let mut t = Thread::new();
    assert_eq!(t.call(&r, F, 1, 0x10), HitResult::Redirected);
    assert_eq!(
        t.regs.rip, 0x10,
        "return_now popped the real return address"
    );
    assert_eq!(t.ts.returns_in_flight(), 0);
    let s = h.stats().unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (1, 0, 1));
}

#[test]
fn skip_return_panics_and_remove_arm_nothing() {
    let r = Registry::new(TestBackend::new());
    let rets = Arc::new(AtomicU64::new(0));
    let counting = |skip_odd: bool, panic_pre: bool| {
        let n = Arc::clone(&rets);
        FnHandler::new()
            .pre(move |hit| {
                if panic_pre {
                    panic!("injected");
                }
                if skip_odd && hit.regs().rdi % 2 == 1 {
                    hit.skip_return();
                }
                PreAction::Continue
            })
            .ret(move |_, _: &CallData| {
                n.fetch_add(1, SeqCst);
            })
    };
    let skipping = r.register_handler(F, counting(true, false)).unwrap();
    let panicking = r.register_handler(F, counting(false, true)).unwrap();
    let removing = r
        .register_handler(
            F,
            FnHandler::new()
                .pre(|_| PreAction::Remove)
                .ret(|_, _: &CallData| panic!("removed handlers never return")),
        )
        .unwrap();
    let removing_id = removing.into_id();
    let mut t = Thread::new();
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    for i in 0..4 {
        t.call(&r, F, i, 0x10);
        t.ret(&r, 0);
    }
    std::panic::set_hook(quiet);
    r.collect().unwrap();
    assert_eq!(
        rets.load(SeqCst),
        2,
        "two even calls; the panicking pre arms nothing"
    );
    let s = skipping.stats().unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (4, 2, 0));
    let s = panicking.stats().unwrap();
    assert_eq!((s.panics, s.returns, s.returns_lost), (4, 0, 0));
    assert!(r.stats(removing_id).is_err(), "collected");
}

#[test]
fn a_panicking_return_hook_is_caught_counted_and_the_call_still_returns() {
    let r = Registry::new(TestBackend::new());
    let l = log();
    let bad = r
        .register_handler(
            F,
            FnHandler::new().ret(|_, _: &CallData| panic!("injected")),
        )
        .unwrap();
    let _good = r.register_handler(F, pair(&l, "good")).unwrap();
    let mut t = Thread::new();
    t.call(&r, F, 4, 0x10);
    let quiet = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = t.ret(&r, 1);
    std::panic::set_hook(quiet);
    assert_eq!(out, RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(t.regs.rip, 0x10);
    assert_eq!(taken(&l), ["ret good(4) = 1"]);
    let s = bad.stats().unwrap();
    assert_eq!((s.returns, s.panics), (1, 1));
}

#[test]
fn a_probed_call_made_from_a_return_hook_is_missed_and_arms_nothing() {
    let r = Registry::new(TestBackend::new());
    let l = log();
    // The thread's state and stack, shared with the hook: it calls g on its own thread.
    let ts: &'static ThreadState = Box::leak(Box::new(ThreadState::new()));
    let stack: &'static TestStack = Box::leak(Box::new(TestStack::new()));
    let (st, sk) = (
        ts as *const ThreadState as usize,
        stack as *const TestStack as usize,
    );
    let seen = Arc::new(Mutex::new(None));
    let s2 = Arc::clone(&seen);
    let r3 = r.clone();
    let _f = r
        .register_handler(
            F,
            FnHandler::new().ret(move |_, _: &CallData| {
                // SAFETY: leaked above, only ever shared.
                let (ts, stack) =
                    unsafe { (&*(st as *const ThreadState), &*(sk as *const TestStack)) };
                let mut regs = Regs {
                    rsp: 0x6000_0000,
                    ..Regs::default()
                };
                let out = r3.backend().call(ts, 1, G, 0x66, &mut regs, stack);
                *s2.lock().unwrap() = Some((out, stack.word(0x6000_0000 - 8)));
            }),
        )
        .unwrap();
    let hg = r.register_handler(G, pair(&l, "g")).unwrap();
    let mut regs = Regs {
        rsp: TOP,
        ..Regs::default()
    };
    r.backend().call(ts, 1, F, 0x10, &mut regs, stack);
    r.backend().ret(ts, 1, &mut regs, stack);
    assert_eq!(
        *seen.lock().unwrap(),
        Some((HitResult::Stepped { post: false }, 0x66)),
        "the nested call ran no handler and kept its return address"
    );
    let s = hg.stats().unwrap();
    assert_eq!((s.hits, s.missed, s.returns, s.returns_lost), (0, 1, 0, 0));
    assert!(taken(&l).is_empty());
    assert_eq!(ts.returns_in_flight(), 0);
}

#[test]
fn frames_of_two_registries_on_one_thread_go_to_their_own() {
    let r1 = Registry::new(TestBackend::new());
    let r2 = Registry::new(TestBackend::new());
    let l = log();
    let _a = r1.register_handler(F, pair(&l, "one")).unwrap();
    let _b = r2.register_handler(G, pair(&l, "two")).unwrap();
    let mut t = Thread::new();
    t.call(&r1, F, 1, 0x10);
    t.call(&r2, G, 2, 0x20);
    // The inner call is r2's: r1 says so and changes nothing.
    let mut regs = t.regs;
    regs.rsp += 8;
    assert!(!r1.dispatcher().owns_return(&t.ts, regs.rsp));
    assert_eq!(t.ret(&r1, 0), RetResult::Trampoline(RetOutcome::NotOurs));
    t.regs.rsp -= 8; // undo the test backend's pop
    assert_eq!(t.ret(&r2, 5), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(t.ret(&r1, 6), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(taken(&l), ["ret two(2) = 5", "ret one(1) = 6"]);
    // A frame nobody claims: popped without running anything.
    t.call(&r1, F, 3, 0x30);
    assert_eq!(t.ts.pop_return(t.regs.rsp + 8), Some(0x30));
    assert_eq!(t.ts.pop_return(t.regs.rsp + 8), None);
    assert!(taken(&l).is_empty());
}

#[test]
fn a_return_nobody_recorded_is_unknown_and_changes_nothing() {
    let r = Registry::new(TestBackend::new());
    let _h = r
        .register_handler(F, FnHandler::new().ret(|_, _: &CallData| {}))
        .unwrap();
    let mut t = Thread::new();
    t.call(&r, F, 1, 0x10);
    let mut regs = Regs {
        rsp: 0x1234_0000,
        rip: RET_TRAMPOLINE,
        ..Regs::default()
    };
    assert_eq!(
        r.dispatcher().ret(&t.ts, 1, &mut regs, &t.stack),
        RetOutcome::Unknown
    );
    assert_eq!(regs.rip, RET_TRAMPOLINE);
    assert_eq!(t.ts.returns_in_flight(), 1);
}

#[test]
fn restored_return_addresses_let_an_unwinder_through_and_rehijack_puts_live_ones_back() {
    let (r, l, h) = pair_at_f();
    let mut t = Thread::new();
    t.call(&r, F, 1, 0x10);
    let outer = t.regs.rsp;
    t.regs.rsp -= 64;
    t.call(&r, F, 2, 0x20);
    let inner = t.regs.rsp;
    assert_eq!(t.ts.restore_return_addresses(&t.stack), 2);
    assert_eq!((t.stack.word(outer), t.stack.word(inner)), (0x10, 0x20));
    assert_eq!(
        t.ts.return_slots(),
        Vec::<(u64, u64)>::new(),
        "all restored"
    );
    // An exception thrown in the inner call is caught in the outer one: the outer call
    // is live (its slot above the catch), the inner one is gone.
    assert_eq!(t.ts.rehijack_returns(inner + 16, &t.stack), 1);
    assert_eq!(
        (t.stack.word(outer), t.stack.word(inner)),
        (RET_TRAMPOLINE, 0x20)
    );
    t.regs.rsp = outer;
    assert_eq!(t.ret(&r, 3), RetResult::Trampoline(RetOutcome::Returned));
    assert_eq!(t.regs.rip, 0x10);
    assert_eq!(taken(&l), ["ret f(1) = 3"]);
    let s = h.stats().unwrap();
    assert_eq!((s.returns, s.returns_lost), (1, 1));
    // A tracer leaving: restore, then abandon (counted lost).
    t.regs.rsp = TOP;
    t.call(&r, F, 5, 0x50);
    assert_eq!(t.ts.return_slots(), [(TOP - 8, 0x50)]);
    t.ts.restore_return_addresses(&t.stack);
    r.dispatcher().abandon_returns(&t.ts);
    assert_eq!(t.ts.returns_in_flight(), 0);
    assert_eq!(t.stack.word(TOP - 8), 0x50);
    assert_eq!(h.stats().unwrap().returns_lost, 2);
    // And a thread dropped at the trampoline by a tracer: its call's frame goes, lost.
    t.call(&r, F, 6, 0x60);
    assert_eq!(
        r.dispatcher().drop_return(&t.ts, t.regs.rsp + 8),
        Some(0x60)
    );
    assert_eq!(h.stats().unwrap().returns_lost, 3);
}

#[test]
fn hit_call_data_is_none_for_handlers_without_a_return_hook() {
    let r = Registry::new(TestBackend::new());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s1 = Arc::clone(&seen);
    let _plain = r
        .register(F, move |hit: &mut Hit<'_>| {
            s1.lock().unwrap().push(hit.call_data_mut().is_none());
        })
        .unwrap();
    let s2 = Arc::clone(&seen);
    let _ret = r
        .register_handler(
            F,
            FnHandler::new()
                .pre(move |hit| {
                    s2.lock()
                        .unwrap()
                        .push(hit.call_data_mut() == Some(&mut [0; 8]));
                    PreAction::Continue
                })
                .ret(|_, _: &CallData| {}),
        )
        .unwrap();
    let mut t = Thread::new();
    t.call(&r, F, 0, 0x10);
    assert_eq!(*seen.lock().unwrap(), [true, true]);
}

#[test]
fn a_longjmp_loop_whose_skipped_slots_keep_the_trampoline_does_not_fill_the_stack() {
    // f -> g -> g, then a longjmp back into f, which returns; again and again at the
    // same depths, with nothing overwriting the skipped calls' slots in between (only
    // the next calls at those slots do). The skipped calls are kept as suspects; a new
    // call at a suspect's slot ends it, so no more than the last iteration's two stay.
    let (r, l, hf) = pair_at_f();
    let hg = r.register_handler(G, pair(&l, "g")).unwrap();
    let mut t = Thread::new();
    t.ts.reserve_returns(16 * return_frame_words(1));
    for i in 0..50 {
        t.regs.rsp = TOP;
        t.call(&r, F, i, 0x10);
        let in_f = t.regs.rsp;
        t.regs.rsp -= 32;
        t.call(&r, G, i, 0x20);
        t.call(&r, G, i, 0x30);
        t.regs.rsp = in_f;
        assert_eq!(t.ret(&r, i), RetResult::Trampoline(RetOutcome::Returned));
        assert_eq!(
            t.ts.returns_in_flight(),
            2,
            "iteration {i}: the last two g calls"
        );
    }
    let (sf, sg) = (hf.stats().unwrap(), hg.stats().unwrap());
    assert_eq!((sf.hits, sf.returns, sf.returns_lost), (50, 50, 0));
    assert_eq!((sg.hits, sg.returns, sg.returns_lost), (100, 0, 100));
}
