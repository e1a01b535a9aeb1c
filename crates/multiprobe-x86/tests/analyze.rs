//! Classification, boundary checks and bad input, without executing anything.

use multiprobe_x86::{
    analyze, AnalyzeError, Class, Code, EmulatedKind, Refusal, RelocatedKind, SlotError, SlotKind,
    MAX_SLOT_LEN,
};

const BASE: u64 = 0x40_0000;

fn plan(bytes: &[u8]) -> Result<multiprobe_x86::Plan, AnalyzeError> {
    analyze(BASE, Code { addr: BASE, bytes }, None)
}

fn class(bytes: &[u8]) -> Class {
    plan(bytes)
        .unwrap_or_else(|e| panic!("{bytes:02x?}: {e}"))
        .class()
}

fn refusal(bytes: &[u8]) -> Refusal {
    match plan(bytes) {
        Err(AnalyzeError::Refused { reason, addr }) => {
            assert_eq!(addr, BASE);
            reason
        }
        other => panic!("{bytes:02x?}: expected a refusal, got {other:?}"),
    }
}

#[test]
fn function_entry_instructions_are_emulated() {
    use EmulatedKind as E;
    let cases: &[(&[u8], E)] = &[
        (&[0x90], E::Nop),
        (&[0x0f, 0x1f, 0x44, 0x00, 0x00], E::Nop),
        (&[0x66, 0x0f, 0x1f, 0x84, 0, 0, 0, 0, 0], E::Nop),
        (&[0xf3, 0x0f, 0x1e, 0xfa], E::Nop),          // endbr64
        (&[0x55], E::Push),                           // push rbp
        (&[0x41, 0x57], E::Push),                     // push r15
        (&[0x6a, 0x01], E::Push),                     // push 1
        (&[0x5d], E::Pop),                            // pop rbp
        (&[0x48, 0x89, 0xe5], E::Mov),                // mov rbp, rsp
        (&[0x89, 0xf8], E::Mov),                      // mov eax, edi
        (&[0xb8, 1, 0, 0, 0], E::Mov),                // mov eax, 1
        (&[0x48, 0x83, 0xec, 0x18], E::Alu),          // sub rsp, 0x18
        (&[0x48, 0x81, 0xec, 0, 1, 0, 0], E::Alu),    // sub rsp, 0x100
        (&[0x31, 0xc0], E::Alu),                      // xor eax, eax
        (&[0x48, 0x85, 0xff], E::Alu),                // test rdi, rdi
        (&[0x48, 0x8d, 0x44, 0x24, 0x08], E::Lea),    // lea rax, [rsp+8]
        (&[0x48, 0x8d, 0x05, 0x10, 0, 0, 0], E::Lea), // lea rax, [rip+0x10]
        (&[0xeb, 0x10], E::Jmp),
        (&[0xe9, 0, 1, 0, 0], E::Jmp),
        (&[0xff, 0xe0], E::Jmp),                  // jmp rax
        (&[0xff, 0x25, 0x10, 0, 0, 0], E::Jmp),   // jmp [rip+0x10]
        (&[0x74, 0x05], E::CondJump),             // je
        (&[0x0f, 0x85, 0, 1, 0, 0], E::CondJump), // jne rel32
        (&[0xe2, 0xfe], E::CondJump),             // loop
        (&[0xe3, 0x02], E::CondJump),             // jrcxz
        (&[0xe8, 0, 0, 0, 0], E::Call),
        (&[0x41, 0xff, 0xd3], E::Call),          // call r11
        (&[0xff, 0x15, 0x10, 0, 0, 0], E::Call), // call [rip+0x10]
        (&[0xc3], E::Ret),
        (&[0xc2, 0x08, 0x00], E::Ret),
    ];
    for &(bytes, kind) in cases {
        assert_eq!(class(bytes), Class::Emulated(kind), "{bytes:02x?}");
    }
}

#[test]
fn other_instructions_are_relocated() {
    use RelocatedKind as R;
    let cases: &[(&[u8], R)] = &[
        (&[0x48, 0x89, 0x7c, 0x24, 0x08], R::Plain), // mov [rsp+8], rdi
        (&[0x0f, 0xa2], R::Plain),                   // cpuid
        (&[0xf0, 0x48, 0x0f, 0xb1, 0x0f], R::Plain), // lock cmpxchg [rdi], rcx
        (&[0x0f, 0x0b], R::Plain),                   // ud2
        (&[0x48, 0x8b, 0x05, 0x10, 0, 0, 0], R::RipRelative), // mov rax, [rip+0x10]
        (&[0x83, 0x3d, 0x10, 0, 0, 0, 0x05], R::RipRelative), // cmp dword [rip+0x10], 5
        (&[0x0f, 0x05], R::Syscall),
    ];
    for &(bytes, kind) in cases {
        assert_eq!(class(bytes), Class::Relocated(kind), "{bytes:02x?}");
    }
}

#[test]
fn refusals_have_distinct_reasons() {
    assert_eq!(refusal(&[0xcc]), Refusal::Breakpoint);
    assert_eq!(refusal(&[0xcd, 0x80]), Refusal::Interrupt);
    assert_eq!(refusal(&[0xf1]), Refusal::Interrupt); // int1
    assert_eq!(refusal(&[0x48, 0xcf]), Refusal::InterruptReturn); // iretq
    assert_eq!(refusal(&[0x48, 0x0f, 0x07]), Refusal::InterruptReturn); // sysretq
    assert_eq!(refusal(&[0xf4]), Refusal::Privileged); // hlt
    assert_eq!(refusal(&[0xfa]), Refusal::Privileged); // cli
    assert_eq!(refusal(&[0xe6, 0x80]), Refusal::Privileged); // out 0x80, al
    assert_eq!(refusal(&[0x0f, 0x01, 0xf8]), Refusal::Privileged); // swapgs
    assert_eq!(refusal(&[0xcb]), Refusal::FarTransfer); // retf
    assert_eq!(refusal(&[0xff, 0x18]), Refusal::FarTransfer); // call far [rax]
    assert_eq!(refusal(&[0x8e, 0xd0]), Refusal::TrapShadow); // mov ss, ax
    assert_eq!(refusal(&[0xc7, 0xf8, 0, 0, 0, 0]), Refusal::Transactional); // xbegin
    assert_eq!(refusal(&[0x0f, 0x34]), Refusal::Sysenter);
    assert_eq!(refusal(&[0xff, 0xd4]), Refusal::NotRelocatable); // call rsp
    assert_eq!(refusal(&[0xff, 0x14, 0x24]), Refusal::NotRelocatable); // call [rsp]
}

#[test]
fn bad_input_gives_distinct_errors() {
    // Truncated: a 5-byte call with only 3 bytes.
    assert_eq!(
        plan(&[0xe8, 0, 0]),
        Err(AnalyzeError::Truncated {
            addr: BASE,
            at: BASE
        })
    );
    // Invalid opcode (0x06 is `push es`, invalid in 64-bit mode).
    assert_eq!(plan(&[0x06]), Err(AnalyzeError::Invalid { addr: BASE }));
    // Inside an instruction: `mov eax, 0x90909090` then `ret`; probing byte 1.
    let f = [0xb8, 0x90, 0x90, 0x90, 0x90, 0xc3];
    let code = Code {
        addr: BASE,
        bytes: &f,
    };
    assert_eq!(
        analyze(BASE + 1, code, Some(BASE..BASE + 6)),
        Err(AnalyzeError::NotBoundary {
            addr: BASE + 1,
            insn: BASE,
            len: 5
        })
    );
    // Without bounds the same byte decodes as a nop: the caller's word is taken.
    let p = analyze(BASE + 1, code, None).unwrap();
    assert!(!p.boundary_checked());
    let p = analyze(BASE + 5, code, Some(BASE..BASE + 6)).unwrap();
    assert!(p.boundary_checked());
    assert_eq!(p.class(), Class::Emulated(EmulatedKind::Ret));
    // Undecodable bytes between the function start and the address.
    let g = [0x06, 0x90, 0xc3];
    assert_eq!(
        analyze(
            BASE + 2,
            Code {
                addr: BASE,
                bytes: &g
            },
            Some(BASE..BASE + 3)
        ),
        Err(AnalyzeError::UndecodableBefore {
            addr: BASE + 2,
            at: BASE
        })
    );
    // Truncated on the way from the function start: the bytes end inside the `mov`
    // that covers the probed address.
    assert_eq!(
        analyze(
            BASE + 2,
            Code {
                addr: BASE,
                bytes: &f[..3]
            },
            Some(BASE..BASE + 6)
        ),
        Err(AnalyzeError::Truncated {
            addr: BASE + 2,
            at: BASE
        })
    );
    // Bytes that do not reach back to the function start, or do not cover the address.
    assert_eq!(
        analyze(
            BASE + 1,
            Code {
                addr: BASE + 1,
                bytes: &f[1..]
            },
            Some(BASE..BASE + 6)
        ),
        Err(AnalyzeError::OutOfBounds { addr: BASE + 1 })
    );
    assert_eq!(
        analyze(BASE + 8, code, None),
        Err(AnalyzeError::OutOfBounds { addr: BASE + 8 })
    );
    assert_eq!(
        analyze(BASE + 5, code, Some(BASE..BASE + 5)),
        Err(AnalyzeError::OutOfBounds { addr: BASE + 5 })
    );
}

#[test]
fn slot_out_of_reach_is_an_error_and_window_is_exact() {
    // mov rax, [rip+0x10] at BASE: reads BASE + 7 + 0x10.
    let p = plan(&[0x48, 0x8b, 0x05, 0x10, 0, 0, 0]).unwrap();
    let target = BASE + 7 + 0x10;
    let w = p.slot_window().expect("rip-relative has a window");
    for kind in [SlotKind::JumpBack, SlotKind::TrapAfter] {
        assert!(p.build_slot(kind, *w.start()).is_ok());
        assert!(p.build_slot(kind, *w.end()).is_ok());
        let far = w.end() + 1;
        assert_eq!(
            p.build_slot(kind, far),
            Err(SlotError::OutOfReach { slot: far, target })
        );
    }
    assert_eq!(
        p.build_slot(SlotKind::JumpBack, u64::MAX - 10),
        Err(SlotError::BadAddress {
            slot: u64::MAX - 10
        })
    );
    // No rip-relative operand: anywhere, even far away (absolute jump back).
    let q = plan(&[0x48, 0x89, 0x7c, 0x24, 0x08]).unwrap();
    assert!(q.slot_window().is_none());
    let s = q.build_slot(SlotKind::JumpBack, 0x7fff_0000_0000).unwrap();
    assert!(s.bytes().len() <= MAX_SLOT_LEN);
    // ret has no trap-after variant.
    let r = plan(&[0xc3]).unwrap();
    assert!(!r.has_trap_after_slot());
    assert_eq!(
        r.build_slot(SlotKind::TrapAfter, 0x1000),
        Err(SlotError::NoTrapAfter)
    );
}

#[test]
fn core_error_conversion_keeps_the_kind() {
    let e: multiprobe_core::Error = plan(&[0xcc]).unwrap_err().into();
    assert!(matches!(
        e,
        multiprobe_core::Error::AlreadyBreakpoint { addr: BASE }
    ));
    let f = [0xb8, 0x90, 0x90, 0x90, 0x90, 0xc3];
    let e = analyze(
        BASE + 2,
        Code {
            addr: BASE,
            bytes: &f,
        },
        Some(BASE..BASE + 6),
    )
    .unwrap_err();
    assert!(matches!(
        multiprobe_core::Error::from(e),
        multiprobe_core::Error::NotInstructionBoundary { addr, .. } if addr == BASE + 2
    ));
    let e: multiprobe_core::Error = plan(&[0xf4]).unwrap_err().into();
    assert!(matches!(
        e,
        multiprobe_core::Error::UnsupportedInstruction { .. }
    ));
}

#[test]
fn fixups_map_every_slot_boundary_and_reject_other_addresses() {
    use multiprobe_core::Regs;
    let slot_addr = 0x7000_0000;
    // call [rdi]: `push [rip+lit]` at 0, then `jmp [rdi]` at 6.
    let p = plan(&[0xff, 0x17]).unwrap();
    let s = p.build_slot(SlotKind::JumpBack, slot_addr).unwrap();
    let mut r = Regs {
        rip: slot_addr,
        rsp: 0x1000,
        ..Regs::default()
    };
    assert!(s.fixup_ip(&mut r));
    assert_eq!(
        (r.rip, r.rsp),
        (BASE, 0x1000),
        "before the push: nothing to undo"
    );
    let mut r = Regs {
        rip: slot_addr + 6,
        rsp: 0xff8,
        ..Regs::default()
    };
    assert!(s.fixup_ip(&mut r));
    assert_eq!((r.rip, r.rsp), (BASE, 0x1000), "after the push: undone");
    let mut r = Regs {
        rip: slot_addr + 3,
        ..Regs::default()
    };
    assert!(!s.fixup_ip(&mut r), "inside an instruction");
    assert_eq!(r.rip, slot_addr + 3, "unchanged on failure");

    // syscall: stopped after it, before the slot's `mov rcx`: rcx must be fixed.
    let p = plan(&[0x0f, 0x05]).unwrap();
    let s = p.build_slot(SlotKind::JumpBack, slot_addr).unwrap();
    let mut r = Regs {
        rip: slot_addr + 2,
        rcx: slot_addr + 2,
        ..Regs::default()
    };
    assert!(s.fixup_ip(&mut r));
    assert_eq!((r.rip, r.rcx), (BASE + 2, BASE + 2));

    // jcc trap-after: `jcc +1; int3 (fall through); int3 (taken)`.
    let p = plan(&[0x74, 0x10]).unwrap();
    let s = p.build_slot(SlotKind::TrapAfter, slot_addr).unwrap();
    assert_eq!(s.bytes(), &[0x74, 0x01, 0xcc, 0xcc]);
    let mut r = Regs::default();
    assert!(s.fixup_trap(slot_addr + 3, &mut r));
    assert_eq!(r.rip, BASE + 2);
    assert!(s.fixup_trap(slot_addr + 4, &mut r));
    assert_eq!(r.rip, BASE + 2 + 0x10);
    assert!(!s.fixup_trap(slot_addr + 1, &mut r), "not after an int3");
    assert!(
        !s.fixup_trap(slot_addr + 2, &mut r),
        "after the jcc, not an int3"
    );

    // call r11 trap-after resumes at the register's value.
    let p = plan(&[0x41, 0xff, 0xd3]).unwrap();
    let s = p.build_slot(SlotKind::TrapAfter, slot_addr).unwrap();
    let mut r = Regs {
        r11: 0x1234,
        ..Regs::default()
    };
    assert!(s.fixup_trap(slot_addr + 7, &mut r));
    assert_eq!(r.rip, 0x1234);

    // A far slot gets an absolute jump back, and still fits the bound.
    let p = plan(&[0x74, 0x10]).unwrap();
    let far = BASE + (1 << 40);
    let s = p.build_slot(SlotKind::JumpBack, far).unwrap();
    assert!(s.bytes().len() <= MAX_SLOT_LEN);
    assert!(
        s.bytes().windows(2).any(|w| w == [0xff, 0x25]),
        "{:02x?}",
        s.bytes()
    );
    assert!(s.contains(far) && !s.contains(far + s.bytes().len() as u64));
}
