//! Region analysis for jump-optimized (trap-free) probes: may the instructions covering
//! at least [`JMP_LEN`] bytes from the probed address be replaced by a `jmp rel32` to a
//! trampoline?
//!
//! The checks are those of kprobes' optprobes (`can_optimize`), each refusal its own
//! [`RegionRefusal`]:
//! * A single instruction of [`JMP_LEN`] bytes or more is its own region and needs no
//!   function analysis: nothing can jump into the middle of one instruction.
//! * Otherwise the enclosing function's bounds must be known, and the whole function is
//!   decoded from its first byte. Refused when any direct branch (`jmp`, `jcc`, `call`,
//!   `loop*`, `jrcxz`, `xbegin`) anywhere in it targets the region's *interior*
//!   (`addr + 1 .. end`); when it has an indirect jump through a register or an indexed
//!   operand (a jump table, whose targets cannot be seen); when bytes in it do not decode
//!   (its branches cannot all be seen); when an exception landing pad lies in the
//!   interior (or the unwind information cannot tell, [`Unwind::Unknown`]); and when the
//!   region runs past the function's end.
//! * Every instruction of the region must be relocatable ([`crate::analyze`]'s
//!   refusals), and every one but the last must fall through: a `jmp`, `jcc`, `call`,
//!   `ret` or `syscall` inside the region would leave the relocated copy with the rest
//!   of the region unexecuted, or return into the interior.
//!
//! What the checks guarantee, given that an `int3` sits on the region's first byte
//! while the rest is written (the int3-first protocol): a thread can reach the interior
//! only by being there already (or by returning there from a signal handler), which the
//! backend checks per thread, moving it to the same point of the relocated copy
//! ([`Region::boundary_index`]).
//!
//! Only the function's own code is decoded here. Branches from *other* code of the
//! file into the interior — a compiler-split `foo.cold` part jumping back into `foo`,
//! glibc's `__mempcpy_*` stubs jumping to the second instruction of `__memcpy_*` — are
//! looked up afterwards in an index of every direct branch of the file
//! ([`crate::CodeSource::branch_into`], done by [`crate::prepare`]). A `jmp [rip+x]`
//! (a tail call through a pointer slot, no index) is allowed: its target is a function
//! entry, and a region holding another function's start is refused
//! ([`RegionRefusal::OtherEntry`], from the same index).
//!
//! A function without a symbol (a stripped file's local functions) is known by its
//! unwind entry's range when the backend's symbols have one.

use std::ops::Range;

use iced_x86::{Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register};

use crate::analyze::{analyze, Code};
use crate::error::{AnalyzeError, Refusal};
use crate::plan::MAX_INSN_LEN;

/// Length of the `jmp rel32` a promoted site starts with.
pub const JMP_LEN: usize = 5;
/// Most instructions a region can hold (four 1-byte ones and the one that completes it).
pub const MAX_REGION_INSNS: usize = JMP_LEN;
/// Longest region: four bytes, then a maximal instruction.
pub const MAX_REGION_LEN: usize = JMP_LEN - 1 + MAX_INSN_LEN;

/// What the unwind information (`.eh_frame` and the LSDA in `.gcc_except_table`) says
/// about the function's exception landing pads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unwind<'a> {
    /// The function has no landing pads (no LSDA, or no unwind entry at all).
    NoLandingPads,
    /// The landing pads' addresses.
    LandingPads(&'a [u64]),
    /// The unwind information exists but could not be read: there may be landing pads.
    Unknown,
}

/// Why a site stays an `int3` site: the region cannot be replaced by a jump.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, thiserror::Error)]
pub enum RegionRefusal {
    /// The first instruction is shorter than a `jmp rel32` and the enclosing function
    /// is not known, so the instructions after it cannot be checked.
    #[error("the instruction is shorter than 5 bytes and the enclosing function is unknown")]
    NoFunction,
    /// The region would extend past the function's last byte.
    #[error("the function ends at {end:#x}, inside the 5 bytes a jump needs")]
    PastFunctionEnd {
        /// The function's end.
        end: u64,
    },
    /// An instruction of the region other than the last transfers control.
    #[error("{mnemonic} at {at:#x} transfers control before the end of the 5 bytes a jump needs")]
    ControlFlowInside {
        /// Its address.
        at: u64,
        /// Lower-case mnemonic (`call`, `jne`, `ret`, `syscall`, ...).
        mnemonic: Mnem,
    },
    /// A direct branch targets the region's interior: of the function, or of any other
    /// code of its file (a backend's [`crate::CodeSource::branch_into`]).
    #[error("the branch at {from:#x} targets {to:#x}, inside the 5 bytes a jump needs")]
    BranchInto {
        /// The branch.
        from: u64,
        /// Its target.
        to: u64,
    },
    /// The function has an indirect jump through a register or an indexed table.
    #[error("the function has an indirect jump at {at:#x} (a jump table?) whose targets cannot be checked")]
    IndirectJump {
        /// The jump.
        at: u64,
    },
    /// Bytes of the function do not decode, so not all its branches can be seen.
    #[error(
        "the function has undecodable bytes at {at:#x}, so its branches cannot all be checked"
    )]
    Undecodable {
        /// Where decoding failed.
        at: u64,
    },
    /// An exception landing pad lies in the region's interior.
    #[error("an exception landing pad at {at:#x} lies inside the 5 bytes a jump needs")]
    LandingPad {
        /// The landing pad.
        at: u64,
    },
    /// The code of the file around the region could not be read, so a branch from
    /// another function into its interior cannot be ruled out.
    #[error("the file's code could not be read, so branches from other functions into the 5 bytes a jump needs cannot be ruled out")]
    OutsideUnknown,
    /// The function's unwind information could not be read.
    #[error("the function's exception tables could not be read, so a landing pad might lie in the region")]
    UnwindUnknown,
    /// An instruction of the region is one that cannot run out of line.
    #[error("the instruction at {at:#x} cannot run out of line: {reason}")]
    NotRelocatable {
        /// Its address.
        at: u64,
        /// Why.
        reason: Refusal,
    },
    /// Another function (a symbol's or an unwind entry's) starts inside the region.
    #[error("another function starts at {at:#x}, inside the 5 bytes a jump needs")]
    OtherEntry {
        /// That function's start.
        at: u64,
    },
    /// Another probe's breakpoint lies in the region's interior.
    #[error("another probe at {at:#x} lies inside the 5 bytes a jump needs")]
    ProbeInside {
        /// That probe's address.
        at: u64,
    },
}

/// A mnemonic, printed in lower case (a `Copy` wrapper so the refusal stays `Copy`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mnem(pub Mnemonic);

impl std::fmt::Display for Mnem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", format!("{:?}", self.0).to_lowercase())
    }
}

/// The instructions a jump replaces: `addr .. addr + len`, at least [`JMP_LEN`] bytes.
/// `Copy` and heap-free.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Region {
    addr: u64,
    len: u8,
    bytes: [u8; MAX_REGION_LEN],
    n: u8,
    /// Offset of each instruction from `addr`.
    starts: [u8; MAX_REGION_INSNS],
}

impl std::fmt::Debug for Region {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Region")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("len", &self.len)
            .field("starts", &self.starts())
            .finish()
    }
}

impl Region {
    /// The probed address (the region's first byte).
    #[inline]
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes (at least [`JMP_LEN`]).
    #[inline]
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always false (for clippy's `len` rule).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// One past the last byte: where the original code continues after the region.
    #[inline]
    pub fn end(&self) -> u64 {
        self.addr + u64::from(self.len)
    }

    /// The original bytes of the region (what demotion writes back).
    pub fn bytes(&self) -> &[u8] {
        &self.bytes[..self.len()]
    }

    /// Offsets of the instructions from [`Region::addr`].
    #[inline]
    pub fn starts(&self) -> &[u8] {
        &self.starts[..usize::from(self.n)]
    }

    /// Number of instructions.
    #[inline]
    pub fn count(&self) -> usize {
        usize::from(self.n)
    }

    /// `(address, bytes)` of instruction `i`.
    pub fn insn(&self, i: usize) -> (u64, &[u8]) {
        let s = usize::from(self.starts[i]);
        let e = if i + 1 < self.count() {
            usize::from(self.starts[i + 1])
        } else {
            self.len()
        };
        (self.addr + s as u64, &self.bytes[s..e])
    }

    /// Whether `ip` lies in the interior (`addr + 1 .. end`), the bytes no thread may
    /// stand on when the jump is written.
    pub fn in_interior(&self, ip: u64) -> bool {
        ip > self.addr && ip < self.end()
    }

    /// The index of the instruction starting at `ip`, if one does.
    #[inline]
    pub fn boundary_index(&self, ip: u64) -> Option<usize> {
        let off = ip.checked_sub(self.addr)?;
        self.starts().iter().position(|&s| u64::from(s) == off)
    }

    /// The bytes a promoted site holds: `jmp rel32` to `target` (which must be within
    /// reach, see [`crate::Trampoline`]), the rest of the region filled with `int3`.
    pub fn jump_bytes(&self, target: u64) -> Option<([u8; MAX_REGION_LEN], usize)> {
        let d = i32::try_from(target.wrapping_sub(self.addr + JMP_LEN as u64) as i64).ok()?;
        let mut b = [crate::slot::INT3; MAX_REGION_LEN];
        b[0] = 0xe9;
        b[1..5].copy_from_slice(&d.to_le_bytes());
        Some((b, self.len()))
    }
}

fn decode_one(code: Code<'_>, ip: u64) -> Option<Instruction> {
    let off = usize::try_from(ip.checked_sub(code.addr)?).ok()?;
    let rest = code.bytes.get(off..)?;
    let insn = Decoder::with_ip(64, rest, ip, DecoderOptions::NONE).decode();
    (!insn.is_invalid()).then_some(insn)
}

/// Whether control may leave `insn` other than by falling through to the next one.
fn transfers_control(insn: &Instruction) -> bool {
    insn.flow_control() != FlowControl::Next
        || matches!(
            insn.mnemonic(),
            Mnemonic::Syscall | Mnemonic::Sysenter | Mnemonic::Int | Mnemonic::Int1
        )
}

fn near_target(insn: &Instruction) -> Option<u64> {
    matches!(
        insn.op0_kind(),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
    )
    .then(|| insn.near_branch_target())
}

/// An indirect jump whose target the analysis cannot know (a jump table, or a jump
/// through a computed pointer). `jmp [rip+x]` without an index is a jump through one
/// pointer slot (a tail call through the GOT), not a table.
fn is_unknown_indirect_jump(insn: &Instruction) -> bool {
    if insn.mnemonic() != Mnemonic::Jmp {
        return false;
    }
    match insn.op0_kind() {
        OpKind::Register => true,
        OpKind::Memory => {
            !(insn.memory_base() == Register::RIP && insn.memory_index() == Register::None)
        }
        _ => false,
    }
}

/// Analyze the region at `addr`: see the module docs. `code` must hold the original
/// bytes (a backend's own breakpoints put back) of at least the region and, when
/// `func` is given, all of `func`; `addr` must be an instruction boundary (checked by
/// [`crate::analyze`] with the same `func`).
pub fn analyze_region(
    addr: u64,
    code: Code<'_>,
    func: Option<Range<u64>>,
    unwind: Unwind<'_>,
) -> Result<Region, RegionRefusal> {
    let mut r = Region {
        addr,
        len: 0,
        bytes: [0; MAX_REGION_LEN],
        n: 0,
        starts: [0; MAX_REGION_INSNS],
    };
    let undecodable = |at| RegionRefusal::Undecodable { at };
    let mut ip = addr;
    while usize::from(r.len) < JMP_LEN {
        let insn = decode_one(code, ip).ok_or(undecodable(ip))?;
        if let Err(e) = analyze(ip, code, None) {
            return Err(match e {
                AnalyzeError::Refused { reason, .. } => {
                    RegionRefusal::NotRelocatable { at: ip, reason }
                }
                _ => undecodable(ip),
            });
        }
        let len = insn.len();
        let last = usize::from(r.len) + len >= JMP_LEN;
        if !last && transfers_control(&insn) {
            return Err(RegionRefusal::ControlFlowInside {
                at: ip,
                mnemonic: Mnem(insn.mnemonic()),
            });
        }
        if let Some(f) = &func {
            if ip + len as u64 > f.end {
                return Err(RegionRefusal::PastFunctionEnd { end: f.end });
            }
        }
        let off = usize::from(r.len);
        let src = (ip - code.addr) as usize;
        r.bytes[off..off + len].copy_from_slice(&code.bytes[src..src + len]);
        r.starts[usize::from(r.n)] = r.len;
        r.n += 1;
        r.len += len as u8;
        ip += len as u64;
        if r.n == 1 && last {
            // One instruction covers the jump: nothing can branch into its middle.
            return Ok(r);
        }
    }
    let f = func.ok_or(RegionRefusal::NoFunction)?;
    check_function(&r, code, &f)?;
    match unwind {
        Unwind::NoLandingPads => {}
        Unwind::Unknown => return Err(RegionRefusal::UnwindUnknown),
        Unwind::LandingPads(pads) => {
            if let Some(&at) = pads.iter().find(|&&p| r.in_interior(p)) {
                return Err(RegionRefusal::LandingPad { at });
            }
        }
    }
    Ok(r)
}

/// Decode all of `f` and look for branches into the interior, unknown indirect jumps and
/// undecodable bytes.
fn check_function(r: &Region, code: Code<'_>, f: &Range<u64>) -> Result<(), RegionRefusal> {
    let from = f
        .start
        .checked_sub(code.addr)
        .ok_or(RegionRefusal::Undecodable { at: f.start })? as usize;
    let upto = (f.end - code.addr) as usize;
    let bytes = code
        .bytes
        .get(from..upto)
        .ok_or(RegionRefusal::Undecodable { at: f.start })?;
    let mut dec = Decoder::with_ip(64, bytes, f.start, DecoderOptions::NONE);
    let mut insn = Instruction::default();
    while dec.can_decode() {
        let at = dec.ip();
        dec.decode_out(&mut insn);
        if insn.is_invalid() {
            return Err(RegionRefusal::Undecodable { at });
        }
        if let Some(to) = near_target(&insn) {
            if r.in_interior(to) {
                return Err(RegionRefusal::BranchInto { from: at, to });
            }
        }
        if is_unknown_indirect_jump(&insn) {
            return Err(RegionRefusal::IndirectJump { at });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jump_bytes_encode_rel32_and_fill_with_int3() {
        let code = [0x55, 0x48, 0x89, 0xe5, 0x53, 0xc3];
        let r = analyze_region(
            0x1000,
            Code {
                addr: 0x1000,
                bytes: &code,
            },
            Some(0x1000..0x1006),
            Unwind::NoLandingPads,
        )
        .unwrap();
        assert_eq!(r.len(), 5);
        let (b, n) = r.jump_bytes(0x2000).unwrap();
        assert_eq!(&b[..n], &[0xe9, 0xfb, 0x0f, 0, 0]);
        let r2 = Region { len: 7, ..r };
        let (b, n) = r2.jump_bytes(0x1000).unwrap();
        assert_eq!(&b[..n], &[0xe9, 0xfb, 0xff, 0xff, 0xff, 0xcc, 0xcc]);
        assert!(r.jump_bytes(0x1000 + (1 << 32)).is_none());
    }
}
