//! Code generation for `ret` collectors: the shadow-stack push at the entry and the
//! site's return code (see "Returns" in the `collect` module docs and the invariants
//! in `shadow`).
//!
//! Register use (all of them saved by the entry's and the return code's common
//! prologue, [`super::codegen`]'s `Clobbers`, so the program sees none of it):
//! `rcx` the fs base, then the depth after the pop; `rdi` the thread's block; `rsi` the
//! return slot, then the frame; `r10`/`r11` the probe counters, then the cell (as the
//! other records); `rax`/`rdx` scratch.

use iced_x86::code_asm::*;
use iced_x86::{Code as C, Instruction, MemoryOperand, Register as R};

use super::codegen::{add, lock, Gen, ARGS};
use super::layout::{
    cell, COUNTER_STRIPES, DROPPED, HIST_LEN, HIST_MAX, HIST_MIN_INV, HIST_SUM, LIVE, LOST,
};
use super::shadow::{
    BLOCK_LEN, BUSY, DEPTH, FRAMES, FRAME_LEN, F_ARGS, F_CODE, F_FLAGS, F_LOST, F_LOST2, F_RET,
    F_RSP, F_TSC, OWNER, PROBES, SUSPECT, THREADS,
};
use super::{Action, RET_LEN};
use multiprobe_core::Gpr;

impl Gen<'_> {
    fn rets(&self) -> impl Iterator<Item = u32> + '_ {
        self.spec
            .collectors
            .iter()
            .filter(|c| c.action.at_return())
            .map(|c| c.slot)
    }

    /// The absolute address of counter slot `slot`'s `field` (line 0), for a frame to
    /// keep (the code itself reaches counters through [`Gen::counter`]).
    fn counter_abs(&self, slot: u32, field: usize) -> u64 {
        self.spec.area + (self.spec.layout.counter_offset(slot) + field) as u64
    }

    /// `jmp skip` unless slot `slot`'s collector is live (on its site).
    fn skip_unless_live(
        &self,
        a: &mut CodeAssembler,
        slot: u32,
        skip: CodeLabel,
    ) -> Result<(), IcedError> {
        add(
            a,
            Instruction::with2(C::Cmp_rm64_imm8, self.counter(slot, LIVE), 0),
        )?;
        a.je(skip)
    }

    /// `rdi` = this thread's block, `rcx` = its fs base; with `claim`, a free block
    /// in the neighbourhood is claimed. Jumps to `none` when there is none.
    fn find_block(
        &self,
        a: &mut CodeAssembler,
        claim: bool,
        none: CodeLabel,
    ) -> Result<(), IcedError> {
        let mut probe = a.create_label();
        let mut next = a.create_label();
        let mut found = a.create_label();
        self.thread_to_rax(a)?;
        a.mov(rcx, rax)?;
        self.thread_hash(a, THREADS)?;
        a.mov(r11d, eax)?;
        a.mov(r10d, PROBES)?;
        a.set_label(&mut probe)?;
        a.imul_3(rdi, r11, BLOCK_LEN as i32)?;
        a.mov(rax, self.spec.shadow)?;
        a.add(rdi, rax)?;
        a.mov(rax, qword_ptr(rdi + OWNER as i32))?;
        a.cmp(rax, rcx)?;
        a.je(found)?;
        if claim {
            a.test(rax, rax)?;
            a.jne(next)?;
            // rax = 0: the comparand. ZF is set when the block became ours.
            add(
                a,
                Instruction::with2(
                    C::Cmpxchg_rm64_r64,
                    MemoryOperand::with_base_displ(R::RDI, OWNER as i64),
                    R::RCX,
                )
                .map(lock),
            )?;
            a.je(found)?;
        }
        a.set_label(&mut next)?;
        a.inc(r11d)?;
        a.and(r11d, (THREADS - 1) as i32)?;
        a.dec(r10d)?;
        a.jnz(probe)?;
        a.jmp(none)?;
        a.set_label(&mut found)?;
        Ok(())
    }

    /// Count the frame at `rdi + rax` lost (its one or two counter words), unless it
    /// is a suspect (counted already).
    fn count_frame_lost(&self, a: &mut CodeAssembler) -> Result<(), IcedError> {
        let mut done = a.create_label();
        a.test(qword_ptr(rdi + rax + F_FLAGS as i32), SUSPECT as i32)?;
        a.jnz(done)?;
        self.bump_frame_lost(a, rdi + rax, false)?;
        a.set_label(&mut done)?;
        a.zero_bytes()
    }

    /// `lock inc` (or with `back`, `lock dec`: a suspect returned after all) of the one
    /// or two lost-counter words of the frame at `frame`. `rdx` is scratch.
    fn bump_frame_lost(
        &self,
        a: &mut CodeAssembler,
        frame: AsmMemoryOperand,
        back: bool,
    ) -> Result<(), IcedError> {
        let mut no_second = a.create_label();
        for (k, field) in [F_LOST, F_LOST2].into_iter().enumerate() {
            a.mov(rdx, qword_ptr(frame + field as i32))?;
            if k == 1 {
                a.test(rdx, rdx)?;
                a.jz(no_second)?;
            }
            if back {
                a.lock().dec(qword_ptr(rdx))?;
            } else {
                a.lock().inc(qword_ptr(rdx))?;
            }
        }
        a.set_label(&mut no_second)?;
        a.zero_bytes()
    }

    /// The entry's push (module docs): after the other collectors, before the region.
    /// The `int3` in it is [`Gen::ask_entry`]'s.
    pub(super) fn shadow_push(
        &self,
        a: &mut CodeAssembler,
        ret_code: CodeLabel,
        ask: &mut CodeLabel,
    ) -> Result<(), IcedError> {
        let mut lost = a.create_label();
        let mut full = a.create_label();
        let mut clean = a.create_label();
        let mut push = a.create_label();
        let mut done = a.create_label();
        let mut below = a.create_label();
        self.find_block(a, true, lost)?;
        // From here to the end, this thread's block is busy (the tracer compacts it only
        // when nothing of the thread is under way: see `shadow`).
        a.inc(qword_ptr(rdi + BUSY as i32))?;
        a.mov(rdx, qword_ptr(rdi + DEPTH as i32))?;
        a.lea(rsi, ptr(rsp + self.clob.program_rsp()))?;
        // Drop frames at this call's slot (a `call` overwrote it) — but for one whose
        // slot still holds that frame's return code: this entry came by a tail call
        // (`jmp`) from inside that call. It stays; the new frame's original is that
        // return code, so the returns chain (this site's code, then the outer one's).
        // A frame below the slot asks the tracer, unless it did before (a suspect).
        let mut dead = a.create_label();
        a.set_label(&mut clean)?;
        a.test(rdx, rdx)?;
        a.jz(push)?;
        a.imul_3(rax, rdx, FRAME_LEN as i32)?;
        a.cmp(qword_ptr(rdi + rax + F_RSP as i32), rsi)?;
        a.ja(push)?;
        a.jb(below)?;
        a.mov(r11, qword_ptr(rsi))?;
        a.cmp(r11, qword_ptr(rdi + rax + F_CODE as i32))?;
        a.je(push)?;
        a.set_label(&mut dead)?;
        a.mov(r10, rdx)?;
        self.count_frame_lost(a)?;
        a.mov(rdx, r10)?;
        a.dec(rdx)?;
        a.jmp(clean)?;
        a.set_label(&mut below)?;
        a.test(qword_ptr(rdi + rax + F_FLAGS as i32), SUSPECT as i32)?;
        a.jnz(push)?;
        // rdi = the block, rsi = the slot, rdx = the depth: the tracer sweeps the block
        // and sets rdx to its new depth.
        a.set_label(ask)?;
        a.int3()?;
        a.jmp(clean)?;
        a.set_label(&mut push)?;
        a.cmp(rdx, FRAMES as i32)?;
        a.jae(full)?;
        // Reserve the frame first (a nested push then takes the next one).
        a.lea(rax, ptr(rdx + 1))?;
        a.mov(qword_ptr(rdi + DEPTH as i32), rax)?;
        a.imul_3(rax, rax, FRAME_LEN as i32)?;
        // r11 = the frame (rdi stays the block, for `busy`).
        a.lea(r11, ptr(rdi + rax))?;
        a.mov(rax, qword_ptr(rsi))?;
        a.mov(qword_ptr(r11 + F_RET as i32), rax)?;
        a.mov(qword_ptr(r11 + F_RSP as i32), rsi)?;
        a.mov(qword_ptr(r11 + F_FLAGS as i32), 0)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.mov(qword_ptr(r11 + F_TSC as i32), rax)?;
        let mut rets = self.rets();
        let first = rets.next().expect("a ret collector");
        a.mov(rax, self.counter_abs(first, LOST))?;
        a.mov(qword_ptr(r11 + F_LOST as i32), rax)?;
        match rets.next() {
            Some(second) => {
                a.mov(rax, self.counter_abs(second, LOST))?;
                a.mov(qword_ptr(r11 + F_LOST2 as i32), rax)?;
            }
            None => a.mov(qword_ptr(r11 + F_LOST2 as i32), 0)?,
        }
        for (i, &g) in ARGS.iter().enumerate() {
            self.load_program(a, rax, g)?;
            a.mov(qword_ptr(r11 + (F_ARGS + 8 * i) as i32), rax)?;
        }
        a.lea(rax, ptr(ret_code))?;
        a.mov(qword_ptr(r11 + F_CODE as i32), rax)?;
        a.mov(qword_ptr(rsi), rax)?;
        a.dec(qword_ptr(rdi + BUSY as i32))?;
        a.jmp(done)?;
        a.set_label(&mut full)?;
        a.mov(qword_ptr(rdi + DEPTH as i32), rdx)?; // what the clean-up dropped
        a.dec(qword_ptr(rdi + BUSY as i32))?;
        a.set_label(&mut lost)?;
        for slot in self.rets() {
            add(
                a,
                Instruction::with1(C::Inc_rm64, self.counter(slot, LOST)).map(lock),
            )?;
        }
        a.set_label(&mut done)?;
        a.zero_bytes()
    }

    /// The site's return code (module docs), at `label`: entered by the probed
    /// function's `ret`, with the entry's prologue. The `int3` at `ask` is
    /// [`Gen::ask_return`]'s, and `broken` (a `ud2`) where the tracer sends a thread
    /// whose return matches no call.
    pub(super) fn return_code(
        &self,
        a: &mut CodeAssembler,
        label: &mut CodeLabel,
        ask: &mut CodeLabel,
        broken: &mut CodeLabel,
    ) -> Result<(), IcedError> {
        let mut no_block = a.create_label();
        let mut not_top = a.create_label();
        let mut matched = a.create_label();
        let mut counted = a.create_label();
        a.set_label(label)?;
        self.prologue(a)?;
        self.find_block(a, false, no_block)?;
        // rsi = the slot the `ret` popped.
        a.lea(rsi, ptr(rsp + self.clob.program_rsp() - 8))?;
        a.inc(qword_ptr(rdi + BUSY as i32))?;
        a.mov(rcx, qword_ptr(rdi + DEPTH as i32))?;
        a.test(rcx, rcx)?;
        a.jz(not_top)?;
        a.imul_3(rax, rcx, FRAME_LEN as i32)?;
        a.cmp(qword_ptr(rdi + rax + F_RSP as i32), rsi)?;
        a.je(matched)?;
        a.set_label(&mut not_top)?;
        a.dec(qword_ptr(rdi + BUSY as i32))?;
        a.set_label(&mut no_block)?;
        // Not the innermost frame (a call skipped by a longjmp above it, or calls on
        // another stack): with the program's registers back, the tracer puts this
        // call's frame innermost and the thread starts this code again.
        self.epilogue(a)?;
        a.set_label(ask)?;
        a.int3()?;
        a.jmp(*label)?;
        a.set_label(&mut matched)?;
        a.lea(rsi, ptr(rdi + rax))?;
        a.dec(rcx)?;
        a.test(qword_ptr(rsi + F_FLAGS as i32), SUSPECT as i32)?;
        a.jz(counted)?;
        // Counted lost while it looked skipped: it returns after all.
        self.bump_frame_lost(a, rsi + 0, true)?;
        a.set_label(&mut counted)?;
        for c in self.spec.collectors {
            match c.action {
                Action::Ret => self.ret_record(a, c.slot)?,
                Action::Latency => self.latency_count(a, c.slot)?,
                _ => {}
            }
        }
        a.mov(rax, qword_ptr(rsi + F_RET as i32))?;
        a.mov(qword_ptr(rsp + self.clob.program_rsp() - 8), rax)?;
        // The frame is read: it may go now.
        a.mov(qword_ptr(rdi + DEPTH as i32), rcx)?;
        a.dec(qword_ptr(rdi + BUSY as i32))?;
        self.epilogue(a)?;
        a.jmp(qword_ptr(rsp - 8))?;
        // No frame for this return (the tracer found none either): the slot held our
        // address without a push, which the entry never does. Stop the thread rather
        // than guess where to go.
        a.set_label(broken)?;
        a.ud2()
    }

    /// One live `latency` collector at a return (frame in `rsi`): the time since the
    /// entry in ns, counted in its histogram. `rax`, `rdx`, `r10`, `r11` are scratch.
    fn latency_count(&self, a: &mut CodeAssembler, slot: u32) -> Result<(), IcedError> {
        let mut next = a.create_label();
        let mut zero = a.create_label();
        self.skip_unless_live(a, slot, next)?;
        a.rdtsc()?;
        a.shl(rdx, 32)?;
        a.or(rax, rdx)?;
        a.sub(rax, qword_ptr(rsi + F_TSC as i32))?;
        // ns = ticks * (ns per tick << 32) >> 32, from the 128-bit product.
        a.mov(rdx, self.spec.tsc_ns_q32)?;
        a.mul(rdx)?;
        a.shrd(rax, rdx, 32)?;
        a.mov(r10, rax)?;
        // The bucket: 0 for 0 ns, else 1 + the index of the top bit.
        a.xor(edx, edx)?;
        a.test(rax, rax)?;
        a.jz(zero)?;
        a.bsr(rdx, rax)?;
        a.inc(edx)?;
        a.set_label(&mut zero)?;
        a.zero_bytes()?;
        // This thread's stripe of the histogram (the hash `hits` uses).
        self.thread_to_rax(a)?;
        self.thread_hash(a, COUNTER_STRIPES)?;
        a.imul_3(eax, eax, HIST_LEN as i32)?;
        let hist = self.spec.area + self.spec.layout.hist_offset(slot) as u64;
        a.mov(r11, hist)?;
        a.add(r11, rax)?;
        a.lock().inc(qword_ptr(r11 + rdx * 8))?;
        a.lock().add(qword_ptr(r11 + HIST_SUM as i32), r10)?;
        // max, and min kept as u64::MAX - min (0 in a fresh area: none yet): both a
        // compare-and-swap that only runs while this call beats the stored value.
        for (off, invert) in [(HIST_MAX, false), (HIST_MIN_INV, true)] {
            let mut retry = a.create_label();
            let mut done = a.create_label();
            a.mov(rdx, r10)?;
            if invert {
                a.not(rdx)?;
            }
            a.mov(rax, qword_ptr(r11 + off as i32))?;
            a.set_label(&mut retry)?;
            a.cmp(rdx, rax)?;
            a.jbe(done)?;
            a.lock().cmpxchg(qword_ptr(r11 + off as i32), rdx)?;
            a.jne(retry)?;
            a.set_label(&mut done)?;
            a.zero_bytes()?;
        }
        a.set_label(&mut next)?;
        a.zero_bytes()
    }

    /// One live collector's record at a return (frame in `rsi`).
    fn ret_record(&self, a: &mut CodeAssembler, slot: u32) -> Result<(), IcedError> {
        let mut full = a.create_label();
        let mut next = a.create_label();
        self.skip_unless_live(a, slot, next)?;
        // No counter of returns: each one is a record or a drop, which the reader
        // counts (a `lock inc` was a tenth of a return).
        self.reserve(a, full)?;
        self.header(a, slot, RET_LEN, false)?;
        let data = |i: usize| qword_ptr(r11 + (cell::DATA + 8 * i) as i32);
        a.mov(rax, qword_ptr(rsi + F_TSC as i32))?;
        a.mov(data(0), rax)?;
        self.load_program(a, rax, Gpr::Rax)?;
        a.mov(data(1), rax)?;
        self.load_program(a, rax, Gpr::Rdx)?;
        a.mov(data(2), rax)?;
        for i in 0..6 {
            a.mov(rax, qword_ptr(rsi + (F_ARGS + 8 * i) as i32))?;
            a.mov(data(3 + i), rax)?;
        }
        a.mov(qword_ptr(r11 + cell::SEQ as i32), r10)?;
        a.jmp(next)?;
        a.set_label(&mut full)?;
        add(
            a,
            Instruction::with1(C::Inc_rm64, self.counter(slot, DROPPED)).map(lock),
        )?;
        a.set_label(&mut next)?;
        a.zero_bytes()
    }
}
