//! The lockstep driver: operations and micro-steps applied to a [`Sim`] and to the
//! [`Model`], checked after each, then the oracle and the final restore (see the
//! parent module's docs).

use std::sync::Arc;

use multiprobe_core::{HandlerId, Options, Registration, Registry, Request};

use super::input::*;
use crate::backend::SimBackend;
use crate::cpu::Event;
use crate::ctx;
use crate::handlers::{Behavior, Inside, PreMode, SimHandler, Target};
use crate::machine::{replay_unprobed, Sim};
use crate::memory::{CODE, DATA};
use crate::model::{ErrKind, Kind, Model};
use crate::program::Program;

struct Driver {
    // Guards first: they unregister when dropped, before the machine goes.
    guards: Vec<(HandlerId, Registration<SimBackend>)>,
    sim: Sim,
    model: Model,
    issued: Vec<HandlerId>,
    cov: Coverage,
}

impl Driver {
    fn new(program: Program, seed: u64) -> Driver {
        let _ = ctx::take();
        let cpus = program.threads.len();
        let sim = Sim::new(program, seed);
        let model = Model::new(Arc::clone(sim.program()), cpus);
        Driver {
            guards: Vec::new(),
            sim,
            model,
            issued: Vec::new(),
            cov: Coverage::default(),
        }
    }

    fn registry(&self) -> &Registry<SimBackend> {
        self.sim.registry()
    }

    fn addr(&self, s: SiteSel) -> u64 {
        let b = &self.sim.program().boundaries;
        let code = self.sim.program().code_range();
        match s.0 {
            0..=239 => *b
                .iter()
                .nth(usize::from(s.0) % b.len())
                .expect("programs are not empty"),
            240 => 0,
            241 => DATA.start + 8,
            242 => code.start + 1,
            243 => code.end,
            244 => CODE.end + 0x100,
            n => code.start + u64::from(n) % (code.end - code.start),
        }
    }

    fn id(&self, h: HandleSel) -> HandlerId {
        let n = usize::from(h.0) % (self.issued.len() + 1);
        self.issued.get(n).copied().unwrap_or(HandlerId(1 << 40))
    }

    fn handler(&self, reg: &Reg) -> (u64, Kind, SimHandler) {
        let s = &reg.handler;
        let ret = s.flags & 0x10 != 0;
        let functions = &self.sim.program().functions;
        // Return probes mostly where they may go; sometimes anywhere (an error).
        let addr = match functions
            .iter()
            .nth(usize::from(reg.site.0) % functions.len().max(1))
        {
            Some(&f) if ret && reg.site.0 < 200 => f,
            _ => self.addr(reg.site),
        };
        let behavior = Behavior {
            ret,
            skip_odd_returns: s.flags & 0x20 != 0,
            post: s.flags & 1 != 0,
            pre: match s.pre {
                0..=143 => PreMode::Observe,
                144..=159 => PreMode::Remove,
                160..=199 => PreMode::Emulate,
                200..=247 => PreMode::EmulateSilently,
                _ => PreMode::Skip,
            },
            handle_faults: s.flags & 0x0e == 0x0e,
            panic_every: if s.panic >= 200 { 1 + s.panic % 4 } else { 0 },
            nested: (s.nested.0 >= 216).then(|| self.addr(s.nested.1)),
            inside: match s.unregister.0 {
                232..=243 if s.unregister.1 .0.is_multiple_of(2) => {
                    Some(Inside::Unregister(Target::Itself))
                }
                232..=243 => Some(Inside::Unregister(Target::Other(self.id(s.unregister.1)))),
                244..=255 => Some(Inside::SetEnabled(
                    self.id(s.unregister.1),
                    s.unregister.0 >= 250,
                )),
                _ => None,
            },
        };
        let insn = self.sim.program().insn_at(addr);
        let kind = Kind {
            post: behavior.post,
            ret,
            exclusive: reg.exclusive,
            disabled: reg.disabled,
        };
        (addr, kind, SimHandler::new(behavior, insn))
    }

    fn issue(&mut self, id: HandlerId) {
        self.issued.push(id);
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        let was_pending = self.sim.any_pending();
        let before = self.cov.ops_ok + self.cov.ops_err;
        match op {
            Op::Register(reg) => {
                let (addr, kind, h) = self.handler(reg);
                let opts = Options {
                    exclusive: reg.exclusive,
                    disabled: reg.disabled,
                };
                let real = self.registry().register_handler_with(addr, h, opts);
                let real_id = real.as_ref().map(Registration::id).map_err(ErrKind::of);
                self.tally(real_id.is_ok());
                self.model.register(addr, &kind, &real_id)?;
                if let Ok(g) = real {
                    self.issue(g.id());
                    self.guards.push((g.id(), g));
                }
            }
            Op::RegisterBatch(regs) => {
                let mut items = Vec::new();
                let mut reqs = Vec::new();
                for reg in regs.iter().take(MAX_BATCH) {
                    let (addr, kind, h) = self.handler(reg);
                    items.push((addr, kind));
                    reqs.push(Request::handler(addr, h).options(Options {
                        exclusive: reg.exclusive,
                        disabled: reg.disabled,
                    }));
                }
                let real = self.registry().register_batch(reqs);
                let ids = real
                    .as_ref()
                    .map(|v| v.iter().map(Registration::id).collect::<Vec<_>>())
                    .map_err(ErrKind::of);
                self.tally(ids.is_ok());
                self.model.register_batch(&items, &ids)?;
                if let Ok(gs) = real {
                    for g in gs {
                        self.issue(g.id());
                        self.guards.push((g.id(), g));
                    }
                }
            }
            Op::Unregister(h) => {
                let id = self.id(*h);
                let real = self.registry().unregister(id).map_err(|e| ErrKind::of(&e));
                self.tally(real.is_ok());
                self.note_inside(&real);
                self.forget_guard(id);
                self.model.unregister(id, &real)?;
            }
            Op::UnregisterBatch(hs) => {
                let ids: Vec<HandlerId> = hs.iter().take(MAX_BATCH).map(|h| self.id(*h)).collect();
                let real = self
                    .registry()
                    .unregister_batch(&ids)
                    .map_err(|e| ErrKind::of(&e));
                self.tally(real.is_ok());
                self.note_inside(&real);
                if !matches!(real, Err(ErrKind::Unknown(_))) {
                    for &id in &ids {
                        self.forget_guard(id);
                    }
                }
                self.model.unregister_batch(&ids, &real)?;
            }
            Op::Enable(h) | Op::Disable(h) => {
                let on = matches!(op, Op::Enable(_));
                let id = self.id(*h);
                let real = if on {
                    self.registry().enable(id)
                } else {
                    self.registry().disable(id)
                }
                .map_err(|e| ErrKind::of(&e));
                self.tally(real.is_ok());
                self.model.set(id, on, &real)?;
            }
            Op::Run(n) => {
                for _ in 0..*n {
                    self.note_slots();
                    let Some((i, e)) = self.sim.tick() else { break };
                    self.observe(i, &e)?;
                }
            }
            Op::Step(n) => self.step(usize::from(*n))?,
            Op::Inject(s, what, on) => {
                let addr = self.addr(*s);
                self.sim.backend().inject(*what, addr, *on);
                self.model.inject(*what, addr, *on);
            }
            Op::DropGuard(h) => {
                // A guard's drop is `remove` without waiting and without a result: the
                // model's `unregister` minus the answer.
                let id = self.id(*h);
                if let Some(pos) = self.guards.iter().position(|(g, _)| *g == id) {
                    let (_, guard) = self.guards.remove(pos);
                    drop(guard);
                    self.model.unregister_silently(id);
                }
            }
        }
        if was_pending && self.cov.ops_ok + self.cov.ops_err > before {
            self.cov.changed_while_pending += 1;
        }
        self.check()
    }

    fn tally(&mut self, ok: bool) {
        if ok {
            self.cov.ops_ok += 1;
        } else {
            self.cov.ops_err += 1;
        }
    }

    fn note_inside<T>(&mut self, r: &Result<T, ErrKind>) {
        if matches!(r, Err(ErrKind::InsideDispatch(_))) {
            self.cov.inside_dispatch += 1;
        }
    }

    /// The guard of a handler unregistered by id must not unregister again on drop.
    fn forget_guard(&mut self, id: HandlerId) {
        if let Some(pos) = self.guards.iter().position(|(g, _)| *g == id) {
            let (_, g) = self.guards.remove(pos);
            let _ = g.into_id();
        }
    }

    fn step(&mut self, n: usize) -> Result<(), String> {
        let runnable = self.sim.runnable();
        if runnable.is_empty() {
            return Ok(());
        }
        let i = runnable[n % runnable.len()];
        self.note_slots();
        if let Some(e) = self.sim.step(i) {
            self.observe(i, &e)?;
        }
        Ok(())
    }

    /// Tell the model what each CPU's stack slot holds before the next micro-step: an
    /// entry's dispatch then knows what the core read there before arming it.
    fn note_slots(&mut self) {
        let mem: &dyn multiprobe_core::Memory = &**self.sim.memory();
        for (i, c) in self.sim.cpus().iter().enumerate() {
            let sp = c.regs().rsp;
            self.model.before_step(i, sp, mem.read_u64(sp).ok());
        }
    }

    fn observe(&mut self, cpu: usize, e: &Event) -> Result<(), String> {
        let calls = ctx::take();
        match e {
            Event::Dispatch { outcome, .. } => match outcome {
                crate::cpu::Dispatched::NotOurs { reexecute: true } => self.cov.reexecuted += 1,
                crate::cpu::Dispatched::Redirect => {
                    self.cov.redirects += 1;
                    self.cov.dispatches += 1;
                }
                crate::cpu::Dispatched::Step { .. } => self.cov.dispatches += 1,
                _ => {}
            },
            Event::PostTrap { .. } => self.cov.posts += 1,
            Event::SlotExec { result: Err(_), .. } => self.cov.slot_faults += 1,
            _ => {}
        }
        self.cov.inside_dispatch += calls
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    ctx::Call::Unregistered {
                        result: Err(ErrKind::InsideDispatch(_)),
                        ..
                    }
                )
            })
            .count() as u32;
        self.cov.set_enabled_inside += calls
            .iter()
            .filter(|c| matches!(c, ctx::Call::SetEnabled { result: Ok(()), .. }))
            .count() as u32;
        self.cov.removals += calls
            .iter()
            .filter(|c| {
                matches!(
                    c,
                    ctx::Call::Exit {
                        ended: ctx::Ended::Remove,
                        ..
                    }
                )
            })
            .count() as u32;
        self.model
            .on_event(cpu, e, &calls, self.sim.memory())
            .map_err(|m| format!("{m}\n  (micro-step {e:?} of cpu {cpu})"))?;
        if self.sim.cpus()[cpu].status() != crate::cpu::Status::Running {
            self.model.thread_ended(cpu);
        }
        self.check_returns(cpu)
    }

    /// The calls in flight of `cpu`, as the core and the model see them.
    fn check_returns(&self, cpu: usize) -> Result<(), String> {
        let (real, want) = (
            self.sim.cpus()[cpu].returns_in_flight(),
            self.model.returns_in_flight(cpu),
        );
        if real != want {
            return Err(format!(
                "cpu {cpu} has {real} calls in flight, the model {want}"
            ));
        }
        Ok(())
    }

    /// Registry state, stats and memory against the model.
    fn check(&self) -> Result<(), String> {
        let r = self.registry();
        let real: Vec<_> = r
            .handlers()
            .into_iter()
            .map(|h| (h.id, h.addr, h.enabled, h.exclusive, h.stats))
            .collect();
        let want: Vec<_> = self
            .model
            .handlers()
            .into_iter()
            .map(|h| (h.id, h.addr, h.enabled, h.exclusive, h.stats))
            .collect();
        if real != want {
            return Err(format!("handlers: core {real:?}\n  model {want:?}"));
        }
        if r.len() != want.len() {
            return Err(format!("len() = {}, model {}", r.len(), want.len()));
        }
        let live = self.model.ids();
        for id in self.issued.iter().filter(|id| !live.contains(id)) {
            if !matches!(r.stats(*id), Err(multiprobe_core::Error::UnknownHandler(_))) {
                return Err(format!(
                    "stats({id}) of an unregistered handler: {:?}",
                    r.stats(*id)
                ));
            }
        }
        for h in self.model.handlers() {
            let e = r.is_enabled(h.id).map_err(|e| e.to_string())?;
            if e != h.enabled {
                return Err(format!("is_enabled({}) = {e}, model {}", h.id, h.enabled));
            }
        }
        let real: Vec<_> = r
            .sites()
            .into_iter()
            .map(|s| (s.addr, s.hits, s.handlers, s.enabled, s.armed))
            .collect();
        let want: Vec<_> = self
            .model
            .sites()
            .into_iter()
            .map(|s| (s.addr, s.hits, s.handlers, s.enabled, s.armed))
            .collect();
        if real != want {
            return Err(format!("sites: core {real:?}\n  model {want:?}"));
        }
        // The program's code; the rest of the region is checked at the end (no probe
        // can be armed there: nothing starts an instruction).
        let range = self.sim.program().code_range();
        let real = self.sim.memory().snapshot(range.clone());
        let want = self.model.code();
        if let Some(i) = (0..real.len()).find(|&i| real[i] != want[i]) {
            return Err(format!(
                "code byte at {:#x} is {:#04x}, model {:#04x}",
                range.start + i as u64,
                real[i],
                want[i]
            ));
        }
        Ok(())
    }

    fn finish(mut self) -> Result<Coverage, String> {
        // Run every CPU out of its pending steps, through the model.
        let mut err = None;
        {
            let Driver {
                sim, model, cov, ..
            } = &mut self;
            let mem = Arc::clone(sim.memory());
            let mut ended = Vec::new();
            sim.settle(|i, e| {
                let calls = ctx::take();
                if let Event::PostTrap { .. } = e {
                    cov.posts += 1;
                }
                if err.is_none() {
                    err = model.on_event(i, &e, &calls, &mem).err();
                }
                ended.push(i);
            });
            for i in ended {
                if sim.cpus()[i].status() != crate::cpu::Status::Running {
                    model.thread_ended(i);
                }
            }
        }
        if let Some(e) = err {
            return Err(format!("{e}\n  (settling)"));
        }
        self.check()?;
        if self.sim.any_pending() || self.model.held() {
            return Err("a deferred step survived settling".into());
        }
        self.cov.retired = self.sim.retirements().len() as u32;
        self.cov.returns = self.model.returns_seen;
        self.cov.returns_lost = self.model.lost_seen;
        // A program that read a swapped return address off its stack may diverge (as it
        // would on real hardware); one whose handlers changed it does on purpose.
        if !self.model.program_changed && !self.sim.memory().saw_trampoline() {
            let want = replay_unprobed(self.sim.program(), self.sim.retirements())
                .map_err(|e| format!("transparency: {e}"))?;
            let got = self.sim.state();
            if !got.matches_unprobed(&want) {
                return Err(transparency_diff(&got, &want));
            }
            self.cov.oracle = true;
        }
        // Removals a settling hit (or a handler) asked for and no later operation
        // collected: finish them (`Registry::collect`, as the model's next operation
        // would), so that their ids are gone before the final unregister, as every
        // registry operation would find (main's 04d6c53 did this; merged here).
        let collected = self
            .registry()
            .collect()
            .map_err(|e| format!("collect: {e}"))?;
        let predicted = self.model.collect_now();
        if collected != predicted {
            return Err(format!(
                "collect removed {collected} handlers, the model {predicted}"
            ));
        }
        self.check()?;
        // Unregistering everything now waits for its grace period and succeeds.
        self.sim.backend().clear_injections();
        self.model.clear_injections();
        let ids = self.model.ids();
        let real = self
            .registry()
            .unregister_batch(&ids)
            .map_err(|e| ErrKind::of(&e));
        for &id in &ids {
            self.forget_guard(id);
        }
        self.model.unregister_batch(&ids, &real)?;
        if let Err(e) = real {
            return Err(format!("final unregister_batch failed: {e:?}"));
        }
        self.check()?;
        self.registry()
            .synchronize()
            .map_err(|e| format!("synchronize: {e}"))?;
        let program = Arc::clone(self.sim.program());
        let backend = self.sim.backend().clone();
        let cov = self.cov;
        drop(self);
        let mem = backend.memory();
        for a in CODE {
            if mem.byte(a) != program.byte(a) {
                return Err(format!("after the registry was dropped, code byte at {a:#x} is {:#04x}, the program's is {:#04x}", mem.byte(a), program.byte(a)));
            }
        }
        let c = backend.counts();
        if c.prepared != c.released || c.armed != c.disarmed {
            return Err(format!("after the registry was dropped: {c:?}"));
        }
        Ok(cov)
    }
}

fn transparency_diff(
    got: &crate::machine::MachineState,
    want: &crate::machine::MachineState,
) -> String {
    for (t, (g, w)) in got.threads.iter().zip(&want.threads).enumerate() {
        if g != w {
            return format!("transparency: thread {t} probed {g:?}\n  unprobed {w:?}");
        }
    }
    let at = got.data.iter().zip(&want.data).position(|(a, b)| a != b);
    format!("transparency: data differs at offset {at:?}")
}

/// Run an [`OpsCase`]; `Err` describes the first divergence.
pub fn run_ops(case: &OpsCase) -> Result<Coverage, String> {
    let program = Program::generate(&case.program);
    let mut d = Driver::new(program, case.seed);
    for (k, op) in case.ops.iter().take(MAX_OPS).enumerate() {
        d.apply(op).map_err(|e| format!("op {k} {op:?}: {e}"))?;
    }
    d.finish()
}

/// Run a [`ProtocolCase`]; `Err` describes the first divergence.
pub fn run_protocol(case: &ProtocolCase) -> Result<Coverage, String> {
    let mut spec = case.program.clone();
    if spec
        .threads
        .is_multiple_of(crate::program::MAX_THREADS as u8)
    {
        spec.threads = spec.threads.wrapping_add(1);
    }
    let program = Program::generate(&spec);
    let mut d = Driver::new(program, 0);
    for (k, slice) in case.script.iter().take(4 * MAX_OPS).enumerate() {
        for _ in 0..1 + slice.steps % 4 {
            d.step(usize::from(slice.cpu))
                .map_err(|e| format!("slice {k} {slice:?}: {e}"))?;
        }
        if let Some(op) = &slice.op {
            d.apply(op).map_err(|e| format!("slice {k} {op:?}: {e}"))?;
        }
    }
    d.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::program::{Op as P, ProgramSpec};

    fn spec() -> ProgramSpec {
        ProgramSpec {
            // One thread, three iterations.
            threads: 0,
            iterations: 2,
            functions: vec![vec![P::Addi(0, 1), P::StoreShared(1, 0), P::Nop]],
            calls: vec![0],
        }
    }

    fn reg(site: u8, post: bool) -> Reg {
        Reg {
            site: SiteSel(site),
            handler: HandlerSpec {
                flags: u8::from(post),
                pre: 0,
                panic: 0,
                nested: (0, SiteSel(0)),
                unregister: (0, HandleSel(0)),
            },
            exclusive: false,
            disabled: false,
        }
    }

    #[test]
    fn a_probe_in_a_called_function_dispatches_and_posts() {
        // Boundaries: main = movi, call, addi, jnz, halt (0..=4); the function = 5.. .
        let case = OpsCase {
            program: spec(),
            seed: 1,
            ops: vec![
                Op::Register(reg(5, true)),
                Op::Register(reg(6, false)),
                Op::Run(200),
            ],
        };
        let c = run_ops(&case).unwrap();
        assert_eq!(c.dispatches, 3 * 2, "{c:?}");
        assert_eq!(c.posts, 3, "{c:?}");
        assert!(c.oracle);
    }
}
