//! [`Sim`]: the interleaved, deterministic machine — a program in memory, a registry
//! over a [`SimBackend`], several [`Cpu`]s advanced one micro-step at a time by a
//! seeded scheduler (or by the caller, thread by thread) — and [`replay_unprobed`],
//! the transparency oracle's reference run.
//!
//! Everything runs on the OS thread that owns the `Sim`: all CPUs' `ThreadState`s
//! belong to it. So while any CPU owes a post (a deferred step holds a read section
//! open), `Registry::unregister` on this thread cannot wait for the grace period and
//! returns `Error::InsideDispatch` (the handler is unlinked, not awaited) — honest
//! behaviour the reference model predicts. [`Sim::settle`] runs every CPU out of its
//! pending steps when a caller needs waiting unregistration.
//!
//! Drop order: CPUs (and their `ThreadState`s, which end any pending read section)
//! before the registry, so the table is never dropped with a section open.

use std::sync::Arc;

use multiprobe_core::{Registry, Regs};

use crate::backend::SimBackend;
use crate::cpu::{Cpu, Env, Event, Status};
use crate::memory::{SimMemory, DATA, STACK};
use crate::program::Program;

/// A small, seedable, deterministic generator (SplitMix64).
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// Seeded.
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// The program-visible state of a machine: what transparency compares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineState {
    /// Each thread's status and registers.
    pub threads: Vec<(Status, Regs)>,
    /// Data and stack memory.
    pub data: Vec<u8>,
}

impl MachineState {
    /// Whether this (probed) state is the `unprobed` one — except for stack and data
    /// words holding the return trampoline's address here: the return slots of calls
    /// still in flight, or skipped by an escape (`longjmp`), where a return probe
    /// swapped the return address (what an unprobed run has there instead).
    pub fn matches_unprobed(&self, unprobed: &MachineState) -> bool {
        self.threads == unprobed.threads && same_memory(&self.data, &unprobed.data)
    }
}

/// [`MachineState::matches_unprobed`] for memory snapshots (of 8-aligned regions).
pub fn same_memory(probed: &[u8], unprobed: &[u8]) -> bool {
    probed.len() == unprobed.len()
        && probed
            .chunks(8)
            .zip(unprobed.chunks(8))
            .all(|(p, u)| p == u || p == crate::memory::RET_TRAMPOLINE.to_le_bytes().as_slice())
}

/// The interleaved machine.
#[derive(Debug)]
pub struct Sim {
    // Declared first: dropped first (module docs).
    cpus: Vec<Cpu>,
    registry: Registry<SimBackend>,
    backend: SimBackend,
    program: Arc<Program>,
    rng: Rng,
    retirements: Vec<u32>,
}

impl Sim {
    /// Load `program` into fresh memory, with a registry over it and one CPU per
    /// program thread; the scheduler is seeded with `seed`.
    pub fn new(program: Program, seed: u64) -> Sim {
        let mem = Arc::new(SimMemory::new());
        program.load(&mem);
        let backend = SimBackend::new(mem, program.boundaries.clone(), program.functions.clone());
        let registry = Registry::new(backend.clone());
        let cpus = program
            .threads
            .iter()
            .enumerate()
            .map(|(t, r)| Cpu::new(t as u32, *r))
            .collect();
        Sim {
            cpus,
            registry,
            backend,
            program: Arc::new(program),
            rng: Rng::new(seed),
            retirements: Vec::new(),
        }
    }

    /// The program.
    pub fn program(&self) -> &Arc<Program> {
        &self.program
    }
    /// The registry (clone it to keep it).
    pub fn registry(&self) -> &Registry<SimBackend> {
        &self.registry
    }
    /// The backend.
    pub fn backend(&self) -> &SimBackend {
        &self.backend
    }
    /// The memory.
    pub fn memory(&self) -> &Arc<SimMemory> {
        self.backend.memory()
    }
    /// The CPUs.
    pub fn cpus(&self) -> &[Cpu] {
        &self.cpus
    }
    /// Which CPUs still run.
    pub fn runnable(&self) -> Vec<usize> {
        (0..self.cpus.len())
            .filter(|&i| self.cpus[i].status() == Status::Running)
            .collect()
    }
    /// Whether any CPU holds a deferred step (then unregistering cannot wait here).
    pub fn any_pending(&self) -> bool {
        self.cpus.iter().any(Cpu::pending)
    }
    /// The thread of every retirement so far, in order.
    pub fn retirements(&self) -> &[u32] {
        &self.retirements
    }

    /// One micro-step of CPU `i`; `None` if it no longer runs.
    pub fn step(&mut self, i: usize) -> Option<Event> {
        let env = Env {
            backend: &self.backend,
            registry: Some(&self.registry),
        };
        let event = self.cpus.get_mut(i)?.step(&env)?;
        if event.retires() {
            self.retirements.push(i as u32);
        }
        Some(event)
    }

    /// One micro-step of a CPU the scheduler picks; `None` if none runs.
    pub fn tick(&mut self) -> Option<(usize, Event)> {
        let runnable = self.runnable();
        if runnable.is_empty() {
            return None;
        }
        let i = runnable[self.rng.below(runnable.len())];
        self.step(i).map(|e| (i, e))
    }

    /// Up to `ticks` scheduler ticks, reporting each.
    pub fn run(&mut self, ticks: usize, mut each: impl FnMut(usize, Event)) {
        for _ in 0..ticks {
            match self.tick() {
                Some((i, e)) => each(i, e),
                None => break,
            }
        }
    }

    /// Step every CPU that is in the middle of a probe until none is (each needs at
    /// most three micro-steps), reporting each step. Afterwards no CPU has a pending
    /// step, so unregistration waits normally.
    pub fn settle(&mut self, mut each: impl FnMut(usize, Event)) {
        for i in 0..self.cpus.len() {
            for _ in 0..4 {
                if !self.cpus[i].mid_probe() {
                    break;
                }
                match self.step(i) {
                    Some(e) => each(i, e),
                    None => break,
                }
            }
        }
    }

    /// The program-visible state.
    pub fn state(&self) -> MachineState {
        let mem = self.memory();
        let mut data = mem.snapshot(DATA);
        data.extend(mem.snapshot(STACK));
        MachineState {
            threads: self.cpus.iter().map(|c| (c.status(), *c.regs())).collect(),
            data,
        }
    }
}

/// The transparency oracle's reference: run `program` unprobed, retiring threads in
/// exactly the order `order` (a probed run's [`Sim::retirements`]). Fails if a thread
/// cannot retire when the order says it does (it already ended unprobed).
pub fn replay_unprobed(program: &Program, order: &[u32]) -> Result<MachineState, String> {
    let mut sim = Sim::new(program.clone(), 0);
    for (k, &t) in order.iter().enumerate() {
        let mut retired = false;
        // Unprobed, an instruction retires in one micro-step, a program `brk` in three.
        for _ in 0..3 {
            match sim.step(t as usize) {
                Some(e) if e.retires() => {
                    retired = true;
                    break;
                }
                Some(_) => {}
                None => break,
            }
        }
        if !retired {
            return Err(format!(
                "retirement {k}: thread {t} cannot retire unprobed (status {:?})",
                sim.cpus[t as usize].status()
            ));
        }
    }
    Ok(sim.state())
}
