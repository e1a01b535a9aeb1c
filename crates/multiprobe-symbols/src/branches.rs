//! The direct branches of one ELF file's code, by target: which instruction of the file
//! jumps or calls into a given range of it.
//!
//! Jump-optimized probes need this. A region replaced by a 5-byte `jmp` must not be the
//! target of any branch: from its own function (which the region analysis decodes) and
//! from every other function of the file — a compiler's `foo.cold` part jumping back
//! into `foo`, or glibc's `__mempcpy_evex_unaligned_erms`, whose last instruction jumps
//! to the second instruction of `__memcpy_evex_unaligned_erms`. A thread taking such a
//! branch would land inside the jump's displacement.
//!
//! What is decoded: the range of every function symbol and of every unwind entry (FDE)
//! — between them all the code a compiler, or an assembler given CFI directives (as
//! glibc's string functions are), emitted — each from its first byte, so decoding
//! starts on instruction boundaries. A direct branch is one whose target is in the
//! instruction (`jmp`, `jcc`, `call`, `loop*`, `jrcxz`, `xbegin`). Branches between
//! files are not looked for: position-independent code reaches another file only
//! through the PLT or the GOT, indirectly.
//!
//! What is kept: every function's start (a symbol's or an FDE's: code may be entered
//! there by any call, direct or not), and the branches that cross from one function
//! into the middle of another — the ones the region analysis, which decodes the
//! region's own function, cannot see. A branch within one function (by the same
//! definition the probes use: the innermost symbol holding an address, else its FDE)
//! and a branch to a function's start are not kept one by one: that leaves 2,300 of
//! libc's ~66,000 direct branches (decoded in 20 ms, release build), and 190,000 (3 MB)
//! of a 117 MB libLLVM's (0.75 s: the first probe promoted in such a file pays that
//! once).
//!
//! Limits: code with neither a symbol nor an FDE (assembly without CFI in a stripped
//! file) is not decoded, and an undecodable byte ends its range's decoding; indirect
//! branches (jump tables) are the region analysis's to refuse, in the one function
//! whose tables can target it.

use std::ops::Range;

use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind};

/// The places other code of one file can enter (file virtual addresses): its
/// functions' starts, and its branches from one function into the middle of another.
#[derive(Debug, Default)]
pub struct BranchIndex {
    /// `(target, branch)` of the branches kept (module docs), sorted.
    by_target: Vec<(u64, u64)>,
    /// Every function's start, sorted.
    entries: Vec<u64>,
}

impl BranchIndex {
    /// Decode each of `ranges` (the functions: `[start, end)` file addresses; overlaps
    /// are fine), whose bytes `code` gives (`None`: not in the file, skipped);
    /// `function_of` gives the start of the function holding an address, as the probes
    /// see it.
    pub(crate) fn build<'a>(
        ranges: impl IntoIterator<Item = (u64, u64)>,
        code: impl Fn(u64, u64) -> Option<&'a [u8]>,
        function_of: impl Fn(u64) -> Option<u64>,
    ) -> BranchIndex {
        let mut ranges: Vec<(u64, u64)> = ranges.into_iter().filter(|r| r.0 < r.1).collect();
        // One decoding per start, the longest (a symbol and its FDE usually agree).
        ranges.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
        ranges.dedup_by_key(|r| r.0);
        let entries: Vec<u64> = ranges.iter().map(|r| r.0).collect();
        let is_entry = |a: u64| entries.binary_search(&a).is_ok();
        let mut by_target = Vec::new();
        let mut insn = Instruction::default();
        for (start, end) in ranges {
            let Some(bytes) = code(start, end) else {
                continue;
            };
            let mut dec = Decoder::with_ip(64, bytes, start, DecoderOptions::NONE);
            while dec.can_decode() {
                dec.decode_out(&mut insn);
                if insn.is_invalid() {
                    break;
                }
                if matches!(
                    insn.op0_kind(),
                    OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64
                ) {
                    let to = insn.near_branch_target();
                    let from = insn.ip();
                    if !is_entry(to) && function_of(to) != function_of(from) {
                        by_target.push((to, from));
                    }
                }
            }
        }
        by_target.sort_unstable();
        by_target.dedup();
        BranchIndex { by_target, entries }
    }

    /// A function's start in `range`, the lowest.
    pub fn entry_in(&self, range: Range<u64>) -> Option<u64> {
        let i = self.entries.partition_point(|&e| e < range.start);
        self.entries.get(i).copied().filter(|&e| e < range.end)
    }

    /// A branch of one function into the middle of another whose target lies in
    /// `targets`: `(branch, target)`, the lowest target.
    pub fn targeting(&self, targets: Range<u64>) -> Option<(u64, u64)> {
        let i = self.by_target.partition_point(|&(t, _)| t < targets.start);
        self.by_target
            .get(i)
            .filter(|&&(t, _)| t < targets.end)
            .map(|&(t, from)| (from, t))
    }

    /// How many branches are kept (from one function into the middle of another).
    pub fn len(&self) -> usize {
        self.by_target.len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.by_target.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_a_branch_from_another_range_into_a_range() {
        // 0x1000: mov rax, rdi; add rax, 1; ret      (a)
        // 0x1010: mov rax, rdi; jmp 0x1003           (b: into a's second instruction)
        let mut code = [0xccu8; 0x20];
        code[..8].copy_from_slice(&[0x48, 0x89, 0xf8, 0x48, 0x83, 0xc0, 0x01, 0xc3]);
        code[0x10..0x15].copy_from_slice(&[0x48, 0x89, 0xf8, 0xeb, 0xee]);
        // 0x1008: jne 0x1003 (within a, whose range now ends at 0x100a); 0x1015: call
        // 0x1000 (a's start) in b.
        code[8..10].copy_from_slice(&[0x75, 0xf9]);
        code[0x15..0x1a].copy_from_slice(&[0xe8, 0xe6, 0xff, 0xff, 0xff]);
        let of = |a: u64| match a {
            0x1000..0x100a => Some(0x1000),
            0x1010..0x101a => Some(0x1010),
            _ => None,
        };
        let idx = BranchIndex::build(
            [(0x1000, 0x100a), (0x1010, 0x101a)],
            |s, e| code.get((s - 0x1000) as usize..(e - 0x1000) as usize),
            of,
        );
        // Only b's jump into a's middle: a's own jne and the call of a's start are not
        // kept as branches; the starts are entries.
        assert_eq!(idx.len(), 1);
        assert_eq!(idx.targeting(0x1001..0x1008), Some((0x1013, 0x1003)));
        assert_eq!(idx.targeting(0x1004..0x1008), None);
        assert_eq!(idx.targeting(0x1000..0x1003), None);
        assert_eq!(idx.entry_in(0x1001..0x1010), None);
        assert_eq!(idx.entry_in(0x1001..0x1011), Some(0x1010));
    }

    #[test]
    fn ranges_without_code_and_undecodable_bytes_end_quietly() {
        // A `call rel32` whose displacement is cut off: nothing decodes to a branch.
        let code = [0xe8u8, 0x00, 0x00];
        let idx = BranchIndex::build(
            [(0x2000, 0x2003), (0x3000, 0x3010)],
            |s, e| (s == 0x2000).then(|| &code[..(e - s) as usize]),
            |_| None,
        );
        assert!(idx.is_empty());
        assert_eq!(idx.entry_in(0x2000..0x3001), Some(0x2000));
    }
}
