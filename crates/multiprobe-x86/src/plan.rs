//! What analysis produces: a [`Plan`] for one probed instruction.
//!
//! A plan is plain `Copy` data — no heap, no pointers — so a backend can keep it in its
//! per-site data and use it from a signal handler. It holds two independent recipes:
//!
//! * an optional emulation ([`Op`]), applied to [`multiprobe_core::Regs`] and memory
//!   directly, so the hit needs no out-of-line execution at all;
//! * always, a relocation ([`Reloc`]) from which slots are built
//!   ([`Plan::build_slot`]). An emulated instruction keeps a slot as its fallback:
//!   when emulation's memory access fails, running the slot makes the CPU raise the
//!   real fault.

use std::fmt;

use multiprobe_core::Gpr;

/// Longest x86 instruction.
pub const MAX_INSN_LEN: usize = 15;

/// Operand size of an emulated integer operation, in bytes (4 or 8). 32-bit results
/// are zero-extended into the 64-bit register, as the CPU does.
pub(crate) type Size = u8;

/// A memory operand, resolved at analysis time as far as it can be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Mem {
    /// Base register; `None` for absolute and RIP-relative operands (whose absolute
    /// address is then in `disp`).
    pub base: Option<Gpr>,
    pub index: Option<Gpr>,
    pub scale: u8,
    pub disp: u64,
    /// `fs:`/`gs:` override (the only segments with a base in 64-bit mode).
    pub seg: Seg,
    /// 4 with an address-size (`0x67`) prefix: the effective address wraps at 32 bits.
    pub addr_size: u8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Seg {
    None,
    Fs,
    Gs,
}

/// Condition of a `jcc`, in the hardware's 4-bit encoding (`0x70 | cc`).
pub(crate) type Cond = u8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum LoopKind {
    Loop,
    Loope,
    Loopne,
    Jrcxz,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum AluOp {
    Add,
    Sub,
    And,
    Or,
    Xor,
    /// `sub` without writing the result.
    Cmp,
    /// `and` without writing the result.
    Test,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Src {
    Reg(Gpr),
    /// Already sign-extended to 64 bits, as the CPU does for imm8/imm32 operands.
    Imm(u64),
}

/// An emulated operation. Targets are absolute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    Nop,
    PushReg(Gpr),
    PushImm(u64),
    PopReg(Gpr),
    Jmp(u64),
    Jcc(Cond, u64),
    Loop {
        kind: LoopKind,
        /// 4 for the `ecx` forms (address-size prefix), 8 for `rcx`.
        count_size: u8,
        target: u64,
    },
    Call(u64),
    JmpReg(Gpr),
    CallReg(Gpr),
    JmpMem(Mem),
    CallMem(Mem),
    Ret(u16),
    MovRR {
        dst: Gpr,
        src: Gpr,
        size: Size,
    },
    MovRI {
        dst: Gpr,
        imm: u64,
        size: Size,
    },
    Lea {
        dst: Gpr,
        mem: Mem,
        size: Size,
    },
    Alu {
        op: AluOp,
        dst: Gpr,
        src: Src,
        size: Size,
    },
}

/// How the instruction is placed in a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reloc {
    /// The bytes as they are, optionally with a RIP-relative displacement at `disp_off`
    /// re-targeted to `target`.
    Copy {
        rip_rel: Option<RipRel>,
    },
    /// `syscall`: the kernel stores the address after it in `rcx`; the slot puts the
    /// original one there.
    Syscall,
    Jmp(u64),
    Jcc(Cond, u64),
    /// `loop*`/`jrcxz`: rel8 only; the slot keeps the original opcode and prefixes
    /// (every byte but the last) and points the rel8 inside the slot.
    Loop {
        target: u64,
    },
    Call(u64),
    CallReg(Gpr),
    /// `call [mem]`: the slot pushes the original return address, then jumps through
    /// the same operand (`ff /2` becomes `ff /4`).
    CallMem {
        modrm_off: u8,
        rip_rel: Option<RipRel>,
        /// The operand is `rsp`-based: its displacement grows by 8 after the push.
        rsp_disp: Option<RspDisp>,
    },
    /// `jmp reg`: copied; a trap-after slot resumes at the register's value.
    JmpReg(Gpr),
    /// `ret`, `jmp [mem]`: copied (RIP-relative re-targeted); no trap-after variant.
    Leaves {
        rip_rel: Option<RipRel>,
    },
}

/// A RIP-relative displacement to re-target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RipRel {
    pub disp_off: u8,
    pub target: u64,
}

/// An `rsp`-based displacement to adjust by 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RspDisp {
    pub off: u8,
    /// 1 or 4 bytes.
    pub size: u8,
}

/// How a hit on this instruction is served, for reporting and for backends that want
/// to know.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// Emulated: applied to registers and memory; no slot needed.
    Emulated(EmulatedKind),
    /// Executed out of line from a slot.
    Relocated(RelocatedKind),
}

/// Which family of emulated instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[allow(missing_docs)]
pub enum EmulatedKind {
    /// `nop`, multi-byte `nop`, `endbr64`, `pause`.
    Nop,
    Push,
    Pop,
    /// `jmp rel`, `jmp reg`, `jmp [mem]`.
    Jmp,
    /// `jcc`, `loop*`, `jrcxz`.
    CondJump,
    /// `call rel32`, `call reg`, `call [mem]`.
    Call,
    Ret,
    /// `mov reg, reg` / `mov reg, imm`.
    Mov,
    /// `lea` (no memory access).
    Lea,
    /// `add`/`sub`/`and`/`or`/`xor`/`cmp`/`test` on registers and immediates.
    Alu,
}

/// Which family of relocated instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RelocatedKind {
    /// Copied as is: nothing in it depends on its address.
    Plain,
    /// Has a RIP-relative memory operand, re-targeted for the slot.
    RipRelative,
    /// `syscall`: copied, then `rcx` is set to the original return address.
    Syscall,
}

/// The analysis of one probed instruction: how to emulate it (if it can be) and how to
/// build its out-of-line slots. `Copy`, heap-free and small.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    pub(crate) addr: u64,
    pub(crate) len: u8,
    pub(crate) bytes: [u8; MAX_INSN_LEN],
    pub(crate) op: Option<Op>,
    pub(crate) reloc: Reloc,
    pub(crate) boundary_checked: bool,
    pub(crate) mnemonic: iced_x86::Mnemonic,
}

impl Plan {
    /// The probed address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length of the instruction in bytes.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always false: an instruction has at least one byte. (For clippy's `len` rule.)
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The original instruction bytes (what the breakpoint displaces; restore exactly
    /// these on disarm).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len()]
    }

    /// Address of the next instruction in the original code.
    #[inline]
    pub fn next(&self) -> u64 {
        self.addr.wrapping_add(u64::from(self.len))
    }

    /// Whether [`Plan::emulate`] applies. Otherwise every hit runs a slot.
    #[inline]
    pub fn is_emulated(&self) -> bool {
        self.op.is_some()
    }

    /// Whether the address was verified to be an instruction boundary by decoding from
    /// the function start (false when no function bounds were given).
    pub fn boundary_checked(&self) -> bool {
        self.boundary_checked
    }

    /// Whether [`crate::SlotKind::TrapAfter`] slots can be built. False for `ret`,
    /// `jmp [mem]` and `call [mem]`, which leave the slot through a target known only
    /// at run time; they are always emulated, and post-handlers run after emulation.
    pub fn has_trap_after_slot(&self) -> bool {
        !matches!(self.reloc, Reloc::Leaves { .. } | Reloc::CallMem { .. })
    }

    /// How hits are served, for reports.
    pub fn class(&self) -> Class {
        use EmulatedKind as E;
        match self.op {
            Some(op) => Class::Emulated(match op {
                Op::Nop => E::Nop,
                Op::PushReg(_) | Op::PushImm(_) => E::Push,
                Op::PopReg(_) => E::Pop,
                Op::Jmp(_) | Op::JmpReg(_) | Op::JmpMem(_) => E::Jmp,
                Op::Jcc(..) | Op::Loop { .. } => E::CondJump,
                Op::Call(_) | Op::CallReg(_) | Op::CallMem(_) => E::Call,
                Op::Ret(_) => E::Ret,
                Op::MovRR { .. } | Op::MovRI { .. } => E::Mov,
                Op::Lea { .. } => E::Lea,
                Op::Alu { .. } => E::Alu,
            }),
            None => Class::Relocated(match self.reloc {
                Reloc::Syscall => RelocatedKind::Syscall,
                Reloc::Copy { rip_rel: Some(_) } => RelocatedKind::RipRelative,
                _ => RelocatedKind::Plain,
            }),
        }
    }

    /// The mnemonic, lower case (`"push"`), for messages.
    pub fn mnemonic(&self) -> String {
        format!("{:?}", self.mnemonic).to_lowercase()
    }

    /// The instruction in Intel syntax, for messages. Allocates.
    pub fn disassemble(&self) -> String {
        crate::analyze::format(self.bytes(), self.addr)
    }
}

impl fmt::Debug for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Plan")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("insn", &self.disassemble())
            .field("class", &self.class())
            .finish()
    }
}
