//! Converting between the kernel's `user_regs_struct` and the core's [`Regs`].
//!
//! The kernel's struct has more than handlers see (`orig_rax`, the segment selectors);
//! writing back always starts from the struct that was read, so those stay exactly as
//! the kernel reported them.

use multiprobe_core::Regs;

use crate::sys::UserRegs;

/// What a handler sees of `r`.
pub(crate) fn to_core(r: &UserRegs) -> Regs {
    Regs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rbp: r.rbp,
        rsp: r.rsp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.eflags,
        fs_base: r.fs_base,
        gs_base: r.gs_base,
    }
}

/// `base` with the fields a handler may change replaced by `c`'s.
pub(crate) fn from_core(base: &UserRegs, c: &Regs) -> UserRegs {
    let mut r = *base;
    r.rax = c.rax;
    r.rbx = c.rbx;
    r.rcx = c.rcx;
    r.rdx = c.rdx;
    r.rsi = c.rsi;
    r.rdi = c.rdi;
    r.rbp = c.rbp;
    r.rsp = c.rsp;
    r.r8 = c.r8;
    r.r9 = c.r9;
    r.r10 = c.r10;
    r.r11 = c.r11;
    r.r12 = c.r12;
    r.r13 = c.r13;
    r.r14 = c.r14;
    r.r15 = c.r15;
    r.rip = c.rip;
    r.eflags = c.rflags;
    r.fs_base = c.fs_base;
    r.gs_base = c.gs_base;
    r
}

/// The fields of a `user_regs_struct`, in memory order (their index times 8 is the
/// offset `PTRACE_POKEUSER` takes).
fn fields(r: &UserRegs) -> [u64; 27] {
    [
        r.r15, r.r14, r.r13, r.r12, r.rbp, r.rbx, r.r11, r.r10, r.r9, r.r8, r.rax, r.rcx, r.rdx,
        r.rsi, r.rdi, r.orig_rax, r.rip, r.cs, r.eflags, r.rsp, r.ss, r.fs_base, r.gs_base, r.ds,
        r.es, r.fs, r.gs,
    ]
}

/// How to write `new` over a thread whose registers are `old`: the `(offset, value)`
/// of each changed field, or `None` when more than two changed (one `PTRACE_SETREGS`
/// is then cheaper than three `PTRACE_POKEUSER`s).
pub(crate) fn changes(old: &UserRegs, new: &UserRegs) -> Option<Changes> {
    let (a, b) = (fields(old), fields(new));
    let mut out = Changes::default();
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        if x != y {
            if out.len == out.items.len() {
                return None;
            }
            out.items[out.len] = (i * 8, *y);
            out.len += 1;
        }
    }
    Some(out)
}

/// Up to two changed register fields, without allocating (this is the hot path).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Changes {
    items: [(usize, u64); 2],
    len: usize,
}

impl Changes {
    pub(crate) fn iter(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.items[..self.len].iter().copied()
    }
}

const ERESTARTSYS: i64 = 512;
const ERESTARTNOINTR: i64 = 513;
const ERESTARTNOHAND: i64 = 514;
const ERESTART_RESTARTBLOCK: i64 = 516;

/// Whether a thread stopped with `r` is inside an interrupted system call that the
/// kernel means to restart when the thread resumes (`rax` holds an internal
/// `-ERESTART*` code).
pub(crate) fn in_restartable_syscall(r: &UserRegs) -> bool {
    (r.orig_rax as i64) >= 0
        && matches!(
            -(r.rax as i64),
            ERESTARTSYS | ERESTARTNOINTR | ERESTARTNOHAND | ERESTART_RESTARTBLOCK
        )
}

/// Registers saved at a stop inside an interrupted system call, prepared to be written
/// back after the tracer ran a system call of its own on that thread.
///
/// The kernel applies its restart rule (back up over `syscall`, reload the number) on
/// the way out of the stop, using whatever registers the tracer left; an injected
/// system call uses up that moment. So the rule is applied here, as the kernel would
/// have with no signal to deliver.
pub(crate) fn restart_applied(r: &UserRegs) -> UserRegs {
    let mut out = *r;
    if in_restartable_syscall(r) {
        out.rax = if -(r.rax as i64) == ERESTART_RESTARTBLOCK {
            libc::SYS_restart_syscall as u64
        } else {
            r.orig_rax
        };
        out.rip = r.rip.wrapping_sub(2);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zero() -> UserRegs {
        // SAFETY: user_regs_struct is plain integers; all-zero is valid.
        unsafe { std::mem::zeroed() }
    }

    #[test]
    fn round_trip_keeps_kernel_only_fields() {
        let mut k = zero();
        k.orig_rax = 99;
        k.cs = 0x33;
        k.rdi = 5;
        k.rip = 0x1000;
        let mut c = to_core(&k);
        assert_eq!((c.rdi, c.rip), (5, 0x1000));
        c.rdi = 6;
        c.rflags = 0x246;
        let back = from_core(&k, &c);
        assert_eq!(
            (back.orig_rax, back.cs, back.rdi, back.eflags),
            (99, 0x33, 6, 0x246)
        );
    }

    #[test]
    fn changes_name_the_kernel_offsets_of_changed_fields() {
        let mut a = zero();
        a.rip = 1;
        a.rsp = 2;
        let mut b = a;
        let list = |c: Option<Changes>| c.map(|c| c.iter().collect::<Vec<_>>());
        assert_eq!(list(changes(&a, &b)), Some(vec![]));
        b.rip = 5;
        assert_eq!(list(changes(&a, &b)), Some(vec![(16 * 8, 5)]));
        b.rsp = 7;
        assert_eq!(list(changes(&a, &b)), Some(vec![(16 * 8, 5), (19 * 8, 7)]));
        b.rax = 1;
        assert_eq!(changes(&a, &b), None);
        assert_eq!(std::mem::size_of::<UserRegs>(), 27 * 8);
    }

    #[test]
    fn restart_rule_backs_up_over_syscall() {
        let mut r = zero();
        r.orig_rax = 35; // nanosleep
        r.rax = (-ERESTART_RESTARTBLOCK) as u64;
        r.rip = 0x2002;
        let f = restart_applied(&r);
        assert_eq!((f.rax, f.rip), (libc::SYS_restart_syscall as u64, 0x2000));
        r.rax = (-ERESTARTSYS) as u64;
        let f = restart_applied(&r);
        assert_eq!((f.rax, f.rip), (35, 0x2000));
        r.rax = 0; // completed: nothing to redo
        assert_eq!(restart_applied(&r).rip, 0x2002);
        r.orig_rax = u64::MAX; // not in a system call
        r.rax = (-ERESTARTSYS) as u64;
        assert_eq!(restart_applied(&r).rip, 0x2002);
    }
}
