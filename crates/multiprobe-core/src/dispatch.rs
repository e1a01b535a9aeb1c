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
//! A backend that can execute the instruction itself right after the pre-handlers
//! (emulation) may do step 1 in one call, [`Dispatcher::pre_step_post`]: the same walk,
//! its step, and the post-handlers of the same view in the same read section, with
//! nothing deferred.
//!
//! A deferred step keeps its read section open in the [`ThreadState`] until `post`,
//! `fault` or [`ThreadState::abandon`] ends it; unregistering waits for it.
//!
//! Return probes (contract rule 10): a hit whose walk ran the pre-hook of a handler
//! with a return hook also swaps the call's return address for the thread's return
//! trampoline ([`ThreadState::set_return_trampoline`]) and pushes a frame on its return
//! stack; at the trampoline the backend calls [`Dispatcher::ret`] (`crate::returning`).
//!
//! # A thread and its own signal handlers
//!
//! In-process backends dispatch inside signal handlers, so a dispatch can be interrupted
//! at any instruction by another one *on the same thread*, on the same `ThreadState`: a
//! signal whose handler hits a probe. Such nesting is strictly LIFO — the inner dispatch,
//! its deferred steps included, is over before the interrupted one resumes (a signal
//! handler that `siglongjmp`s out of a slot breaks this, and is documented as leaving a
//! read section open). The state is therefore kept so that an inner dispatch arriving
//! between any two instructions of an outer one finds it consistent:
//! * `active` is set before the walk's first plain counter bump and cleared after its
//!   last (compiler fences; see [`Dispatcher::pre`]), so an inner dispatch that lands
//!   between a bump's load and its store counts with atomic read-modify-writes only.
//! * Deferred steps live in frames: a push reserves its frame (raises `depth`) before
//!   writing it and marks it `ready` after; a pop clears `ready` before taking it and
//!   lowers `depth` after. An inner dispatch pushes above every reserved frame and reads
//!   a frame only when it is `ready`, so it never overwrites nor half-reads one.
//! * The shard is claimed once, by compare-and-swap, so two claims (an inner dispatch
//!   interrupting the first) keep one shard and give the other back.
//!
//! The cells an inner dispatch reads are atomics (relaxed: plain moves on x86-64), and
//! a compiler-only fence (`signal_fence`) orders them against the rest as a signal
//! handler on the same thread
//! sees it; they are never shared with another thread (`ThreadState` is neither `Send`
//! nor `Sync`), so no hardware fence is needed, and loom, which cannot deliver a signal,
//! does not model them.
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
use crate::removal::Mark;
use crate::returning::Arming;
use crate::returns::ReturnStack;
use crate::shard::{self, Shard};
use crate::srcu::{Domain, ReadToken};
use crate::sync::atomic::Ordering::Relaxed;
use crate::sync::same_thread::{signal_fence, AtomicBool, AtomicU8};
use crate::sync::Arc;
use crate::table::{HandlerEntry, Hot, SiteView, Table};
use crate::HandlerId;

/// How many deferred steps one thread can have at once (a step is interrupted by a
/// signal whose handler hits another probe, and so on). Deeper nesting runs the
/// pre-handlers but skips post-handlers, counted as missed.
pub const MAX_PENDING: usize = 4;

/// What identifies a deferred step: its table's domain, its site view, its address.
#[derive(Clone, Copy)]
struct Key {
    domain: *const Domain,
    site: *const (),
    addr: u64,
}

/// One deferred step's place in a [`ThreadState`] (module docs, *A thread and its own
/// signal handlers*).
///
/// Invariant: `key` and `token` are both `Some` exactly while `ready` is set, and are
/// written or taken only by the dispatch that reserved the frame, while `ready` is clear.
struct Frame {
    ready: AtomicBool,
    key: Cell<Option<Key>>,
    token: Cell<Option<ReadToken>>,
}

impl Frame {
    const fn empty() -> Frame {
        Frame {
            ready: AtomicBool::new(false),
            key: Cell::new(None),
            token: Cell::new(None),
        }
    }
}

/// Per-thread dispatch state, owned by the backend: one per thread that hits probes
/// (an OS thread for in-process probes, a traced thread for ptrace, a simulated CPU).
///
/// It records whether the thread is inside a handler (rule 6), its shard, and the
/// deferred steps waiting for their post-handlers. It is neither `Send` nor `Sync`:
/// create and use it on one OS thread — and its signal handlers, which may nest
/// dispatches on it (module docs). `new` is `const`, so it can live in a
/// `thread_local!` with a `const` initializer, which a signal handler may touch.
///
/// It has a `Drop` (ending deferred steps, giving back its shard). In a `thread_local!`
/// that is touched first from a signal handler, wrap it in `ManuallyDrop`: the standard
/// library registers a thread-local's destructor lazily, at first use, and that
/// registration allocates. Call [`ThreadState::abandon`] and drop it at thread exit
/// some other way (a `pthread_key_create` destructor, for example).
pub struct ThreadState {
    /// `Shard::to_bits`, 0 until the first hit claims one.
    shard: AtomicU8,
    active: AtomicBool,
    /// Frames reserved, `0..=MAX_PENDING`; frames at `depth` and above are empty.
    depth: AtomicU8,
    frames: [Frame; MAX_PENDING],
    /// The calls in flight whose returns are wanted (`crate::returns`).
    pub(crate) returns: ReturnStack,
    _not_send: PhantomData<*const ()>,
}

impl std::fmt::Debug for ThreadState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadState")
            .field("active", &self.in_handler())
            .field("pending", &self.pending())
            .field("returns", &self.returns_in_flight())
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
            shard: AtomicU8::new(0),
            active: AtomicBool::new(false),
            depth: AtomicU8::new(0),
            frames: [const { Frame::empty() }; MAX_PENDING],
            returns: ReturnStack::new(),
            _not_send: PhantomData,
        }
    }

    #[inline(always)]
    pub(crate) fn shard(&self) -> Shard {
        match Shard::from_bits(self.shard.load(Relaxed)) {
            Some(s) => s,
            None => self.claim_shard(),
        }
    }

    #[cold]
    fn claim_shard(&self) -> Shard {
        let mine = shard::claim();
        // A signal that interrupted us since the load above may have claimed one for
        // this thread already: keep that one (its dispatch wrote to it) and give ours
        // back, unused.
        match self
            .shard
            .compare_exchange(0, mine.to_bits(), Relaxed, Relaxed)
        {
            Ok(_) => mine,
            Err(bits) => {
                shard::release(mine);
                Shard::from_bits(bits).expect("a set shard")
            }
        }
    }

    /// Whether a handler is running on this thread right now.
    pub fn in_handler(&self) -> bool {
        self.active.load(Relaxed)
    }

    /// Raise or lower `active` (for `crate::returning`, with the same fences as `pre`).
    pub(crate) fn set_active(&self, on: bool) {
        self.active.store(on, Relaxed);
    }

    /// Number of deferred steps waiting for [`Dispatcher::post`].
    #[inline]
    pub fn pending(&self) -> usize {
        usize::from(self.depth.load(Relaxed))
    }

    /// Address of the innermost deferred step, if any.
    pub fn pending_addr(&self) -> Option<u64> {
        self.top().and_then(|f| f.key.get()).map(|k| k.addr)
    }

    /// The innermost frame, if it holds a step: a frame that is being pushed or popped by
    /// a dispatch this one interrupted is not `ready`, and is not this dispatch's.
    fn top(&self) -> Option<&Frame> {
        let d = self.pending().checked_sub(1)?;
        let f = &self.frames[d];
        if !f.ready.load(Relaxed) {
            return None;
        }
        // The frame was complete before `ready` was set (`push`).
        signal_fence();
        Some(f)
    }

    /// Keep a step's read section in the next frame. Gives it back if all are taken.
    fn push(&self, key: Key, token: ReadToken) -> Result<(), ReadToken> {
        let d = self.pending();
        if d == MAX_PENDING {
            return Err(token);
        }
        // Reserve the frame before writing it: a signal from here on pushes above it.
        self.depth.store(d as u8 + 1, Relaxed);
        signal_fence();
        let f = &self.frames[d];
        f.key.set(Some(key));
        // Empty (frames at `depth` and above are), so `set` drops nothing.
        f.token.set(Some(token));
        signal_fence();
        f.ready.store(true, Relaxed);
        Ok(())
    }

    /// Take the innermost frame if it is `domain`'s step at `addr`.
    fn take(&self, domain: *const Domain, addr: u64) -> Option<(*const (), ReadToken)> {
        let f = self.top()?;
        let key = f.key.get()?;
        if !std::ptr::eq(key.domain, domain) || key.addr != addr {
            return None;
        }
        self.pop(f).map(|t| (key.site, t))
    }

    /// Empty the top frame `f` and release it.
    fn pop(&self, f: &Frame) -> Option<ReadToken> {
        // Not ready before it is touched: a signal from here on ignores it, and pushes
        // above it until `depth` is lowered.
        f.ready.store(false, Relaxed);
        signal_fence();
        let token = f.token.take();
        f.key.set(None);
        signal_fence();
        self.depth.store(self.depth.load(Relaxed) - 1, Relaxed);
        token
    }

    /// Give this thread a return stack of `words` words (allocated here: thread context,
    /// outside any dispatch on it), unless it has one. Without one, every return a hit
    /// of this thread would arm is lost. [`crate::backend::DEFAULT_RETURN_WORDS`] holds
    /// more than 4,000 calls in flight; [`crate::backend::return_frame_words`] says what
    /// one call takes.
    pub fn reserve_returns(&self, words: usize) {
        self.returns.reserve(words);
    }

    /// Use `words` words at `ptr` as this thread's return stack, unless it has one
    /// (then `false`, and the caller keeps its memory). Async-signal-safe: for a backend
    /// that must provide it inside a signal handler (memory it mapped there).
    ///
    /// # Safety
    /// `ptr` is valid for reads and writes of `words` aligned `u64`s, used by nothing
    /// else until this `ThreadState` is dropped (the caller frees it after).
    pub unsafe fn lend_returns(&self, ptr: *mut u64, words: usize) -> bool {
        // SAFETY: the caller's contract is `lend`'s.
        unsafe { self.returns.lend(ptr, words) }
    }

    /// Whether this thread has a return stack.
    pub fn has_return_stack(&self) -> bool {
        self.returns.has_storage()
    }

    /// Where this thread's returns go: the backend's return trampoline, swapped into a
    /// call's return slot at its entry (0: none, returns are lost). The backend sets it
    /// before dispatching hits that may arm returns.
    pub fn set_return_trampoline(&self, addr: u64) {
        self.returns.set_trampoline(addr);
    }

    /// The return trampoline set for this thread (0: none).
    pub fn return_trampoline(&self) -> u64 {
        self.returns.trampoline()
    }

    /// Calls in flight whose returns are awaited.
    pub fn returns_in_flight(&self) -> usize {
        self.returns.depth()
    }

    /// The calls in flight whose return slot got the trampoline address at their entry
    /// (and was not restored since): `(slot, original return address)`, innermost
    /// first. Thread context (it allocates): for a tracer that must put them back in a
    /// copy of the memory (a fork child).
    pub fn return_slots(&self) -> Vec<(u64, u64)> {
        self.returns
            .frames()
            .filter(|f| !f.unhijacked)
            .map(|f| (f.sp, f.ret))
            .collect()
    }

    /// Put the original return address back into every slot of this thread's calls in
    /// flight that holds the trampoline (before an unwinder walks the stack, or when a
    /// tracer leaves); the calls are still awaited, and [`ThreadState::rehijack_returns`]
    /// undoes it. Returns how many slots were restored. Call it on the thread itself
    /// (from a handler), or while it is stopped.
    pub fn restore_return_addresses(&self, mem: &dyn Memory) -> usize {
        self.returns.unhijack(mem)
    }

    /// Swap the trampoline back into the slots [`ThreadState::restore_return_addresses`]
    /// restored, for the calls still live: those whose slot lies above `sp` (a C++
    /// exception caught with the stack at `sp`: the calls it skipped lie below) and still
    /// holds the original address. Returns how many.
    pub fn rehijack_returns(&self, sp: u64, mem: &dyn Memory) -> usize {
        self.returns.rehijack(sp, mem)
    }

    /// Forget every call in flight without counting anything (the thread's memory is
    /// gone: an exec, a process that exited).
    pub fn forget_returns(&self) {
        self.returns.clear();
    }

    /// A thread at the return trampoline with `rsp` (after the `ret`) whose call no
    /// registry claims (its registry is gone): drop its frame (and the dead ones above
    /// it) and return the original return address, running nothing.
    pub fn pop_return(&self, rsp: u64) -> Option<u64> {
        let f = self.returns.returning(rsp)?;
        // Only its own frame: the ones above it may be live on another stack.
        self.returns.take(&f);
        Some(f.ret)
    }

    /// End every deferred step without running its post-handlers: for a thread that
    /// exited or was moved out of an out-of-line slot. Unregistering waits for deferred
    /// steps, so a backend must call this for threads that will never come back.
    pub fn abandon(&self) {
        while let Some(d) = self.pending().checked_sub(1) {
            // Dropping the token leaves its section: a table (and its domain) is not
            // dropped while read sections are open (`Domain::close`).
            drop(self.pop(&self.frames[d]));
        }
    }
}

impl Drop for ThreadState {
    fn drop(&mut self) {
        self.abandon();
        if let Some(s) = Shard::from_bits(self.shard.load(Relaxed)) {
            shard::release(s);
        }
    }
}

/// A backend's handle on the table: the dispatch entry points. Cheap to clone.
pub struct Dispatcher<S> {
    pub(crate) table: Arc<Table<S>>,
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

/// What a backend's step did with the displaced instruction
/// ([`Dispatcher::pre_step_post`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ran {
    /// Executed it (emulated): the post-handlers may run now.
    Here,
    /// It executes out of line once dispatch returns; `back`: a copy that brings the
    /// thread back for the post-handlers.
    OutOfLine {
        /// The copy comes back for the post-handlers.
        back: bool,
    },
}

/// What [`Dispatcher::pre_step_post`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stepped {
    /// No probe is registered at this address (as [`PreOutcome::NotOurs`]).
    NotOurs,
    /// A pre-handler redirected the thread: resume at `regs.rip`.
    Redirect,
    /// The instruction was executed by the backend's step, and the post-handlers ran.
    Done,
    /// The backend executes the instruction now. `deferred`: the post-handlers wait
    /// for [`Dispatcher::post`] (as after [`Step::defer_post`] returned true);
    /// otherwise nothing is left to do for the hit.
    OutOfLine {
        /// The step was deferred.
        deferred: bool,
    },
}

/// A hit whose displaced instruction must now execute. Holds the read section that
/// keeps the site's backend data alive; dropping it ends the section.
pub struct Step<'t, S> {
    ts: &'t ThreadState,
    table: &'t Table<S>,
    /// The read section: dropping the step leaves it, `defer_post` moves it into `ts`.
    token: ReadToken,
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
        // SAFETY: the step owns the read section (`token`) that keeps the view alive.
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
    /// [`Dispatcher::fault`] or [`ThreadState::abandon`]. Returns whether it did: false
    /// if no post-handler wants to run (the section just ends), or if the thread state
    /// has no room left — which `pre` only offers a post with, but two steps alive at
    /// once on one thread state can both be offered the last place: then the section
    /// ends too and the post-handlers count the post as missed. On `false`, run the
    /// instruction without coming back (the jump-back slot).
    pub fn defer_post(self) -> bool {
        if !self.post {
            return false;
        }
        let key = Key {
            domain: self.token.domain(),
            site: self.site.cast(),
            addr: self.addr(),
        };
        let Step {
            ts,
            table,
            token,
            site,
            ..
        } = self;
        match ts.push(key, token) {
            Ok(()) => true,
            Err(token) => {
                // SAFETY: `token` still holds the section that keeps the view alive; it
                // is dropped (the section left) only after the last use below.
                let view = unsafe { &*site };
                let shard = ts.shard();
                for h in view.hot.iter().filter(|h| h.has_post && live(table, h)) {
                    h.counters().missed(shard);
                }
                drop(token);
                false
            }
        }
    }
}

/// The pre walk while removals are in flight (`crate::removal`) or at a site whose
/// handlers have return hooks: as the usual one in [`Dispatcher::pre`], but the handlers
/// whose removal was requested are skipped as not reached, and the returns are armed
/// (`crate::returning`). Out of line and cold, so `pre` keeps one tight loop. Whether a
/// handler redirected.
#[cold]
#[inline(never)]
fn walk_general<S>(
    table: &Table<S>,
    site: &SiteView<S>,
    hit: &mut Hit<'_>,
    shard: Shard,
    ts: &ThreadState,
) -> bool {
    let addr = site.addr();
    let gate = table.removals.gate_open();
    let mut arming = (site.rets > 0).then(|| Arming::begin(ts, table, site, hit, shard));
    let mut walk = site.hot.iter();
    let mut redirected = false;
    while let Some(h) = walk.next() {
        if gate && h.removal_requested() {
            // Gone but for the bookkeeping: not called, not a hit of it.
            h.counters().skipped(shard);
            continue;
        }
        hit.set_handler(h.id);
        let data = match (&mut arming, h.has_ret) {
            (Some(a), true) => a.data(),
            _ => std::ptr::null_mut(),
        };
        // SAFETY: `data` is null, the arming's scratch, or a fresh record above the
        // return stack's top; none is touched by anyone else during this handler's call
        // (nested dispatches on this thread run no handler and leave the stack alone).
        unsafe { hit.set_call_data(data) };
        let mut redirect = false;
        let mut keep = h.has_ret;
        match catch_unwind(AssertUnwindSafe(|| h.handler().pre(hit))) {
            Ok(PreAction::Continue) => {}
            Ok(answer) => {
                keep &= answer != PreAction::Remove;
                redirect = unusual_answer(h.entry(), answer);
            }
            Err(payload) => {
                // A pre-hook that panicked left its call data half written: no return.
                keep = false;
                report_panic(h.counters(), shard, payload);
            }
        }
        if let (Some(a), true) = (&mut arming, keep && !hit.skipped_return()) {
            a.keep(h, shard);
        }
        if redirect || hit.rip_moved(addr) {
            for later in walk {
                later.counters().skipped(shard);
            }
            redirected = true;
            break;
        }
    }
    // SAFETY: null.
    unsafe { hit.set_call_data(std::ptr::null_mut()) };
    if let Some(a) = arming {
        a.finish(site, redirected, hit, shard);
    }
    redirected
}

/// A pre-handler answered other than `Continue`: whether it redirects. (It takes just
/// the entry — which knows its table's requests — so the walk keeps no more live than it
/// did before removals existed.)
#[cold]
#[inline(never)]
fn unusual_answer(entry: *const HandlerEntry, answer: PreAction) -> bool {
    match answer {
        PreAction::Continue => false,
        PreAction::Redirect => true,
        PreAction::Remove => {
            // SAFETY: `entry` is a `Hot`'s, reached through a view of its table inside
            // the caller's read section, and the view holds the entry.
            unsafe { Mark::request(entry) };
            false
        }
    }
}

/// Whether `h` may still be called or counted: its removal was not requested
/// (`crate::removal`). For the walks off the hot path; the pre walk loads the gate once.
#[inline]
fn live<S>(table: &Table<S>, h: &Hot) -> bool {
    !(table.removals.gate_open() && h.removal_requested())
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
    #[inline(always)]
    pub fn pre<'t>(
        &'t self,
        ts: &'t ThreadState,
        addr: u64,
        tid: u32,
        regs: &mut impl RegisterFile,
        mem: &dyn Memory,
    ) -> PreOutcome<'t, S> {
        let shard = ts.shard();
        let token = self.table.domain.enter(shard);
        // SAFETY: inside the read section opened above; `Step` keeps it open for as long
        // as it hands out the view.
        let Some(site) = (unsafe { self.table.lookup(addr) }) else {
            drop(token);
            return PreOutcome::NotOurs;
        };
        let table = &*self.table;
        let step = |token, post| {
            PreOutcome::Step(Step {
                ts,
                table,
                token,
                site,
                post,
            })
        };
        if ts.active.load(Relaxed) {
            // Rule 6: a handler hit a probe. Nobody runs; the instruction still does.
            // (Atomic counts only: we may have interrupted the walk's plain bumps.)
            for h in site.hot.iter().filter(|h| live(table, h)) {
                h.counters().missed(shard);
            }
            return step(token, false);
        }
        ts.active.store(true, Relaxed);
        // `active` is set before the walk's plain bumps of this thread's shard (the walk
        // counter, skips) and cleared after the last. A signal landing between a bump's
        // load and its store finds it set and counts nothing with a plain store, so the
        // store loses no bump of its; a signal landing anywhere else finds no bump of
        // ours half done. The fence keeps the compiler from moving a bump across the flag.
        signal_fence();
        // One count for the whole walk: each handler's hits are derived from it
        // (`crate::tally`), so a handler costs its call and little more.
        site.walk_counter.hit(shard);
        let mut hit = Hit::new(addr, tid, HandlerId(0), regs, mem);
        // Handlers whose removal was requested are skipped (`crate::removal`); their flags
        // are looked at only while some request is in flight in this table, in a loop of
        // its own, so the usual walk pays nothing per handler for them. A request made
        // during this walk by another handler takes effect from the next hit.
        let mut redirect = false;
        if table.removals.gate_open() || site.rets > 0 {
            redirect = walk_general(table, site, &mut hit, shard, ts);
        } else {
            // The usual walk. Written out here, not shared with the other through a
            // generic function: inlined from one, LLVM walked by pointer and count, an
            // instruction more per handler (checked with callgrind on `hit_loop`).
            let mut walk = site.hot.iter();
            while let Some(h) = walk.next() {
                hit.set_handler(h.id);
                match catch_unwind(AssertUnwindSafe(|| h.handler().pre(&mut hit))) {
                    Ok(PreAction::Continue) => {}
                    Ok(answer) => redirect = unusual_answer(h.entry(), answer),
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
        }
        // The other half of the fence above: every plain bump of the walk is done.
        signal_fence();
        ts.active.store(false, Relaxed);
        if redirect {
            drop(token);
            return PreOutcome::Redirect;
        }
        let mut post = site.any_post;
        if post && ts.pending() == MAX_PENDING {
            post = false;
            for h in site.hot.iter().filter(|h| h.has_post && live(table, h)) {
                h.counters().missed(shard);
            }
        }
        step(token, post)
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
        // it is dropped below.
        let site = unsafe { &*site };
        self.post_walk(ts, site, token.shard(), addr, tid, regs, mem);
        drop(token);
        true
    }

    /// The post-handlers of `site`'s view, for a hit whose pre walk used that view (so
    /// its enabled flags are exactly those of the handlers whose pre ran). The caller
    /// holds the read section (on `shard`, this thread's) that keeps the view alive.
    #[allow(clippy::too_many_arguments)]
    #[inline(always)]
    fn post_walk(
        &self,
        ts: &ThreadState,
        site: &SiteView<S>,
        shard: Shard,
        addr: u64,
        tid: u32,
        regs: &mut impl RegisterFile,
        mem: &dyn Memory,
    ) {
        let was_active = ts.active.load(Relaxed);
        ts.active.store(true, Relaxed);
        // Handlers run with `active` set (rule 6 for the probes they hit).
        signal_fence();
        let mut hit = Hit::new(addr, tid, HandlerId(0), regs, mem);
        // The removal gate once for the walk, as the pre walk loads it: a removal
        // requested during the walk takes effect from the next hit.
        let gate = self.table.removals.gate_open();
        for h in site
            .hot
            .iter()
            .filter(|h| h.has_post && !(gate && h.removal_requested()))
        {
            hit.set_handler(h.id);
            if let Err(payload) = catch_unwind(AssertUnwindSafe(|| h.handler().post(&mut hit))) {
                report_panic(h.counters(), shard, payload);
            }
        }
        signal_fence();
        ts.active.store(was_active, Relaxed);
    }

    /// [`Dispatcher::pre`], the displaced instruction and [`Dispatcher::post`] in one
    /// call and one read section, for a backend that executes the instruction itself
    /// where it can (by emulating it): then the post-handlers run right after it, with
    /// nothing deferred into the thread state and the site looked up once.
    ///
    /// After the pre-handlers, unless they redirected, `step(site, regs, wants_post)`
    /// runs with the registers as they left them and says what became of the
    /// instruction: [`Ran::Here`] (executed; `regs` hold the state after it), and the
    /// post-handlers of the handlers whose pre ran are called at once, with `regs.rip`
    /// wherever the instruction went ([`Stepped::Done`]); or [`Ran::OutOfLine`] (the
    /// backend executes it after this call returns), and if the backend will come back
    /// for the post-handlers and some want to run, the step is deferred as by
    /// [`Step::defer_post`] ([`Stepped::OutOfLine`] says whether it was: then call
    /// [`Dispatcher::post`] after the instruction). Contract rules 2 and 6 hold as for
    /// the separate calls; `step` runs outside any handler (a probe it hits is
    /// dispatched as usual) and inside the read section, so it must not wait for a
    /// grace period.
    #[inline(always)]
    pub fn pre_step_post<R: RegisterFile>(
        &self,
        ts: &ThreadState,
        addr: u64,
        tid: u32,
        regs: &mut R,
        mem: &dyn Memory,
        step: impl FnOnce(&S, &mut R, bool) -> Ran,
    ) -> Stepped {
        let s = match self.pre(ts, addr, tid, regs, mem) {
            PreOutcome::NotOurs => return Stepped::NotOurs,
            PreOutcome::Redirect => return Stepped::Redirect,
            PreOutcome::Step(s) => s,
        };
        match step(s.site(), regs, s.post) {
            Ran::Here => {
                if s.post {
                    self.post_walk(ts, s.view(), s.token.shard(), addr, tid, regs, mem);
                }
                // Leaves the read section.
                drop(s);
                Stepped::Done
            }
            Ran::OutOfLine { back } => Stepped::OutOfLine {
                // Leaves the read section unless the step is deferred.
                deferred: back && s.defer_post(),
            },
        }
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
        let shard = ts.shard();
        let (site, token) = match self.take_pending(ts, addr) {
            Some(p) => p,
            None => {
                let token = self.table.domain.enter(shard);
                // SAFETY: inside the read section just opened, left below.
                match unsafe { self.table.lookup(addr) } {
                    Some(site) => (site as *const SiteView<S>, token),
                    None => return FaultAction::NotHandled,
                }
            }
        };
        // SAFETY: `token` holds the read section that keeps the view alive until it is
        // dropped below.
        let site = unsafe { &*site };
        let mut action = FaultAction::NotHandled;
        if !ts.active.load(Relaxed) {
            ts.active.store(true, Relaxed);
            // Handlers run with `active` set (rule 6 for the probes they hit).
            signal_fence();
            let mut hit = Hit::new(addr, tid, HandlerId(0), regs, mem);
            let table = &*self.table;
            for h in site.hot.iter().filter(|h| live(table, h)) {
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
            signal_fence();
            ts.active.store(false, Relaxed);
        }
        drop(token);
        action
    }

    fn take_pending(&self, ts: &ThreadState, addr: u64) -> Option<(*const SiteView<S>, ReadToken)> {
        let (site, token) = ts.take(&self.table.domain, addr)?;
        Some((site.cast(), token))
    }

    /// Count a hit at `addr` as missed by every enabled handler there, without running
    /// any: for a backend that takes a trap it cannot dispatch (it interrupted the
    /// backend's own trap path, say). Returns whether a probe is registered at `addr`.
    pub fn miss(&self, ts: &ThreadState, addr: u64) -> bool {
        let shard = ts.shard();
        let token = self.table.domain.enter(shard);
        // SAFETY: inside the read section, left below after the last use.
        let found = match unsafe { self.table.lookup(addr) } {
            Some(site) => {
                for h in site.hot.iter().filter(|h| live(&self.table, h)) {
                    h.counters().missed(shard);
                }
                true
            }
            None => false,
        };
        drop(token);
        found
    }

    /// Whether handlers asked to be removed ([`PreAction::Remove`], or an unregister from
    /// inside a handler of a backend that dispatches in signal handlers) and the
    /// bookkeeping waits for [`Dispatcher::collect`] or the next registry operation.
    /// Async-signal-safe (one load): a backend that dispatches in signal handlers checks
    /// it after a hit to wake whatever collects in thread context.
    pub fn removals_pending(&self) -> bool {
        self.table.removals.pending()
    }

    /// Finish the bookkeeping of the removals requested so far, as the next registry
    /// operation would: the registry forgets those handlers, and a site left without an
    /// enabled handler is disarmed (rule 1). **Thread context only** (it takes the
    /// registry's lock and frees); a no-op if the registry is gone. Unless this thread
    /// holds a read section itself, it then waits for the grace period of what it
    /// unlinked, after which hits no longer even look at the removed handlers. Returns
    /// whether there was anything to do.
    pub fn collect(&self) -> bool {
        if !self.removals_pending() {
            return false;
        }
        let Some(stamp) = self.table.collector.collect() else {
            return false;
        };
        if !crate::sync::held::any() {
            // The table lives (our `Arc`) even if the registry goes meanwhile.
            self.table.domain.wait(stamp);
            self.table.collector.reclaim();
        }
        true
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
        let token = self.table.domain.enter(shard::shared());
        // SAFETY: inside the read section, left below after the last use.
        let r = unsafe { self.table.lookup(addr) }.map(|v| f(&v.shared.data));
        drop(token);
        r
    }
}
