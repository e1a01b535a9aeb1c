//! Return probes on the simulator, hand-written: entry/return pairs under recursion, a
//! longjmp-like escape, unregister between an entry and its return, a full return
//! stack, a bad address — each checked directly (the stats, the trace, the oracle), plus
//! proof that the model rejects a wrong return.

use std::sync::Arc;

use multiprobe_backend_sim::ctx::{self, Call, Ended, Hook};
use multiprobe_backend_sim::handlers::{Behavior, SimHandler};
use multiprobe_backend_sim::isa::Insn;
use multiprobe_backend_sim::memory::{SimMemory, CODE, RET_TRAMPOLINE};
use multiprobe_backend_sim::model::{Kind, Model};
use multiprobe_backend_sim::{replay_unprobed, Event, Program, Sim, Status};
use multiprobe_core::backend::RetOutcome;
use multiprobe_core::{Error, Gpr, HandlerId};

fn ret_handler() -> SimHandler {
    SimHandler::new(
        Behavior {
            ret: true,
            ..Behavior::OBSERVE
        },
        None,
    )
}

/// `main: rcx = depth; call f; halt` — `f: rcx -= 1; if rcx != 0 { call f }; ret`.
fn recursive(depth: i16) -> (Program, u64) {
    let f = CODE.start + 7;
    let p = Program::from_insns(
        &[
            Insn::Movi(Gpr::Rcx, depth),
            Insn::Call(1), // to f
            Insn::Halt,
            // f:
            Insn::Addi(Gpr::Rcx, -1),
            Insn::Jnz(Gpr::Rcx, 1), // over the ret
            Insn::Ret,
            Insn::Call(-9), // f again
            Insn::Ret,
        ],
        vec![Program::thread_regs(0, CODE.start)],
    );
    assert_eq!(p.functions.iter().copied().collect::<Vec<_>>(), [f]);
    (p, f)
}

/// Run thread 0 to its end, returning every event and the trace.
fn run(sim: &mut Sim) -> (Vec<Event>, Vec<Call>) {
    let mut events = Vec::new();
    while let Some(e) = sim.step(0) {
        events.push(e);
    }
    (events, ctx::take())
}

fn tokens_returned(trace: &[Call]) -> Vec<u64> {
    let mut out = Vec::new();
    let mut in_ret = false;
    for c in trace {
        match c {
            Call::Enter { hook, .. } => in_ret = *hook == Hook::Ret,
            Call::Data { value, .. } if in_ret => out.push(*value),
            _ => {}
        }
    }
    out
}

#[test]
fn recursion_pairs_every_entry_with_its_return_innermost_first() {
    let (p, f) = recursive(3);
    let mut sim = Sim::new(p, 0);
    let _ = ctx::take();
    let id = sim
        .registry()
        .register_handler(f, ret_handler())
        .unwrap()
        .into_id();
    let (events, trace) = run(&mut sim);
    let returns: Vec<_> = events
        .iter()
        .filter(|e| matches!(e, Event::Return { .. }))
        .collect();
    assert_eq!(returns.len(), 3);
    assert!(returns.iter().all(|e| matches!(
        e,
        Event::Return {
            outcome: RetOutcome::Returned,
            ..
        }
    )));
    // The pre-hooks left tokens 1, 2, 3 (outermost first); they come back 3, 2, 1.
    assert_eq!(tokens_returned(&trace), [3, 2, 1]);
    let s = sim.registry().stats(id).unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (3, 3, 0));
    assert_eq!(sim.cpus()[0].status(), Status::Halted);
    assert_eq!(sim.cpus()[0].returns_in_flight(), 0);
    let unprobed = replay_unprobed(sim.program(), sim.retirements()).unwrap();
    assert_eq!(
        sim.state(),
        unprobed,
        "byte for byte: the popped slots were put back"
    );
}

#[test]
fn a_full_return_stack_loses_the_deepest_returns_and_runs_the_program_unchanged() {
    // Twenty calls deep, one return handler: the CPU's return stack holds four.
    let (p, f) = recursive(20);
    let mut sim = Sim::new(p, 0);
    let id = sim
        .registry()
        .register_handler(f, ret_handler())
        .unwrap()
        .into_id();
    run(&mut sim);
    let s = sim.registry().stats(id).unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (20, 4, 16));
    let unprobed = replay_unprobed(sim.program(), sim.retirements()).unwrap();
    assert_eq!(sim.state(), unprobed);
}

/// `main: save rsp; call f; halt` — `f: call g; ret` — `g: rsp = saved - 8; ret`
/// (escapes from g straight out of f, skipping g's own return).
fn escaping() -> (Program, u64, u64) {
    let (f, g) = (CODE.start + 7, CODE.start + 10);
    let p = Program::from_insns(
        &[
            Insn::Store(Gpr::R14, Gpr::Rsp, 0x78),
            Insn::Call(1), // f
            Insn::Halt,
            // f:
            Insn::Call(1), // g
            Insn::Ret,
            // g:
            Insn::Load(Gpr::Rsp, Gpr::R14, 0x78),
            Insn::Addi(Gpr::Rsp, -8),
            Insn::Ret,
        ],
        vec![Program::thread_regs(0, CODE.start)],
    );
    (p, f, g)
}

#[test]
fn a_longjmp_like_escape_loses_the_skipped_call_and_returns_the_outer_one() {
    let (p, f, g) = escaping();
    let mut sim = Sim::new(p, 0);
    let hf = sim.registry().register_handler(f, ret_handler()).unwrap();
    let hg = sim.registry().register_handler(g, ret_handler()).unwrap();
    let (events, _) = run(&mut sim);
    assert_eq!(
        events
            .iter()
            .filter(|e| matches!(e, Event::Return { .. }))
            .count(),
        1,
        "g never returns; f's return comes through its slot"
    );
    let (sf, sg) = (hf.stats().unwrap(), hg.stats().unwrap());
    assert_eq!((sf.returns, sf.returns_lost), (1, 0));
    assert_eq!((sg.hits, sg.returns, sg.returns_lost), (1, 0, 1));
    assert_eq!(sim.cpus()[0].returns_in_flight(), 0, "nothing left behind");
    let unprobed = replay_unprobed(sim.program(), sim.retirements()).unwrap();
    // g's slot, below the stack now, still holds the trampoline address; nothing else
    // differs.
    assert!(sim.state().matches_unprobed(&unprobed));
    assert_ne!(sim.state(), unprobed);
}

#[test]
fn unregister_between_an_entry_and_its_return_runs_no_return_hook() {
    let (p, f) = recursive(1);
    let mut sim = Sim::new(p, 0);
    let h = sim.registry().register_handler(f, ret_handler()).unwrap();
    let _ = ctx::take();
    // Up to f's dispatch.
    while !matches!(sim.step(0), Some(Event::Dispatch { .. })) {}
    assert_eq!(sim.cpus()[0].returns_in_flight(), 1);
    let s = h.unregister().unwrap();
    assert_eq!((s.hits, s.returns, s.returns_lost), (1, 0, 0));
    let (events, trace) = run(&mut sim);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::Return {
            outcome: RetOutcome::Returned,
            ..
        }
    )));
    assert!(
        !trace.iter().any(|c| matches!(
            c,
            Call::Enter {
                hook: Hook::Ret,
                ..
            }
        )),
        "{trace:?}"
    );
    assert_eq!(sim.cpus()[0].status(), Status::Halted);
    let unprobed = replay_unprobed(sim.program(), sim.retirements()).unwrap();
    assert_eq!(sim.state(), unprobed);
}

#[test]
fn a_return_probe_inside_a_function_is_refused() {
    let (p, f) = recursive(1);
    let sim = Sim::new(p, 0);
    let err = sim
        .registry()
        .register_handler(f + 3, ret_handler())
        .unwrap_err();
    assert!(matches!(err, Error::NotFunctionEntry { addr, .. } if addr == f + 3));
    assert!(err.to_string().contains(&format!("{f:#x}")), "{err}");
    assert!(sim.registry().is_empty());
}

#[test]
fn the_model_rejects_a_return_hook_it_does_not_expect() {
    let (p, f) = recursive(1);
    let program = Arc::new(p);
    let mut m = Model::new(Arc::clone(&program), 1);
    let kind = Kind {
        ret: true,
        ..Kind::default()
    };
    m.register(f, &kind, &Ok(HandlerId(1))).unwrap();
    let mem = SimMemory::new();
    program.load(&mem);
    let sp = 0x3100;
    mem.set_byte(sp, 0); // a readable, writable slot
    let entry = [
        Call::Enter {
            id: HandlerId(1),
            hook: Hook::Pre,
            tid: 0,
            addr: f,
            post: false,
        },
        Call::Data {
            id: HandlerId(1),
            value: 7,
            skipped: false,
        },
        Call::Exit {
            id: HandlerId(1),
            hook: Hook::Pre,
            ended: Ended::Normal,
        },
    ];
    let dispatch = Event::Dispatch {
        addr: f,
        sp,
        outcome: multiprobe_backend_sim::Dispatched::Step { post: false },
    };
    m.on_event(0, &dispatch, &entry, &mem).unwrap();
    assert_eq!(m.returns_in_flight(0), 1);
    let ret = |value| {
        vec![
            Call::Enter {
                id: HandlerId(1),
                hook: Hook::Ret,
                tid: 0,
                addr: f,
                post: false,
            },
            Call::Data {
                id: HandlerId(1),
                value,
                skipped: false,
            },
            Call::Exit {
                id: HandlerId(1),
                hook: Hook::Ret,
                ended: Ended::Normal,
            },
        ]
    };
    let back = Event::Return {
        rsp: sp + 8,
        outcome: RetOutcome::Returned,
    };
    // The wrong call data, no hook at all, a wrong outcome: all refused.
    assert!(m.clone().on_event(0, &back, &ret(8), &mem).is_err());
    assert!(m.clone().on_event(0, &back, &[], &mem).is_err());
    let unknown = Event::Return {
        rsp: sp + 8,
        outcome: RetOutcome::Unknown,
    };
    assert!(m.clone().on_event(0, &unknown, &ret(7), &mem).is_err());
    // Unregistered in between: the hook must not run.
    let mut gone = m.clone();
    gone.unregister(HandlerId(1), &Ok(gone.stats(HandlerId(1)).unwrap()))
        .unwrap();
    assert!(gone.clone().on_event(0, &back, &ret(7), &mem).is_err());
    gone.on_event(0, &back, &[], &mem).unwrap();
    // And the right one passes, and counts.
    m.on_event(0, &back, &ret(7), &mem).unwrap();
    let s = m.stats(HandlerId(1)).unwrap();
    assert_eq!((s.hits, s.returns), (1, 1));
    assert_eq!(RET_TRAMPOLINE, CODE.end - 16);
}
