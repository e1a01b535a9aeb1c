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
        .register(add, move |hit| {
            a.fetch_add(hit.arg(0).unwrap(), Relaxed);
            b.fetch_add(hit.arg(1).unwrap(), Relaxed);
        })
        .unwrap();
    // The 7th and 8th arguments are on the stack: read through tracee memory.
    let last = Arc::new(Mutex::new(Vec::new()));
    let l = Arc::clone(&last);
    let g2 = t
        .registry()
        .register(args8, move |hit| {
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
            .pre(move |hit| {
                o1.lock().unwrap().push(('p', k));
                assert_eq!(hit.regs().rip, hit.addr());
                if k == 2 {
                    // Make every call return a + b + 1000 by changing b.
                    hit.regs_mut().rsi += 1000;
                }
                PreAction::Continue
            })
            .post(move |hit| {
                o2.lock().unwrap().push(('q', k));
                assert_ne!(hit.regs().rip, hit.addr());
            });
        guards.push(t.registry().register_handler(add, h).unwrap());
    }
    let out = common::run_to_exit(&mut t, 0);
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

#[test]
fn relocated_instructions_run_out_of_line_with_correct_results() {
    let n = 200u64;
    let (expected, _) = common::unprobed("mp-single", &["--iters", "200"]);
    let mut t = Tracer::spawn(&mut common::command("mp-single", &["--iters", "200"])).unwrap();
    let load = t.resolve("mp_load").unwrap();
    let riprel = t.resolve("mp_riprel").unwrap();
    // mp_load: pre reads the pointed-to value through tracee memory; post (after the
    // out-of-line `mov rax, [rdi]`, a trap-after slot) sees it in rax.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let (s1, s2) = (Arc::clone(&seen), Arc::clone(&seen));
    let h = FnHandler::new()
        .pre(move |hit| {
            let v = hit.mem().read_u64(hit.regs().rdi).unwrap();
            s1.lock().unwrap().push(('p', v));
            PreAction::Continue
        })
        .post(move |hit| {
            assert_eq!(
                hit.regs().rip,
                hit.addr() + 3,
                "rip is back in the original code"
            );
            s2.lock().unwrap().push(('q', hit.regs().rax));
        });
    let g1 = t.registry().register_handler(load, h).unwrap();
    // mp_riprel: pre only, so the jump-back slot: one stop per hit.
    let (c, count) = common::counter();
    let g2 = t.registry().register(riprel, count).unwrap();
    assert_eq!(common::run_to_exit(&mut t, 0), expected);
    let seen = seen.lock().unwrap();
    let want: Vec<(char, u64)> = (0..n).flat_map(|i| [('p', i), ('q', i)]).collect();
    assert_eq!(*seen, want);
    assert_eq!(c.load(Relaxed), n);
    assert_eq!(g1.stats().unwrap().hits, n);
    assert_eq!(g2.stats().unwrap().hits, n);
    assert_eq!(
        t.xol_pages().len(),
        0,
        "the process is gone, and its pages with it"
    );
}

#[test]
fn unregistering_while_running_restores_the_code_and_later_hits_are_not_seen() {
    let mut t = Tracer::spawn(&mut common::command("mp-single", &["--iters", "400"])).unwrap();
    let load = t.resolve("mp_load").unwrap();
    let mut orig = [0u8; 1];
    multiprobe_core::Memory::read(&t.memory(), load, &mut orig).unwrap();
    let (hits, count) = common::counter();
    let g = t.registry().register(load, count).unwrap();
    // Another probe, on a function called every round, keeps the program from running
    // to its end while the loop does not serve it.
    let _keep = t
        .registry()
        .register(t.resolve("mp_args8").unwrap(), |_| {});
    let mut now = [0u8; 1];
    multiprobe_core::Memory::read(&t.memory(), load, &mut now).unwrap();
    assert_eq!(now[0], 0xcc);
    assert_eq!(t.run_until(|| hits.load(Relaxed) >= 100).unwrap(), None);
    let stats = g.unregister().unwrap();
    multiprobe_core::Memory::read(&t.memory(), load, &mut now).unwrap();
    assert_eq!(now, orig);
    let at_unregister = hits.load(Relaxed);
    assert_eq!(stats.hits, at_unregister);
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    assert_eq!(hits.load(Relaxed), at_unregister);
}

#[test]
fn settle_then_unregister_a_post_handler_on_the_tracer_thread() {
    let mut t = Tracer::spawn(&mut common::command("mp-single", &["--iters", "300"])).unwrap();
    let load = t.resolve("mp_load").unwrap();
    let (pre, post) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (p1, p2) = (Arc::clone(&pre), Arc::clone(&post));
    let h = FnHandler::new()
        .pre(move |_| {
            p1.fetch_add(1, Relaxed);
            PreAction::Continue
        })
        .post(move |_| {
            p2.fetch_add(1, Relaxed);
        });
    let g = t.registry().register_handler(load, h).unwrap();
    // Stop serving right after a pre: the thread is then inside the trap-after slot.
    assert_eq!(t.run_until(|| pre.load(Relaxed) >= 50).unwrap(), None);
    assert_eq!(post.load(Relaxed) + 1, pre.load(Relaxed));
    assert_eq!(t.settle().unwrap(), None);
    assert_eq!(pre.load(Relaxed), post.load(Relaxed));
    let stats = g
        .unregister()
        .expect("no thread is waiting for a post any more");
    assert_eq!(stats.hits, pre.load(Relaxed));
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    assert_eq!(pre.load(Relaxed), post.load(Relaxed));
}

#[test]
fn bad_probe_addresses_are_refused_and_change_nothing() {
    use multiprobe_core::Error;
    let mut t = Tracer::spawn(&mut common::command("mp-single", &["--iters", "5"])).unwrap();
    let before = common::text(t.pid());
    let load = t.resolve("mp_load").unwrap(); // mov rax, [rdi]: 3 bytes
    let reg = t.registry();
    let noop = |_: &mut Hit<'_>| {};
    match reg.register(load + 1, noop) {
        Err(Error::NotInstructionBoundary { addr, context }) => {
            assert_eq!(addr, load + 1);
            assert!(context.contains("mp_load+0x1"), "{context}");
        }
        other => panic!("expected NotInstructionBoundary, got {other:?}"),
    }
    assert!(matches!(
        reg.register(0x10, noop),
        Err(Error::Unmapped { addr: 0x10 })
    ));
    // The stack is mapped but not executable.
    let maps = std::fs::read_to_string(format!("/proc/{}/maps", t.pid())).unwrap();
    let stack = maps.lines().find(|l| l.ends_with("[stack]")).unwrap();
    let stack = u64::from_str_radix(stack.split('-').next().unwrap(), 16).unwrap();
    assert!(matches!(
        reg.register(stack + 8, noop),
        Err(Error::NotExecutable { .. })
    ));
    assert!(reg.is_empty());
    assert!(
        common::text(t.pid()) == before,
        "a refused probe wrote to the program"
    );
    // An address inside the out-of-line page is the machinery's own. (The probe on
    // mp_args8, called every round, keeps the program from ending meanwhile.)
    let _keep = reg.register(t.resolve("mp_args8").unwrap(), noop).unwrap();
    let g = reg.register(load, noop).unwrap();
    assert_eq!(t.run_until(|| g.stats().unwrap().hits >= 1).unwrap(), None);
    let page = t.xol_pages()[0];
    assert!(matches!(
        t.registry().register(page + 64, noop),
        Err(Error::Reserved { .. })
    ));
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
}

#[test]
fn handlers_write_tracee_memory_within_its_protections() {
    use multiprobe_core::MemoryError;
    let n = 100u64;
    let (expected, _) = common::unprobed("mp-single", &["--iters", "100"]);
    let mut t = Tracer::spawn(&mut common::command("mp-single", &["--iters", "100"])).unwrap();
    let riprel = t.resolve("mp_riprel").unwrap();
    let refused = Arc::new(AtomicU64::new(0));
    let r = Arc::clone(&refused);
    // mp_load(&i): add one to `i` before the load reads it.
    let g1 = t
        .registry()
        .register(t.resolve("mp_load").unwrap(), |hit| {
            let p = hit.regs().rdi;
            let v = hit.mem().read_u64(p).unwrap();
            hit.mem().write_u64(p, v + 1).unwrap();
        })
        .unwrap();
    // The code itself is not writable for handlers (the backend patches code its own
    // way; handlers get the program's own view of protections).
    let g2 = t
        .registry()
        .register(riprel, move |hit| {
            match hit.mem().write(hit.addr() + 7, &[0x90]) {
                Err(MemoryError::NotWritable(_)) => {
                    r.fetch_add(1, Relaxed);
                }
                other => panic!("writing code from a handler: {other:?}"),
            }
        })
        .unwrap();
    let out = common::run_to_exit(&mut t, 0);
    let loaded = |s: &str| -> u64 {
        let line = s.lines().find(|l| l.starts_with("mp_load")).unwrap();
        line.rsplit("loaded=").next().unwrap().parse().unwrap()
    };
    // `i` itself was raised by one, so both mp_load(&i) and the mp_riprel(i) after it
    // return one more each round.
    assert_eq!(loaded(&out), loaded(&expected) + 2 * n);
    assert!(out.contains(&format!("mp_load calls={n}")), "{out}");
    assert_eq!(refused.load(Relaxed), n);
    assert_eq!(g1.stats().unwrap().panics + g2.stats().unwrap().panics, 0);
}

#[test]
fn run_to_entry_then_probe_a_library_function() {
    let mut t = Tracer::spawn(&mut common::command("mp-single", &["--iters", "10"])).unwrap();
    // At the exec stop only the program and the dynamic loader are mapped.
    assert!(t.resolve("libc:write").is_err());
    assert_eq!(t.run_to_entry().unwrap(), None);
    // Held at the entry: nothing of the program ran yet.
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", t.pid())).unwrap();
    assert!(stat.rsplit(") ").next().unwrap().starts_with('t'), "{stat}");
    let write = t.resolve("libc:write").unwrap();
    let writes = Arc::new(AtomicU64::new(0));
    let ww = Arc::clone(&writes);
    let _g = t
        .registry()
        .register(write, move |hit| {
            if hit.arg(0).unwrap() == 1 {
                ww.fetch_add(1, Relaxed);
            }
        })
        .unwrap();
    let out = common::run_to_exit(&mut t, 0);
    assert!(out.contains("mp_add calls=10"), "{out}");
    // Rust's stdout writes its lines (line-buffered to a pipe: at least once).
    assert!(writes.load(Relaxed) >= 1);
}

#[test]
fn pause_holds_every_thread_and_run_goes_on_with_exact_counts() {
    let mut t = Tracer::spawn(&mut common::command("mp-threads", &["--base", "300"])).unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let post = common::counting_with_post(&hits);
    let g = t
        .registry()
        .register_handler(t.resolve("mp_tload").unwrap(), post)
        .unwrap();
    assert_eq!(t.run_until(|| hits.load(Relaxed) >= 200).unwrap(), None);
    assert_eq!(t.pause().unwrap(), None);
    for tid in t.threads() {
        let stat = std::fs::read_to_string(format!("/proc/{}/task/{tid}/stat", t.pid())).unwrap();
        assert!(
            stat.rsplit(") ").next().unwrap().starts_with('t'),
            "{tid}: {stat}"
        );
    }
    let out = common::run_to_exit(&mut t, 0);
    let total: u64 = (0..5).map(|t| if t == 0 { 300 } else { 300 * t }).sum();
    assert_eq!(hits.load(Relaxed), total, "{out}");
    assert_eq!(g.stats().unwrap().hits, total);
}

#[test]
fn return_now_at_a_function_entry_ends_each_call_in_the_tracee_with_the_value() {
    let n = 40u64;
    let mut t = Tracer::spawn(&mut common::command("mp-single", &["--iters", "40"])).unwrap();
    let add = t.resolve("mp_add").unwrap();
    // mp_add(i, 3i) returns 1000 + i instead of 4i, without running its body.
    let probe = t
        .registry()
        .register(add, |hit| {
            let i = hit.arg(0).unwrap();
            hit.return_now(1000 + i).unwrap();
        })
        .unwrap();
    let out = common::run_to_exit(&mut t, 0);
    let sum: u64 = (0..n).map(|i| 1000 + i).sum();
    assert!(
        out.contains(&format!("mp_add calls={n} sum={sum}\n")),
        "{out}"
    );
    // The rest of the program ran as unprobed (the caller's stack was intact).
    let (unprobed, _) = common::unprobed("mp-single", &["--iters", "40"]);
    let rest = |s: &str| s.lines().skip(1).map(String::from).collect::<Vec<_>>();
    assert_eq!(rest(&out), rest(&unprobed));
    assert_eq!(probe.stats().unwrap().hits, n);
}
