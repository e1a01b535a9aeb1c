//! Raw ptrace loops the benchmarks compare a hit with, measured in the same run: the
//! one-stop floor (an `int3` over a one-byte `nop`: stop, `PTRACE_CONT`, no handler,
//! nothing else), the floor plus one request (`rip`, or all registers), and the
//! classic two-stop scheme of debuggers (put the original byte back, back up `rip`,
//! single-step, re-insert the `int3`, continue). Also the count of ptrace requests a
//! tracer made, which tests and benchmarks use to tell what a hit costs. Not part of
//! the supported API.

use std::process::{Child, Command};

use multiprobe_core::{Error, Result};

use crate::backend::{Status, INT3};
use crate::error;
use crate::mem::CodeMemory;
use crate::sys::{self, Signal, Tid, UserOffset, Wait};
use crate::tracer::Tracer;

pub use crate::sys::Requests;

/// The ptrace requests the calling thread made so far, by kind: a [`Tracer`]'s, on
/// the thread that runs it. Subtract two readings to count what happened in between.
pub fn requests() -> Requests {
    sys::requests()
}

/// A process traced by raw loops instead of the tracer.
#[derive(Debug)]
pub struct RawTarget {
    pid: Tid,
    code: CodeMemory,
    child: Option<Child>,
}

impl RawTarget {
    /// Spawn `cmd` under trace (as [`Tracer::spawn`] does), resolve `symbols` in it,
    /// and let it run.
    pub fn spawn(cmd: &mut Command, symbols: &[&str]) -> Result<(RawTarget, Vec<u64>)> {
        let mut t = Tracer::spawn(cmd)?;
        let pid = t.pid();
        let child = t.take_child();
        // From here on the raw loops own the tracee: the tracer must not detach it.
        t.shared.lock().status = Status::Detached;
        let addrs = symbols
            .iter()
            .map(|s| t.resolve(s).map_err(Error::from))
            .collect::<Result<Vec<u64>>>()?;
        drop(t);
        let pid = sys::pid(pid).ok_or(Error::ProcessGone)?;
        sys::cont(pid, None).map_err(|e| error::sys(e, "resume"))?;
        Ok((
            RawTarget {
                pid,
                code: CodeMemory::open(pid)?,
                child,
            },
            addrs,
        ))
    }

    /// The child's pipes.
    pub fn child(&mut self) -> &mut Child {
        self.child.as_mut().expect("spawned with a child")
    }

    /// Write `int3` at `addr`; returns the byte it replaced.
    pub fn insert(&self, addr: u64) -> Result<u8> {
        let mut b = [0u8];
        self.code.read(addr, &mut b)?;
        self.code.write(addr, &[INT3])?;
        Ok(b[0])
    }

    /// Put `orig` back at `addr`.
    pub fn remove(&self, addr: u64, orig: u8) -> Result<()> {
        self.code.write(addr, &[orig])
    }

    fn wait_trap(&self) -> Result<()> {
        match sys::wait(Some(self.pid), false).map_err(|e| error::sys(e, "wait"))? {
            Some(Wait::Signal(_, Signal::TRAP)) => Ok(()),
            other => Err(Error::Backend(format!("unexpected stop {other:?}"))),
        }
    }

    /// `n` stops at an `int3` that replaced a one-byte `nop`: wait, continue.
    pub fn one_stop(&self, n: u64) -> Result<()> {
        for _ in 0..n {
            self.wait_trap()?;
            sys::cont(self.pid, None).map_err(|e| error::sys(e, "cont"))?;
        }
        Ok(())
    }

    /// Like [`RawTarget::one_stop`], plus `PTRACE_GETREGS` at every stop: the least a
    /// hit costs when handlers get the registers.
    pub fn one_stop_regs(&self, n: u64) -> Result<()> {
        for _ in 0..n {
            self.wait_trap()?;
            std::hint::black_box(sys::get_regs(self.pid).map_err(|e| error::sys(e, "regs"))?);
            sys::cont(self.pid, None).map_err(|e| error::sys(e, "cont"))?;
        }
        Ok(())
    }

    /// Like [`RawTarget::one_stop`], plus `PTRACE_PEEKUSER` of `rip` at every stop: the
    /// least a hit costs when the tracer must learn where the thread stopped, as
    /// multiprobe's must (several probes, one `int3` each).
    pub fn one_stop_rip(&self, n: u64) -> Result<()> {
        for _ in 0..n {
            self.wait_trap()?;
            let rip = sys::peek_user(self.pid, UserOffset::RIP);
            std::hint::black_box(rip.map_err(|e| error::sys(e, "rip"))?);
            sys::cont(self.pid, None).map_err(|e| error::sys(e, "cont"))?;
        }
        Ok(())
    }

    /// `n` hits of the classic scheme at `addr` (original byte `orig`).
    pub fn two_stop(&self, addr: u64, orig: u8, n: u64) -> Result<()> {
        let e = |e| error::sys(e, "two-stop");
        for _ in 0..n {
            self.wait_trap()?;
            let mut r = sys::get_regs(self.pid).map_err(e)?;
            self.code.write(addr, &[orig])?;
            r.rip = addr;
            sys::set_regs(self.pid, &r).map_err(e)?;
            sys::single_step(self.pid, None).map_err(e)?;
            self.wait_trap()?;
            self.code.write(addr, &[INT3])?;
            sys::cont(self.pid, None).map_err(e)?;
        }
        Ok(())
    }
}

impl Drop for RawTarget {
    fn drop(&mut self) {
        let _ = sys::kill(self.pid, Signal::KILL);
        while let Ok(Some(w)) = sys::wait(Some(self.pid), false) {
            if w.is_end() {
                break;
            }
        }
    }
}
