//! Attaching to running programs, detaching, and the errors of attach.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Child;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use common::start_waiting;
use multiprobe_backend_ptrace::{PtraceBackend, Stop, Tracer};
use multiprobe_core::{Error, FnHandler, PreAction, Registration};

fn go(child: &mut Child) {
    child.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
}

/// Read the program's report (it then waits for stdin to close before exiting).
fn report(out: &mut BufReader<std::process::ChildStdout>, lines: usize) -> String {
    let mut s = String::new();
    for _ in 0..lines {
        out.read_line(&mut s).unwrap();
    }
    s
}

/// Let the program exit.
fn bye(child: &mut Child) {
    drop(child.stdin.take());
}

fn rest(mut out: BufReader<std::process::ChildStdout>) -> String {
    let mut s = String::new();
    std::io::Read::read_to_string(&mut out, &mut s).unwrap();
    s
}

/// Attach to `pid` and count the hits of `name`: the tracer, the count, and the probe.
fn attach_counting(pid: i32, name: &str) -> (Tracer, Arc<AtomicU64>, Registration<PtraceBackend>) {
    let t = Tracer::attach(pid).unwrap();
    let (hits, count) = common::counter();
    let g = t
        .registry()
        .register(t.resolve(name).unwrap(), count)
        .unwrap();
    (t, hits, g)
}

/// The state letter of process `pid` (`R`, `S`, `T`, `t`, ...) from `/proc/PID/stat`.
fn state_of(pid: i32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    stat.rsplit(") ").next().unwrap().chars().next().unwrap()
}

#[test]
fn attach_probe_detach_then_the_program_finishes_normally_with_identical_text() {
    let iters = 3000u64;
    let args = ["--iters", "3000", "--exit", "5"];
    let (mut child, out) = start_waiting("mp-single", &args);
    let pid = child.id() as i32;
    let before = common::text(pid);
    let mut t = Tracer::attach(pid).unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hits);
    let post = Arc::new(AtomicU64::new(0));
    let p = Arc::clone(&post);
    let handler = FnHandler::new()
        .pre(move |_| {
            h.fetch_add(1, Relaxed);
            PreAction::Continue
        })
        .post(move |_| {
            p.fetch_add(1, Relaxed);
        });
    let g1 = t
        .registry()
        .register_handler(t.resolve("mp_add").unwrap(), handler)
        .unwrap();
    // Relocated first instructions: these run from slots in an XOL page.
    let g2 = t
        .registry()
        .register(t.resolve("mp_load").unwrap(), |_| {})
        .unwrap();
    let g3 = t
        .registry()
        .register(t.resolve("mp_riprel").unwrap(), |_| {})
        .unwrap();
    assert!(common::text(pid) != before, "breakpoints are in");
    go(&mut child);
    let r = t.run_until(|| hits.load(Relaxed) >= 500).unwrap();
    assert_eq!(r, None);
    assert!(!t.xol_pages().is_empty());
    t.detach().unwrap();
    let mut out = out;
    let report = report(&mut out, 3);
    // The program's code is exactly as before: breakpoints and the XOL page are gone.
    assert!(common::text(pid) == before, "text differs after detach");
    bye(&mut child);
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(5));
    assert_eq!(rest(out), "");
    let out = report;
    let sum: u64 = (0..iters).map(|i| 4 * i).sum();
    assert!(
        out.starts_with(&format!("mp_add calls={iters} sum={sum}\n")),
        "{out}"
    );
    let n = hits.load(Relaxed);
    assert!((500..iters).contains(&n), "{n}");
    // Every pre that ran before the detach had its post, or the detach ended it.
    assert!(post.load(Relaxed) <= n && post.load(Relaxed) + 1 >= n);
    drop((g1, g2, g3));
}

#[test]
fn detach_handle_from_another_thread_while_many_threads_hit() {
    let (mut child, out) = start_waiting("mp-threads", &["--threads", "3", "--base", "20000"]);
    let pid = child.id() as i32;
    let before = common::text(pid);
    let mut t = Tracer::attach(pid).unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    // A post-handler sends threads through trap-after slots, so some are inside one
    // when the detach comes.
    let handler = common::counting_with_post(&hits);
    let _g = t
        .registry()
        .register_handler(t.resolve("mp_work").unwrap(), handler)
        .unwrap();
    let handle = t.detach_handle().unwrap();
    let hits2 = Arc::clone(&hits);
    let requester = std::thread::spawn(move || {
        while hits2.load(Relaxed) < 2000 {
            std::thread::yield_now();
        }
        handle.request();
    });
    go(&mut child);
    assert_eq!(t.run().unwrap(), Stop::Detached);
    requester.join().unwrap();
    let mut out = out;
    let report = report(&mut out, 4);
    assert!(common::text(pid) == before, "text differs after detach");
    bye(&mut child);
    assert!(child.wait().unwrap().success());
    assert_eq!(rest(out), "");
    let out = report;
    assert_eq!(out.lines().count(), 4, "{out}");
    for (i, line) in out.lines().enumerate() {
        let calls = if i == 0 { 20000 } else { 20000 * i };
        assert!(line.contains(&format!(" calls={calls} ")), "{line}");
    }
}

#[test]
fn attach_errors_say_what_is_wrong() {
    // No such process.
    assert!(matches!(Tracer::attach(i32::MAX), Err(Error::ProcessGone)));
    // Ourselves.
    assert!(matches!(
        Tracer::attach(std::process::id() as i32),
        Err(Error::PermissionDenied(_))
    ));
    // Already traced (by us).
    let (mut child, _out) = start_waiting("mp-single", &["--iters", "1"]);
    let pid = child.id() as i32;
    let t = Tracer::attach(pid).unwrap();
    // From another thread (one thread has one tracer at most).
    let again = std::thread::spawn(move || Tracer::attach(pid).map(|_| ()))
        .join()
        .unwrap();
    match again {
        Err(Error::PermissionDenied(m)) => assert!(m.contains("already traced"), "{m}"),
        other => panic!("expected PermissionDenied, got {other:?}"),
    }
    // The same thread cannot start a second tracer while the first lives.
    match Tracer::attach(pid) {
        Err(Error::Backend(m)) => assert!(m.contains("one thread per traced process"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    drop(t);
    go(&mut child);
    bye(&mut child);
    assert!(child.wait().unwrap().success());
}

#[test]
fn a_panic_on_the_tracer_thread_leaves_the_program_running_unprobed() {
    let iters = 2000u64;
    let (mut child, out) = start_waiting("mp-threads", &["--threads", "2", "--base", "1000"]);
    let pid = child.id() as i32;
    let before = common::text(pid);
    let hits = Arc::new(AtomicU64::new(0));
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut t = Tracer::attach(pid).unwrap();
        let post = common::counting_with_post(&hits);
        let _g = t
            .registry()
            .register_handler(t.resolve("mp_tload").unwrap(), post)
            .unwrap();
        go(&mut child);
        // Threads are stopped, in slots, or running when the tracer's own code panics.
        let _ = t.run_until(|| {
            assert!(hits.load(Relaxed) < 300, "the tracer's code panics");
            false
        });
    }));
    assert!(r.is_err());
    let mut out = out;
    let report = report(&mut out, 3);
    assert!(common::text(pid) == before, "text differs after the panic");
    bye(&mut child);
    assert!(child.wait().unwrap().success());
    assert!(report.contains("thread 2 tid="), "{report}");
    assert!(report.contains(&format!(" calls={iters} ")), "{report}");
}

#[test]
fn detach_while_the_only_thread_is_blocked_in_a_system_call() {
    // The program finishes its loop under the tracer, then blocks reading stdin. The
    // detach then has to run its munmap on that thread, in the middle of an interrupted
    // read, which must carry on afterwards as if nothing happened.
    let iters = 200u64;
    let (mut child, out) = start_waiting("mp-single", &["--iters", "200", "--exit", "7"]);
    let pid = child.id() as i32;
    let before = common::text(pid);
    let (mut t, hits, _g) = attach_counting(pid, "mp_load");
    go(&mut child);
    assert_eq!(t.run_until(|| hits.load(Relaxed) == iters).unwrap(), None);
    let mut out = out;
    let report = report(&mut out, 3);
    assert!(report.contains("mp_load calls=200"), "{report}");
    // Wait until the thread sleeps in its read.
    while state_of(pid) != 'S' {
        std::thread::yield_now();
    }
    assert_eq!(t.xol_pages().len(), 1);
    t.detach().unwrap();
    assert!(common::text(pid) == before, "text differs after detach");
    bye(&mut child);
    assert_eq!(
        child.wait().unwrap().code(),
        Some(7),
        "the read was not restarted"
    );
    assert_eq!(hits.load(Relaxed), iters);
}

#[test]
fn attach_to_a_stopped_program_keeps_it_stopped_until_sigcont() {
    let (mut child, out) = start_waiting("mp-single", &["--iters", "300"]);
    let pid = child.id() as i32;
    let state = || state_of(pid);
    // SAFETY: signals to our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    while state() != 'T' {
        std::thread::yield_now();
    }
    let (mut t, hits, _g) = attach_counting(pid, "mp_load");
    go(&mut child);
    // The group-stop is reported and left in place: no hit while it lasts. Serve events
    // until the program sits in the group-stop under the tracer ('t').
    let r = t.run_until(|| state() == 't').unwrap();
    assert_eq!(r, None);
    assert_eq!(hits.load(Relaxed), 0);
    // SAFETY: as above.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    assert_eq!(t.run_until(|| hits.load(Relaxed) == 300).unwrap(), None);
    t.detach().unwrap();
    let mut out = out;
    let report = report(&mut out, 3);
    assert!(report.contains("mp_load calls=300"), "{report}");
    bye(&mut child);
    assert!(child.wait().unwrap().success());
}
