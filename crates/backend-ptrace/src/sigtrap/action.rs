//! SIGTRAP's action read and written in the tracee: `rt_sigaction` executed by a
//! stopped thread (see `inject.rs`), with the kernel's `struct sigaction` in scratch
//! space below the thread's stack red zone (which a signal frame would overwrite
//! anyway; the thread runs nothing of its own meanwhile).

use multiprobe_core::{Error, Memory, Result};

use super::Disposition;
use crate::error;
use crate::inject;
use crate::sys::{self, Signal, Tid, UserRegs};
use crate::tracer::Tracer;

/// The kernel's `struct sigaction` on x86-64, as `rt_sigaction` reads and writes it
/// (with an 8-byte signal set).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Action {
    pub(crate) handler: u64,
    pub(crate) flags: u64,
    pub(crate) restorer: u64,
    pub(crate) mask: u64,
}

const LEN: u64 = 32;
pub(crate) const SIG_DFL: u64 = 0;
pub(crate) const SIG_IGN: u64 = 1;

impl Action {
    fn to_bytes(self) -> [u8; LEN as usize] {
        let mut b = [0; LEN as usize];
        for (i, v) in [self.handler, self.flags, self.restorer, self.mask]
            .into_iter()
            .enumerate()
        {
            b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
        }
        b
    }

    fn from_bytes(b: &[u8; LEN as usize]) -> Action {
        let f = |i: usize| u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        Action {
            handler: f(0),
            flags: f(1),
            restorer: f(2),
            mask: f(3),
        }
    }

    pub(crate) fn disposition(&self) -> Disposition {
        match self.handler {
            SIG_DFL => Disposition::Default,
            SIG_IGN => Disposition::Ignored,
            _ => Disposition::Caught,
        }
    }

    /// The same but for the handler.
    pub(crate) fn with_handler(self, handler: u64) -> Action {
        Action { handler, ..self }
    }
}

/// A stopped thread borrowed to run `rt_sigaction(SIGTRAP, ...)`.
pub(super) struct Caller {
    tid: Tid,
    regs: UserRegs,
    insn: u64,
    /// Where the old action is read to; the new one is written right after it.
    scratch: u64,
}

impl Tracer {
    /// Borrow the stopped thread `tid` for system calls on SIGTRAP's action.
    pub(super) fn caller(&mut self, tid: Tid) -> Result<Caller> {
        let regs = sys::get_regs(tid).map_err(|e| error::sys(e, "read registers"))?;
        let insn = {
            let st = self.shared.lock();
            let code = st.usable()?;
            self.injector.insn(self.shared.pid, code)?
        };
        Ok(Caller {
            tid,
            regs,
            insn,
            scratch: (regs.rsp - 128 - 2 * LEN) & !15,
        })
    }

    /// `rt_sigaction(SIGTRAP, new, &old)` on `by`'s thread: the action there was, and
    /// `new` in its place if given — one system call, so nothing the program does can
    /// come between the two.
    pub(super) fn sigaction(&mut self, by: &Caller, new: Option<Action>) -> Result<Action> {
        let (old_at, new_at) = (by.scratch, by.scratch + LEN);
        let mem_err = |e: multiprobe_core::MemoryError| Error::Backend(e.to_string());
        if let Some(a) = new {
            self.mem.write(new_at, &a.to_bytes()).map_err(mem_err)?;
        }
        let args = [
            Signal::TRAP.as_raw() as u64,
            new.map_or(0, |_| new_at),
            old_at,
            8,
            0,
            0,
        ];
        let pid = self.shared.pid;
        let nr = libc::SYS_rt_sigaction;
        inject::syscall(pid, by.tid, &by.regs, by.insn, nr, args, &mut self.aside)?
            .map_err(|e| error::sys(e, "read or set the action for SIGTRAP"))?;
        let mut b = [0; LEN as usize];
        self.mem.read(old_at, &mut b).map_err(mem_err)?;
        Ok(Action::from_bytes(&b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_action_goes_to_bytes_and_back_in_the_kernels_field_order() {
        let a = Action {
            handler: 0x1122,
            flags: libc::SA_SIGINFO as u64 | 0x0400_0000, // SA_RESTORER
            restorer: 0x3344,
            mask: 1 << 9,
        };
        let b = a.to_bytes();
        assert_eq!(b[0..8], 0x1122u64.to_le_bytes());
        assert_eq!(b[16..24], 0x3344u64.to_le_bytes());
        assert_eq!(Action::from_bytes(&b), a);
        assert_eq!(a.disposition(), Disposition::Caught);
        assert_eq!(a.with_handler(SIG_IGN).disposition(), Disposition::Ignored);
    }
}
