//! [`SimBackend`]: the core's [`Backend`] over a [`SimMemory`].
//!
//! `prepare` validates the address like a real backend (mapped, executable, an
//! instruction boundary, not already a breakpoint) and decodes the instruction into
//! an out-of-line [`Slot`]; `arm` writes [`BRK`] over the opcode byte; `disarm` writes
//! the original byte back. Each can be made to fail at chosen addresses (fault
//! injection). A slot is an `Arc`: a thread executing it out of line holds its own
//! reference, so a slot's contents never change or vanish while a thread is inside it
//! (the sigtrap backend's XOL rule), even after the site is freed.
//!
//! Return probes: `check_return` allows the program's function entries (its call
//! targets) only; the trampoline is [`crate::memory::RET_TRAMPOLINE`], where the CPU hands
//! a returning thread to the core ([`crate::cpu`]).
//!
//! Invariant checked here (a violation panics, i.e. the core broke its contract with
//! backends): `arm` finds the original byte, `disarm` finds `BRK`.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, OnceLock};

use multiprobe_core::backend::{Backend, Dispatcher};
use multiprobe_core::{Error, Result};

use crate::isa::{decode, Insn, BRK};
use crate::memory::{region, Region, SimMemory};

/// What a thread executes out of line: the displaced instruction and its address.
#[derive(Debug, PartialEq, Eq)]
pub struct Slot {
    /// The probed address.
    pub addr: u64,
    /// The displaced instruction.
    pub insn: Insn,
    /// The byte the breakpoint replaces.
    pub original: u8,
}

/// Per-site data: the out-of-line slot.
#[derive(Debug)]
pub struct SimSite {
    /// The slot.
    pub slot: Arc<Slot>,
    released: Arc<Mutex<Vec<u64>>>,
}

impl Drop for SimSite {
    fn drop(&mut self) {
        lock(&self.released).push(self.slot.addr);
    }
}

/// Which backend operation to make fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, arbitrary::Arbitrary)]
pub enum Injection {
    /// `prepare` fails as for an unsupported instruction.
    Prepare,
    /// `arm` fails as for a permission error.
    Arm,
    /// `disarm` fails (the breakpoint stays).
    Disarm,
}

#[derive(Debug, Default)]
struct Injected {
    set: BTreeSet<(Injection, u64)>,
}

/// Counts of what the registry asked.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendCounts {
    /// Successful `prepare`s.
    pub prepared: u64,
    /// Successful `arm`s.
    pub armed: u64,
    /// Successful `disarm`s.
    pub disarmed: u64,
    /// Site data dropped (after grace periods).
    pub released: u64,
}

#[derive(Debug)]
struct Shared {
    mem: Arc<SimMemory>,
    /// Where instructions start (the loaded program's symbol information).
    boundaries: BTreeSet<u64>,
    /// Where functions start (return probes go only there).
    functions: BTreeSet<u64>,
    dispatcher: OnceLock<Dispatcher<SimSite>>,
    injected: Mutex<Injected>,
    counts: Mutex<BackendCounts>,
    released: Arc<Mutex<Vec<u64>>>,
}

/// The simulator backend. Cheap to clone; clones share everything.
#[derive(Clone, Debug)]
pub struct SimBackend {
    shared: Arc<Shared>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl SimBackend {
    /// A backend over `mem`, which holds code whose instructions start at `boundaries`
    /// and functions at `functions`.
    pub fn new(mem: Arc<SimMemory>, boundaries: BTreeSet<u64>, functions: BTreeSet<u64>) -> Self {
        SimBackend {
            shared: Arc::new(Shared {
                mem,
                boundaries,
                functions,
                dispatcher: OnceLock::new(),
                injected: Mutex::default(),
                counts: Mutex::default(),
                released: Arc::default(),
            }),
        }
    }

    /// The memory.
    pub fn memory(&self) -> &Arc<SimMemory> {
        &self.shared.mem
    }

    /// The dispatcher the registry attached. Panics before `Registry::new`.
    pub fn dispatcher(&self) -> &Dispatcher<SimSite> {
        self.shared
            .dispatcher
            .get()
            .expect("SimBackend used before Registry::new attached it")
    }

    /// Make `what` fail at `addr` (`on`), or succeed again.
    pub fn inject(&self, what: Injection, addr: u64, on: bool) {
        let mut i = lock(&self.shared.injected);
        if on {
            i.set.insert((what, addr));
        } else {
            i.set.remove(&(what, addr));
        }
    }

    /// Remove every injected failure.
    pub fn clear_injections(&self) {
        lock(&self.shared.injected).set.clear();
    }

    fn injected(&self, what: Injection, addr: u64) -> bool {
        lock(&self.shared.injected).set.contains(&(what, addr))
    }

    /// What the registry asked so far.
    pub fn counts(&self) -> BackendCounts {
        let mut c = *lock(&self.shared.counts);
        c.released = lock(&self.shared.released).len() as u64;
        c
    }
}

impl Backend for SimBackend {
    type Site = SimSite;

    fn attach(&self, dispatcher: Dispatcher<SimSite>) {
        let _ = self.shared.dispatcher.set(dispatcher);
    }

    fn prepare(&self, addr: u64) -> Result<SimSite> {
        match region(addr) {
            Region::Unmapped => return Err(Error::Unmapped { addr }),
            Region::Data => return Err(Error::NotExecutable { addr }),
            Region::Code => {}
        }
        let boundaries = &self.shared.boundaries;
        if !boundaries.contains(&addr) {
            let context = match boundaries.range(..addr).next_back() {
                Some(start) => format!(" (after the instruction start {start:#x})"),
                None => String::new(),
            };
            return Err(Error::NotInstructionBoundary { addr, context });
        }
        let bytes = self.shared.mem.code_from(addr);
        if bytes.first() == Some(&BRK) {
            return Err(Error::AlreadyBreakpoint { addr });
        }
        if self.injected(Injection::Prepare, addr) {
            return Err(Error::UnsupportedInstruction {
                addr,
                reason: "injected by the simulator".into(),
            });
        }
        let Some(insn) = decode(&bytes) else {
            return Err(Error::UnsupportedInstruction {
                addr,
                reason: "undefined opcode".into(),
            });
        };
        lock(&self.shared.counts).prepared += 1;
        Ok(SimSite {
            slot: Arc::new(Slot {
                addr,
                insn,
                original: bytes[0],
            }),
            released: Arc::clone(&self.shared.released),
        })
    }

    fn check_return(&self, addr: u64, _site: &SimSite) -> Result<()> {
        if self.shared.functions.contains(&addr) {
            return Ok(());
        }
        let context = match self.shared.functions.range(..addr).next_back() {
            Some(f) => format!(" (inside the function at {f:#x})"),
            None => String::new(),
        };
        Err(Error::NotFunctionEntry { addr, context })
    }

    fn arm(&self, addr: u64, site: &SimSite) -> Result<()> {
        if self.injected(Injection::Arm, addr) {
            return Err(Error::PermissionDenied(format!(
                "cannot write {addr:#x} (injected by the simulator)"
            )));
        }
        let mem = &self.shared.mem;
        assert_eq!(
            mem.byte(addr),
            site.slot.original,
            "arm at {addr:#x}: the original byte is not there (armed twice?)"
        );
        mem.set_byte(addr, BRK);
        lock(&self.shared.counts).armed += 1;
        Ok(())
    }

    fn disarm(&self, addr: u64, site: &SimSite) -> Result<()> {
        if self.injected(Injection::Disarm, addr) {
            return Err(Error::Backend(format!(
                "cannot restore {addr:#x} (injected by the simulator)"
            )));
        }
        let mem = &self.shared.mem;
        assert_eq!(
            mem.byte(addr),
            BRK,
            "disarm at {addr:#x}: no breakpoint there"
        );
        mem.set_byte(addr, site.slot.original);
        lock(&self.shared.counts).disarmed += 1;
        Ok(())
    }
}
