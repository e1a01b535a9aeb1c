//! Code generation of the collecting trampoline (see the `collect` module docs for the
//! code's shape, the ring protocol and the fault resumes).
//!
//! Invariants of the generated code:
//! * It saves exactly the GPRs it writes (`SAVE_ORDER` filtered by [`Clobbers`]) and
//!   rflags, and restores them before the relocated region: the program sees every
//!   register and flag as without the probe. Values of saved registers are read back
//!   from their stack slots when a record needs them, so a record always shows the
//!   program's values. No vector, x87 or MXCSR state is touched, nothing is called.
//! * The area is addressed RIP-relative when all of it is within a 32-bit displacement
//!   of all of the trampoline, else through `rbx` loaded with the area's address.
//! * Between a claim and its commit the cell pointer is in `r11` and the commit word in
//!   `r10`; `rep movsb` (the only access to the program's memory) touches neither, so a
//!   fault resume finds both.
//! * Nothing is pushed but the saved registers and flags, below the skipped red zone;
//!   no return address into the trampoline is ever pushed.

use iced_x86::code_asm::*;
use iced_x86::{Code as C, Instruction, MemoryOperand, Register as R};

use super::layout::{
    cell, hdr, CELL_SHIFT, COUNTER_STRIPES, DROPPED, FAULTED, FLAG_FAULTED, HITS, RECORD_DATA_MAX,
    STRIPE_LEN,
};
use super::map::{ActionFault, BuiltCollect, CollectMap, COLLECT_LEN, MAX_COLLECTORS};
use super::{Action, CollectSpec, Collector, ThreadId, REGS_LEN, REGS_ORDER};
use crate::frame::RED_ZONE;
use crate::relocate::{check_reach, decode_region, emit_plain_copy, reach, Assembled, CopyMap};
use crate::trampoline::TrampolineError;
use multiprobe_core::Gpr;

/// The registers the action code may write, in push order.
const SAVE_ORDER: [Gpr; 8] = [
    Gpr::Rax,
    Gpr::Rbx,
    Gpr::Rcx,
    Gpr::Rdx,
    Gpr::Rsi,
    Gpr::Rdi,
    Gpr::R10,
    Gpr::R11,
];

/// SysV integer argument registers.
pub(super) const ARGS: [Gpr; 6] = [Gpr::Rdi, Gpr::Rsi, Gpr::Rdx, Gpr::Rcx, Gpr::R8, Gpr::R9];

fn asm_reg(g: Gpr) -> AsmRegister64 {
    use Gpr::*;
    match g {
        Rax => rax,
        Rbx => rbx,
        Rcx => rcx,
        Rdx => rdx,
        Rsi => rsi,
        Rdi => rdi,
        Rbp => rbp,
        Rsp => rsp,
        R8 => r8,
        R9 => r9,
        R10 => r10,
        R11 => r11,
        R12 => r12,
        R13 => r13,
        R14 => r14,
        R15 => r15,
    }
}

/// How the code reaches the area.
#[derive(Clone, Copy)]
enum Base {
    /// `[rip + disp32]` to the area's absolute address.
    Rip(u64),
    /// `[rbx + off]`, `rbx` loaded with the area's address.
    Rbx,
}

impl Base {
    fn mem(self, off: usize) -> MemoryOperand {
        match self {
            Base::Rip(area) => MemoryOperand::with_base_displ(R::RIP, (area + off as u64) as i64),
            Base::Rbx => MemoryOperand::with_base_displ(R::RBX, off as i64),
        }
    }
}

/// How the code keeps the program's rflags.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagSave {
    /// `pushfq` / `popfq`: every bit. Needed by `regs` (the record holds rflags) and
    /// `mem:` (its `cld` changes DF).
    Pushf,
    /// `push rax; lahf; seto al; push rax` and back with `add al, 0x7f; sahf`: the six
    /// arithmetic flags, which are all that `count` and `args` change (`lock inc`,
    /// `cmp`, `lock cmpxchg`, `and`). `popfq` is microcoded and was about half of a
    /// `count` hit; this is a few simple instructions.
    Lahf,
}

/// The set of saved registers and where each one's slot is.
///
/// Stack while the action code runs, from `rsp` up: the registers of `saved` (last
/// pushed first), the flags word (rflags, or `ax` after `lahf; seto al`), with
/// [`FlagSave::Lahf`] the program's `rax` above it, then the skipped red zone.
pub(super) struct Clobbers {
    saved: Vec<Gpr>,
    flags: FlagSave,
}

impl Clobbers {
    fn of(collectors: &[Collector], base: Base) -> Clobbers {
        let records = collectors.iter().any(|c| c.action != Action::Count);
        let mem = collectors
            .iter()
            .any(|c| matches!(c.action, Action::Mem { .. }));
        let ret = collectors.iter().any(|c| c.action.at_return());
        let all_flags = collectors
            .iter()
            .any(|c| matches!(c.action, Action::Regs | Action::Mem { .. }));
        let flags = if all_flags {
            FlagSave::Pushf
        } else {
            FlagSave::Lahf
        };
        let counts = !collectors.is_empty();
        let saved = SAVE_ORDER
            .into_iter()
            .filter(|&g| match g {
                // With lahf, rax is saved below the flags word; else it holds the
                // stripe while rdx is set (and then records).
                Gpr::Rax => counts && flags == FlagSave::Pushf,
                Gpr::Rbx => counts && matches!(base, Base::Rbx),
                Gpr::Rdx => counts,
                Gpr::Rcx | Gpr::Rsi | Gpr::Rdi => mem || ret,
                _ => records,
            })
            .collect();
        Clobbers { saved, flags }
    }

    /// Offset from `rsp` of the saved `g`, while the action code runs.
    fn slot(&self, g: Gpr) -> Option<i32> {
        if g == Gpr::Rax && self.flags == FlagSave::Lahf {
            return Some(self.flags_slot() + 8);
        }
        let k = self.saved.iter().position(|&s| s == g)?;
        Some(8 * (self.saved.len() - 1 - k) as i32)
    }

    /// Offset from `rsp` of the saved rflags (with [`FlagSave::Pushf`]).
    fn flags_slot(&self) -> i32 {
        8 * self.saved.len() as i32
    }

    /// `rsp` as the program had it, minus the action code's `rsp`.
    pub(super) fn program_rsp(&self) -> i32 {
        let saved_rax = if self.flags == FlagSave::Lahf { 8 } else { 0 };
        self.flags_slot() + 8 + saved_rax + RED_ZONE as i32
    }

    fn save_flags(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        match self.flags {
            FlagSave::Pushf => a.pushfq(),
            FlagSave::Lahf => {
                a.push(rax)?;
                a.lahf()?;
                a.seto(al)?;
                a.push(rax)
            }
        }
    }

    fn restore_flags(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        match self.flags {
            FlagSave::Pushf => a.popfq(),
            FlagSave::Lahf => {
                a.pop(rax)?;
                // al is 1 when OF was set: 1 + 0x7f overflows, 0 + 0x7f does not.
                a.add(al, 0x7f)?;
                a.sahf()?;
                a.pop(rax)
            }
        }
    }
}

pub(super) fn lock(mut i: Instruction) -> Instruction {
    i.set_has_lock_prefix(true);
    i
}

pub(super) fn add(
    a: &mut CodeAssembler,
    i: Result<Instruction, IcedError>,
) -> Result<(), IcedError> {
    a.add_instruction(i?)
}

fn bad(index: usize, reason: &'static str) -> TrampolineError {
    TrampolineError::BadCollector { index, reason }
}

fn check(spec: &CollectSpec<'_>) -> Result<(), TrampolineError> {
    if spec.collectors.len() > MAX_COLLECTORS {
        return Err(TrampolineError::TooManyCollectors(
            "more collectors than a site can run",
        ));
    }
    for (i, c) in spec.collectors.iter().enumerate() {
        if c.slot >= spec.layout.counter_slots() {
            return Err(bad(
                i,
                "its counter slot is outside the area's counter table",
            ));
        }
        match c.action {
            Action::Count | Action::Regs => {}
            Action::Args(n) if (1..=6).contains(&n) => {}
            Action::Args(_) => return Err(bad(i, "args takes 1 to 6 arguments")),
            Action::Mem { arg, .. } if !(1..=6).contains(&arg) => {
                return Err(bad(i, "mem takes its pointer from argument 1 to 6"))
            }
            Action::Mem { len, .. } if len == 0 || usize::from(len) > RECORD_DATA_MAX => {
                return Err(bad(i, "mem copies 1 to RECORD_DATA_MAX bytes"))
            }
            Action::Mem { .. } => {}
            Action::Ret | Action::Latency if spec.shadow == 0 => {
                return Err(bad(i, "ret needs the shadow stacks' address"))
            }
            Action::Latency if spec.tsc_ns_q32 == 0 => {
                return Err(bad(i, "latency needs the TSC's rate"))
            }
            Action::Ret | Action::Latency => {}
        }
    }
    let rets = spec
        .collectors
        .iter()
        .filter(|c| c.action.at_return())
        .count();
    if rets > 2 {
        return Err(TrampolineError::TooManyCollectors(
            "a site runs at most 2 return actions in the program (more take the stop path)",
        ));
    }
    Ok(())
}

/// Labels of the out-of-line code of one record collector.
struct OutOfLine {
    full: CodeLabel,
    next: CodeLabel,
    /// `mem:` only: the resume label, the commit to go back to, the copy's length.
    resume: Option<(CodeLabel, CodeLabel, u16)>,
    slot: u32,
}

pub(super) struct Gen<'s> {
    pub(super) spec: &'s CollectSpec<'s>,
    base: Base,
    pub(super) clob: Clobbers,
}

impl Gen<'_> {
    /// Counter slot `slot`'s `field` (line 0), RIP- or `rbx`-relative.
    pub(super) fn counter(&self, slot: u32, field: usize) -> MemoryOperand {
        self.base.mem(self.spec.layout.counter_offset(slot) + field)
    }

    /// `mov [r11 + off], <the program's g>` (through `rax` when `g` was saved).
    fn store_program(&self, a: &mut CodeAssembler, g: Gpr, off: usize) -> Result<(), IcedError> {
        let dst = qword_ptr(r11 + off as i32);
        if g == Gpr::Rsp {
            a.lea(rax, ptr(rsp + self.clob.program_rsp()))?;
            a.mov(dst, rax)
        } else if let Some(s) = self.clob.slot(g) {
            a.mov(rax, qword_ptr(rsp + s))?;
            a.mov(dst, rax)
        } else {
            a.mov(dst, asm_reg(g))
        }
    }

    /// `mov dst, <the program's g>`.
    pub(super) fn load_program(
        &self,
        a: &mut CodeAssembler,
        dst: AsmRegister64,
        g: Gpr,
    ) -> Result<(), IcedError> {
        match self.clob.slot(g) {
            Some(s) => a.mov(dst, qword_ptr(rsp + s)),
            None => a.mov(dst, asm_reg(g)),
        }
    }

    /// Claim a cell: `r10` = reservation + 1, `r11` = the cell; `jae full` when the ring
    /// is full.
    pub(super) fn reserve(&self, a: &mut CodeAssembler, full: CodeLabel) -> Result<(), IcedError> {
        let layout = self.spec.layout;
        let mut retry = a.create_label();
        add(
            a,
            Instruction::with2(C::Mov_r64_rm64, R::RAX, self.base.mem(hdr::HEAD)),
        )?;
        a.set_label(&mut retry)?;
        add(
            a,
            Instruction::with2(C::Mov_r64_rm64, R::RDX, self.base.mem(hdr::TAIL)),
        )?;
        a.add(rdx, layout.ring_cells() as i32)?;
        a.cmp(rax, rdx)?;
        a.jae(full)?;
        a.lea(r10, ptr(rax + 1))?;
        add(
            a,
            Instruction::with2(C::Cmpxchg_rm64_r64, self.base.mem(hdr::HEAD), R::R10).map(lock),
        )?;
        a.jne(retry)?;
        a.mov(r11d, eax)?;
        a.and(r11d, (layout.ring_cells() - 1) as i32)?;
        a.shl(r11, CELL_SHIFT)?;
        add(
            a,
            Instruction::with2(C::Lea_r64_m, R::RDX, self.base.mem(layout.cells_offset())),
        )?;
        a.add(r11, rdx)
    }

    /// The cell's header: tsc, thread, site and slot, len with flags 0, and `ptr`: the
    /// `mem:` pointer already loaded into `rsi`, else 0.
    pub(super) fn header(
        &self,
        a: &mut CodeAssembler,
        slot: u32,
        len: usize,
        ptr_in_rsi: bool,
    ) -> Result<(), IcedError> {
        if ptr_in_rsi {
            a.mov(qword_ptr(r11 + cell::PTR as i32), rsi)?;
        } else {
            a.mov(qword_ptr(r11 + cell::PTR as i32), 0)?;
        }
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(qword_ptr(r11 + cell::TSC as i32), rax)?;
        self.thread_to_rax(a)?;
        a.mov(qword_ptr(r11 + cell::THREAD as i32), rax)?;
        a.mov(rax, u64::from(slot) << 32 | u64::from(self.spec.site))?;
        a.mov(qword_ptr(r11 + cell::SITE as i32), rax)?;
        a.mov(qword_ptr(r11 + cell::LEN as i32), len as i32)
    }

    /// `rax` = the hitting thread's fs base ([`ThreadId`] says how to read it).
    pub(super) fn thread_to_rax(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        match self.spec.thread_id {
            ThreadId::RdFsBase => a.rdfsbase(rax),
            ThreadId::FsZero => a.mov(rax, qword_ptr(0u64).fs()),
        }
    }

    /// Every collector's `lock inc` of its hits, in this thread's stripe: `rax` = the
    /// stripe's offset (the top bits of the fs base times the 32-bit golden ratio), `rdx`
    /// = the area plus it. All counts come before the records (whose `rdtsc` takes
    /// `rdx`); the tracer sees counts only at a drain, in any order.
    fn hits(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        self.stripe_to_rdx(a)?;
        for c in self.spec.collectors {
            let off = self.spec.layout.counter_offset(c.slot) + HITS;
            let hits = MemoryOperand::with_base_displ(R::RDX, off as i64);
            add(a, Instruction::with1(C::Inc_rm64, hits).map(lock))?;
        }
        Ok(())
    }

    /// `eax` = the fs base in `rax` hashed to `0..n` (`n` a power of two): its low bits
    /// times the 32-bit golden ratio, the top bits of that. Threads' fs bases differ in
    /// their middle bits (the TLS blocks are pages apart), which the product spreads to
    /// the top. One hash for the counter stripes, the histogram stripes and the
    /// shadow stacks' blocks.
    pub(super) fn thread_hash(&self, a: &mut CodeAssembler, n: usize) -> Result<(), IcedError> {
        debug_assert!(n.is_power_of_two() && n > 1);
        a.imul_3(eax, eax, 0x9e37_79b9_u32 as i32)?;
        a.shr(eax, 32 - n.trailing_zeros())
    }

    /// `rdx` = the area plus this thread's stripe offset (`rax` = the offset).
    pub(super) fn stripe_to_rdx(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        self.thread_to_rax(a)?;
        self.thread_hash(a, COUNTER_STRIPES)?;
        a.shl(eax, STRIPE_LEN.trailing_zeros())?;
        match self.base {
            Base::Rip(_) => {
                add(
                    a,
                    Instruction::with2(C::Lea_r64_m, R::RDX, self.base.mem(0)),
                )?;
                a.add(rdx, rax)?;
            }
            Base::Rbx => a.lea(rdx, ptr(rbx + rax))?,
        }
        Ok(())
    }

    /// Skip the red zone, save the flags and the clobbered registers, load `rbx`: the
    /// entry's and the return code's common start.
    pub(super) fn prologue(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        a.lea(rsp, ptr(rsp - RED_ZONE as i32))?;
        self.clob.save_flags(a)?;
        for &r in &self.clob.saved {
            a.push(asm_reg(r))?;
        }
        if matches!(self.base, Base::Rbx) && self.clob.saved.contains(&Gpr::Rbx) {
            a.mov(rbx, self.spec.area)?;
        }
        Ok(())
    }

    /// Undo [`Gen::prologue`].
    pub(super) fn epilogue(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        for &r in self.clob.saved.iter().rev() {
            a.pop(asm_reg(r))?;
        }
        self.clob.restore_flags(a)?;
        a.lea(rsp, ptr(rsp + RED_ZONE as i32))
    }

    /// One collector, in line; its out-of-line paths are returned.
    fn collector(
        &self,
        a: &mut CodeAssembler,
        c: &Collector,
    ) -> Result<Option<OutOfLine>, TrampolineError> {
        if matches!(c.action, Action::Count | Action::Ret | Action::Latency) {
            return Ok(None);
        }
        let full = a.create_label();
        let mut next = a.create_label();
        self.reserve(a, full)?;
        let mut resume = None;
        match c.action {
            Action::Count | Action::Ret | Action::Latency => unreachable!(),
            Action::Args(n) => {
                self.header(a, c.slot, 8 * usize::from(n), false)?;
                for (i, &g) in ARGS[..usize::from(n)].iter().enumerate() {
                    self.store_program(a, g, cell::DATA + 8 * i)?;
                }
            }
            Action::Regs => {
                self.header(a, c.slot, REGS_LEN, false)?;
                for (i, &g) in REGS_ORDER.iter().enumerate() {
                    self.store_program(a, g, cell::DATA + 8 * i)?;
                }
                a.mov(rax, self.spec.region.addr())?;
                a.mov(qword_ptr(r11 + (cell::DATA + 16 * 8) as i32), rax)?;
                a.mov(rax, qword_ptr(rsp + self.clob.flags_slot()))?;
                a.mov(qword_ptr(r11 + (cell::DATA + 17 * 8) as i32), rax)?;
            }
            Action::Mem { arg, len } => {
                self.load_program(a, rsi, ARGS[usize::from(arg) - 1])?;
                self.header(a, c.slot, usize::from(len), true)?;
                a.lea(rdi, ptr(r11 + cell::DATA as i32))?;
                a.mov(ecx, u32::from(len))?;
                a.cld()?; // the saved rflags keep the program's DF
                let mut fault = a.create_label();
                a.set_label(&mut fault)?;
                a.rep().movsb()?;
                let commit = crate::relocate::mark(a)?;
                resume = Some((fault, commit, len));
            }
        }
        a.mov(qword_ptr(r11 + cell::SEQ as i32), r10)?;
        a.set_label(&mut next)?;
        a.zero_bytes()?;
        Ok(Some(OutOfLine {
            full,
            next,
            resume,
            slot: c.slot,
        }))
    }

    /// The full path (count a drop, go on) and the fault resume (count, commit as
    /// faulted with the bytes copied, go on) of a collector. Returns the resume label
    /// (and its fault label) for the map.
    fn out_of_line(
        &self,
        a: &mut CodeAssembler,
        o: &mut OutOfLine,
    ) -> Result<Option<(CodeLabel, CodeLabel)>, IcedError> {
        a.set_label(&mut o.full)?;
        add(
            a,
            Instruction::with1(C::Inc_rm64, self.counter(o.slot, DROPPED)).map(lock),
        )?;
        a.jmp(o.next)?;
        let Some((fault, commit, len)) = o.resume else {
            return Ok(None);
        };
        let resume = crate::relocate::mark(a)?;
        // At the fault rcx holds the bytes not copied yet (rep movsb is restartable
        // and stops precisely): len - rcx were read.
        a.mov(eax, u32::from(len))?;
        a.sub(eax, ecx)?;
        a.or(eax, u32::from(FLAG_FAULTED) << 16)?;
        a.mov(dword_ptr(r11 + cell::LEN as i32), eax)?;
        add(
            a,
            Instruction::with1(C::Inc_rm64, self.counter(o.slot, FAULTED)).map(lock),
        )?;
        a.jmp(commit)?;
        Ok(Some((fault, resume)))
    }
}

fn area_base(spec: &CollectSpec<'_>, at: u64) -> Base {
    let (lo, hi) = (spec.area, spec.area + spec.layout.size() as u64);
    let end = at + COLLECT_LEN as u64;
    if reach(at, lo) && reach(at, hi) && reach(end, lo) && reach(end, hi) {
        Base::Rip(spec.area)
    } else {
        Base::Rbx
    }
}

/// Build the collecting trampoline of `spec` for placement at `at` (within a
/// `jmp rel32` of the region). See the `collect` module docs for the code and its
/// invariants.
pub fn build_collect_trampoline(
    spec: &CollectSpec<'_>,
    at: u64,
) -> Result<BuiltCollect, TrampolineError> {
    let region = spec.region;
    check_reach(region, at)?;
    check(spec)?;
    let base = area_base(spec, at);
    let g = Gen {
        spec,
        base,
        clob: Clobbers::of(spec.collectors, base),
    };
    let insns = decode_region(region);
    let mut a = CodeAssembler::new(64)?;
    let mut lit_ret = a.create_label();
    let mut points = Vec::new();

    let mut ret_code = a.create_label();
    let mut ask_entry = a.create_label();
    let mut ask_return = a.create_label();
    let mut broken = a.create_label();
    let rets = spec.collectors.iter().any(|c| c.action.at_return());
    g.prologue(&mut a)?;
    if !spec.collectors.is_empty() {
        g.hits(&mut a)?;
    }
    let mut outs = Vec::new();
    for c in spec.collectors {
        if let Some(o) = g.collector(&mut a, c)? {
            outs.push(o);
        }
    }
    if rets {
        g.shadow_push(&mut a, ret_code, &mut ask_entry)?;
    }
    g.epilogue(&mut a)?;
    let plain = emit_plain_copy(&mut a, region, &insns, lit_ret, &mut points, None)?;
    let mut resumes = Vec::new();
    for o in &mut outs {
        if let Some((fault, resume)) = g.out_of_line(&mut a, o)? {
            resumes.push((fault, resume, o.slot));
        }
    }
    if rets {
        g.return_code(&mut a, &mut ret_code, &mut ask_return, &mut broken)?;
    }
    a.int3()?; // never executed: keeps a stray fall-through from reading data as code
    a.set_label(&mut lit_ret)?;
    let last = insns.last().expect("a region has an instruction");
    a.dq(&[last.next_ip()])?;

    let asm = Assembled::new(&mut a, at, region, COLLECT_LEN)?;
    let mut map = CollectMap {
        addr: at,
        len: asm.bytes.len() as u16,
        copies: CopyMap::resolve(&points, &plain, |l| asm.off(l))?,
        nfaults: resumes.len() as u8,
        ret_code: if rets {
            at + u64::from(asm.off(&ret_code)?)
        } else {
            0
        },
        faults: [(0, ActionFault { slot: 0, resume: 0 }); MAX_COLLECTORS],
        asks: if rets {
            [
                asm.off(&ask_entry)?,
                asm.off(&ask_return)?,
                asm.off(&broken)?,
            ]
        } else {
            [0; 3]
        },
    };
    for (i, (fault, resume, slot)) in resumes.iter().enumerate() {
        map.faults[i] = (
            asm.off(fault)?,
            ActionFault {
                slot: *slot,
                resume: at + u64::from(asm.off(resume)?),
            },
        );
    }
    Ok(BuiltCollect {
        bytes: asm.bytes,
        map,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::collect::AreaLayout;
    use crate::{analyze_region, Code, Unwind};
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    const CODE: u64 = 0x7000_0000;
    /// `nop dword [rax+rax]` (5 bytes: a region on its own), `ret`.
    const FUNC: [u8; 6] = [0x0f, 0x1f, 0x44, 0x00, 0x00, 0xc3];

    fn build(collectors: &[Collector], area: u64) -> Result<Vec<Instruction>, TrampolineError> {
        let b = build_at(collectors, area)?;
        let mut dec = Decoder::with_ip(64, &b.bytes, b.map.addr(), DecoderOptions::NONE);
        Ok((&mut dec)
            .into_iter()
            .take_while(|i| i.mnemonic() != Mnemonic::Int3)
            .collect())
    }

    fn build_at(collectors: &[Collector], area: u64) -> Result<BuiltCollect, TrampolineError> {
        let region = analyze_region(
            CODE,
            Code {
                addr: CODE,
                bytes: &FUNC,
            },
            None,
            Unwind::NoLandingPads,
        )
        .unwrap();
        let layout = AreaLayout::new(64, 4);
        let spec = CollectSpec {
            region: &region,
            site: 1,
            collectors,
            area,
            layout: &layout,
            thread_id: ThreadId::FsZero,
            shadow: 0,
            tsc_ns_q32: 0,
        };
        build_collect_trampoline(&spec, CODE + 0x10_0000)
    }

    #[test]
    fn the_map_locates_the_relocated_region_and_the_jump_back() {
        let b = build_at(&[COUNT], CODE + 0x20_0000).unwrap();
        let m = b.map;
        assert_eq!(m.len(), b.bytes.len());
        assert_eq!(m.locate(m.addr()), Some(crate::Location::Inside));
        assert_eq!(m.locate(m.addr() + m.len() as u64), None);
        let copy = m.copy_of(0);
        let first = crate::Location::Relocated {
            orig: CODE,
            first: true,
        };
        assert_eq!(m.locate(copy), Some(first));
        // The nop is 5 bytes; the jump back follows it.
        let back = crate::Location::Relocated {
            orig: CODE + 5,
            first: false,
        };
        assert_eq!(m.locate(copy + 5), Some(back));
        let mut regs = multiprobe_core::Regs {
            rip: copy,
            rsp: 0x1000,
            ..Default::default()
        };
        assert_eq!(m.fixup(&mut regs), Some(true));
        assert_eq!((regs.rip, regs.rsp), (CODE, 0x1000));
        let mut inside = multiprobe_core::Regs {
            rip: m.addr() + 1,
            ..Default::default()
        };
        assert_eq!(m.fixup(&mut inside), None);
        assert_eq!(inside.rip, m.addr() + 1, "unchanged");
        assert_eq!(m.faults().count(), 0);
    }

    const COUNT: Collector = Collector {
        slot: 2,
        action: Action::Count,
    };

    #[test]
    fn count_near_the_area_keeps_the_arithmetic_flags_without_pushfq() {
        let code = build(&[COUNT], CODE + 0x20_0000).unwrap();
        let m: Vec<Mnemonic> = code.iter().map(|i| i.mnemonic()).collect();
        use Mnemonic::*;
        let stripe = [Mov, Imul, Shr, Shl, Lea, Add, Inc];
        let want = [
            &[Lea, Push, Lahf, Seto, Push, Push][..],
            &stripe,
            &[Pop, Pop, Add, Sahf, Pop, Lea, Nop, Jmp],
        ];
        assert_eq!(m, want.concat());
        assert_eq!(code[6].to_string(), "mov rax,fs:[0]");
        assert!(code[10].is_ip_rel_memory_operand());
        assert_eq!(
            code[10].ip_rel_memory_address(),
            CODE + 0x20_0000,
            "rdx = the area"
        );
        let inc = code[12];
        assert!(inc.has_lock_prefix() && inc.memory_base() == R::RDX);
        let layout = AreaLayout::new(64, 4);
        assert_eq!(inc.memory_displacement64(), layout.counter_offset(2) as u64);
    }

    #[test]
    fn regs_and_mem_keep_every_flag_with_pushfq() {
        for action in [Action::Regs, Action::Mem { arg: 1, len: 8 }] {
            let c = Collector { slot: 0, action };
            let code = build(&[COUNT, c], CODE + 0x20_0000).unwrap();
            let m: Vec<Mnemonic> = code.iter().map(|i| i.mnemonic()).collect();
            assert_eq!(&m[..2], [Mnemonic::Lea, Mnemonic::Pushfq], "{action:?}");
            assert!(!m.contains(&Mnemonic::Lahf), "{action:?}");
        }
    }

    #[test]
    fn a_far_area_is_reached_through_rbx() {
        let far = CODE + (1 << 40);
        let code = build(&[COUNT], far).unwrap();
        let m: Vec<Mnemonic> = code.iter().map(|i| i.mnemonic()).collect();
        assert_eq!(
            &m[..8],
            [
                Mnemonic::Lea,
                Mnemonic::Push,
                Mnemonic::Lahf,
                Mnemonic::Seto,
                Mnemonic::Push,
                Mnemonic::Push,
                Mnemonic::Push,
                Mnemonic::Mov
            ]
        );
        assert_eq!(code[7].immediate64(), far);
        let lea = code
            .iter()
            .find(|i| i.mnemonic() == Mnemonic::Lea && i.op0_register() == R::RDX);
        assert_eq!(
            lea.map(|i| i.to_string()).as_deref(),
            Some("lea rdx,[rbx+rax]")
        );
    }

    #[test]
    fn the_thread_is_read_from_fs_zero() {
        let args = Collector {
            slot: 0,
            action: Action::Args(1),
        };
        let code = build(&[args], CODE + 0x20_0000).unwrap();
        let seg = code
            .iter()
            .find(|i| i.segment_prefix() == R::FS)
            .expect("an fs access");
        assert_eq!(seg.to_string(), "mov rax,fs:[0]");
    }

    #[test]
    fn out_of_range_collectors_are_refused() {
        let area = CODE + 0x20_0000;
        for (action, slot) in [
            (Action::Args(0), 0),
            (Action::Args(7), 0),
            (Action::Mem { arg: 0, len: 8 }, 0),
            (Action::Mem { arg: 7, len: 8 }, 0),
            (Action::Mem { arg: 1, len: 0 }, 0),
            (
                Action::Mem {
                    arg: 1,
                    len: RECORD_DATA_MAX as u16 + 1,
                },
                0,
            ),
            (Action::Count, 4),
        ] {
            let r = build(&[COUNT, Collector { slot, action }], area);
            assert!(
                matches!(r, Err(TrampolineError::BadCollector { index: 1, .. })),
                "{action:?} {slot}: {r:?}"
            );
        }
        assert!(build(&[COUNT; MAX_COLLECTORS + 1], area).is_err());
        assert!(build(&[COUNT; MAX_COLLECTORS], area).is_ok());
    }
}
