//! The simulated CPUs on real OS threads: each program thread runs on its own OS
//! thread (its own `ThreadState`, its own trace) against one shared memory and one
//! registry, while the calling thread changes the registry — so the core's read
//! sections, grace periods and counters are exercised concurrently, not interleaved.
//!
//! Nothing here is deterministic, so the checks are the ones that hold under any
//! interleaving, made by each CPU on its own trace after every micro-step:
//! * a dispatch calls pre-hooks in strictly increasing id order (registration order
//!   at one address), and asks for posts iff one of them has a post hook;
//! * the post trap calls exactly the post hooks of the handlers whose pre ran, in the
//!   same order (the snapshot rule), and nothing else;
//! * no hook starts after its handler's `unregister` returned (see
//!   [`crate::handlers::Watch`]; counted by the handlers themselves);
//! * a return calls only return hooks, in increasing id order, each with the token a
//!   pre-hook of the same handler left (and counted per handler: the caller checks
//!   them against the final `returns`).
//!
//! and, after the run, by the caller: per-handler hit counts equal the pre calls the
//! CPUs saw, and each CPU's final state equals an unprobed run of it (programs made
//! with [`crate::program::ProgramSpec::private`] do not interact).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Arc;

use multiprobe_core::{HandlerId, Registry, Regs};

use crate::backend::SimBackend;
use crate::cpu::{Cpu, Dispatched, Env, Event, Status};
use crate::ctx::{self, Call, Hook};
use crate::machine::MachineState;
use crate::memory::{SimMemory, DATA, STACK};
use crate::program::Program;

/// Most micro-steps one round of a program may take before it is declared stuck.
const ROUND_BUDGET: u64 = 100_000;

/// What one CPU saw.
#[derive(Clone, Debug, Default)]
pub struct CpuReport {
    /// Pre calls per handler.
    pub pre_calls: BTreeMap<HandlerId, u64>,
    /// Dispatches that found a probe.
    pub dispatches: u64,
    /// Post traps.
    pub posts: u64,
    /// Return hook calls per handler.
    pub ret_calls: BTreeMap<HandlerId, u64>,
    /// Returns through the trampoline.
    pub returns: u64,
    /// Micro-steps taken.
    pub steps: u64,
    /// Broken protocol rules, described (must stay empty).
    pub errors: Vec<String>,
    /// Status and registers at the end of the last round.
    pub last: Option<(Status, Regs)>,
}

/// A machine whose CPUs run on OS threads.
#[derive(Debug)]
pub struct Concurrent {
    registry: Registry<SimBackend>,
    backend: SimBackend,
    program: Arc<Program>,
}

impl Concurrent {
    /// Load `program` into fresh memory with a registry over it.
    pub fn new(program: Program) -> Self {
        let mem = Arc::new(SimMemory::new());
        program.load(&mem);
        let backend = SimBackend::new(mem, program.boundaries.clone(), program.functions.clone());
        Concurrent {
            registry: Registry::new(backend.clone()),
            backend,
            program: Arc::new(program),
        }
    }

    /// The registry.
    pub fn registry(&self) -> &Registry<SimBackend> {
        &self.registry
    }
    /// The backend.
    pub fn backend(&self) -> &SimBackend {
        &self.backend
    }
    /// The program.
    pub fn program(&self) -> &Arc<Program> {
        &self.program
    }

    /// Run every program thread `rounds` times (restarting it from its initial
    /// registers when it ends), each on its own OS thread, while `control` runs on the
    /// calling thread; `control` gets the number of CPUs still running.
    pub fn run<R>(
        &self,
        rounds: u32,
        control: impl FnOnce(&Registry<SimBackend>, &AtomicUsize) -> R,
    ) -> (Vec<CpuReport>, R) {
        let running = AtomicUsize::new(self.program.threads.len());
        std::thread::scope(|s| {
            let cpus: Vec<_> = self
                .program
                .threads
                .iter()
                .enumerate()
                .map(|(t, regs)| {
                    let backend = &self.backend;
                    let running = &running;
                    let regs = *regs;
                    s.spawn(move || {
                        let report = run_cpu(backend, t as u32, regs, rounds);
                        running.fetch_sub(1, SeqCst);
                        report
                    })
                })
                .collect();
            let r = control(&self.registry, &running);
            let reports = cpus
                .into_iter()
                .map(|h| h.join().expect("a CPU thread panicked"))
                .collect();
            (reports, r)
        })
    }

    /// Data and stack memory now.
    pub fn data(&self) -> Vec<u8> {
        let mem = self.backend.memory();
        let mut d = mem.snapshot(DATA);
        d.extend(mem.snapshot(STACK));
        d
    }
}

/// What [`Concurrent::run`] must end in when nothing changes the program: each thread
/// run alone, unprobed, for `rounds` rounds, one after the other.
pub fn unprobed_rounds(program: &Program, rounds: u32) -> MachineState {
    let mem = Arc::new(SimMemory::new());
    program.load(&mem);
    let backend = SimBackend::new(
        Arc::clone(&mem),
        program.boundaries.clone(),
        program.functions.clone(),
    );
    let _registry = Registry::new(backend.clone());
    let threads = program
        .threads
        .iter()
        .enumerate()
        .map(|(t, regs)| {
            let r = run_cpu(&backend, t as u32, *regs, rounds);
            r.last.expect("at least one round")
        })
        .collect();
    let mut data = mem.snapshot(DATA);
    data.extend(mem.snapshot(STACK));
    MachineState { threads, data }
}

fn run_cpu(backend: &SimBackend, tid: u32, regs: Regs, rounds: u32) -> CpuReport {
    let env = Env {
        backend,
        registry: None,
    };
    let _ = ctx::take();
    let mut report = CpuReport::default();
    let mut pre: Vec<(HandlerId, bool)> = Vec::new();
    for _ in 0..rounds {
        let mut cpu = Cpu::new(tid, regs);
        let mut steps = 0;
        while let Some(e) = cpu.step(&env) {
            steps += 1;
            check_step(&e, &ctx::take(), &mut pre, &mut report);
            if steps > ROUND_BUDGET {
                report
                    .errors
                    .push(format!("cpu {tid}: a round took over {ROUND_BUDGET} steps"));
                break;
            }
        }
        report.steps += steps;
        report.last = Some((cpu.status(), *cpu.regs()));
    }
    report
}

fn check_step(e: &Event, calls: &[Call], pre: &mut Vec<(HandlerId, bool)>, r: &mut CpuReport) {
    let entered = |hook: Hook| -> Vec<(HandlerId, bool)> {
        calls
            .iter()
            .filter_map(|c| match c {
                Call::Enter {
                    id, hook: h, post, ..
                } if *h == hook => Some((*id, *post)),
                _ => None,
            })
            .collect()
    };
    match *e {
        Event::Return { rsp, outcome } => {
            r.returns += 1;
            let rets = entered(Hook::Ret);
            for &(id, _) in &rets {
                *r.ret_calls.entry(id).or_default() += 1;
            }
            if outcome != multiprobe_core::backend::RetOutcome::Returned {
                r.errors.push(format!("return at {rsp:#x}: {outcome:?}"));
            }
            if !rets.windows(2).all(|w| w[0].0 < w[1].0) || rets.len() != entered_any(calls) {
                r.errors.push(format!(
                    "return at {rsp:#x}: hooks {calls:?} out of order or not returns"
                ));
            }
        }
        Event::Dispatch { addr, outcome, .. } => {
            let pres = entered(Hook::Pre);
            for &(id, _) in &pres {
                *r.pre_calls.entry(id).or_default() += 1;
            }
            if !pres.windows(2).all(|w| w[0].0 < w[1].0) {
                r.errors.push(format!(
                    "{addr:#x}: pre hooks out of registration order: {pres:?}"
                ));
            }
            if calls.iter().any(|c| {
                matches!(
                    c,
                    Call::Enter {
                        hook: Hook::Post | Hook::Fault,
                        ..
                    }
                )
            }) {
                r.errors
                    .push(format!("{addr:#x}: post or fault hook during the pre walk"));
            }
            match outcome {
                Dispatched::Step { post } => {
                    r.dispatches += 1;
                    if post != pres.iter().any(|p| p.1) {
                        r.errors.push(format!(
                            "{addr:#x}: wants_post {post} after pre hooks {pres:?}"
                        ));
                    }
                    *pre = pres;
                }
                Dispatched::Redirect => r.dispatches += 1,
                Dispatched::NotOurs { .. } => {
                    if !pres.is_empty() {
                        r.errors.push(format!(
                            "{addr:#x}: pre hooks ran for a trap that was not ours"
                        ));
                    }
                }
            }
        }
        Event::PostTrap { addr, ran } => {
            r.posts += 1;
            let want: Vec<(HandlerId, bool)> = pre.iter().copied().filter(|p| p.1).collect();
            let posts = entered(Hook::Post);
            if !ran || posts != want || calls.len() != 2 * posts.len() + nested(calls) {
                r.errors.push(format!(
                    "{addr:#x}: post hooks {posts:?} (ran {ran}) after pre hooks {pre:?}"
                ));
            }
            pre.clear();
        }
        Event::SlotExec { result: Err(_), .. } => {
            let faults = entered(Hook::Fault);
            if !faults.windows(2).all(|w| w[0].0 < w[1].0) {
                r.errors
                    .push(format!("fault hooks out of order: {faults:?}"));
            }
            pre.clear();
        }
        Event::SlotExec { result: Ok(_), .. } => {
            if !calls.is_empty() {
                r.errors
                    .push("a hook ran during an out-of-line step".into());
            }
        }
        Event::Exec { .. } | Event::RaiseTrap { .. } => {
            if !calls.is_empty() {
                r.errors.push("a hook ran outside dispatch".into());
            }
        }
    }
}

fn entered_any(calls: &[Call]) -> usize {
    calls
        .iter()
        .filter(|c| matches!(c, Call::Enter { .. }))
        .count()
}

fn nested(calls: &[Call]) -> usize {
    calls
        .iter()
        .filter(|c| matches!(c, Call::Nested { .. }))
        .count()
}
