//! The program sees no difference: a function run through its collecting trampoline
//! leaves every general-purpose register, `rsp` and all of rflags (DF included) as the
//! direct run does, from random registers; and the `regs` and `args` records hold the
//! registers as the program had them at the probed address.

#[allow(dead_code)]
mod collect_util;
#[allow(dead_code)]
mod machine;

use iced_x86::code_asm::*;
use machine::{fill_memory, random_regs, with_machine, Rng, CODE, DATA, SLOT};
use multiprobe_core::Gpr;
use multiprobe_x86::collect::{
    build_collect_trampoline, Action, CollectSpec, Collector, ThreadId, REGS_ORDER,
};

use collect_util::{whole_function_region, Area};

fn words(data: &[u8]) -> Vec<u64> {
    data.chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// `push rbx; lea rax, [rdi+rsi*2]; ... ; pop rbx; ret` at CODE: a function of every
/// argument register whose region (`push rbx; lea`) needs the function's bounds. No
/// instruction of it writes a flag, so the flags it returns with are the ones it was
/// called with: a probe that lost one shows at the exit.
fn function(base: u64) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).unwrap();
    a.push(rbx).unwrap();
    a.lea(rax, ptr(rdi + rsi * 2)).unwrap();
    a.mov(rbx, rdx).unwrap();
    a.lea(rbx, ptr(rbx + rcx * 8)).unwrap();
    a.lea(rax, ptr(rax + rbx)).unwrap();
    a.not(rax).unwrap();
    a.lea(rax, ptr(rax + r8 * 4 + 3)).unwrap();
    a.lea(rax, ptr(rax + r9)).unwrap();
    a.pop(rbx).unwrap();
    a.ret().unwrap();
    a.assemble(base).unwrap()
}

const EXIT: usize = CODE + 0x200;

#[test]
fn registers_and_flags_after_a_hit_are_those_of_a_direct_call() {
    let collectors = [
        Collector {
            slot: 0,
            action: Action::Count,
        },
        Collector {
            slot: 1,
            action: Action::Regs,
        },
        Collector {
            slot: 2,
            action: Action::Args(6),
        },
        Collector {
            slot: 3,
            action: Action::Mem { arg: 1, len: 24 },
        },
    ];
    with_machine(|m| {
        fill_memory(m);
        let base = m.addr(CODE);
        let f = function(base);
        m.write(CODE, &f);
        m.exit_stub(EXIT, 1);
        let region = whole_function_region(base, &f);
        // All four (flags by pushfq/popfq), count alone and count with args (flags by
        // lahf/sahf, rax saved below them), each with the area near and far.
        let count_args = [collectors[0], collectors[2]];
        let sets: [&[Collector]; 3] = [&collectors, &collectors[..1], &count_args];
        for (near, set) in [
            (true, 0),
            (false, 0),
            (true, 1),
            (false, 1),
            (true, 2),
            (false, 2),
        ] {
            let only_count = set == 1;
            let area = Area::new(64, near.then_some(base), base);
            let chosen = sets[set];
            let spec = CollectSpec {
                region: &region,
                site: 3,
                collectors: chosen,
                area: area.addr(),
                layout: &area.layout,
                thread_id: ThreadId::FsZero,
                shadow: 0,
                tsc_ns_q32: 0,
            };
            let t = build_collect_trampoline(&spec, m.addr(SLOT)).unwrap();
            m.write(SLOT, &t.bytes);
            let mut r = area.reader();
            let mut rng = Rng(0x5eed + near as u64);
            for i in 0..200u64 {
                let mut regs = random_regs(m, &mut rng);
                regs.rdi = m.addr(DATA + (i as usize % 64));
                regs.rflags |= if i % 2 == 0 { 0x400 } else { 0 }; // DF half the time
                let ret_at = regs.rsp;
                m.write((ret_at - m.addr(0)) as usize, &m.addr(EXIT).to_le_bytes());
                let (direct, id0) = m.run(base, &regs);
                let flags0 = m.last_rflags();
                let (probed, id1) = m.run(t.map.addr(), &regs);
                let flags1 = m.last_rflags();
                assert_eq!((id0, id1), (1, 1));
                assert_eq!(probed, direct, "registers, near {near}, run {i}");
                assert_eq!(flags1, flags0, "every rflags bit, near {near}, run {i}");
                // What the program had at the probed address.
                let input_flags = (regs.rflags & 0xcd5) | 0x202;
                let mut got = Vec::new();
                r.drain(|rec| got.push((rec.slot, words(rec.data))));
                if only_count {
                    assert!(got.is_empty());
                    continue;
                }
                let args = [Gpr::Rdi, Gpr::Rsi, Gpr::Rdx, Gpr::Rcx, Gpr::R8, Gpr::R9];
                let args: Vec<u64> = args.iter().map(|&g| regs.gpr(g)).collect();
                if set == 2 {
                    assert_eq!(got, [(2, args)], "the args record alone, run {i}");
                    continue;
                }
                assert_eq!(got.len(), 3, "run {i}");
                let mut want: Vec<u64> = REGS_ORDER.iter().map(|&g| regs.gpr(g)).collect();
                want.extend([base, input_flags]);
                assert_eq!(got[0], (1, want), "the regs record, run {i}");
                assert_eq!(got[1], (2, args), "the args record, run {i}");
                let at = (regs.rdi - m.addr(0)) as usize;
                assert_eq!(got[2], (3, words(&m.read(at..at + 24))), "the mem record");
            }
            for c in chosen {
                assert_eq!(r.counters(c.slot).hits, 200, "slot {}", c.slot);
            }
        }
    });
}
