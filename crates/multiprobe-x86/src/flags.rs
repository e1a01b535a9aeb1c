//! RFLAGS arithmetic for the emulated ALU instructions and conditions.
//!
//! Exactness is the point: a probed `sub rsp, 8` followed by a `jcc` must branch as
//! the unprobed one would. The tests compare every result against the real CPU.
//! Logical operations leave AF undefined in the manuals; we clear it, which is what the
//! tested CPUs do (see the `alu_flags_match_cpu` test).

use crate::plan::AluOp;

pub(crate) const CF: u64 = 1 << 0;
pub(crate) const PF: u64 = 1 << 2;
pub(crate) const AF: u64 = 1 << 4;
pub(crate) const ZF: u64 = 1 << 6;
pub(crate) const SF: u64 = 1 << 7;
pub(crate) const OF: u64 = 1 << 11;
/// The flags the arithmetic instructions write.
pub(crate) const ARITH: u64 = CF | PF | AF | ZF | SF | OF;

/// Result (masked to `size` bytes) and the arithmetic flags of `a op b`.
pub(crate) fn alu(op: AluOp, a: u64, b: u64, size: u8) -> (u64, u64) {
    let bits = u32::from(size) * 8;
    let mask = if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    };
    let sign = 1u64 << (bits - 1);
    let (a, b) = (a & mask, b & mask);
    let (res, cf, of) = match op {
        AluOp::Add => {
            let r = a.wrapping_add(b) & mask;
            (r, r < a, (a ^ r) & (b ^ r) & sign != 0)
        }
        AluOp::Sub | AluOp::Cmp => {
            let r = a.wrapping_sub(b) & mask;
            (r, a < b, (a ^ b) & (a ^ r) & sign != 0)
        }
        AluOp::And | AluOp::Test => (a & b, false, false),
        AluOp::Or => (a | b, false, false),
        AluOp::Xor => (a ^ b, false, false),
    };
    let mut f = 0;
    if cf {
        f |= CF;
    }
    if of {
        f |= OF;
    }
    if matches!(op, AluOp::Add | AluOp::Sub | AluOp::Cmp) && (a ^ b ^ res) & 0x10 != 0 {
        f |= AF;
    }
    if res == 0 {
        f |= ZF;
    }
    if res & sign != 0 {
        f |= SF;
    }
    if (res as u8).count_ones().is_multiple_of(2) {
        f |= PF;
    }
    (res, f)
}

/// Whether condition `cc` (hardware encoding, 0..16: o, no, b, ae, e, ne, be, a, s,
/// ns, p, np, l, ge, le, g) holds for `rflags`.
pub(crate) fn condition(cc: u8, rflags: u64) -> bool {
    let f = |m| rflags & m != 0;
    let base = match cc >> 1 {
        0 => f(OF),
        1 => f(CF),
        2 => f(ZF),
        3 => f(CF) || f(ZF),
        4 => f(SF),
        5 => f(PF),
        6 => f(SF) != f(OF),
        _ => f(ZF) || f(SF) != f(OF),
    };
    // Odd codes are the negations of the even ones.
    base != (cc & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_pair_up_as_negations() {
        for cc in 0..16u8 {
            for fl in [0, CF, ZF, SF, OF, PF, SF | OF, CF | ZF, ARITH] {
                assert_ne!(
                    condition(cc, fl),
                    condition(cc ^ 1, fl),
                    "cc {cc} flags {fl:#x}"
                );
            }
        }
        assert!(condition(0x4, ZF)); // je
        assert!(condition(0xc, SF)); // jl: SF != OF
        assert!(!condition(0xc, SF | OF));
        assert!(condition(0x7, 0)); // ja: !CF && !ZF
    }

    #[test]
    fn sub_flags_for_known_values() {
        let (r, f) = alu(AluOp::Sub, 0, 1, 4);
        assert_eq!(r, 0xffff_ffff);
        assert_eq!(f, CF | SF | PF | AF);
        let (r, f) = alu(AluOp::Add, i64::MAX as u64, 1, 8);
        assert_eq!(r, 1 << 63);
        assert_eq!(f, OF | SF | PF | AF);
    }
}
