//! Decoding, the boundary check and classification: bytes in, [`Plan`] or a distinct
//! [`AnalyzeError`] out.
//!
//! The boundary check follows kprobes' `can_probe`: when the enclosing function is
//! known, decode from its first byte and accept the address only if an instruction
//! starts exactly there. x86 code has no alignment, so this is the only way to know;
//! without function bounds the caller's word is taken ([`Plan::boundary_checked`]).
//!
//! Invariant: the bytes given are the *original* code. A backend that has armed
//! breakpoints inside the function must pass a copy with their original bytes put
//! back, or decoding from the function start desynchronises at its own `int3`s.

use std::ops::Range;

use iced_x86::{
    Code as C, Decoder, DecoderError, DecoderOptions, FlowControl, Formatter, Instruction,
    IntelFormatter, MemorySize, Mnemonic, OpKind, Register,
};
use multiprobe_core::Gpr;

use crate::error::{AnalyzeError, Refusal};
use crate::plan::{AluOp, LoopKind, Mem, Op, Plan, Reloc, RipRel, RspDisp, Seg, Src, MAX_INSN_LEN};

/// Code bytes and the address of the first one.
#[derive(Clone, Copy, Debug)]
pub struct Code<'a> {
    /// Address of `bytes[0]`.
    pub addr: u64,
    /// The original code (see the module docs about breakpoints already inserted).
    pub bytes: &'a [u8],
}

impl Code<'_> {
    /// The addresses it covers, `addr..addr + bytes.len()` (as the `func` of a function
    /// that is all of it).
    pub fn range(&self) -> Range<u64> {
        self.addr..self.addr + self.bytes.len() as u64
    }
}

/// Analyze the instruction at `addr`.
///
/// `code` must cover `addr` and at least the instruction's bytes (up to
/// [`MAX_INSN_LEN`] after `addr`, or to the end of the mapping). With `func` (the
/// enclosing function's `start..end`, e.g. from an ELF symbol), `code` must also
/// cover `func.start..addr`, and `addr` is checked to be an instruction boundary.
pub fn analyze(addr: u64, code: Code<'_>, func: Option<Range<u64>>) -> Result<Plan, AnalyzeError> {
    let oob = AnalyzeError::OutOfBounds { addr };
    let end = code.addr.checked_add(code.bytes.len() as u64).ok_or(oob)?;
    if addr < code.addr || addr >= end {
        return Err(oob);
    }
    let checked = match func {
        Some(f) => {
            if !f.contains(&addr) || f.start < code.addr {
                return Err(oob);
            }
            check_boundary(addr, code, f.start)?;
            true
        }
        None => false,
    };
    let off = (addr - code.addr) as usize;
    let rest = &code.bytes[off..];
    let window = &rest[..rest.len().min(MAX_INSN_LEN)];
    let mut dec = Decoder::with_ip(64, window, addr, DecoderOptions::NONE);
    let insn = dec.decode();
    if insn.is_invalid() {
        return Err(match dec.last_error() {
            DecoderError::NoMoreBytes if is_truncated(window) => {
                AnalyzeError::Truncated { addr, at: addr }
            }
            _ => AnalyzeError::Invalid { addr },
        });
    }
    let offsets = dec.get_constant_offsets(&insn);
    let mut bytes = [0u8; MAX_INSN_LEN];
    bytes[..insn.len()].copy_from_slice(&window[..insn.len()]);
    let refuse = |reason| AnalyzeError::Refused { addr, reason };
    let reloc = relocation(&insn, &bytes, &offsets).map_err(refuse)?;
    Ok(Plan {
        addr,
        len: insn.len() as u8,
        bytes,
        op: emulation(&insn),
        reloc,
        boundary_checked: checked,
        mnemonic: insn.mnemonic(),
    })
}

/// Decode from `start` until reaching `addr` (Ok) or passing it (NotBoundary).
fn check_boundary(addr: u64, code: Code<'_>, start: u64) -> Result<(), AnalyzeError> {
    let from = (start - code.addr) as usize;
    // Only the bytes up to the probed address matter; decoding the instruction that
    // covers it may need up to MAX_INSN_LEN - 1 more.
    let upto = ((addr - code.addr) as usize + MAX_INSN_LEN).min(code.bytes.len());
    let mut dec = Decoder::with_ip(64, &code.bytes[from..upto], start, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    loop {
        let ip = dec.ip();
        if ip == addr {
            return Ok(());
        }
        dec.decode_out(&mut insn);
        if insn.is_invalid() {
            let rest = &code.bytes[(ip - code.addr) as usize..upto];
            return Err(match dec.last_error() {
                DecoderError::NoMoreBytes if is_truncated(rest) => {
                    AnalyzeError::Truncated { addr, at: ip }
                }
                _ => AnalyzeError::UndecodableBefore { addr, at: ip },
            });
        }
        if dec.ip() > addr {
            return Err(AnalyzeError::NotBoundary {
                addr,
                insn: ip,
                len: insn.len() as u8,
            });
        }
    }
}

/// The decoder ran out of `bytes`: is that because the instruction is longer than
/// them (truncated), or because it is invalid anyway? iced may read ahead before
/// deciding an opcode is invalid, so decode again with the bytes padded to the
/// maximum length: a valid instruction longer than `bytes` means truncation.
fn is_truncated(bytes: &[u8]) -> bool {
    if bytes.len() >= MAX_INSN_LEN {
        return false;
    }
    let mut padded = [0u8; MAX_INSN_LEN];
    padded[..bytes.len()].copy_from_slice(bytes);
    let insn = Decoder::new(64, &padded, DecoderOptions::NONE).decode();
    !insn.is_invalid() && insn.len() > bytes.len()
}

/// Intel-syntax text of the instruction at the start of `bytes`.
pub(crate) fn format(bytes: &[u8], addr: u64) -> String {
    let insn = Decoder::with_ip(64, bytes, addr, DecoderOptions::NONE).decode();
    let mut out = String::new();
    IntelFormatter::new().format(&insn, &mut out);
    out
}

pub(crate) fn gpr(r: Register) -> Option<Gpr> {
    use Register as R;
    Some(match r.full_register() {
        R::RAX => Gpr::Rax,
        R::RCX => Gpr::Rcx,
        R::RDX => Gpr::Rdx,
        R::RBX => Gpr::Rbx,
        R::RSP => Gpr::Rsp,
        R::RBP => Gpr::Rbp,
        R::RSI => Gpr::Rsi,
        R::RDI => Gpr::Rdi,
        R::R8 => Gpr::R8,
        R::R9 => Gpr::R9,
        R::R10 => Gpr::R10,
        R::R11 => Gpr::R11,
        R::R12 => Gpr::R12,
        R::R13 => Gpr::R13,
        R::R14 => Gpr::R14,
        R::R15 => Gpr::R15,
        _ => return None,
    })
}

/// A 32- or 64-bit general-purpose register operand and its size.
fn gpr_sized(r: Register) -> Option<(Gpr, u8)> {
    if r.is_gpr64() {
        gpr(r).map(|g| (g, 8))
    } else if r.is_gpr32() {
        gpr(r).map(|g| (g, 4))
    } else {
        None
    }
}

/// The memory operand, if the emulator can compute its address.
fn mem_operand(insn: &Instruction) -> Option<Mem> {
    let seg = match insn.memory_segment() {
        Register::FS => Seg::Fs,
        Register::GS => Seg::Gs,
        _ => Seg::None,
    };
    let (base, addr_size) = match insn.memory_base() {
        // iced resolves RIP-relative displacements to the absolute address.
        Register::RIP | Register::None => (None, 8),
        Register::EIP => return None,
        r if r.is_gpr64() => (Some(gpr(r)?), 8),
        r if r.is_gpr32() => (Some(gpr(r)?), 4),
        _ => return None,
    };
    let index = match insn.memory_index() {
        Register::None => None,
        r if r.is_gpr64() || r.is_gpr32() => Some(gpr(r)?),
        _ => return None, // vector index (VSIB)
    };
    let addr_size = if insn.memory_index().is_gpr32() {
        4
    } else {
        addr_size
    };
    Some(Mem {
        base,
        index,
        scale: insn.memory_index_scale() as u8,
        disp: insn.memory_displacement64(),
        seg,
        addr_size,
    })
}

/// A near branch with a 64-bit target (not a 16-bit operand-size form, whose target
/// wraps at 64 KiB).
fn near64(insn: &Instruction) -> bool {
    insn.op0_kind() == OpKind::NearBranch64
}

fn is_reg(insn: &Instruction, n: u32) -> bool {
    insn.op_kind(n) == OpKind::Register
}

fn imm_operand(insn: &Instruction, n: u32) -> Option<u64> {
    match insn.op_kind(n) {
        OpKind::Immediate8
        | OpKind::Immediate8to32
        | OpKind::Immediate8to64
        | OpKind::Immediate32
        | OpKind::Immediate32to64
        | OpKind::Immediate64 => Some(insn.immediate(n)),
        _ => None,
    }
}

/// The emulation of `insn`, if it is one this crate emulates.
fn emulation(insn: &Instruction) -> Option<Op> {
    if insn.has_lock_prefix() || insn.has_xacquire_prefix() || insn.has_xrelease_prefix() {
        return None;
    }
    let target = insn.near_branch_target();
    Some(match insn.code() {
        C::Nopw | C::Nopd | C::Nopq | C::Nop_rm16 | C::Nop_rm32 | C::Nop_rm64 => Op::Nop,
        C::Endbr64 | C::Endbr32 | C::Pause => Op::Nop,
        C::Push_r64 => Op::PushReg(gpr(insn.op0_register())?),
        C::Push_rm64 if is_reg(insn, 0) => Op::PushReg(gpr(insn.op0_register())?),
        C::Pushq_imm8 | C::Pushq_imm32 => Op::PushImm(insn.immediate(0)),
        C::Pop_r64 => Op::PopReg(gpr(insn.op0_register())?),
        C::Pop_rm64 if is_reg(insn, 0) => Op::PopReg(gpr(insn.op0_register())?),
        C::Jmp_rel8_64 | C::Jmp_rel32_64 => Op::Jmp(target),
        C::Call_rel32_64 => Op::Call(target),
        C::Jmp_rm64 if is_reg(insn, 0) => Op::JmpReg(gpr(insn.op0_register())?),
        C::Call_rm64 if is_reg(insn, 0) => Op::CallReg(gpr(insn.op0_register())?),
        C::Jmp_rm64 => Op::JmpMem(mem_operand(insn)?),
        C::Call_rm64 => Op::CallMem(mem_operand(insn)?),
        C::Retnq => Op::Ret(0),
        C::Retnq_imm16 => Op::Ret(insn.immediate16()),
        c if c.is_jcc_short_or_near() && near64(insn) => {
            Op::Jcc(insn.condition_code() as u8 - 1, target)
        }
        _ if loop_op(insn, target).is_some() => loop_op(insn, target)?,
        C::Lea_r64_m | C::Lea_r32_m => {
            let (dst, size) = gpr_sized(insn.op0_register())?;
            Op::Lea {
                dst,
                mem: mem_operand(insn)?,
                size,
            }
        }
        _ => match insn.mnemonic() {
            Mnemonic::Mov => mov_op(insn)?,
            Mnemonic::Add => alu_op(insn, AluOp::Add)?,
            Mnemonic::Sub => alu_op(insn, AluOp::Sub)?,
            Mnemonic::And => alu_op(insn, AluOp::And)?,
            Mnemonic::Or => alu_op(insn, AluOp::Or)?,
            Mnemonic::Xor => alu_op(insn, AluOp::Xor)?,
            Mnemonic::Cmp => alu_op(insn, AluOp::Cmp)?,
            Mnemonic::Test => alu_op(insn, AluOp::Test)?,
            _ => return None,
        },
    })
}

fn loop_op(insn: &Instruction, target: u64) -> Option<Op> {
    use C::*;
    let (kind, count_size) = match insn.code() {
        Loop_rel8_64_RCX => (LoopKind::Loop, 8),
        Loop_rel8_64_ECX => (LoopKind::Loop, 4),
        Loope_rel8_64_RCX => (LoopKind::Loope, 8),
        Loope_rel8_64_ECX => (LoopKind::Loope, 4),
        Loopne_rel8_64_RCX => (LoopKind::Loopne, 8),
        Loopne_rel8_64_ECX => (LoopKind::Loopne, 4),
        Jrcxz_rel8_64 => (LoopKind::Jrcxz, 8),
        Jecxz_rel8_64 => (LoopKind::Jrcxz, 4),
        _ => return None,
    };
    Some(Op::Loop {
        kind,
        count_size,
        target,
    })
}

fn mov_op(insn: &Instruction) -> Option<Op> {
    if !is_reg(insn, 0) {
        return None;
    }
    let (dst, size) = gpr_sized(insn.op0_register())?;
    if is_reg(insn, 1) {
        let (src, s2) = gpr_sized(insn.op1_register())?;
        (s2 == size).then_some(Op::MovRR { dst, src, size })
    } else {
        Some(Op::MovRI {
            dst,
            imm: imm_operand(insn, 1)?,
            size,
        })
    }
}

fn alu_op(insn: &Instruction, op: AluOp) -> Option<Op> {
    if !is_reg(insn, 0) {
        return None;
    }
    let (dst, size) = gpr_sized(insn.op0_register())?;
    let src = if is_reg(insn, 1) {
        let (src, s2) = gpr_sized(insn.op1_register())?;
        if s2 != size {
            return None;
        }
        Src::Reg(src)
    } else {
        Src::Imm(imm_operand(insn, 1)?)
    };
    Some(Op::Alu { op, dst, src, size })
}

/// How to run `insn` out of line, or why it cannot be probed at all.
fn relocation(
    insn: &Instruction,
    bytes: &[u8; MAX_INSN_LEN],
    offsets: &iced_x86::ConstantOffsets,
) -> Result<Reloc, Refusal> {
    refusal(insn)?;
    let rip_rel = if insn.is_ip_rel_memory_operand() {
        if insn.memory_base() != Register::RIP {
            return Err(Refusal::NotRelocatable); // EIP-relative (0x67 prefix)
        }
        Some(RipRel {
            disp_off: offsets.displacement_offset() as u8,
            target: insn.ip_rel_memory_address(),
        })
    } else {
        None
    };
    let target = insn.near_branch_target();
    Ok(match insn.code() {
        C::Syscall => Reloc::Syscall,
        C::Jmp_rel8_64 | C::Jmp_rel32_64 => Reloc::Jmp(target),
        C::Call_rel32_64 => Reloc::Call(target),
        c if c.is_jcc_short_or_near() && near64(insn) => {
            Reloc::Jcc(insn.condition_code() as u8 - 1, target)
        }
        _ if loop_op(insn, target).is_some() => Reloc::Loop { target },
        C::Jmp_rm64 if is_reg(insn, 0) => {
            Reloc::JmpReg(gpr(insn.op0_register()).ok_or(Refusal::NotRelocatable)?)
        }
        C::Call_rm64 if is_reg(insn, 0) => match gpr(insn.op0_register()) {
            // After the slot's push, `rsp` no longer holds the target.
            Some(Gpr::Rsp) | None => return Err(Refusal::NotRelocatable),
            Some(r) => Reloc::CallReg(r),
        },
        C::Call_rm64 => call_mem(insn, bytes, offsets, rip_rel)?,
        C::Jmp_rm64 | C::Retnq | C::Retnq_imm16 => Reloc::Leaves { rip_rel },
        _ => match insn.flow_control() {
            FlowControl::Next | FlowControl::Exception | FlowControl::XbeginXabortXend => {
                Reloc::Copy { rip_rel }
            }
            // Anything else that transfers control and was not handled above
            // (16-bit near forms, vmcall-like calls, ...) cannot be copied blindly.
            _ => return Err(Refusal::NotRelocatable),
        },
    })
}

/// Instructions refused outright, whatever their encoding.
fn refusal(insn: &Instruction) -> Result<(), Refusal> {
    use Mnemonic as M;
    match insn.mnemonic() {
        M::Int3 => return Err(Refusal::Breakpoint),
        M::Int | M::Int1 | M::Into => return Err(Refusal::Interrupt),
        M::Iret
        | M::Iretd
        | M::Iretq
        | M::Sysret
        | M::Sysretq
        | M::Sysexit
        | M::Sysexitq
        | M::Uiret => return Err(Refusal::InterruptReturn),
        M::Retf => return Err(Refusal::FarTransfer),
        M::Xbegin => return Err(Refusal::Transactional),
        M::Sysenter => return Err(Refusal::Sysenter),
        _ => {}
    }
    if insn.is_privileged() {
        return Err(Refusal::Privileged);
    }
    let far_mem = matches!(
        insn.memory_size(),
        MemorySize::SegPtr16 | MemorySize::SegPtr32 | MemorySize::SegPtr64
    );
    let far_op = matches!(insn.op0_kind(), OpKind::FarBranch16 | OpKind::FarBranch32);
    if matches!(insn.mnemonic(), M::Call | M::Jmp) && (far_mem || far_op) {
        return Err(Refusal::FarTransfer);
    }
    if insn.mnemonic() == M::Mov && is_reg(insn, 0) && insn.op0_register() == Register::SS {
        return Err(Refusal::TrapShadow);
    }
    if matches!(insn.flow_control(), FlowControl::Interrupt) {
        return Err(Refusal::Interrupt);
    }
    Ok(())
}

/// `call [mem]`: the slot turns it into `push <return address>; jmp [mem]`.
fn call_mem(
    insn: &Instruction,
    bytes: &[u8; MAX_INSN_LEN],
    offsets: &iced_x86::ConstantOffsets,
    rip_rel: Option<RipRel>,
) -> Result<Reloc, Refusal> {
    // The ModRM byte follows the 0xff opcode; prefixes (segment, REX, ...) precede it.
    let op_pos = bytes[..insn.len()]
        .iter()
        .position(|&b| b == 0xff)
        .ok_or(Refusal::NotRelocatable)?;
    let modrm_off = (op_pos + 1) as u8;
    let uses_rsp = insn.memory_base().full_register() == Register::RSP;
    let rsp_disp = if uses_rsp {
        // The push moves rsp down by 8, so an rsp-based operand needs disp + 8. Without
        // a displacement byte there is nothing to adjust in place.
        if !offsets.has_displacement() {
            return Err(Refusal::NotRelocatable);
        }
        let size = offsets.displacement_size() as u8;
        let off = offsets.displacement_offset() as u8;
        if size == 1 && (bytes[usize::from(off)] as i8).checked_add(8).is_none() {
            return Err(Refusal::NotRelocatable);
        }
        if size == 4 {
            let d = i32::from_le_bytes(bytes[usize::from(off)..][..4].try_into().unwrap());
            d.checked_add(8).ok_or(Refusal::NotRelocatable)?;
        }
        Some(RspDisp { off, size })
    } else {
        None
    };
    Ok(Reloc::CallMem {
        modrm_off,
        rip_rel,
        rsp_disp,
    })
}
