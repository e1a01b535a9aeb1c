//! Everything that can go wrong, each case its own variant so that callers (and the
//! coverage report) can tell them apart without parsing strings.
//!
//! All error types are `Copy` and carry no heap data: [`EmulateError`] in particular is
//! produced inside a signal handler.

use multiprobe_core::MemoryError;

/// Why [`crate::analyze`] could not produce a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AnalyzeError {
    /// The bytes end before the instruction at `at` is complete (`at` may be the probed
    /// address or an instruction on the way there from the function start). Read more.
    #[error("the code bytes end inside the instruction at {at:#x} (probing {addr:#x})")]
    Truncated {
        /// The probed address.
        addr: u64,
        /// Start of the incomplete instruction.
        at: u64,
    },
    /// The probed address is inside an instruction, not at its start.
    #[error("{addr:#x} is inside the {len}-byte instruction at {insn:#x}")]
    NotBoundary {
        /// The probed address.
        addr: u64,
        /// Start of the instruction that covers it.
        insn: u64,
        /// That instruction's length.
        len: u8,
    },
    /// The bytes at the probed address are not a valid x86-64 instruction.
    #[error("invalid instruction at {addr:#x}")]
    Invalid {
        /// The probed address.
        addr: u64,
    },
    /// Decoding from the function start met bytes that are not an instruction before
    /// reaching the probed address, so the boundary cannot be verified.
    #[error("cannot verify the boundary of {addr:#x}: undecodable bytes at {at:#x}")]
    UndecodableBefore {
        /// The probed address.
        addr: u64,
        /// Where decoding failed.
        at: u64,
    },
    /// The given code bytes or function bounds do not contain the probed address (or
    /// the bytes do not start at or before the function start).
    #[error("{addr:#x} is not covered by the given code bytes and function bounds")]
    OutOfBounds {
        /// The probed address.
        addr: u64,
    },
    /// The instruction is understood but cannot be probed.
    #[error("the instruction at {addr:#x} cannot be probed: {reason}")]
    Refused {
        /// The probed address.
        addr: u64,
        /// Why.
        reason: Refusal,
    },
}

/// Why an instruction that decodes fine is still refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum Refusal {
    /// An `int3` is already there: another debugger's breakpoint, or our own whose
    /// original byte the caller forgot to put back in the bytes it passed.
    #[error("an int3 breakpoint is already there")]
    Breakpoint,
    /// `int n`, `int1`/`icebp`: software interrupts raise their own traps and signals.
    #[error("software interrupt (int n / int1)")]
    Interrupt,
    /// `iret`, `sysret`, `sysexit`, ...: a return from an interrupt or system call.
    #[error("interrupt or system return")]
    InterruptReturn,
    /// Privileged (CPL 0) or I/O-privileged (`in`, `out`, `cli`, `sti`, ...): faults in user
    /// space, there is nothing to observe.
    #[error("privileged instruction")]
    Privileged,
    /// Far `call`/`jmp`/`ret`: they change the code segment.
    #[error("far control transfer")]
    FarTransfer,
    /// `mov ss` inhibits interrupts and debug traps until after the next instruction
    /// (the root of CVE-2018-8897 when that instruction is `int3` or `syscall`); no
    /// 64-bit user code needs it probed. (`pop ss` is invalid in 64-bit mode.)
    #[error("mov/pop ss (inhibits traps for one instruction)")]
    TrapShadow,
    /// `xbegin`: its abort target is IP-relative and is not re-encoded here (RTM is
    /// disabled on most current CPUs, and code only reaches it after a feature check).
    #[error("xbegin (IP-relative abort target)")]
    Transactional,
    /// `sysenter`: Linux returns from it to the 32-bit vDSO, not to the next
    /// instruction; meaningless in 64-bit user code.
    #[error("sysenter")]
    Sysenter,
    /// An instruction whose effect depends on its own address in a way this crate does
    /// not re-encode, or that cannot be encoded in a slot.
    #[error("instruction cannot run out of line")]
    NotRelocatable,
}

/// Why [`crate::Plan::build_slot`] could not build a slot at the given address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    /// The instruction's IP-relative operand at `target` cannot be reached with a 32-bit
    /// displacement from `slot`. Place the slot inside [`crate::Plan::slot_window`].
    #[error("slot at {slot:#x} cannot reach {target:#x} with a 32-bit displacement")]
    OutOfReach {
        /// The requested slot address.
        slot: u64,
        /// What the relocated instruction must reach.
        target: u64,
    },
    /// The instruction leaves the slot by a jump whose target is only known at run time
    /// (`ret`, `jmp [mem]`, `call [mem]`), so a trailing `int3` would never run. Such
    /// plans are always emulated (see [`crate::Plan::has_trap_after_slot`]).
    #[error("no trap-after slot: the instruction leaves through a computed target; emulate it")]
    NoTrapAfter,
    /// The slot would wrap around the end of the address space.
    #[error("slot address {slot:#x} wraps around the address space")]
    BadAddress {
        /// The requested slot address.
        slot: u64,
    },
}

/// Why [`crate::Plan::emulate`] did not emulate. On error the registers are unchanged
/// and no memory was written, so the caller can fall back to executing the slot (where
/// the CPU raises the real fault, if there is one).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EmulateError {
    /// The plan is not emulated ([`crate::Plan::is_emulated`] is false).
    #[error("this instruction is executed out of line, not emulated")]
    NotEmulated,
    /// A memory access the instruction makes failed.
    #[error("emulated memory access failed: {0}")]
    Memory(#[from] MemoryError),
}

impl AnalyzeError {
    /// The probed address this error is about.
    pub fn addr(&self) -> u64 {
        match *self {
            AnalyzeError::Truncated { addr, .. }
            | AnalyzeError::NotBoundary { addr, .. }
            | AnalyzeError::Invalid { addr }
            | AnalyzeError::UndecodableBefore { addr, .. }
            | AnalyzeError::OutOfBounds { addr }
            | AnalyzeError::Refused { addr, .. } => addr,
        }
    }

    /// The core's error for a failed probe at `addr`, as a backend's `prepare` returns it.
    pub fn into_core(self, addr: u64) -> multiprobe_core::Error {
        use multiprobe_core::Error;
        match self {
            AnalyzeError::NotBoundary { insn, len, .. } => Error::NotInstructionBoundary {
                addr,
                context: format!(" (inside the {len}-byte instruction at {insn:#x})"),
            },
            AnalyzeError::Refused {
                reason: Refusal::Breakpoint,
                ..
            } => Error::AlreadyBreakpoint { addr },
            AnalyzeError::Refused { reason, .. } => Error::UnsupportedInstruction {
                addr,
                reason: reason.to_string(),
            },
            other => Error::UnsupportedInstruction {
                addr,
                reason: other.to_string(),
            },
        }
    }
}

impl From<AnalyzeError> for multiprobe_core::Error {
    fn from(e: AnalyzeError) -> Self {
        e.into_core(e.addr())
    }
}
