//! Region analysis on hand-assembled functions: what may be replaced by a `jmp rel32`,
//! and each reason a site stays an `int3` site.

use iced_x86::code_asm::*;
use multiprobe_x86::{analyze_region, Code, Mnem, Refusal, Region, RegionRefusal, Unwind};

const BASE: u64 = 0x40_1000;

/// Assemble a function at BASE; returns its bytes.
fn func(build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    build(&mut a).unwrap();
    a.assemble(BASE).unwrap()
}

/// The region at `BASE` in `bytes`, of which the function is the first `func_len`.
fn region_in_function(bytes: &[u8], func_len: u64) -> Result<Region, RegionRefusal> {
    let code = Code { addr: BASE, bytes };
    analyze_region(
        BASE,
        code,
        Some(BASE..BASE + func_len),
        Unwind::NoLandingPads,
    )
}

fn region_at(bytes: &[u8], addr: u64, unwind: Unwind<'_>) -> Result<Region, RegionRefusal> {
    let end = BASE + bytes.len() as u64;
    analyze_region(addr, Code { addr: BASE, bytes }, Some(BASE..end), unwind)
}

fn entry(bytes: &[u8]) -> Result<Region, RegionRefusal> {
    region_at(bytes, BASE, Unwind::NoLandingPads)
}

/// A typical prologue: push rbp; mov rbp, rsp; sub rsp, 0x20; ... ret.
fn prologue(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.push(rbp)?;
    a.mov(rbp, rsp)?;
    a.sub(rsp, 0x20)?;
    Ok(())
}

#[test]
fn a_prologue_is_a_region_of_whole_instructions() {
    let f = func(|a| {
        prologue(a)?;
        a.mov(eax, 1)?;
        a.leave()?;
        a.ret()
    });
    let r = entry(&f).unwrap();
    // push rbp (1) + mov rbp, rsp (3) + sub rsp, 0x20 (4): the first 5 bytes end inside
    // the third instruction, which is taken whole.
    assert_eq!((r.addr(), r.len(), r.starts()), (BASE, 8, &[0u8, 1, 4][..]));
    assert_eq!(r.bytes(), &f[..8]);
    assert!(!r.in_interior(BASE) && r.in_interior(BASE + 1) && !r.in_interior(BASE + 8));
    assert_eq!(r.boundary_index(BASE + 4), Some(2));
    assert_eq!(r.boundary_index(BASE + 2), None);
    assert_eq!(r.insn(1), (BASE + 1, &f[1..4]));
}

#[test]
fn one_long_instruction_needs_no_function() {
    // mov eax, imm32 (5 bytes) then garbage the analysis must never look at.
    let bytes = [0xb8, 1, 2, 3, 4, 0xff, 0xff, 0xff];
    let r = analyze_region(
        BASE,
        Code {
            addr: BASE,
            bytes: &bytes,
        },
        None,
        Unwind::Unknown,
    )
    .unwrap();
    assert_eq!(r.len(), 5);
    assert_eq!(r.count(), 1);
    // A short one without the function's bounds cannot be checked.
    let short = [0x55, 0x48, 0x89, 0xe5, 0xc3, 0xcc];
    let e = analyze_region(
        BASE,
        Code {
            addr: BASE,
            bytes: &short,
        },
        None,
        Unwind::NoLandingPads,
    );
    assert_eq!(e, Err(RegionRefusal::NoFunction));
}

#[test]
fn a_loop_back_to_the_second_instruction_is_refused() {
    // push rbx; L: dec ecx (2); jnz L; pop rbx; ret: the loop jumps to BASE+1, inside.
    let f = func(|a| {
        let mut l = a.create_label();
        a.push(rbx)?;
        a.set_label(&mut l)?;
        a.dec(ecx)?;
        a.add(eax, 3)?;
        a.jnz(l)?;
        a.pop(rbx)?;
        a.ret()
    });
    // The jnz is the instruction before `pop rbx; ret` at the end.
    let jnz_at = BASE + f.len() as u64 - 2 - 2;
    assert_eq!(
        entry(&f),
        Err(RegionRefusal::BranchInto {
            from: jnz_at,
            to: BASE + 1
        })
    );
    // The same loop targeting the probed address itself is fine: the jump lands on the
    // jmp and hits the probe again.
    let f = func(|a| {
        let mut l = a.create_label();
        a.set_label(&mut l)?;
        a.dec(ecx)?;
        a.add(eax, 3)?;
        a.jnz(l)?;
        a.ret()
    });
    assert!(entry(&f).is_ok());
}

#[test]
fn a_jump_table_is_refused_and_a_got_tail_call_is_not() {
    // A switch: cmp edi, 3; ja default; lea rax, [rip+table]; movsxd; add; jmp rax.
    let f = func(|a| {
        let mut table = a.create_label();
        let mut default = a.create_label();
        a.cmp(edi, 3)?;
        a.ja(default)?;
        a.lea(rax, ptr(table))?;
        a.movsxd(rdx, dword_ptr(rax + rdi * 4))?;
        a.add(rax, rdx)?;
        a.jmp(rax)?;
        a.set_label(&mut default)?;
        a.xor(eax, eax)?;
        a.ret()?;
        a.set_label(&mut table)?;
        a.dd(&[0, 0, 0, 0])
    });
    let jmp_at = BASE + 3 + 2 + 7 + 4 + 3;
    assert_eq!(
        region_at(&f[..f.len() - 16], BASE, Unwind::NoLandingPads),
        Err(RegionRefusal::IndirectJump { at: jmp_at })
    );
    // `jmp [rip+slot]`: one pointer, no table.
    let f = func(|a| {
        let mut slot = a.create_label();
        prologue(a)?;
        a.leave()?;
        a.jmp(qword_ptr(slot))?;
        a.set_label(&mut slot)?;
        a.dq(&[0])
    });
    assert!(entry(&f).is_ok());
    // ...but an indexed one is a table.
    let f = func(|a| {
        prologue(a)?;
        a.jmp(qword_ptr(rdi * 8 + 0x60_0000))
    });
    assert!(matches!(entry(&f), Err(RegionRefusal::IndirectJump { .. })));
}

#[test]
fn control_flow_before_the_regions_last_instruction_is_refused() {
    // call inside the region.
    let f = func(|a| {
        a.push(rbx)?;
        a.call(BASE + 0x100)?;
        a.pop(rbx)?;
        a.ret()
    });
    // push rbx (1) + call (5): the call completes the 5 bytes, so it is the last: fine.
    let r = entry(&f).unwrap();
    assert_eq!(r.count(), 2);
    let f = func(|a| {
        a.call(rax)?; // 2 bytes, more must follow
        a.add(rsp, 8)?;
        a.ret()
    });
    assert_eq!(
        entry(&f),
        Err(RegionRefusal::ControlFlowInside {
            at: BASE,
            mnemonic: Mnem(iced_x86::Mnemonic::Call)
        })
    );
    assert_eq!(
        RegionRefusal::ControlFlowInside {
            at: BASE,
            mnemonic: Mnem(iced_x86::Mnemonic::Call)
        }
        .to_string(),
        "call at 0x401000 transfers control before the end of the 5 bytes a jump needs"
    );
    for (bytes, m) in [
        (&[0x74, 0x00, 0x48, 0x83, 0xc0, 0x01, 0xc3][..], "je"), // je; add rax, 1; ret
        (&[0xc3, 0x90, 0x90, 0x90, 0x90, 0x90][..], "ret"),
        (&[0x0f, 0x05, 0x48, 0x83, 0xc0, 0x01, 0xc3][..], "syscall"),
        (&[0xeb, 0x00, 0x48, 0x83, 0xc0, 0x01, 0xc3][..], "jmp"),
    ] {
        match entry(bytes) {
            Err(RegionRefusal::ControlFlowInside { at, mnemonic }) => {
                assert_eq!((at, mnemonic.to_string().as_str()), (BASE, m));
            }
            other => panic!("{m}: {other:?}"),
        }
    }
}

#[test]
fn the_region_must_end_inside_the_function() {
    // Three bytes of function, then the next function.
    let bytes = [0x31, 0xc0, 0xc3, 0x55, 0x48, 0x89, 0xe5];
    let e = region_in_function(&bytes, 3);
    // xor eax, eax; ret: the ret is not last, refused first as control flow.
    assert!(
        matches!(e, Err(RegionRefusal::ControlFlowInside { .. })),
        "{e:?}"
    );
    let bytes = [0x31, 0xc0, 0x31, 0xdb, 0x55, 0x48, 0x89, 0xe5];
    let e = region_in_function(&bytes, 4);
    assert_eq!(e, Err(RegionRefusal::PastFunctionEnd { end: BASE + 4 }));
}

#[test]
fn landing_pads_and_unreadable_unwind_information() {
    let f = func(|a| {
        prologue(a)?;
        a.leave()?;
        a.ret()
    });
    assert_eq!(
        region_at(&f, BASE, Unwind::LandingPads(&[BASE + 4])),
        Err(RegionRefusal::LandingPad { at: BASE + 4 })
    );
    // A landing pad at the probed address or after the region is no obstacle.
    assert!(region_at(&f, BASE, Unwind::LandingPads(&[BASE, BASE + 8])).is_ok());
    assert_eq!(
        region_at(&f, BASE, Unwind::Unknown),
        Err(RegionRefusal::UnwindUnknown)
    );
}

#[test]
fn undecodable_bytes_and_unrelocatable_instructions_are_refused() {
    // push rbx; mov rbx, rdi; then 0x06 (invalid in 64-bit mode) later in the function.
    let bytes = [0x53, 0x48, 0x89, 0xfb, 0x5b, 0x06, 0xc3];
    assert_eq!(
        entry(&bytes),
        Err(RegionRefusal::Undecodable { at: BASE + 5 })
    );
    // An int3 (someone else's breakpoint) in the region.
    let bytes = [0x53, 0xcc, 0x89, 0xfb, 0x5b, 0xc3];
    assert_eq!(
        entry(&bytes),
        Err(RegionRefusal::NotRelocatable {
            at: BASE + 1,
            reason: Refusal::Breakpoint
        })
    );
}

#[test]
fn a_probe_in_the_middle_of_a_function_and_a_branch_as_last_instruction() {
    // test edi, edi; je L; mov eax, 1; add eax, 2; L: ret
    let f = func(|a| {
        let mut l = a.create_label();
        a.test(edi, edi)?;
        a.je(l)?;
        a.mov(eax, 1)?;
        a.add(eax, 2)?;
        a.set_label(&mut l)?;
        a.ret()
    });
    // test (2) + je (2) is 4 bytes: the je would be in the middle.
    assert!(matches!(
        entry(&f),
        Err(RegionRefusal::ControlFlowInside { at, .. }) if at == BASE + 2
    ));
    // `mov eax, 1` is 5 bytes on its own.
    let mid = region_at(&f, BASE + 4, Unwind::NoLandingPads).unwrap();
    assert_eq!((mid.addr(), mid.len(), mid.count()), (BASE + 4, 5, 1));
    // xor eax, eax; test edi, edi; je L: the branch completes the region.
    let f = func(|a| {
        let mut l = a.create_label();
        a.xor(eax, eax)?;
        a.test(edi, edi)?;
        a.je(l)?;
        a.mov(eax, 1)?;
        a.set_label(&mut l)?;
        a.ret()
    });
    let r = entry(&f).unwrap();
    assert_eq!((r.len(), r.count()), (6, 3));
}
