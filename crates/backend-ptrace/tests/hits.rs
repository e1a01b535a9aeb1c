//! Hits on a spawned, single-threaded program: exact counts, argument values, handler
//! order, post-handlers, register write-back, the program's output unchanged.

mod common;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use multiprobe_backend_ptrace::{ExitStatus, Stop, Tracer};
use multiprobe_core::{FnHandler, Hit, PreAction};

#[test]
fn counts_and_arguments_are_exact_and_output_is_unchanged() {
    let (expected, code) = common::unprobed("mp-single", &["--iters", "300", "--exit", "3"]);
    let mut cmd = common::command("mp-single", &["--iters", "300", "--exit", "3"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    let add = t.resolve("mp_add").unwrap();
    let args8 = t.resolve("mp_args8").unwrap();
    let sum_a = Arc::new(AtomicU64::new(0));
    let sum_b = Arc::new(AtomicU64::new(0));
    let (a, b) = (Arc::clone(&sum_a), Arc::clone(&sum_b));
    let g1 = t
        .registry()
        .register(add, move |hit: &mut Hit<'_>| {
            a.fetch_add(hit.arg(0).unwrap(), Relaxed);
            b.fetch_add(hit.arg(1).unwrap(), Relaxed);
        })
        .unwrap();
    // The 7th and 8th arguments are on the stack: read through tracee memory.
    let last = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&last);
    let g2 = t
        .registry()
        .register(args8, move |hit: &mut Hit<'_>| {
            let v: Vec<u64> = (0..8).map(|n| hit.arg(n).unwrap()).collect();
            l.lock().unwrap().push(v);
        })
        .unwrap();
    let mut child = t.take_child().unwrap();
    let stop = t.run().unwrap();
    assert_eq!(stop, Stop::Exited(ExitStatus::Code(3)));
    assert_eq!(Some(3), code);
    assert_eq!(common::read_all(&mut child), expected);
    let n = 300u64;
    assert_eq!(g1.stats().unwrap().hits, n);
    assert_eq!(sum_a.load(Relaxed), n * (n - 1) / 2);
    assert_eq!(sum_b.load(Relaxed), 3 * n * (n - 1) / 2);
    let calls = last.lock().unwrap();
    assert_eq!(calls.len() as u64, n);
    for (i, v) in calls.iter().enumerate() {
        let want: Vec<u64> = (0..8).map(|k| i as u64 + k).collect();
        assert_eq!(v, &want, "call {i}");
    }
    assert_eq!(g2.stats().unwrap().hits, n);
}

#[test]
fn several_handlers_run_in_order_with_posts_and_can_change_registers() {
    let mut cmd = common::command("mp-single", &["--iters", "50"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    let add = t.resolve("mp_add").unwrap();
    let order = Arc::new(Mutex::new(Vec::new()));
    let mut guards = Vec::new();
    for k in 0..3u64 {
        let (o1, o2) = (Arc::clone(&order), Arc::clone(&order));
        let h = FnHandler::new()
            .pre(move |hit: &mut Hit<'_>| {
                o1.lock().unwrap().push(('p', k));
                assert_eq!(hit.regs().rip, hit.addr());
                if k == 2 {
                    // Make every call return a + b + 1000 by changing b.
                    hit.regs_mut().rsi += 1000;
                }
                PreAction::Continue
            })
            .post(move |hit: &mut Hit<'_>| {
                o2.lock().unwrap().push(('q', k));
                assert_ne!(hit.regs().rip, hit.addr());
            });
        guards.push(t.registry().register(add, h).unwrap());
    }
    let mut child = t.take_child().unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    let out = common::read_all(&mut child);
    let n = 50u64;
    let sum: u64 = (0..n).map(|i| 4 * i + 1000).sum();
    assert!(
        out.contains(&format!("mp_add calls={n} sum={sum}\n")),
        "{out}"
    );
    let order = order.lock().unwrap();
    assert_eq!(order.len() as u64, 6 * n);
    for chunk in order.chunks(6) {
        assert_eq!(
            chunk,
            &[('p', 0), ('p', 1), ('p', 2), ('q', 0), ('q', 1), ('q', 2)]
        );
    }
    for g in &guards {
        assert_eq!(g.stats().unwrap().hits, n);
    }
}
