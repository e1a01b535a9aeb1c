//! Return probes on one-stop sites (contract rule 10): the tracer's side of the core's
//! protocol (`multiprobe_core::backend`, "Return probes").
//!
//! * **The trampoline** is one `int3` in a unit of an XOL page of the image, placed at
//!   the first hit after a return probe was registered ([`PtraceBackend::check_return`]
//!   raises `Shared::returns_wanted`). A call armed at its entry (the core swaps `[rsp]`
//!   for the trampoline's address) comes back to it and stops: [`Tracer::on_return`]
//!   hands it to [`multiprobe_core::backend::Dispatcher::ret`] with its registers (the
//!   return value in `rax`/`rdx`), which sets `rip` to the real return address.
//! * **The shadow stack** of each traced thread is the core's return stack in that
//!   thread's `ThreadState` (tracer side, one per thread), given storage and the
//!   trampoline's address before the thread's first hit that may arm a return. Frames
//!   are keyed by the entry's stack pointer: calls a `longjmp` or an exception skipped
//!   are dropped by the core (counted lost) at the next entry or return below them.
//! * **Unwinders** read return addresses off the stack and would stop at the
//!   trampoline, which has no unwind information (a C++ exception would end in
//!   `std::terminate`, as with the kernel's uretprobes). As uftrace does, the unwinders'
//!   entry points are probed (internal handlers in the registry, registered with the
//!   trampoline): `_Unwind_RaiseException`, `_Unwind_Resume`,
//!   `_Unwind_Resume_or_Rethrow`, `_Unwind_ForcedUnwind`, `_Unwind_Backtrace` and
//!   `backtrace` put the thread's original return addresses back before the unwinder
//!   runs (`ThreadState::restore_return_addresses`: the calls stay awaited); where the
//!   program goes on with calls in flight — `__cxa_begin_catch`, `_Unwind_DeleteException`
//!   (a catch), and otherwise the thread's next entry hit or return — the trampoline goes
//!   back into the slots of the calls still live, above the stack pointer there
//!   (`rehijack_returns`); after a stack walk, when it returns to its caller (a one-shot
//!   internal probe at its return address). A handler's request is queued and served right after the
//!   dispatch of the hit, before the thread runs again.
//! * **Leaving** (detach, a thread stopped at the trampoline while the tracer detaches, a
//!   fork child freed of probes): the original return addresses go back into every slot
//!   that holds the trampoline, so the program returns where it would have.
//!
//! Invariants: the trampoline's unit is never freed while the image lives (calls in
//! flight may return to it after their probe is gone: `Dispatcher::ret` then runs no hook
//! and resumes at the real address); every slot of ours is restored before the XOL page
//! holding the trampoline is unmapped in any process.
//!
//! Unwinders in libraries loaded after the trampoline was placed are hooked when the
//! user says libraries changed ([`PtraceBackend::libraries_changed`]; the command does
//! at every consistent state of the loader's list).
//!
//! Limits: unwinders that do not go through those entry points (a debugger, a
//! profiler reading the stack, `pthread_cancel`'s private unwinder handle) see the
//! trampoline's address; the internal probes are the registry's handlers (they show in
//! `Registry::handlers`); without a `libraries_changed`, a library with an unwinder
//! loaded after the first return probe's hit is not hooked.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use multiprobe_core::backend::{RegisterFile, RetOutcome, ThreadState, DEFAULT_RETURN_WORDS};
use multiprobe_core::{Error, FnHandler, HandlerId, Memory, PreAction, Registry, Result};
use multiprobe_symbols::ProcessSymbols;

use crate::backend::{PtraceBackend, Shared, INT3};
use crate::collect::Put;
use crate::error;
use crate::mem::CodeMemory;
use crate::regs::{self, to_core, ThreadRegs};
use crate::sys::{self, Tid, UserRegs};
use crate::thread::gone_is_ok;
use crate::tracer::Tracer;
use crate::xol::UNIT;

/// What the hook at an unwinder's entry point does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Hook {
    /// It unwinds (an exception): return addresses go back first.
    Restore,
    /// It walks the stack and returns (a backtrace): return addresses go back first,
    /// and the trampoline into the live calls' slots when it returns.
    Walk,
    /// A caught exception lets the program go on here: calls above are re-armed.
    Rearm,
}

const HOOKS: [(&str, Hook); 8] = [
    ("_Unwind_RaiseException", Hook::Restore),
    ("_Unwind_Resume", Hook::Restore),
    ("_Unwind_Resume_or_Rethrow", Hook::Restore),
    ("_Unwind_ForcedUnwind", Hook::Restore),
    ("_Unwind_Backtrace", Hook::Walk),
    ("backtrace", Hook::Walk),
    ("__cxa_begin_catch", Hook::Rearm),
    ("_Unwind_DeleteException", Hook::Rearm),
];

/// What an unwinder hook asked for, served after the hit's dispatch.
#[derive(Clone, Copy, Debug)]
enum Unwind {
    /// Put the thread's original return addresses back.
    Restore(Tid),
    /// Swap the trampoline back into the slots of the calls above this stack pointer.
    Rearm(Tid, u64),
    /// A stack walk was entered with its return address `at` in the slot at `sp`: re-arm
    /// the calls above when the thread comes back there (a one-shot probe at `at`).
    RearmAt { tid: Tid, at: u64, sp: u64 },
}

/// The tracer's return-probe state for the current image (module docs).
#[derive(Debug, Default)]
pub(crate) struct Returns {
    /// The trampoline's address, 0 until placed.
    tramp: u64,
    /// Whether placing it was tried in this image (once: it needs a page).
    tried: bool,
    /// The unwinder hooks' handler ids, and the names hooked.
    hooks: Vec<HandlerId>,
    hooked: HashSet<&'static str>,
    queue: Arc<Mutex<Vec<Unwind>>>,
    /// Threads whose return slots hold original addresses for an unwinder.
    restored: HashSet<Tid>,
}

impl Returns {
    /// The image is gone (exec): nothing of it is ours any more.
    pub(crate) fn forget(&mut self) {
        *self = Returns {
            queue: Arc::clone(&self.queue),
            ..Returns::default()
        };
        lock(&self.queue).clear();
    }

    /// After the dispatch of a hit of `tid` (state `ts`), before it runs again: serve
    /// what unwinder hooks asked (every request of the hit is the thread's own).
    ///
    /// Returns what the shadow stacks of calls collected in the tracee need for the
    /// same thread (`collect::shadow`), in order.
    pub(crate) fn after_entry(
        &mut self,
        tid: Tid,
        ts: &ThreadState,
        mem: &dyn Memory,
        registry: &Registry<PtraceBackend>,
    ) -> Vec<Put> {
        let mut shadow = Vec::new();
        let asked = std::mem::take(&mut *lock(&self.queue));
        for u in asked {
            match u {
                Unwind::RearmAt { tid: t, at, sp } if t == tid => {
                    // Registering costs no grace period: safe inside a hit. If it cannot
                    // be had, the calls are re-armed at the thread's next hit.
                    let q = Arc::clone(&self.queue);
                    let h = FnHandler::new().pre(move |hit: &mut multiprobe_core::Hit<'_>| {
                        if hit.tid() as i32 != tid.as_raw_pid() || hit.regs().rsp <= sp {
                            return PreAction::Continue;
                        }
                        lock(&q).push(Unwind::Rearm(tid, hit.regs().rsp));
                        PreAction::Remove
                    });
                    if let Ok(r) = registry.register_handler(at, h) {
                        r.into_id();
                    }
                }
                Unwind::Restore(t) if t == tid => {
                    ts.restore_return_addresses(mem);
                    self.restored.insert(tid);
                    shadow.push(Put::Originals);
                }
                Unwind::Rearm(t, sp) if t == tid => {
                    ts.rehijack_returns(sp, mem);
                    self.restored.remove(&tid);
                    shadow.push(Put::CodeAbove(sp));
                }
                _ => {}
            }
        }
        shadow
    }

    /// The trampoline's address, if placed.
    pub(crate) fn trampoline(&self) -> Option<u64> {
        (self.tramp != 0).then_some(self.tramp)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// [`multiprobe_core::backend::Backend::check_return`] for a traced process: `addr`
/// must be the first instruction of a function the symbols (or, for one without a
/// symbol, the unwind tables) know of, when they know of one around it.
pub(crate) fn check_entry(shared: &Shared, addr: u64) -> Result<()> {
    let maps = error::maps(shared.pid.as_raw_pid())?;
    let syms = ProcessSymbols::from_maps(maps, Arc::clone(&shared.symbols));
    if let Some(f) = syms.function_bounds(addr) {
        if f.start != addr {
            return Err(Error::NotFunctionEntry {
                addr,
                context: format!(" (it is {}+{:#x})", f.name, addr - f.start),
            });
        }
        multiprobe_core::backend::check_returns_once(addr, &f.name)?;
    }
    shared.returns_wanted.store(true, Ordering::Release);
    Ok(())
}

impl Tracer {
    /// Before the dispatch of a hit of `tid` (hit.rs): once a return probe exists, the
    /// trampoline is placed (at the first such hit) and the thread's return stack set
    /// up; a thread whose return slots were restored for an unwinder gets the calls
    /// above its stack pointer re-armed.
    pub(crate) fn returns_before_entry(&mut self, tid: Tid, regs: &ThreadRegs, near: u64) {
        if !self.shared.returns_wanted.load(Ordering::Acquire) {
            return;
        }
        if !self.returns.tried {
            self.returns.tried = true;
            if let Some(ur) = regs.kernel() {
                self.place_trampoline(tid, &ur, near);
            }
        }
        let tramp = self.returns.tramp;
        if tramp == 0 {
            return;
        }
        let th = self.threads.known(tid);
        if th.ts.return_trampoline() != tramp {
            th.ts.reserve_returns(DEFAULT_RETURN_WORDS);
            th.ts.set_return_trampoline(tramp);
        }
        if self.returns.restored.remove(&tid) {
            let sp = regs.regs().rsp;
            let th = self.threads.known(tid);
            th.ts.rehijack_returns(sp, &self.mem);
        }
    }

    /// A site collecting returns in the tracee is being promoted (every thread held):
    /// the unwinders get their hooks now (with the one-stop trampoline), since such a
    /// site may never stop.
    pub(crate) fn ensure_return_hooks(&mut self, near: u64) {
        if self.returns.tried {
            return;
        }
        if let Some((tid, ur)) = self.held_thread() {
            self.returns.tried = true;
            self.place_trampoline(tid, &ur, near);
            for sig in self.aside.take_signals(tid) {
                self.resend.push((tid, sig));
            }
        }
    }

    /// Map (if needed) a page and put the trampoline in a unit of it, then hook the
    /// unwinders. On failure returns stay lost (counted by the core).
    fn place_trampoline(&mut self, tid: Tid, ur: &UserRegs, near: u64) {
        let mut unit = self.shared.lock().xol.alloc(|_| true);
        if unit.is_none() && self.map_page_near(tid, ur, near).is_ok() {
            unit = self.shared.lock().xol.alloc(|_| true);
        }
        let Some(unit) = unit else { return };
        // A whole unit of `int3`: a thread arrives at its first byte only.
        let bytes = vec![INT3; UNIT as usize];
        if self.shared.lock().write_slot(unit, &bytes).is_err() {
            self.shared.lock().xol.free(unit);
            return;
        }
        self.returns.tramp = unit;
        self.hook_unwinders();
    }

    /// The process loaded libraries ([`PtraceBackend::libraries_changed`]): with the
    /// trampoline placed, hook the unwinders that were not there before. On the
    /// tracer's thread: right after the dispatch of the hit whose handler said so
    /// (before its thread runs again), or between events.
    pub(crate) fn rehook_unwinders(&mut self) {
        if self.shared.libraries_changed.swap(false, Ordering::AcqRel)
            && self.returns.tramp != 0
            && self.returns.hooked.len() < HOOKS.len()
        {
            self.hook_unwinders();
        }
    }

    /// Register the unwinder hooks (module docs) where the names resolve and are not
    /// hooked yet.
    fn hook_unwinders(&mut self) {
        for (name, hook) in HOOKS {
            if self.returns.hooked.contains(name) {
                continue;
            }
            let Ok(addr) = self.resolve(name) else {
                continue;
            };
            let q = Arc::clone(&self.returns.queue);
            let h = FnHandler::new().pre(move |hit: &mut multiprobe_core::Hit<'_>| {
                let Some(tid) = Tid::from_raw(hit.tid() as i32) else {
                    return PreAction::Continue;
                };
                let sp = hit.regs().rsp;
                let mut q = lock(&q);
                match hook {
                    Hook::Restore => q.push(Unwind::Restore(tid)),
                    Hook::Walk => {
                        q.push(Unwind::Restore(tid));
                        if let Ok(at) = hit.mem().read_u64(sp) {
                            q.push(Unwind::RearmAt { tid, at, sp });
                        }
                    }
                    Hook::Rearm => q.push(Unwind::Rearm(tid, sp)),
                }
                PreAction::Continue
            });
            if let Ok(r) = self.registry.register_handler(addr, h) {
                self.returns.hooks.push(r.into_id());
                self.returns.hooked.insert(name);
            }
        }
    }

    /// A thread stopped at the trampoline (`rip` just past its `int3`): a call armed at
    /// its entry returned. Its return hooks run, and it resumes at the real return
    /// address.
    pub(crate) fn on_return(&mut self, tid: Tid, read: Option<UserRegs>) -> Result<()> {
        self.restore_trap(tid);
        let Some(ur) = read.or_else(|| sys::get_regs(tid).ok()) else {
            return Ok(()); // killed meanwhile: its exit comes next
        };
        let mut core = to_core(&ur);
        core.rip = self.returns.tramp;
        let th = self.threads.known(tid);
        th.wants_regs = true;
        let outcome = self
            .dispatcher
            .ret(&th.ts, tid.as_raw_pid() as u32, &mut core, &self.mem);
        if outcome != RetOutcome::Returned {
            // No registry of this tracer claims it (cannot happen with one registry per
            // process, but never leave a thread at the trampoline): drop the frame.
            match th.ts.pop_return(core.rsp) {
                Some(ret) => core.rip = ret,
                None => {
                    return Err(Error::Backend(format!(
                        "thread {} returned to the return trampoline through a slot no call was recorded at (rsp {:#x})",
                        tid.as_raw_pid(),
                        core.rsp
                    )))
                }
            }
        }
        if self.returns.restored.remove(&tid) {
            let th = self.threads.known(tid);
            th.ts.rehijack_returns(core.rsp, &self.mem);
        }
        gone_is_ok(regs::write_back(tid, &ur, &core))
            .map_err(|e| error::sys(e, "set registers"))?;
        self.resume(tid, None)
    }

    /// A thread stopped at the trampoline while the tracer stops every thread: detaching,
    /// it is sent to its real return address (the return is lost), else put back on the
    /// trampoline to stop there again when resumed. False if it is not at the trampoline.
    pub(crate) fn rewind_return(&mut self, tid: Tid, ur: &UserRegs, detaching: bool) -> bool {
        if self.returns.tramp == 0 || ur.rip != self.returns.tramp + 1 {
            return false;
        }
        let rip = if detaching {
            let th = self.threads.known(tid);
            match self.dispatcher.drop_return(&th.ts, ur.rsp) {
                Some(ret) => ret,
                None => return false,
            }
        } else {
            self.returns.tramp
        };
        let _ = sys::poke_user(tid, sys::UserOffset::RIP, rip);
        self.restore_trap(tid);
        true
    }

    /// Leaving the process (detach, every thread stopped): every slot of ours gets its
    /// original return address back, and the calls in flight are dropped (lost).
    pub(crate) fn restore_returns_at_detach(&mut self) {
        for tid in self.threads.tids() {
            let th = self.threads.known(tid);
            th.ts.restore_return_addresses(&self.mem);
            self.dispatcher.abandon_returns(&th.ts);
        }
        self.returns.restored.clear();
    }

    /// A fork child (memory `code`) forked by `forker`: its copy of the forker's stack
    /// holds the trampoline where the forker's calls in flight were armed; put the
    /// original return addresses back before its copy of the XOL page goes.
    pub(crate) fn restore_returns_in_child(&self, code: &CodeMemory, forker: Tid) {
        let (Some(tramp), Some(th)) = (self.returns.trampoline(), self.threads.get(forker)) else {
            return;
        };
        for (slot, ret) in th.ts.return_slots() {
            let mut now = [0u8; 8];
            if code.read(slot, &mut now).is_ok() && u64::from_le_bytes(now) == tramp {
                let _ = code.write(slot, &ret.to_le_bytes());
            }
        }
    }

    /// Thread `tid` is going (exited, killed, or its process is): its calls in flight
    /// never return (counted lost). Before it is forgotten.
    pub(crate) fn returns_thread_gone(&mut self, tid: Tid) {
        if let Some(th) = self.threads.get(tid) {
            self.dispatcher.abandon_returns(&th.ts);
        }
        self.returns.restored.remove(&tid);
    }
}
