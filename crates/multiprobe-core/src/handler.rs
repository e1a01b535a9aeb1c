//! What a user attaches to an address: the [`Handler`] trait, the [`Hit`] it is given,
//! the [`CallData`] a pre-hook leaves for its return hook, and closure adapters.
//!
//! Handlers are `'static + Send + Sync` because the registry's snapshot owns them and
//! any thread may hit the probe. With an in-process backend they run inside a signal
//! handler: they must not allocate, lock or call anything that is not
//! async-signal-safe there (see the backend's documentation). With the ptrace and
//! simulator backends they run in ordinary thread context.

use std::fmt;

use crate::memory::{Memory, MemoryError};
use crate::regs::{RegisterFile, Regs};
use crate::HandlerId;

/// What a pre-handler asks the dispatcher to do next.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum PreAction {
    /// Go on: the next handler's pre, then the original instruction, then the posts.
    #[default]
    Continue,
    /// The handler changed `rip` (or wants to skip the instruction): end the walk, do not
    /// execute the original instruction, run no post-handler, resume at `regs.rip`.
    /// A pre-handler that moves `rip` without saying so is treated the same way.
    Redirect,
    /// Remove this handler, as if it were unregistered now — from any context, a signal
    /// handler included: no lock, no allocation (Linux uprobes' `UPROBE_HANDLER_REMOVE`).
    /// None of its hooks is called again: not the post- or fault-hook of this hit, not
    /// any hook of a later hit. Otherwise the walk goes on as after `Continue` (a handler
    /// that also moved `rip` redirects). The registry's bookkeeping — forgetting the
    /// handler, disarming the site if no enabled handler is left there — is finished in
    /// thread context: by the next operation on the registry, by the backend's
    /// [`crate::backend::Dispatcher::collect`] (the in-process backend has a thread for it), or
    /// when the registry is dropped. After that its id is unknown to the registry.
    Remove,
}

/// What a fault handler did about a fault in the displaced instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FaultAction {
    /// Not mine: let the next fault handler look, and in the end deliver the fault to
    /// the program as if it were not probed.
    #[default]
    NotHandled,
    /// Fixed: the handler set up `regs` (typically `rip`) so the thread can resume; the
    /// program never sees the fault.
    Handled,
}

/// Words of [`CallData`].
pub const CALL_DATA_WORDS: usize = 8;

/// What a handler's pre-hook leaves for its own return hook, per call: fixed size, kept
/// on the thread's return stack (no allocation). Zero when the pre-hook starts; the
/// pre-hook writes it through [`Hit::call_data_mut`], and [`Handler::ret`] gets it when
/// that call returns. Eight words: a timestamp and the six register arguments fit.
pub type CallData = [u64; CALL_DATA_WORDS];

/// A fault raised by the displaced instruction while it executed out of line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The signal the fault raises (`SIGSEGV`, `SIGBUS`, `SIGFPE`, ...).
    pub signal: i32,
    /// The signal's `si_code`.
    pub code: i32,
    /// The faulting data address (`si_addr`), where the signal has one.
    pub addr: u64,
}

/// One thread hitting one probe, as one handler sees it.
///
/// The registers come from the backend's [`RegisterFile`] and are fetched the first
/// time a handler of the hit asks ([`Hit::regs`], [`Hit::regs_mut`], [`Hit::arg`]);
/// later handlers of the same hit get the same copy. A handler that never asks costs
/// no fetch: with the ptrace backend that saves a `PTRACE_GETREGS` per hit, so a
/// counting handler should not touch them.
pub struct Hit<'a> {
    addr: u64,
    tid: u32,
    id: HandlerId,
    regs: Source<'a>,
    /// Some handler of this hit took the registers for changing ([`Hit::regs_mut`]):
    /// only then can `rip` have moved, so only then is it compared after each handler.
    written: bool,
    mem: &'a dyn Memory,
    /// The [`CallData`] of the handler being called, in a pre walk that arms returns
    /// (its record on the return stack, or scratch); null otherwise.
    data: *mut CallData,
    /// The handler called [`Hit::skip_return`] (reset per handler by the walk).
    skip: bool,
}

/// A hit's registers: already at hand (a plain [`Regs`], or a file fetched before the
/// walk), read directly; or still to fetch, through the file.
enum Source<'a> {
    Ready(&'a mut Regs),
    Lazy(&'a mut dyn RegisterFile),
}

impl<'a> Hit<'a> {
    #[inline]
    pub(crate) fn new(
        addr: u64,
        tid: u32,
        id: HandlerId,
        regs: &'a mut impl RegisterFile,
        mem: &'a dyn Memory,
    ) -> Self {
        // Registers at hand are read without a dynamic call per access: what makes a
        // plain `Regs` cost what it did before register files existed.
        let regs = if regs.fetched().is_some() {
            Source::Ready(regs.regs_mut())
        } else {
            Source::Lazy(regs)
        };
        Hit {
            addr,
            tid,
            id,
            regs,
            written: false,
            mem,
            data: std::ptr::null_mut(),
            skip: false,
        }
    }

    /// Point [`Hit::call_data_mut`] at `data` (null: none) for the next handler, and
    /// clear its [`Hit::skip_return`].
    ///
    /// # Safety
    /// `data` is null or valid for writes, and not otherwise accessed, until it is
    /// replaced or the hit is dropped.
    #[inline]
    pub(crate) unsafe fn set_call_data(&mut self, data: *mut CallData) {
        self.data = data;
        self.skip = false;
    }

    /// Whether the handler just called asked [`Hit::skip_return`].
    #[inline]
    pub(crate) fn skipped_return(&self) -> bool {
        self.skip
    }

    /// Point the same hit at the next handler of the walk.
    #[inline]
    pub(crate) fn set_handler(&mut self, id: HandlerId) {
        self.id = id;
    }

    /// Whether a handler moved `rip` away from `addr`. Never fetches: registers nobody
    /// took for changing cannot have changed (one flag test per handler of the walk,
    /// not a load through the register file).
    #[inline]
    pub(crate) fn rip_moved(&self, addr: u64) -> bool {
        self.written && self.fetched().is_some_and(|r| r.rip != addr)
    }

    #[inline]
    fn fetched(&self) -> Option<&Regs> {
        match &self.regs {
            Source::Ready(r) => Some(r),
            Source::Lazy(f) => f.fetched(),
        }
    }

    /// The probed address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// The OS thread id (or simulated thread number) that hit the probe.
    pub fn tid(&self) -> u32 {
        self.tid
    }

    /// The id of the handler being called.
    pub fn handler_id(&self) -> HandlerId {
        self.id
    }

    /// The thread's registers, fetched on first use (see [`Hit`]).
    #[inline]
    pub fn regs(&self) -> &Regs {
        match &self.regs {
            Source::Ready(r) => r,
            Source::Lazy(f) => f.regs(),
        }
    }

    /// The thread's registers, for changing (fetched on first use). Changes are written
    /// back to the thread.
    #[inline]
    pub fn regs_mut(&mut self) -> &mut Regs {
        self.written = true;
        match &mut self.regs {
            Source::Ready(r) => r,
            Source::Lazy(f) => f.regs_mut(),
        }
    }

    /// The target's memory.
    pub fn mem(&self) -> &dyn Memory {
        self.mem
    }

    /// End the probed call now, returning `value` to its caller: sets `rax` to `value`,
    /// pops the return address from the stack (read through [`Hit::mem`]) into `rip`,
    /// and returns [`PreAction::Redirect`] (for an [`FnHandler`] pre hook or a
    /// [`Handler::pre`] to return; a closure may drop it, since moving `rip` redirects
    /// anyway). So the function's body, the displaced instruction and the post-handlers
    /// are skipped and the thread continues at the caller as if the function had
    /// returned; the pre-handlers registered after this one do not run.
    ///
    /// Valid in a pre-handler at a function's first instruction, where `[rsp]` is the
    /// return address (System V AMD64: an integer or pointer result in `rax`). Anywhere
    /// else `[rsp]` is whatever the function pushed, and the thread jumps there. If the
    /// stack cannot be read, nothing is changed and the error is returned.
    ///
    /// ```
    /// # use multiprobe_core::{Registry, testing::TestBackend};
    /// # let registry = Registry::new(TestBackend::new());
    /// # let addr = 0x1000;
    /// // `getuid` says root, whatever the truth.
    /// let _probe = registry.register(addr, |hit| {
    ///     let _ = hit.return_now(0);
    /// })?;
    /// # Ok::<(), multiprobe_core::Error>(())
    /// ```
    pub fn return_now(&mut self, value: u64) -> Result<PreAction, MemoryError> {
        let rsp = self.regs().rsp;
        let ret = self.mem.read_u64(rsp)?;
        let regs = self.regs_mut();
        regs.rax = value;
        regs.rip = ret;
        regs.rsp = rsp.wrapping_add(8);
        Ok(PreAction::Redirect)
    }

    /// In the pre-hook of a handler with a return hook ([`Handler::has_ret`]): this
    /// call's [`CallData`], which [`Handler::ret`] gets when the call returns (zero
    /// until written). `None` anywhere else: other hooks, handlers without a return hook.
    #[inline]
    pub fn call_data_mut(&mut self) -> Option<&mut CallData> {
        // SAFETY: `data` is null or valid for the current handler's call, and `&mut self`
        // makes this the only access to it (`set_call_data`'s contract).
        unsafe { self.data.as_mut() }
    }

    /// In a pre-hook: this call's return is not wanted — the handler's return hook is
    /// not called for it, and it is counted neither as returned nor as lost (a filter
    /// that rejected the call at its entry). No effect elsewhere.
    #[inline]
    pub fn skip_return(&mut self) {
        self.skip = true;
    }

    /// The `n`-th integer argument (0-based) under the System V AMD64 convention,
    /// valid at a function's first instruction: registers for the first six, then the
    /// stack above the return address. Fetches the registers (see [`Hit`]).
    #[inline]
    pub fn arg(&self, n: usize) -> Result<u64, MemoryError> {
        let regs = self.regs();
        match regs.arg(n) {
            Some(v) => Ok(v),
            None => {
                let slot = regs.rsp + 8 + 8 * (n as u64 - 6);
                self.mem.read_u64(slot)
            }
        }
    }
}

impl fmt::Debug for Hit<'_> {
    /// Shows the registers only if they were fetched already: formatting a hit does
    /// not fetch them.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut d = f.debug_struct("Hit");
        d.field("addr", &format_args!("{:#x}", self.addr))
            .field("tid", &self.tid)
            .field("handler", &self.id);
        match self.fetched() {
            Some(r) => d.field("regs", r),
            None => d.field("regs", &format_args!("(not fetched)")),
        };
        d.finish_non_exhaustive()
    }
}

/// A probe handler. Every method has a default that does nothing, so implement only
/// what you need — but a type that implements [`Handler::post`] must also return
/// `true` from [`Handler::has_post`]: that is what tells the backend to come back after
/// the original instruction (otherwise a hit costs one trap, not two); and one that
/// implements [`Handler::ret`] must return `true` from [`Handler::has_ret`].
pub trait Handler: Send + Sync + 'static {
    /// Runs before the original instruction, with `regs.rip == hit.addr()`.
    fn pre(&self, hit: &mut Hit<'_>) -> PreAction {
        let _ = hit;
        PreAction::Continue
    }

    /// Runs after the original instruction executed, if this handler's `pre` ran for
    /// the same hit and no pre-handler redirected. `regs.rip` is the next instruction.
    fn post(&self, hit: &mut Hit<'_>) {
        let _ = hit;
    }

    /// Runs when the original instruction faulted while executing out of line, with
    /// `regs.rip` at the probed address.
    fn fault(&self, hit: &mut Hit<'_>, fault: &Fault) -> FaultAction {
        let _ = (hit, fault);
        FaultAction::NotHandled
    }

    /// Whether [`Handler::post`] does anything. Read once, at registration.
    fn has_post(&self) -> bool {
        false
    }

    /// Runs when a call whose entry ran this handler's `pre` returns (contract rule 10):
    /// `regs.rax` (and `rdx`) hold the return value, `regs.rip` is where the call
    /// returns to, `regs.rsp` the stack pointer after the return; `data` is what `pre`
    /// left in [`Hit::call_data_mut`]. Changes to the registers are written back (a
    /// handler may change the return value). [`Hit::addr`] is the probed function.
    fn ret(&self, hit: &mut Hit<'_>, data: &CallData) {
        let _ = (hit, data);
    }

    /// Whether [`Handler::ret`] does anything. Read once, at registration: then the
    /// address must be a function's first instruction (the backend checks), and each
    /// hit whose `pre` ran swaps the call's return address for the backend's return
    /// trampoline.
    fn has_ret(&self) -> bool {
        false
    }

    /// The handler as a value a backend may recognise ([`std::any::Any`]), or `None`
    /// (the default: an opaque handler). A backend that can run some handler types
    /// itself, without dispatching to them (code generated into a traced process, say),
    /// downcasts what this returns at [`crate::backend::Backend::handlers_changed`];
    /// the core never looks at it.
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        None
    }
}

/// Any `Fn(&mut Hit)` is a pre-handler (what [`crate::Registry::register`] takes). It
/// redirects by moving `rip` ([`Hit::return_now`] does); otherwise the walk goes on.
impl<F> Handler for F
where
    F: Fn(&mut Hit<'_>) + Send + Sync + 'static,
{
    #[inline]
    fn pre(&self, hit: &mut Hit<'_>) -> PreAction {
        self(hit);
        PreAction::Continue
    }
}

/// The pre hook of an [`FnHandler`]: a closure returning [`PreAction`], or [`NoHook`].
pub trait PreHook: Send + Sync + 'static {
    #[doc(hidden)]
    fn call(&self, hit: &mut Hit<'_>) -> PreAction;
}
/// The post hook of an [`FnHandler`]: a closure, or [`NoHook`].
pub trait PostHook: Send + Sync + 'static {
    #[doc(hidden)]
    const PRESENT: bool;
    #[doc(hidden)]
    fn call(&self, hit: &mut Hit<'_>);
}
/// The fault hook of an [`FnHandler`]: a closure returning [`FaultAction`], or [`NoHook`].
pub trait FaultHook: Send + Sync + 'static {
    #[doc(hidden)]
    fn call(&self, hit: &mut Hit<'_>, fault: &Fault) -> FaultAction;
}
/// The return hook of an [`FnHandler`]: a closure taking the call's [`CallData`], or
/// [`NoHook`].
pub trait RetHook: Send + Sync + 'static {
    #[doc(hidden)]
    const PRESENT: bool;
    #[doc(hidden)]
    fn call(&self, hit: &mut Hit<'_>, data: &CallData);
}

/// An absent hook.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoHook;

impl PreHook for NoHook {
    fn call(&self, _: &mut Hit<'_>) -> PreAction {
        PreAction::Continue
    }
}
impl PostHook for NoHook {
    const PRESENT: bool = false;
    fn call(&self, _: &mut Hit<'_>) {}
}
impl FaultHook for NoHook {
    fn call(&self, _: &mut Hit<'_>, _: &Fault) -> FaultAction {
        FaultAction::NotHandled
    }
}
impl RetHook for NoHook {
    const PRESENT: bool = false;
    fn call(&self, _: &mut Hit<'_>, _: &CallData) {}
}
impl<F: Fn(&mut Hit<'_>) -> PreAction + Send + Sync + 'static> PreHook for F {
    fn call(&self, hit: &mut Hit<'_>) -> PreAction {
        self(hit)
    }
}
impl<F: Fn(&mut Hit<'_>) + Send + Sync + 'static> PostHook for F {
    const PRESENT: bool = true;
    fn call(&self, hit: &mut Hit<'_>) {
        self(hit)
    }
}
impl<F: Fn(&mut Hit<'_>, &Fault) -> FaultAction + Send + Sync + 'static> FaultHook for F {
    fn call(&self, hit: &mut Hit<'_>, fault: &Fault) -> FaultAction {
        self(hit, fault)
    }
}
impl<F: Fn(&mut Hit<'_>, &CallData) + Send + Sync + 'static> RetHook for F {
    const PRESENT: bool = true;
    fn call(&self, hit: &mut Hit<'_>, data: &CallData) {
        self(hit, data)
    }
}

/// A handler assembled from closures, without a trait impl:
///
/// ```
/// use multiprobe_core::{FnHandler, PreAction};
/// let h = FnHandler::new()
///     .pre(|hit| { let _ = hit.regs().rdi; PreAction::Continue })
///     .post(|hit| { let _ = hit.regs().rip; });
/// // Entry and return of the same call: the pre leaves the argument for the return.
/// let pair = FnHandler::new()
///     .pre(|hit| {
///         let arg = hit.regs().rdi;
///         if let Some(d) = hit.call_data_mut() {
///             d[0] = arg;
///         }
///         PreAction::Continue
///     })
///     .ret(|hit, data| { let (_arg, _value) = (data[0], hit.regs().rax); });
/// # let _ = (h, pair);
/// ```
///
/// Each hook is a type parameter, so calling one costs a direct call, not a second
/// dynamic dispatch.
#[derive(Clone, Copy, Default)]
pub struct FnHandler<P = NoHook, Q = NoHook, F = NoHook, R = NoHook> {
    pre: P,
    post: Q,
    fault: F,
    ret: R,
}

impl FnHandler {
    /// A handler with no hooks yet.
    pub fn new() -> Self {
        FnHandler {
            pre: NoHook,
            post: NoHook,
            fault: NoHook,
            ret: NoHook,
        }
    }
}

impl<P, Q, F, R> FnHandler<P, Q, F, R> {
    /// Set the pre hook.
    pub fn pre<P2>(self, pre: P2) -> FnHandler<P2, Q, F, R>
    where
        P2: Fn(&mut Hit<'_>) -> PreAction + Send + Sync + 'static,
    {
        FnHandler {
            pre,
            post: self.post,
            fault: self.fault,
            ret: self.ret,
        }
    }

    /// Set the post hook.
    pub fn post<Q2>(self, post: Q2) -> FnHandler<P, Q2, F, R>
    where
        Q2: Fn(&mut Hit<'_>) + Send + Sync + 'static,
    {
        FnHandler {
            pre: self.pre,
            post,
            fault: self.fault,
            ret: self.ret,
        }
    }

    /// Set the fault hook.
    pub fn fault<F2>(self, fault: F2) -> FnHandler<P, Q, F2, R>
    where
        F2: Fn(&mut Hit<'_>, &Fault) -> FaultAction + Send + Sync + 'static,
    {
        FnHandler {
            pre: self.pre,
            post: self.post,
            fault,
            ret: self.ret,
        }
    }

    /// Set the return hook ([`Handler::ret`]): the probe must then be at a function's
    /// first instruction.
    pub fn ret<R2>(self, ret: R2) -> FnHandler<P, Q, F, R2>
    where
        R2: Fn(&mut Hit<'_>, &CallData) + Send + Sync + 'static,
    {
        FnHandler {
            pre: self.pre,
            post: self.post,
            fault: self.fault,
            ret,
        }
    }
}

impl<P: PreHook, Q: PostHook, F: FaultHook, R: RetHook> Handler for FnHandler<P, Q, F, R> {
    fn pre(&self, hit: &mut Hit<'_>) -> PreAction {
        self.pre.call(hit)
    }
    fn post(&self, hit: &mut Hit<'_>) {
        self.post.call(hit)
    }
    fn fault(&self, hit: &mut Hit<'_>, fault: &Fault) -> FaultAction {
        self.fault.call(hit, fault)
    }
    fn has_post(&self) -> bool {
        Q::PRESENT
    }
    fn ret(&self, hit: &mut Hit<'_>, data: &CallData) {
        self.ret.call(hit, data)
    }
    fn has_ret(&self) -> bool {
        R::PRESENT
    }
}

impl<P, Q, F, R> fmt::Debug for FnHandler<P, Q, F, R> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FnHandler").finish_non_exhaustive()
    }
}
