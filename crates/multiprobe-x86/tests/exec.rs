//! Real execution: for each instruction, run the original on the CPU, then every probed
//! path — emulation, the jump-back slot, the trap-after slot (through a real `int3`
//! and SIGTRAP, fixed up by `Slot::fixup_trap`) — from the same registers and memory,
//! and compare all registers, the arithmetic flags, where control went, and memory.

#[allow(dead_code)]
mod machine;

use machine::{
    fill_memory, observed_memory, random_regs, with_machine, Machine, PageMemory, Rng, CODE, DATA,
    SLOT,
};
use multiprobe_core::Regs;
use multiprobe_x86::{analyze, Code, EmulateError, Plan, SlotKind};

/// One instruction under test: its bytes at CODE, exit stubs at `targets` (numbered
/// 1..), a hook that adjusts random inputs (point a base register into the page, ...)
/// and one that prepares memory after the pattern fill (store a jump target, ...).
struct Case<'a> {
    insn: &'a [u8],
    targets: &'a [usize],
    fix: &'a dyn Fn(&Machine, &mut Regs),
    mem: &'a dyn Fn(&mut Machine),
}

fn no_fix(_: &Machine, _: &mut Regs) {}
fn no_mem(_: &mut Machine) {}

impl<'a> Case<'a> {
    fn new(insn: &'a [u8]) -> Self {
        Case {
            insn,
            targets: &[],
            fix: &no_fix,
            mem: &no_mem,
        }
    }
    fn to(self, targets: &'a [usize]) -> Self {
        Case { targets, ..self }
    }
    fn fix(self, fix: &'a dyn Fn(&Machine, &mut Regs)) -> Self {
        Case { fix, ..self }
    }
    fn mem(self, mem: &'a dyn Fn(&mut Machine)) -> Self {
        Case { mem, ..self }
    }
}

impl Case<'_> {
    fn plan(&self, m: &mut Machine) -> Plan {
        let a = m.addr(CODE);
        m.write(CODE, self.insn);
        let len = self.insn.len();
        m.exit_stub(CODE + len, 0);
        for (i, &t) in self.targets.iter().enumerate() {
            m.exit_stub(t, i as u8 + 1);
        }
        let code = Code {
            addr: a,
            bytes: self.insn,
        };
        let p = analyze(a, code, Some(a..a + len as u64)).expect("analyze");
        assert_eq!(p.len(), len, "{:02x?}", self.insn);
        p
    }

    fn fill(&self, m: &mut Machine) {
        fill_memory(m);
        (self.mem)(m);
    }

    fn exit_addr(&self, m: &Machine, id: u8) -> u64 {
        match id {
            0 => m.addr(CODE + self.insn.len()),
            k => m.addr(self.targets[usize::from(k) - 1]),
        }
    }

    /// Compare every probed path against the CPU on `runs` random inputs. Returns how
    /// often each exit was taken (so callers can assert both branches were exercised).
    fn check(&self, runs: usize, seed: u64) -> Vec<usize> {
        with_machine(|m| {
            let plan = self.plan(m);
            let mut rng = Rng(seed | 1);
            let mut exits = vec![0; self.targets.len() + 1];
            let jb = plan.build_slot(SlotKind::JumpBack, m.addr(SLOT)).unwrap();
            m.write(SLOT, jb.bytes());
            let ta = plan.has_trap_after_slot().then(|| {
                let s = plan
                    .build_slot(SlotKind::TrapAfter, m.addr(SLOT + 0x100))
                    .unwrap();
                m.write(SLOT + 0x100, s.bytes());
                s
            });
            for _ in 0..runs {
                let mut input = random_regs(m, &mut rng);
                (self.fix)(m, &mut input);
                let what = format!("{} with {input:x?}", plan.disassemble());

                self.fill(m);
                let (want, id) = m.run(m.addr(CODE), &input);
                assert_ne!(id, 0xff, "{what}: original did not exit");
                exits[usize::from(id)] += 1;
                let want_mem = observed_memory(m, want.rsp);

                if plan.is_emulated() {
                    self.fill(m);
                    let mut r = input;
                    r.rip = m.addr(CODE);
                    plan.emulate(&mut r, &PageMemory(m)).expect("emulate");
                    assert_eq!(r.rip, self.exit_addr(m, id), "{what}: emulated rip");
                    r.rip = 0;
                    r.rflags &= 0x8d5;
                    assert_eq!(r, want, "{what}: emulated registers");
                    assert!(
                        observed_memory(m, want.rsp) == want_mem,
                        "{what}: emulated memory"
                    );
                }

                self.fill(m);
                let (got, gid) = m.run(jb.addr(), &input);
                assert_eq!((got, gid), (want, id), "{what}: jump-back slot");
                assert!(
                    observed_memory(m, want.rsp) == want_mem,
                    "{what}: jump-back memory"
                );

                if let Some(s) = &ta {
                    self.fill(m);
                    m.arm_signals(Some(s), 0);
                    let (got, gid) = m.run(s.addr(), &input);
                    assert_eq!((got, gid), (want, id), "{what}: trap-after slot");
                    assert!(
                        observed_memory(m, want.rsp) == want_mem,
                        "{what}: trap-after memory"
                    );
                }
            }
            exits
        })
    }
}

fn run_case(insn: &[u8], runs: usize) {
    Case::new(insn).check(runs, insn.len() as u64 * 977 + u64::from(insn[0]));
}

#[test]
fn nops_and_endbr() {
    for insn in [
        &[0x90][..],
        &[0x66, 0x90],
        &[0x0f, 0x1f, 0x44, 0x00, 0x00],
        &[0x66, 0x2e, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0],
        &[0xf3, 0x0f, 0x1e, 0xfa],
        &[0xf3, 0x90],
    ] {
        run_case(insn, 8);
    }
}

#[test]
fn push_and_pop() {
    for insn in [
        &[0x55][..],                     // push rbp
        &[0x54],                         // push rsp
        &[0x41, 0x57],                   // push r15
        &[0xff, 0xf3],                   // push rbx (ff /6)
        &[0x6a, 0x80],                   // push -128
        &[0x68, 0x78, 0x56, 0x34, 0x92], // push imm32 (negative)
    ] {
        run_case(insn, 8);
    }
    // pop reads the stack: values are the memory pattern.
    for insn in [&[0x5b][..], &[0x41, 0x5c]] {
        run_case(insn, 8);
    }
    // pop rsp: the popped value becomes the stack, so make it a usable one (a signal
    // frame goes there when the trap-after slot traps).
    let stack = |m: &mut Machine| {
        let v = m.addr(0xe000);
        m.write(0xf000, &v.to_le_bytes());
    };
    Case::new(&[0x5c]).mem(&stack).check(4, 9);
}

#[test]
fn mov_lea_and_alu_match_the_cpu() {
    for insn in [
        &[0x48, 0x89, 0xe5][..],                     // mov rbp, rsp
        &[0x89, 0xf8],                               // mov eax, edi
        &[0x4d, 0x89, 0xc8],                         // mov r8, r9
        &[0x8b, 0xc7],                               // mov eax, edi (8b form)
        &[0xb8, 0x78, 0x56, 0x34, 0x92],             // mov eax, imm32
        &[0x48, 0xc7, 0xc0, 0xfe, 0xff, 0xff, 0xff], // mov rax, -2
        &[0x49, 0xbb, 1, 2, 3, 4, 5, 6, 7, 0x88],    // movabs r11, imm64
        &[0x48, 0x8d, 0x44, 0x24, 0x08],             // lea rax, [rsp+8]
        &[0x8d, 0x44, 0xb7, 0xfb],                   // lea eax, [rdi+rsi*4-5]
        &[0x4a, 0x8d, 0x04, 0xc5, 0x10, 0, 0, 0],    // lea rax, [r8*8+0x10]
        &[0x67, 0x48, 0x8d, 0x04, 0x37],             // lea rax, [edi+esi]
        &[0x48, 0x8d, 0x05, 0x00, 0x01, 0, 0],       // lea rax, [rip+0x100]
    ] {
        run_case(insn, 16);
    }
}

#[test]
fn alu_flags_match_cpu() {
    let mut insns: Vec<Vec<u8>> = vec![
        vec![0x48, 0x83, 0xec, 0x18],             // sub rsp, 0x18
        vec![0x48, 0x81, 0xc4, 0x00, 0x01, 0, 0], // add rsp, 0x100
        vec![0x83, 0xe8, 0x80],                   // sub eax, -128
        vec![0x48, 0x2d, 0x00, 0x00, 0x00, 0x80], // sub rax, imm32 (negative)
        vec![0x48, 0x3d, 0x01, 0x00, 0x00, 0x00], // cmp rax, 1
        vec![0xa9, 0xff, 0x00, 0x00, 0x00],       // test eax, 0xff
        vec![0x48, 0x83, 0xe4, 0xf0],             // and rsp, -16
    ];
    // Every register-register form: op r/m, r for add/or/and/sub/xor/cmp/test in 32
    // and 64 bits, over a few register pairs (including the same register twice).
    for op in [0x01u8, 0x09, 0x21, 0x29, 0x31, 0x39, 0x85] {
        for rex in [None, Some(0x48u8), Some(0x4d)] {
            for modrm in [0xc0u8, 0xc8, 0xd3, 0xff, 0xf6] {
                let mut v = rex.map(|r| vec![r]).unwrap_or_default();
                v.extend([op, modrm]);
                insns.push(v);
            }
        }
    }
    for insn in &insns {
        run_case(insn, 24);
    }
}

#[test]
fn jumps_and_conditional_jumps() {
    let target = CODE + 0x400;
    let rel32 = |head: &[u8]| {
        let mut v = head.to_vec();
        let d = (0x400 - (head.len() + 4)) as i32;
        v.extend(d.to_le_bytes());
        v
    };
    Case::new(&rel32(&[0xe9])).to(&[target]).check(4, 1);
    // jmp rel8 reaches +0x7f at most: use a nearer target.
    Case::new(&[0xeb, 0x40]).to(&[CODE + 0x42]).check(4, 2);
    for cc in 0..16u8 {
        let e = Case::new(&[0x70 | cc, 0x40])
            .to(&[CODE + 0x42])
            .check(48, 3 + u64::from(cc));
        assert!(
            e[0] > 0 && e[1] > 0,
            "jcc {cc:x}: both ways must be exercised, got {e:?}"
        );
        let e = Case::new(&rel32(&[0x0f, 0x80 | cc]))
            .to(&[target])
            .check(48, 40 + u64::from(cc));
        assert!(e[0] > 0 && e[1] > 0, "jcc rel32 {cc:x}: got {e:?}");
    }
}

#[test]
fn loops_and_jrcxz() {
    let small_rcx = |_: &Machine, r: &mut Regs| {
        // Counters around the interesting edges, and upper halves that the 32-bit forms
        // must ignore.
        r.rcx = [0, 1, 2, 0x1_0000_0000, 0x1_0000_0001, u64::MAX][(r.rdx % 6) as usize];
    };
    for insn in [
        &[0xe2, 0x40][..],   // loop
        &[0xe1, 0x40],       // loope
        &[0xe0, 0x40],       // loopne
        &[0xe3, 0x40],       // jrcxz
        &[0x67, 0xe2, 0x40], // loop (ecx)
        &[0x67, 0xe3, 0x40], // jecxz
    ] {
        let t = CODE + insn.len() + 0x40;
        let e = Case::new(insn).to(&[t]).fix(&small_rcx).check(48, 7);
        assert!(e[0] > 0 && e[1] > 0, "{insn:02x?}: got {e:?}");
    }
}

#[test]
fn calls_push_the_original_return_address() {
    let target = CODE + 0x400;
    let mut call = vec![0xe8];
    call.extend((0x400i32 - 5).to_le_bytes());
    Case::new(&call).to(&[target]).check(4, 11);
    // call r11 / jmp rax: the register holds the target.
    let to_target = move |m: &Machine, r: &mut Regs| {
        r.r11 = m.addr(target);
        r.rax = m.addr(target);
    };
    Case::new(&[0x41, 0xff, 0xd3])
        .to(&[target])
        .fix(&to_target)
        .check(4, 12);
    Case::new(&[0xff, 0xe0])
        .to(&[target])
        .fix(&to_target)
        .check(4, 13);
    Case::new(&[0x3e, 0xff, 0xe0])
        .to(&[target])
        .fix(&to_target)
        .check(4, 13); // notrack
}

/// Memory-indirect calls and jumps read their target from memory, which the pattern
/// fill overwrites: the memory hook stores the target after each fill. `rdi`
/// points 0x10 below `at`, `rsi` is 2 (for `[rdi+rsi*8]`).
fn target_in_memory(insn: &[u8], at: usize, seed: u64) {
    let fix = move |m: &Machine, r: &mut Regs| {
        r.rdi = m.addr(at) - 0x10;
        r.rsi = 2;
    };
    let target = CODE + 0x400;
    let mem = move |m: &mut Machine| {
        let t = m.addr(target);
        m.write(at, &t.to_le_bytes());
    };
    let e = Case::new(insn)
        .to(&[target])
        .fix(&fix)
        .mem(&mem)
        .check(6, seed);
    assert_eq!(e[0], 0, "{insn:02x?} must always reach the target");
}

#[test]
fn indirect_calls_and_jumps_through_memory() {
    // call [rip+disp]: the slot is `push [rip+lit]; jmp [rip+disp']`.
    let at = DATA + 0x100;
    let disp = |len: usize| ((at - (CODE + len)) as i32).to_le_bytes();
    let mut call_rip = vec![0xff, 0x15];
    call_rip.extend(disp(6));
    target_in_memory(&call_rip, at, 21);
    let mut jmp_rip = vec![0xff, 0x25];
    jmp_rip.extend(disp(6));
    target_in_memory(&jmp_rip, at, 22);
    // call [rdi+rsi*8]: rdi = at - 0x10, rsi = 2.
    target_in_memory(&[0xff, 0x14, 0xf7], at, 23);
    // call [rsp+8]: the slot's push moves rsp, so its displacement grows by 8.
    target_in_memory(&[0xff, 0x54, 0x24, 0x08], 0xf008, 24);
    target_in_memory(&[0xff, 0x94, 0x24, 0x08, 0, 0, 0], 0xf008, 25);
    // ret and ret imm16 (the return address is on the stack top).
    target_in_memory(&[0xc3], 0xf000, 26);
    target_in_memory(&[0xc2, 0x10, 0x00], 0xf000, 27);
}

#[test]
fn rip_relative_loads_stores_and_read_modify_write() {
    let at = DATA + 0x200;
    let with_disp = |head: &[u8], tail: &[u8]| {
        let mut v = head.to_vec();
        let len = head.len() + 4 + tail.len();
        v.extend(((at - (CODE + len)) as i32).to_le_bytes());
        v.extend(tail);
        v
    };
    for insn in [
        with_disp(&[0x48, 0x8b, 0x05], &[]),           // mov rax, [rip+d]
        with_disp(&[0x4c, 0x89, 0x3d], &[]),           // mov [rip+d], r15
        with_disp(&[0x83, 0x3d], &[0x05]),             // cmp dword [rip+d], 5
        with_disp(&[0x48, 0x81, 0x05], &[1, 2, 3, 4]), // add qword [rip+d], imm32
        with_disp(&[0xf3, 0x0f, 0x6f, 0x05], &[]),     // movdqu xmm0, [rip+d] (then a store)
        with_disp(&[0xc6, 0x05], &[0x7f]),             // mov byte [rip+d], 0x7f
        with_disp(&[0xff, 0x35], &[]),                 // push qword [rip+d]
    ] {
        run_case(&insn, 6);
    }
    // The emulated lea [rip+d] and relocated plain stores through registers.
    run_case(&[0x48, 0x89, 0x7c, 0x24, 0x08], 6); // mov [rsp+8], rdi
}

#[test]
fn syscall_sees_the_original_return_address_in_rcx() {
    // getpid: rax = 39; rcx and r11 are set by the instruction itself.
    let fix = |_: &Machine, r: &mut Regs| r.rax = 39;
    Case::new(&[0x0f, 0x05]).fix(&fix).check(3, 31);
}

#[test]
fn faults_in_slots_look_like_faults_of_the_original() {
    type SetUp<'a> = &'a dyn Fn(&mut Regs);
    let cases: [(&[u8], SetUp); 3] = [
        (&[0x48, 0x8b, 0x07], &|r| r.rdi = 0x10), // mov rax, [rdi]
        (&[0xff, 0x17], &|r| r.rdi = 0x18),       // call [rdi]
        (&[0xff, 0x27], &|r| r.rdi = 0x20),       // jmp [rdi]
    ];
    for (insn, set) in cases {
        with_machine(|m| {
            let case = Case::new(insn);
            let plan = case.plan(m);
            let fault_exit = CODE + 0x600;
            m.exit_stub(fault_exit, 9);
            let mut input = random_regs(m, &mut Rng(5));
            set(&mut input);
            let what = plan.disassemble();

            fill_memory(m);
            m.arm_signals(None, m.addr(fault_exit));
            let (_, id) = m.run(m.addr(CODE), &input);
            assert_eq!(id, 9, "{what}: the original must fault");
            let (want, want_addr) = m.last_fault().unwrap();
            assert_eq!(want.rip, m.addr(CODE));

            if plan.is_emulated() {
                let mut r = input;
                let e = plan.emulate(&mut r, &PageMemory(m));
                assert!(matches!(e, Err(EmulateError::Memory(_))), "{what}: {e:?}");
                assert_eq!(r, input, "{what}: failed emulation must change nothing");
            }

            let jb = plan.build_slot(SlotKind::JumpBack, m.addr(SLOT)).unwrap();
            m.write(SLOT, jb.bytes());
            fill_memory(m);
            m.arm_signals(Some(&jb), m.addr(fault_exit));
            let (_, id) = m.run(jb.addr(), &input);
            assert_eq!(id, 9, "{what}: the slot must fault");
            let (got, got_addr) = m.last_fault().unwrap();
            assert_eq!((got, got_addr), (want, want_addr), "{what}: fault state");
        });
    }
}
