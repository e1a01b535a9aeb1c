//! Return probes on a traced program (C and C++ targets, `mp-c-rets`, `mp-cpp-throwret`):
//! return values, exact entry and return counts, recursion, threads, a C++ exception
//! thrown through return-probed calls, `longjmp`, `backtrace(3)`, detach and unregister
//! with calls in flight. The program's output must be what it prints unprobed.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use multiprobe_backend_ptrace::{ExitStatus, PtraceBackend, Stop, Tracer};
use multiprobe_core::{Error, FnHandler, PreAction, Registration};

/// One return seen: (thread, first argument at entry, second argument, return value).
type Return = (u32, u64, u64, u64);
/// The returns a [`ret_probe`] saw.
type Seen = Arc<Mutex<Vec<Return>>>;

/// A return probe on `name` that records every return with the entry's arguments.
fn ret_probe(t: &Tracer, name: &str) -> (Registration<PtraceBackend>, Seen) {
    let addr = t.resolve(name).unwrap();
    let seen: Seen = Arc::default();
    let s = Arc::clone(&seen);
    let h = FnHandler::new()
        .pre(|hit| {
            let (a, b) = (hit.arg(0).unwrap(), hit.arg(1).unwrap());
            let d = hit.call_data_mut().expect("a return handler has call data");
            d[0] = a;
            d[1] = b;
            PreAction::Continue
        })
        .ret(move |hit, data| {
            let rax = hit.regs().rax;
            s.lock().unwrap().push((hit.tid(), data[0], data[1], rax));
        });
    (t.registry().register_handler(addr, h).unwrap(), seen)
}

fn exited_0(t: &mut Tracer) {
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
}

/// Run `mp-c-rets ARGS` to its exit 0 with a [`ret_probe`] on `mp_ret_add`, its output
/// what it prints unprobed: the probe, the returns it saw, and that output.
fn add_returns_as_unprobed(args: &[&str]) -> (Registration<PtraceBackend>, Vec<Return>, String) {
    let (t0, _) = common::unprobed("mp-c-rets", args);
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", args);
    let (p, seen) = ret_probe(&t, "mp_ret_add");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), t0);
    let seen = std::mem::take(&mut *seen.lock().unwrap());
    (p, seen, t0)
}

#[test]
fn return_values_and_counts_are_exact() {
    let (p, seen, _) = add_returns_as_unprobed(&["add", "300"]);
    assert_eq!(seen.len(), 300);
    for (i, &(_, a, b, r)) in seen.iter().enumerate() {
        assert_eq!((a, b), (i as u64, 2 * i as u64));
        assert_eq!(r as u32 as u64, a + b, "call {i}");
    }
    let s = p.stats().unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (300, 300, 0));
}

#[test]
fn recursion_1000_deep_returns_innermost_first() {
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &["depth", "1000"]);
    let (p, seen) = ret_probe(&t, "mp_ret_depth");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), "depth=1000\n");
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1001);
    for (k, &(_, n, _, r)) in seen.iter().enumerate() {
        // The k-th return is of the call with argument k, which returns k.
        assert_eq!((n, r as u32 as u64), (k as u64, k as u64));
    }
    let s = p.stats().unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (1001, 1001, 0));
}

#[test]
fn four_threads_get_their_own_returns() {
    let (p, seen, t0) = add_returns_as_unprobed(&["threads", "4", "500"]);
    assert_eq!(seen.len(), 2000);
    // Per thread (told apart by the second argument, the thread's index): 500 returns
    // of a + k, in call order.
    let mut tids = std::collections::HashMap::new();
    for &(tid, a, k, r) in seen.iter() {
        assert_eq!(r as u32 as u64, a + k);
        let e = tids.entry(k).or_insert((tid, 0u64, 0u64));
        assert_eq!(e.0, tid, "thread {k}'s returns come on its own thread");
        assert_eq!(a, e.1, "in call order");
        e.1 += 1;
        e.2 += r as u32 as u64;
    }
    for k in 0..4 {
        let sum = tids[&k].2;
        assert!(t0.contains(&format!("thread {k} sum={sum}\n")), "{t0}");
    }
    let s = p.stats().unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (2000, 2000, 0));
}

#[test]
fn longjmp_out_of_return_probed_calls_is_counted_lost() {
    let args = ["longjmp", "20"];
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &args);
    let (around, a) = ret_probe(&t, "mp_ret_around");
    let (jump, j) = ret_probe(&t, "mp_ret_jump");
    let (add, r) = ret_probe(&t, "mp_ret_add");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), "jumped=20 add=20\n");
    assert!(a.lock().unwrap().is_empty() && j.lock().unwrap().is_empty());
    assert_eq!(r.lock().unwrap().len(), 1);
    for p in [&around, &jump] {
        let s = p.stats().unwrap();
        assert_eq!((s.hits, s.returns, s.returns_lost), (20, 0, 20));
    }
    let s = add.stats().unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (1, 1, 0));
}

#[test]
fn coroutines_switching_stacks_inside_return_probed_calls_return_through_every_call() {
    // Each return of mp_ret_co_resume comes while a call of mp_ret_co_yield is in flight
    // on the other stack, which returns later (c/coro.h); the stacks are neighbours,
    // in both orders. Before, that frame was dropped at the first return, and its own
    // return was a tracer error.
    for above in ["0", "1"] {
        let args = ["coro", "100", above];
        let (t0, _) = common::unprobed("mp-c-rets", &args);
        assert_eq!(t0, format!("coro={}\n", 100 * 99 + 3 * 100 * 99 / 2 + 100));
        let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &args);
        let (resume, r) = ret_probe(&t, "mp_ret_co_resume");
        let (yields, y) = ret_probe(&t, "mp_ret_co_yield");
        exited_0(&mut t);
        assert_eq!(common::read_all(&mut child), t0, "A above B: {above}");
        let values = |seen: &Seen| {
            let seen = seen.lock().unwrap();
            seen.iter().map(|&(_, a, _, v)| (a, v)).collect::<Vec<_>>()
        };
        // mp_ret_co_yield(i) returns 3i, in call order.
        let want: Vec<_> = (0..100).map(|i| (i, 3 * i)).collect();
        assert_eq!(values(&y), want);
        assert_eq!(values(&r).len(), 101);
        for (p, n) in [(&resume, 101), (&yields, 100)] {
            let s = p.stats().unwrap();
            assert_eq!(
                (s.hits, s.returns, s.returns_lost),
                (n, n, 0),
                "A above B: {above}"
            );
        }
    }
}

#[test]
fn cpp_exception_thrown_through_return_probed_calls_is_caught() {
    let (t0, code) = common::unprobed("mp-cpp-throwret", &["10"]);
    assert_eq!(
        (t0.as_str(), code),
        ("caught=5 sum=70 cleanups=10\n", Some(0))
    );
    let (mut t, mut child) = common::spawn_at_entry("mp-cpp-throwret", &["10"]);
    let (through, th) = ret_probe(&t, "mp_cpp_through");
    let (thrower, tw) = ret_probe(&t, "mp_cpp_thrower");
    let (noted, n) = ret_probe(&t, "mp_cpp_noted");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), t0);
    // Odd arguments return (through: 2i), even ones throw.
    let th = th.lock().unwrap();
    assert_eq!(
        th.iter()
            .map(|x| (x.1, x.3 as u32 as u64))
            .collect::<Vec<_>>(),
        [(1, 2), (3, 6), (5, 10), (7, 14), (9, 18)]
    );
    assert_eq!(tw.lock().unwrap().len(), 5);
    assert_eq!(
        n.lock().unwrap().len(),
        10,
        "the destructor's calls, in cleanups too"
    );
    for (p, want) in [
        (&through, (10, 5, 5)),
        (&thrower, (10, 5, 5)),
        (&noted, (10, 10, 0)),
    ] {
        let s = p.stats().unwrap();
        assert_eq!((s.hits, s.returns, s.returns_lost), want);
    }
}

#[test]
fn backtrace_gets_through_return_probed_calls() {
    let (t0, _) = common::unprobed("mp-c-rets", &["bt"]);
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &["bt"]);
    let (outer, o) = ret_probe(&t, "mp_ret_bt_outer");
    let (bt, b) = ret_probe(&t, "mp_ret_bt");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), t0, "the same frame count");
    let frames: u64 = t0
        .lines()
        .find_map(|l| l.strip_prefix("frames="))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(b.lock().unwrap()[0].3 as u32 as u64, frames);
    assert_eq!(o.lock().unwrap()[0].3 as u32 as u64, frames + 1);
    for p in [&outer, &bt] {
        let s = p.stats().unwrap();
        assert_eq!((s.hits, s.returns, s.returns_lost), (1, 1, 0));
    }
}

#[test]
fn a_fork_child_freed_of_probes_returns_through_its_copy_of_a_call_in_flight() {
    let (t0, _) = common::unprobed("mp-c-rets", &["fork"]);
    assert_eq!(t0, "child r=41\nparent r=49\n");
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &["fork"]);
    let (p, seen) = ret_probe(&t, "mp_ret_forker");
    exited_0(&mut t);
    // The child's copy of the stack had the trampoline in the call's slot; freed of
    // our probes (and of the XOL page), it got the real return address back.
    assert_eq!(common::read_all(&mut child), t0);
    let seen = seen.lock().unwrap();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].1, seen[0].3 as u32 as u64), (40, 49));
    let s = p.stats().unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (1, 1, 0));
}

/// Run `slow T N MS` until `entries` calls of mp_ret_nap entered (threads are inside
/// their sleeps), with a return probe counting returns.
fn slow_in_flight(
    threads: &str,
    entries: u64,
) -> (
    Tracer,
    std::process::Child,
    Registration<PtraceBackend>,
    Arc<AtomicU64>,
) {
    let (mut t, child) = common::spawn_at_entry("mp-c-rets", &["slow", threads, "3", "200"]);
    let addr = t.resolve("mp_ret_nap").unwrap();
    let rets = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&rets);
    let h = FnHandler::new()
        .pre(|_| PreAction::Continue)
        .ret(move |hit, _| {
            // The return value of mp_ret_nap(200); a wrong one is not counted.
            if hit.regs().rax == 600 {
                r.fetch_add(1, Relaxed);
            }
        });
    let p = t.registry().register_handler(addr, h).unwrap();
    let stop = t
        .run_until(|| p.stats().is_ok_and(|s| s.hits >= entries))
        .unwrap();
    assert_eq!(stop, None);
    (t, child, p, rets)
}

#[test]
fn detach_with_calls_in_flight_leaves_the_program_working() {
    let (t, mut child, p, rets) = slow_in_flight("1", 2);
    let s = p.stats().unwrap();
    assert_eq!((s.hits, s.returns), (2, 1), "the second call is in flight");
    t.detach().unwrap();
    // Untraced, the call in flight returns to its caller and the program goes on.
    assert_eq!(common::read_all(&mut child), "ret=600\n".repeat(3));
    assert!(child.wait().unwrap().success());
    assert_eq!(rets.load(Relaxed), 1);
}

#[test]
fn unregister_with_two_threads_in_flight_runs_no_more_return_hooks() {
    let (mut t, mut child, p, rets) = slow_in_flight("2", 2);
    assert_eq!(
        rets.load(Relaxed),
        0,
        "both threads are inside their first call"
    );
    let stats = p.unregister().unwrap();
    assert_eq!((stats.hits, stats.returns), (2, 0));
    let after = rets.load(Relaxed);
    exited_0(&mut t);
    assert_eq!(
        rets.load(Relaxed),
        after,
        "no return hook after unregister returned"
    );
    assert_eq!(common::read_all(&mut child), "ret=600\n".repeat(6));
}

/// Inside a function a stripped libc has no symbol for (the `strlen` implementation its
/// IFUNC chose), the unwind tables say where the function starts: a return probe there
/// is refused as off the entry, as with a symbol (before, nothing bounded it).
#[test]
fn a_return_probe_inside_a_function_without_a_symbol_is_refused() {
    let (t, _child) = common::spawn_at_entry("mp-c-rets", &["add", "1"]);
    let slot = match t.resolve("libc:strlen") {
        Err(multiprobe_backend_ptrace::ResolveError::Symbol(
            multiprobe_symbols::ResolveError::IndirectFunction { slot: Some(s), .. },
        )) => s,
        other => panic!("libc's strlen is an IFUNC with a GOT slot: {other:?}"),
    };
    use std::os::unix::fs::FileExt;
    let mut b = [0u8; 8];
    std::fs::File::open(format!("/proc/{}/mem", t.pid()))
        .unwrap()
        .read_exact_at(&mut b, slot)
        .unwrap();
    let imp = u64::from_le_bytes(b);
    let inside = (1..16)
        .map(|k| imp + k)
        .find(|&a| {
            t.registry()
                .register(a, |_| {})
                .map(|r| drop(r.unregister()))
                .is_ok()
        })
        .expect("an instruction boundary inside strlen");
    let h = FnHandler::new().ret(|_, _| {});
    match t.registry().register_handler(inside, h) {
        Err(Error::NotFunctionEntry { addr, context }) => {
            assert_eq!(addr, inside);
            assert!(context.contains("+0x"), "{context}");
        }
        other => panic!("expected NotFunctionEntry, got {other:?}"),
    }
    // At the entry itself, accepted.
    let h = FnHandler::new().ret(|_, _| {});
    assert!(t.registry().register_handler(imp, h).is_ok());
}

#[test]
fn a_return_probe_off_a_function_entry_is_refused() {
    let (t, _child) = common::spawn_at_entry("mp-c-rets", &["add", "1"]);
    let addr = t.resolve("mp_ret_nap").unwrap();
    let inside = (1..16)
        .map(|k| addr + k)
        .find(|&a| {
            t.registry()
                .register(a, |_| {})
                .map(|r| drop(r.unregister()))
                .is_ok()
        })
        .expect("an instruction boundary inside mp_ret_nap");
    let h = FnHandler::new().ret(|_, _| {});
    match t.registry().register_handler(inside, h) {
        Err(Error::NotFunctionEntry { addr, context }) => {
            assert_eq!(addr, inside);
            assert!(context.contains("mp_ret_nap+"), "{context}");
        }
        other => panic!("expected NotFunctionEntry, got {other:?}"),
    }
}

#[test]
fn return_probes_on_functions_that_return_twice_are_refused_and_nothing_is_armed() {
    // vfork: the child returns first on the parent's stack, then the parent (the
    // second return found no frame: the tracer failed, or the program died of SIGILL);
    // setjmp: again at every longjmp.
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &["add", "5"]);
    for name in ["libc.so.6:vfork", "libc.so.6:_setjmp"] {
        let addr = t.resolve(name).unwrap();
        let h = FnHandler::new().ret(|_, _| {});
        match t.registry().register_handler(addr, h) {
            Err(Error::ReturnsTwice { addr: at, name: n }) => {
                assert_eq!(at, addr);
                assert!(name.ends_with(&*n), "{n}");
            }
            other => panic!("{name}: expected ReturnsTwice, got {other:?}"),
        }
    }
    assert!(t.registry().is_empty(), "nothing registered");
    exited_0(&mut t);
    assert!(common::read_all(&mut child).starts_with("sum="));
}

#[test]
fn a_tail_call_between_two_return_probed_functions_returns_through_both() {
    // mp_ret_tail jumps (a tail call) to mp_ret_add: both entries see the same return
    // slot, and both calls return at once, to mp_ret_tail's caller.
    let args = ["tail", "200"];
    let (t0, _) = common::unprobed("mp-c-rets", &args);
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &args);
    let (outer, outer_seen) = ret_probe(&t, "mp_ret_tail");
    let (inner, inner_seen) = ret_probe(&t, "mp_ret_add");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), t0);
    for (p, seen, factor) in [(&outer, &outer_seen, 1), (&inner, &inner_seen, 2)] {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 200);
        for (i, &(_, a, b, r)) in seen.iter().enumerate() {
            // Each call's own arguments: (i, i) at the outer entry, (i, 2i) at the inner.
            assert_eq!((a, b), (i as u64, factor * i as u64));
            assert_eq!(
                r as u32 as u64,
                3 * i as u64,
                "call {i}: both return a + 2b"
            );
        }
        let s = p.stats().unwrap();
        assert_eq!((s.hits, s.returns, s.returns_lost), (200, 200, 0));
    }
}
