//! Return probes and control flow that leaves calls without returning, or walks the
//! stack: `longjmp`, a C++ exception thrown through return-probed functions and caught,
//! `backtrace(3)` from inside return-probed calls, a Rust panic through one (C and C++
//! code from multiprobe-test-targets' `inproc` module, linked into this test). The
//! program must behave as unprobed; calls skipped are counted lost, not returned.
//! Runs in the mode the environment says (`.ci/run` runs it both ways).

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use multiprobe_backend_sigtrap::SigtrapRegistry;
use multiprobe_core::{CallData, FnHandler, HandlerStats, PreAction, Registration};
use multiprobe_test_targets::inproc;

/// A return probe at `addr` counting its returns into the returned counter.
fn probe(
    reg: &SigtrapRegistry,
    addr: u64,
) -> (
    Registration<multiprobe_backend_sigtrap::SigtrapBackend>,
    Arc<AtomicU64>,
) {
    let n = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&n);
    let h = FnHandler::new()
        .pre(|_| PreAction::Continue)
        .ret(move |_, _: &CallData| {
            c.fetch_add(1, SeqCst);
        });
    (reg.register_handler(addr, h).unwrap(), n)
}

fn counts(s: HandlerStats) -> (u64, u64, u64) {
    (s.hits, s.returns, s.returns_lost)
}

#[test]
fn longjmp_out_of_return_probed_calls_works_and_counts_them_lost() {
    let unprobed: Vec<i64> = (0..100).map(inproc::setjmp_run).collect();
    let reg = multiprobe_backend_sigtrap::registry();
    let (outer, outer_n) = probe(&reg, inproc::addr("mp_rp_setjmp_run"));
    let (via, via_n) = probe(&reg, inproc::addr("mp_rp_jump_via"));
    let (jumper, jumper_n) = probe(&reg, inproc::addr("mp_rp_jumper"));
    let probed: Vec<i64> = (0..100).map(inproc::setjmp_run).collect();
    assert_eq!(probed, unprobed);
    assert_eq!(probed[7], 1008);
    // The outer call returns each time (the calls it holds, skipped, are dropped then).
    assert_eq!(counts(outer.stats().unwrap()), (100, 100, 0));
    assert_eq!(outer_n.load(SeqCst), 100);
    assert_eq!(counts(via.stats().unwrap()), (100, 0, 100));
    assert_eq!(counts(jumper.stats().unwrap()), (100, 0, 100));
    assert_eq!(via_n.load(SeqCst) + jumper_n.load(SeqCst), 0);
}

#[test]
fn coroutines_switching_stacks_inside_return_probed_calls_return_through_every_call() {
    // Every return of `mp_rp_co_resume` comes while a `mp_rp_co_yield` call is in
    // flight on the other stack, and each of those returns later: with the other stack
    // below this one, its frame sits where a call skipped by a longjmp would. (Before,
    // that frame was dropped and the return found nothing: the process aborted.)
    let n = 200;
    let unprobed = [false, true].map(|above| inproc::coroutines(n, above));
    assert_eq!(unprobed, [n * (n - 1) + 3 * n * (n - 1) / 2 + n; 2]);
    let reg = multiprobe_backend_sigtrap::registry();
    let (resume, resume_n) = probe(&reg, inproc::addr("mp_rp_co_resume"));
    let (yields, yield_n) = probe(&reg, inproc::addr("mp_rp_co_yield"));
    for (k, above) in [false, true].into_iter().enumerate() {
        assert_eq!(
            inproc::coroutines(n, above),
            unprobed[k],
            "A above B: {above}"
        );
    }
    let (r, y) = (2 * (n as u64 + 1), 2 * n as u64);
    assert_eq!(counts(resume.stats().unwrap()), (r, r, 0));
    assert_eq!(
        counts(yields.stats().unwrap()),
        (y, y, 0),
        "every call returned, none left counted lost"
    );
    assert_eq!((resume_n.load(SeqCst), yield_n.load(SeqCst)), (r, y));
}

#[test]
fn a_cpp_exception_through_return_probed_functions_is_caught_as_unprobed() {
    let unprobed: Vec<i64> = (0..100).map(inproc::catch_odd).collect();
    assert_eq!((unprobed[3], unprobed[4]), (-1003, 29));
    let reg = multiprobe_backend_sigtrap::registry();
    let (catch, _) = probe(&reg, inproc::addr("mp_rp_catch"));
    let (through, _) = probe(&reg, inproc::addr("mp_rp_through"));
    let (thrower, _) = probe(&reg, inproc::addr("mp_rp_thrower"));
    let probed: Vec<i64> = (0..100).map(inproc::catch_odd).collect();
    assert_eq!(probed, unprobed);
    // Even x return normally; odd x throw through `through` and `thrower`.
    assert_eq!(counts(catch.stats().unwrap()), (100, 100, 0));
    assert_eq!(counts(through.stats().unwrap()), (100, 50, 50));
    assert_eq!(counts(thrower.stats().unwrap()), (100, 50, 50));
}

#[test]
fn backtrace_from_inside_return_probed_calls_sees_the_original_callers() {
    // One call site for both traces, so that every frame's return address is the same.
    let reg = multiprobe_backend_sigtrap::registry();
    let mut probes = Vec::new();
    let mut traces = Vec::new();
    for probed in [false, true] {
        if probed {
            probes.push(probe(&reg, inproc::addr("mp_rp_bt_outer")));
            probes.push(probe(&reg, inproc::addr("mp_rp_bt_inner")));
        }
        traces.push(inproc::backtrace(64));
    }
    let (unprobed, probed) = (&traces[0], &traces[1]);
    assert!(unprobed.len() >= 4, "{unprobed:x?}");
    let [(outer, outer_n), (inner, inner_n)] = &probes[..] else {
        unreachable!()
    };
    assert_eq!(
        probed, unprobed,
        "the same frames, no trampoline among them"
    );
    // And the calls still returned through their return hooks.
    assert_eq!(counts(outer.stats().unwrap()), (1, 1, 0));
    assert_eq!(counts(inner.stats().unwrap()), (1, 1, 0));
    assert_eq!(outer_n.load(SeqCst) + inner_n.load(SeqCst), 2);
}

#[inline(never)]
fn panics_for_odd(x: u64) -> u64 {
    if black_box(x) % 2 == 1 {
        std::panic::panic_any(x);
    }
    x * 3
}

#[inline(never)]
fn outer_of_panics(x: u64) -> u64 {
    black_box(panics_for_odd(black_box(x))) + 1
}

#[test]
fn a_rust_panic_through_a_return_probed_function_is_caught_as_unprobed() {
    let run = || -> Vec<Result<u64, u64>> {
        (0..20)
            .map(|x| {
                std::panic::catch_unwind(|| outer_of_panics(x))
                    .map_err(|p| *p.downcast::<u64>().unwrap())
            })
            .collect()
    };
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let unprobed = run();
    let reg = multiprobe_backend_sigtrap::registry();
    let (inner, _) = probe(
        &reg,
        multiprobe_backend_sigtrap::fn_addr(panics_for_odd as fn(u64) -> u64),
    );
    let (outer, _) = probe(
        &reg,
        multiprobe_backend_sigtrap::fn_addr(outer_of_panics as fn(u64) -> u64),
    );
    let probed = run();
    std::panic::set_hook(prev);
    assert_eq!(probed, unprobed);
    assert_eq!(probed[3], Err(3));
    assert_eq!(probed[4], Ok(13));
    // The calls the last panic skipped are found dead at the next entry.
    assert_eq!(outer_of_panics(black_box(2)), 7);
    assert_eq!(counts(inner.stats().unwrap()), (21, 11, 10));
    assert_eq!(counts(outer.stats().unwrap()), (21, 11, 10));
}
