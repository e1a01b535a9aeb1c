//! The interrupted thread's registers: `ucontext_t` ↔ [`Regs`].
//!
//! The kernel saves the general-purpose registers, `rip` and `rflags` in the signal
//! frame's `uc_mcontext.gregs`, and restores them from there on `sigreturn`, so writing
//! a [`Regs`] back into the frame is how handlers change the thread. `fs_base` is read
//! from `%fs:0` (the x86-64 ABI requires the thread pointer to point to itself there);
//! `gs_base` is 0 in user space. Neither segment base is written back: changing them
//! needs a system call and no handler has a reason to.

use libc::{c_int, ucontext_t};
use multiprobe_core::Regs;

/// `gregs` indices in `Regs` field order (rax..r15, rip, rflags).
const MAP: [c_int; 18] = [
    libc::REG_RAX,
    libc::REG_RBX,
    libc::REG_RCX,
    libc::REG_RDX,
    libc::REG_RSI,
    libc::REG_RDI,
    libc::REG_RBP,
    libc::REG_RSP,
    libc::REG_R8,
    libc::REG_R9,
    libc::REG_R10,
    libc::REG_R11,
    libc::REG_R12,
    libc::REG_R13,
    libc::REG_R14,
    libc::REG_R15,
    libc::REG_RIP,
    libc::REG_EFL,
];

fn fields(r: &mut Regs) -> [&mut u64; 18] {
    [
        &mut r.rax,
        &mut r.rbx,
        &mut r.rcx,
        &mut r.rdx,
        &mut r.rsi,
        &mut r.rdi,
        &mut r.rbp,
        &mut r.rsp,
        &mut r.r8,
        &mut r.r9,
        &mut r.r10,
        &mut r.r11,
        &mut r.r12,
        &mut r.r13,
        &mut r.r14,
        &mut r.r15,
        &mut r.rip,
        &mut r.rflags,
    ]
}

/// The registers saved in `uc`.
pub(crate) fn load(uc: &ucontext_t) -> Regs {
    let mut r = from_gregs(&uc.uc_mcontext.gregs);
    r.fs_base = fs_base();
    r
}

/// The registers in a `gregs` array (the kernel's `sigcontext` order); segment bases 0.
pub(crate) fn from_gregs(g: &[i64; 23]) -> Regs {
    let mut r = Regs::default();
    for (f, &i) in fields(&mut r).into_iter().zip(MAP.iter()) {
        *f = g[i as usize] as u64;
    }
    r
}

/// Write `r` into a `gregs` array.
pub(crate) fn to_gregs(g: &mut [i64; 23], r: &Regs) {
    let mut r = *r;
    for (f, &i) in fields(&mut r).into_iter().zip(MAP.iter()) {
        g[i as usize] = *f as i64;
    }
}

/// Write `r` back into `uc`; the thread resumes with these registers.
pub(crate) fn store(uc: &mut ucontext_t, r: &Regs) {
    to_gregs(&mut uc.uc_mcontext.gregs, r);
}

/// The interrupted instruction pointer.
pub(crate) fn rip(uc: &ucontext_t) -> u64 {
    uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64
}

/// Set the instruction pointer the thread resumes at.
pub(crate) fn set_rip(uc: &mut ucontext_t, rip: u64) {
    uc.uc_mcontext.gregs[libc::REG_RIP as usize] = rip as i64;
}

/// This thread's `fs` base, without a system call.
pub(crate) fn fs_base() -> u64 {
    let v: u64;
    // SAFETY: `%fs:0` holds the thread pointer on x86-64 Linux (TLS variant II; glibc
    // and musl both set it up before any Rust code runs); reading it has no side effect.
    unsafe {
        core::arch::asm!("mov {}, qword ptr fs:[0]", out(reg) v, options(nostack, readonly, preserves_flags));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_round_trip_through_a_ucontext_in_the_kernel_layout() {
        // SAFETY: ucontext_t is plain old data; all-zero is a valid value.
        let mut uc: ucontext_t = unsafe { std::mem::zeroed() };
        for i in 0..23 {
            uc.uc_mcontext.gregs[i] = 1000 + i as i64;
        }
        let r = load(&uc);
        // Spot checks against the kernel's `struct sigcontext` order (r8 first, rdi at 8).
        assert_eq!(r.r8, 1000);
        assert_eq!(r.rdi, 1008);
        assert_eq!(r.rsp, 1015);
        assert_eq!(r.rip, 1016);
        assert_eq!(r.rflags, 1017);
        assert_eq!(rip(&uc), 1016);
        assert_ne!(r.fs_base, 0);
        let mut r2 = r;
        r2.rax = 7;
        r2.rip = 9;
        store(&mut uc, &r2);
        assert_eq!(uc.uc_mcontext.gregs[libc::REG_RAX as usize], 7);
        assert_eq!(rip(&uc), 9);
        set_rip(&mut uc, 11);
        let r3 = load(&uc);
        assert_eq!(r3, Regs { rip: 11, ..r2 });
        // The segment/error slots the kernel also keeps there are left alone.
        assert_eq!(uc.uc_mcontext.gregs[libc::REG_CSGSFS as usize], 1018);
    }
}
