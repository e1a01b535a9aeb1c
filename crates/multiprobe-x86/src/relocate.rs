//! What every trampoline builder shares: the region relocated by iced-x86's
//! `BlockEncoder` (a `call` pushing the original return address, a `syscall` given its
//! original `rcx`), and the map from the relocated copies back to the original code
//! ([`CopyMap`]). The in-process trampoline and the collecting trampoline both call
//! [`emit_plain_copy`] and [`CopyMap::resolve`].
//!
//! Invariants: every instruction start of a relocated copy (and the jump back) is a
//! *point* with an equivalent state in the original code (`orig`, how far `rsp` is
//! below the original's, the `rcx` a relocated `syscall` must show); no relocated
//! instruction pushes an address inside a trampoline.

use iced_x86::code_asm::*;
use iced_x86::{Code as C, Decoder, DecoderOptions, Instruction, Register};
use multiprobe_core::Regs;

use crate::region::{Region, MAX_REGION_INSNS};
use crate::trampoline::TrampolineError;

/// Most points one trampoline's map holds.
pub(crate) const MAX_POINTS: usize = 16;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Point {
    pub(crate) off: u16,
    pub(crate) orig: u64,
    pub(crate) rsp_adj: i8,
    pub(crate) rcx: Option<u64>,
    pub(crate) first: bool,
}

pub(crate) const NO_POINT: Point = Point {
    off: 0,
    orig: 0,
    rsp_adj: 0,
    rcx: None,
    first: false,
};

/// Where a thread with `rip` inside a trampoline stands ([`crate::Trampoline::locate`],
/// [`crate::collect::CollectMap::locate`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// At a relocated instruction of the original `orig`; `first` when that is the
    /// probed instruction itself (its faults go to the fault handlers).
    Relocated {
        /// The original instruction's address (or where the original code continues,
        /// for the jump back).
        orig: u64,
        /// The probed instruction.
        first: bool,
    },
    /// In the save, dispatch or restore code: not at an original instruction.
    Inside,
}

/// The points of a built trampoline and the offset of each region instruction's plain
/// copy: `Copy` and heap-free, for the hot path and signal handlers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct CopyMap {
    plain: [u16; MAX_REGION_INSNS],
    npoints: u8,
    points: [Point; MAX_POINTS],
}

impl CopyMap {
    /// Resolve the pending `points` of an assembled trampoline (`off` gives a label's
    /// offset from its start); `plain[i]` is the index in `points` of region instruction
    /// `i`'s plain copy.
    pub(crate) fn resolve(
        points: &[PendingPoint],
        plain: &[usize],
        off: impl Fn(&CodeLabel) -> Result<u16, TrampolineError>,
    ) -> Result<CopyMap, TrampolineError> {
        if points.len() > MAX_POINTS {
            return Err(TrampolineError::Encode("too many relocated points".into()));
        }
        let mut m = CopyMap {
            plain: [0; MAX_REGION_INSNS],
            npoints: points.len() as u8,
            points: [NO_POINT; MAX_POINTS],
        };
        for (i, &p) in plain.iter().enumerate() {
            m.plain[i] = off(&points[p].label)?;
        }
        for (i, p) in points.iter().enumerate() {
            m.points[i] = Point {
                off: off(&p.label)?,
                orig: p.orig,
                rsp_adj: p.rsp_adj,
                rcx: p.rcx,
                first: p.first,
            };
        }
        Ok(m)
    }

    /// Offset of the plain copy of region instruction `i`.
    #[inline]
    pub(crate) fn copy_off(&self, i: usize) -> u16 {
        self.plain[i]
    }

    /// The point at offset `off`, if one is there.
    pub(crate) fn point(&self, off: u64) -> Option<&Point> {
        self.points[..usize::from(self.npoints)]
            .iter()
            .find(|p| u64::from(p.off) == off)
    }

    /// Where a thread at offset `off` (inside the trampoline) stands.
    pub(crate) fn locate(&self, off: u64) -> Location {
        match self.point(off) {
            Some(p) => Location::Relocated {
                orig: p.orig,
                first: p.first,
            },
            None => Location::Inside,
        }
    }

    /// Rewrite `regs` (with `rip` in the trampoline at `base`) to the equivalent state of
    /// the original code at a point; `None`, changing nothing, elsewhere.
    pub(crate) fn fixup(&self, base: u64, regs: &mut Regs) -> Option<bool> {
        let p = *self.point(regs.rip.wrapping_sub(base))?;
        regs.rip = p.orig;
        regs.rsp = regs.rsp.wrapping_add(p.rsp_adj as i64 as u64);
        if let Some(c) = p.rcx {
            regs.rcx = c;
        }
        Some(p.first)
    }
}

/// A labelled empty instruction: its address is where the next instruction starts.
pub(crate) fn mark(a: &mut CodeAssembler) -> Result<CodeLabel, IcedError> {
    let mut l = a.create_label();
    a.set_label(&mut l)?;
    a.zero_bytes()?;
    Ok(l)
}

pub(crate) struct PendingPoint {
    label: CodeLabel,
    orig: u64,
    rsp_adj: i8,
    rcx: Option<u64>,
    first: bool,
}

/// Record a point of the map at the current position of `a`: a thread found here is at
/// `orig` in the original code, with `rsp` `rsp_adj` bytes below the original's (and
/// `set_rcx` the value `rcx` must be given, after a relocated `syscall`).
pub(crate) fn point_here(
    a: &mut CodeAssembler,
    points: &mut Vec<PendingPoint>,
    orig: u64,
    rsp_adj: i8,
    set_rcx: Option<u64>,
    first: bool,
) -> Result<(), IcedError> {
    let label = mark(a)?;
    points.push(PendingPoint {
        label,
        orig,
        rsp_adj,
        rcx: set_rcx,
        first,
    });
    Ok(())
}

/// Emit region instruction `insn` (decoded at its original address) relocated, with the
/// points that map its copy back. `ret_lit` holds the original return address of a
/// `call`.
pub(crate) fn emit_relocated(
    a: &mut CodeAssembler,
    insn: &Instruction,
    first: bool,
    ret_lit: CodeLabel,
    points: &mut Vec<PendingPoint>,
) -> Result<(), IcedError> {
    let orig = insn.ip();
    let next = insn.next_ip();
    point_here(a, points, orig, 0, None, first)?;
    let mut copy = *insn;
    copy.set_ip(0);
    match insn.code() {
        C::Call_rel32_64 => {
            a.push(qword_ptr(ret_lit))?;
            // After the push the call has happened: the thread is "at the target".
            point_here(a, points, orig, 8, None, first)?;
            a.jmp(insn.near_branch_target())?;
        }
        C::Call_rm64 => {
            a.push(qword_ptr(ret_lit))?;
            // A fault in the jump's memory read leaves the pushed word: undo it.
            point_here(a, points, orig, 8, None, first)?;
            // `call r/m` becomes `jmp r/m` on the same operand (`call rsp` and
            // `call [rsp]` without a displacement are refused by the analysis); an
            // rsp-based operand is 8 further after the push.
            copy.set_code(C::Jmp_rm64);
            if insn.op0_kind() == iced_x86::OpKind::Memory && insn.memory_base() == Register::RSP {
                copy.set_memory_displacement64(insn.memory_displacement64().wrapping_add(8));
            }
            a.add_instruction(copy)?;
        }
        C::Syscall => {
            a.add_instruction(copy)?;
            point_here(a, points, next, 0, Some(next), false)?;
            // `mov rcx, imm64` leaves the flags as the kernel returned them.
            a.mov(rcx, next)?;
        }
        _ => a.add_instruction(copy)?,
    }
    Ok(())
}

pub(crate) fn decode_region(region: &Region) -> Vec<Instruction> {
    (0..region.count())
        .map(|i| {
            let (at, bytes) = region.insn(i);
            Decoder::with_ip(64, bytes, at, DecoderOptions::NONE).decode()
        })
        .collect()
}

pub(crate) fn falls_through(insn: &Instruction) -> bool {
    insn.flow_control() == iced_x86::FlowControl::Next
}

/// Whether control can reach the end of `insn`'s relocated copy: everything but an
/// unconditional `jmp`, a `ret` and a `call` (whose copy ends in a `jmp`). A `jcc` or
/// `loop` falls through when not taken, a `syscall` returns to the next instruction.
pub(crate) fn can_fall_out(insn: &Instruction) -> bool {
    !matches!(
        insn.mnemonic(),
        iced_x86::Mnemonic::Jmp | iced_x86::Mnemonic::Ret | iced_x86::Mnemonic::Call
    )
}

pub(crate) fn reach(from: u64, to: u64) -> bool {
    i32::try_from(to.wrapping_sub(from) as i64).is_ok()
}

pub(crate) fn map_encode_error(e: IcedError, at: u64, region: &Region) -> TrampolineError {
    let s = e.to_string();
    if s.contains("too far away") || s.contains("Invalid IP relative") {
        TrampolineError::OutOfReach {
            at,
            target: region.addr(),
        }
    } else {
        TrampolineError::Encode(s)
    }
}
/// The plain copy of the region: every instruction relocated (`insns` from
/// [`decode_region`]), then the jump to the region's end when the last one can fall
/// out. Returns, per instruction, the index of its first point in `points`. `second`,
/// when given, is set at the second instruction's copy (the in-process trampoline's
/// continuation after the first one). `ret_lit` holds the original return address of a
/// `call`.
pub(crate) fn emit_plain_copy(
    a: &mut CodeAssembler,
    region: &Region,
    insns: &[Instruction],
    ret_lit: CodeLabel,
    points: &mut Vec<PendingPoint>,
    mut second: Option<&mut CodeLabel>,
) -> Result<Vec<usize>, IcedError> {
    let mut plain = Vec::with_capacity(insns.len());
    for (i, insn) in insns.iter().enumerate() {
        if i == 1 {
            if let Some(l) = second.as_deref_mut() {
                a.set_label(l)?;
                a.zero_bytes()?;
            }
        }
        plain.push(points.len());
        emit_relocated(a, insn, i == 0, ret_lit, points)?;
    }
    let last = insns.last().expect("a region has an instruction");
    if can_fall_out(last) {
        point_here(a, points, region.end(), 0, None, false)?;
        a.jmp(region.end())?;
    }
    Ok(plain)
}

/// Check that a trampoline at `at` is within a `jmp rel32`'s reach of `region`.
pub(crate) fn check_reach(region: &Region, at: u64) -> Result<(), TrampolineError> {
    if reach(region.addr() + crate::region::JMP_LEN as u64, at) {
        Ok(())
    } else {
        Err(TrampolineError::OutOfReach {
            at,
            target: region.addr(),
        })
    }
}

/// An assembled trampoline: its bytes and where its labels ended up.
pub(crate) struct Assembled {
    pub(crate) bytes: Vec<u8>,
    out: CodeAssemblerResult,
    at: u64,
}

impl Assembled {
    /// Assemble `a` for placement at `at`, at most `max` bytes.
    pub(crate) fn new(
        a: &mut CodeAssembler,
        at: u64,
        region: &Region,
        max: usize,
    ) -> Result<Assembled, TrampolineError> {
        let out = a
            .assemble_options(
                at,
                iced_x86::BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS,
            )
            .map_err(|e| map_encode_error(e, at, region))?;
        let bytes = out.inner.code_buffer.clone();
        if bytes.len() > max {
            return Err(TrampolineError::TooLong {
                len: bytes.len(),
                max,
            });
        }
        Ok(Assembled { bytes, out, at })
    }

    /// A label's offset from the start.
    pub(crate) fn off(&self, l: &CodeLabel) -> Result<u16, TrampolineError> {
        Ok((self.out.label_ip(l)? - self.at) as u16)
    }
}
