//! The return trampoline of return probes: where a return-probed call returns to (its
//! return address was swapped for this trampoline's entry at the call's entry), built
//! with iced-x86's assembler like the sites' trampolines and sharing their common stub.
//!
//! ```text
//! at:     nop                      ; an unwinder looks up a return address minus 1
//! entry:  the sites' save (frame module): Frame::regs with rip = entry and rsp = the
//!         stack pointer after the `ret`; EVENT_RET; call [common] -> the backend's entry
//!         exit code EXIT_RESUME:       restore, move the resume slot's address to
//!                                      [R - 8], rsp = R, jmp [rsp - 8]
//!         exit code EXIT_RESUME_STACK: restore, pop rsp, ret 128
//!         anything else:               int3 with rsp at the frame (exit by trap)
//! literals
//! ```
//!
//! The entry point sets the frame's `rip` to the call's original return address (and
//! handlers may change other registers: they are restored from the frame) and picks the
//! exit with [`crate::Frame::continue_at`]. One trampoline serves every return probe of
//! a process and every thread: what tells calls apart is the stack pointer, and the
//! backend's per-thread return stack holds the original return addresses.
//!
//! The usual exit (`EXIT_RESUME`, `rsp` unchanged by the handlers) leaves by an indirect
//! `jmp`, not `ret 128` as the sites' trampolines do: the `ret` of the probed function
//! that brought the thread here already consumed the call's entry of the CPU's return
//! stack predictor, and a second `ret` would consume the caller's, so every return of
//! the caller's callers would then be mispredicted too. The target goes to `[R - 8]`
//! (`R` = the returning thread's `rsp`: the slot the probed function's `ret` popped), by
//! `pop qword ptr [rsp + 120]` with `rsp = R - 136`, then `rsp = R` and
//! `jmp [rsp - 8]`: from the `pop` on, `[R - 8]` is inside the red zone of every `rsp`
//! the thread has, which the kernel's signal delivery never writes, so a signal
//! arriving in between cannot clobber it.
//!
//! Invariants: as for the sites' trampolines, nothing is written below the trampoline's
//! own `rsp`; of the 128 bytes below the returning thread's `rsp` (dead at a return:
//! the callee owned them) only `[R - 8]` is, the popped return slot, with the original
//! return address it held before the entry swapped it; the code never changes once
//! placed; it holds no address of another trampoline (the common stub is reached
//! through a literal).

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;

use crate::frame::{EVENT_RET, EXIT_RESUME, EXIT_RESUME_STACK, RED_ZONE};
use crate::trampoline::{emit_save, Lits, TrampolineError, RESTORE_OFF};

/// Upper bound on the return trampoline's length.
pub const RETURN_TRAMPOLINE_LEN: usize = 256;

/// A built return trampoline: its code to place at the address it was built for, and
/// where its entry and its exit by trap are. `Copy`, usable from a signal handler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReturnTrampoline {
    /// Where it must be placed.
    pub at: u64,
    /// The address to swap into return slots (one byte after `at`).
    pub entry: u64,
    /// The address of the exit-by-trap `int3`.
    pub trap: u64,
    /// Its code.
    pub bytes: Vec<u8>,
}

impl ReturnTrampoline {
    /// Whether a SIGTRAP reporting `trap_ip` (the `int3`'s address + 1) is this
    /// trampoline's exit by trap: `rsp` is then at the [`crate::Frame`].
    pub fn is_trap_exit(&self, trap_ip: u64) -> bool {
        trap_ip.wrapping_sub(1) == self.trap
    }

    /// Whether `ip` lies inside it.
    pub fn contains(&self, ip: u64) -> bool {
        ip.wrapping_sub(self.at) < self.bytes.len() as u64
    }
}

/// Build the return trampoline for placement at `at`, calling the backend's `entry` (an
/// [`crate::Entry`], called with `ctx` and [`EVENT_RET`]) through the common stub at
/// `common` ([`crate::build_common`]).
pub fn build_return_trampoline(
    entry: u64,
    ctx: u64,
    common: u64,
    at: u64,
) -> Result<ReturnTrampoline, TrampolineError> {
    let mut a = CodeAssembler::new(64)?;
    let lits = Lits::new(&mut a);
    let mut lit_self = a.create_label();
    let mut start = a.create_label();
    let mut trap = a.create_label();
    let mut resume = a.create_label();
    let mut stack = a.create_label();
    a.nop()?;
    a.set_label(&mut start)?;
    emit_save(&mut a, &lits, lit_self, EVENT_RET, lits.pre)?;
    a.cmp(eax, EXIT_RESUME as u32)?;
    a.je(resume)?;
    a.cmp(eax, EXIT_RESUME_STACK as u32)?;
    a.je(stack)?;
    a.set_label(&mut trap)?;
    a.int3()?;
    a.ud2()?;
    a.set_label(&mut resume)?;
    a.call(qword_ptr(lits.restore))?;
    // The resume slot is at R - 136; `pop` computes its address after the increment:
    // [R - 128 + 120] = [R - 8].
    a.lea(rsp, ptr(rsp + 160))?;
    a.pop(qword_ptr(rsp + (RED_ZONE - 8) as i32))?;
    a.lea(rsp, ptr(rsp + RED_ZONE as i32))?;
    a.jmp(qword_ptr(rsp - 8))?;
    a.set_label(&mut stack)?;
    a.call(qword_ptr(lits.restore))?;
    a.lea(rsp, ptr(rsp + 160))?;
    a.pop(rsp)?;
    a.ret_1(RED_ZONE as u32)?;
    a.int3()?; // never executed: keeps a stray fall-through from reading data as code
    let mut l_ctx = lits.ctx;
    let mut l_pre = lits.pre;
    let mut l_common = lits.common;
    let mut l_restore = lits.restore;
    for (label, value) in [
        (&mut lit_self, at + 1),
        (&mut l_ctx, ctx),
        (&mut l_pre, entry),
        (&mut l_common, common),
        (&mut l_restore, common + u64::from(RESTORE_OFF)),
    ] {
        a.set_label(label)?;
        a.dq(&[value])?;
    }
    let out = a.assemble_options(at, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let bytes = out.inner.code_buffer.clone();
    if bytes.len() > RETURN_TRAMPOLINE_LEN {
        return Err(TrampolineError::TooLong {
            len: bytes.len(),
            max: RETURN_TRAMPOLINE_LEN,
        });
    }
    let entry_at = out.label_ip(&start)?;
    debug_assert_eq!(entry_at, at + 1);
    Ok(ReturnTrampoline {
        at,
        entry: entry_at,
        trap: out.label_ip(&trap)?,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    #[test]
    fn the_return_trampoline_saves_calls_the_entry_and_has_its_exits() {
        let at = 0x7f00_0000_1000;
        let t = build_return_trampoline(0x5555_0000, 0x42, 0x7f00_0000_0000, at).unwrap();
        assert_eq!(t.entry, at + 1);
        assert!(t.contains(t.trap) && t.is_trap_exit(t.trap + 1));
        let mut d = Decoder::with_ip(64, &t.bytes, at, DecoderOptions::NONE);
        let insns: Vec<_> = d.iter().collect();
        assert_eq!(insns[0].mnemonic(), Mnemonic::Nop);
        // The save's `lea rsp, [rsp-152]` comes right after the entry.
        assert_eq!(insns[1].ip(), t.entry);
        assert_eq!(insns[1].mnemonic(), Mnemonic::Lea);
        let trap = insns.iter().find(|i| i.ip() == t.trap).unwrap();
        assert_eq!(trap.mnemonic(), Mnemonic::Int3);
        // One `ret 128` exit (a moved stack), and the usual exit by `jmp [rsp-8]`.
        let rets = insns
            .iter()
            .filter(|i| i.mnemonic() == Mnemonic::Ret && i.immediate16() == 128)
            .count();
        assert_eq!(rets, 1);
        let jmp = insns
            .iter()
            .position(|i| {
                i.mnemonic() == Mnemonic::Jmp
                    && i.memory_base() == iced_x86::Register::RSP
                    && i.memory_displacement64() == (-8i64) as u64
            })
            .expect("the exit by jmp [rsp-8]");
        // Right before it: `pop [rsp+120]` (to R - 8), then `lea rsp, [rsp+128]`.
        assert_eq!(insns[jmp - 1].mnemonic(), Mnemonic::Lea);
        assert_eq!(insns[jmp - 1].memory_displacement64(), 128);
        assert_eq!(insns[jmp - 2].mnemonic(), Mnemonic::Pop);
        assert_eq!(insns[jmp - 2].memory_base(), iced_x86::Register::RSP);
        assert_eq!(insns[jmp - 2].memory_displacement64(), 120);
        // The literals: the entry's own address, ctx, the entry point, the stub.
        let lits: Vec<u64> = t.bytes[t.bytes.len() - 40..]
            .chunks(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(
            lits,
            [
                t.entry,
                0x42,
                0x5555_0000,
                0x7f00_0000_0000,
                0x7f00_0000_0000 + u64::from(RESTORE_OFF)
            ]
        );
    }
}
