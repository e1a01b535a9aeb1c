//! A stopped thread's registers as handlers get them ([`ThreadRegs`]: fetched with
//! `PTRACE_GETREGS` only when a handler or the emulation asks), and converting between
//! the kernel's `user_regs_struct` and the core's [`Regs`].
//!
//! The kernel's struct has more than handlers see (`orig_rax`, the segment selectors);
//! writing back always starts from the struct that was read, so those stay exactly as
//! the kernel reported them.

use std::cell::{Cell, OnceCell};

use multiprobe_core::backend::RegisterFile;
use multiprobe_core::Regs;

use crate::sys::{self, SysResult, Tid, UserOffset, UserRegs};

/// The registers of a thread stopped at a trap, fetched on first use.
///
/// Until something asks for them, the tracer knows only `rip` (one `PTRACE_PEEKUSER`
/// told it where the thread stopped), and tracks where the thread is to resume: then
/// writing back is at most one `PTRACE_POKEUSER` of `rip`. Once fetched
/// (`PTRACE_GETREGS`), writing back sets exactly the fields that differ from what was
/// read.
///
/// The tracer may also have read them already, when it expected a handler to ask (see
/// `Thread::wants_regs`); then asking costs nothing more. Either way
/// [`RegisterFile::fetched`] says whether anyone asked — which is what the tracer
/// learns from for the thread's next hit.
///
/// If the fetch fails, the thread was killed while stopped (`ESRCH`: it never runs
/// again): handlers then see zeros in every register but `rip`, and nothing is
/// written back.
#[derive(Debug)]
pub(crate) struct ThreadRegs {
    tid: Tid,
    /// `rip` as the kernel has it now.
    kernel_rip: u64,
    /// `rip` as handlers see it and the thread resumes, while nobody asked.
    rip: u64,
    /// The registers as the kernel has them, if read already (asked or not).
    read: Cell<Option<UserRegs>>,
    /// What handlers see, once one asked.
    full: OnceCell<Fetched>,
}

#[derive(Debug)]
struct Fetched {
    /// As read; `None` if the fetch failed.
    read: Option<UserRegs>,
    /// What handlers see and change.
    view: Regs,
}

impl ThreadRegs {
    /// Thread `tid`, stopped with `rip == kernel_rip`; handlers are to see `rip`.
    /// `read`: its registers, if the tracer read them already.
    pub(crate) fn new(tid: Tid, kernel_rip: u64, rip: u64, read: Option<UserRegs>) -> ThreadRegs {
        ThreadRegs {
            tid,
            kernel_rip,
            rip,
            read: Cell::new(read),
            full: OnceCell::new(),
        }
    }

    fn fetch(&self) -> &Fetched {
        self.full.get_or_init(|| match self.kernel() {
            Some(read) => {
                let mut view = to_core(&read);
                view.rip = self.rip;
                Fetched {
                    read: Some(read),
                    view,
                }
            }
            None => Fetched {
                read: None,
                view: Regs {
                    rip: self.rip,
                    ..Regs::default()
                },
            },
        })
    }

    /// The registers as the kernel has them, read if not yet (for an injected system
    /// call or a single-step), without counting as asked; `None` if the thread is gone.
    pub(crate) fn kernel(&self) -> Option<UserRegs> {
        if let Some(f) = self.full.get() {
            return f.read;
        }
        if self.read.get().is_none() {
            self.read.set(sys::get_regs(self.tid).ok());
        }
        self.read.get()
    }

    /// Resume the thread at `rip`, without fetching the other registers.
    pub(crate) fn set_rip(&mut self, rip: u64) {
        match self.full.get_mut() {
            Some(f) => f.view.rip = rip,
            None => self.rip = rip,
        }
    }

    /// Write back what changed: nothing, `rip` alone, or the changed fields.
    pub(crate) fn write_back(&self) -> SysResult<()> {
        match self.full.get() {
            None if self.rip == self.kernel_rip => Ok(()),
            None => sys::poke_user(self.tid, UserOffset::RIP, self.rip),
            Some(Fetched { read: None, .. }) => Ok(()),
            Some(Fetched {
                read: Some(read),
                view,
            }) => write_back(self.tid, read, view),
        }
    }
}

impl RegisterFile for ThreadRegs {
    fn regs(&self) -> &Regs {
        &self.fetch().view
    }

    fn regs_mut(&mut self) -> &mut Regs {
        self.fetch();
        &mut self.full.get_mut().expect("just fetched").view
    }

    fn fetched(&self) -> Option<&Regs> {
        self.full.get().map(|f| &f.view)
    }
}

/// Write `regs` over a thread whose registers were `read`: only the fields that
/// differ, with `PTRACE_POKEUSER` when at most two do, else one `PTRACE_SETREGS`.
pub(crate) fn write_back(tid: Tid, read: &UserRegs, regs: &Regs) -> SysResult<()> {
    let new = from_core(read, regs);
    match changes(read, &new) {
        Some(fields) => fields
            .iter()
            .try_for_each(|(field, value)| sys::poke_user(tid, UserOffset::field(field), value)),
        None => sys::set_regs(tid, &new),
    }
}

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

/// How to write `new` over a thread whose registers are `old`: the `(field index,
/// value)` of each changed field, or `None` when more than two changed (one `PTRACE_SETREGS`
/// is then cheaper than three `PTRACE_POKEUSER`s).
pub(crate) fn changes(old: &UserRegs, new: &UserRegs) -> Option<Changes> {
    let (a, b) = (fields(old), fields(new));
    let mut out = Changes::default();
    for (i, (x, y)) in a.iter().zip(b.iter()).enumerate() {
        if x != y {
            if out.len == out.items.len() {
                return None;
            }
            out.items[out.len] = (i, *y);
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
    fn changes_name_the_kernel_fields_that_changed() {
        let mut a = zero();
        a.rip = 1;
        a.rsp = 2;
        let mut b = a;
        let list = |c: Option<Changes>| c.map(|c| c.iter().collect::<Vec<_>>());
        assert_eq!(list(changes(&a, &b)), Some(vec![]));
        b.rip = 5;
        assert_eq!(list(changes(&a, &b)), Some(vec![(16, 5)]));
        b.rsp = 7;
        assert_eq!(list(changes(&a, &b)), Some(vec![(16, 5), (19, 7)]));
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
