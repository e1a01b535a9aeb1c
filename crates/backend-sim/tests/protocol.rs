//! Hand-written runs of the simulator through the situations the fuzz targets are meant
//! to reach, each checked directly (not through the model), plus proof that the model
//! and the oracle can fail.

use std::sync::Arc;

use multiprobe_backend_sim::ctx::{self, Call, Ended, Hook};
use multiprobe_backend_sim::handlers::{quiet_injected_panics, Behavior, PreMode, SimHandler};
use multiprobe_backend_sim::isa::{Insn, BRK, FPE_INTDIV, SIGFPE};
use multiprobe_backend_sim::memory::{SimMemory, CODE, STACK, STACK_SIZE};
use multiprobe_backend_sim::model::{ErrKind, Kind, Model};
use multiprobe_backend_sim::{replay_unprobed, Dispatched, Event, Injection, Program, Sim, Status};
use multiprobe_core::{Error, Gpr, HandlerId};

const A: u64 = CODE.start; // the first instruction
/// The thread's stack pointer (nothing in these programs moves it).
const SP: u64 = STACK.start + STACK_SIZE;

/// `addi rax, 1; div rbx, rcx; addi rax, 2; halt` for one thread; `rcx` is `divisor`.
fn program(divisor: u64) -> Program {
    let mut regs = Program::thread_regs(0, A);
    regs.rcx = divisor;
    Program::from_insns(
        &[
            Insn::Addi(Gpr::Rax, 1),
            Insn::Div(Gpr::Rbx, Gpr::Rcx),
            Insn::Addi(Gpr::Rax, 2),
            Insn::Halt,
        ],
        vec![regs],
    )
}

fn observe(post: bool) -> SimHandler {
    SimHandler::new(
        Behavior {
            post,
            ..Behavior::OBSERVE
        },
        None,
    )
}

fn step(sim: &mut Sim) -> Event {
    sim.step(0).expect("the thread runs")
}

/// A [`Sim`] of `program(3)` with an [`observe`] handler at `A`, and its id.
fn observed(post: bool) -> (Sim, HandlerId) {
    let sim = Sim::new(program(3), 0);
    let id = sim
        .registry()
        .register_handler(A, observe(post))
        .unwrap()
        .into_id();
    (sim, id)
}

/// The next two steps: the trap at `A`, then its dispatch, a step offered a post (`why`
/// says what that shows).
fn trap_then_step_with_post(sim: &mut Sim, why: &str) {
    assert_eq!(step(sim), Event::RaiseTrap { addr: A });
    assert_eq!(
        step(sim),
        Event::Dispatch {
            addr: A,
            sp: SP,
            outcome: Dispatched::Step { post: true }
        },
        "{why}"
    );
}

#[test]
fn a_trap_at_a_just_removed_breakpoint_reexecutes_the_restored_instruction() {
    let (mut sim, id) = observed(false);
    assert_eq!(sim.memory().byte(A), BRK);
    assert_eq!(step(&mut sim), Event::RaiseTrap { addr: A });
    // The probe goes between the trap and its dispatch (no deferred step: waits fine).
    sim.registry().unregister(id).unwrap();
    assert_eq!(
        sim.memory().byte(A),
        program(3).code[0],
        "original byte restored"
    );
    assert_eq!(
        step(&mut sim),
        Event::Dispatch {
            addr: A,
            sp: SP,
            outcome: Dispatched::NotOurs { reexecute: true }
        }
    );
    assert!(matches!(
        step(&mut sim),
        Event::Exec {
            addr: A,
            result: Ok(_)
        }
    ));
    assert_eq!(
        sim.cpus()[0].regs().rax,
        program(3).threads[0].rax + 1,
        "executed once"
    );
    assert!(ctx::take().is_empty(), "no handler ran");
}

#[test]
fn a_faulting_displaced_instruction_faults_as_if_unprobed_after_the_fault_handlers() {
    let div = A + 3;
    let mut sim = Sim::new(program(0), 0);
    let id = sim
        .registry()
        .register_handler(div, observe(true))
        .unwrap()
        .into_id();
    let _ = ctx::take();
    while sim.step(0).is_some() {}
    let trace = ctx::take();
    assert!(trace.contains(&Call::Enter {
        id,
        hook: Hook::Fault,
        tid: 0,
        addr: div,
        post: true
    }));
    assert!(!trace.iter().any(|c| matches!(
        c,
        Call::Enter {
            hook: Hook::Post,
            ..
        }
    )));
    let fault = match sim.cpus()[0].status() {
        Status::Faulted { fault, rip } => {
            assert_eq!(rip, div);
            fault
        }
        s => panic!("{s:?}"),
    };
    assert_eq!(
        (fault.signal, fault.code, fault.addr),
        (SIGFPE, FPE_INTDIV, div)
    );
    let unprobed = replay_unprobed(sim.program(), sim.retirements()).unwrap();
    assert_eq!(sim.state(), unprobed);
    assert!(!sim.any_pending(), "the fault ended the deferred step");
}

#[test]
fn a_failed_arm_fails_the_registration_and_leaves_memory_alone() {
    let sim = Sim::new(program(3), 0);
    sim.backend().inject(Injection::Arm, A, true);
    let r = sim.registry().register_handler(A, observe(false));
    assert!(matches!(r, Err(Error::PermissionDenied(_))), "{r:?}");
    assert_eq!(sim.memory().byte(A), program(3).code[0]);
    assert!(sim.registry().sites().is_empty() && sim.registry().is_empty());
}

#[test]
fn a_panicking_handler_is_counted_and_the_others_still_run() {
    quiet_injected_panics();
    let mut sim = Sim::new(program(3), 0);
    let loud = SimHandler::new(
        Behavior {
            panic_every: 1,
            ..Behavior::OBSERVE
        },
        None,
    );
    let a = sim.registry().register_handler(A, loud).unwrap().into_id();
    let b = sim
        .registry()
        .register_handler(A, observe(false))
        .unwrap()
        .into_id();
    while sim.step(0).is_some() {}
    let r = sim.registry();
    assert_eq!(
        (r.stats(a).unwrap().hits, r.stats(a).unwrap().panics),
        (1, 1)
    );
    assert_eq!(
        (r.stats(b).unwrap().hits, r.stats(b).unwrap().panics),
        (1, 0)
    );
    assert_eq!(sim.cpus()[0].status(), Status::Halted);
}

#[test]
fn a_pending_post_makes_unregister_on_its_thread_return_inside_dispatch_and_still_runs() {
    let (mut sim, id) = observed(true);
    let _ = ctx::take();
    trap_then_step_with_post(&mut sim, "a step offered a post");
    assert!(sim.any_pending());
    // The deferred step holds a read section on this OS thread: waiting would deadlock.
    let r = sim.registry().unregister(id);
    assert!(
        matches!(r, Err(Error::InsideDispatch(i)) if i == id),
        "{r:?}"
    );
    assert_eq!(
        sim.memory().byte(A),
        program(3).code[0],
        "unlinked and disarmed at once"
    );
    assert!(matches!(
        step(&mut sim),
        Event::SlotExec {
            addr: A,
            result: Ok(_)
        }
    ));
    assert_eq!(step(&mut sim), Event::PostTrap { addr: A, ran: true });
    let posts: Vec<_> = ctx::take()
        .into_iter()
        .filter(|c| {
            matches!(
                c,
                Call::Enter {
                    hook: Hook::Post,
                    ..
                }
            )
        })
        .collect();
    assert_eq!(
        posts.len(),
        1,
        "the snapshot's post still runs (documented escape of rule 3)"
    );
    assert!(!sim.any_pending());
    sim.registry()
        .synchronize()
        .expect("nothing pending: waits and succeeds");
}

/// A handler that removes itself during a hit whose post is deferred: its post does not
/// run, it is never called again, and the CPU's collection (thread context, before the
/// instruction even runs out of line) forgets it and restores the byte.
#[test]
fn a_handler_that_removes_itself_loses_its_post_and_its_breakpoint() {
    // A loop over `addi rax, 1`, so the probe would be hit again.
    let mut regs = Program::thread_regs(0, A);
    regs.rcx = 3;
    let program = Program::from_insns(
        &[
            Insn::Addi(Gpr::Rax, 1),
            Insn::Addi(Gpr::Rcx, -1),
            Insn::Jnz(Gpr::Rcx, -9), // back to A (relative to the next instruction)
            Insn::Halt,
        ],
        vec![regs],
    );
    let original = program.code[0];
    let mut sim = Sim::new(program, 0);
    let once = SimHandler::new(
        Behavior {
            post: true,
            pre: PreMode::Remove,
            ..Behavior::OBSERVE
        },
        None,
    );
    let id = sim.registry().register_handler(A, once).unwrap().into_id();
    let _ = ctx::take();
    trap_then_step_with_post(&mut sim, "a step offered a post");
    assert!(
        sim.any_pending(),
        "the step is deferred for the post it was offered"
    );
    assert!(sim.registry().is_empty(), "collected within the dispatch");
    assert_eq!(sim.memory().byte(A), original, "disarmed");
    while sim.step(0).is_some() {}
    let hooks: Vec<Hook> = ctx::take()
        .into_iter()
        .filter_map(|c| match c {
            Call::Enter { id: i, hook, .. } if i == id => Some(hook),
            _ => None,
        })
        .collect();
    assert_eq!(
        hooks,
        [Hook::Pre],
        "one pre, and neither its post nor a later hit"
    );
    assert_eq!(sim.cpus()[0].regs().rax, sim.program().threads[0].rax + 3);
    assert_eq!(
        sim.state(),
        replay_unprobed(sim.program(), sim.retirements()).unwrap()
    );
    assert!(!sim.any_pending());
    assert!(matches!(
        sim.registry().unregister(id),
        Err(Error::UnknownHandler(_))
    ));
}

#[test]
fn the_oracle_sees_a_handler_that_changes_the_program() {
    let mut sim = Sim::new(program(3), 0);
    let skip = SimHandler::new(
        Behavior {
            pre: PreMode::Skip,
            ..Behavior::OBSERVE
        },
        Some(Insn::Addi(Gpr::Rax, 1)),
    );
    sim.registry().register_handler(A, skip).unwrap().into_id();
    while sim.step(0).is_some() {}
    let unprobed = replay_unprobed(sim.program(), sim.retirements()).unwrap();
    assert_ne!(sim.state(), unprobed, "skipping `addi rax, 1` must show");
    // An emulating handler redirects too, and the oracle finds nothing.
    let mut sim = Sim::new(program(3), 0);
    let emulate = SimHandler::new(
        Behavior {
            pre: PreMode::Emulate,
            ..Behavior::OBSERVE
        },
        Some(Insn::Addi(Gpr::Rax, 1)),
    );
    sim.registry()
        .register_handler(A, emulate)
        .unwrap()
        .into_id();
    while sim.step(0).is_some() {}
    assert_eq!(
        sim.state(),
        replay_unprobed(sim.program(), sim.retirements()).unwrap()
    );
}

#[test]
fn the_model_rejects_a_wrong_trace_and_a_wrong_answer() {
    let program = Arc::new(program(3));
    let mut m = Model::new(Arc::clone(&program), 1);
    let mem = SimMemory::new();
    m.register(A, &Kind::default(), &Ok(HandlerId(1))).unwrap();
    m.register(A, &Kind::default(), &Ok(HandlerId(2))).unwrap();
    let hook = |id, ended| {
        [
            Call::Enter {
                id: HandlerId(id),
                hook: Hook::Pre,
                tid: 0,
                addr: A,
                post: false,
            },
            Call::Exit {
                id: HandlerId(id),
                hook: Hook::Pre,
                ended,
            },
        ]
    };
    let dispatch = Event::Dispatch {
        addr: A,
        sp: SP,
        outcome: Dispatched::Step { post: false },
    };
    // Newest first (Linux's order) is not ours.
    let mut wrong = m.clone();
    let trace: Vec<Call> = hook(2, Ended::Normal)
        .into_iter()
        .chain(hook(1, Ended::Normal))
        .collect();
    assert!(wrong.on_event(0, &dispatch, &trace, &mem).is_err());
    // A redirect must end the walk.
    let mut wrong = m.clone();
    let trace: Vec<Call> = hook(1, Ended::Redirect)
        .into_iter()
        .chain(hook(2, Ended::Normal))
        .collect();
    let redirect = Event::Dispatch {
        addr: A,
        sp: SP,
        outcome: Dispatched::Redirect,
    };
    assert!(wrong.on_event(0, &redirect, &trace, &mem).is_err());
    // The right trace passes, and counts.
    let trace: Vec<Call> = hook(1, Ended::Normal)
        .into_iter()
        .chain(hook(2, Ended::Normal))
        .collect();
    m.on_event(0, &dispatch, &trace, &mem).unwrap();
    assert_eq!(m.stats(HandlerId(1)).unwrap().hits, 1);
    // An exclusive registration next to others is refused, both ways.
    let excl = Kind {
        exclusive: true,
        ..Kind::default()
    };
    assert!(m.register(A, &excl, &Ok(HandlerId(3))).is_err());
    let refused = Err(ErrKind::Exclusive {
        holder: HandlerId(1),
        holder_exclusive: false,
    });
    m.register(A, &excl, &refused).unwrap();
    // Unregistering the last enabled handler disarms: the model's code shows it.
    m.unregister(HandlerId(1), &Ok(m.stats(HandlerId(1)).unwrap()))
        .unwrap();
    assert_eq!(m.code()[0], BRK);
    m.unregister(HandlerId(2), &Ok(m.stats(HandlerId(2)).unwrap()))
        .unwrap();
    assert_eq!(m.code(), program.code);
}

/// Enabling or disabling from inside a pre-handler changes later hits, not the walk in
/// progress (it walks the view it started with), and answers at once (no grace period
/// is waited for).
#[test]
fn enable_and_disable_from_inside_a_handler_take_effect_after_the_walk() {
    use multiprobe_backend_sim::handlers::Inside;
    use multiprobe_core::Options;
    let toggler = |target, on| {
        SimHandler::new(
            Behavior {
                inside: Some(Inside::SetEnabled(target, on)),
                ..Behavior::OBSERVE
            },
            None,
        )
    };
    // `late` is disabled; `x`, walking before it, enables it: not in this walk.
    let mut sim = Sim::new(program(3), 0);
    let r = sim.registry().clone();
    let early = r.register_handler(A, observe(false)).unwrap().into_id();
    let late = r
        .register_handler_with(A, observe(false), Options::default().disabled())
        .unwrap()
        .into_id();
    let x = r
        .register_handler(A, toggler(late, true))
        .unwrap()
        .into_id();
    let _ = ctx::take();
    assert_eq!(step(&mut sim), Event::RaiseTrap { addr: A });
    assert!(matches!(step(&mut sim), Event::Dispatch { .. }));
    let calls = ctx::take();
    assert!(
        calls.contains(&Call::SetEnabled {
            target: late,
            on: true,
            result: Ok(())
        }),
        "{calls:?}"
    );
    let ran: Vec<HandlerId> = calls
        .iter()
        .filter_map(|c| match c {
            Call::Enter { id, .. } => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(ran, [early, x], "the walk in progress is not changed");
    assert!(r.is_enabled(late).unwrap());
    assert_eq!(
        [early, late, x].map(|id| r.stats(id).unwrap().hits),
        [1, 0, 1]
    );
    while sim.step(0).is_some() {}
    assert_eq!(sim.cpus()[0].regs().rax, program(3).threads[0].rax + 3);

    // Disabling a handler whose pre already ran in this hit: its post still comes (the
    // step keeps the view it started with), and the instruction executes once.
    let mut sim = Sim::new(program(3), 0);
    let r = sim.registry().clone();
    let other = r.register_handler(A, observe(true)).unwrap().into_id();
    let _x = r
        .register_handler(A, toggler(other, false))
        .unwrap()
        .into_id();
    trap_then_step_with_post(
        &mut sim,
        "the walk keeps its view: `other`'s post still comes",
    );
    assert!(!r.is_enabled(other).unwrap());
    while sim.step(0).is_some() {}
    assert_eq!(r.stats(other).unwrap().hits, 1);
    assert_eq!(sim.cpus()[0].regs().rax, program(3).threads[0].rax + 3);
}
