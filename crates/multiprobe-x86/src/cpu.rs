//! What the CPU and the kernel let user code save: the register state a trampoline
//! must preserve, read once from CPUID and XCR0.
//!
//! The XSAVE feature mask is XCR0 (what the kernel enabled: on this project's machines
//! x87, SSE, AVX, and the three AVX-512 components), minus the AMX tile components
//! (bits 17-18): a process must ask the kernel for permission before using them, and
//! saving them for a process without it is pointless (handler code never touches tiles).

use std::sync::OnceLock;

/// XSAVE components trampolines never save (AMX tile config and data).
const NEVER_SAVED: u64 = (1 << 17) | (1 << 18);

/// The register state of this CPU, as far as a trampoline cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuState {
    /// XCR0 without the AMX tile components: the XSAVE mask trampolines use (0 without XSAVE).
    pub xsave_mask: u64,
    /// `XSAVEC` (compacted format, init optimization only) is available.
    pub xsavec: bool,
    /// Bytes of an XSAVE area for [`CpuState::xsave_mask`] in the standard format (an
    /// upper bound for the compacted one).
    pub xsave_size: u32,
    /// AVX state (`ymm`) is enabled.
    pub avx: bool,
    /// AVX-512 state (`zmm0-31`, `k0-7`) is enabled.
    pub avx512: bool,
    /// `kmovq` exists (AVX512BW); otherwise opmasks are 16 bits (`kmovw`).
    pub avx512bw: bool,
}

fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    // SAFETY: CPUID exists on every x86-64 CPU and has no side effects. (`__cpuid_count`
    // is an `unsafe fn` on older toolchains and safe on newer ones.)
    #[allow(unused_unsafe)]
    let r = unsafe { core::arch::x86_64::__cpuid_count(leaf, sub) };
    [r.eax, r.ebx, r.ecx, r.edx]
}

fn xcr0() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only called when CPUID says OSXSAVE (the kernel enabled XGETBV); reading
    // XCR0 has no side effects.
    unsafe {
        core::arch::asm!("xgetbv", in("ecx") 0, out("eax") lo, out("edx") hi,
            options(nomem, nostack, preserves_flags));
    }
    u64::from(hi) << 32 | u64::from(lo)
}

impl CpuState {
    /// This CPU (read once).
    pub fn get() -> CpuState {
        static STATE: OnceLock<CpuState> = OnceLock::new();
        *STATE.get_or_init(CpuState::detect)
    }

    fn detect() -> CpuState {
        let max = cpuid(0, 0)[0];
        let osxsave = cpuid(1, 0)[2] & (1 << 27) != 0;
        if !osxsave || max < 0xd {
            return CpuState {
                xsave_mask: 0,
                xsavec: false,
                xsave_size: 0,
                avx: false,
                avx512: false,
                avx512bw: false,
            };
        }
        let xcr0 = xcr0();
        let mask = xcr0 & !NEVER_SAVED;
        let leaf7 = if max >= 7 { cpuid(7, 0) } else { [0; 4] };
        let avx = mask & 0b110 == 0b110;
        let avx512 = avx && mask & 0xe0 == 0xe0 && leaf7[1] & (1 << 16) != 0;
        // Size of the standard-format area for the components in `mask`: the end of the
        // furthest one (components 0 and 1 live in the 512-byte legacy area, followed
        // by the 64-byte header).
        let mut size = 576u32;
        for c in 2..63u32 {
            if mask & (1 << c) != 0 {
                let [sz, off, _, _] = cpuid(0xd, c);
                size = size.max(off + sz);
            }
        }
        CpuState {
            xsave_mask: mask,
            xsavec: cpuid(0xd, 1)[0] & (1 << 1) != 0,
            xsave_size: size,
            avx,
            avx512,
            avx512bw: avx512 && leaf7[1] & (1 << 30) != 0,
        }
    }
}
