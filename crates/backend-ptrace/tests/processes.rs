//! Threads, forks, vforks, execs, signals and faults of traced programs.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use common::counter;
use multiprobe_backend_ptrace::{ExitStatus, Signal, Stop, Tracer};
use multiprobe_core::{FaultAction, FnHandler, Hit, PreAction};

#[test]
fn per_thread_counts_match_what_each_thread_reports() {
    let mut cmd = common::command("mp-threads", &["--threads", "4", "--base", "150"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    let work = t.resolve("mp_work").unwrap();
    // tid -> (calls, the thread index seen in the first argument)
    let seen: Arc<Mutex<HashMap<u32, (u64, u64)>>> = Arc::default();
    let s = Arc::clone(&seen);
    let g = t
        .registry()
        .register(work, move |hit| {
            let arg = hit.arg(0).unwrap();
            let mut m = s.lock().unwrap();
            let e = m.entry(hit.tid()).or_insert((0, arg));
            e.0 += 1;
            assert_eq!(e.1, arg, "a thread's first argument never changes");
        })
        .unwrap();
    // And a relocated one with a post-handler: threads pass through trap-after slots.
    let posts: Arc<Mutex<HashMap<u32, u64>>> = Arc::default();
    let p = Arc::clone(&posts);
    let tload = FnHandler::new().post(move |hit| {
        *p.lock().unwrap().entry(hit.tid()).or_default() += 1;
    });
    let g2 = t
        .registry()
        .register_handler(t.resolve("mp_tload").unwrap(), tload)
        .unwrap();
    let out = common::run_to_exit(&mut t, 0);
    let seen = seen.lock().unwrap();
    let posts = posts.lock().unwrap();
    let mut total = 0;
    for line in out.lines() {
        // thread T tid=TID calls=C acc=A
        let f: Vec<&str> = line.split_whitespace().collect();
        let idx: u64 = f[1].parse().unwrap();
        let tid: u32 = f[2].strip_prefix("tid=").unwrap().parse().unwrap();
        let calls: u64 = f[3].strip_prefix("calls=").unwrap().parse().unwrap();
        assert_eq!(
            seen.get(&tid),
            Some(&(calls, idx)),
            "thread {idx} (tid {tid})"
        );
        assert_eq!(posts.get(&tid), Some(&calls), "posts of thread {idx}");
        total += calls;
    }
    assert_eq!(out.lines().count(), 5);
    assert_eq!(seen.len(), 5);
    assert_eq!(g.stats().unwrap().hits, total);
    assert_eq!(g2.stats().unwrap().hits, total);
}

#[test]
fn fork_children_are_freed_vfork_children_followed_and_output_unchanged() {
    let (expected, code) = common::unprobed("mp-forker", &[]);
    assert_eq!(code, Some(0));
    let mut t = Tracer::spawn(&mut common::command("mp-forker", &[])).unwrap();
    let add = t.resolve("mp_add").unwrap();
    let (hits, h) = counter();
    let _g = t.registry().register(add, h).unwrap();
    // A relocated site too: the XOL page exists when the program forks, and the child
    // must get rid of it (the program prints how many such mappings its child has).
    let (loads, l) = counter();
    let _g2 = t
        .registry()
        .register(t.resolve("mp_fload").unwrap(), l)
        .unwrap();
    let out = common::run_to_exit(&mut t, 0);
    assert_eq!(out, expected);
    assert!(out.contains("anon_exec=0"), "{out}");
    assert!(out.contains("child=exit 0"), "{out}");
    assert_eq!(loads.load(Relaxed), 2);
    // Only the traced parent's own calls: the fork child was let go before its calls.
    assert_eq!(hits.load(Relaxed), 20);
}

#[test]
fn exec_ends_old_probes_and_new_ones_work_on_the_new_image() {
    let args = ["--iters", "40", "--then-exec"];
    let mut t = Tracer::spawn(&mut common::command("mp-single", &args)).unwrap();
    let (hits, h) = counter();
    let g = t
        .registry()
        .register(t.resolve("mp_add").unwrap(), h)
        .unwrap();
    let id = g.id();
    let Stop::Exec { unregistered } = t.run().unwrap() else {
        panic!("expected an exec");
    };
    assert_eq!(unregistered.len(), 1);
    assert_eq!(unregistered[0].id, id);
    assert_eq!(unregistered[0].stats.hits, 40);
    assert!(t.registry().is_empty());
    assert_eq!(hits.load(Relaxed), 40);
    drop(g); // already gone: dropping is harmless
    let (hits2, h2) = counter();
    let _g2 = t
        .registry()
        .register(t.resolve("mp_add").unwrap(), h2)
        .unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    assert_eq!(hits2.load(Relaxed), 40);
    assert_eq!(hits.load(Relaxed), 40);
}

#[test]
fn the_programs_own_sigtrap_and_signals_are_delivered_unchanged() {
    let (expected, _) = common::unprobed("mp-signals", &["--rounds", "25"]);
    assert!(
        expected.contains("sigtrap=50 sigtrap_kernel=25 sigusr1=25"),
        "{expected}"
    );
    let mut t = Tracer::spawn(&mut common::command("mp-signals", &["--rounds", "25"])).unwrap();
    let (hits, h) = counter();
    let _g = t
        .registry()
        .register(t.resolve("mp_add").unwrap(), h)
        .unwrap();
    assert_eq!(common::run_to_exit(&mut t, 0), expected);
    assert_eq!(hits.load(Relaxed), 50);
}

#[test]
fn a_fault_in_the_displaced_instruction_reaches_the_program_at_the_original_address() {
    let (expected, code) = common::unprobed("mp-fault", &[]);
    assert_eq!(code, Some(42));
    let mut t = Tracer::spawn(&mut common::command("mp-fault", &[])).unwrap();
    let f = t.resolve("mp_fault_load").unwrap();
    let faults = Arc::new(Mutex::new(Vec::new()));
    let fl = Arc::clone(&faults);
    let (pres, p) = counter();
    let h = FnHandler::new()
        .pre(move |hit| {
            p(hit);
            PreAction::Continue
        })
        .fault(move |hit, fault| {
            fl.lock().unwrap().push((hit.regs().rip, *fault));
            FaultAction::NotHandled
        });
    let _g = t.registry().register_handler(f, h).unwrap();
    let out = common::run_to_exit(&mut t, 42);
    // Same fault address and code as unprobed, and the handler saw rip == the
    // function's address (load addresses differ between runs: compare fields).
    let fields = |s: &str| -> Vec<String> {
        let line = s.lines().last().unwrap_or_default();
        line.split_whitespace().map(str::to_string).collect()
    };
    let (got, want) = (fields(&out), fields(&expected));
    assert_eq!(got.len(), 5, "{out}");
    assert_eq!(got[..3], want[..3], "{out}");
    assert_eq!(got[3]["rip=".len()..], got[4]["fn=".len()..], "{out}");
    assert_eq!(want[3]["rip=".len()..], want[4]["fn=".len()..]);
    assert_eq!(got[4], format!("fn={f:016x}"));
    assert_eq!(pres.load(Relaxed), 1);
    let faults = faults.lock().unwrap();
    assert_eq!(faults.len(), 1);
    let (rip, fault) = faults[0];
    assert_eq!(rip, f);
    assert_eq!((fault.signal, fault.addr), (libc::SIGSEGV, 0x10));
}

#[test]
fn killing_the_tracee_while_it_is_stopped_at_a_breakpoint() {
    let mut t = Tracer::spawn(&mut common::command("mp-single", &["--iters", "100"])).unwrap();
    let pid = t.pid();
    let (hits, h) = counter();
    let g = t
        .registry()
        .register(t.resolve("mp_add").unwrap(), move |hit| {
            h(hit);
            // The thread is stopped at the breakpoint right now.
            // SAFETY: plain kill of the traced child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        })
        .unwrap();
    assert_eq!(
        t.run().unwrap(),
        Stop::Exited(ExitStatus::Signal(Signal::KILL))
    );
    assert_eq!(hits.load(Relaxed), 1);
    // Nothing is left to restore; unregistering is fine.
    g.unregister().unwrap();
    assert_eq!(
        t.run().unwrap(),
        Stop::Exited(ExitStatus::Signal(Signal::KILL))
    );
}

#[test]
fn group_stop_and_continue_of_a_traced_program() {
    let iters = 3000u64;
    let mut t = Tracer::spawn(&mut common::command("mp-single", &["--iters", "3000"])).unwrap();
    let pid = t.pid();
    let (hits, h) = counter();
    let _g = t
        .registry()
        .register(t.resolve("mp_load").unwrap(), h)
        .unwrap();
    let hits2 = Arc::clone(&hits);
    // Stop the whole program with SIGSTOP in the middle, wait until the kernel shows it
    // stopped, then continue it: the tracer must keep it stopped meanwhile (LISTEN)
    // and pick up again after SIGCONT.
    let stopper = std::thread::spawn(move || {
        while hits2.load(Relaxed) < 100 {
            std::thread::yield_now();
        }
        // SAFETY: signals to the traced child.
        unsafe { libc::kill(pid, libc::SIGSTOP) };
        // Wait for the group-stop itself. The thread is in a ptrace-stop ('t') also
        // while the tracer handles the SIGSTOP's delivery, and a SIGCONT sent then
        // would come before the stop takes effect (as it would for an untraced
        // program whose SIGCONT beats its SIGSTOP): the program would stay stopped.
        // The kernel stack tells the two apart (the group-stop trap reports through
        // ptrace_do_notify; a signal-delivery-stop does not).
        loop {
            let stack = std::fs::read_to_string(format!("/proc/{pid}/stack"))
                .expect("/proc/PID/stack (the tests run as root)");
            if ["ptrace_do_notify", "do_jobctl_trap", "do_signal_stop"]
                .iter()
                .any(|f| stack.contains(f))
            {
                break;
            }
            std::thread::yield_now();
        }
        let at_stop = hits2.load(Relaxed);
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGCONT) };
        at_stop
    });
    let mut child = t.take_child().unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    let at_stop = stopper.join().unwrap();
    assert!(at_stop >= 100 && at_stop < iters, "{at_stop}");
    assert_eq!(hits.load(Relaxed), iters);
    let out = common::read_all(&mut child);
    assert!(out.contains(&format!("mp_load calls={iters}")), "{out}");
}

#[test]
fn signals_that_catch_a_thread_entering_a_slot() {
    // The pre-handler of the main loop's call sends the thread SIGUSR1 and SIGUSR2
    // while it is stopped at the breakpoint; both arrive as it enters the trap-after
    // slot. SIGUSR1, first, is held back until the displaced instruction has run and is
    // delivered at the slot's end, with rip back in the original code (its handler's
    // hit comes after the outer post). SIGUSR2 then finds a signal already held: it is
    // delivered inside the slot, and its handler's hit nests in the outer one (it comes
    // before the outer post); the handler returns into the slot, which still works.
    let rounds = 20u64;
    let args = ["--rounds", "20"];
    let (expected, _) = common::unprobed("mp-signals", &args);
    let mut t = Tracer::spawn(&mut common::command("mp-signals", &args)).unwrap();
    let pid = t.pid();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (l1, l2) = (Arc::clone(&log), Arc::clone(&log));
    let h = FnHandler::new()
        .pre(move |hit| {
            let v = hit.mem().read_u64(hit.regs().rdi).unwrap();
            l1.lock().unwrap().push(('p', v));
            // Only from the main loop's calls (the handlers pass 1000 and 2000).
            if v < 1000 {
                for sig in [libc::SIGUSR1, libc::SIGUSR2] {
                    // SAFETY: signals to the traced thread, which handles both.
                    unsafe { libc::syscall(libc::SYS_tgkill, pid, hit.tid(), sig) };
                }
            }
            PreAction::Continue
        })
        .post(move |hit| {
            l2.lock().unwrap().push(('q', hit.regs().rax));
        });
    let _g = t
        .registry()
        .register_handler(t.resolve("mp_sload").unwrap(), h)
        .unwrap();
    let out = common::run_to_exit(&mut t, 0);
    let base: u64 = (0..rounds).sum();
    let want = expected.replace(
        &format!("sigusr1={rounds} sigusr2=0 sloads={}", base + 1000 * rounds),
        &format!(
            "sigusr1={} sigusr2={rounds} sloads={}",
            2 * rounds,
            base + 4000 * rounds
        ),
    );
    assert_ne!(want, expected, "{expected}");
    assert_eq!(out, want);
    let log = log.lock().unwrap();
    let mut events = Vec::new();
    for i in 0..rounds {
        events.extend([('p', i), ('p', 2000), ('q', 2000), ('q', i)]);
        events.extend([('p', 1000), ('q', 1000)]);
        // The program's own SIGUSR1, later in the round.
        events.extend([('p', 1000), ('q', 1000)]);
    }
    assert_eq!(*log, events);
}

#[test]
fn a_vfork_child_is_followed_until_it_execs() {
    // The program runs itself through std::process::Command, whose child side runs in
    // the parent's memory (clone with CLONE_VM | CLONE_VFORK) until it calls execve:
    // that child is traced like a thread and its hit served. The forked child (a copy
    // of memory, freed of breakpoints and let go) makes no hit, nor do the new programs.
    let (expected, _) = common::unprobed("mp-forker", &[]);
    let mut t = Tracer::spawn(&mut common::command("mp-forker", &[])).unwrap();
    let pid = t.pid();
    assert_eq!(t.run_to_entry().unwrap(), None);
    let tids = Arc::new(Mutex::new(Vec::new()));
    let tt = Arc::clone(&tids);
    let _g = t
        .registry()
        .register(
            t.resolve("libc:execve").unwrap(),
            move |hit: &mut Hit<'_>| {
                tt.lock().unwrap().push(hit.tid());
            },
        )
        .unwrap();
    assert_eq!(common::run_to_exit(&mut t, 0), expected);
    let tids = tids.lock().unwrap();
    assert_eq!(tids.len(), 1, "{tids:?}");
    assert_ne!(tids[0], pid as u32);
}

#[test]
fn spawning_a_missing_program_is_an_error() {
    let err = Tracer::spawn(&mut std::process::Command::new("/nonexistent/program")).unwrap_err();
    match err {
        multiprobe_core::Error::Io { source, .. } => {
            assert_eq!(source.kind(), std::io::ErrorKind::NotFound)
        }
        other => panic!("expected an I/O error, got {other:?}"),
    }
    // The thread can trace again afterwards.
    let mut t = Tracer::spawn(&mut common::command("mp-single", &["--iters", "1"])).unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
}

/// Following forks: each child is reported held and clean, gets the probes its user
/// registers in its own registry, and counts exactly what it ran, grandchildren too.
#[test]
fn fork_children_are_followed_with_their_own_probes() {
    let mut cmd = common::command("mp-c-forktree", &["25", "3"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    t.follow_forks(true);
    let work = t.resolve("mp_tree_work").unwrap();
    let mut counts: HashMap<i32, Arc<AtomicU64>> = HashMap::new();
    let (c, h) = counter();
    let mut guards = vec![t.registry().register(work, h).unwrap()];
    counts.insert(t.pid(), c);
    let mut child = t.take_child().unwrap();
    let mut ended = Vec::new();
    loop {
        match t.run().unwrap() {
            Stop::Forked {
                child: pid, execed, ..
            } => {
                assert!(!execed);
                let reg = t.registry_of(pid).expect("a followed child has a registry");
                assert!(reg.is_empty(), "the child starts clean");
                let (c, h) = counter();
                guards.push(reg.register(work, h).unwrap());
                counts.insert(pid, c);
            }
            Stop::ProcessExited { pid, status } => {
                assert_eq!(status, ExitStatus::Code(0));
                ended.push(pid);
            }
            Stop::Exited(status) => {
                assert_eq!(status, ExitStatus::Code(0));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        ended.len(),
        6,
        "every follower's end is reported: {ended:?}"
    );
    let out = common::read_all(&mut child);
    let mut seen = 0;
    for line in out.lines() {
        let pid: i32 = line["pid=".len()..]
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let calls: u64 = line.split("calls=").nth(1).unwrap().trim().parse().unwrap();
        assert_eq!(counts[&pid].load(Relaxed), calls, "process {pid}: {out}");
        seen += 1;
    }
    assert_eq!(seen, 7, "{out}");
    assert!(t.followed().is_empty(), "every follower is gone");
    drop(guards);
}

/// A fork made by an instruction that the tracer single-steps (under a seccomp filter
/// no out-of-line page can be mapped, so the probed `syscall` steps in place) is not
/// left parked: the child is freed (or followed) as any other.
#[test]
fn a_fork_during_a_single_step_is_handled() {
    fork_from_a_probed_syscall("raw");
}

/// A fork made from the out-of-line copy of a probed `syscall`: the child starts inside
/// the copy, which is unmapped in it; it is moved back to the original code first.
#[test]
fn a_fork_from_an_out_of_line_slot_is_handled() {
    fork_from_a_probed_syscall("raw-slot");
}

fn fork_from_a_probed_syscall(mode: &str) {
    for follow in [false, true] {
        let mut cmd = common::command("mp-c-forktree", &["4", "2", mode]);
        let mut t = Tracer::spawn(&mut cmd).unwrap();
        t.follow_forks(follow);
        let fork_insn = t.resolve("mp_fork_insn").unwrap();
        let work = t.resolve("mp_tree_work").unwrap();
        let (forks, h) = counter();
        let _g1 = t.registry().register(fork_insn, h).unwrap();
        let (calls, h) = counter();
        let _g2 = t.registry().register(work, h).unwrap();
        let mut child = t.take_child().unwrap();
        // A parked child would block its parent's wait, and this loop, for ever.
        let pid = t.pid();
        let watchdog = std::thread::spawn(move || {
            for _ in 0..300 {
                std::thread::sleep(std::time::Duration::from_millis(100));
                if std::fs::metadata(format!("/proc/{pid}")).is_err() {
                    return false;
                }
            }
            // SAFETY: signalling the test's own traced child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            true
        });
        let mut followers = Vec::new();
        let status = loop {
            match t.run().unwrap() {
                Stop::Forked { child, .. } => {
                    let reg = t.registry_of(child).unwrap();
                    let (c, h) = counter();
                    followers.push((child, c, reg.register(work, h).unwrap()));
                }
                Stop::ProcessExited { .. } => {}
                Stop::Exited(s) => break s,
                other => panic!("{other:?}"),
            }
        };
        assert!(
            !watchdog.join().unwrap(),
            "follow={follow}: a child was left parked"
        );
        assert_eq!(status, ExitStatus::Code(0), "follow={follow}");
        let out = common::read_all(&mut child);
        assert_eq!(out.lines().count(), 5, "follow={follow}: {out}");
        assert_eq!(forks.load(Relaxed), 2, "the root's two forks");
        assert_eq!(calls.load(Relaxed), 4);
        if follow {
            // The root's two forks happen during a step; its children's (unprobed
            // there) are ordinary fork events: every one is followed.
            assert_eq!(
                followers.len(),
                4,
                "children and grandchildren are reported"
            );
            for (pid, c, _) in &followers {
                let line = out
                    .lines()
                    .find(|l| l.starts_with(&format!("pid={pid} ")))
                    .unwrap();
                let want: u64 = line.split("calls=").nth(1).unwrap().parse().unwrap();
                assert_eq!(c.load(Relaxed), want, "{line}");
            }
        }
    }
}

/// Followed fork children (bash forks, then executes) that execute a program at once, each with a collector that
/// the tracer promotes by pausing the whole family: an exec that lands while the
/// family is held for that is reported too (it was dropped, and the child ran its new
/// program unprobed and unreported).
#[test]
fn every_exec_of_a_followed_child_is_reported_even_while_the_family_is_paused() {
    use multiprobe_backend_ptrace::collect::Collect;
    const CHILDREN: usize = 30;
    let script = format!("for i in {{1..{CHILDREN}}}; do /bin/true; done");
    let mut cmd = std::process::Command::new("/bin/bash");
    cmd.args(["-c", &script]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    assert_eq!(t.run_to_entry().unwrap(), None);
    t.follow_forks(true);
    let malloc = t.resolve("libc.so.6:malloc").unwrap();
    let mut guards = vec![t
        .registry()
        .register_handler(malloc, Collect::count())
        .unwrap()];
    let (mut forked, mut execed) = (0, 0);
    loop {
        match t.run().unwrap() {
            Stop::Forked {
                child,
                execed: false,
                ..
            } => {
                forked += 1;
                // The child's libc is where the parent's is until it executes.
                let reg = t.registry_of(child).unwrap();
                guards.push(reg.register_handler(malloc, Collect::count()).unwrap());
            }
            Stop::ProcessExec { .. } => execed += 1,
            Stop::ProcessExited { status, .. } => assert_eq!(status, ExitStatus::Code(0)),
            Stop::Exited(status) => {
                assert_eq!(status, ExitStatus::Code(0));
                break;
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        (forked, execed),
        (CHILDREN, CHILDREN),
        "every child's exec reported"
    );
    drop(guards);
}
