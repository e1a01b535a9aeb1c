//! The x86-64 general-purpose register file a handler sees and may change.
//!
//! Backends give dispatch a [`RegisterFile`]: where the thread's registers come from (a
//! signal's `ucontext`, `PTRACE_GETREGS`, a simulated CPU). It may fetch them only when a
//! handler first asks ([`crate::Hit::regs`]), so a hit whose handlers never look costs no
//! fetch; a plain [`Regs`], filled before dispatch, is the trivial case. The backend writes
//! back what changed. During a pre-handler `rip` equals the probed address; a handler that
//! moves it redirects the thread (contract rule 2).

/// General-purpose registers, instruction pointer, flags and the segment bases.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C)]
#[allow(missing_docs)]
pub struct Regs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub rsp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub fs_base: u64,
    pub gs_base: u64,
}

/// Where the registers of a hit come from, as dispatch sees them: fetched from the
/// thread on first use, or already at hand.
///
/// [`crate::backend::Dispatcher::pre`], [`post`](crate::backend::Dispatcher::post) and
/// [`fault`](crate::backend::Dispatcher::fault) take a `&mut impl RegisterFile`, and every
/// [`crate::Hit`] method that needs registers goes through it. A backend for which
/// fetching costs something (ptrace: a system call) implements it lazily and, after
/// dispatch, writes back only if [`RegisterFile::fetched`] is `Some` (and only what
/// changed); a backend that has them anyway passes `&mut regs`, a plain [`Regs`].
///
/// The contract:
/// * [`regs`](RegisterFile::regs) and [`regs_mut`](RegisterFile::regs_mut) fetch on
///   first use and then return the same registers every time; what is changed through
///   `regs_mut` is what later calls see and what the backend writes back.
/// * [`fetched`](RegisterFile::fetched) never fetches. `None` means nobody asked, so
///   nothing (not `rip` either) can have changed: dispatch relies on that to tell
///   that a pre-handler did not move `rip` without forcing a fetch.
/// * All three run on the hot path, inside a signal handler for in-process backends:
///   they must not allocate or lock. They cannot fail; a backend that cannot fetch
///   (the thread was killed meanwhile) returns some value and says in its docs what.
///
/// A lazy file, in the shape the ptrace backend uses (`fetch` stands for the system
/// call):
///
/// ```
/// use std::cell::OnceCell;
/// use multiprobe_core::backend::RegisterFile;
/// use multiprobe_core::Regs;
///
/// struct Lazy<F: Fn() -> Regs> {
///     fetch: F,
///     regs: OnceCell<Regs>,
/// }
///
/// impl<F: Fn() -> Regs> RegisterFile for Lazy<F> {
///     fn regs(&self) -> &Regs {
///         self.regs.get_or_init(&self.fetch)
///     }
///     fn regs_mut(&mut self) -> &mut Regs {
///         self.regs();
///         self.regs.get_mut().expect("just fetched")
///     }
///     fn fetched(&self) -> Option<&Regs> {
///         self.regs.get()
///     }
/// }
///
/// let mut file = Lazy { fetch: || Regs { rdi: 7, ..Regs::default() }, regs: OnceCell::new() };
/// assert!(file.fetched().is_none());
/// file.regs_mut().rdi += 1;
/// assert_eq!(file.fetched().map(|r| r.rdi), Some(8)); // write this back
/// ```
pub trait RegisterFile {
    /// The registers, fetched on first use.
    fn regs(&self) -> &Regs;
    /// The registers for changing, fetched on first use. The backend writes changes
    /// back to the thread after dispatch.
    fn regs_mut(&mut self) -> &mut Regs;
    /// The registers if something fetched them already; `None` (and no fetch) if not.
    fn fetched(&self) -> Option<&Regs>;
}

/// Registers that are already at hand: nothing to fetch.
impl RegisterFile for Regs {
    #[inline]
    fn regs(&self) -> &Regs {
        self
    }
    #[inline]
    fn regs_mut(&mut self) -> &mut Regs {
        self
    }
    #[inline]
    fn fetched(&self) -> Option<&Regs> {
        Some(self)
    }
}

/// A general-purpose register by its hardware number (the order of the ModRM/REX encoding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum Gpr {
    Rax = 0,
    Rcx = 1,
    Rdx = 2,
    Rbx = 3,
    Rsp = 4,
    Rbp = 5,
    Rsi = 6,
    Rdi = 7,
    R8 = 8,
    R9 = 9,
    R10 = 10,
    R11 = 11,
    R12 = 12,
    R13 = 13,
    R14 = 14,
    R15 = 15,
}

impl Gpr {
    /// All sixteen, in hardware order.
    pub const ALL: [Gpr; 16] = [
        Gpr::Rax,
        Gpr::Rcx,
        Gpr::Rdx,
        Gpr::Rbx,
        Gpr::Rsp,
        Gpr::Rbp,
        Gpr::Rsi,
        Gpr::Rdi,
        Gpr::R8,
        Gpr::R9,
        Gpr::R10,
        Gpr::R11,
        Gpr::R12,
        Gpr::R13,
        Gpr::R14,
        Gpr::R15,
    ];

    /// The register with hardware number `n` (0..16).
    pub fn from_number(n: u8) -> Option<Gpr> {
        Self::ALL.get(usize::from(n)).copied()
    }

    /// Lower-case assembler name (`"rax"`).
    pub fn name(self) -> &'static str {
        [
            "rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11",
            "r12", "r13", "r14", "r15",
        ][self as usize]
    }
}

/// Integer argument registers of the System V AMD64 calling convention, in order.
pub const SYSV_ARGS: [Gpr; 6] = [Gpr::Rdi, Gpr::Rsi, Gpr::Rdx, Gpr::Rcx, Gpr::R8, Gpr::R9];

/// The `EFLAGS.TF` (trap, single-step) bit.
pub const RFLAGS_TF: u64 = 1 << 8;

impl Regs {
    /// Read a general-purpose register.
    #[inline]
    pub fn gpr(&self, r: Gpr) -> u64 {
        match r {
            Gpr::Rax => self.rax,
            Gpr::Rcx => self.rcx,
            Gpr::Rdx => self.rdx,
            Gpr::Rbx => self.rbx,
            Gpr::Rsp => self.rsp,
            Gpr::Rbp => self.rbp,
            Gpr::Rsi => self.rsi,
            Gpr::Rdi => self.rdi,
            Gpr::R8 => self.r8,
            Gpr::R9 => self.r9,
            Gpr::R10 => self.r10,
            Gpr::R11 => self.r11,
            Gpr::R12 => self.r12,
            Gpr::R13 => self.r13,
            Gpr::R14 => self.r14,
            Gpr::R15 => self.r15,
        }
    }

    /// Mutable access to a general-purpose register.
    #[inline]
    pub fn gpr_mut(&mut self, r: Gpr) -> &mut u64 {
        match r {
            Gpr::Rax => &mut self.rax,
            Gpr::Rcx => &mut self.rcx,
            Gpr::Rdx => &mut self.rdx,
            Gpr::Rbx => &mut self.rbx,
            Gpr::Rsp => &mut self.rsp,
            Gpr::Rbp => &mut self.rbp,
            Gpr::Rsi => &mut self.rsi,
            Gpr::Rdi => &mut self.rdi,
            Gpr::R8 => &mut self.r8,
            Gpr::R9 => &mut self.r9,
            Gpr::R10 => &mut self.r10,
            Gpr::R11 => &mut self.r11,
            Gpr::R12 => &mut self.r12,
            Gpr::R13 => &mut self.r13,
            Gpr::R14 => &mut self.r14,
            Gpr::R15 => &mut self.r15,
        }
    }

    /// The `n`-th integer argument (0-based) of a function entered under the System V
    /// AMD64 convention: the first six come from registers, the rest from the stack.
    /// Stack arguments need memory, so this returns `None` for `n >= 6`; see
    /// [`crate::Hit::arg`] for the full version.
    pub fn arg(&self, n: usize) -> Option<u64> {
        SYSV_ARGS.get(n).map(|&r| self.gpr(r))
    }

    /// Set the `n`-th register argument (`n < 6`); returns false for stack arguments.
    pub fn set_arg(&mut self, n: usize, value: u64) -> bool {
        match SYSV_ARGS.get(n) {
            Some(&r) => {
                *self.gpr_mut(r) = value;
                true
            }
            None => false,
        }
    }

    /// The integer return value (`rax`).
    pub fn ret(&self) -> u64 {
        self.rax
    }

    /// Set the integer return value (`rax`).
    pub fn set_ret(&mut self, value: u64) {
        self.rax = value;
    }

    /// Instruction pointer.
    pub fn ip(&self) -> u64 {
        self.rip
    }

    /// Stack pointer.
    pub fn sp(&self) -> u64 {
        self.rsp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpr_numbering_round_trips_and_args_follow_sysv() {
        let mut r = Regs::default();
        for (i, g) in Gpr::ALL.iter().enumerate() {
            assert_eq!(Gpr::from_number(i as u8), Some(*g));
            *r.gpr_mut(*g) = 100 + i as u64;
        }
        assert_eq!(Gpr::from_number(16), None);
        assert_eq!(r.rdi, 107);
        assert_eq!(r.arg(0), Some(r.rdi));
        assert_eq!(r.arg(3), Some(r.rcx));
        assert_eq!(r.arg(5), Some(r.r9));
        assert_eq!(r.arg(6), None);
        assert!(r.set_arg(1, 7));
        assert_eq!(r.rsi, 7);
        assert!(!r.set_arg(6, 7));
        r.set_ret(9);
        assert_eq!(r.ret(), 9);
        assert_eq!(Gpr::R12.name(), "r12");
    }
}
