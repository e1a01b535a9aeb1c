//! One simulated thread, advanced one *micro-step* at a time, driving the core's
//! dispatch protocol exactly as a trap-based backend does.
//!
//! ```text
//!            byte at rip != BRK: execute it ─────────────────────────────┐ (retires)
//!  Fetch ──┤                                                             │
//!            byte at rip == BRK: RaiseTrap ──> Trapped ── Dispatcher::pre ┤
//!     NotOurs, byte restored or re-armed: back to Fetch (re-execute)      │
//!     NotOurs, byte still BRK, no probe there: deliver SIGTRAP    (retires)
//!     Redirect: resume at regs.rip                                (retires)
//!     Step: Step::defer_post, copy the slot ──> InSlot ── execute out of line
//!     (then, on CPU 0, still in the same micro-step, the removals handlers asked for
//!     are collected)
//!        faults: Dispatcher::fault; NotHandled → deliver the fault (retires)
//!        ok, post wanted ──> PostTrap ── Dispatcher::post ──> Fetch
//!        ok, no post ──> Fetch                                    (retires)
//!  Fetch at RET_TRAMPOLINE (a `ret` popped the swapped return address):
//!        Dispatcher::ret: rip = the original return address ──> Fetch
//! ```
//!
//! Return probes: each CPU's `ThreadState` has a return stack of [`RETURN_WORDS`] words
//! (small on purpose: a deep enough call chain fills it, and its returns are lost) and
//! [`RET_TRAMPOLINE`] as its trampoline. The return dispatch is a micro-step of its own
//! that does not retire (the `ret` before it did); afterwards the CPU puts the original
//! return address back into the slot the `ret` popped, below the stack pointer, so a
//! probed run's stack ends as an unprobed one's. A thread that ends (halts or faults)
//! with calls in flight gives them up ([`multiprobe_core::backend::Dispatcher::abandon_returns`]).
//!
//! Every arrow is a separate micro-step, so a scheduler (and registry operations)
//! can come between the trap and its dispatch, between `pre` and the out-of-line
//! execution, and between that and `post`: a deferred step stays pending in the
//! thread's [`ThreadState`] across any number of switches.
//!
//! A micro-step *retires* when it has a program-visible effect (an instruction's
//! effect, a redirect, a delivered fault). The retirement order of a probed run is
//! what the unprobed run replays for the transparency oracle.
//!
//! Invariant: the `ThreadState` has a pending step exactly while the thread is in
//! `InSlot { post: true }` or `PostTrap`.

use std::rc::Rc;
use std::sync::Arc;

use multiprobe_core::backend::{return_frame_words, PreOutcome, RetOutcome, ThreadState};
use multiprobe_core::{Fault, FaultAction, Registry, Regs};

use crate::backend::{SimBackend, Slot};
use crate::ctx::{Ctx, CtxGuard};
use crate::isa::{
    decode, execute, illegal, Bus, Effect, Insn, BRK, SEGV_ACCERR, SEGV_MAPERR, SIGSEGV,
};
use crate::isa::{SIGTRAP, TRAP_BRKPT};
use crate::memory::{region, Region, SimMemory, RET_TRAMPOLINE};

/// Words of each CPU's return stack: two frames of two return handlers and one of one
/// (`multiprobe_core::backend::return_frame_words`).
pub const RETURN_WORDS: usize = 2 * return_frame_words(2) + return_frame_words(1);

/// Whether a thread still runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    /// Running.
    Running,
    /// Executed `halt`.
    Halted,
    /// Killed by a fault delivered as a signal, at instruction `rip`.
    Faulted {
        /// The fault.
        fault: Fault,
        /// Address of the faulting instruction.
        rip: u64,
    },
}

/// Where a thread is in the probe protocol.
#[derive(Clone, Debug)]
enum Phase {
    Fetch,
    Trapped { addr: u64 },
    InSlot { slot: Arc<Slot>, post: bool },
    PostTrap { addr: u64 },
}

/// What [`Dispatcher::pre`](multiprobe_core::backend::Dispatcher::pre) decided, as the thread saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dispatched {
    /// No probe; `reexecute`: the byte was restored, so the original runs again;
    /// otherwise the trap is not ours and `SIGTRAP` was delivered.
    NotOurs {
        /// Whether the restored instruction re-executes.
        reexecute: bool,
    },
    /// A pre-handler redirected.
    Redirect,
    /// The instruction will execute out of line; `post`: post-handlers wanted.
    Step {
        /// Post wanted.
        post: bool,
    },
}

/// What one micro-step did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// Executed the instruction at `addr` in place (or it faulted: delivered).
    Exec {
        /// Its address.
        addr: u64,
        /// What happened.
        result: Result<Effect, Fault>,
    },
    /// Fetched a breakpoint at `addr`.
    RaiseTrap {
        /// The address.
        addr: u64,
    },
    /// Ran `Dispatcher::pre` for the trap at `addr`.
    Dispatch {
        /// The address.
        addr: u64,
        /// The thread's stack pointer then (where a call's return address is).
        sp: u64,
        /// The outcome.
        outcome: Dispatched,
    },
    /// Arrived at the return trampoline and ran `Dispatcher::ret`.
    Return {
        /// The stack pointer after the `ret` that popped the trampoline address.
        rsp: u64,
        /// What the core said; `Returned`: `rip` is the original return address.
        outcome: RetOutcome,
    },
    /// Executed the displaced instruction of `addr` out of line.
    SlotExec {
        /// The probed address.
        addr: u64,
        /// What happened; a fault comes with what the fault handlers decided.
        result: Result<Effect, (Fault, FaultAction)>,
    },
    /// Trapped back after the slot and ran `Dispatcher::post`.
    PostTrap {
        /// The probed address.
        addr: u64,
        /// Whether `post` found the deferred step (it must).
        ran: bool,
    },
}

impl Event {
    /// Whether this micro-step had a program-visible effect.
    pub fn retires(&self) -> bool {
        match self {
            Event::Exec { .. } | Event::SlotExec { .. } => true,
            Event::Dispatch { outcome, .. } => matches!(
                outcome,
                Dispatched::Redirect | Dispatched::NotOurs { reexecute: false }
            ),
            Event::RaiseTrap { .. } | Event::PostTrap { .. } => false,
            // The `ret` retired; the hop through the trampoline is not the program's
            // (a return nobody recorded is delivered as a fault: that is).
            Event::Return { outcome, .. } => *outcome == RetOutcome::Unknown,
        }
    }
}

/// What a CPU needs from its machine to take a micro-step.
#[derive(Clone, Copy, Debug)]
pub struct Env<'a> {
    /// The backend (memory and dispatcher).
    pub backend: &'a SimBackend,
    /// A registry handle handlers may use from inside ([`crate::ctx::unregister`]).
    pub registry: Option<&'a Registry<SimBackend>>,
}

/// One simulated thread. Not `Send`: its [`ThreadState`] belongs to the OS thread that
/// created it.
#[derive(Debug)]
pub struct Cpu {
    tid: u32,
    regs: Regs,
    status: Status,
    phase: Phase,
    ts: Rc<ThreadState>,
}

impl Cpu {
    /// Thread `tid` starting with `regs`.
    pub fn new(tid: u32, regs: Regs) -> Self {
        let ts = ThreadState::new();
        ts.reserve_returns(RETURN_WORDS);
        ts.set_return_trampoline(RET_TRAMPOLINE);
        Cpu {
            tid,
            regs,
            status: Status::Running,
            phase: Phase::Fetch,
            ts: Rc::new(ts),
        }
    }

    /// Calls in flight whose returns are awaited.
    pub fn returns_in_flight(&self) -> usize {
        self.ts.returns_in_flight()
    }

    /// Its number.
    pub fn tid(&self) -> u32 {
        self.tid
    }
    /// Its registers.
    pub fn regs(&self) -> &Regs {
        &self.regs
    }
    /// Whether it runs.
    pub fn status(&self) -> Status {
        self.status
    }
    /// Whether it has a deferred step (a post pending) in its `ThreadState`.
    pub fn pending(&self) -> bool {
        self.ts.pending() > 0
    }
    /// Whether it is anywhere but at an instruction boundary of its own code (trapped,
    /// in a slot, owing a post, or at the return trampoline).
    pub fn mid_probe(&self) -> bool {
        !matches!(self.phase, Phase::Fetch)
            || (self.regs.rip == RET_TRAMPOLINE && self.status == Status::Running)
    }

    fn deliver(&mut self, fault: Fault, rip: u64) {
        self.regs.rip = rip;
        self.status = Status::Faulted { fault, rip };
        self.phase = Phase::Fetch;
    }

    fn ctx(&self, env: &Env<'_>) -> CtxGuard {
        CtxGuard::set(Ctx {
            dispatcher: env.backend.dispatcher().clone(),
            ts: Rc::clone(&self.ts),
            tid: self.tid,
            mem: Arc::clone(env.backend.memory()),
            registry: env.registry.cloned(),
        })
    }

    /// Take one micro-step. `None` if the thread no longer runs.
    pub fn step(&mut self, env: &Env<'_>) -> Option<Event> {
        if self.status != Status::Running {
            return None;
        }
        let mem: &Arc<SimMemory> = env.backend.memory();
        let event = match self.phase.clone() {
            Phase::Fetch if self.regs.rip == RET_TRAMPOLINE => self.returned(env),
            Phase::Fetch => self.fetch(mem),
            Phase::Trapped { addr } => self.dispatch(env, addr),
            Phase::InSlot { slot, post } => self.slot_exec(env, &slot, post),
            Phase::PostTrap { addr } => {
                let _ctx = self.ctx(env);
                let d = env.backend.dispatcher();
                let mut regs = self.regs;
                let ran = d.post(&self.ts, addr, self.tid, &mut regs, &**mem);
                self.regs = regs;
                self.phase = Phase::Fetch;
                Event::PostTrap { addr, ran }
            }
        };
        if self.status != Status::Running && self.ts.returns_in_flight() > 0 {
            // The thread is gone: its calls in flight never return.
            env.backend.dispatcher().abandon_returns(&self.ts);
        }
        Some(event)
    }

    /// At the trampoline: the core finds the call and its original return address.
    fn returned(&mut self, env: &Env<'_>) -> Event {
        let _ctx = self.ctx(env);
        let mem = env.backend.memory();
        let d = env.backend.dispatcher();
        let mut regs = self.regs;
        let rsp = regs.rsp;
        let outcome = d.ret(&self.ts, self.tid, &mut regs, &**mem);
        self.regs = regs;
        match outcome {
            RetOutcome::Returned => {
                // The popped slot as an unprobed run leaves it.
                let _ = mem.store(rsp.wrapping_sub(8), regs.rip);
            }
            RetOutcome::NotOurs | RetOutcome::Unknown => {
                let fault = Fault {
                    signal: SIGSEGV,
                    code: SEGV_MAPERR,
                    addr: RET_TRAMPOLINE,
                };
                self.deliver(fault, RET_TRAMPOLINE);
            }
        }
        Event::Return { rsp, outcome }
    }

    fn fetch(&mut self, mem: &SimMemory) -> Event {
        let addr = self.regs.rip;
        if region(addr) != Region::Code {
            let code = if region(addr) == Region::Unmapped {
                SEGV_MAPERR
            } else {
                SEGV_ACCERR
            };
            let fault = Fault {
                signal: SIGSEGV,
                code,
                addr,
            };
            self.deliver(fault, addr);
            return Event::Exec {
                addr,
                result: Err(fault),
            };
        }
        // One read of the code, as the hardware fetches once: reading the opcode byte
        // again to decode could find a `BRK` armed in between, executed as the
        // program's own breakpoint.
        let code = mem.code_from(addr);
        if code.first() == Some(&BRK) {
            self.phase = Phase::Trapped { addr };
            return Event::RaiseTrap { addr };
        }
        let result = match decode(&code) {
            // A `ret` reading a swapped return address is the return probe at work,
            // not the program looking at its stack.
            Some(Insn::Ret) => execute(Insn::Ret, addr, &mut self.regs, &mem.for_ret()),
            Some(insn) => execute(insn, addr, &mut self.regs, mem as &dyn Bus),
            None => Err(illegal(addr)),
        };
        match result {
            Ok(Effect::Halt) => self.status = Status::Halted,
            Ok(Effect::Continue) => {}
            Err(fault) => self.deliver(fault, addr),
        }
        Event::Exec { addr, result }
    }

    fn dispatch(&mut self, env: &Env<'_>, addr: u64) -> Event {
        let _ctx = self.ctx(env);
        let mem = env.backend.memory();
        let d = env.backend.dispatcher();
        let mut regs = self.regs;
        regs.rip = addr;
        let sp = regs.rsp;
        let ts = Rc::clone(&self.ts);
        let outcome = match d.pre(&ts, addr, self.tid, &mut regs, &**mem) {
            PreOutcome::NotOurs => {
                // Ours no more: the original byte is back (a racing disarm), or a
                // probe was armed there again since the lookup (a new registration
                // at the address, published before its `BRK` was written): execute
                // again, as backend-sigtrap's `not_ours` does. Only a `BRK` that no
                // probe claims is the program's own.
                let reexecute = mem.byte(addr) != BRK || d.contains(addr);
                if reexecute {
                    self.phase = Phase::Fetch;
                } else {
                    let fault = Fault {
                        signal: SIGTRAP,
                        code: TRAP_BRKPT,
                        addr,
                    };
                    self.deliver(fault, addr);
                }
                Dispatched::NotOurs { reexecute }
            }
            PreOutcome::Redirect => {
                self.regs = regs;
                self.phase = Phase::Fetch;
                Dispatched::Redirect
            }
            PreOutcome::Step(step) => {
                let slot = Arc::clone(&step.site().slot);
                let post = step.defer_post();
                self.regs = regs;
                self.phase = Phase::InSlot { slot, post };
                Dispatched::Step { post }
            }
        };
        // Removals handlers asked for: the first CPU finishes them right away (in thread
        // context, still inside this micro-step, through the dispatcher); the others
        // leave them to the registry's next operation or to the first CPU, so hits meet
        // handlers whose removal was asked but not yet finished.
        if self.tid == 0 {
            d.collect();
        }
        Event::Dispatch { addr, sp, outcome }
    }

    fn slot_exec(&mut self, env: &Env<'_>, slot: &Slot, post: bool) -> Event {
        let addr = slot.addr;
        let mem = env.backend.memory();
        let mut regs = self.regs;
        let bus: &dyn Bus = match slot.insn {
            Insn::Ret => &mem.for_ret(),
            _ => &**mem,
        };
        match execute(slot.insn, addr, &mut regs, bus) {
            Ok(effect) => {
                self.regs = regs;
                self.phase = Phase::Fetch;
                if effect == Effect::Halt {
                    // The thread ends inside the slot and never traps back: a backend
                    // must abandon its deferred step.
                    self.status = Status::Halted;
                    self.ts.abandon();
                } else if post {
                    self.phase = Phase::PostTrap { addr };
                }
                Event::SlotExec {
                    addr,
                    result: Ok(effect),
                }
            }
            Err(fault) => {
                let _ctx = self.ctx(env);
                let d = env.backend.dispatcher();
                regs.rip = addr;
                let action = d.fault(&self.ts, addr, self.tid, &mut regs, &**mem, &fault);
                self.regs = regs;
                match action {
                    FaultAction::Handled => self.phase = Phase::Fetch,
                    FaultAction::NotHandled => self.deliver(fault, addr),
                }
                Event::SlotExec {
                    addr,
                    result: Err((fault, action)),
                }
            }
        }
    }
}
