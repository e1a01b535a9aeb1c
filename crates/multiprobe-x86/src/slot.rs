//! Out-of-line ("XOL") slots: the displaced instruction, relocated to run at another
//! address, followed by a way back.
//!
//! Two variants per site ([`SlotKind`]):
//! * [`SlotKind::JumpBack`]: the instruction, then a jump to the next original
//!   instruction. A hit costs one trap.
//! * [`SlotKind::TrapAfter`]: the instruction, then `int3`. The backend catches that
//!   trap, calls [`Slot::fixup_trap`] (which moves `rip` back into the original code)
//!   and runs the post-handlers.
//!
//! Invariants:
//! * A slot is at most [`MAX_SLOT_LEN`] bytes and must be mapped readable and
//!   executable (jumps to far targets read an 8-byte literal stored in the slot).
//! * Only IP-relative *memory operands* limit where a slot may live (±2 GiB, see
//!   [`Plan::slot_window`]); branch targets and the way back use absolute jumps when a
//!   32-bit displacement does not reach.
//! * Instructions that depend on their own address are rewritten so the program sees
//!   the original addresses: `call` pushes the original return address, `syscall`'s
//!   `rcx` is set to the original next instruction, branches go to original targets.
//! * Every instruction boundary in a slot has a recorded equivalent state in the
//!   original code, so a thread stopped anywhere inside a slot (a fault, a signal, a
//!   detach) can be moved out ([`Slot::fixup_ip`]).

use multiprobe_core::{Gpr, Regs};

use crate::error::SlotError;
use crate::plan::{Plan, Reloc, RipRel, RspDisp};

/// The breakpoint instruction, `int3`: what a probe writes over an instruction's first
/// byte, and how a [`SlotKind::TrapAfter`] slot ends.
pub const INT3: u8 = 0xcc;

/// How far (either way) memory holding slots, allocated in units of `unit` bytes, may
/// be placed from the code its slots copy so that every 32-bit displacement in them
/// (the way back, re-targeted RIP-relative operands) still reaches: the ±2 GiB of a
/// `rel32`, less two units of margin (the unit's own extent, and the instruction's
/// length on the other side).
pub const fn slot_reach(unit: u64) -> u64 {
    (1 << 31) - 2 * unit
}

/// Upper bound on [`Slot::bytes`]'s length, for every plan and variant. Allocate slots
/// of this size (64 bytes: one cache line when aligned).
pub const MAX_SLOT_LEN: usize = 64;

const MAX_POINTS: usize = 4;

/// Which way a slot ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SlotKind {
    /// Jump back to the original code: no second trap (no post-handlers).
    JumpBack,
    /// End in `int3` so post-handlers can run; see [`Slot::fixup_trap`].
    TrapAfter,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resume {
    Addr(u64),
    /// The value the register has at that point.
    Reg(Gpr),
}

/// What a thread whose `rip` is at `off` inside the slot is equivalent to in the
/// original code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Point {
    off: u8,
    resume: Resume,
    /// Added to `rsp` (undoes the slot's own push of a `call [mem]`).
    rsp_adj: i8,
    /// Set `rcx` to this (a `syscall` whose `rcx` fix-up has not run yet).
    rcx: Option<u64>,
    /// The instruction at `off` is a trailing `int3`.
    trap: bool,
}

const NO_POINT: Point = Point {
    off: 0,
    resume: Resume::Addr(0),
    rsp_adj: 0,
    rcx: None,
    trap: false,
};

/// A built slot: bytes to copy to [`Slot::addr`], and the fix-ups for a thread inside
/// it. `Copy` and heap-free, so the fix-ups can run in a signal handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    addr: u64,
    kind: SlotKind,
    len: u8,
    bytes: [u8; MAX_SLOT_LEN],
    npoints: u8,
    points: [Point; MAX_POINTS],
}

impl Slot {
    /// Where these bytes must be placed.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The variant.
    pub fn kind(&self) -> SlotKind {
        self.kind
    }

    /// The code to place at [`Slot::addr`].
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// Whether `ip` lies inside this slot.
    pub fn contains(&self, ip: u64) -> bool {
        ip.wrapping_sub(self.addr) < u64::from(self.len)
    }

    fn points(&self) -> &[Point] {
        &self.points[..usize::from(self.npoints)]
    }

    fn apply(p: &Point, regs: &mut Regs) {
        regs.rip = match p.resume {
            Resume::Addr(a) => a,
            Resume::Reg(r) => regs.gpr(r),
        };
        regs.rsp = regs.rsp.wrapping_add(p.rsp_adj as i64 as u64);
        if let Some(c) = p.rcx {
            regs.rcx = c;
        }
    }

    /// The trailing `int3` of a [`SlotKind::TrapAfter`] slot trapped, and the CPU
    /// reported `trap_ip` (the `int3`'s address + 1, what both a SIGTRAP's ucontext and
    /// ptrace show). Sets `regs.rip` to where the original code continues (the next
    /// instruction, or a branch's target) and returns true; returns false, changing
    /// nothing, if `trap_ip` is not one of this slot's traps.
    pub fn fixup_trap(&self, trap_ip: u64, regs: &mut Regs) -> bool {
        let off = trap_ip.wrapping_sub(1).wrapping_sub(self.addr);
        match self
            .points()
            .iter()
            .find(|p| p.trap && u64::from(p.off) == off)
        {
            Some(p) => {
                Self::apply(p, regs);
                true
            }
            None => false,
        }
    }

    /// A thread stopped with `regs.rip` at an instruction inside the slot — it faulted
    /// there, or is being moved out (detach, slot reuse). Rewrites `regs` to the
    /// equivalent state in the original code: a fault in the relocated instruction
    /// reports `rip` = the probed address (with any partial effect of the slot
    /// undone), as it would have unprobed. Returns false, changing nothing, when `rip`
    /// is not an instruction boundary of this slot.
    pub fn fixup_ip(&self, regs: &mut Regs) -> bool {
        let off = regs.rip.wrapping_sub(self.addr);
        match self.points().iter().find(|p| u64::from(p.off) == off) {
            Some(p) => {
                Self::apply(p, regs);
                true
            }
            None => false,
        }
    }
}

/// Appends code to a slot, tracking points and 8-byte literals.
struct Asm {
    slot: Slot,
    /// (position of a rip-relative disp32 that ends its instruction, literal value)
    lits: [(u8, u64); 2],
    nlits: usize,
}

impl Asm {
    fn pos(&self) -> usize {
        usize::from(self.slot.len)
    }

    fn here(&self) -> u64 {
        self.slot.addr + self.slot.len as u64
    }

    fn emit(&mut self, b: &[u8]) {
        let p = self.pos();
        self.slot.bytes[p..p + b.len()].copy_from_slice(b);
        self.slot.len += b.len() as u8;
    }

    fn point_full(&mut self, resume: Resume, rsp_adj: i8, rcx: Option<u64>, trap: bool) {
        let n = usize::from(self.slot.npoints);
        self.slot.points[n] = Point {
            off: self.slot.len,
            resume,
            rsp_adj,
            rcx,
            trap,
        };
        self.slot.npoints += 1;
    }

    fn point(&mut self, resume: u64) {
        self.point_full(Resume::Addr(resume), 0, None, false);
    }

    fn int3(&mut self, resume: Resume) {
        self.point_full(resume, 0, None, true);
        self.emit(&[INT3]);
    }

    /// `jmp target`: rel32 when it reaches, else `jmp [rip+0]` + 8-byte literal.
    fn jmp(&mut self, target: u64) {
        match rel32(self.here() + 5, target) {
            Some(d) => {
                self.emit(&[0xe9]);
                self.emit(&d.to_le_bytes());
            }
            None => {
                self.emit(&[0xff, 0x25, 0, 0, 0, 0]);
                self.emit(&target.to_le_bytes());
            }
        }
    }

    /// `push qword [rip+lit]` with the literal `v` placed after the code.
    fn push_lit(&mut self, v: u64) {
        self.emit(&[0xff, 0x35, 0, 0, 0, 0]);
        self.lits[self.nlits] = ((self.pos() - 4) as u8, v);
        self.nlits += 1;
    }

    /// The original instruction bytes, with a RIP-relative operand re-targeted.
    fn relocated(&mut self, insn: &[u8], rip_rel: Option<RipRel>) -> Result<(), SlotError> {
        let start = self.pos();
        let end = self.here() + insn.len() as u64;
        self.emit(insn);
        if let Some(r) = rip_rel {
            let d = rel32(end, r.target).ok_or(SlotError::OutOfReach {
                slot: self.slot.addr,
                target: r.target,
            })?;
            let at = start + usize::from(r.disp_off);
            self.slot.bytes[at..at + 4].copy_from_slice(&d.to_le_bytes());
        }
        Ok(())
    }

    fn finish(mut self) -> Slot {
        for i in 0..self.nlits {
            let (disp_pos, v) = self.lits[i];
            let lit = self.here();
            let d = rel32(self.slot.addr + u64::from(disp_pos) + 4, lit)
                .expect("a literal inside the slot is always within reach");
            let at = usize::from(disp_pos);
            self.slot.bytes[at..at + 4].copy_from_slice(&d.to_le_bytes());
            self.emit(&v.to_le_bytes());
        }
        self.slot
    }
}

/// The 32-bit displacement from `from` (the end of the instruction) to `to`, if it fits.
fn rel32(from: u64, to: u64) -> Option<i32> {
    i32::try_from(to.wrapping_sub(from) as i64).ok()
}

impl Plan {
    /// Offset of the relocated instruction inside the slot and its RIP-relative operand.
    fn rip_rel_site(&self) -> Option<(u64, RipRel)> {
        match self.reloc {
            Reloc::Copy { rip_rel: Some(r) } | Reloc::Leaves { rip_rel: Some(r) } => Some((0, r)),
            // `call [rip+x]` becomes `push [rip+lit]` (6 bytes), then `jmp [rip+x']`.
            Reloc::CallMem {
                rip_rel: Some(r), ..
            } => Some((6, r)),
            _ => None,
        }
    }

    /// The addresses where a slot for this instruction may start, when it has a
    /// RIP-relative memory operand that a 32-bit displacement must reach from the slot;
    /// `None` when any address will do. Both variants have the same window.
    pub fn slot_window(&self) -> Option<std::ops::RangeInclusive<u64>> {
        let (off, r) = self.rip_rel_site()?;
        // disp = target - (slot + off + len) must lie in i32.
        let k = off + self.len as u64;
        let lo = r.target.saturating_sub(k).saturating_sub(i32::MAX as u64);
        let hi = r
            .target
            .saturating_sub(k)
            .saturating_add(1u64 << 31)
            .min(u64::MAX - MAX_SLOT_LEN as u64);
        Some(lo..=hi)
    }

    /// Build the slot of the given variant for placement at `slot_addr`.
    pub fn build_slot(&self, kind: SlotKind, slot_addr: u64) -> Result<Slot, SlotError> {
        if slot_addr.checked_add(MAX_SLOT_LEN as u64).is_none() {
            return Err(SlotError::BadAddress { slot: slot_addr });
        }
        let mut a = Asm {
            slot: Slot {
                addr: slot_addr,
                kind,
                len: 0,
                bytes: [0; MAX_SLOT_LEN],
                npoints: 0,
                points: [NO_POINT; MAX_POINTS],
            },
            lits: [(0, 0); 2],
            nlits: 0,
        };
        let (orig, next) = (self.addr, self.next());
        let trap = kind == SlotKind::TrapAfter;
        let insn = self.bytes();
        // Ends a slot whose instruction falls through to `next`.
        let tail = |a: &mut Asm| {
            if trap {
                a.int3(Resume::Addr(next));
            } else {
                a.point(next);
                a.jmp(next);
            }
        };
        match self.reloc {
            Reloc::Copy { rip_rel } => {
                a.point(orig);
                a.relocated(insn, rip_rel)?;
                tail(&mut a);
            }
            Reloc::Syscall => {
                a.point(orig);
                a.emit(insn);
                a.point_full(Resume::Addr(next), 0, Some(next), false);
                a.emit(&[0x48, 0xb9]); // mov rcx, imm64: does not touch flags
                a.emit(&next.to_le_bytes());
                tail(&mut a);
            }
            Reloc::Jmp(t) => {
                if trap {
                    a.int3(Resume::Addr(t));
                } else {
                    a.point(t);
                    a.jmp(t);
                }
            }
            Reloc::Jcc(cc, t) => {
                a.point(orig);
                if trap {
                    a.emit(&[0x70 | cc, 1]);
                    a.int3(Resume::Addr(next));
                    a.int3(Resume::Addr(t));
                } else {
                    self.cond_jump_back(&mut a, &[0x70 | cc], t);
                }
            }
            Reloc::Loop { target } => {
                a.point(orig);
                let head = &insn[..insn.len() - 1];
                if trap {
                    a.emit(head);
                    a.emit(&[1]);
                    a.int3(Resume::Addr(next));
                    a.int3(Resume::Addr(target));
                } else {
                    self.cond_jump_back(&mut a, head, target);
                }
            }
            Reloc::Call(t) => {
                a.point(orig);
                a.push_lit(next);
                if trap {
                    a.int3(Resume::Addr(t));
                } else {
                    a.point(t);
                    a.jmp(t);
                }
            }
            Reloc::CallReg(r) => {
                a.point(orig);
                a.push_lit(next);
                if trap {
                    a.int3(Resume::Reg(r));
                } else {
                    a.point_full(Resume::Reg(r), 0, None, false);
                    let n = r as u8;
                    if n >= 8 {
                        a.emit(&[0x41]);
                    }
                    a.emit(&[0xff, 0xe0 | (n & 7)]);
                }
            }
            Reloc::CallMem {
                modrm_off,
                rip_rel,
                rsp_disp,
            } => {
                if trap {
                    return Err(SlotError::NoTrapAfter);
                }
                a.point(orig);
                a.push_lit(next);
                // A fault in the jump leaves the pushed word: undo it.
                a.point_full(Resume::Addr(orig), 8, None, false);
                let start = a.pos();
                a.relocated(insn, rip_rel)?;
                let m = start + usize::from(modrm_off);
                a.slot.bytes[m] = (a.slot.bytes[m] & 0xc7) | (4 << 3); // ff /2 -> ff /4
                if let Some(RspDisp { off, size }) = rsp_disp {
                    let at = start + usize::from(off);
                    let b = &mut a.slot.bytes[at..at + usize::from(size)];
                    if size == 1 {
                        b[0] = (b[0] as i8).wrapping_add(8) as u8;
                    } else {
                        let d = i32::from_le_bytes([b[0], b[1], b[2], b[3]]).wrapping_add(8);
                        b.copy_from_slice(&d.to_le_bytes());
                    }
                }
            }
            Reloc::JmpReg(r) => {
                if trap {
                    a.int3(Resume::Reg(r));
                } else {
                    a.point(orig);
                    a.emit(insn);
                }
            }
            Reloc::Leaves { rip_rel } => {
                if trap {
                    return Err(SlotError::NoTrapAfter);
                }
                a.point(orig);
                a.relocated(insn, rip_rel)?;
            }
        }
        Ok(a.finish())
    }

    /// `<head> rel8 -> taken; jmp next; taken: jmp target` — `head` is a `jcc`/`loop`
    /// opcode (with its prefixes) whose rel8 this writes.
    fn cond_jump_back(&self, a: &mut Asm, head: &[u8], target: u64) {
        let next = self.next();
        a.emit(head);
        let rel_at = a.pos();
        a.emit(&[0]);
        a.point(next);
        a.jmp(next);
        a.slot.bytes[rel_at] = (a.pos() - rel_at - 1) as u8;
        a.point(target);
        a.jmp(target);
    }
}
