//! The simulated instruction set: variable-length, byte-encoded, x86-flavoured.
//!
//! Every instruction starts with an opcode byte that fixes its length, so a probe can
//! land inside an instruction (the backend refuses that) and the breakpoint, like
//! `int3`, is one byte ([`BRK`]) written over the opcode. Register operands are the
//! core's [`Gpr`] numbers (low four bits of the operand byte). Relative branches count
//! from the end of the instruction, as on x86, so an instruction executed "out of line"
//! must be executed with its original address — [`execute`] takes it as `pc`.
//!
//! Invariants: [`decode`] never reads past `len()` bytes of what it accepted; [`execute`]
//! changes nothing (registers or memory) when it returns a fault; it writes memory at
//! most once, as the instruction's last effect.

use multiprobe_core::{Fault, Gpr, Regs};

/// The breakpoint opcode (`int3`).
pub const BRK: u8 = 0xCC;

/// `SIGILL`.
pub const SIGILL: i32 = 4;
/// `SIGTRAP`.
pub const SIGTRAP: i32 = 5;
/// `SIGFPE`.
pub const SIGFPE: i32 = 8;
/// `SIGSEGV`.
pub const SIGSEGV: i32 = 11;
/// `si_code` of an undefined opcode.
pub const ILL_ILLOPC: i32 = 1;
/// `si_code` of a breakpoint.
pub const TRAP_BRKPT: i32 = 1;
/// `si_code` of an integer division by zero.
pub const FPE_INTDIV: i32 = 1;
/// `si_code` of an access to unmapped memory.
pub const SEGV_MAPERR: i32 = 1;
/// `si_code` of an access the mapping does not permit.
pub const SEGV_ACCERR: i32 = 2;

/// One decoded instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Insn {
    /// `0x90`: nothing.
    Nop,
    /// `0x01 r lo hi`: `r = sign_extend(imm16)`.
    Movi(Gpr, i16),
    /// `0x02 d s`: `d += s` (wrapping).
    Add(Gpr, Gpr),
    /// `0x03 d s`: `d -= s`.
    Sub(Gpr, Gpr),
    /// `0x04 d s`: `d ^= s`.
    Xor(Gpr, Gpr),
    /// `0x05 d s`: `d *= s` (wrapping).
    Mul(Gpr, Gpr),
    /// `0x06 d s`: `d /= s`, unsigned; `SIGFPE` when `s == 0`.
    Div(Gpr, Gpr),
    /// `0x07 d imm8`: `d += sign_extend(imm8)`.
    Addi(Gpr, i8),
    /// `0x08 d s disp8`: `d = mem64[s + disp8]`.
    Load(Gpr, Gpr, i8),
    /// `0x09 d s disp8`: `mem64[d + disp8] = s`.
    Store(Gpr, Gpr, i8),
    /// `0x0A rel8`: jump.
    Jmp(i8),
    /// `0x0B r rel8`: jump if `r != 0`.
    Jnz(Gpr, i8),
    /// `0x0C rel8`: push the address of the next instruction, jump.
    Call(i8),
    /// `0x0D`: pop the return address and jump to it.
    Ret,
    /// `0x0E r`: `rsp -= 8; mem64[rsp] = r`.
    Push(Gpr),
    /// `0x0F r`: `r = mem64[rsp]; rsp += 8`.
    Pop(Gpr),
    /// `0x10`: the thread ends.
    Halt,
    /// `0x11`: always `SIGILL` (an instruction that faults).
    Ud,
    /// `0xCC`: breakpoint, `SIGTRAP`.
    Brk,
}

fn gpr(b: u8) -> Gpr {
    Gpr::from_number(b & 0x0f).expect("four bits name a register")
}

impl Insn {
    /// Encoded length in bytes.
    pub fn len(self) -> u64 {
        match self {
            Insn::Nop | Insn::Ret | Insn::Halt | Insn::Ud | Insn::Brk => 1,
            Insn::Jmp(_) | Insn::Call(_) | Insn::Push(_) | Insn::Pop(_) => 2,
            Insn::Add(..)
            | Insn::Sub(..)
            | Insn::Xor(..)
            | Insn::Mul(..)
            | Insn::Div(..)
            | Insn::Addi(..)
            | Insn::Jnz(..) => 3,
            Insn::Movi(..) | Insn::Load(..) | Insn::Store(..) => 4,
        }
    }

    /// Always false: no instruction is empty (for clippy's `len_without_is_empty`).
    pub fn is_empty(self) -> bool {
        false
    }

    /// Append the encoding to `out`.
    pub fn encode(self, out: &mut Vec<u8>) {
        let r = |g: Gpr| g as u8;
        match self {
            Insn::Nop => out.push(0x90),
            Insn::Movi(d, imm) => {
                let [lo, hi] = imm.to_le_bytes();
                out.extend([0x01, r(d), lo, hi]);
            }
            Insn::Add(d, s) => out.extend([0x02, r(d), r(s)]),
            Insn::Sub(d, s) => out.extend([0x03, r(d), r(s)]),
            Insn::Xor(d, s) => out.extend([0x04, r(d), r(s)]),
            Insn::Mul(d, s) => out.extend([0x05, r(d), r(s)]),
            Insn::Div(d, s) => out.extend([0x06, r(d), r(s)]),
            Insn::Addi(d, i) => out.extend([0x07, r(d), i as u8]),
            Insn::Load(d, s, i) => out.extend([0x08, r(d), r(s), i as u8]),
            Insn::Store(d, s, i) => out.extend([0x09, r(d), r(s), i as u8]),
            Insn::Jmp(i) => out.extend([0x0A, i as u8]),
            Insn::Jnz(c, i) => out.extend([0x0B, r(c), i as u8]),
            Insn::Call(i) => out.extend([0x0C, i as u8]),
            Insn::Ret => out.push(0x0D),
            Insn::Push(s) => out.extend([0x0E, r(s)]),
            Insn::Pop(d) => out.extend([0x0F, r(d)]),
            Insn::Halt => out.push(0x10),
            Insn::Ud => out.push(0x11),
            Insn::Brk => out.push(BRK),
        }
    }
}

/// Decode the instruction at the start of `bytes`. `None`: an undefined opcode, or
/// the bytes end inside the instruction.
pub fn decode(bytes: &[u8]) -> Option<Insn> {
    let b = |i: usize| bytes.get(i).copied();
    let insn = match b(0)? {
        0x90 => Insn::Nop,
        0x01 => Insn::Movi(gpr(b(1)?), i16::from_le_bytes([b(2)?, b(3)?])),
        0x02 => Insn::Add(gpr(b(1)?), gpr(b(2)?)),
        0x03 => Insn::Sub(gpr(b(1)?), gpr(b(2)?)),
        0x04 => Insn::Xor(gpr(b(1)?), gpr(b(2)?)),
        0x05 => Insn::Mul(gpr(b(1)?), gpr(b(2)?)),
        0x06 => Insn::Div(gpr(b(1)?), gpr(b(2)?)),
        0x07 => Insn::Addi(gpr(b(1)?), b(2)? as i8),
        0x08 => Insn::Load(gpr(b(1)?), gpr(b(2)?), b(3)? as i8),
        0x09 => Insn::Store(gpr(b(1)?), gpr(b(2)?), b(3)? as i8),
        0x0A => Insn::Jmp(b(1)? as i8),
        0x0B => Insn::Jnz(gpr(b(1)?), b(2)? as i8),
        0x0C => Insn::Call(b(1)? as i8),
        0x0D => Insn::Ret,
        0x0E => Insn::Push(gpr(b(1)?)),
        0x0F => Insn::Pop(gpr(b(1)?)),
        0x10 => Insn::Halt,
        0x11 => Insn::Ud,
        BRK => Insn::Brk,
        _ => return None,
    };
    Some(insn)
}

/// The fault an undefined opcode raises at `pc`.
pub fn illegal(pc: u64) -> Fault {
    Fault {
        signal: SIGILL,
        code: ILL_ILLOPC,
        addr: pc,
    }
}

/// Data memory as the program sees it. Accesses are 8 bytes, little-endian.
pub trait Bus {
    /// Load, or the fault the access raises.
    fn load(&self, addr: u64) -> Result<u64, Fault>;
    /// Store, or the fault the access raises.
    fn store(&self, addr: u64, value: u64) -> Result<(), Fault>;
}

/// A bus on which every access faults: executing on it succeeds exactly for the
/// instructions that touch no memory.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoBus;

impl Bus for NoBus {
    fn load(&self, addr: u64) -> Result<u64, Fault> {
        Err(Fault {
            signal: SIGSEGV,
            code: SEGV_MAPERR,
            addr,
        })
    }
    fn store(&self, addr: u64, _: u64) -> Result<(), Fault> {
        self.load(addr).map(drop)
    }
}

/// What an executed instruction did to control flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// `regs.rip` is the next instruction to run.
    Continue,
    /// The thread ended (`rip` is past the `halt`).
    Halt,
}

/// Execute `insn` as if it were at `pc`: registers (including `rip`) and memory change
/// as the instruction says, or nothing changes and the fault is returned.
pub fn execute(insn: Insn, pc: u64, regs: &mut Regs, bus: &dyn Bus) -> Result<Effect, Fault> {
    let next = pc.wrapping_add(insn.len());
    let rel = |i: i8| next.wrapping_add(i as i64 as u64);
    let mut r = *regs;
    r.rip = next;
    let mut effect = Effect::Continue;
    match insn {
        Insn::Nop => {}
        Insn::Movi(d, imm) => *r.gpr_mut(d) = imm as i64 as u64,
        Insn::Add(d, s) => *r.gpr_mut(d) = r.gpr(d).wrapping_add(r.gpr(s)),
        Insn::Sub(d, s) => *r.gpr_mut(d) = r.gpr(d).wrapping_sub(r.gpr(s)),
        Insn::Xor(d, s) => *r.gpr_mut(d) = r.gpr(d) ^ r.gpr(s),
        Insn::Mul(d, s) => *r.gpr_mut(d) = r.gpr(d).wrapping_mul(r.gpr(s)),
        Insn::Div(d, s) => {
            let divisor = r.gpr(s);
            if divisor == 0 {
                return Err(Fault {
                    signal: SIGFPE,
                    code: FPE_INTDIV,
                    addr: pc,
                });
            }
            *r.gpr_mut(d) = r.gpr(d) / divisor;
        }
        Insn::Addi(d, i) => *r.gpr_mut(d) = r.gpr(d).wrapping_add(i as i64 as u64),
        Insn::Load(d, s, i) => {
            let v = bus.load(r.gpr(s).wrapping_add(i as i64 as u64))?;
            *r.gpr_mut(d) = v;
        }
        Insn::Store(d, s, i) => bus.store(r.gpr(d).wrapping_add(i as i64 as u64), r.gpr(s))?,
        Insn::Jmp(i) => r.rip = rel(i),
        Insn::Jnz(c, i) => {
            if r.gpr(c) != 0 {
                r.rip = rel(i);
            }
        }
        Insn::Call(i) => {
            let sp = r.rsp.wrapping_sub(8);
            bus.store(sp, next)?;
            r.rsp = sp;
            r.rip = rel(i);
        }
        Insn::Ret => {
            let target = bus.load(r.rsp)?;
            r.rsp = r.rsp.wrapping_add(8);
            r.rip = target;
        }
        Insn::Push(s) => {
            let sp = r.rsp.wrapping_sub(8);
            bus.store(sp, r.gpr(s))?;
            r.rsp = sp;
        }
        Insn::Pop(d) => {
            let v = bus.load(r.rsp)?;
            r.rsp = r.rsp.wrapping_add(8);
            *r.gpr_mut(d) = v;
        }
        Insn::Halt => effect = Effect::Halt,
        Insn::Ud => return Err(illegal(pc)),
        Insn::Brk => {
            return Err(Fault {
                signal: SIGTRAP,
                code: TRAP_BRKPT,
                addr: pc,
            })
        }
    }
    *regs = r;
    Ok(effect)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all() -> Vec<Insn> {
        use Gpr::*;
        vec![
            Insn::Nop,
            Insn::Movi(R9, -3),
            Insn::Add(Rax, R15),
            Insn::Sub(Rcx, Rdx),
            Insn::Xor(Rsi, Rdi),
            Insn::Mul(R8, R8),
            Insn::Div(Rbx, R10),
            Insn::Addi(R11, -128),
            Insn::Load(R12, Rsp, 8),
            Insn::Store(R13, R14, -8),
            Insn::Jmp(-2),
            Insn::Jnz(Rbp, 5),
            Insn::Call(-100),
            Insn::Ret,
            Insn::Push(Rax),
            Insn::Pop(R15),
            Insn::Halt,
            Insn::Ud,
            Insn::Brk,
        ]
    }

    #[test]
    fn encode_decode_round_trip_with_declared_lengths() {
        for insn in all() {
            let mut b = Vec::new();
            insn.encode(&mut b);
            assert_eq!(b.len() as u64, insn.len(), "{insn:?}");
            assert_eq!(decode(&b), Some(insn));
            assert_eq!(decode(&b[..b.len() - 1]), None, "{insn:?} truncated");
        }
        assert_eq!(decode(&[0x00]), None);
    }

    #[test]
    fn faults_change_nothing_and_branches_count_from_the_end() {
        let mut r = Regs {
            rbx: 7,
            rip: 0x100,
            ..Regs::default()
        };
        let before = r;
        let f = execute(Insn::Div(Gpr::Rbx, Gpr::Rcx), 0x100, &mut r, &NoBus).unwrap_err();
        assert_eq!((f.signal, f.addr), (SIGFPE, 0x100));
        assert_eq!(r, before);
        let f = execute(Insn::Push(Gpr::Rbx), 0x100, &mut r, &NoBus).unwrap_err();
        assert_eq!(f.signal, SIGSEGV);
        assert_eq!(r, before);
        execute(Insn::Jmp(-2), 0x100, &mut r, &NoBus).unwrap();
        assert_eq!(r.rip, 0x100);
        execute(Insn::Jnz(Gpr::Rbx, 10), 0x200, &mut r, &NoBus).unwrap();
        assert_eq!(r.rip, 0x203 + 10);
    }
}
