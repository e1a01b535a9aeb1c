//! Trampolines for promoted sites, generated with iced-x86's assembler (`code_asm`),
//! the relocated region encoded by its `BlockEncoder`; and the map from every
//! trampoline address back to the original code.
//!
//! # Layout
//!
//! One shared *common stub* per process and state-saving strategy ([`build_common`]),
//! and per site ([`build_trampoline`]):
//!
//! ```text
//! entry:     lea rsp,[rsp-152]            ; red zone (128), resume slot, fs/gs fields
//!            pushfq; push [rip->addr]; push r15..r8, rsp, rbp..rax   ; Frame::regs
//!            rsi = ctx, edx = EVENT_PRE, rcx = pre entry; call [common]
//!            dispatch on the exit code (frame module): restore every GPR and rflags
//!            from the frame, then jmp post copy / ret 128 / pop rsp; ret 128 / int3,
//!            or fall through:
//! plain:     the region's instructions, relocated; jmp <region end> when the last one
//!            falls through
//! post:      the region's first instruction, relocated, falling into
//! stub:      the same save with rip = the next original instruction, EVENT_POST,
//!            the post entry; dispatch; "continue" jumps to the plain copy's second
//!            instruction (or the region's end)
//! literals:  addr, next, ctx, entries, common, the original return address
//! ```
//!
//! The common stub fixes the frame's `rsp` field (the push of `rsp` stored a trampoline
//! value), clears `fs_base`/`gs_base` (the backend fills them if it wants: in-process
//! `fs:[0]`), aligns the stack to 64, clears DF if it is set (the ABI's entry state), saves the
//! vector/x87 state, calls the entry (`Entry`: frame, ctx, event), restores the vector
//! state and returns the exit code with `rsp` back at the frame. It is shared because
//! the vector save is most of the code (a 2 KiB AVX-512 register file).
//!
//! # Saving the vector state
//!
//! After saving, with AVX, the stub executes `vzeroupper` before the call: the entry's
//! code (legacy SSE, as Rust compiles it) then runs with the upper state clean, with no
//! SSE/AVX transition on its first vector instruction or on the restore's first load.
//!
//! [`StateSave::Xsave`] saves with `XSAVEC` (or `XSAVE`) and the XCR0 mask, the area
//! 64-byte aligned and its header zeroed first (`XRSTOR` raises #GP on non-zero reserved
//! header bytes, and `XSAVE` does not write `XCOMP_BV`). `XSAVEOPT` is *not* used: its
//! modified optimization skips components unchanged since the last `XRSTOR` from the
//! same address, assuming software left that memory alone, and a stack area at the same
//! depth is reused by the program between two hits.
//!
//! [`StateSave::Registers`] (the default) saves the same program-visible state with
//! plain moves, because `XRSTOR` costs ~270 cycles on this project's machines (a
//! `XSAVEC`+`XRSTOR` round trip ~365, measured in BENCHMARKS.md) against ~25 for moving
//! `zmm0-31` and `k0-7` out and back: every vector register (`zmm0-31` with AVX-512,
//! else `ymm0-15`, else `xmm0-15`), the opmasks, MXCSR (status flags a handler's
//! arithmetic sets are the program's business; put back with `ldmxcsr` only when it
//! changed, as that instruction is slow), and the x87 state: the status word is
//! read (`fnstsw`); when the register stack is not empty (TOP != 0) everything x87 is
//! saved with `FXSAVE64` and restored with `FXRSTOR64`; when it is empty (always, at a
//! function entry, by the ABI) only a changed status word is put back afterwards
//! (`fnstenv`, patch, `fldenv`, which also restores the control word and marks the
//! stack empty again). Limits of this mode: a full x87 stack (8 values, TOP wrapped to
//! 0) is taken for empty; the x87 last-instruction pointers are not restored; state
//! handler code cannot touch is not saved (PKRU, AMX tiles, APX registers); restoring
//! `zmm` by moves leaves the upper-state tracking dirty until the program's next
//! `vzeroupper` (harmless on AMD; on this project's Xeon the program's next legacy SSE
//! instruction then pays an SSE/AVX transition of ~200 ns) — except on the
//! clean-upper path below, which is the usual one.
//!
//! ## Clean upper halves ([`StateSave::Registers`])
//!
//! At nearly every probed point the upper halves (bits 128-511) of `zmm0-15` are zero:
//! code that follows the ABI executes `vzeroupper` before calls and returns, so at a
//! function entry they are even in their init state (XINUSE bits 2, AVX, and 6,
//! ZMM_Hi256, clear). The common stub tests that by value and keeps it so:
//!
//! ```text
//! save:    zmm16-31 -> their slots; k0-7 -> theirs     (now free as scratch)
//!          zmm16..19 = OR of zmm0-15 (vporq x4, vpternlogq x5, vporq)
//!          k1 = vptestmq zmm16, zmm16; r15d = kmovw k1 & 0xfc   (qword lanes 2-7)
//!          r15d == 0: xmm0-15 -> 16 bytes each, packed (4 lines, over zmm0-3's slots)
//!          else:      zmm0-15 -> their 64-byte slots
//!          ... vzeroupper, call the entry (r15 is callee-saved) ...
//! restore: r15d == 0: vzeroupper; xmm0-15 <- packed, by VEX.128 `vmovdqu`
//!          else:      zmm0-15 <- their slots
//!          zmm16-31, k0-7 <- their slots
//! ```
//!
//! Invariants and why:
//! * Exact values either way: the packed path is taken only when bits 128-511 of every
//!   `zmm0-15` are zero, and a VEX.128 load writes bits 0-127 and zeroes 128-511, so
//!   every bit of every register is back whatever the handlers did to it. The test
//!   covers all six upper lanes (0xfc), so an AVX-only (bits 128-255) or
//!   ZMM_Hi256-only (bits 256-511) value takes the whole save.
//! * Init state back: the `vzeroupper` before the loads returns AVX and ZMM_Hi256 to
//!   their init state however the handlers dirtied them, and VEX.128 writes do not
//!   leave it. Without it the program would go on with dirty upper state, and on
//!   CPUs that save the upper halves on an SSE/AVX transition its next legacy SSE
//!   instruction pays for that (~200 ns a hit on this project's Xeon, the
//!   `promoted/3-sse` figure in BENCHMARKS.md): several times the whole hit.
//! * The test reads `zmm0-15` before they are saved and writes only `zmm16-19` and
//!   `k1`, which are saved already and restored from their slots afterwards.
//! * Why by value and not XINUSE (`xgetbv` with ecx = 1): `xgetbv` costs ~8 ns back to
//!   back here (~2 ns added to a loop of the save's moves, as much as the packed
//!   stores save); XINUSE may report a component in use that is zero (the SDM allows
//!   it; a zeroing `vpxord` or `kxorw` leaves zmm16-31 or the opmasks in use here),
//!   where the value test still takes the short path; and the components it could let
//!   us skip whole, opmask and Hi16_ZMM, are in use in every glibc process on this
//!   CPU (its EVEX string functions use `ymm16-31` and `k` registers; XINUSE is 0xa2
//!   at `main` of a C and of a Rust program), and never return to init but by
//!   `XRSTOR`.
//! * The stores are what costs: about one 64-byte line per cycle here (16 `zmm`
//!   stores ~6 ns, 16 packed `xmm` ~4 ns in a loop of the moves), so the packed path
//!   saves a few ns of a hit that does not run SSE code afterwards; `zmm16-31` and the
//!   opmasks are saved whole always (their values, zero or not, come back; their
//!   XINUSE bits stay set once a handler used them).
//! * Tried and not kept: the same for `zmm16-31` (glibc's EVEX code leaves bits
//!   256-511 zero, so `ymm16-30` packed, 8 lines instead of 15): under 1 ns in a paired
//!   A/B, not worth a second test and a CPU feature (AVX512VL) to depend on.
//! * With AVX but not AVX-512 the same, on `ymm0-15`, with `ymm15` as the scratch:
//!   `ymm15` is stored whole to its slot first, `ymm15` = OR of `ymm0-14` and that slot
//!   (AVX1 `vorps`, no AVX2 needed), `vextractf128` + `vptest` of its upper half; zero:
//!   `xmm0-14` packed (`xmm15` is the low half of its slot), the restore `vzeroupper`
//!   and VEX.128 loads; else `ymm0-14` whole. It costs ~1 ns more than the plain `ymm`
//!   moves when no SSE code follows the hit (16 `ymm` stores are only 8 lines) and saves
//!   the ~160 ns transition when some does (a paired A/B of the two stubs built with
//!   AVX-512 hidden on this Xeon: 11.0 against 11.7 ns, 161–168 against 12 ns).
//! * Without AVX (`xmm0-15` by legacy moves) the save is unchanged.
//!
//! # Invariants
//!
//! * No address inside a trampoline is ever pushed as a return address: a relocated
//!   `call` becomes `push [original return address]; jmp target`, so unwinders and
//!   `ret` see only original code, and a trampoline can be abandoned any time.
//! * Every instruction start of the relocated copies has a recorded equivalent state
//!   in the original code ([`Trampoline::fixup`]): a fault there is reported at the
//!   original address. Anywhere else in a trampoline a thread is inside the save,
//!   dispatch or restore code ([`Location::Inside`]): let it run to its exit.
//! * The trampoline never reads or writes below its own `rsp`, and never touches the
//!   red zone (see the frame module for the exits).

use iced_x86::code_asm::*;
use multiprobe_core::Regs;

use crate::cpu::CpuState;
use crate::frame::{
    EVENT_POST, EVENT_PRE, EXIT_NEXT, EXIT_POST, EXIT_RESUME, EXIT_RESUME_STACK, FRAME_TO_RSP,
    RED_ZONE,
};
use crate::region::Region;
pub use crate::relocate::Location;
use crate::relocate::{
    check_reach, decode_region, emit_plain_copy, emit_relocated, falls_through, Assembled, CopyMap,
};

/// Upper bound on a site's trampoline length: allocate units of this size.
pub const TRAMPOLINE_LEN: usize = 1024;
/// Upper bound on the common stub's length.
pub const COMMON_LEN: usize = 2048;
/// Where the shared restore routine starts in the common stub.
pub(crate) const RESTORE_OFF: u16 = 1792;

/// How the common stub preserves the vector and x87 state (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StateSave {
    /// Register moves, MXCSR, x87 when in use: fast, the default.
    Registers,
    /// `XSAVEC`/`XSAVE` and `XRSTOR` with the XCR0 mask: every XSAVE component.
    Xsave,
}

/// Why a trampoline or stub could not be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrampolineError {
    /// The `jmp rel32` at the region, or a RIP-relative operand of a relocated
    /// instruction, cannot reach across the distance.
    #[error("the trampoline at {at:#x} is out of a 32-bit displacement's reach of {target:#x}")]
    OutOfReach {
        /// The trampoline's address.
        at: u64,
        /// What must be reached.
        target: u64,
    },
    /// The code does not fit the unit.
    #[error("the generated code is {len} bytes, more than the {max} available")]
    TooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The CPU cannot do what was asked (`XSAVE` without OS support).
    #[error("this CPU or kernel has no XSAVE support")]
    NoXsave,
    /// A collector of a collecting trampoline cannot be generated as given (see
    /// [`crate::collect::Action`] for the ranges).
    #[error("collector {index}: {reason}")]
    BadCollector {
        /// Its index in the site's collectors.
        index: usize,
        /// What is wrong.
        reason: &'static str,
    },
    /// The site's collectors together are more than one trampoline runs.
    #[error("{0}")]
    TooManyCollectors(&'static str),
    /// iced-x86 refused to encode (a bug, or an instruction it cannot move).
    #[error("encoding failed: {0}")]
    Encode(String),
}

impl From<IcedError> for TrampolineError {
    fn from(e: IcedError) -> Self {
        TrampolineError::Encode(e.to_string())
    }
}

/// A built common stub: place `bytes` at `addr` (readable and executable).
#[derive(Clone, Debug)]
pub struct CommonStub {
    /// Where it must be placed.
    pub addr: u64,
    /// Its code.
    pub bytes: Vec<u8>,
}

/// What a site's trampoline is built from.
#[derive(Clone, Copy, Debug)]
pub struct TrampolineSpec<'a> {
    /// The region the jump replaces.
    pub region: &'a Region,
    /// Passed to the entry points as their second argument.
    pub ctx: u64,
    /// Entry point for [`EVENT_PRE`] (an [`crate::Entry`]).
    pub pre: u64,
    /// Entry point for [`EVENT_POST`].
    pub post: u64,
    /// The common stub's address ([`build_common`]).
    pub common: u64,
}

/// A built trampoline's map: `Copy`, heap-free, usable from a signal handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trampoline {
    addr: u64,
    len: u16,
    region: Region,
    /// Where the original code continues after the region's first instruction (kept:
    /// the entry compares every hit's `rip` with it).
    next: u64,
    /// Offset of the post copy (0: none).
    post: u16,
    /// Offset of the post stub (right after the post copy's instruction).
    stub: u16,
    /// The relocated copies' points.
    copies: CopyMap,
    /// Offsets of the `int3`s of the exits by trap.
    traps: [u16; 2],
}

/// A trampoline: its bytes to place at [`Trampoline::addr`], and its map.
#[derive(Clone, Debug)]
pub struct Built {
    /// The map (keep it for the hot path).
    pub map: Trampoline,
    /// The code.
    pub bytes: Vec<u8>,
}

impl Trampoline {
    /// Where it lives; its first byte is the entry the region's jump targets.
    #[inline]
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Its length.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The region it serves.
    #[inline]
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// Whether `ip` lies inside it.
    #[inline]
    pub fn contains(&self, ip: u64) -> bool {
        ip.wrapping_sub(self.addr) < u64::from(self.len)
    }

    /// Whether there is a post copy (the first instruction falls through).
    #[inline]
    pub fn has_post(&self) -> bool {
        self.post != 0
    }

    /// The post copy's address (the first instruction, then the post stub).
    #[inline]
    pub fn post_copy(&self) -> u64 {
        self.addr + u64::from(self.post)
    }

    /// Where the original code continues after the region's first instruction (the
    /// `rip` a post stub's frame holds).
    #[inline]
    pub fn continuation(&self) -> u64 {
        self.next
    }

    /// The post stub: where a thread that has executed the first instruction and still
    /// owes its post-handlers goes (it saves the state with `rip` = the continuation and
    /// calls the post entry). Only with [`Trampoline::has_post`].
    pub fn post_stub(&self) -> u64 {
        self.addr + u64::from(self.stub)
    }

    /// The plain copy of region instruction `i`.
    #[inline]
    pub fn copy_of(&self, i: usize) -> u64 {
        self.addr + u64::from(self.copies.copy_off(i))
    }

    /// Where a thread that should continue at original address `rip` goes: the
    /// relocated copy for an instruction boundary inside the region (its original bytes
    /// are the jump now), the address itself otherwise.
    #[inline]
    pub fn resume_target(&self, rip: u64) -> u64 {
        match self.region.boundary_index(rip) {
            Some(i) if i > 0 => self.copy_of(i),
            _ => rip,
        }
    }

    /// Whether a SIGTRAP reporting `trap_ip` (the `int3`'s address + 1) is an exit by
    /// trap of this trampoline: `rsp` is then at the [`crate::Frame`].
    pub fn is_trap_exit(&self, trap_ip: u64) -> bool {
        let off = trap_ip.wrapping_sub(1).wrapping_sub(self.addr);
        self.traps.iter().any(|&t| t != 0 && u64::from(t) == off)
    }

    /// Where `ip` stands, or `None` outside this trampoline.
    pub fn locate(&self, ip: u64) -> Option<Location> {
        self.contains(ip)
            .then(|| self.copies.locate(ip.wrapping_sub(self.addr)))
    }

    /// A thread stopped at `regs.rip` inside a relocated copy (a fault, or being moved
    /// out): rewrite `regs` to the equivalent original state and return `Some(first)`
    /// (whether it is the probed instruction); `None`, changing nothing, elsewhere.
    pub fn fixup(&self, regs: &mut Regs) -> Option<bool> {
        if !self.contains(regs.rip) {
            return None;
        }
        self.copies.fixup(self.addr, regs)
    }
}

/// Pushes of the frame's GPRs, from r15 down (rsp and rax last but one/last).
const PUSH_HIGH: [AsmRegister64; 8] = [r15, r14, r13, r12, r11, r10, r9, r8];
const PUSH_LOW: [AsmRegister64; 7] = [rbp, rdi, rsi, rdx, rcx, rbx, rax];

/// Stack bytes the save pushes before the GPRs: the red zone, the resume slot and the
/// fs/gs fields.
const SKIP: i32 = (RED_ZONE + 24) as i32;

pub(crate) struct Lits {
    pub(crate) ctx: CodeLabel,
    pub(crate) pre: CodeLabel,
    pub(crate) post: CodeLabel,
    pub(crate) common: CodeLabel,
    pub(crate) restore: CodeLabel,
}

impl Lits {
    /// Fresh, unplaced labels for the literals, in `a`.
    pub(crate) fn new(a: &mut CodeAssembler) -> Self {
        Lits {
            ctx: a.create_label(),
            pre: a.create_label(),
            post: a.create_label(),
            common: a.create_label(),
            restore: a.create_label(),
        }
    }
}

pub(crate) fn emit_save(
    a: &mut CodeAssembler,
    lits: &Lits,
    rip: CodeLabel,
    event: u64,
    entry: CodeLabel,
) -> Result<(), IcedError> {
    a.lea(rsp, ptr(rsp - SKIP))?;
    a.pushfq()?;
    a.push(qword_ptr(rip))?;
    for r in PUSH_HIGH {
        a.push(r)?;
    }
    a.push(rsp)?; // fixed up by the common stub
    for r in PUSH_LOW {
        a.push(r)?;
    }
    a.mov(rsi, qword_ptr(lits.ctx))?;
    a.mov(edx, event as u32)?;
    a.mov(rcx, qword_ptr(entry))?;
    a.call(qword_ptr(lits.common))?;
    Ok(())
}

/// The direction flag in rflags.
const RFLAGS_DF: u64 = 1 << 10;

/// Flags a fast restore cannot set (`sahf` and the OF trick set only the arithmetic
/// ones): TF, DF, NT, AC, ID. A frame with any of them set takes `popfq`.
const SLOW_FLAGS: u32 = 0x0024_4500;

/// The shared restore routine (in the common stub's unit), called with the frame at
/// `rsp + 8`: every GPR but `rsp` and rflags back from the frame, `rsp` unchanged.
/// `popfq` is slow (~15 cycles), so when the frame's flags differ from the current ones
/// at most in the arithmetic flags (DF is clear: the common stub cleared it, and TF, AC,
/// NT, ID are not set by handler code), they are set with `sahf` (SF ZF AF PF CF) and
/// `add al, 0x7f` (OF) instead; `rax` is loaded last, by a `mov`.
fn emit_restore_routine(a: &mut CodeAssembler) -> Result<(), IcedError> {
    const F: i32 = 8;
    let offs: [(AsmRegister64, i32); 14] = [
        (rbx, 8),
        (rcx, 16),
        (rdx, 24),
        (rsi, 32),
        (rdi, 40),
        (rbp, 48),
        (r8, 64),
        (r9, 72),
        (r10, 80),
        (r11, 88),
        (r12, 96),
        (r13, 104),
        (r14, 112),
        (r15, 120),
    ];
    for (r, o) in offs {
        a.mov(r, qword_ptr(rsp + F + o))?;
    }
    let mut slow = a.create_label();
    a.test(dword_ptr(rsp + F + 136), SLOW_FLAGS)?;
    a.jnz(slow)?;
    a.mov(ah, byte_ptr(rsp + F + 136))?;
    a.mov(al, byte_ptr(rsp + F + 137))?;
    a.shr(al, 3)?;
    a.and(al, 1)?;
    a.add(al, 0x7f)?;
    a.sahf()?;
    a.mov(rax, qword_ptr(rsp + F))?;
    a.ret()?;
    a.set_label(&mut slow)?;
    a.mov(rax, qword_ptr(rsp + F))?;
    a.push(qword_ptr(rsp + F + 136))?;
    a.popfq()?;
    a.ret()?;
    Ok(())
}

/// Where a dispatch goes on with the original code after the first instruction.
#[derive(Clone, Copy)]
enum Next {
    Label(CodeLabel),
    Addr(u64),
}

/// The exit dispatch after the common stub returned (`eax` = exit code, `rsp` = frame).
/// Every exit calls the shared restore routine, then sets `rsp` and leaves its way (see
/// the frame module); the "region" exit comes last and falls through into what follows.
/// Returns the label of the exit-by-trap `int3`.
fn emit_dispatch(
    a: &mut CodeAssembler,
    lits: &Lits,
    post: Option<CodeLabel>,
    next: Next,
) -> Result<CodeLabel, IcedError> {
    let mut region = a.create_label();
    let mut trap = a.create_label();
    let mut resume = a.create_label();
    let mut stack = a.create_label();
    let mut cont = a.create_label();
    a.test(eax, eax)?;
    a.jz(region)?;
    a.cmp(eax, EXIT_NEXT as u32)?;
    a.je(cont)?;
    a.cmp(eax, EXIT_RESUME as u32)?;
    a.je(resume)?;
    a.cmp(eax, EXIT_RESUME_STACK as u32)?;
    a.je(stack)?;
    if let Some(p) = post {
        a.cmp(eax, EXIT_POST as u32)?;
        a.jne(trap)?;
        a.call(qword_ptr(lits.restore))?;
        a.lea(rsp, ptr(rsp + FRAME_TO_RSP as i32))?;
        a.jmp(p)?;
    }
    a.set_label(&mut trap)?;
    a.int3()?;
    a.ud2()?;
    a.set_label(&mut cont)?;
    a.call(qword_ptr(lits.restore))?;
    a.mov(rsp, qword_ptr(rsp + 56))?; // Frame::regs.rsp
    match next {
        Next::Label(l) => a.jmp(l)?,
        Next::Addr(t) => a.jmp(t)?,
    }
    a.set_label(&mut resume)?;
    a.call(qword_ptr(lits.restore))?;
    a.lea(rsp, ptr(rsp + 160))?; // the resume slot
    a.ret_1(RED_ZONE as u32)?;
    a.set_label(&mut stack)?;
    a.call(qword_ptr(lits.restore))?;
    a.lea(rsp, ptr(rsp + 160))?;
    a.pop(rsp)?;
    a.ret_1(RED_ZONE as u32)?;
    a.set_label(&mut region)?;
    a.call(qword_ptr(lits.restore))?;
    a.lea(rsp, ptr(rsp + FRAME_TO_RSP as i32))?;
    Ok(trap)
}

/// Build the trampoline of `spec` for placement at `at`: see the module docs.
pub fn build_trampoline(spec: &TrampolineSpec<'_>, at: u64) -> Result<Built, TrampolineError> {
    let region = spec.region;
    check_reach(region, at)?;
    let insns = decode_region(region);
    let first_falls = falls_through(&insns[0]);
    let last = insns.last().expect("a region has an instruction");
    let mut a = CodeAssembler::new(64)?;
    let lits = Lits::new(&mut a);
    let mut lit_addr = a.create_label();
    let mut lit_next = a.create_label();
    let mut lit_ret = a.create_label();
    let mut post_label = a.create_label();
    let mut points = Vec::new();

    // Entry.
    // Where the original code goes on after the first instruction: the plain copy of
    // the second one, or the region's end.
    let mut second = a.create_label();
    let next = if insns.len() > 1 {
        Next::Label(second)
    } else {
        Next::Addr(region.end())
    };
    emit_save(&mut a, &lits, lit_addr, EVENT_PRE, lits.pre)?;
    let trap0 = emit_dispatch(&mut a, &lits, first_falls.then_some(post_label), next)?;
    // Plain copy.
    let plain = emit_plain_copy(
        &mut a,
        region,
        &insns,
        lit_ret,
        &mut points,
        Some(&mut second),
    )?;
    // Post copy: the first instruction, then the stub.
    let mut trap1 = None;
    let mut stub_label = None;
    if first_falls {
        a.set_label(&mut post_label)?;
        a.zero_bytes()?;
        emit_relocated(&mut a, &insns[0], true, lit_ret, &mut points)?;
        let mut stub = a.create_label();
        a.set_label(&mut stub)?;
        a.zero_bytes()?;
        stub_label = Some(stub);
        emit_save(&mut a, &lits, lit_next, EVENT_POST, lits.post)?;
        trap1 = Some(emit_dispatch(&mut a, &lits, None, next)?);
        // "Continue" (rsp unchanged): where the original code goes on.
        match next {
            Next::Label(l) => a.jmp(l)?,
            Next::Addr(t) => a.jmp(t)?,
        }
    }
    // Literals.
    a.int3()?; // never executed: keeps a stray fall-through from reading data as code
    let mut l = lits.ctx;
    for (label, value) in [
        (&mut lit_addr, region.addr()),
        (&mut lit_next, insns[0].next_ip()),
        (&mut lit_ret, last.next_ip()),
        (&mut l, spec.ctx),
    ] {
        a.set_label(label)?;
        a.dq(&[value])?;
    }
    for (mut label, value) in [
        (lits.pre, spec.pre),
        (lits.post, spec.post),
        (lits.common, spec.common),
        (lits.restore, spec.common + u64::from(RESTORE_OFF)),
    ] {
        a.set_label(&mut label)?;
        a.dq(&[value])?;
    }
    let asm = Assembled::new(&mut a, at, region, TRAMPOLINE_LEN)?;
    let off = |l: &CodeLabel| asm.off(l);
    let mut map = Trampoline {
        addr: at,
        len: asm.bytes.len() as u16,
        region: *region,
        next: insns[0].next_ip(),
        post: 0,
        stub: 0,
        copies: CopyMap::resolve(&points, &plain, off)?,
        traps: [0; 2],
    };
    if first_falls {
        map.post = off(&post_label)?;
        if let Some(l) = &stub_label {
            map.stub = off(l)?;
        }
    }
    map.traps[0] = off(&trap0)?;
    if let Some(t) = trap1 {
        map.traps[1] = off(&t)?;
    }
    Ok(Built {
        map,
        bytes: asm.bytes,
    })
}

/// Layout of the register-moves save area (offsets from its 64-aligned start).
mod area {
    pub const VEC: i32 = 0;
    /// `xmm0-15`, 16 bytes each, when the upper halves are zero (over zmm0-3's slots:
    /// a hit uses one layout or the other).
    pub const LO_PACKED: i32 = 0;
    pub const K: i32 = 2048;
    pub const MXCSR: i32 = 2112;
    pub const FSW: i32 = 2116;
    pub const FX_USED: i32 = 2118;
    /// MXCSR after the call, to compare with the saved one.
    pub const MXCSR_NOW: i32 = 2120;
    pub const ENV: i32 = 2128;
    pub const FX: i32 = 2176;
    pub const LEN: i32 = FX + 512;
}

fn zmm_reg(i: usize) -> AsmRegisterZmm {
    [
        zmm0, zmm1, zmm2, zmm3, zmm4, zmm5, zmm6, zmm7, zmm8, zmm9, zmm10, zmm11, zmm12, zmm13,
        zmm14, zmm15, zmm16, zmm17, zmm18, zmm19, zmm20, zmm21, zmm22, zmm23, zmm24, zmm25, zmm26,
        zmm27, zmm28, zmm29, zmm30, zmm31,
    ][i]
}

fn ymm_reg(i: usize) -> AsmRegisterYmm {
    [
        ymm0, ymm1, ymm2, ymm3, ymm4, ymm5, ymm6, ymm7, ymm8, ymm9, ymm10, ymm11, ymm12, ymm13,
        ymm14, ymm15,
    ][i]
}

fn xmm_reg(i: usize) -> AsmRegisterXmm {
    [
        xmm0, xmm1, xmm2, xmm3, xmm4, xmm5, xmm6, xmm7, xmm8, xmm9, xmm10, xmm11, xmm12, xmm13,
        xmm14, xmm15,
    ][i]
}

const KREGS: [AsmRegisterK; 8] = [k0, k1, k2, k3, k4, k5, k6, k7];

/// `ymm0-15` (AVX) or `xmm0-15` to or from the area; AVX-512 has its own
/// ([`emit_avx512_save`]).
fn emit_vectors(a: &mut CodeAssembler, cpu: &CpuState, save: bool) -> Result<(), IcedError> {
    if cpu.avx {
        for i in 0..16 {
            let m = ymmword_ptr(rsp + area::VEC + 32 * i as i32);
            if save {
                a.vmovdqu(m, ymm_reg(i))?;
            } else {
                a.vmovdqu(ymm_reg(i), m)?;
            }
        }
    } else {
        for i in 0..16 {
            let m = xmmword_ptr(rsp + area::VEC + 16 * i as i32);
            if save {
                a.movdqu(m, xmm_reg(i))?;
            } else {
                a.movdqu(xmm_reg(i), m)?;
            }
        }
    }
    Ok(())
}

fn emit_opmasks(a: &mut CodeAssembler, cpu: &CpuState, save: bool) -> Result<(), IcedError> {
    for (i, k) in KREGS.iter().enumerate() {
        let off = area::K + 8 * i as i32;
        match (cpu.avx512bw, save) {
            (true, true) => a.kmovq(qword_ptr(rsp + off), *k)?,
            (true, false) => a.kmovq(*k, qword_ptr(rsp + off))?,
            (false, true) => a.kmovw(word_ptr(rsp + off), *k)?,
            (false, false) => a.kmovw(*k, word_ptr(rsp + off))?,
        }
    }
    Ok(())
}

/// VEX.128 moves of `xmm` registers `regs` to or from the packed area (16 bytes each),
/// the clean-upper path's save and restore: a VEX.128 load zeroes bits 128-511.
fn emit_packed_xmm(
    a: &mut CodeAssembler,
    regs: std::ops::Range<usize>,
    save: bool,
) -> Result<(), IcedError> {
    for i in regs {
        let m = xmmword_ptr(rsp + area::LO_PACKED + 16 * i as i32);
        if save {
            a.vmovdqu(m, xmm_reg(i))?;
        } else {
            a.vmovdqu(xmm_reg(i), m)?;
        }
    }
    Ok(())
}

/// Moves of `zmm_lo..zmm_hi` to or from their 64-byte slots.
fn emit_zmm(
    a: &mut CodeAssembler,
    regs: std::ops::Range<usize>,
    save: bool,
) -> Result<(), IcedError> {
    for i in regs {
        let m = zmmword_ptr(rsp + area::VEC + 64 * i as i32);
        if save {
            a.vmovdqu64(m, zmm_reg(i))?;
        } else {
            a.vmovdqu64(zmm_reg(i), m)?;
        }
    }
    Ok(())
}

/// The AVX-512 save (module docs, "Clean upper halves"): `zmm16-31` and the opmasks,
/// then a test of bits 128-511 of `zmm0-15` (scratch: `zmm16-19`, `k1`, just saved);
/// all zero: `xmm0-15` packed, `r15d` = 0; else `zmm0-15` whole, `r15d` != 0.
fn emit_avx512_save(a: &mut CodeAssembler, cpu: &CpuState) -> Result<(), IcedError> {
    emit_zmm(a, 16..32, true)?;
    emit_opmasks(a, cpu, true)?;
    // OR of zmm0-15 in four chains (depth 4), then a test of its qword lanes 2-7.
    const OR3: u32 = 0xfe; // dest | src1 | src2
    for j in 0..4 {
        a.vporq(zmm_reg(16 + j), zmm_reg(2 * j), zmm_reg(2 * j + 1))?;
    }
    for j in 0..4 {
        a.vpternlogq(zmm_reg(16 + j), zmm_reg(8 + 2 * j), zmm_reg(9 + 2 * j), OR3)?;
    }
    a.vpternlogq(zmm16, zmm17, zmm18, OR3)?;
    a.vporq(zmm16, zmm16, zmm19)?;
    a.vptestmq(k1, zmm16, zmm16)?;
    a.kmovw(r15d, k1)?;
    a.and(r15d, UPPER_LANES)?;
    let mut wide = a.create_label();
    let mut done = a.create_label();
    a.jnz(wide)?;
    emit_packed_xmm(a, 0..16, true)?;
    a.jmp(done)?;
    a.set_label(&mut wide)?;
    emit_zmm(a, 0..16, true)?;
    a.set_label(&mut done)?;
    a.zero_bytes()?;
    Ok(())
}

/// The AVX-512 restore, the way [`emit_avx512_save`] saved (`r15d`, kept across the
/// call: callee-saved).
fn emit_avx512_restore(a: &mut CodeAssembler, cpu: &CpuState) -> Result<(), IcedError> {
    let mut wide = a.create_label();
    let mut done = a.create_label();
    a.test(r15d, r15d)?;
    a.jnz(wide)?;
    // The upper halves were zero: `vzeroupper` puts them back to zero and their state
    // components (AVX, ZMM_Hi256) back to init, and the VEX.128 loads write the low
    // halves without dirtying them again (a VEX.128 write zeroes bits 128-511).
    a.vzeroupper()?;
    emit_packed_xmm(a, 0..16, false)?;
    a.jmp(done)?;
    a.set_label(&mut wide)?;
    emit_zmm(a, 0..16, false)?;
    a.set_label(&mut done)?;
    a.zero_bytes()?;
    emit_zmm(a, 16..32, false)?;
    emit_opmasks(a, cpu, false)?;
    Ok(())
}

/// The AVX (no AVX-512) save, the same idea with `ymm15` as the scratch: `ymm15` whole
/// to its slot, then the OR of `ymm0-14` and that slot; its upper half zero (`vptest`):
/// `xmm0-14` packed, `r15d` = 0 (`xmm15` is the low half of its slot); else `ymm0-14`
/// whole, `r15d` = 1.
fn emit_avx_save(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let slot15 = area::VEC + 32 * 15;
    a.vmovdqu(ymmword_ptr(rsp + slot15), ymm15)?;
    // AVX1 instructions only (`vorps`, `vextractf128`: 256-bit integer ops need AVX2);
    // a bitwise `vorps` raises no exception and keeps every bit.
    a.vorps(ymm15, ymm0, ymm1)?;
    for i in 2..15 {
        a.vorps(ymm15, ymm15, ymm_reg(i))?;
    }
    a.vorps(ymm15, ymm15, ymmword_ptr(rsp + slot15))?;
    a.vextractf128(xmm15, ymm15, 1)?;
    a.xor(r15d, r15d)?;
    a.vptest(xmm15, xmm15)?;
    a.setne(r15b)?;
    let mut wide = a.create_label();
    let mut done = a.create_label();
    a.jnz(wide)?;
    emit_packed_xmm(a, 0..15, true)?;
    a.jmp(done)?;
    a.set_label(&mut wide)?;
    for i in 0..15 {
        a.vmovdqu(ymmword_ptr(rsp + area::VEC + 32 * i as i32), ymm_reg(i))?;
    }
    a.set_label(&mut done)?;
    a.zero_bytes()?;
    Ok(())
}

/// The AVX restore, the way [`emit_avx_save`] saved (`r15d`).
fn emit_avx_restore(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut wide = a.create_label();
    let mut done = a.create_label();
    a.test(r15d, r15d)?;
    a.jnz(wide)?;
    // As for AVX-512: `vzeroupper` (AVX back to init), then VEX.128 loads.
    a.vzeroupper()?;
    emit_packed_xmm(a, 0..15, false)?;
    a.vmovdqu(xmm15, xmmword_ptr(rsp + area::VEC + 32 * 15))?;
    a.jmp(done)?;
    a.set_label(&mut wide)?;
    for i in 0..16 {
        a.vmovdqu(ymm_reg(i), ymmword_ptr(rsp + area::VEC + 32 * i as i32))?;
    }
    a.set_label(&mut done)?;
    a.zero_bytes()?;
    Ok(())
}

/// Qword lanes 2-7 of a `zmm`: bits 128-511, the AVX and ZMM_Hi256 parts.
const UPPER_LANES: u32 = 0xfc;

/// The save/restore of [`StateSave::Registers`] around the call (module docs).
fn emit_registers_save(a: &mut CodeAssembler, cpu: &CpuState) -> Result<(), IcedError> {
    if cpu.avx512 {
        emit_avx512_save(a, cpu)?;
    } else if cpu.avx {
        emit_avx_save(a)?;
    } else {
        emit_vectors(a, cpu, true)?;
    }
    a.stmxcsr(dword_ptr(rsp + area::MXCSR))?;
    let mut empty = a.create_label();
    let mut done = a.create_label();
    // Through `ax` (free: the frame holds the program's `rax`), not a store the test
    // then reads back.
    a.fnstsw(ax)?;
    a.mov(word_ptr(rsp + area::FSW), ax)?;
    a.test(ah, 0x38)?; // TOP
    a.jz(empty)?;
    a.fxsave64(ptr(rsp + area::FX))?;
    a.mov(byte_ptr(rsp + area::FX_USED), 1)?;
    a.jmp(done)?;
    a.set_label(&mut empty)?;
    a.mov(byte_ptr(rsp + area::FX_USED), 0)?;
    a.set_label(&mut done)?;
    a.zero_bytes()?;
    Ok(())
}

fn emit_registers_restore(a: &mut CodeAssembler, cpu: &CpuState) -> Result<(), IcedError> {
    let mut no_fx = a.create_label();
    let mut x87_done = a.create_label();
    a.cmp(byte_ptr(rsp + area::FX_USED), 0)?;
    a.je(no_fx)?;
    a.fxrstor64(ptr(rsp + area::FX))?;
    a.jmp(x87_done)?;
    a.set_label(&mut no_fx)?;
    a.fnstsw(ax)?;
    a.cmp(ax, word_ptr(rsp + area::FSW))?;
    a.je(x87_done)?;
    // The handler changed the x87 status (the stack was empty before): put the status
    // and control words back and mark every register empty.
    a.fnstenv(ptr(rsp + area::ENV))?;
    a.mov(ax, word_ptr(rsp + area::FSW))?;
    a.mov(word_ptr(rsp + area::ENV + 4), ax)?;
    a.mov(word_ptr(rsp + area::ENV + 8), 0xffff)?;
    a.fldenv(ptr(rsp + area::ENV))?;
    a.set_label(&mut x87_done)?;
    // `ldmxcsr` is microcoded and serializing, `stmxcsr` and a compare are cheaper:
    // load MXCSR only when the handlers changed it (their arithmetic set a status flag,
    // say), comparing through `eax` (free: the frame holds the program's `rax`).
    let mut mxcsr_same = a.create_label();
    a.stmxcsr(dword_ptr(rsp + area::MXCSR_NOW))?;
    a.mov(eax, dword_ptr(rsp + area::MXCSR_NOW))?;
    a.cmp(eax, dword_ptr(rsp + area::MXCSR))?;
    a.je(mxcsr_same)?;
    a.ldmxcsr(dword_ptr(rsp + area::MXCSR))?;
    a.set_label(&mut mxcsr_same)?;
    a.zero_bytes()?;
    if cpu.avx512 {
        emit_avx512_restore(a, cpu)?;
    } else if cpu.avx {
        emit_avx_restore(a)?;
    } else {
        emit_vectors(a, cpu, false)?;
    }
    Ok(())
}

/// Build the common stub (module docs) for placement at `at`, saving state as `save`
/// says on the CPU described by `cpu` ([`CpuState::get`] for this one).
pub fn build_common(
    save: StateSave,
    cpu: &CpuState,
    at: u64,
) -> Result<CommonStub, TrampolineError> {
    let mut a = CodeAssembler::new(64)?;
    let frame = 8; // the return address into the site code lies between
    a.mov(rbx, rsp)?;
    a.lea(rax, ptr(rbx + frame + FRAME_TO_RSP as i32))?;
    a.mov(qword_ptr(rbx + frame + 56), rax)?; // Regs::rsp
    a.xor(eax, eax)?;
    a.mov(qword_ptr(rbx + frame + 144), rax)?; // fs_base
    a.mov(qword_ptr(rbx + frame + 152), rax)?; // gs_base
    a.mov(r13, rdx)?;
    a.mov(r14, rcx)?;
    let (len, mask) = match save {
        StateSave::Registers => (area::LEN, 0),
        StateSave::Xsave => {
            if cpu.xsave_mask == 0 {
                return Err(TrampolineError::NoXsave);
            }
            ((cpu.xsave_size as i32 + 63) & !63, cpu.xsave_mask)
        }
    };
    a.sub(rsp, len)?;
    a.and(rsp, -64)?;
    // The entry runs with DF clear (the ABI's state at a call). `cld` costs several
    // cycles and DF is almost never set where a probe is hit, so only when the frame's
    // rflags (pushed with DF as the program had it) say it is; the restore's `popfq`
    // path puts it back (`SLOW_FLAGS`).
    let mut df_clear = a.create_label();
    a.test(byte_ptr(rbx + frame + 136 + 1), (RFLAGS_DF >> 8) as u32)?; // Regs::rflags
    a.jz(df_clear)?;
    a.cld()?;
    a.set_label(&mut df_clear)?;
    a.zero_bytes()?;
    match save {
        StateSave::Registers => emit_registers_save(&mut a, cpu)?,
        StateSave::Xsave => {
            // XRSTOR faults on non-zero reserved header bytes; XSAVE does not write
            // XCOMP_BV. The header is bytes 512..576.
            a.xor(eax, eax)?;
            for i in 0..8 {
                a.mov(qword_ptr(rsp + 512 + 8 * i), rax)?;
            }
            a.mov(eax, mask as u32)?;
            a.mov(edx, (mask >> 32) as u32)?;
            if cpu.xsavec {
                a.xsavec64(ptr(rsp))?;
            } else {
                a.xsave64(ptr(rsp))?;
            }
        }
    }
    if cpu.avx {
        // Saved: the entry runs with the upper halves of the vector registers clean.
        // Left dirty (by the program, or by the save's own moves), the entry's legacy
        // SSE code (Rust's `movups`) pays a state transition on its first instruction
        // and the restore's first VEX load another, where the CPU does that; they were
        // the hottest instructions of an entry+return hit here. The restore writes every
        // bit back.
        a.vzeroupper()?;
    }
    a.lea(rdi, ptr(rbx + frame))?;
    a.mov(rdx, r13)?;
    a.call(r14)?;
    a.mov(r12, rax)?;
    match save {
        StateSave::Registers => emit_registers_restore(&mut a, cpu)?,
        StateSave::Xsave => {
            a.mov(eax, mask as u32)?;
            a.mov(edx, (mask >> 32) as u32)?;
            a.xrstor64(ptr(rsp))?;
        }
    }
    a.mov(rax, r12)?;
    a.mov(rsp, rbx)?;
    a.ret()?;
    let mut bytes = a.assemble(at)?;
    if bytes.len() > RESTORE_OFF as usize {
        return Err(TrampolineError::TooLong {
            len: bytes.len(),
            max: RESTORE_OFF as usize,
        });
    }
    bytes.resize(RESTORE_OFF as usize, 0xcc);
    let mut r = CodeAssembler::new(64)?;
    emit_restore_routine(&mut r)?;
    bytes.extend(r.assemble(at + u64::from(RESTORE_OFF))?);
    if bytes.len() > COMMON_LEN {
        return Err(TrampolineError::TooLong {
            len: bytes.len(),
            max: COMMON_LEN,
        });
    }
    Ok(CommonStub { addr: at, bytes })
}
