//! The hot path: what a backend calls when a thread hits a breakpoint, finishes the
//! displaced instruction, or faults in it.
//!
//! Everything here is async-signal-safe when handlers are: it takes no lock, allocates
//! nothing, frees nothing and makes no system call (contract rule 5). Panics of
//! handlers are caught (rule 8) — catching is free, but a panic itself allocates, so in
//! signal context it is best effort.
//!
//! Protocol for a backend, per hit:
//! 1. [`Dispatcher::pre`] with `regs.rip` = the probed address. Outcomes:
//!    * [`PreOutcome::NotOurs`]: no probe here (never was, or just disarmed).
//!    * [`PreOutcome::Redirect`]: resume at `regs.rip`; skip the instruction.
//!    * [`PreOutcome::Step`]: execute the displaced instruction once. If
//!      [`Step::wants_post`], call [`Step::defer_post`] and, after the instruction,
//!      [`Dispatcher::post`]; otherwise just drop the `Step` when done with its data.
//! 2. If the displaced instruction faults: [`Dispatcher::fault`].
//!
//! A deferred step keeps its read section open in the [`ThreadState`] until `post`,
//! `fault` or [`ThreadState::abandon`] ends it; unregistering waits for it.
//!
//! Registers: each entry point takes a `&mut impl` [`RegisterFile`] (pass `&mut regs`
//! for a plain [`crate::Regs`]; it is generic, so registers at hand cost no dynamic
//! call). Dispatch itself never fetches them: only handlers do,
//! through [`Hit`]. After a call, a backend whose file was never fetched
//! ([`RegisterFile::fetched`] is `None`) knows that no handler read or changed a
//! register, `rip` included, and can skip both the fetch and the write-back.

use std::cell::Cell;
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};

use crate::handler::{Fault, FaultAction, Hit, PreAction};
use crate::memory::Memory;
use crate::regs::RegisterFile;
use crate::shard::{self, Shard};
use crate::srcu::{Domain, ReadToken};
use crate::sync::Arc;
use crate::table::{SiteView, Table};
use crate::HandlerId;

/// How many deferred steps one thread can have at once (a step is interrupted by a
/// signal whose handler hits another probe, and so on). Deeper nesting runs the
/// pre-handlers but skips post-handlers, counted as missed.
pub const MAX_PENDING: usize = 4;

#[derive(Clone, Copy)]
struct Pending {
    domain: *const Domain,
    site: *const (),
    addr: u64,
    token: ReadToken,
}

/// Per-thread dispatch state, owned by the backend: one per thread that hits probes
/// (an OS thread for in-process probes, a traced thread for ptrace, a simulated CPU).
///
/// It records whether the thread is inside a handler (rule 6), its shard, and the
/// deferred steps waiting for their post-handlers. It is neither `Send` nor `Sync`:
/// create and use it on one OS thread. `new` is `const`, so it can live in a
/// `thread_local!` with a `const` initializer, which a signal handler may touch.
///
/// It has a `Drop` (ending deferred steps, giving back its shard). In a `thread_local!`
/// that is touched first from a signal handler, wrap it in `ManuallyDrop`: the standard
/// library registers a thread-local's destructor lazily, at first use, and that
/// registration allocates. Call [`ThreadState::abandon`] and drop it at thread exit
/// some other way (a `pthread_key_create` destructor, for example).
pub struct ThreadState {
    shard: Cell<Option<Shard>>,
    active: Cell<bool>,
    depth: Cell<u8>,
    pending: [Cell<Option<Pending>>; MAX_PENDING],
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for ThreadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadState")
            .field("active", &self.active.get())
            .field("pending", &self.depth.get())
            .finish()
    }
}

impl Default for ThreadState {
    fn default() -> Self {
        Self::new()
    }
}

impl ThreadState {
    /// A fresh state. Claims its shard lazily, on the first hit.
    pub const fn new() -> Self {
        ThreadState {
            shard: Cell::new(None),
            active: Cell::new(false),
            depth: Cell::new(0),
            pending: [const { Cell::new(None) }; MAX_PENDING],
            _not_send: PhantomData,
        }
    }

    #[inline(always)]
    fn shard(&self) -> Shard {
        match self.shard.get() {
            Some(s) => s,
            None => {
                let s = shard::claim();
                self.shard.set(Some(s));
                s
            }
        }
    }

    /// Whether a handler is running on this thread right now.
    pub fn in_handler(&self) -> bool {
        self.active.get()
    }

    /// Number of deferred steps waiting for [`Dispatcher::post`].
    pub fn pending(&self) -> usize {
        usize::from(self.depth.get())
    }

    /// Address of the innermost deferred step, if any.
    pub fn pending_addr(&self) -> Option<u64> {
        self.top().map(|p| p.addr)
    }

    fn top(&self) -> Option<Pending> {
        let d = usize::from(self.depth.get());
        if d == 0 {
            None
        } else {
            self.pending[d - 1].get()
        }
    }

    fn push(&self, p: Pending) -> bool {
        let d = usize::from(self.depth.get());
        if d == MAX_PENDING {
            return false;
        }
        self.pending[d].set(Some(p));
        self.depth.set(d as u8 + 1);
        true
    }

    fn pop(&self) -> Option<Pending> {
        let p = self.top()?;
        let d = self.depth.get() - 1;
        self.pending[usize::from(d)].set(None);
        self.depth.set(d);
        Some(p)
    }

    /// End every deferred step without running its post-handlers: for a thread that
    /// exited or was moved out of an out-of-line slot. Unregistering waits for deferred
    /// steps, so a backend must call this for threads that will never come back.
    pub fn abandon(&self) {
        while let Some(p) = self.pop() {
            // SAFETY: a pending step holds a read section of `p.domain`, and a table (and
            // its domain) is not dropped while read sections are open: `Registry` and
            // `Table` drops wait for them (see `Table`'s drop).
            unsafe { (*p.domain).exit(p.token) };
        }
    }
}

impl Drop for ThreadState {
    fn drop(&mut self) {
        self.abandon();
        if let Some(s) = self.shard.get() {
            shard::release(s);
        }
    }
}

/// A backend's handle on the table: the dispatch entry points. Cheap to clone.
pub struct Dispatcher<S> {
    table: Arc<Table<S>>,
}

impl<S> Clone for Dispatcher<S> {
    fn clone(&self) -> Self {
        Dispatcher {
            table: Arc::clone(&self.table),
        }
    }
}

impl<S> std::fmt::Debug for Dispatcher<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher").finish_non_exhaustive()
    }
}

/// What [`Dispatcher::pre`] decided.
#[derive(Debug)]
pub enum PreOutcome<'t, S> {
    /// No probe is registered at this address. If the breakpoint byte is gone the probe
    /// was just removed: re-execute the (restored) instruction. Otherwise the trap is
    /// not ours.
    NotOurs,
    /// A pre-handler redirected the thread: resume at `regs.rip`.
    Redirect,
    /// Execute the displaced instruction once.
    Step(Step<'t, S>),
}

/// A hit whose displaced instruction must now execute. Holds the read section that
/// keeps the site's backend data alive; dropping it ends the section.
pub struct Step<'t, S> {
    domain: &'t Domain,
    ts: &'t ThreadState,
    token: Option<ReadToken>,
    site: *const SiteView<S>,
    post: bool,
}

impl<S> std::fmt::Debug for Step<'_, S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Step")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("post", &self.post)
            .finish()
    }
}

impl<S> Step<'_, S> {
    fn view(&self) -> &SiteView<S> {
        // SAFETY: `token` is `Some` for as long as `self` is usable, and the open read
        // section keeps the view alive.
        unsafe { &*self.site }
    }

    /// The probed address.
    pub fn addr(&self) -> u64 {
        self.view().addr()
    }

    /// The backend's data for this site (what [`crate::backend::Backend::prepare`] returned).
    pub fn site(&self) -> &S {
        &self.view().shared.data
    }

    /// Whether post-handlers must run after the instruction: use the out-of-line copy
    /// that traps back, then [`Step::defer_post`] and [`Dispatcher::post`].
    pub fn wants_post(&self) -> bool {
        self.post
    }

    /// Keep the read section open in the thread state until [`Dispatcher::post`],
    /// [`Dispatcher::fault`] or [`ThreadState::abandon`]. Does nothing (and just ends the
    /// section) if no post-handler wants to run.
    pub fn defer_post(mut self) {
        if !self.post {
            return;
        }
        let token = self.token.take().expect("step already finished");
        let pushed = self.ts.push(Pending {
            domain: self.domain,
            site: self.site.cast(),
            addr: self.addr(),
            token,
        });
        // `pre` only offers a post when there is room.
        debug_assert!(pushed);
    }
}

impl<S> Drop for Step<'_, S> {
    fn drop(&mut self) {
        if let Some(t) = self.token.take() {
            self.domain.exit(t);
        }
    }
}

fn report_panic(
    counters: &crate::stats::HandlerCounters,
    shard: Shard,
    payload: Box<dyn std::any::Any + Send>,
) {
    counters.panicked(shard);
    // Freeing the payload is what the panic's allocation implies; best effort in a
    // signal handler, as documented.
    drop(payload);
}

impl<S> Dispatcher<S> {
    pub(crate) fn new(table: Arc<Table<S>>) -> Self {
        Dispatcher { table }
    }

    /// A thread hit the breakpoint at `addr`. Runs the enabled pre-handlers in
    /// registration order (or counts a miss if the thread is already dispatching).
    /// `regs` shows `rip == addr` to them; a handler that moves it (seen only if
    /// registers were fetched: otherwise nothing moved) redirects, as
    /// [`crate::PreAction::Redirect`] does.
    #[inline]
    pub fn pre<'t>(
        &'t self,
        ts: &'t ThreadState,
        addr: u64,
        tid: u32,
        regs: &mut impl RegisterFile,
        mem: &dyn Memory,
    ) -> PreOutcome<'t, S> {
        let domain = &self.table.domain;
        let shard = ts.shard();
        let token = domain.enter(shard);
        // SAFETY: inside the read section opened above; `Step` keeps it open for as long
        // as it hands out the view.
        let Some(site) = (unsafe { self.table.lookup(addr) }) else {
            domain.exit(token);
            return PreOutcome::NotOurs;
        };
        let step = |post| {
            PreOutcome::Step(Step {
                domain,
                ts,
                token: Some(token),
                site,
                post,
            })
        };
        if ts.active.get() {
            // Rule 6: a handler hit a probe. Nobody runs; the instruction still does.
            for h in site.hot.iter() {
                h.counters().missed(shard);
            }
            return step(false);
        }
        ts.active.set(true);
        // One count for the whole walk: each handler's hits are derived from it
        // (`crate::tally`), so a handler costs its call and little more.
        site.walk_counter.hit(shard);
        let mut redirect = false;
        let mut hit = Hit::new(addr, tid, HandlerId(0), regs, mem);
        let mut walk = site.hot.iter();
        while let Some(h) = walk.next() {
            hit.set_handler(h.id);
            match catch_unwind(AssertUnwindSafe(|| h.handler().pre(&mut hit))) {
                Ok(PreAction::Continue) => {}
                Ok(PreAction::Redirect) => redirect = true,
                Err(payload) => report_panic(h.counters(), shard, payload),
            }
            if redirect || hit.rip_moved(addr) {
                redirect = true;
                for later in walk {
                    later.counters().skipped(shard);
                }
                break;
            }
        }
        ts.active.set(false);
        if redirect {
            domain.exit(token);
            return PreOutcome::Redirect;
        }
        let mut post = site.any_post;
        if post && ts.pending() == MAX_PENDING {
            post = false;
            for h in site.hot.iter().filter(|h| h.has_post) {
                h.counters().missed(shard);
            }
        }
        step(post)
    }

    /// The displaced instruction of the innermost deferred step at `addr` finished:
    /// run the post-handlers of the handlers whose pre ran, with `regs.rip` at the next
    /// instruction. Returns false (and does nothing) if this thread has no such step.
    pub fn post(
        &self,
        ts: &ThreadState,
        addr: u64,
        tid: u32,
        regs: &mut impl RegisterFile,
        mem: &dyn Memory,
    ) -> bool {
        let Some((site, token)) = self.take_pending(ts, addr) else {
            return false;
        };
        // SAFETY: the deferred step's read section (`token`) keeps the view alive until
        // the exit below.
        let site = unsafe { &*site };
        let shard = ts.shard();
        let was_active = ts.active.replace(true);
        // Enabled flags come from the same snapshot the pre walk used, so these are
        // exactly the handlers whose pre ran.
        let mut hit = Hit::new(addr, tid, HandlerId(0), regs, mem);
        for h in site.hot.iter().filter(|h| h.has_post) {
            hit.set_handler(h.id);
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| h.handler().post(&mut hit))) {
                report_panic(h.counters(), shard, payload);
            }
        }
        ts.active.set(was_active);
        self.table.domain.exit(token);
        true
    }

    /// The displaced instruction of the probe at `addr` faulted. Backends set
    /// `regs.rip = addr` first, so handlers see the fault where the program would
    /// have. Fault handlers run in registration order until one handles it. Ends the
    /// deferred step for `addr`, if there is one. `NotHandled`: deliver the fault to the
    /// program as if unprobed (rule 7).
    ///
    /// Which handlers are asked: for a deferred step (one waiting for its posts), those
    /// enabled in the snapshot its pre walk used — exactly the ones whose pre ran. For a
    /// step that ended with the pre walk (boosted), the read section is gone by the time
    /// the instruction runs, so those enabled when the fault is dispatched: a handler
    /// registered or enabled in between may see a fault of a hit whose pre it missed.
    pub fn fault(
        &self,
        ts: &ThreadState,
        addr: u64,
        tid: u32,
        regs: &mut impl RegisterFile,
        mem: &dyn Memory,
        fault: &Fault,
    ) -> FaultAction {
        let domain = &self.table.domain;
        let shard = ts.shard();
        let (site, token) = match self.take_pending(ts, addr) {
            Some(p) => p,
            None => {
                let token = domain.enter(shard);
                // SAFETY: inside the read section just opened, closed below.
                match unsafe { self.table.lookup(addr) } {
                    Some(site) => (site as *const SiteView<S>, token),
                    None => {
                        domain.exit(token);
                        return FaultAction::NotHandled;
                    }
                }
            }
        };
        // SAFETY: `token` holds the read section that keeps the view alive until the
        // exit below.
        let site = unsafe { &*site };
        let mut action = FaultAction::NotHandled;
        if !ts.active.get() {
            ts.active.set(true);
            let mut hit = Hit::new(addr, tid, HandlerId(0), regs, mem);
            for h in site.hot.iter() {
                hit.set_handler(h.id);
                match catch_unwind(AssertUnwindSafe(|| h.handler().fault(&mut hit, fault))) {
                    Ok(FaultAction::Handled) => {
                        action = FaultAction::Handled;
                        break;
                    }
                    Ok(FaultAction::NotHandled) => {}
                    Err(payload) => report_panic(h.counters(), shard, payload),
                }
            }
            ts.active.set(false);
        }
        domain.exit(token);
        action
    }

    fn take_pending(&self, ts: &ThreadState, addr: u64) -> Option<(*const SiteView<S>, ReadToken)> {
        let top = ts.top()?;
        if !std::ptr::eq(top.domain, &self.table.domain) || top.addr != addr {
            return None;
        }
        ts.pop();
        Some((top.site.cast(), top.token))
    }

    /// Count a hit at `addr` as missed by every enabled handler there, without running
    /// any: for a backend that takes a trap it cannot dispatch (it interrupted the
    /// backend's own trap path, say). Returns whether a probe is registered at `addr`.
    pub fn miss(&self, ts: &ThreadState, addr: u64) -> bool {
        let domain = &self.table.domain;
        let shard = ts.shard();
        let token = domain.enter(shard);
        // SAFETY: inside the read section, closed below after the last use.
        let found = match unsafe { self.table.lookup(addr) } {
            Some(site) => {
                for h in site.hot.iter() {
                    h.counters().missed(shard);
                }
                true
            }
            None => false,
        };
        domain.exit(token);
        found
    }

    /// In the child of a `fork`, forget the read sections of the parent's other threads,
    /// which do not exist in the child and would otherwise hold every grace period open
    /// forever. Call it from the child before anything else uses the registry (a
    /// `pthread_atfork` child handler). Returns false, and forgets nothing, if the calling
    /// thread itself holds a read section (it forked from inside a handler); then only
    /// sections of this thread can be told apart, so none are.
    pub fn reset_after_fork(&self) -> bool {
        if crate::sync::held::any() {
            return false;
        }
        self.table.domain.forget_readers();
        true
    }

    /// Whether a probe is registered at `addr` right now. Thread context or signal
    /// context alike.
    pub fn contains(&self, addr: u64) -> bool {
        self.with_site(addr, |_| ()).is_some()
    }

    /// Call `f` with the backend data of the site at `addr`, if there is one, inside a
    /// read section. Async-signal-safe if `f` is.
    pub fn with_site<R>(&self, addr: u64, f: impl FnOnce(&S) -> R) -> Option<R> {
        let domain = &self.table.domain;
        let token = domain.enter(shard::shared());
        // SAFETY: inside the read section, closed below after the last use.
        let r = unsafe { self.table.lookup(addr) }.map(|v| f(&v.shared.data));
        domain.exit(token);
        r
    }
}
