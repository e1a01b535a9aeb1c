//! A backend for tests, examples and benchmarks: no real code, just a byte per address
//! that turns into `int3` (0xCC) while armed, failure injection, a log of what the
//! registry asked, and a [`TestBackend::hit`] that drives the dispatch protocol the way a
//! real backend does (every probed instruction is a one-byte `nop`). Return probes too:
//! [`TestBackend::call`] and [`TestBackend::ret`] drive a call and its return on a
//! [`TestStack`], with [`RET_TRAMPOLINE`] as the return trampoline.

use std::collections::{HashMap, HashSet};

use std::cell::RefCell;

use crate::backend::Backend;
use crate::dispatch::{Dispatcher, PreOutcome, ThreadState};
use crate::error::{Error, Result};
use crate::handler::{Fault, FaultAction};
use crate::memory::{Memory, MemoryError, NoMemory};
use crate::regs::Regs;
use crate::returning::RetOutcome;
use crate::sync::{Arc, Mutex, OnceLock};

/// The byte an unprobed test address holds (`nop`).
pub const ORIGINAL: u8 = 0x90;
/// The breakpoint byte.
pub const INT3: u8 = 0xCC;
/// The test backend's return trampoline: a `ret` that pops this address is a return
/// through it ([`TestBackend::ret`]).
pub const RET_TRAMPOLINE: u64 = 0x7fff_f000;

/// How a [`TestBackend::ret`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetResult {
    /// The popped return address was not the trampoline: a plain return.
    Plain,
    /// It was: the core dispatched the return.
    Trampoline(RetOutcome),
}

/// A thread's stack for [`TestBackend::call`] and [`TestBackend::ret`]: sparse 8-byte
/// words at any address, readable and writable (a [`Memory`]). Not shared between
/// threads.
#[derive(Debug, Default)]
pub struct TestStack {
    words: RefCell<HashMap<u64, u64>>,
}

impl TestStack {
    /// An empty stack (every word reads 0).
    pub fn new() -> Self {
        Self::default()
    }

    /// The word at `addr`.
    pub fn word(&self, addr: u64) -> u64 {
        *self.words.borrow().get(&addr).unwrap_or(&0)
    }

    /// Set the word at `addr`.
    pub fn set_word(&self, addr: u64, value: u64) {
        self.words.borrow_mut().insert(addr, value);
    }
}

impl Memory for TestStack {
    fn read(&self, addr: u64, buf: &mut [u8]) -> std::result::Result<(), MemoryError> {
        if buf.len() != 8 {
            return Err(MemoryError::Unmapped(addr));
        }
        buf.copy_from_slice(&self.word(addr).to_le_bytes());
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> std::result::Result<(), MemoryError> {
        let word: [u8; 8] = data
            .try_into()
            .map_err(|_| MemoryError::NotWritable(addr))?;
        self.set_word(addr, u64::from_le_bytes(word));
        Ok(())
    }
}

/// What the registry asked the backend to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// `prepare(addr)` succeeded.
    Prepare(u64),
    /// `arm(addr)` succeeded.
    Arm(u64),
    /// `disarm(addr)` succeeded.
    Disarm(u64),
    /// A site's data was dropped (after its grace period).
    Release(u64),
}

/// How a [`TestBackend::hit`] went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HitResult {
    /// No breakpoint at the address: the instruction ran without a trap.
    NoTrap,
    /// A breakpoint that is not ours trapped (a real backend would chain the signal).
    NotOurs,
    /// The breakpoint was just removed: the restored instruction re-executes.
    Reexecuted,
    /// A pre-handler redirected to `regs.rip`.
    Redirected,
    /// The instruction executed; `post` says whether post-handlers were run.
    Stepped {
        /// Whether the post path ran.
        post: bool,
    },
}

/// Per-site data of the test backend.
#[derive(Debug)]
pub struct TestSite {
    addr: u64,
    log: Arc<Mutex<Vec<Event>>>,
}

impl TestSite {
    /// The site's address.
    pub fn addr(&self) -> u64 {
        self.addr
    }
}

impl Drop for TestSite {
    fn drop(&mut self) {
        self.log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Event::Release(self.addr));
    }
}

#[derive(Debug, Default)]
struct Faults {
    prepare: HashSet<u64>,
    arm: HashSet<u64>,
    disarm: HashSet<u64>,
    /// Unmapped since armed: disarm finds its code gone.
    gone: HashSet<u64>,
}

/// The test backend.
#[derive(Debug, Default)]
pub struct TestBackend {
    dispatcher: OnceLock<Dispatcher<TestSite>>,
    code: Mutex<HashMap<u64, u8>>,
    log: Arc<Mutex<Vec<Event>>>,
    faults: Mutex<Faults>,
    in_signal_handlers: bool,
    /// Where return probes may be registered (`None`: anywhere).
    entries: Mutex<Option<HashSet<u64>>>,
}

impl TestBackend {
    /// A backend with every address holding [`ORIGINAL`].
    pub fn new() -> Self {
        Self::default()
    }

    /// The same, claiming to dispatch in signal handlers
    /// ([`Backend::dispatches_in_signal_handlers`]): the registry then treats calls from
    /// inside its handlers as a signal handler's.
    pub fn in_signal_handlers() -> Self {
        TestBackend {
            in_signal_handlers: true,
            ..Self::default()
        }
    }

    /// The byte at `addr` now: [`INT3`] while armed, [`ORIGINAL`] otherwise.
    pub fn byte(&self, addr: u64) -> u8 {
        *self.code.lock().unwrap().get(&addr).unwrap_or(&ORIGINAL)
    }

    /// Make `prepare(addr)` fail (as for an unsupported instruction).
    pub fn fail_prepare_at(&self, addr: u64) {
        self.faults.lock().unwrap().prepare.insert(addr);
    }

    /// Make `arm(addr)` fail (as for a permission error).
    pub fn fail_arm_at(&self, addr: u64) {
        self.faults.lock().unwrap().arm.insert(addr);
    }

    /// Make `disarm(addr)` fail, or succeed again.
    pub fn set_fail_disarm_at(&self, addr: u64, fail: bool) {
        let mut f = self.faults.lock().unwrap();
        if fail {
            f.disarm.insert(addr);
        } else {
            f.disarm.remove(&addr);
        }
    }

    /// The code at `addr` goes away with its breakpoint (a library unloaded): a later
    /// disarm writes nothing and reports [`Error::CodeGone`]. Mapping code there again
    /// (`remap`) puts [`ORIGINAL`] back.
    pub fn unmap(&self, addr: u64) {
        self.faults.lock().unwrap().gone.insert(addr);
    }

    /// New code at `addr` after [`TestBackend::unmap`]: [`ORIGINAL`], unarmed.
    pub fn remap(&self, addr: u64) {
        self.faults.lock().unwrap().gone.remove(&addr);
        self.code.lock().unwrap().insert(addr, ORIGINAL);
    }

    /// Only these addresses are function entries: a return probe anywhere else is
    /// refused with [`Error::NotFunctionEntry`] (by default every address is one).
    pub fn set_function_entries(&self, entries: impl IntoIterator<Item = u64>) {
        *self.entries.lock().unwrap() = Some(entries.into_iter().collect());
    }

    /// Everything the registry asked, in order.
    pub fn events(&self) -> Vec<Event> {
        self.log.lock().unwrap().clone()
    }

    fn dispatcher(&self) -> &Dispatcher<TestSite> {
        self.dispatcher
            .get()
            .expect("TestBackend used before Registry::new attached it")
    }

    /// Thread `tid` executes the instruction at `addr`: if the breakpoint is there it
    /// traps and is handled as [`TestBackend::trap`] does; otherwise the one-byte
    /// instruction just runs (`rip` moves to `addr + 1`).
    pub fn hit(&self, ts: &ThreadState, tid: u32, addr: u64, regs: &mut Regs) -> HitResult {
        if self.byte(addr) != INT3 {
            regs.rip = addr + 1;
            return HitResult::NoTrap;
        }
        self.trap(ts, tid, addr, regs)
    }

    /// Thread `tid` took a breakpoint trap at `addr` (the byte may have been restored since,
    /// which is the race a real backend must handle), handled as a real backend would:
    /// pre-handlers, the one-byte instruction (`rip` moves to `addr + 1`), post-handlers.
    pub fn trap(&self, ts: &ThreadState, tid: u32, addr: u64, regs: &mut Regs) -> HitResult {
        self.trap_in(ts, tid, addr, regs, &NoMemory)
    }

    fn trap_in(
        &self,
        ts: &ThreadState,
        tid: u32,
        addr: u64,
        regs: &mut Regs,
        mem: &dyn Memory,
    ) -> HitResult {
        regs.rip = addr;
        let d = self.dispatcher();
        let step = match d.pre(ts, addr, tid, regs, mem) {
            PreOutcome::NotOurs => {
                if self.byte(addr) == INT3 {
                    return HitResult::NotOurs;
                }
                regs.rip = addr + 1;
                return HitResult::Reexecuted;
            }
            PreOutcome::Redirect => return HitResult::Redirected,
            PreOutcome::Step(step) => step,
        };
        let post = step.defer_post();
        regs.rip = addr + 1;
        if post {
            let ran = d.post(ts, addr, tid, regs, mem);
            assert!(ran, "a deferred step must find its post");
        }
        HitResult::Stepped { post }
    }

    /// Thread `tid` calls the function at `addr` from `return_to`: the `call` pushes
    /// `return_to` on `stack` (`regs.rsp` moves down 8), then the function's first
    /// instruction executes as [`TestBackend::hit`] does — which, for a handler with a
    /// return hook, swaps the word just pushed for [`RET_TRAMPOLINE`]. Gives `ts` a return
    /// stack and the trampoline first, if it has none.
    pub fn call(
        &self,
        ts: &ThreadState,
        tid: u32,
        addr: u64,
        return_to: u64,
        regs: &mut Regs,
        stack: &TestStack,
    ) -> HitResult {
        if !ts.has_return_stack() {
            ts.reserve_returns(crate::returns::DEFAULT_WORDS);
        }
        ts.set_return_trampoline(RET_TRAMPOLINE);
        regs.rsp -= 8;
        stack.set_word(regs.rsp, return_to);
        regs.rip = addr;
        if self.byte(addr) != INT3 {
            regs.rip = addr + 1;
            return HitResult::NoTrap;
        }
        self.trap_in(ts, tid, addr, regs, stack)
    }

    /// Thread `tid` executes `ret` with `regs.rsp` on `stack`: `rip` = the word popped;
    /// if that is [`RET_TRAMPOLINE`], the thread is at the trampoline and the core
    /// dispatches the return ([`Dispatcher::ret`]), which puts `rip` at the original
    /// return address.
    pub fn ret(&self, ts: &ThreadState, tid: u32, regs: &mut Regs, stack: &TestStack) -> RetResult {
        regs.rip = stack.word(regs.rsp);
        regs.rsp += 8;
        if regs.rip != RET_TRAMPOLINE {
            return RetResult::Plain;
        }
        RetResult::Trampoline(self.dispatcher().ret(ts, tid, regs, stack))
    }

    /// Like [`TestBackend::hit`], but the displaced instruction faults with `fault`.
    /// Returns `None` if nothing was probed there, else what the fault handlers decided;
    /// on `NotHandled`, `regs.rip` is left at `addr`, as the program would see it.
    pub fn hit_faulting(
        &self,
        ts: &ThreadState,
        tid: u32,
        addr: u64,
        regs: &mut Regs,
        fault: &Fault,
    ) -> Option<FaultAction> {
        regs.rip = addr;
        let d = self.dispatcher();
        match d.pre(ts, addr, tid, regs, &NoMemory) {
            PreOutcome::Step(step) => {
                step.defer_post();
            }
            PreOutcome::NotOurs | PreOutcome::Redirect => return None,
        }
        regs.rip = addr;
        Some(d.fault(ts, addr, tid, regs, &NoMemory, fault))
    }
}

impl Backend for TestBackend {
    type Site = TestSite;

    fn attach(&self, dispatcher: Dispatcher<TestSite>) {
        let _ = self.dispatcher.set(dispatcher);
    }

    fn dispatches_in_signal_handlers(&self) -> bool {
        self.in_signal_handlers
    }

    fn prepare(&self, addr: u64) -> Result<TestSite> {
        if self.faults.lock().unwrap().prepare.contains(&addr) {
            return Err(Error::UnsupportedInstruction {
                addr,
                reason: "injected by the test".into(),
            });
        }
        self.log.lock().unwrap().push(Event::Prepare(addr));
        Ok(TestSite {
            addr,
            log: Arc::clone(&self.log),
        })
    }

    fn arm(&self, addr: u64, _site: &TestSite) -> Result<()> {
        if self.faults.lock().unwrap().arm.contains(&addr) {
            return Err(Error::PermissionDenied(format!(
                "cannot write {addr:#x} (injected by the test)"
            )));
        }
        let mut code = self.code.lock().unwrap();
        assert_ne!(code.get(&addr), Some(&INT3), "armed twice at {addr:#x}");
        code.insert(addr, INT3);
        drop(code);
        self.log.lock().unwrap().push(Event::Arm(addr));
        Ok(())
    }

    fn check_return(&self, addr: u64, _site: &TestSite) -> Result<()> {
        match &*self.entries.lock().unwrap() {
            Some(entries) if !entries.contains(&addr) => Err(Error::NotFunctionEntry {
                addr,
                context: " (not one of the test's function entries)".into(),
            }),
            _ => Ok(()),
        }
    }

    fn disarm(&self, addr: u64, _site: &TestSite) -> Result<()> {
        if self.faults.lock().unwrap().disarm.contains(&addr) {
            return Err(Error::Backend(format!(
                "cannot restore {addr:#x} (injected by the test)"
            )));
        }
        if self.faults.lock().unwrap().gone.contains(&addr) {
            return Err(Error::CodeGone { addr });
        }
        let mut code = self.code.lock().unwrap();
        assert_eq!(
            code.get(&addr),
            Some(&INT3),
            "disarm of an unarmed {addr:#x}"
        );
        code.insert(addr, ORIGINAL);
        drop(code);
        self.log.lock().unwrap().push(Event::Disarm(addr));
        Ok(())
    }
}
