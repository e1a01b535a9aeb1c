//! Simulated CPUs on real OS threads hitting probes while another thread registers,
//! unregisters (waiting for real grace periods), enables and disables handlers.
//! See `multiprobe_backend_sim::concurrent` for what each CPU checks.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;

use arbitrary::{Arbitrary, Unstructured};
use multiprobe_backend_sim::concurrent::{unprobed_rounds, Concurrent};
use multiprobe_backend_sim::handlers::{
    quiet_injected_panics, Behavior, PreMode, SimHandler, Watch,
};
use multiprobe_backend_sim::machine::Rng;
use multiprobe_backend_sim::memory::CODE;
use multiprobe_backend_sim::program::{Op, Program, ProgramSpec};
use multiprobe_core::{HandlerId, HandlerStats, Options, Request};

fn program(rng: &mut Rng) -> Program {
    let bytes: Vec<u8> = (0..400).map(|_| rng.next_u64() as u8).collect();
    let mut spec = ProgramSpec::arbitrary(&mut Unstructured::new(&bytes)).unwrap();
    spec.threads = 2 + (spec.threads % 3); // three to five threads
    spec.iterations = 7;
    // Long-lived threads: no instruction that ends one early.
    for f in &mut spec.functions {
        for op in f.iter_mut() {
            if matches!(op, Op::Ud | Op::Brk | Op::Div(..)) {
                *op = Op::Addi(1, 1);
            }
        }
    }
    Program::generate(&spec.private())
}

fn behavior(rng: &mut Rng, cpus_nested: Option<u64>) -> Behavior {
    Behavior {
        post: rng.below(2) == 0,
        pre: [
            PreMode::Observe,
            PreMode::Observe,
            PreMode::Emulate,
            PreMode::EmulateSilently,
        ][rng.below(4)],
        handle_faults: false,
        panic_every: if rng.below(5) == 0 {
            1 + rng.below(3) as u8
        } else {
            0
        },
        nested: cpus_nested.filter(|_| rng.below(4) == 0),
        inside: None,
        ret: false,
        skip_odd_returns: false,
    }
}

struct Outcome {
    stats: BTreeMap<HandlerId, HandlerStats>,
    watches: Vec<Arc<Watch>>,
    ops: u32,
}

/// The most handlers registered at once in the concurrent run.
const MAX_LIVE: usize = 48;

#[test]
fn cpus_on_os_threads_match_an_unprobed_run_and_never_see_a_retired_handler() {
    quiet_injected_panics();
    let mut total_dispatches = 0;
    let mut total_posts = 0;
    for seed in 1..=6u64 {
        let mut rng = Rng::new(seed);
        let program = program(&mut rng);
        let rounds = 300;
        let machine = Concurrent::new(program.clone());
        let sites: Vec<u64> = program.boundaries.iter().copied().collect();
        // Some probes are in place before the CPUs start.
        let mut live: Vec<HandlerId> = Vec::new();
        let mut watch_of: BTreeMap<HandlerId, Arc<Watch>> = BTreeMap::new();
        for _ in 0..6 {
            let addr = sites[rng.below(sites.len())];
            let w = Arc::new(Watch::default());
            let h = SimHandler::watched(
                behavior(&mut rng, None),
                program.insn_at(addr),
                Arc::clone(&w),
            );
            let id = machine
                .registry()
                .register_handler(addr, h)
                .unwrap()
                .into_id();
            live.push(id);
            watch_of.insert(id, w);
        }
        let (reports, out) = machine.run(rounds, |reg, running| {
            let mut stats = BTreeMap::new();
            let mut ops = 0;
            while running.load(SeqCst) > 0 || ops < 40 {
                ops += 1;
                let pick = |rng: &mut Rng, live: &Vec<HandlerId>| live[rng.below(live.len())];
                // Registrations outnumber removals 3 to 2, so the live handlers grow while
                // the CPUs run, and with them every hit's walk: bounded, so that the
                // test's length does not feed on the machine's load (a slow round
                // meant more handlers, which meant a slower round: over 10 minutes on
                // a loaded 2-CPU host, against seconds idle).
                let choice = match rng.below(7) {
                    0..=2 if live.len() >= MAX_LIVE => 3,
                    c => c,
                };
                match choice {
                    0..=2 => {
                        let n = 1 + rng.below(3);
                        let mut reqs = Vec::new();
                        let mut watches = Vec::new();
                        for _ in 0..n {
                            let addr = sites[rng.below(sites.len())];
                            let nested = Some(sites[rng.below(sites.len())]);
                            let w = Arc::new(Watch::default());
                            let h = SimHandler::watched(
                                behavior(&mut rng, nested),
                                program.insn_at(addr),
                                Arc::clone(&w),
                            );
                            let opts = Options {
                                exclusive: rng.below(20) == 0,
                                disabled: rng.below(6) == 0,
                            };
                            reqs.push(Request::handler(addr, h).options(opts));
                            watches.push(w);
                        }
                        // Exclusive conflicts are legitimate failures here.
                        if let Ok(gs) = reg.register_batch(reqs) {
                            for (g, w) in gs.into_iter().zip(watches) {
                                let id = g.into_id();
                                live.push(id);
                                watch_of.insert(id, w);
                            }
                        }
                    }
                    3 | 4 if !live.is_empty() => {
                        let id = pick(&mut rng, &live);
                        let s = reg
                            .unregister(id)
                            .expect("unregister from a thread outside dispatch waits and succeeds");
                        watch_of[&id].retired.store(true, SeqCst);
                        live.retain(|&l| l != id);
                        stats.insert(id, s);
                    }
                    5 if !live.is_empty() => {
                        let id = pick(&mut rng, &live);
                        if rng.below(2) == 0 {
                            reg.enable(id).unwrap()
                        } else {
                            reg.disable(id).unwrap()
                        }
                    }
                    _ => std::thread::yield_now(),
                }
            }
            let all = reg.unregister_batch(&live).expect("final unregister");
            for (id, s) in live.iter().zip(all) {
                watch_of[id].retired.store(true, SeqCst);
                stats.insert(*id, s);
            }
            Outcome {
                stats,
                watches: watch_of.into_values().collect(),
                ops,
            }
        });

        for (t, r) in reports.iter().enumerate() {
            assert!(r.errors.is_empty(), "seed {seed} cpu {t}: {:?}", r.errors);
            total_dispatches += r.dispatches;
            total_posts += r.posts;
        }
        for w in &out.watches {
            assert_eq!(
                w.violations.load(SeqCst),
                0,
                "seed {seed}: a hook ran after its unregister returned"
            );
        }
        for (id, s) in &out.stats {
            let seen: u64 = reports
                .iter()
                .map(|r| r.pre_calls.get(id).copied().unwrap_or(0))
                .sum();
            assert_eq!(s.hits, seen, "seed {seed}: hits of {id}");
        }
        let want = unprobed_rounds(&program, rounds);
        for (t, r) in reports.iter().enumerate() {
            assert_eq!(
                r.last,
                Some(want.threads[t]),
                "seed {seed}: thread {t} differs from its unprobed run"
            );
        }
        assert_eq!(
            machine.data(),
            want.data,
            "seed {seed}: data differs from the unprobed run"
        );
        let mem = machine.backend().memory();
        for a in CODE {
            assert_eq!(
                mem.byte(a),
                program.byte(a),
                "seed {seed}: code byte at {a:#x} not restored"
            );
        }
        assert!(out.ops >= 40);
        eprintln!(
            "seed {seed}: {} ops, {} handlers, cpu steps {:?}",
            out.ops,
            out.stats.len(),
            reports
                .iter()
                .map(|r| (r.steps, r.dispatches, r.posts))
                .collect::<Vec<_>>()
        );
    }
    assert!(
        total_dispatches > 1000 && total_posts > 100,
        "vacuous: {total_dispatches} dispatches, {total_posts} posts"
    );
}
