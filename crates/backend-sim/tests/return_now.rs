//! `Hit::return_now` on the simulator: a probe at a function's entry ends the call
//! with a value, and the caller goes on as if the function had returned it.

use multiprobe_backend_sim::isa::Insn;
use multiprobe_backend_sim::memory::CODE;
use multiprobe_backend_sim::{Program, Sim, Status};
use multiprobe_core::{Gpr, Regs};

const MAIN: u64 = CODE.start;
/// `f`, after `call f; addi rbx, 1; halt`.
const F: u64 = MAIN + 6;

/// `main: call f; addi rbx, 1; halt` and `f: movi rax, 5; addi rbx, 100; ret`.
fn program() -> Program {
    Program::from_insns(
        &[
            Insn::Call(4),
            Insn::Addi(Gpr::Rbx, 1),
            Insn::Halt,
            Insn::Movi(Gpr::Rax, 5),
            Insn::Addi(Gpr::Rbx, 100),
            Insn::Ret,
        ],
        vec![Program::thread_regs(0, MAIN)],
    )
}

fn run(sim: &mut Sim) -> Regs {
    while sim.step(0).is_some() {}
    assert_eq!(sim.cpus()[0].status(), Status::Halted);
    *sim.cpus()[0].regs()
}

#[test]
fn return_now_at_a_function_entry_returns_the_value_to_the_caller() {
    let start = program().threads[0];
    let unprobed = run(&mut Sim::new(program(), 0));
    assert_eq!((unprobed.rax, unprobed.rbx), (5, start.rbx + 101));

    let mut sim = Sim::new(program(), 0);
    let probe = sim
        .registry()
        .register(F, |hit| {
            let _ = hit.return_now(42);
        })
        .unwrap();
    let probed = run(&mut sim);
    assert_eq!(probed.rax, 42, "the value reached the caller");
    assert_eq!(
        probed.rbx,
        start.rbx + 1,
        "f's body was skipped, main's rest ran"
    );
    assert_eq!(probed.rsp, start.rsp, "the return address was popped");
    assert_eq!(probe.unregister().unwrap().hits, 1);
}
