//! Trampolines executed for real: a region is run unprobed on the CPU, then with its
//! first bytes replaced by the `jmp rel32` into a trampoline whose entry points are the
//! functions below, from the same registers and memory; every register, the arithmetic
//! flags, where control went and memory must agree. Then the exits (redirect, a moved
//! stack, the trap fallback), faults in relocated instructions, and the vector and x87
//! state across handlers that clobber it, in both state-saving modes.

#[allow(dead_code)]
mod machine;

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering::SeqCst};
use std::sync::Mutex;

use iced_x86::code_asm::*;
use machine::{
    fill_memory, observed_memory, random_regs, with_machine, Machine, Rng, CODE, DATA, PAGE_LEN,
    SLOT, STACK,
};
use multiprobe_core::{Memory, MemoryError, Regs};
use multiprobe_x86::{
    analyze_region, build_common, build_trampoline, Code, CpuState, Frame, Region, StateSave,
    Trampoline, TrampolineSpec, Unwind, EVENT_POST, EVENT_PRE, EXIT_REGION,
};

const TRAMP: usize = SLOT;
const COMMON: usize = SLOT + 0x400;

/// What the pre entry does.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Action {
    /// Nothing: run the region.
    Region,
    /// Ask for the post stub.
    Post,
    /// Emulate the first instruction in the entry (as a backend does when the post
    /// handlers run right after), then leave: the exit straight to the continuation.
    Emulate,
    /// Send the thread to `to` with rax = `value`.
    Redirect { to: u64, value: u64 },
    /// Return from the function: rip = [rsp], rsp += 8, rax = 7.
    ReturnNow,
    /// Move rsp down by 64 and resume at `to`: only the trap exit can do that.
    StackDown { to: u64 },
    /// Clobber every vector, opmask and x87 register and MXCSR, and memcpy 1 MiB.
    Clobber,
    /// Set DF and CF in the frame's rflags (the slow, `popfq` restore).
    SetFlags,
    /// The same in the pre and the post entry, through the post stub.
    ClobberPost,
    /// Record the entry's own DF (in `ENTRY_DF`), then run the region.
    SeeDf,
}

/// DF as the pre entry saw it in its own rflags (`Action::SeeDf`): 1 set, 0 clear.
static ENTRY_DF: AtomicU64 = AtomicU64::new(u64::MAX);

static ACTION: Mutex<Action> = Mutex::new(Action::Region);
static MAP: AtomicPtr<Trampoline> = AtomicPtr::new(std::ptr::null_mut());
/// Frames the entries saw: (event, frame).
static SEEN: Mutex<Vec<(u64, Frame)>> = Mutex::new(Vec::new());
static POST_CALLS: AtomicU64 = AtomicU64::new(0);

/// Unchecked memory of this process (the tests only write into the machine's page).
struct Raw;
impl Memory for Raw {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        // SAFETY: test addresses lie in the machine's page.
        unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        // SAFETY: as above.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), addr as *mut u8, data.len()) };
        Ok(())
    }
}

fn map() -> &'static Trampoline {
    // SAFETY: the test stores a map that outlives the run before running.
    unsafe { &*MAP.load(SeqCst) }
}

fn clobber() {
    if !CpuState::get().avx512 {
        clobber_ymm();
        return;
    }
    // SAFETY: writes only registers the compiler is told about (vector and opmask
    // registers).
    unsafe {
        core::arch::asm!(
            "vpternlogd zmm0, zmm0, zmm0, 0xff",
            "vpternlogd zmm7, zmm7, zmm7, 0xff",
            "vpternlogd zmm15, zmm15, zmm15, 0xff",
            "vpternlogd zmm16, zmm16, zmm16, 0xff",
            "vpternlogd zmm31, zmm31, zmm31, 0xff",
            "kxnorq k1, k1, k1",
            "kxnorq k7, k7, k7",
            out("zmm0") _, out("zmm7") _, out("zmm15") _, out("zmm16") _, out("zmm31") _,
            out("k1") _, out("k7") _,
        );
    }
    clobber_x87_mxcsr_and_memory();
}

/// What both [`clobber`]s do after the vector registers: x87 pushes and pops that
/// leave status flags set, MXCSR changed, and a memcpy.
fn clobber_x87_mxcsr_and_memory() {
    // SAFETY: balanced x87 pushes/pops and MXCSR, which the trampoline must restore;
    // the stack slot it uses is popped again.
    unsafe {
        core::arch::asm!(
            "fldpi",
            "fldpi",
            "fsqrt",
            "fstp st(0)",
            "fstp st(0)",
            "fld1",
            "fldz",
            "fdivp st(1), st",
            "fstp st(0)", // 1/0: sets ZE
            "sub rsp, 8",
            "stmxcsr [rsp]",
            "or dword ptr [rsp], 0x3f",
            "xor dword ptr [rsp], 0x6000",
            "ldmxcsr [rsp]",
            "add rsp, 8",
        );
    }
    let src = vec![0x5au8; 1 << 20];
    let mut dst = vec![0u8; 1 << 20];
    dst.copy_from_slice(std::hint::black_box(&src));
    std::hint::black_box(&dst);
}

/// [`clobber`] on a CPU with AVX but no AVX-512: `ymm0-15`, x87, MXCSR, a memcpy.
fn clobber_ymm() {
    // SAFETY: writes only the AVX registers the compiler is told about.
    unsafe {
        core::arch::asm!(
            "vpcmpeqd ymm0, ymm0, ymm0",
            "vpcmpeqd ymm7, ymm7, ymm7",
            "vpcmpeqd ymm15, ymm15, ymm15",
            out("ymm0") _, out("ymm7") _, out("ymm15") _,
        );
    }
    clobber_x87_mxcsr_and_memory();
}

/// The pre entry point.
unsafe extern "C" fn pre(frame: *mut Frame, _ctx: u64, event: u64) -> u64 {
    // SAFETY: the trampoline passes its frame, exclusively ours during the call.
    let f = unsafe { &mut *frame };
    SEEN.lock().unwrap().push((event, *f));
    let t = map();
    match *ACTION.lock().unwrap() {
        Action::Region => EXIT_REGION,
        Action::Post => f.leave(t, true, &Raw),
        Action::Emulate => {
            let r = t.region();
            let (at, bytes) = r.insn(0);
            let plan = multiprobe_x86::analyze(at, Code { addr: at, bytes }, None).unwrap();
            plan.emulate(&mut f.regs, &Raw).unwrap();
            f.leave(t, false, &Raw)
        }
        Action::Redirect { to, value } => {
            f.regs.rip = to;
            f.regs.rax = value;
            f.leave(t, false, &Raw)
        }
        Action::ReturnNow => {
            f.regs.rip = (&Raw as &dyn Memory).read_u64(f.regs.rsp).unwrap();
            f.regs.rsp += 8;
            f.regs.rax = 7;
            f.leave(t, false, &Raw)
        }
        Action::StackDown { to } => {
            f.regs.rsp -= 64;
            f.regs.rip = to;
            f.leave(t, false, &Raw)
        }
        Action::Clobber => {
            clobber();
            EXIT_REGION
        }
        Action::SetFlags => {
            f.regs.rflags |= 0x401;
            EXIT_REGION
        }
        Action::ClobberPost => {
            clobber();
            f.leave(t, true, &Raw)
        }
        Action::SeeDf => {
            let flags: u64;
            // SAFETY: reads this code's own rflags through the stack, balanced.
            unsafe { core::arch::asm!("pushfq", "pop {}", out(reg) flags) };
            ENTRY_DF.store((flags >> 10) & 1, SeqCst);
            EXIT_REGION
        }
    }
}

/// The post entry point.
unsafe extern "C" fn post(frame: *mut Frame, _ctx: u64, event: u64) -> u64 {
    // SAFETY: as in `pre`.
    let f = unsafe { &mut *frame };
    SEEN.lock().unwrap().push((event, *f));
    POST_CALLS.fetch_add(1, SeqCst);
    if *ACTION.lock().unwrap() == Action::ClobberPost {
        clobber();
    }
    let t = map();
    f.leave_after(t, t.continuation(), &Raw)
}

/// A region under test at CODE: its code (assembled at CODE's address), exit stubs at
/// `targets` (numbered 1..; 0 is the region's end), hooks to adjust inputs and memory.
struct Case<'a> {
    name: &'a str,
    build: &'a dyn Fn(&mut CodeAssembler, u64) -> Result<(), IcedError>,
    /// Exit stub offsets from CODE (the region's end gets stub 0 automatically).
    targets: &'a [usize],
    fix: &'a dyn Fn(&Machine, &mut Regs),
    mem: &'a dyn Fn(&mut Machine),
}

fn no_fix(_: &Machine, _: &mut Regs) {}
fn no_mem(_: &mut Machine) {}

struct Placed {
    region: Region,
    code: Vec<u8>,
    map: Box<Trampoline>,
}

/// Write the case's code and stubs, build the trampoline and common stub.
fn place(m: &mut Machine, case: &Case<'_>, save: StateSave) -> Placed {
    let base = m.addr(CODE);
    let mut a = CodeAssembler::new(64).unwrap();
    (case.build)(&mut a, base).unwrap();
    let code = a.assemble(base).unwrap();
    m.write(CODE, &code);
    let func = Code {
        addr: base,
        bytes: &code,
    };
    let region = analyze_region(base, func, Some(func.range()), Unwind::NoLandingPads)
        .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    m.exit_stub(CODE + region.len(), 0);
    for (i, &t) in case.targets.iter().enumerate() {
        m.exit_stub(CODE + t, i as u8 + 1);
    }
    let map = place_trampoline(m, &region, save, &CpuState::get());
    Placed { region, code, map }
}

/// Build the common stub (saving `save` on `cpu`) at COMMON and `region`'s trampoline,
/// calling [`pre`] and [`post`], at TRAMP, and make it the one the handlers see: its map.
fn place_trampoline(
    m: &mut Machine,
    region: &Region,
    save: StateSave,
    cpu: &CpuState,
) -> Box<Trampoline> {
    let common = build_common(save, cpu, m.addr(COMMON)).unwrap();
    m.write(COMMON, &common.bytes);
    let spec = TrampolineSpec {
        region,
        ctx: 0,
        pre: pre as *const () as u64,
        post: post as *const () as u64,
        common: m.addr(COMMON),
    };
    let built = build_trampoline(&spec, m.addr(TRAMP)).unwrap();
    m.write(TRAMP, &built.bytes);
    let map = Box::new(built.map);
    MAP.store(&*map as *const Trampoline as *mut Trampoline, SeqCst);
    map
}

fn arith(r: &Regs) -> Regs {
    Regs {
        rflags: r.rflags & 0x8d5,
        rip: 0,
        ..*r
    }
}

fn promote(m: &mut Machine, p: &Placed) {
    let (b, n) = p.region.jump_bytes(p.map.addr()).unwrap();
    m.write(CODE, &b[..n]);
}

fn demote(m: &mut Machine, p: &Placed) {
    m.write(CODE, &p.code[..p.region.len()]);
}

impl Case<'_> {
    fn fill(&self, m: &mut Machine) {
        fill_memory(m);
        (self.mem)(m);
    }

    /// Original against promoted (pre only, then with the post stub), `runs` inputs.
    fn check(&self, runs: usize, seed: u64, save: StateSave) {
        with_machine(|m| {
            let p = place(m, self, save);
            let mut rng = Rng(seed | 1);
            for _ in 0..runs {
                let mut input = random_regs(m, &mut rng);
                (self.fix)(m, &mut input);
                let what = format!("{} with {input:x?}", self.name);
                demote(m, &p);
                self.fill(m);
                let before = m.read(STACK..PAGE_LEN);
                let (want, id) = m.run(m.addr(CODE), &input);
                assert_ne!(id, 0xff, "{what}: original did not exit");
                // Memory below the entry's red zone is dead at the probe: the frame
                // lives there. What must agree: the data, the stack from the red zone
                // up, and whatever the original wrote below it.
                let want_mem = observed_memory(m, input.rsp);
                let after = m.read(STACK..PAGE_LEN);
                let written: Vec<(usize, u8)> = (0..after.len())
                    .filter(|&i| before[i] != after[i])
                    .map(|i| (i, after[i]))
                    .collect();

                let (a0, b0) = p.region.insn(0);
                let emulated = multiprobe_x86::analyze(
                    a0,
                    Code {
                        addr: a0,
                        bytes: b0,
                    },
                    None,
                )
                .unwrap()
                .is_emulated();
                let actions: &[Action] = if emulated {
                    &[Action::Region, Action::Post, Action::Emulate]
                } else {
                    &[Action::Region, Action::Post]
                };
                for &action in actions {
                    *ACTION.lock().unwrap() = action;
                    SEEN.lock().unwrap().clear();
                    promote(m, &p);
                    self.fill(m);
                    let (got, gid) = m.run(m.addr(CODE), &input);
                    assert_eq!((got, gid), (want, id), "{what}: {action:?}");
                    assert!(observed_memory(m, input.rsp) == want_mem, "{what}: memory");
                    let now = m.read(STACK..PAGE_LEN);
                    for &(i, v) in &written {
                        assert_eq!(now[i], v, "{what}: stack byte {:#x}", STACK + i);
                    }
                    let seen = SEEN.lock().unwrap().clone();
                    let (ev, f) = seen[0];
                    assert_eq!(ev, EVENT_PRE);
                    assert_eq!(f.regs.rip, m.addr(CODE), "{what}: frame rip");
                    assert_eq!(
                        arith(&f.regs),
                        arith(&Regs { rip: 0, ..input }),
                        "{what}: frame"
                    );
                    let posts = seen.iter().filter(|(e, _)| *e == EVENT_POST).count();
                    let has_post = p.map.has_post();
                    assert_eq!(
                        posts,
                        usize::from(action == Action::Post && has_post),
                        "{what}"
                    );
                    if posts == 1 {
                        let (_, pf) = seen[1];
                        let (next, _) = p.region.insn(1.min(p.region.count() - 1));
                        let next = if p.region.count() > 1 {
                            next
                        } else {
                            p.region.end()
                        };
                        assert_eq!(pf.regs.rip, next, "{what}: post rip");
                    }
                }
            }
        })
    }
}

fn run(case: Case<'_>, runs: usize, seed: u64) {
    case.check(runs, seed, StateSave::Registers);
    if CpuState::get().xsave_mask != 0 {
        case.check(runs.div_ceil(2), seed + 1, StateSave::Xsave);
    }
}

#[test]
fn regions_run_relocated_as_they_run_in_place() {
    run(
        Case {
            name: "prologue",
            build: &|a, _| {
                a.push(rbp)?;
                a.mov(rbp, rsp)?;
                a.sub(rsp, 0x20)?;
                a.nop()
            },
            targets: &[],
            fix: &no_fix,
            mem: &no_mem,
        },
        8,
        1,
    );
    run(
        Case {
            name: "red zone store",
            build: &|a, _| {
                a.mov(qword_ptr(rsp - 8), rdi)?;
                a.mov(qword_ptr(rsp - 0x80), rsi)
            },
            targets: &[],
            fix: &no_fix,
            mem: &no_mem,
        },
        4,
        2,
    );
    run(
        Case {
            name: "rip-relative load",
            build: &|a, base| {
                a.mov(rax, qword_ptr(base + (DATA - CODE) as u64 + 0x40))?;
                a.add(rax, rdi)
            },
            targets: &[],
            fix: &no_fix,
            mem: &no_mem,
        },
        4,
        3,
    );
}

#[test]
fn a_branch_ending_the_region_goes_to_the_original_targets() {
    let e = Case {
        name: "xor; test; je",
        build: &|a, base| {
            a.xor(eax, eax)?;
            a.test(rdi, rdi)?;
            a.je(base + 0x100)
        },
        targets: &[0x100],
        fix: &|_, r| {
            if r.rdx & 1 == 0 {
                r.rdi = 0;
            }
        },
        mem: &no_mem,
    };
    run(e, 16, 4);
    run(
        Case {
            name: "jmp rel32",
            build: &|a, base| {
                a.jmp(base + 0x200)?;
                a.nop()
            },
            targets: &[0x200],
            fix: &no_fix,
            mem: &no_mem,
        },
        2,
        5,
    );
    run(
        Case {
            name: "xor; jmp [rip+slot]",
            build: &|a, _| {
                a.xor(eax, eax)?;
                // jmp [rip + d] to DATA + 0x80, from CODE + 8.
                let d = (DATA + 0x80 - (CODE + 8)) as i32;
                let mut insn = vec![0xff, 0x25];
                insn.extend(d.to_le_bytes());
                a.db(&insn)
            },
            targets: &[0x100],
            fix: &no_fix,
            mem: &|m| {
                let t = m.addr(CODE + 0x100);
                m.write(DATA + 0x80, &t.to_le_bytes());
            },
        },
        2,
        6,
    );
    run(
        Case {
            name: "lea; ret",
            build: &|a, _| {
                a.lea(rax, ptr(rdi + 1))?;
                a.ret()
            },
            targets: &[0x100],
            fix: &no_fix,
            mem: &|m| {
                let t = m.addr(CODE + 0x100);
                m.write(0xf000, &t.to_le_bytes());
            },
        },
        2,
        7,
    );
}

#[test]
fn a_relocated_call_pushes_the_original_return_address() {
    run(
        Case {
            name: "push rbx; call rel32",
            build: &|a, base| {
                a.push(rbx)?;
                a.call(base + 0x100)
            },
            targets: &[0x100],
            fix: &no_fix,
            mem: &no_mem,
        },
        4,
        8,
    );
    run(
        Case {
            name: "push; push; push; call rax",
            build: &|a, _| {
                a.push(rbx)?;
                a.push(rbp)?;
                a.push(r12)?;
                a.call(rax)
            },
            targets: &[0x100],
            fix: &|m, r| r.rax = m.addr(CODE + 0x100),
            mem: &no_mem,
        },
        4,
        9,
    );
    run(
        Case {
            name: "nop; nop; call [rsp+8]",
            build: &|a, _| {
                a.nop()?;
                a.nop()?;
                a.call(qword_ptr(rsp + 8))
            },
            targets: &[0x100],
            fix: &no_fix,
            mem: &|m| {
                let t = m.addr(CODE + 0x100);
                m.write(0xf008, &t.to_le_bytes());
            },
        },
        4,
        10,
    );
}

#[test]
fn a_relocated_syscall_sees_the_original_return_address_in_rcx() {
    run(
        Case {
            name: "getpid",
            build: &|a, _| {
                a.xor(eax, eax)?;
                a.mov(al, 39)?;
                a.syscall()
            },
            targets: &[],
            fix: &no_fix,
            mem: &no_mem,
        },
        3,
        11,
    );
}

fn prologue(a: &mut CodeAssembler, _: u64) -> Result<(), IcedError> {
    a.push(rbp)?;
    a.mov(rbp, rsp)?;
    a.sub(rsp, 0x20)?;
    a.nop()
}

const PROLOGUE: Case<'static> = Case {
    name: "prologue",
    build: &prologue,
    targets: &[0x100],
    fix: &no_fix,
    mem: &no_mem,
};

/// Run the promoted PROLOGUE with `action` from `input`; returns the registers and exit.
fn promoted_run(m: &mut Machine, p: &Placed, action: Action, input: &Regs) -> (Regs, u8) {
    *ACTION.lock().unwrap() = action;
    promote(m, p);
    fill_memory(m);
    m.arm_trampoline(&p.map, 0);
    m.run(m.addr(CODE), input)
}

#[test]
fn handlers_redirect_return_and_move_the_stack() {
    with_machine(|m| {
        let p = place(m, &PROLOGUE, StateSave::Registers);
        let stub = m.addr(CODE + 0x100);
        let mut rng = Rng(77);
        for _ in 0..4 {
            let input = random_regs(m, &mut rng);
            // Redirect: nothing of the region runs, rax as the handler set it.
            let (got, id) = promoted_run(m, &p, Action::Redirect { to: stub, value: 5 }, &input);
            assert_eq!(
                (got, id),
                (
                    Regs {
                        rax: 5,
                        ..arith(&input)
                    },
                    1
                )
            );
            // Redirect to the region's second instruction: as if execution started there
            // (it runs from the relocated copy: the original bytes hold the jump).
            demote(m, &p);
            fill_memory(m);
            let (want, wid) = m.run(m.addr(CODE + 1), &input);
            let to = m.addr(CODE + 1);
            let (got, id) = promoted_run(
                m,
                &p,
                Action::Redirect {
                    to,
                    value: input.rax,
                },
                &input,
            );
            assert_eq!((got, id), (want, wid));
            // Return from the function: the stack moved up, rip from the old top.
            let ret_input = Regs { ..input };
            m.write(0xf000, &stub.to_le_bytes());
            *ACTION.lock().unwrap() = Action::ReturnNow;
            promote(m, &p);
            fill_memory(m);
            m.write(0xf000, &stub.to_le_bytes());
            let (got, id) = m.run(m.addr(CODE), &ret_input);
            assert_eq!(id, 1);
            assert_eq!(
                got,
                Regs {
                    rax: 7,
                    rsp: input.rsp + 8,
                    ..arith(&input)
                }
            );
            // A handler's flags: the arithmetic ones by the fast restore (checked by every
            // run above), DF by popfq.
            let (_, id) = promoted_run(m, &p, Action::SetFlags, &input);
            assert_eq!(id, 0);
            // (The region's `sub` sets CF anew; DF survives it.)
            assert_eq!(m.last_rflags() & 0x400, 0x400, "DF as the handler set it");
            // The stack moved down: only the trap exit can do it.
            let (got, id) = promoted_run(m, &p, Action::StackDown { to: stub }, &input);
            assert_eq!(id, 1);
            assert_eq!(
                got,
                Regs {
                    rsp: input.rsp - 64,
                    ..arith(&input)
                }
            );
        }
    });
}

#[test]
fn the_entry_runs_with_df_clear_and_the_program_keeps_its_df() {
    with_machine(|m| {
        let p = place(m, &PROLOGUE, StateSave::Registers);
        let mut rng = Rng(5);
        for df in [0x400, 0, 0x400] {
            let mut input = random_regs(m, &mut rng);
            input.rflags |= df;
            demote(m, &p);
            fill_memory(m);
            let want = m.run(m.addr(CODE), &input);
            assert_eq!(m.last_rflags() & 0x400, df, "the harness passes DF");
            ENTRY_DF.store(u64::MAX, SeqCst);
            let got = promoted_run(m, &p, Action::SeeDf, &input);
            assert_eq!(got, want, "df {df:#x}");
            assert_eq!(
                ENTRY_DF.load(SeqCst),
                0,
                "the entry ran with DF set (df {df:#x})"
            );
            let frame = SEEN.lock().unwrap().last().unwrap().1;
            assert_eq!(
                frame.regs.rflags & 0x400,
                df,
                "the frame has the program's DF"
            );
            assert_eq!(
                m.last_rflags() & 0x400,
                df,
                "the program's DF after the hit"
            );
        }
    });
}

#[test]
fn faults_in_relocated_instructions_are_reported_at_the_original_address() {
    type Build = fn(&mut CodeAssembler, u64) -> Result<(), IcedError>;
    let cases: [(&str, Build, u64); 2] = [
        (
            "fault in the first",
            |a, _| {
                a.mov(rax, qword_ptr(rdi))?;
                a.push(rbx)?;
                a.nop()
            },
            0,
        ),
        (
            "fault in the second",
            |a, _| {
                a.push(rbx)?;
                a.mov(rax, qword_ptr(rdi))?;
                a.nop()
            },
            1,
        ),
    ];
    for (name, build, at) in cases {
        with_machine(|m| {
            let case = Case {
                name,
                build: &build,
                targets: &[],
                fix: &no_fix,
                mem: &no_mem,
            };
            let p = place(m, &case, StateSave::Registers);
            let fault_exit = CODE + 0x600;
            m.exit_stub(fault_exit, 9);
            let mut input = random_regs(m, &mut Rng(5));
            input.rdi = 0x18;
            demote(m, &p);
            fill_memory(m);
            m.arm_signals(None, m.addr(fault_exit));
            let (_, id) = m.run(m.addr(CODE), &input);
            assert_eq!(id, 9, "{name}: the original must fault");
            let (want, want_addr) = m.last_fault().unwrap();
            assert_eq!(want.rip, m.addr(CODE) + at);
            promote(m, &p);
            fill_memory(m);
            *ACTION.lock().unwrap() = Action::Region;
            m.arm_trampoline(&p.map, m.addr(fault_exit));
            let (_, id) = m.run(m.addr(CODE), &input);
            assert_eq!(id, 9, "{name}: the relocated copy must fault");
            assert_eq!(m.last_fault().unwrap(), (want, want_addr), "{name}");
            // The map says which instruction it was.
            let copy = p.map.copy_of(at as usize);
            let mut r = Regs { rip: copy, ..want };
            assert_eq!(p.map.fixup(&mut r), Some(at == 0));
            assert_eq!(r.rip, m.addr(CODE) + at);
        });
    }
}

/// Offsets in the vector test's input and output buffers.
const V_K: i32 = 2048;
const V_X87: i32 = 2112;
const V_MXCSR: i32 = 2136;
const V_FSW: i32 = 2140;
const V_FCW: i32 = 2142;
/// XINUSE (`xgetbv` with ecx = 1) right after the probed region, in the output.
const V_XINUSE: i32 = 2144;
const V_LEN: usize = 2152;
/// A zeroed XSAVE area (header included) for [`Start::Init`]'s `xrstor`.
const XS_AREA: usize = DATA + 0x3000;

/// XINUSE bits of the components the common stub's clean-upper path brings back to
/// their init state: AVX (bits 128-255 of `zmm0-15`, bit 2) and ZMM_Hi256 (bits
/// 256-511, bit 6).
const XINUSE_UPPERS: u64 = 0x44;

/// The vector state the vector test's function sets up before the probed region.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Start {
    /// Every register loaded from the input, whole.
    Loaded,
    /// `zmm16-31` and `k1-7` loaded, then `vzeroupper` and `xmm0-15` loaded by VEX.128
    /// moves: the upper halves of `zmm0-15` zero and in their init state (as at a
    /// function entry in a program that follows the ABI).
    CleanUppers,
    /// `xrstor` with a zeroed header puts AVX, opmask, ZMM_Hi256 and Hi16_ZMM in their
    /// init state (all zero), then `xmm0-15` loaded by VEX.128 moves.
    Init,
}

/// Whether this CPU reports XINUSE (`CPUID.(EAX=0Dh,ECX=1):EAX` bit 2).
fn has_xinuse() -> bool {
    // SAFETY: CPUID has no side effects (safe on newer toolchains).
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid_count(0xd, 1) };
    r.eax & (1 << 2) != 0
}

/// Load the vector, opmask (k1-k7), `x87` (that many values) and MXCSR state from
/// `[rdi]` as `start` says, run the region at the `probe` label, record XINUSE (when
/// `xinuse`), store every register to `[rsi]`.
/// (With `zmm` false, the AVX variant: `ymm0-15` at 32-byte strides, no opmasks.)
fn vector_function(
    a: &mut CodeAssembler,
    x87: usize,
    zmm_regs: bool,
    start: Start,
    xinuse: bool,
    xs_area: u64,
) -> Result<CodeLabel, IcedError> {
    let xmm = [
        xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
        xmm14, xmm15,
    ];
    let ymm = [
        ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13,
        ymm14, ymm15,
    ];
    let zmm = [
        zmm0, zmm1, zmm2, zmm3, zmm4, zmm5, zmm6, zmm7, zmm8, zmm9, zmm10, zmm11, zmm12, zmm13,
        zmm14, zmm15, zmm16, zmm17, zmm18, zmm19, zmm20, zmm21, zmm22, zmm23, zmm24, zmm25, zmm26,
        zmm27, zmm28, zmm29, zmm30, zmm31,
    ];
    let ks = [k1, k2, k3, k4, k5, k6, k7];
    if zmm_regs {
        match start {
            Start::Loaded | Start::CleanUppers => {
                let from = if start == Start::Loaded { 0 } else { 16 };
                for (i, z) in zmm.iter().enumerate().skip(from) {
                    a.vmovdqu64(*z, zmmword_ptr(rdi + 64 * i as i32))?;
                }
                for (i, k) in ks.iter().enumerate() {
                    a.kmovq(*k, qword_ptr(rdi + V_K + 8 * i as i32))?;
                }
            }
            Start::Init => {
                // RFBM = AVX | opmask | ZMM_Hi256 | Hi16_ZMM with XSTATE_BV = 0: init.
                // (It also loads MXCSR from the area: set below.)
                a.mov(rax, xs_area)?;
                a.mov(rcx, rax)?;
                a.mov(eax, 0xe4)?;
                a.xor(edx, edx)?;
                a.xrstor64(ptr(rcx))?;
                a.xor(eax, eax)?;
                a.xor(ecx, ecx)?;
            }
        }
        if start != Start::Loaded {
            a.vzeroupper()?;
            for (i, x) in xmm.iter().enumerate() {
                a.vmovdqu(*x, xmmword_ptr(rdi + 64 * i as i32))?;
            }
        }
    } else if start == Start::Loaded {
        for (i, y) in ymm.iter().enumerate() {
            a.vmovdqu(*y, ymmword_ptr(rdi + 32 * i as i32))?;
        }
    } else {
        a.vzeroupper()?;
        for (i, x) in xmm.iter().enumerate() {
            a.vmovdqu(*x, xmmword_ptr(rdi + 32 * i as i32))?;
        }
    }
    for i in 0..x87 {
        a.fld(qword_ptr(rdi + V_X87 + 8 * i as i32))?;
    }
    a.ldmxcsr(dword_ptr(rdi + V_MXCSR))?;
    let mut probe = a.create_label();
    a.set_label(&mut probe)?;
    a.lea(rax, ptr(rax + 1))?;
    a.lea(rcx, ptr(rcx + 1))?;
    if xinuse {
        a.push(rax)?;
        a.push(rcx)?;
        a.push(rdx)?;
        a.mov(ecx, 1)?;
        a.xgetbv()?;
        a.mov(dword_ptr(rsi + V_XINUSE), eax)?;
        a.mov(dword_ptr(rsi + V_XINUSE + 4), edx)?;
        a.pop(rdx)?;
        a.pop(rcx)?;
        a.pop(rax)?;
    }
    if zmm_regs {
        for (i, z) in zmm.iter().enumerate() {
            a.vmovdqu64(zmmword_ptr(rsi + 64 * i as i32), *z)?;
        }
        for (i, k) in ks.iter().enumerate() {
            a.kmovq(qword_ptr(rsi + V_K + 8 * i as i32), *k)?;
        }
    } else {
        for (i, y) in ymm.iter().enumerate() {
            a.vmovdqu(ymmword_ptr(rsi + 32 * i as i32), *y)?;
        }
    }
    a.stmxcsr(dword_ptr(rsi + V_MXCSR))?;
    a.fnstsw(word_ptr(rsi + V_FSW))?;
    a.fnstcw(word_ptr(rsi + V_FCW))?;
    for i in (0..x87).rev() {
        a.fstp(qword_ptr(rsi + V_X87 + 8 * i as i32))?;
    }
    Ok(probe)
}

/// Run the vector function (`start`, `x87` values) unprobed, then promoted with a
/// handler that clobbers every vector, opmask and x87 register and MXCSR (pre only, and
/// pre and post), saving with `save`; `input` is the function's input buffer.
/// Returns the three outputs: (registers, output buffer).
fn run_vector_case(
    save: StateSave,
    x87: usize,
    zmm_regs: bool,
    start: Start,
    input: &[u8],
    cpu: &CpuState,
) -> Vec<(Regs, Vec<u8>)> {
    const VT: usize = CODE + 0x400;
    const IN: usize = DATA + 0x1000;
    const OUT: usize = DATA + 0x2000;
    with_machine(|m| {
        let base = m.addr(VT);
        let mut a = CodeAssembler::new(64).unwrap();
        let probe =
            vector_function(&mut a, x87, zmm_regs, start, has_xinuse(), m.addr(XS_AREA)).unwrap();
        let out = a
            .assemble_options(
                base,
                iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
            )
            .unwrap();
        let code = out.inner.code_buffer.clone();
        let at = out.label_ip(&probe).unwrap();
        m.write(VT, &code);
        m.exit_stub(VT + code.len(), 0);
        let func = Code {
            addr: base,
            bytes: &code,
        };
        let region = analyze_region(at, func, Some(func.range()), Unwind::NoLandingPads).unwrap();
        let map = place_trampoline(m, &region, save, cpu);
        let regs = Regs {
            rdi: m.addr(IN),
            rsi: m.addr(OUT),
            rsp: m.addr(0xf000),
            ..Regs::default()
        };
        let offset = (at - base) as usize;
        let mut outputs = Vec::new();
        for (promoted, action) in [
            (false, Action::Region),
            (true, Action::Clobber),
            (true, Action::ClobberPost),
        ] {
            let region_bytes = if promoted {
                let (b, n) = region.jump_bytes(map.addr()).unwrap();
                b[..n].to_vec()
            } else {
                region.bytes().to_vec()
            };
            m.write(VT + offset, &region_bytes);
            *ACTION.lock().unwrap() = action;
            POST_CALLS.store(0, SeqCst);
            m.write(IN, input);
            m.write(OUT, &[0u8; V_LEN]);
            m.write(XS_AREA, &[0u8; 576]);
            let (r, id) = m.run(m.addr(VT), &regs);
            assert_eq!(id, 0);
            let posts = POST_CALLS.load(SeqCst);
            assert_eq!(posts, u64::from(action == Action::ClobberPost));
            outputs.push((r, m.read(OUT..OUT + V_LEN)));
        }
        drop(map);
        outputs
    })
}

/// The vector test's input: random registers, three x87 values, MXCSR with round-down,
/// every exception masked and the invalid flag set.
fn vector_input(seed: u64) -> Vec<u8> {
    let mut rng = Rng(0x5eed ^ seed);
    let mut input: Vec<u8> = (0..V_LEN).map(|_| rng.next() as u8).collect();
    for i in 0..3 {
        let v = (rng.next() % 1000) as f64 / 7.0;
        let o = V_X87 as usize + 8 * i;
        input[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }
    input[V_MXCSR as usize..][..4].copy_from_slice(&0x3f81u32.to_le_bytes());
    input
}

/// The unprobed output and the promoted ones agree byte for byte, registers too.
fn assert_same(what: &str, outputs: &[(Regs, Vec<u8>)]) {
    for (k, (r, got)) in outputs.iter().enumerate().skip(1) {
        assert_eq!(outputs[0].0, *r, "{what}, run {k}: registers");
        for (i, (want, got)) in outputs[0].1[..V_XINUSE as usize]
            .iter()
            .zip(&got[..V_XINUSE as usize])
            .enumerate()
        {
            assert_eq!(
                want, got,
                "{what}, run {k}: byte {i} of the saved state differs"
            );
        }
    }
}

fn xinuse_of(out: &[u8]) -> u64 {
    u64::from_le_bytes(out[V_XINUSE as usize..][..8].try_into().unwrap())
}

#[test]
fn vector_opmask_x87_and_mxcsr_state_survive_handlers_that_clobber_them() {
    let cpu = CpuState::get();
    // Without AVX-512 the same test on `ymm0-15` (the upper halves are what the common
    // stub's `vzeroupper` after the save clears for the entry, and what the restore must
    // bring back).
    let zmm_regs = cpu.avx512 && cpu.avx512bw;
    if !zmm_regs && (cpu.avx512 || !cpu.avx) {
        eprintln!("AVX-512 without BW, or no AVX, on this CPU: skipped");
        return;
    }
    for save in [StateSave::Registers, StateSave::Xsave] {
        for x87 in [0, 3] {
            let input = vector_input(x87 as u64);
            let outputs = run_vector_case(save, x87, zmm_regs, Start::Loaded, &input, &cpu);
            let what = format!("{save:?} with {x87} x87 values");
            assert_same(&what, &outputs);
            // The clobber did reach the registers (the test can fail).
            assert_ne!(&outputs[0].1[..64], &[0xff; 64][..]);
        }
    }
}

/// Bytes of the input left non-zero in a mixed case: register, first byte, length.
type Kept = (usize, usize, usize);

/// The common stub's clean-upper path (AVX-512): upper halves of `zmm0-15` that are
/// zero at the hit come back zero, and in their init state when they were, however the
/// handler dirtied them; a single non-zero upper lane anywhere takes the whole save.
#[test]
fn clean_upper_halves_come_back_clean_and_mixed_states_come_back_exactly() {
    let cpu = CpuState::get();
    if !(cpu.avx512 && cpu.avx512bw) {
        eprintln!("no AVX-512 (BW) on this CPU: skipped");
        return;
    }
    let xinuse = has_xinuse();
    let upper = |out: &[u8]| -> bool {
        (0..16).all(|r| out[64 * r + 16..64 * r + 64].iter().all(|&b| b == 0))
    };
    // Inputs: random, then with the upper halves of zmm0-15 zeroed except `keep`
    // (register, first byte, length) — a lane of AVX state (bits 128-255) or of
    // ZMM_Hi256 (bits 256-511) in use while the rest is zero.
    let mixed: [(&str, Option<Kept>); 5] = [
        ("all uppers zero, loaded whole", None),
        ("only zmm15 bits 128-191", Some((15, 16, 8))),
        ("only zmm9 bits 192-255", Some((9, 24, 8))),
        ("only zmm0 bits 448-511", Some((0, 56, 8))),
        ("only zmm7 bits 256-319", Some((7, 32, 8))),
    ];
    for save in [StateSave::Registers, StateSave::Xsave] {
        for x87 in [0, 3] {
            // (a) Init at the hit, dirtied by the handler: back to zero, and (XINUSE)
            // back to init for the upper halves.
            for start in [Start::CleanUppers, Start::Init] {
                let input = vector_input(7 + x87 as u64);
                let outputs = run_vector_case(save, x87, true, start, &input, &cpu);
                let what = format!("{save:?}, {start:?}, {x87} x87 values");
                assert_same(&what, &outputs);
                for (k, (_, out)) in outputs.iter().enumerate() {
                    assert!(upper(out), "{what}, run {k}: upper halves not zero");
                    if start == Start::Init {
                        let hi = &out[64 * 16..V_K as usize + 56];
                        assert!(hi.iter().all(|&b| b == 0), "{what}, run {k}: zmm16-31/k");
                    }
                }
                // XINUSE may report a component in use that is in its init state (the
                // SDM allows it): when the unprobed run's says init, so must the others.
                let base = xinuse_of(&outputs[0].1);
                if xinuse && base & XINUSE_UPPERS == 0 {
                    for (k, (_, out)) in outputs.iter().enumerate().skip(1) {
                        let x = xinuse_of(out);
                        assert_eq!(x & XINUSE_UPPERS, 0, "{what}, run {k}: XINUSE {x:#x}");
                    }
                } else {
                    eprintln!("{what}: XINUSE {base:#x} unprobed: init state not checked");
                }
                // The loaded lows and zmm16-31 are the input's (the test sees them).
                assert_eq!(outputs[0].1[..16], input[..16], "{what}: xmm0");
            }
            // (b) Mixed: some upper lanes in use, the rest zero; zmm16-31 and opmasks
            // in use.
            for (name, keep) in mixed {
                let mut input = vector_input(11 + x87 as u64);
                for r in 0..16 {
                    for b in 16..64 {
                        if keep.is_none_or(|(kr, kb, kl)| r != kr || !(kb..kb + kl).contains(&b)) {
                            input[64 * r + b] = 0;
                        }
                    }
                }
                let outputs = run_vector_case(save, x87, true, Start::Loaded, &input, &cpu);
                let what = format!("{save:?}, {name}, {x87} x87 values");
                assert_same(&what, &outputs);
                assert_eq!(upper(&outputs[0].1), keep.is_none(), "{what}: the input");
                if let Some((r, b, l)) = keep {
                    for (k, (_, out)) in outputs.iter().enumerate() {
                        let o = 64 * r + b;
                        assert_eq!(out[o..o + l], input[o..o + l], "{what}, run {k}");
                    }
                }
            }
            // (b) Mixed, the other way: upper halves clean, zmm16-31 and k in use: the
            // latter come back whole (checked by `assert_same` in CleanUppers above),
            // and whole upper state in use comes back whole (`Start::Loaded` in the
            // test above).
        }
    }
}

/// The same for the AVX (no AVX-512) stub, on `ymm0-15`: built for this CPU with its
/// AVX-512 hidden when it has it (the `ymm` test sees `ymm0-15` only, which is all that
/// stub saves), so the path is tested on the machines this project has.
#[test]
fn clean_upper_halves_come_back_clean_with_the_avx_stub() {
    let real = CpuState::get();
    if !real.avx {
        eprintln!("no AVX on this CPU: skipped");
        return;
    }
    let cpu = CpuState {
        avx512: false,
        avx512bw: false,
        ..real
    };
    let xinuse = has_xinuse();
    let upper = |out: &[u8]| -> bool {
        (0..16).all(|r| out[32 * r + 16..32 * r + 32].iter().all(|&b| b == 0))
    };
    // (register, first byte, length) left non-zero in the upper halves; ymm15 is the
    // stub's scratch, saved whole first.
    let mixed: [(&str, Option<Kept>); 5] = [
        ("all uppers zero, loaded whole", None),
        ("only ymm15 bits 128-191", Some((15, 16, 8))),
        ("only ymm14 bits 192-255", Some((14, 24, 8))),
        ("only ymm0 bits 128-191", Some((0, 16, 8))),
        ("only ymm7 bits 192-255", Some((7, 24, 8))),
    ];
    for x87 in [0, 3] {
        let what = format!("AVX stub, all loaded, {x87} x87 values");
        let input = vector_input(17 + x87 as u64);
        let outputs = run_vector_case(
            StateSave::Registers,
            x87,
            false,
            Start::Loaded,
            &input,
            &cpu,
        );
        assert_same(&what, &outputs);
        assert!(!upper(&outputs[0].1), "{what}: the input");
        let what = format!("AVX stub, clean uppers, {x87} x87 values");
        let input = vector_input(21 + x87 as u64);
        let outputs = run_vector_case(
            StateSave::Registers,
            x87,
            false,
            Start::CleanUppers,
            &input,
            &cpu,
        );
        assert_same(&what, &outputs);
        assert!(outputs.iter().all(|(_, o)| upper(o)), "{what}: uppers");
        assert_eq!(outputs[0].1[..16], input[..16], "{what}: xmm0");
        assert_eq!(outputs[0].1[480..496], input[480..496], "{what}: xmm15");
        let base = xinuse_of(&outputs[0].1);
        if xinuse && base & XINUSE_UPPERS == 0 {
            for (k, (_, out)) in outputs.iter().enumerate().skip(1) {
                let x = xinuse_of(out);
                assert_eq!(x & XINUSE_UPPERS, 0, "{what}, run {k}: XINUSE {x:#x}");
            }
        } else {
            eprintln!("{what}: XINUSE {base:#x} unprobed: init state not checked");
        }
        for (name, keep) in mixed {
            let mut input = vector_input(31 + x87 as u64);
            for r in 0..16 {
                for b in 16..32 {
                    if keep.is_none_or(|(kr, kb, kl)| r != kr || !(kb..kb + kl).contains(&b)) {
                        input[32 * r + b] = 0;
                    }
                }
            }
            let outputs = run_vector_case(
                StateSave::Registers,
                x87,
                false,
                Start::Loaded,
                &input,
                &cpu,
            );
            let what = format!("AVX stub, {name}, {x87} x87 values");
            assert_same(&what, &outputs);
            assert_eq!(upper(&outputs[0].1), keep.is_none(), "{what}: the input");
            if let Some((r, b, l)) = keep {
                let o = 32 * r + b;
                for (k, (_, out)) in outputs.iter().enumerate() {
                    assert_eq!(out[o..o + l], input[o..o + l], "{what}, run {k}");
                }
            }
        }
    }
}
