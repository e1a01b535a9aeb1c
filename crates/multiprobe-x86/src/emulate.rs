//! Emulation: apply a [`Plan`]'s operation to the registers and memory directly.
//!
//! Runs inside signal handlers, so: no allocation, no locks, no panics on any input
//! (wrapping arithmetic throughout). Atomic with respect to failure: every memory read
//! happens before any write, and the only write (a push) happens before registers are
//! changed, so an error leaves registers and memory exactly as they were and the caller
//! can fall back to the slot, where the CPU raises the real fault.

use multiprobe_core::{Gpr, Memory, Regs};

use crate::error::EmulateError;
use crate::flags;
use crate::plan::{AluOp, LoopKind, Mem, Op, Plan, Seg, Src};

impl Plan {
    /// Execute the instruction by emulation: on success `regs` (including `rip`) and
    /// memory are as if the instruction had executed at [`Plan::addr`]. The stack
    /// writes of `push`/`call` go through [`Memory::write`]; `call` pushes the
    /// *original* return address ([`Plan::next`]).
    ///
    /// `regs.rip` is not consulted: the plan knows its address. On error nothing was
    /// changed. Async-signal-safe when `mem` is.
    #[inline]
    pub fn emulate(&self, regs: &mut Regs, mem: &dyn Memory) -> Result<(), EmulateError> {
        // The usual first instructions of a function (`endbr64`, `push rbp`) inline,
        // where the caller's `mem` may be known; the rest out of line.
        match self.op {
            Some(Op::Nop) => {}
            Some(Op::PushReg(r)) => {
                let v = regs.gpr(r);
                push(regs, mem, v)?;
            }
            _ => return self.emulate_any(regs, mem),
        }
        regs.rip = self.next();
        Ok(())
    }

    #[inline(never)]
    fn emulate_any(&self, regs: &mut Regs, mem: &dyn Memory) -> Result<(), EmulateError> {
        let op = self.op.ok_or(EmulateError::NotEmulated)?;
        let next = self.next();
        let mut rip = next;
        match op {
            Op::Nop => {}
            Op::PushReg(r) => {
                // `push rsp` pushes the value from before the push.
                let v = regs.gpr(r);
                push(regs, mem, v)?;
            }
            Op::PushImm(v) => push(regs, mem, v)?,
            Op::PopReg(r) => {
                let v = mem.read_u64(regs.rsp)?;
                regs.rsp = regs.rsp.wrapping_add(8);
                // `pop rsp` loads the popped value last, overriding the increment.
                *regs.gpr_mut(r) = v;
            }
            Op::Jmp(t) => rip = t,
            Op::Jcc(cc, t) => {
                if flags::condition(cc, regs.rflags) {
                    rip = t;
                }
            }
            Op::Loop {
                kind,
                count_size,
                target,
            } => rip = loop_step(regs, kind, count_size, target, next),
            Op::Call(t) => {
                push(regs, mem, next)?;
                rip = t;
            }
            Op::JmpReg(r) => rip = regs.gpr(r),
            Op::CallReg(r) => {
                // Read the target first: `call rsp` jumps to the old rsp.
                let t = regs.gpr(r);
                push(regs, mem, next)?;
                rip = t;
            }
            Op::JmpMem(m) => rip = mem.read_u64(address(regs, &m))?,
            Op::CallMem(m) => {
                let t = mem.read_u64(address(regs, &m))?;
                push(regs, mem, next)?;
                rip = t;
            }
            Op::Ret(n) => {
                rip = mem.read_u64(regs.rsp)?;
                regs.rsp = regs.rsp.wrapping_add(8 + u64::from(n));
            }
            Op::MovRR { dst, src, size } => {
                let v = regs.gpr(src);
                set(regs, dst, v, size);
            }
            Op::MovRI { dst, imm, size } => set(regs, dst, imm, size),
            Op::Lea { dst, mem: m, size } => {
                // lea computes the offset only: no segment base.
                let a = offset(regs, &m);
                set(regs, dst, a, size);
            }
            Op::Alu { op, dst, src, size } => alu(regs, op, dst, src, size),
        }
        regs.rip = rip;
        Ok(())
    }
}

#[inline]
fn push(regs: &mut Regs, mem: &dyn Memory, v: u64) -> Result<(), EmulateError> {
    let sp = regs.rsp.wrapping_sub(8);
    mem.write_u64(sp, v)?;
    regs.rsp = sp;
    Ok(())
}

/// Write a 32- or 64-bit result; 32-bit writes zero the upper half, as the CPU does.
fn set(regs: &mut Regs, r: Gpr, v: u64, size: u8) {
    *regs.gpr_mut(r) = if size == 4 { v & 0xffff_ffff } else { v };
}

/// The effective address without segment base (what `lea` computes).
fn offset(regs: &Regs, m: &Mem) -> u64 {
    let mut a = m.disp;
    if let Some(b) = m.base {
        a = a.wrapping_add(regs.gpr(b));
    }
    if let Some(i) = m.index {
        a = a.wrapping_add(regs.gpr(i).wrapping_mul(u64::from(m.scale)));
    }
    if m.addr_size == 4 {
        a &= 0xffff_ffff;
    }
    a
}

/// The linear address of a memory operand (segment base included).
pub(crate) fn address(regs: &Regs, m: &Mem) -> u64 {
    let a = offset(regs, m);
    match m.seg {
        Seg::None => a,
        Seg::Fs => a.wrapping_add(regs.fs_base),
        Seg::Gs => a.wrapping_add(regs.gs_base),
    }
}

fn loop_step(regs: &mut Regs, kind: LoopKind, count_size: u8, target: u64, next: u64) -> u64 {
    let mask = if count_size == 4 {
        0xffff_ffff
    } else {
        u64::MAX
    };
    let zf = regs.rflags & flags::ZF != 0;
    let taken = if kind == LoopKind::Jrcxz {
        regs.rcx & mask == 0
    } else {
        // loop* decrements the counter without touching flags; with the 32-bit form
        // the write to ecx zeroes the upper half of rcx.
        let c = regs.rcx.wrapping_sub(1) & mask;
        regs.rcx = c;
        c != 0
            && match kind {
                LoopKind::Loope => zf,
                LoopKind::Loopne => !zf,
                _ => true,
            }
    };
    if taken {
        target
    } else {
        next
    }
}

fn alu(regs: &mut Regs, op: AluOp, dst: Gpr, src: Src, size: u8) {
    let a = regs.gpr(dst);
    let b = match src {
        Src::Reg(r) => regs.gpr(r),
        Src::Imm(v) => v,
    };
    let (res, fl) = flags::alu(op, a, b, size);
    regs.rflags = (regs.rflags & !flags::ARITH) | fl;
    if !matches!(op, AluOp::Cmp | AluOp::Test) {
        set(regs, dst, res, size);
    }
}
