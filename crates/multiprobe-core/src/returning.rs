//! Return probes, the generic protocol (contract rule 10): arming a call's return at
//! its entry ([`Arming`], used by the pre walk) and dispatching it at the backend's
//! return trampoline ([`Dispatcher::ret`]). The backend provides the trampoline — code
//! that brings a thread arriving there to its `ret` entry point — and its address
//! ([`ThreadState::set_return_trampoline`]); the swap goes through the hit's
//! [`Memory`], and the frames live on the thread's return stack (`crate::returns`).
//!
//! At an entry, with the thread dispatching (`active`), before the walk: the dead frames
//! at the top of the return stack are dropped (counted lost), and room for one frame is
//! taken above the top. Each handler with a return hook gets a zeroed record there for
//! its [`crate::Hit::call_data_mut`]; one whose pre-hook returned normally (not
//! `Remove`, no panic, no [`crate::Hit::skip_return`]) keeps it. After the walk, unless
//! it redirected or moved `rsp`, `[rsp]` (the return address) is read, the trampoline
//! written there, and the frame pushed. Whatever cannot be armed — no room, no
//! trampoline, a redirect, a stack that cannot be read or written — is counted lost
//! for the handlers that kept a record, and the call runs unchanged.
//!
//! At the trampoline ([`Dispatcher::ret`]): the frame is found by the stack pointer;
//! the frames above it are dead (skipped by `longjmp` or an exception) and counted
//! lost — those whose slot still holds the trampoline are kept as suspects
//! (`crate::returns`, *Suspects*: they may be live on another stack); `rip` becomes
//! the original return address; then, inside a read section of its
//! own, each recorded handler still registered at the probed address (found by id in the
//! current table: an unregistered one is never found again once `unregister` returned)
//! has its return hook called, in registration order, with the data its pre-hook left.
//! Lost returns are counted only for handlers still registered.

use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::dispatch::{Dispatcher, ThreadState};
use crate::handler::{CallData, Hit, CALL_DATA_WORDS};
use crate::memory::Memory;
use crate::regs::RegisterFile;
use crate::returns::{Frame, ReturnStack};
use crate::shard::Shard;
use crate::sync::same_thread::signal_fence;
use crate::table::{HandlerEntry, Hot, SiteView, Table};
use crate::HandlerId;

/// What [`Dispatcher::ret`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetOutcome {
    /// The call returned: `regs.rip` is its original return address (handlers may have
    /// changed it and other registers since). Resume there.
    Returned,
    /// The innermost call recorded at this stack pointer was armed by another registry
    /// of this thread state: ask that one ([`ThreadState::pop_return`] if none claims it).
    NotOurs,
    /// No call is recorded at this stack pointer: the thread cannot be resumed where it
    /// should (the program switched stacks under the return stack's feet, or wrote the
    /// trampoline address itself). Nothing was changed.
    Unknown,
}

/// Count a lost return for every consumer of `f` that is this table's and still
/// registered, unless `f` is a suspect (counted already). Inside a read section of
/// `table`.
fn count_lost<S>(table: &Table<S>, stack: &ReturnStack, f: &Frame, shard: Shard) {
    if f.owner != table.uid || f.suspect {
        return;
    }
    // SAFETY: the caller holds a read section of `table`.
    let Some(view) = (unsafe { table.lookup(f.addr) }) else {
        return;
    };
    for id in stack.consumer_ids(f).filter(|&id| id != 0) {
        if let Some(e) = entry_of(view, id) {
            e.counters.lost(shard);
        }
    }
}

/// A frame found where a dead one would be, its slot still holding the trampoline: kept,
/// and counted lost unless it is a suspect already (`crate::returns`, *Suspects*).
fn suspect<S>(table: &Table<S>, stack: &ReturnStack, f: &Frame, shard: Shard) {
    if !f.suspect {
        count_lost(table, stack, f, shard);
        stack.set_suspect(f);
    }
}

/// The frames above `f`, which is returning, were skipped (by `longjmp` or an
/// exception), or are live on another stack: drop those whose slot no longer holds the
/// trampoline and keep the others as suspects; both are counted lost. Out of line: at
/// most returns, `f` is the innermost frame.
#[cold]
#[inline(never)]
fn settle_above<S>(
    table: &Table<S>,
    stack: &ReturnStack,
    f: &Frame,
    tramp: u64,
    mem: &dyn Memory,
    shard: Shard,
) {
    // From the top down: removing a frame moves only the ones above it.
    let mut next = stack.top();
    while let Some(d) = next.filter(|d| d.end > f.end) {
        next = stack.below(&d);
        if mem.read_u64(d.sp) == Ok(tramp) {
            suspect(table, stack, &d, shard);
        } else {
            count_lost(table, stack, &d, shard);
            stack.remove(&d);
        }
    }
}

/// `f`, a suspect, returned after all: take back the lost count of its consumers still
/// registered (those [`count_lost`] counted).
#[cold]
#[inline(never)]
fn unlose<S>(view: Option<&SiteView<S>>, stack: &ReturnStack, f: &Frame, shard: Shard) {
    for id in stack.consumer_ids(f).filter(|&id| id != 0) {
        if let Some(e) = view.and_then(|v| entry_of(v, id)) {
            e.counters.unlost(shard);
        }
    }
}

/// The entry of handler `id` in `view`, enabled or not, unless its removal was asked.
fn entry_of<S>(view: &SiteView<S>, id: u64) -> Option<&HandlerEntry> {
    view.handlers
        .iter()
        .map(|s| &*s.entry)
        .find(|e| e.id.0 == id && !e.mark.requested())
}

/// A return being armed by the pre walk of one hit (module docs).
pub(crate) struct Arming<'s> {
    stack: &'s ReturnStack,
    /// The entry's stack pointer: where the return address is.
    sp: u64,
    /// Where the frame is being built, or `None` (no room, no trampoline): every kept
    /// record is lost at once.
    start: Option<usize>,
    /// Records kept so far.
    kept: usize,
    owner: u64,
    scratch: CallData,
}

impl<'s> Arming<'s> {
    /// Before the walk of `site` (whose handlers include `site.rets` with return hooks),
    /// on a thread dispatching inside a read section of `table`: drop the dead frames,
    /// take room.
    pub(crate) fn begin<S>(
        ts: &'s ThreadState,
        table: &Table<S>,
        site: &SiteView<S>,
        hit: &Hit<'_>,
        shard: Shard,
    ) -> Arming<'s> {
        let stack = &ts.returns;
        let sp = hit.regs().rsp;
        let tramp = stack.trampoline();
        let mem = hit.mem();
        // Dead frames from the top down, while their slot is not above this call's (see
        // `crate::returns`): the slot no longer leads to the trampoline. One that still
        // does is kept and passed — below this call's slot, as a suspect (it may be live
        // on another stack); at this call's slot, this entry was reached by a tail call
        // (a `jmp`) from inside that frame's call, which a `call` would have overwritten.
        // (Removing a frame moves only the ones above it, so the frame below is where it
        // was.)
        let mut next = stack.top();
        while let Some(f) = next.filter(|f| f.sp <= sp) {
            next = stack.below(&f);
            if mem.read_u64(f.sp) != Ok(tramp) {
                count_lost(table, stack, &f, shard);
                stack.remove(&f);
            } else if f.sp < sp {
                suspect(table, stack, &f, shard);
            }
        }
        // Read only while some frame may be a suspect: not on the usual entry.
        if stack.has_suspects() && mem.read_u64(sp) != Ok(tramp) {
            stack.drop_suspects_at(sp);
        }
        let start = if tramp == 0 {
            None
        } else {
            stack.room(site.rets)
        };
        Arming {
            stack,
            sp,
            start,
            kept: 0,
            owner: table.uid,
            scratch: [0; CALL_DATA_WORDS],
        }
    }

    /// The record the next handler's pre-hook writes.
    pub(crate) fn data(&mut self) -> *mut CallData {
        match self.start {
            Some(start) => self.stack.consumer_data(start, self.kept),
            None => {
                self.scratch = [0; CALL_DATA_WORDS];
                &mut self.scratch
            }
        }
    }

    /// `h`'s pre-hook ran and its return is wanted.
    pub(crate) fn keep(&mut self, h: &Hot, shard: Shard) {
        match self.start {
            Some(start) => {
                self.stack.set_consumer(start, self.kept, h.id.0);
                self.kept += 1;
            }
            None => h.counters().lost(shard),
        }
    }

    /// After the walk: swap the return address and push the frame, or count the kept
    /// records lost.
    pub(crate) fn finish<S>(
        self,
        site: &SiteView<S>,
        redirected: bool,
        hit: &Hit<'_>,
        shard: Shard,
    ) {
        let Some(start) = self.start else { return };
        if self.kept == 0 {
            return;
        }
        let mem = hit.mem();
        let sp = self.sp;
        let swapped = !redirected
            && hit.regs().rsp == sp
            && match mem.read_u64(sp) {
                Ok(ret) => mem
                    .write_u64(sp, self.stack.trampoline())
                    .is_ok()
                    .then_some(ret),
                Err(_) => None,
            }
            .map(|ret| {
                self.stack
                    .commit(start, self.kept, ret, sp, site.addr(), self.owner)
            })
            .is_some();
        if !swapped {
            for k in 0..self.kept {
                let id = self.stack.consumer_id_at(start, k);
                if let Some(h) = site.hot.iter().find(|h| h.id.0 == id) {
                    h.counters().lost(shard);
                }
            }
        }
    }
}

impl<S> Dispatcher<S> {
    /// A thread arrived at the return trampoline (contract rule 10): `regs.rsp` is its
    /// stack pointer after the `ret` that took it there. Finds the call it returned
    /// from, sets `regs.rip` to that call's original return address, and runs the return
    /// hooks due (module docs); the calls skipped since (by `longjmp` or an exception)
    /// are counted lost. Async-signal-safe, like [`Dispatcher::pre`]. Fetches the
    /// registers (`rsp`), and the backend writes back what changed: `rip` at least.
    pub fn ret(
        &self,
        ts: &ThreadState,
        tid: u32,
        regs: &mut impl RegisterFile,
        mem: &dyn Memory,
    ) -> RetOutcome {
        let stack = &ts.returns;
        let rsp = regs.regs().rsp;
        let Some(f) = stack.returning(rsp) else {
            return RetOutcome::Unknown;
        };
        if f.owner != self.table.uid {
            return RetOutcome::NotOurs;
        }
        let table = &*self.table;
        let shard = ts.shard();
        let was_active = ts.in_handler();
        ts.set_active(true);
        // As in `pre`: the flag is up before the plain bumps and the stack's changes.
        signal_fence();
        let token = table.domain.enter(shard);
        if !stack.is_top(&f) {
            settle_above(table, stack, &f, stack.trampoline(), mem, shard);
        }
        regs.regs_mut().rip = f.ret;
        // SAFETY: inside the read section opened above, left below after the last use.
        let view = unsafe { table.lookup(f.addr) };
        if f.suspect {
            unlose(view, stack, &f, shard);
        }
        let mut hit = Hit::new(f.addr, tid, HandlerId(0), regs, mem);
        for k in 0..f.consumers {
            // In place: the frame stays until `take` below.
            let (id, data) = stack.consumer_ref(&f, k);
            let Some(e) = view.and_then(|v| entry_of(v, id)) else {
                continue;
            };
            if was_active {
                // A return while this thread runs a handler (a handler's own calls are
                // never armed, so only a program that switched stacks gets here).
                e.counters.lost(shard);
                continue;
            }
            e.counters.returned(shard);
            hit.set_handler(e.id);
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| e.handler.ret(&mut hit, data))) {
                e.counters.panicked(shard);
                drop(payload);
            }
        }
        // Innermost now, unless suspects above it were kept.
        stack.take(&f);
        drop(token);
        signal_fence();
        ts.set_active(was_active);
        RetOutcome::Returned
    }

    /// Whether the call a thread at the trampoline with `rsp` returns from was armed by
    /// this registry (see [`RetOutcome::NotOurs`]).
    pub fn owns_return(&self, ts: &ThreadState, rsp: u64) -> bool {
        ts.returns
            .returning(rsp)
            .is_some_and(|f| f.owner == self.table.uid)
    }

    /// A thread at the trampoline with `rsp` that will not run the return hooks (a
    /// tracer detaching): drop the call's frame, counting its returns lost, and return
    /// the original return address. The frames above it stay (they may be live on
    /// another stack): a tracer leaving restores and abandons them next.
    pub fn drop_return(&self, ts: &ThreadState, rsp: u64) -> Option<u64> {
        let stack = &ts.returns;
        let f = stack.returning(rsp)?;
        self.counting(ts, |shard| count_lost(&self.table, stack, &f, shard));
        stack.take(&f);
        Some(f.ret)
    }

    /// The thread will never return from its calls in flight (it exited, was killed,
    /// or the tracer leaves it after restoring their return addresses): drop every
    /// frame, counting the returns of this registry's lost. Thread context, or the
    /// thread itself outside any dispatch.
    pub fn abandon_returns(&self, ts: &ThreadState) {
        let stack = &ts.returns;
        if stack.is_empty() {
            return;
        }
        self.counting(ts, |shard| {
            for f in stack.frames() {
                count_lost(&self.table, stack, &f, shard);
            }
        });
        stack.clear();
    }

    /// Run `f` (which counts) with `ts` dispatching, inside a read section.
    fn counting(&self, ts: &ThreadState, f: impl FnOnce(Shard)) {
        let shard = ts.shard();
        let was_active = ts.in_handler();
        ts.set_active(true);
        signal_fence();
        let token = self.table.domain.enter(shard);
        f(shard);
        drop(token);
        signal_fence();
        ts.set_active(was_active);
    }
}
