//! `ret` collectors ([`Collect::ret`]) on a traced program: the return probes of
//! `returns.rs`, collected in the tracee without a stop per call (the site's return
//! code pops the thread's shadow stack and writes a record). Return values paired with
//! their own call's arguments, exact entry, return and lost counts, recursion, threads,
//! `longjmp`, a C++ exception, `backtrace(3)`, `fork`, detach and unregister with calls
//! in flight: the program's output must be what it prints unprobed, and the site must
//! have run in the tracee.

mod common;

use multiprobe_backend_ptrace::collect::{Collect, Record, RecordData, SitePath};
use multiprobe_backend_ptrace::{ExitStatus, PtraceBackend, Stop, Tracer};
use multiprobe_core::Registration;

struct Ret {
    addr: u64,
    c: Collect,
    reg: Registration<PtraceBackend>,
}

impl Ret {
    fn on(t: &Tracer, name: &str) -> Ret {
        let addr = t.resolve(name).unwrap();
        let c = Collect::ret();
        let reg = t.registry().register_handler(addr, c.clone()).unwrap();
        Ret { addr, c, reg }
    }

    /// (entries, returns, lost) over both paths: the tracee's counters and, for calls
    /// that entered on the one-stop path, the core's.
    fn counts(&self) -> (u64, u64, u64) {
        let s = self.c.stats();
        let core = self.reg.stats().unwrap();
        (s.hits, s.returns, s.returns_lost + core.returns_lost)
    }

    /// (thread, first argument, second argument, return value, latency) of each return,
    /// in time order (records of the one-stop path, before the site was promoted, reach
    /// the collector at once, the tracee's at a drain).
    fn returns(&self) -> Vec<(i32, u64, u64, u64, u64)> {
        let mut recs = self.c.take_records();
        recs.sort_by_key(|r| r.time_ns);
        recs.into_iter()
            .map(|r: Record| match r.data {
                RecordData::Return {
                    ret,
                    latency_ns,
                    args,
                } => (r.tid, args[0], args[1], ret, latency_ns),
                other => panic!("not a return: {other:?}"),
            })
            .collect()
    }

    fn in_tracee(&self, t: &Tracer) {
        assert_eq!(t.collect_path(self.addr), Some(SitePath::InTracee));
    }
}

fn exited_0(t: &mut Tracer) {
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    t.collection().drain();
}

#[test]
fn return_values_pair_with_their_arguments_and_counts_are_exact() {
    let args = ["add", "3000"];
    let (t0, _) = common::unprobed("mp-c-rets", &args);
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &args);
    let r = Ret::on(&t, "mp_ret_add");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), t0);
    let seen = r.returns();
    assert_eq!(seen.len(), 3000);
    for (i, &(_, a, b, ret, _)) in seen.iter().enumerate() {
        assert_eq!((a, b), (i as u64, 2 * i as u64));
        assert_eq!(ret as u32 as u64, a + b, "call {i}");
    }
    assert_eq!(r.counts(), (3000, 3000, 0));
    r.in_tracee(&t);
}

#[test]
fn recursion_1000_deep_returns_innermost_first() {
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &["depth", "1000"]);
    let r = Ret::on(&t, "mp_ret_depth");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), "depth=1000\n");
    let seen = r.returns();
    assert_eq!(seen.len(), 1001);
    for (k, &(_, n, _, ret, _)) in seen.iter().enumerate() {
        assert_eq!((n, ret as u32 as u64), (k as u64, k as u64));
    }
    assert_eq!(r.counts(), (1001, 1001, 0));
    r.in_tracee(&t);
}

#[test]
fn four_threads_get_their_own_returns() {
    let args = ["threads", "4", "2000"];
    let (t0, _) = common::unprobed("mp-c-rets", &args);
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &args);
    let r = Ret::on(&t, "mp_ret_add");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), t0);
    let seen = r.returns();
    assert_eq!(seen.len(), 8000);
    let mut per = std::collections::HashMap::new();
    for &(tid, a, k, ret, _) in &seen {
        assert_eq!(ret as u32 as u64, a + k);
        let e = per.entry(k).or_insert((tid, 0u64, 0u64));
        assert_eq!(e.0, tid, "thread {k}'s returns come on its own thread");
        assert_eq!(a, e.1, "in call order");
        e.1 += 1;
        e.2 += ret as u32 as u64;
    }
    for k in 0..4 {
        let sum = per[&k].2;
        assert!(t0.contains(&format!("thread {k} sum={sum}\n")), "{t0}");
    }
    assert_eq!(r.counts(), (8000, 8000, 0));
    r.in_tracee(&t);
}

#[test]
fn longjmp_out_of_return_probed_calls_is_counted_lost() {
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &["longjmp", "20"]);
    let around = Ret::on(&t, "mp_ret_around");
    let jump = Ret::on(&t, "mp_ret_jump");
    let add = Ret::on(&t, "mp_ret_add");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), "jumped=20 add=20\n");
    assert!(around.returns().is_empty() && jump.returns().is_empty());
    assert_eq!(add.returns().len(), 1);
    // The last longjmp's two calls are dropped at the next entry or return below
    // them: mp_ret_add's.
    assert_eq!(around.counts(), (20, 0, 20));
    assert_eq!(jump.counts(), (20, 0, 20));
    assert_eq!(add.counts(), (1, 1, 0));
    for r in [&around, &jump, &add] {
        r.in_tracee(&t);
    }
}

#[test]
fn coroutines_switching_stacks_inside_return_probed_calls_return_through_every_call() {
    // As in `returns.rs`, in the tracee: each return of mp_ret_co_resume finds a call of
    // mp_ret_co_yield on the other stack above its frame, whose slot the tracer reads
    // (the code asks it); that call is kept and returns later. Before, the program died
    // of the return code's ud2 (SIGILL).
    for above in ["0", "1"] {
        let args = ["coro", "100", above];
        let (t0, _) = common::unprobed("mp-c-rets", &args);
        let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &args);
        let resume = Ret::on(&t, "mp_ret_co_resume");
        let yields = Ret::on(&t, "mp_ret_co_yield");
        exited_0(&mut t);
        assert_eq!(common::read_all(&mut child), t0, "A above B: {above}");
        let seen = yields.returns();
        let want: Vec<_> = (0..100).map(|i| (i, 3 * i)).collect();
        let got: Vec<_> = seen.iter().map(|&(_, a, _, v, _)| (a, v)).collect();
        assert_eq!(got, want, "A above B: {above}");
        assert_eq!(resume.returns().len(), 101);
        assert_eq!(resume.counts(), (101, 101, 0), "A above B: {above}");
        assert_eq!(yields.counts(), (100, 100, 0), "A above B: {above}");
        resume.in_tracee(&t);
        yields.in_tracee(&t);
    }
}

#[test]
fn nap_latencies_are_the_sleeps() {
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &["nap", "1", "10", "100"]);
    let r = Ret::on(&t, "mp_ret_nap");
    exited_0(&mut t);
    assert_eq!(
        common::read_all(&mut child),
        "nap 1=3\nnap 10=30\nnap 100=300\n"
    );
    let seen = r.returns();
    assert_eq!(seen.len(), 3);
    for (&(_, ms, _, ret, ns), want) in seen.iter().zip([1u64, 10, 100]) {
        assert_eq!((ms, ret), (want, 3 * want));
        let ms_seen = ns as f64 / 1e6;
        assert!(
            // A shared, loaded machine oversleeps; the sleep is the floor.
            ms_seen >= want as f64 && ms_seen < want as f64 + 50.0,
            "a {want} ms sleep measured {ms_seen} ms"
        );
    }
    r.in_tracee(&t);
}

#[test]
fn cpp_exception_thrown_through_return_probed_calls_is_caught() {
    let (t0, code) = common::unprobed("mp-cpp-throwret", &["10"]);
    assert_eq!(
        (t0.as_str(), code),
        ("caught=5 sum=70 cleanups=10\n", Some(0))
    );
    let (mut t, mut child) = common::spawn_at_entry("mp-cpp-throwret", &["10"]);
    let through = Ret::on(&t, "mp_cpp_through");
    let thrower = Ret::on(&t, "mp_cpp_thrower");
    let noted = Ret::on(&t, "mp_cpp_noted");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), t0);
    let th: Vec<(u64, u64)> = through
        .returns()
        .iter()
        .map(|x| (x.1, x.3 as u32 as u64))
        .collect();
    assert_eq!(th, [(1, 2), (3, 6), (5, 10), (7, 14), (9, 18)]);
    assert_eq!(thrower.returns().len(), 5);
    assert_eq!(noted.returns().len(), 10, "the destructor's calls");
    assert_eq!(through.counts(), (10, 5, 5));
    assert_eq!(thrower.counts(), (10, 5, 5));
    assert_eq!(noted.counts(), (10, 10, 0));
    for r in [&through, &thrower, &noted] {
        r.in_tracee(&t);
    }
}

#[test]
fn backtrace_gets_through_return_probed_calls() {
    let (t0, _) = common::unprobed("mp-c-rets", &["bt"]);
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &["bt"]);
    let outer = Ret::on(&t, "mp_ret_bt_outer");
    let bt = Ret::on(&t, "mp_ret_bt");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), t0, "the same frame count");
    let frames: u64 = t0
        .lines()
        .find_map(|l| l.strip_prefix("frames="))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(bt.returns()[0].3 as u32 as u64, frames);
    assert_eq!(outer.returns()[0].3 as u32 as u64, frames + 1);
    assert_eq!(outer.counts(), (1, 1, 0));
    assert_eq!(bt.counts(), (1, 1, 0));
    outer.in_tracee(&t);
    bt.in_tracee(&t);
}

#[test]
fn a_fork_child_freed_of_probes_returns_through_its_copy_of_a_call_in_flight() {
    let (t0, _) = common::unprobed("mp-c-rets", &["fork"]);
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &["fork"]);
    let r = Ret::on(&t, "mp_ret_forker");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), t0);
    let seen = r.returns();
    assert_eq!(seen.len(), 1);
    assert_eq!((seen[0].1, seen[0].3 as u32 as u64), (40, 49));
    assert_eq!(r.counts(), (1, 1, 0));
    r.in_tracee(&t);
}

/// Calls that entered and have not returned yet, in the tracee (the core's counts are
/// the one-stop path's, before the site was promoted).
fn tracee_in_flight(r: &Ret) -> u64 {
    let s = r.c.stats();
    let core = r.reg.stats().unwrap();
    (s.hits - core.hits).saturating_sub(s.returns - core.returns)
}

/// `slow T 6 200` until `calls` calls of mp_ret_nap are in flight in the tracee.
fn slow_in_flight(threads: &str, calls: u64) -> (Tracer, std::process::Child, Ret) {
    let (mut t, child) = common::spawn_at_entry("mp-c-rets", &["slow", threads, "6", "200"]);
    let r = Ret::on(&t, "mp_ret_nap");
    let c = t.collection();
    // A promoted site makes no event: the loop must be woken to look at the counts.
    let _ticks = common::ticker(t.detach_handle().unwrap());
    let stop = t
        .run_until(|| {
            c.drain();
            tracee_in_flight(&r) >= calls
        })
        .unwrap();
    assert_eq!(stop, None);
    (t, child, r)
}

#[test]
fn detach_with_calls_in_flight_leaves_the_program_working() {
    let (t, mut child, r) = slow_in_flight("1", 1);
    t.collection().drain();
    let (hits, rets, _) = r.counts();
    assert_eq!(hits, rets + 1, "one call is in flight");
    r.in_tracee(&t);
    t.detach().unwrap();
    // Untraced, the call in flight returns to its caller and the program goes on.
    assert_eq!(common::read_all(&mut child), "ret=600\n".repeat(6));
    assert!(child.wait().unwrap().success());
    assert_eq!(r.returns().len() as u64, rets);
}

#[test]
fn unregister_with_two_threads_in_flight_writes_no_more_returns() {
    let (mut t, mut child, r) = slow_in_flight("2", 2);
    r.in_tracee(&t);
    let Ret { c, reg, .. } = r;
    // Both threads are inside a call as unregister starts; on a loaded machine one of
    // them may return while it waits for the tracer's pause, and that return is still
    // seen. None after it returned.
    t.collection().drain();
    let entering = c.stats();
    assert!(entering.hits >= entering.returns + 2, "{entering:?}");
    reg.unregister().unwrap();
    t.collection().drain();
    let before = c.stats();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    t.collection().drain();
    assert_eq!(
        c.stats().returns,
        before.returns,
        "no return after unregister"
    );
    assert_eq!(c.take_records().len() as u64, before.returns);
    assert_eq!(common::read_all(&mut child), "ret=600\n".repeat(12));
}

#[test]
fn a_full_shadow_stack_counts_the_deepest_calls_lost_and_the_program_runs_on() {
    use multiprobe_x86::collect::shadow::FRAMES;
    let depth = FRAMES + 500;
    let arg = depth.to_string();
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &["depth", &arg]);
    let r = Ret::on(&t, "mp_ret_depth");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), format!("depth={depth}\n"));
    let calls = depth as u64 + 1;
    let (hits, rets, lost) = r.counts();
    assert_eq!(
        (hits, rets + lost),
        (calls, calls),
        "every call ends in one of them"
    );
    // The outermost calls fit (one or two may have entered on the one-stop path before
    // the promotion); the rest found the stack full.
    assert!(
        (FRAMES as u64..FRAMES as u64 + 3).contains(&rets),
        "{rets} returns"
    );
    let seen = r.returns();
    assert_eq!(seen.len() as u64, rets);
    assert!(seen.iter().all(|&(_, n, _, ret, _)| n == ret as u32 as u64));
    r.in_tracee(&t);
}

#[test]
fn a_call_that_never_returns_is_counted_lost_at_the_exit() {
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &["exit", "50"]);
    let add = Ret::on(&t, "mp_ret_add");
    let exiter = Ret::on(&t, "mp_ret_exiter");
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(5)));
    t.collection().drain();
    assert_eq!(common::read_all(&mut child), "exiting\n");
    assert_eq!(add.counts(), (50, 50, 0));
    assert_eq!(exiter.counts(), (1, 0, 1), "exit(3) inside it: lost");
    assert!(exiter.returns().is_empty());
    add.in_tracee(&t);
    exiter.in_tracee(&t);
}

#[test]
fn latency_histograms_put_sleeps_of_1_10_100_ms_in_their_buckets() {
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &["nap", "1", "10", "100", "10"]);
    let addr = t.resolve("mp_ret_nap").unwrap();
    let lat = Collect::latency();
    let reg = t.registry().register_handler(addr, lat.clone()).unwrap();
    exited_0(&mut t);
    assert_eq!(
        common::read_all(&mut child),
        "nap 1=3\nnap 10=30\nnap 100=300\nnap 10=30\n"
    );
    assert_eq!(t.collect_path(addr), Some(SitePath::InTracee));
    assert!(lat.take_records().is_empty(), "a histogram, no records");
    let h = lat.histogram();
    assert_eq!(h.count(), 4);
    let (min, max) = h.min_max.unwrap();
    assert!((1_000_000..50_000_000).contains(&min), "{min}");
    assert!((100_000_000..200_000_000).contains(&max), "{max}");
    // A sleep lasts at least its time, so it lands in its own bucket or above: all 4
    // from 1 ms's bucket up, the 10 and 100 ms ones from 10 ms's, the 100 ms one from
    // 100 ms's. Above is where a loaded machine puts them (a 1 ms sleep that wakes 8 ms
    // late is in 10 ms's bucket): the minimum above says the 1 ms sleep was short.
    let bucket = |ms: u64| (64 - (ms * 1_000_000).leading_zeros()) as usize;
    let from = |ms: u64| h.buckets[bucket(ms)..].iter().sum::<u64>();
    let (b1, b10, b100) = (from(1), from(10), from(100));
    assert!(b1 == 4 && b10 >= 3 && b100 >= 1, "{:?}", h.buckets);
    let s = lat.stats();
    let core = reg.stats().unwrap();
    assert_eq!(
        (s.hits, s.returns, s.returns_lost + core.returns_lost),
        (4, 4, 0)
    );
}

#[test]
fn a_collector_disabled_with_a_call_in_flight_still_sees_that_return() {
    let (mut t, mut child, r) = slow_in_flight("1", 1);
    t.collection().drain();
    let (hits, rets, _) = r.counts();
    assert_eq!(hits, rets + 1, "one call in flight");
    r.reg.disable().unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    t.collection().drain();
    assert_eq!(common::read_all(&mut child), "ret=600\n".repeat(6));
    // Rule 10: the call that entered before the disable returns observed; no call
    // after it enters the collector.
    assert_eq!(r.counts(), (hits, rets + 1, 0));
    assert_eq!(r.returns().len() as u64, rets + 1);
}

#[test]
fn a_disabled_collector_keeps_its_call_in_flight_across_another_handlers_unregister() {
    let (mut t, mut child, r) = slow_in_flight("1", 1);
    t.collection().drain();
    let (hits, rets, _) = r.counts();
    assert_eq!(hits, rets + 1, "one call in flight");
    r.reg.disable().unwrap();
    // Another handler comes and goes while the call is in flight: its unregister's
    // wait ends the calls in flight of collectors that left for good, and only those.
    let other = t.resolve("mp_ret_add").unwrap();
    t.registry()
        .register_handler(other, Collect::count())
        .unwrap()
        .unregister()
        .unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    t.collection().drain();
    assert_eq!(common::read_all(&mut child), "ret=600\n".repeat(6));
    assert_eq!(
        r.counts(),
        (hits, rets + 1, 0),
        "the disabled collector's call returned observed"
    );
    assert_eq!(r.returns().len() as u64, rets + 1);
}

#[test]
fn threads_that_come_and_go_all_life_keep_their_returns() {
    // 40 waves of 8 threads, each with a stack (and so a fs base) of its own: 320 fs
    // bases over the program's life, more than the shadow stacks' blocks. An ended
    // thread's block must go back to the pool, or later threads find none and every
    // one of their calls is lost.
    let args = ["waves", "40", "8", "50"];
    let (t0, _) = common::unprobed("mp-c-rets", &args);
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &args);
    let r = Ret::on(&t, "mp_ret_add");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), t0);
    let calls = 40 * 8 * 50;
    assert_eq!(r.counts(), (calls, calls, 0), "(entries, returns, lost)");
    assert_eq!(r.returns().len() as u64, calls);
    r.in_tracee(&t);
}

#[test]
fn a_thread_that_ends_inside_a_call_counts_it_lost_while_the_program_runs() {
    use std::io::Write;
    let mut cmd = common::command("mp-c-rets", &["quit", "3000"]);
    cmd.stdin(std::process::Stdio::piped());
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    assert!(t.run_to_entry().unwrap().is_none());
    let mut child = t.take_child().unwrap();
    let r = Ret::on(&t, "mp_ret_quitter");
    let c = t.collection();
    let _ticks = common::ticker(t.detach_handle().unwrap());
    // Main's call, then the program waits for a byte: the thread's call must find the
    // site promoted (its call in flight is then the tracee's).
    let reg = t.registry().clone();
    let stop = t
        .run_until(|| {
            c.drain();
            r.c.stats().returns == 1
                && reg.backend().collect_path(r.addr) == Some(SitePath::InTracee)
        })
        .unwrap();
    assert_eq!(stop, None);
    child.stdin.take().unwrap().write_all(b"\n").unwrap();
    // The thread's exit is the tracer's to see: its call is lost from then on, not
    // only when the program ends (3 s later).
    let stop = t
        .run_until(|| {
            c.drain();
            r.counts().2 == 1
        })
        .unwrap();
    assert_eq!(stop, None, "lost while the program runs");
    assert_eq!(
        r.counts(),
        (2, 1, 1),
        "main's call returned, the thread's is lost"
    );
    assert_eq!(r.reg.stats().unwrap().returns_lost, 0, "lost in the tracee");
    child.kill().unwrap();
    let _ = t.run();
    let _ = child.wait();
}

#[test]
fn a_tail_call_between_two_return_probed_functions_returns_through_both() {
    // mp_ret_tail jumps (a tail call) to mp_ret_add: the second entry finds the first's
    // frame at its own slot, still holding the first's return code; both must return.
    let args = ["tail", "2000"];
    let (t0, _) = common::unprobed("mp-c-rets", &args);
    let (mut t, mut child) = common::spawn_at_entry("mp-c-rets", &args);
    let outer = Ret::on(&t, "mp_ret_tail");
    let inner = Ret::on(&t, "mp_ret_add");
    exited_0(&mut t);
    assert_eq!(common::read_all(&mut child), t0);
    for (r, factor) in [(&outer, 1), (&inner, 2)] {
        assert_eq!(r.counts(), (2000, 2000, 0), "(entries, returns, lost)");
        let seen = r.returns();
        for (i, &(_, a, b, ret, _)) in seen.iter().enumerate() {
            assert_eq!((a, b), (i as u64, factor * i as u64));
            assert_eq!(ret as u32 as u64, 3 * i as u64, "call {i}");
        }
        r.in_tracee(&t);
    }
}
