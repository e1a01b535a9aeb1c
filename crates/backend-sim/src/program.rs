//! Programs for the simulated machine, and a generator that turns any
//! [`ProgramSpec`] (fuzzer-chosen) into a valid one.
//!
//! A generated program is a `main` that every thread runs — a counted loop calling
//! some of the program's functions — followed by the functions. Registers by
//! convention: `r15` = shared data (threads race on it on purpose), `r14` = the
//! thread's private data, `r13` = the loop counter, `rsp` = the thread's stack; function
//! bodies only write `rax`..`r12` (not `rsp`), so every thread ends (halts or faults)
//! within a bounded number of steps unless a "wild" instruction breaks the
//! convention. Bodies may fault: `div` by a register that is zero, `ud`, a program
//! `brk`, loads and stores through arbitrary registers.
//!
//! Calls for return probes: a body may call a later function ([`Op::Call`]) or itself
//! ([`Op::Recurse`], bounded by a depth counter in private word 14 that `main` sets
//! to [`RECURSION`] before each call), and may *escape* ([`Op::Escape`]): reload the
//! stack pointer `main` saved in private word 15 before the call and return from the
//! outermost call at once — `longjmp`: the calls in between never return. Bodies use
//! private words 0..14 only.
//!
//! Invariant: `boundaries` is exactly the set of instruction starts of the code, every
//! branch target is one of them, `functions` every call target, and the code lies
//! inside [`CODE`] below [`RET_TRAMPOLINE`].

use std::collections::BTreeSet;

use arbitrary::Arbitrary;
use multiprobe_core::{Gpr, Regs};

use crate::isa::{decode, Insn};
use crate::memory::{SimMemory, CODE, DATA, RET_TRAMPOLINE, STACK, STACK_SIZE};

/// Most threads a program has.
pub const MAX_THREADS: usize = 6;
/// How deep [`Op::Recurse`] recurses from one call of `main`'s (all functions together).
pub const RECURSION: i16 = 3;
/// Private data word (offset from `r14`) holding the recursion budget.
const DEPTH_SLOT: i8 = 0x70;
/// Private data word holding the stack pointer `main` had before its current call.
const ESCAPE_SLOT: i8 = 0x78;

/// A program: code, its instruction starts, and each thread's initial registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Program {
    /// Code bytes, loaded at `CODE.start`.
    pub code: Vec<u8>,
    /// Addresses where instructions start.
    pub boundaries: BTreeSet<u64>,
    /// Function entries: the targets of the program's `call`s (where return probes may
    /// be placed).
    pub functions: BTreeSet<u64>,
    /// Initial registers of each thread (`rip` is its entry point).
    pub threads: Vec<Regs>,
}

impl Program {
    /// A program from explicit instructions (laid out from `CODE.start`) and threads.
    pub fn from_insns(insns: &[Insn], threads: Vec<Regs>) -> Program {
        let mut code = Vec::new();
        let mut boundaries = BTreeSet::new();
        let mut functions = BTreeSet::new();
        for i in insns {
            let at = CODE.start + code.len() as u64;
            boundaries.insert(at);
            if let Insn::Call(rel) = i {
                functions.insert((at + i.len()).wrapping_add(*rel as i64 as u64));
            }
            i.encode(&mut code);
        }
        assert!(
            code.len() as u64 <= RET_TRAMPOLINE - CODE.start,
            "program too big"
        );
        Program {
            code,
            boundaries,
            functions,
            threads,
        }
    }

    /// Initial registers for thread `tid` entering at `entry`: its stack and private
    /// data, and distinct non-zero values in the other registers.
    pub fn thread_regs(tid: usize, entry: u64) -> Regs {
        let mut r = Regs::default();
        for (i, g) in Gpr::ALL.iter().enumerate() {
            *r.gpr_mut(*g) = (tid as u64 + 1) * 0x100 + i as u64 + 1;
        }
        r.rsp = STACK.start + STACK_SIZE * (tid as u64 + 1);
        r.r15 = DATA.start;
        r.r14 = DATA.start + 0x400 + 0x80 * tid as u64;
        r.rip = entry;
        r
    }

    /// Write the code into `mem`.
    pub fn load(&self, mem: &SimMemory) {
        for (i, b) in self.code.iter().enumerate() {
            mem.set_byte(CODE.start + i as u64, *b);
        }
    }

    /// The original instruction at `addr`, if one starts there.
    pub fn insn_at(&self, addr: u64) -> Option<Insn> {
        if !self.boundaries.contains(&addr) {
            return None;
        }
        decode(&self.code[(addr - CODE.start) as usize..])
    }

    /// The original byte at `addr` (0 outside the code).
    pub fn byte(&self, addr: u64) -> u8 {
        addr.checked_sub(CODE.start)
            .and_then(|o| self.code.get(o as usize))
            .copied()
            .unwrap_or(0)
    }

    /// The code range this program occupies.
    pub fn code_range(&self) -> std::ops::Range<u64> {
        CODE.start..CODE.start + self.code.len() as u64
    }

    /// Generate the program `spec` describes.
    pub fn generate(spec: &ProgramSpec) -> Program {
        generate(spec)
    }
}

/// A fuzzer's description of a program. Every value is valid.
///
/// Its `Arbitrary` reads a fixed shape (one to four functions of one to ten
/// instructions, one to four calls), so that any bytes, random ones included, make a
/// program worth probing.
#[derive(Clone, Debug)]
pub struct ProgramSpec {
    /// Threads: `1 + threads % MAX_THREADS`.
    pub threads: u8,
    /// Loop iterations of `main`: `1 + iterations % 8`.
    pub iterations: u8,
    /// Function bodies (at most 4 are used, each at most 10 instructions).
    pub functions: Vec<Vec<Op>>,
    /// Which functions `main`'s loop calls, in order (at most 4).
    pub calls: Vec<u8>,
}

impl<'a> Arbitrary<'a> for ProgramSpec {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        let threads = u8::arbitrary(u)?;
        let iterations = u8::arbitrary(u)?;
        let nfun = 1 + usize::from(u8::arbitrary(u)?) % 4;
        let mut functions = Vec::with_capacity(nfun);
        for _ in 0..nfun {
            let n = 1 + usize::from(u8::arbitrary(u)?) % 10;
            functions.push((0..n).map(|_| Op::arbitrary(u)).collect::<Result<_, _>>()?);
        }
        let ncalls = 1 + usize::from(u8::arbitrary(u)?) % 4;
        let calls = (0..ncalls)
            .map(|_| u8::arbitrary(u))
            .collect::<Result<_, _>>()?;
        Ok(ProgramSpec {
            threads,
            iterations,
            functions,
            calls,
        })
    }
}

impl ProgramSpec {
    /// The same program with every access outside the thread's own data and stack
    /// replaced by one inside: threads then cannot affect each other, so their final
    /// states do not depend on the interleaving (for the concurrent machine).
    pub fn private(&self) -> ProgramSpec {
        let mut p = self.clone();
        for f in &mut p.functions {
            for op in f.iter_mut() {
                *op = match *op {
                    Op::StoreShared(s, v) => Op::StoreLocal(s, v),
                    Op::WildLoad(d, s, _) => Op::LoadLocal(d, s),
                    other => other,
                };
            }
        }
        p
    }
}

/// One instruction of a function body, in program terms.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub enum Op {
    /// `nop`.
    Nop,
    /// `movi`.
    Movi(u8, i16),
    /// An ALU operation between two work registers.
    Alu(u8, u8, u8),
    /// `addi`.
    Addi(u8, i8),
    /// Load shared word `slot % 32`.
    LoadShared(u8, u8),
    /// Store shared word `slot % 32`.
    StoreShared(u8, u8),
    /// Load private word `slot % 16`.
    LoadLocal(u8, u8),
    /// Store private word `slot % 16`.
    StoreLocal(u8, u8),
    /// Push a work register and pop it into another.
    PushPop(u8, u8),
    /// `div` (faults if the divisor is zero).
    Div(u8, u8),
    /// Skip the next instruction if a register is non-zero.
    SkipIf(u8),
    /// `ud`: always faults.
    Ud,
    /// A program breakpoint (not ours).
    Brk,
    /// A load through any register with any displacement (may fault).
    WildLoad(u8, u8, i8),
    /// Call a later function (`1 + n % later` functions on), if there is one in reach.
    Call(u8),
    /// Call this function again while the recursion budget lasts (a work register
    /// carries the count).
    Recurse(u8),
    /// `longjmp` to `main`: return from `main`'s current call at once, skipping every
    /// call in between.
    Escape,
}

/// Work register `r` (modulo 12) of those function bodies may write: everything but
/// `rsp`, `r13`-`r15`, in hardware order.
fn w(r: u8) -> Gpr {
    Gpr::ALL
        .into_iter()
        .filter(|g| !matches!(g, Gpr::Rsp | Gpr::R13 | Gpr::R14 | Gpr::R15))
        .nth(usize::from(r) % 12)
        .expect("12 work registers")
}

/// A `call` from `at` (its address) to `target`, if a rel8 reaches.
fn call_to(at: u64, target: u64) -> Option<Insn> {
    i8::try_from(target as i64 - (at + 2) as i64)
        .ok()
        .map(Insn::Call)
}

/// Where a body is laid out, for its calls: its own start, and the starts of the
/// functions after it (known once every body's length is: see `generate`).
struct Layout<'a> {
    start: u64,
    later: &'a [u64],
}

fn len_of(insns: &[Insn]) -> u64 {
    insns.iter().map(|i| i.len()).sum()
}

fn body(ops: &[Op], layout: &Layout<'_>) -> Vec<Insn> {
    let mut out = Vec::new();
    let mut skip: Option<Gpr> = None;
    for op in ops.iter().take(10) {
        let at = layout.start + len_of(&out) + if skip.is_some() { 3 } else { 0 };
        let insns: Vec<Insn> = match *op {
            Op::Nop => vec![Insn::Nop],
            Op::Movi(d, i) => vec![Insn::Movi(w(d), i)],
            Op::Alu(k, d, s) => vec![match k % 4 {
                0 => Insn::Add(w(d), w(s)),
                1 => Insn::Sub(w(d), w(s)),
                2 => Insn::Xor(w(d), w(s)),
                _ => Insn::Mul(w(d), w(s)),
            }],
            Op::Addi(d, i) => vec![Insn::Addi(w(d), i)],
            Op::LoadShared(d, s) => vec![Insn::Load(w(d), Gpr::R15, (s % 16) as i8 * 8)],
            Op::StoreShared(s, v) => vec![Insn::Store(Gpr::R15, w(v), (s % 16) as i8 * 8)],
            Op::LoadLocal(d, s) => vec![Insn::Load(w(d), Gpr::R14, (s % 14) as i8 * 8)],
            Op::StoreLocal(s, v) => vec![Insn::Store(Gpr::R14, w(v), (s % 14) as i8 * 8)],
            Op::PushPop(a, b) => vec![Insn::Push(w(a)), Insn::Pop(w(b))],
            Op::Div(d, s) => vec![Insn::Div(w(d), w(s))],
            Op::SkipIf(c) => {
                skip = Some(w(c));
                continue;
            }
            Op::Ud => vec![Insn::Ud],
            Op::Brk => vec![Insn::Brk],
            Op::WildLoad(d, s, i) => vec![Insn::Load(w(d), Gpr::from_number(s & 15).unwrap(), i)],
            Op::Call(n) => {
                let target = (!layout.later.is_empty())
                    .then(|| layout.later[usize::from(n) % layout.later.len()]);
                vec![target.and_then(|t| call_to(at, t)).unwrap_or(Insn::Jmp(0))]
            }
            Op::Recurse(c) => {
                // if budget != 0 { budget -= 1; call self }
                let c = w(c);
                let call = call_to(at + 16, layout.start).unwrap_or(Insn::Jmp(0));
                vec![
                    Insn::Load(c, Gpr::R14, DEPTH_SLOT),
                    Insn::Jnz(c, 2),
                    Insn::Jmp(9),
                    Insn::Addi(c, -1),
                    Insn::Store(Gpr::R14, c, DEPTH_SLOT),
                    call,
                ]
            }
            Op::Escape => vec![
                Insn::Load(Gpr::Rsp, Gpr::R14, ESCAPE_SLOT),
                Insn::Addi(Gpr::Rsp, -8),
                Insn::Ret,
            ],
        };
        if let Some(c) = skip.take() {
            let len: u64 = insns.iter().map(|i| i.len()).sum();
            out.push(Insn::Jnz(c, len as i8));
        }
        out.extend(insns);
    }
    out.push(Insn::Ret);
    out
}

fn generate(spec: &ProgramSpec) -> Program {
    let threads = 1 + usize::from(spec.threads) % MAX_THREADS;
    let iterations = 1 + i16::from(spec.iterations % 8);
    let funcs: Vec<&Vec<Op>> = spec.functions.iter().take(4).collect();
    let calls: Vec<usize> = if funcs.is_empty() {
        Vec::new()
    } else {
        spec.calls
            .iter()
            .take(4)
            .map(|c| usize::from(*c) % funcs.len())
            .collect()
    };
    // Layout: main, then the functions. main's size is known before the calls'
    // displacements are: movi(4) + per call movi(4) store(4) store(4) call(2) +
    // addi(3) + jnz(3) + halt(1).
    let per_call = 4 + 4 + 4 + 2;
    let main_len = 4 + per_call * calls.len() as u64 + 3 + 3 + 1;
    // A body's length does not depend on where it or its callees are (a call out of
    // reach becomes an instruction of the same length), so lay out once with dummy
    // targets to learn the starts, then for real.
    let mut fn_addr: Vec<u64> = Vec::new();
    let mut at = CODE.start + main_len;
    for f in &funcs {
        fn_addr.push(at);
        at += len_of(&body(
            f,
            &Layout {
                start: at,
                later: &[],
            },
        ));
    }
    let bodies: Vec<Vec<Insn>> = funcs
        .iter()
        .enumerate()
        .map(|(i, f)| {
            body(
                f,
                &Layout {
                    start: fn_addr[i],
                    later: &fn_addr[i + 1..],
                },
            )
        })
        .collect();
    let mut insns = vec![Insn::Movi(Gpr::R13, iterations)];
    let loop_start = CODE.start + 4;
    let mut pc = loop_start;
    for &c in &calls {
        insns.push(Insn::Movi(Gpr::Rax, RECURSION));
        insns.push(Insn::Store(Gpr::R14, Gpr::Rax, DEPTH_SLOT));
        insns.push(Insn::Store(Gpr::R14, Gpr::Rsp, ESCAPE_SLOT));
        pc += 12;
        // Out of rel8 reach: call the nearest-possible thing instead — nothing.
        insns.push(call_to(pc, fn_addr[c]).unwrap_or(Insn::Jmp(0)));
        pc += 2;
    }
    insns.push(Insn::Addi(Gpr::R13, -1));
    pc += 3;
    let back = loop_start as i64 - (pc + 3) as i64;
    insns.push(Insn::Jnz(Gpr::R13, back as i8));
    insns.push(Insn::Halt);
    for b in bodies {
        insns.extend(b);
    }
    let threads = (0..threads)
        .map(|t| Program::thread_regs(t, CODE.start))
        .collect();
    Program::from_insns(&insns, threads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_programs_decode_back_to_their_boundaries() {
        let spec = ProgramSpec {
            threads: 2,
            iterations: 3,
            functions: vec![
                vec![Op::SkipIf(1), Op::PushPop(2, 3), Op::StoreShared(1, 2)],
                vec![Op::Div(0, 5), Op::Ud],
            ],
            calls: vec![0, 1, 0],
        };
        let p = Program::generate(&spec);
        let mut at = CODE.start;
        let mut seen = BTreeSet::new();
        while at < p.code_range().end {
            seen.insert(at);
            at += p.insn_at(at).expect("decodes").len();
        }
        assert_eq!(seen, p.boundaries);
        assert_eq!(p.threads.len(), 3);
        assert!(matches!(p.insn_at(CODE.start + 16), Some(Insn::Call(_))));
        assert_eq!(p.functions.len(), 2, "both functions are called");
    }

    #[test]
    fn bodies_call_later_functions_recurse_and_escape() {
        let spec = ProgramSpec {
            threads: 0,
            iterations: 0,
            functions: vec![vec![Op::Recurse(0), Op::Call(0), Op::Nop], vec![Op::Escape]],
            calls: vec![0],
        };
        let p = Program::generate(&spec);
        let f = *p.functions.first().unwrap();
        let g = *p.functions.last().unwrap();
        assert!(f < g && p.functions.len() == 2, "{:?}", p.functions);
        let insns: Vec<Insn> = {
            let mut v = Vec::new();
            let mut at = f;
            while at < g {
                let i = p.insn_at(at).unwrap();
                at += i.len();
                v.push(i);
            }
            v
        };
        // The recursion block calls f itself, the call op calls g.
        let calls: Vec<u64> = {
            let mut at = f;
            insns
                .iter()
                .filter_map(|i| {
                    let here = at;
                    at += i.len();
                    match i {
                        Insn::Call(r) => Some((here + 2).wrapping_add(*r as i64 as u64)),
                        _ => None,
                    }
                })
                .collect()
        };
        assert_eq!(calls, [f, g]);
        assert_eq!(
            p.insn_at(g),
            Some(Insn::Load(Gpr::Rsp, Gpr::R14, ESCAPE_SLOT))
        );
    }
}
