//! Collecting handlers (`collect::Collect`): exact counts, records that match what the
//! program passed, faults in actions, the area in the tracee, and every path a site
//! may take.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use multiprobe_backend_ptrace::collect::{Collect, Record, RecordData, SitePath};
use multiprobe_backend_ptrace::{ExitStatus, PtraceBackend, Signal, Stop, Tracer};
use multiprobe_core::Registration;

/// `key=value` fields of a line of program output.
fn fields(line: &str) -> HashMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|f| f.split_once('='))
        .collect()
}

/// The checksums `mp-c-collect threads` prints, computed from recorded arguments.
fn checksums(args: &[Vec<u64>]) -> (u64, u64) {
    let (mut sum, mut mix) = (0u64, 0u64);
    for a in args {
        for (k, &v) in a.iter().enumerate() {
            sum = sum.wrapping_add(v);
            mix = mix.wrapping_add(v.wrapping_mul(k as u64 + 1) ^ (v >> 7));
        }
    }
    (sum, mix)
}

fn args_of(records: &[multiprobe_backend_ptrace::collect::Record]) -> Vec<Vec<u64>> {
    records
        .iter()
        .map(|r| match &r.data {
            RecordData::Args(a) => a.clone(),
            other => panic!("an args record holds {other:?}"),
        })
        .collect()
}

/// The lines of `/proc/PID/maps` that are our collecting area.
fn area_maps(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("multiprobe-collect"))
        .map(str::to_string)
        .collect()
}

/// Descriptors of `pid` that point at our memfd.
fn area_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                .filter(|l| l.to_string_lossy().contains("multiprobe-collect"))
                .count()
        })
        .unwrap_or(0)
}

#[test]
fn collectors_beside_a_closure_count_and_record_exactly_from_4_threads() {
    let mut cmd = common::command("mp-c-collect", &["threads", "4", "2000"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    let f = t.resolve("mp_col_target").unwrap();
    let count = Collect::count();
    let args = Collect::args(6).unwrap();
    let closure = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&closure);
    let _g1 = t.registry().register_handler(f, count.clone()).unwrap();
    let g2 = t.registry().register_handler(f, args.clone()).unwrap();
    // A closure on the site keeps it on the one-stop path: the collectors run in the
    // tracer, with the same results.
    let g3 = t
        .registry()
        .register(f, move |_| {
            c.fetch_add(1, Relaxed);
        })
        .unwrap();
    assert_eq!(
        t.collect_path(f),
        Some(SitePath::Stop(format!(
            "handler {} runs in the tracer",
            g3.id()
        )))
    );
    let mut child = t.take_child().unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    let out = common::read_all(&mut child);
    let got = fields(out.trim());
    assert_eq!(got["calls"], "8000", "{out}");
    assert_eq!(count.stats().hits, 8000);
    assert_eq!(closure.load(Relaxed), 8000);
    let recs = args.take_records();
    assert_eq!(recs.len(), 8000);
    assert_eq!(args.stats().hits, 8000);
    assert_eq!(args.stats().dropped, 0);
    let (sum, mix) = checksums(&args_of(&recs));
    assert_eq!(sum.to_string(), got["sum"], "{out}");
    assert_eq!(mix.to_string(), got["mix"], "{out}");
    // Each record names its thread and its handler, with times that never go back on
    // one thread.
    let tids: HashSet<i32> = recs.iter().map(|r| r.tid).collect();
    assert_eq!(tids.len(), 4, "{tids:?}");
    assert!(
        !tids.contains(&t.pid()),
        "the callers are the 4 new threads"
    );
    let mut last: HashMap<i32, u64> = HashMap::new();
    for r in &recs {
        assert_eq!(r.addr, f);
        assert_eq!(Some(r.handler), args.handler_id());
        assert_eq!(r.handler, g2.id());
        assert!(!r.faulted);
        let l = last.entry(r.tid).or_default();
        assert!(r.time_ns >= *l, "time went back on thread {}", r.tid);
        *l = r.time_ns;
    }
    assert!(args.take_records().is_empty(), "taken records are gone");
}

#[test]
fn mem_on_a_null_pointer_is_counted_faulted_and_the_program_runs_on() {
    let mut cmd = common::command("mp-c-collect", &["mem", "10"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    let f = t.resolve("mp_col_mem").unwrap();
    let mem = Collect::mem(1, 16).unwrap();
    let _g = t.registry().register_handler(f, mem.clone()).unwrap();
    let mut child = t.take_child().unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    let out = common::read_all(&mut child);
    assert!(out.starts_with("calls=10 ok"), "{out}");
    let s = mem.stats();
    assert_eq!((s.hits, s.faulted, s.dropped), (10, 5, 0));
    let recs = mem.take_records();
    assert_eq!(recs.len(), 10);
    for (i, r) in recs.iter().enumerate() {
        if i % 2 == 1 {
            assert!(r.faulted, "call {i} passed NULL");
            assert!(matches!(&r.data, RecordData::Mem { ptr: 0, bytes } if bytes.is_empty()));
        } else {
            assert!(!r.faulted, "call {i}");
            assert!(
                matches!(&r.data, RecordData::Mem { ptr, bytes } if *ptr != 0 && bytes == b"mp-col-mem-data!")
            );
        }
    }
}

#[test]
fn a_site_that_cannot_be_promoted_counts_exactly_on_the_stop_path() {
    let mut cmd = common::command("mp-c-collect", &["stoponly", "3000"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    let f = t.resolve("mp_col_loop").unwrap();
    let count = Collect::count();
    let _g = t.registry().register_handler(f, count.clone()).unwrap();
    let mut child = t.take_child().unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    let out = common::read_all(&mut child);
    assert_eq!(out.trim(), "calls=12000");
    assert_eq!(count.stats().hits, 12000);
    match t.collect_path(f) {
        Some(SitePath::Stop(why)) => assert!(why.contains("region"), "{why}"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn the_area_is_made_in_the_tracee_without_a_descriptor_and_gone_after_detach() {
    let (mut t, f) = busy_at_entry();
    let pid = t.pid();
    let text_before = common::text(pid);
    let count = Collect::count();
    let _g = t.registry().register_handler(f, count.clone()).unwrap();
    let c = count.clone();
    let col = t.collection();
    // A promoted site makes no stop: the loop checks its condition when woken.
    let _ticks = common::ticker(t.detach_handle().unwrap());
    assert_eq!(
        t.run_until(|| {
            col.drain();
            c.stats().hits >= 2000
        })
        .unwrap(),
        None
    );
    let area = t.collect_area().unwrap_or_else(|| {
        panic!(
            "no area: {:?} {:?}",
            t.collect_area_error(),
            t.collect_path(f)
        )
    });
    let maps = area_maps(pid);
    assert_eq!(maps.len(), 1, "{maps:?}");
    assert!(maps[0].starts_with(&format!("{area:x}-")), "{maps:?}");
    assert!(maps[0].contains("rw-s"), "shared, read+write: {maps:?}");
    assert_eq!(area_fds(pid), 0, "the tracee keeps no descriptor of ours");
    let mut child = t.take_child().unwrap();
    t.detach().unwrap();
    assert!(area_maps(pid).is_empty(), "{:?}", area_maps(pid));
    let text_after = common::text(pid);
    assert_eq!(text_before.len(), text_after.len());
    for (b, a) in text_before.iter().zip(&text_after) {
        assert!(b == a, "text of {} changed", b.0);
    }
    let mut stdin = child.stdin.take().unwrap();
    let _ = stdin.write_all(b"x");
    drop(stdin);
    let out = common::read_all(&mut child);
    assert!(child.wait().unwrap().success());
    let calls: u64 = fields(out.trim())["calls"].parse().unwrap();
    assert!(calls >= 2000, "{out}");
}

#[test]
fn under_seccomp_there_is_no_area_and_collectors_still_count_exactly() {
    let mut cmd = common::command("mp-c-seccomp", &["300"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    let f = t.resolve("mp_sc_load").unwrap();
    // A closure first: the program's loop runs under its seccomp filter by then.
    let first = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&first);
    let closure = t
        .registry()
        .register(f, move |_| {
            c.fetch_add(1, Relaxed);
        })
        .unwrap();
    assert_eq!(t.run_until(|| first.load(Relaxed) >= 5).unwrap(), None);
    // Its next hit waits for the loop: every later one is the collector's.
    let before = first.load(Relaxed);
    let count = Collect::count();
    let _g = t.registry().register_handler(f, count.clone()).unwrap();
    drop(closure);
    let mut child = t.take_child().unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    let out = common::read_all(&mut child);
    assert!(out.starts_with("loads=300 "), "{out}");
    assert_eq!(count.stats().hits, 300 - before);
    assert_eq!(t.collect_area(), None);
    let why = t.collect_area_error().expect("a reason");
    assert!(why.contains("seccomp"), "{why}");
    assert_eq!(t.collect_path(f), Some(SitePath::Stop(why)));
}

#[test]
fn a_fork_child_not_followed_runs_free_and_the_parent_counts_exactly() {
    let mut cmd = common::command("mp-c-collect", &["fork", "50"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    let f = t.resolve("mp_col_target").unwrap();
    let args = Collect::args(2).unwrap();
    let _g = t.registry().register_handler(f, args.clone()).unwrap();
    let mut child = t.take_child().unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    let out = common::read_all(&mut child);
    assert!(out.contains("child calls=100"), "{out}");
    assert!(out.contains("parent calls=100 child=0"), "{out}");
    let recs = args.take_records();
    assert_eq!(args.stats().hits, 100);
    // Only the parent's calls: second argument 0 before the fork, 2 after.
    let seconds: Vec<u64> = args_of(&recs).iter().map(|a| a[1]).collect();
    assert_eq!(seconds.iter().filter(|&&b| b == 0).count(), 50);
    assert_eq!(seconds.iter().filter(|&&b| b == 2).count(), 50);
    assert!(recs.iter().all(|r| r.tid == t.pid()));
}

/// Drain `col` every few milliseconds on another thread until the returned flag is set.
fn drainer(
    col: multiprobe_backend_ptrace::collect::Collection,
) -> (
    Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<u64>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = Arc::clone(&stop);
    let h = std::thread::spawn(move || {
        let mut n = 0;
        while !s.load(Relaxed) {
            n += col.drain() as u64;
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        n
    });
    (stop, h)
}

/// A finished run of `mp-c-collect MODE...` (4 threads, 15000 calls each) with a
/// `count` and an `args:6` collector on `mp_col_target`.
struct Run {
    t: Tracer,
    f: u64,
    count: Collect,
    args: Collect,
    end: Stop,
    out: String,
    got: HashMap<String, String>,
    _registered: [Registration<PtraceBackend>; 2],
}

impl Run {
    /// Asserts 60000 hits of each collector, no drop, no fault, and a record of every
    /// call with the arguments the program passed; returns the records.
    fn exact_counts_and_records(&self) -> Vec<Record> {
        assert_eq!(self.count.stats().hits, 60000);
        let s = self.args.stats();
        assert_eq!((s.hits, s.dropped, s.faulted), (60000, 0, 0));
        let recs = self.args.take_records();
        let (sum, mix) = checksums(&args_of(&recs));
        assert_eq!(
            (recs.len(), sum.to_string(), mix.to_string()),
            (60000, self.got["sum"].clone(), self.got["mix"].clone()),
            "{}",
            self.out
        );
        recs
    }
}

fn count_and_args_to_the_end(mode: &[&str]) -> Run {
    let mut cmd = common::command("mp-c-collect", mode);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    let f = t.resolve("mp_col_target").unwrap();
    let count = Collect::count();
    let args = Collect::args(6).unwrap();
    let g1 = t.registry().register_handler(f, count.clone()).unwrap();
    let g2 = t.registry().register_handler(f, args.clone()).unwrap();
    let mut child = t.take_child().unwrap();
    let end = t.run().unwrap();
    let out = common::read_all(&mut child);
    let got: HashMap<String, String> = fields(out.trim())
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(got["calls"], "60000", "{out}");
    assert_eq!(t.collect_path(f), Some(SitePath::InTracee));
    Run {
        t,
        f,
        count,
        args,
        end,
        out,
        got,
        _registered: [g1, g2],
    }
}

#[test]
fn promoted_collectors_count_and_record_exactly_from_4_threads_without_stops() {
    // 60000 records fit the ring (65536 cells) even if no drain comes in time: the
    // program makes them within milliseconds.
    let run = count_and_args_to_the_end(&["threads", "4", "15000"]);
    assert_eq!(run.end, Stop::Exited(ExitStatus::Code(0)));
    // Hardly any hit stopped (the first ones may, until a thread can make the system
    // calls promotion needs: spawned, the program stands at its exec), and the counts
    // are exact across both paths.
    let stopped = run.t.registry().site(run.f).unwrap().hits;
    assert!(stopped < 100, "{stopped} hits stopped");
    let recs = run.exact_counts_and_records();
    let (t, f, args) = (&run.t, run.f, &run.args);
    let tids: HashSet<i32> = recs.iter().map(|r| r.tid).collect();
    assert_eq!(tids.len(), 4, "{tids:?}");
    assert!(!tids.contains(&0) && !tids.contains(&t.pid()), "{tids:?}");
    let mut last: HashMap<i32, u64> = HashMap::new();
    for r in &recs {
        assert_eq!(
            (r.addr, r.handler, r.faulted),
            (f, args.handler_id().unwrap(), false)
        );
        let l = last.entry(r.tid).or_default();
        assert!(r.time_ns >= *l, "time went back on thread {}", r.tid);
        *l = r.time_ns;
    }
}

#[test]
fn a_program_killed_after_its_calls_loses_no_count_and_no_record() {
    // The program kills itself (SIGKILL) right after its calls: what its trampolines
    // wrote into the area is read after it is gone, and nothing is lost.
    let run = count_and_args_to_the_end(&["killed", "4", "15000"]);
    assert_eq!(run.end, Stop::Exited(ExitStatus::Signal(Signal::KILL)));
    run.exact_counts_and_records();
}

/// `mp-c-collect busy 4` (stdin piped: closing it ends the program) held at its entry,
/// and the address of `mp_col_target`.
fn busy_at_entry() -> (Tracer, u64) {
    let mut cmd = common::command("mp-c-collect", &["busy", "4"]);
    cmd.stdin(Stdio::piped());
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    assert_eq!(t.run_to_entry().unwrap(), None);
    let f = t.resolve("mp_col_target").unwrap();
    (t, f)
}

#[test]
fn registration_changes_at_a_live_promoted_site_keep_counts_exact() {
    let (mut t, f) = busy_at_entry();
    let total = Collect::count();
    let _g = t.registry().register_handler(f, total.clone()).unwrap();
    let registry = t.registry().clone();
    let col = t.collection();
    let (stop_drain, drain) = drainer(t.collection());
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Another thread adds and removes a recording collector 10 times, and disables and
    // enables a counting one, while the program's 4 threads hit the site (millions of
    // times a second once it is promoted: each drain takes a full ring).
    let guard = SetOnDrop(Arc::clone(&done));
    let changer = std::thread::spawn(move || {
        let _guard = guard;
        let flip = Collect::count();
        let fg = registry.register_handler(f, flip.clone()).unwrap();
        for round in 0..10 {
            let args = Collect::args(2).unwrap();
            let g = registry.register_handler(f, args.clone()).unwrap();
            // Registered for at least 20 ms, and until it has collected: on a loaded
            // machine the program's threads may not run at all for longer than that.
            let start = std::time::Instant::now();
            loop {
                std::thread::sleep(std::time::Duration::from_millis(20));
                col.drain();
                if args.stats().hits > 0 {
                    break;
                }
                let waited = start.elapsed();
                assert!(
                    waited.as_secs() < 20,
                    "round {round}: nothing collected in {waited:?} while registered"
                );
            }
            if round % 2 == 0 {
                fg.disable().unwrap();
            } else {
                fg.enable().unwrap();
            }
            g.unregister().unwrap();
            // Rule 3: nothing of it is produced after its unregister returned.
            col.drain();
            let n = args.take_records().len() as u64;
            // Rule 3: every hit it had began before its unregister returned and has
            // ended (a record or a drop each) — threads that had taken the jump before
            // the change included.
            let st = args.stats();
            assert_eq!(n + st.dropped, st.hits, "round {round}: hits still running");
            std::thread::sleep(std::time::Duration::from_millis(10));
            col.drain();
            assert!(
                args.take_records().is_empty(),
                "round {round}: records after unregister"
            );
        }
    });
    let _ticks = common::ticker(t.detach_handle().unwrap());
    assert_eq!(t.run_until(|| done.load(Relaxed)).unwrap(), None);
    // Repointed after the last change too.
    let path = run_to_path(&mut t, f, |p| *p == Some(SitePath::InTracee));
    let mut child = t.take_child().unwrap();
    drop(child.stdin.take());
    changer.join().unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    stop_drain.store(true, Relaxed);
    drain.join().unwrap();
    let out = common::read_all(&mut child);
    let calls: u64 = fields(out.trim())["calls"].parse().unwrap();
    assert!(calls > 1000, "{out}");
    assert_eq!(total.stats().hits, calls, "{out}");
    assert_eq!(path, Some(SitePath::InTracee));
}

#[test]
fn exec_ends_the_old_images_collectors_after_a_final_drain_and_probes_go_in_again() {
    // 3000 calls in each image: enough that the new one's site is promoted before it
    // ends even on a loaded machine (a first pause cut short by its time budget gives
    // the program its turn first).
    let mut cmd = common::command("mp-c-collect", &["exec", "3000"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    let f = t.resolve("mp_col_target").unwrap();
    let before = Collect::args(1).unwrap();
    let _g = t.registry().register_handler(f, before.clone()).unwrap();
    let mut child = t.take_child().unwrap();
    match t.run().unwrap() {
        Stop::Exec { unregistered } => assert_eq!(unregistered.len(), 1),
        other => panic!("{other:?}"),
    }
    // Every call of the old image, drained at the exec (promoted or not).
    assert_eq!(before.stats().hits, 3000);
    assert_eq!(before.take_records().len(), 3000);
    assert_eq!(t.collect_area(), None, "the old image's area went with it");
    // The new program (1 thread, 3000 calls): placed again.
    assert_eq!(t.run_to_entry().unwrap(), None);
    let f2 = t.resolve("mp_col_target").unwrap();
    let after = Collect::count();
    let _g2 = t.registry().register_handler(f2, after.clone()).unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    let out = common::read_all(&mut child);
    assert!(out.contains("before exec calls=3000"), "{out}");
    assert!(out.contains("calls=3000 sum="), "{out}");
    assert_eq!(after.stats().hits, 3000);
    assert_eq!(t.collect_path(f2), Some(SitePath::InTracee));
}

#[test]
fn vfork_and_exec_in_a_loop_while_collectors_come_and_go() {
    let mut cmd = common::command("mp-c-collect", &["vfork", "30"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    assert_eq!(t.run_to_entry().unwrap(), None);
    let f = t.resolve("mp_col_target").unwrap();
    let total = Collect::count();
    let _g = t.registry().register_handler(f, total.clone()).unwrap();
    let registry = t.registry().clone();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let d = Arc::clone(&done);
    let changer = std::thread::spawn(move || {
        while !d.load(Relaxed) {
            let c = Collect::args(2).unwrap();
            if let Ok(g) = registry.register_handler(f, c) {
                std::thread::sleep(std::time::Duration::from_millis(3));
                let _ = g.unregister();
            }
        }
    });
    let _ticks = common::ticker(t.detach_handle().unwrap());
    let mut child = t.take_child().unwrap();
    let stop = t.run();
    done.store(true, Relaxed);
    changer.join().unwrap();
    assert_eq!(stop.unwrap(), Stop::Exited(ExitStatus::Code(0)));
    let out = common::read_all(&mut child);
    let got = fields(out.trim());
    assert_eq!(got["vforks"], "30", "{out}");
    assert_eq!(total.stats().hits.to_string(), got["calls"], "{out}");
}

/// Executable anonymous mappings of `pid` (our out-of-line and trampoline pages).
fn anon_exec(pid: i32) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f[1].contains('x') && f.len() < 6
        })
        .map(str::to_string)
        .collect()
}

#[test]
fn attach_and_detach_of_a_busy_program_leaves_its_text_identical_and_nothing_mapped() {
    attach_and_detach_leaves_nothing("4");
}

/// One thread: every injection of the detach (the area, the shadow stacks, the
/// out-of-line pages) runs on it (before, the pages stayed mapped: after the first
/// injection the thread sat in a system-call stop, which was not taken for the next).
#[test]
fn attach_and_detach_of_a_single_threaded_program_leaves_nothing_mapped() {
    attach_and_detach_leaves_nothing("0");
}

fn attach_and_detach_leaves_nothing(threads: &str) {
    let mut child = common::command("mp-c-collect", &["busy", threads])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id() as i32;
    std::thread::sleep(std::time::Duration::from_millis(100));
    let text_before = common::text(pid);
    let anon_before = anon_exec(pid);
    let mut t = Tracer::attach(pid).unwrap();
    let f = t.resolve("mp_col_target").unwrap();
    let count = Collect::count();
    let args = Collect::args(1).unwrap();
    let _g1 = t.registry().register_handler(f, count.clone()).unwrap();
    let _g2 = t.registry().register_handler(f, args.clone()).unwrap();
    let col = t.collection();
    let _ticks = common::ticker(t.detach_handle().unwrap());
    let c = count.clone();
    assert_eq!(
        t.run_until(|| {
            col.drain();
            c.stats().hits >= 5000
        })
        .unwrap(),
        None
    );
    assert_eq!(t.collect_path(f), Some(SitePath::InTracee));
    assert!(!area_maps(pid).is_empty());
    t.detach().unwrap();
    // Everything the threads wrote was drained at detach: every hit is a record or a
    // drop (the program makes millions of calls a second: the ring overflows).
    let hits = count.stats().hits;
    let a = args.stats();
    assert_eq!(args.take_records().len() as u64, a.hits - a.dropped);
    assert_eq!(a.hits, hits, "both collectors ran at every hit");
    assert!(hits >= 5000);
    assert!(area_maps(pid).is_empty(), "{:?}", area_maps(pid));
    assert_eq!(anon_exec(pid), anon_before, "no out-of-line page left");
    if let Ok(Some(st)) = child.try_wait() {
        panic!("the program died after the detach: {st:?}");
    }
    let text_after = common::text(pid);
    assert_eq!(text_before.len(), text_after.len());
    for (b, a) in text_before.iter().zip(&text_after) {
        assert!(b == a, "text of {} changed", b.0);
    }
    // It runs on unharmed and ends as asked.
    std::thread::sleep(std::time::Duration::from_millis(50));
    drop(child.stdin.take());
    let out = common::read_all(&mut child);
    assert!(child.wait().unwrap().success());
    let calls: u64 = fields(out.trim())["calls"].parse().unwrap();
    assert!(calls > hits, "{out}");
}

#[test]
fn a_followed_fork_child_collects_into_its_own_counts() {
    let mut cmd = common::command("mp-c-collect", &["fork", "50"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    t.follow_forks(true);
    let f = t.resolve("mp_col_target").unwrap();
    let parent = Collect::args(2).unwrap();
    let _g = t.registry().register_handler(f, parent.clone()).unwrap();
    let mut child = t.take_child().unwrap();
    let kid = Collect::args(2).unwrap();
    let mut kid_reg = None;
    let mut kid_registry = None;
    loop {
        match t.run().unwrap() {
            Stop::Forked { child, .. } => {
                let r = t.registry_of(child).unwrap();
                kid_reg = Some(r.register_handler(f, kid.clone()).unwrap());
                kid_registry = Some(r.clone());
            }
            Stop::ProcessExited { .. } => {}
            Stop::Exited(s) => {
                assert_eq!(s, ExitStatus::Code(0));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    let out = common::read_all(&mut child);
    assert!(out.contains("parent calls=100 child=0"), "{out}");
    assert!(kid_reg.is_some(), "the fork was reported");
    // The parent's 50 + 50, the child's own 100 (its second argument is 1), apart.
    assert_eq!(parent.stats().hits, 100);
    let p: Vec<u64> = args_of(&parent.take_records())
        .iter()
        .map(|a| a[1])
        .collect();
    assert!(p.iter().all(|&b| b == 0 || b == 2), "{p:?}");
    assert_eq!(kid.stats().hits, 100);
    let k: Vec<u64> = args_of(&kid.take_records()).iter().map(|a| a[1]).collect();
    assert_eq!(k.len(), 100);
    assert!(k.iter().all(|&b| b == 1), "{k:?}");
    // Both collected in their own process without a stop per hit: a follower's sites
    // are promoted in the family's pauses (they once stayed on the stop path).
    assert_eq!(t.collect_path(f), Some(SitePath::InTracee));
    let kid_registry = kid_registry.unwrap();
    assert_eq!(
        kid_registry.backend().collect_path(f),
        Some(SitePath::InTracee)
    );
    assert!(
        kid_registry.site(f).unwrap().hits < 100,
        "every hit of the child stopped"
    );
}

/// Sets the flag when dropped: a changer thread that panics still ends the tracer's
/// `run_until`, so a failed assertion fails the test instead of hanging it.
struct SetOnDrop(Arc<std::sync::atomic::AtomicBool>);
impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Relaxed);
    }
}

#[test]
fn a_site_promoted_while_threads_keep_trapping_on_it_loses_no_thread_and_no_hit() {
    // The pause that promotes a site interrupts threads that are trapping on its `int3`
    // at that moment. One may report the interrupt before the SIGTRAP it just raised:
    // held at site+1 with the signal pending, it must be put back on the site before
    // the jump is written, or it runs into the middle of the jump (SIGSEGV, SIGILL) or
    // dies of the SIGTRAP. A closure keeps the site on the stop path (every hit traps)
    // until it is unregistered, which promotes the site under the 4 busy threads.
    for round in 0..25 {
        let (mut t, f) = busy_at_entry();
        let total = Collect::count();
        let _g = t.registry().register_handler(f, total.clone()).unwrap();
        let closure = t
            .registry()
            .register(f, |_: &mut multiprobe_core::Hit<'_>| {})
            .unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let guard = SetOnDrop(Arc::clone(&done));
        let changer = std::thread::spawn(move || {
            let _guard = guard;
            std::thread::sleep(std::time::Duration::from_millis(30));
            closure.unregister().unwrap();
            std::thread::sleep(std::time::Duration::from_millis(30));
        });
        let _ticks = common::ticker(t.detach_handle().unwrap());
        let stop = t.run_until(|| done.load(Relaxed)).unwrap();
        changer.join().unwrap();
        assert_eq!(stop, None, "round {round}");
        // Promoted soon after (the tracer promotes between events; the ticker wakes it).
        let path = run_to_path(&mut t, f, |p| *p == Some(SitePath::InTracee));
        assert_eq!(path, Some(SitePath::InTracee), "round {round}");
        let mut child = t.take_child().unwrap();
        drop(child.stdin.take());
        assert_eq!(
            t.run().unwrap(),
            Stop::Exited(ExitStatus::Code(0)),
            "round {round}"
        );
        let out = common::read_all(&mut child);
        let calls: u64 = fields(out.trim())["calls"].parse().unwrap();
        assert_eq!(total.stats().hits, calls, "round {round}: {out}");
    }
}

/// The child's stdin, and its stdout's lines as a thread reads them.
fn talk_to(
    child: &mut std::process::Child,
) -> (std::process::ChildStdin, std::sync::mpsc::Receiver<String>) {
    let out = child.stdout.take().unwrap();
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for l in std::io::BufReader::new(out).lines() {
            if tx.send(l.unwrap()).is_err() {
                break;
            }
        }
    });
    (child.stdin.take().unwrap(), lines)
}

/// The program's next line of output (from `lines`), the tracer running meanwhile.
fn next_line(t: &mut Tracer, lines: &std::sync::mpsc::Receiver<String>) -> String {
    let start = std::time::Instant::now();
    let mut got = None;
    let stop = t
        .run_until(|| {
            got = lines.try_recv().ok();
            got.is_some() || start.elapsed().as_secs() > 30
        })
        .unwrap();
    assert_eq!(stop, None);
    got.expect("a line within 30 s")
}

/// Run the tracer until the site at `f` takes a path `want` accepts (30 s at most):
/// the path it took last.
fn run_to_path(
    t: &mut Tracer,
    f: u64,
    want: impl Fn(&Option<SitePath>) -> bool,
) -> Option<SitePath> {
    let registry = t.registry().clone();
    let start = std::time::Instant::now();
    let stop = t
        .run_until(|| want(&registry.backend().collect_path(f)) || start.elapsed().as_secs() > 30)
        .unwrap();
    assert_eq!(stop, None);
    registry.backend().collect_path(f)
}

/// `len` bytes of the text at `addr` of `pid`, and the same bytes of the file mapped
/// there (what the loader put in).
fn text_and_file(pid: i32, addr: u64, len: usize) -> (Vec<u8>, Vec<u8>) {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let line = maps
        .lines()
        .find(|l| {
            let (s, e) = l
                .split_whitespace()
                .next()
                .unwrap()
                .split_once('-')
                .unwrap();
            let (s, e) = (
                u64::from_str_radix(s, 16).unwrap(),
                u64::from_str_radix(e, 16).unwrap(),
            );
            (s..e).contains(&addr)
        })
        .unwrap_or_else(|| panic!("{addr:#x} is mapped: {maps}"));
    let f: Vec<&str> = line.split_whitespace().collect();
    let start = u64::from_str_radix(f[0].split_once('-').unwrap().0, 16).unwrap();
    let offset = u64::from_str_radix(f[2], 16).unwrap();
    let mut file = vec![0; len];
    std::fs::File::open(f[5])
        .unwrap()
        .read_exact_at(&mut file, offset + addr - start)
        .unwrap();
    let mut text = vec![0; len];
    std::fs::File::open(format!("/proc/{pid}/mem"))
        .unwrap()
        .read_exact_at(&mut text, addr)
        .unwrap();
    (text, file)
}

#[test]
fn a_promoted_library_site_unloaded_and_loaded_again_is_promoted_afresh_and_counts_exactly() {
    // Six lives of libz in mp-dlopen (dlopen, calls, dlclose): each time a counting
    // collector on zlibVersion is promoted and counts every call in the tracee; after
    // the dlclose it is unregistered (as the command does when the loader says the
    // code went) and registered again in the next life — most often at the same
    // address, with the same file and the same bytes. The old life's jump must not
    // outlive its code: nothing of it is written into the reloaded text, and the site
    // there is promoted like a new one. In odd lives a second collector comes while the
    // site is promoted, which repoints its jump to a trampoline for both.
    const LIVES: u64 = 6;
    const ITERS: u64 = 50;
    let (iters, reloads) = (ITERS.to_string(), (LIVES - 1).to_string());
    let mut cmd = common::command(
        "mp-dlopen",
        &["--step", "--iters", &iters, "--reloads", &reloads],
    );
    cmd.stdin(Stdio::piped());
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    let pid = t.pid();
    let (mut stdin, lines) = talk_to(&mut t.take_child().unwrap());
    let _ticks = common::ticker(t.detach_handle().unwrap());
    let registry = t.registry().clone();
    let col = t.collection();
    let mut go = || stdin.write_all(b"\n").unwrap();
    let mut last = None;
    for life in 0..LIVES {
        let line = next_line(&mut t, &lines);
        let at = line.strip_prefix("loaded at=0x").expect(&line);
        let f = t.resolve("libz:zlibVersion").unwrap();
        assert_eq!(format!("{f:x}"), at, "life {life}");
        eprintln!("life {life}: libz's zlibVersion at {f:#x}");
        let (text, file) = text_and_file(pid, f, 16);
        assert_eq!(text, file, "life {life}: the loaded text is the file's");
        let count = Collect::count();
        let g = registry.register_handler(f, count.clone()).unwrap();
        let path = run_to_path(&mut t, f, |p| *p == Some(SitePath::InTracee));
        assert_eq!(path, Some(SitePath::InTracee), "life {life}");
        let extra = (life % 2 == 1).then(|| {
            let e = Collect::count();
            let g = registry.register_handler(f, e.clone()).unwrap();
            (e, g)
        });
        if extra.is_some() {
            let path = run_to_path(&mut t, f, |p| *p == Some(SitePath::InTracee));
            assert_eq!(path, Some(SitePath::InTracee), "life {life}: repointed");
        }
        let stops = registry.site(f).unwrap().hits;
        go();
        let line = next_line(&mut t, &lines);
        assert_eq!(
            line,
            format!("called calls={}", (life + 1) * ITERS),
            "life {life}"
        );
        col.drain();
        assert_eq!(count.stats().hits, ITERS, "life {life}");
        // Promoted (or repointed): no call stopped.
        let stopped = registry.site(f).unwrap().hits - stops;
        assert_eq!(stopped, 0, "life {life}");
        if let Some((e, _)) = &extra {
            assert_eq!(e.stats().hits, ITERS, "life {life}");
        }
        let mut guards = vec![g];
        guards.extend(extra.map(|(_, g)| g));
        if life + 1 == LIVES {
            last = Some((f, guards));
            break;
        }
        go();
        assert_eq!(
            next_line(&mut t, &lines),
            "closed unloaded=yes",
            "life {life}"
        );
        // The code went: unregistering writes nothing.
        for g in guards {
            g.unregister().unwrap();
        }
        go();
    }
    // The last life ends with the library loaded: unregistered, its text is the file's
    // again once the tracer has put the original bytes back.
    let (f, guards) = last.unwrap();
    for g in guards {
        g.unregister().unwrap();
    }
    let start = std::time::Instant::now();
    assert_eq!(
        t.run_until(|| {
            let (text, file) = text_and_file(pid, f, 16);
            text == file || start.elapsed().as_secs() > 30
        })
        .unwrap(),
        None
    );
    let (text, file) = text_and_file(pid, f, 16);
    assert_eq!(text, file, "the text is restored");
    go();
    drop(stdin);
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    let rest: Vec<String> = lines.iter().collect();
    assert_eq!(
        rest,
        [
            format!("zlibVersion calls={} version_len=6", LIVES * ITERS),
            "unloaded=yes".to_string()
        ],
    );
}

/// Beyond the first 256 collecting sites of a process (promoted as they are
/// registered), a site is promoted at its first hit: with `-p 'libc:*'` the functions
/// the program calls are the ones that get a jump. Before, such a site kept the stop
/// path for good ("only the first 256 collecting sites of a process are promoted").
#[test]
fn a_collecting_site_beyond_the_first_256_is_promoted_at_its_first_hit() {
    let mut cmd = common::command("mp-c-collect", &["wait", "threads", "4", "20000"]);
    cmd.stdin(Stdio::piped());
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    assert_eq!(t.run_to_entry().unwrap(), None);
    let f = t.resolve("mp_col_target").unwrap();
    let syms =
        multiprobe_symbols::ProcessSymbols::read(t.pid() as u32, Default::default()).unwrap();
    let libc = syms.resolve_pattern(Some("libc"), "*").unwrap();
    assert!(libc.len() > 1000, "{} functions in libc", libc.len());
    // The tracer looks at every site (over several pauses, each within its budget);
    // promoted sites make no event, so the loop is woken to look at the condition.
    let _ticks = common::ticker(t.detach_handle().unwrap());
    let registry = t.registry().clone();
    let pending = |p: Option<SitePath>| matches!(p, Some(SitePath::Stop(w)) if w.starts_with("not promoted yet"));
    // Counted on every libc function that can be probed (indirect functions cannot),
    // again on those left cold, until 256 are jumps: the budget is spent.
    let mut guards = Vec::new();
    let mut cold: Vec<u64> = libc.iter().map(|l| l.start).collect();
    for round in 0..10 {
        for &a in &cold {
            if let Ok(g) = t.registry().register_handler(a, Collect::count()) {
                guards.push(g);
            }
        }
        // Waited for on every libc site, not only this round's: the program may still
        // be in its start-up (run from its entry while the tracer works; under load
        // a long rework gives it its turn), and its first call of a site left cold in
        // an earlier round makes that site "not promoted yet" until the tracer's next
        // rework. `run_until` looks at the condition right after serving that hit,
        // before the rework: a wait on this round's sites alone could end there.
        let start = std::time::Instant::now();
        let all_decided = || {
            let left = libc
                .iter()
                .filter(|l| pending(registry.backend().collect_path(l.start)))
                .count();
            left == 0 || start.elapsed().as_secs() > 60
        };
        assert_eq!(t.run_until(all_decided).unwrap(), None);
        let paths: Vec<Option<SitePath>> = libc.iter().map(|l| t.collect_path(l.start)).collect();
        // A site still "not promoted yet" after a minute was never decided (a hit
        // site the tracer leaves on the stop path for good would be one).
        let left: Vec<&str> = libc
            .iter()
            .zip(&paths)
            .filter(|(_, p)| pending((*p).clone()))
            .map(|(l, _)| l.name.as_str())
            .collect();
        assert!(
            left.is_empty(),
            "round {round}: not decided after {:?}: {left:?}",
            start.elapsed()
        );
        let jumps = paths
            .iter()
            .filter(|p| **p == Some(SitePath::InTracee))
            .count();
        if jumps >= 256 {
            break;
        }
        // A few more than the budget has left (some are refused).
        cold = libc
            .iter()
            .zip(&paths)
            .filter(|(_, p)| matches!(p, Some(SitePath::Stop(w)) if w.starts_with("not hit")))
            .map(|(l, _)| l.start)
            .take(2 * (256 - jumps) + 8)
            .collect();
        assert!(round < 9, "{jumps} jumps after {round} rounds");
    }
    // Registered after them, the program's hot function is beyond the budget: it waits
    // for its first hit (the program waits for a line on its stdin).
    let count = Collect::count();
    let _g = t.registry().register_handler(f, count.clone()).unwrap();
    let path = run_to_path(&mut t, f, |p| !pending(p.clone()));
    assert!(
        matches!(&path, Some(SitePath::Stop(w)) if w.starts_with("not hit yet")),
        "{path:?}"
    );
    let mut child = t.take_child().unwrap();
    writeln!(child.stdin.as_mut().unwrap(), "go").unwrap();
    let path = run_to_path(&mut t, f, |p| *p == Some(SitePath::InTracee));
    assert_eq!(path, Some(SitePath::InTracee));
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    let out = common::read_all(&mut child);
    assert_eq!(fields(out.trim())["calls"], "80000", "{out}");
    assert_eq!(count.stats().hits, 80000, "{out}");
    let stopped = t.registry().site(f).unwrap().hits;
    assert!(stopped < 8000, "{stopped} of 80000 hits stopped");
}
