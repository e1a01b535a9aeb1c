//! What a handler running on a simulated CPU can reach, and the trace of what
//! handlers did.
//!
//! Both live in thread-locals of the OS thread that runs the CPU, because that is
//! where handlers run (the core calls them synchronously from dispatch):
//! * the *context* — the CPU's dispatcher, `ThreadState`, memory and registry — is set
//!   by the CPU around each dispatch call, so a handler can "call probed code"
//!   ([`nested_hit`], contract rule 6) or unregister from inside a dispatch
//!   ([`unregister`], rule 3);
//! * the *trace* is appended by handlers ([`record`]) and drained by whoever checks
//!   them ([`take`]) — the reference model in the interleaved machine, per-CPU
//!   checks in the concurrent one. No lock: one trace per OS thread.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use multiprobe_core::backend::{Dispatcher, PreOutcome, ThreadState};
use multiprobe_core::{HandlerId, HandlerStats, Registry, Regs};

use crate::backend::{SimBackend, SimSite};
use crate::memory::SimMemory;

/// Which hook of a handler ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// `pre`.
    Pre,
    /// `post`.
    Post,
    /// `fault`.
    Fault,
    /// `ret` (return probes).
    Ret,
}

/// How a hook ended (what the handler decided; the core's reaction is checked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Returned normally: `Continue` from `pre`, `NotHandled` from `fault`, any `post`.
    Normal,
    /// `pre` returned `Redirect` (or moved `rip` without saying so) after executing
    /// the instruction itself: the program cannot tell.
    Redirect,
    /// `pre` skipped the instruction (`rip` past it, `Redirect`): the program changed.
    Skip,
    /// `pre` returned `Remove`: the handler asked to be removed.
    Remove,
    /// `fault` returned `Handled`.
    Handled,
    /// The hook panicked (logged just before the panic).
    Panic,
}

/// What a nested hit (a handler executing probed code) found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nested {
    /// No probe there.
    NotOurs,
    /// `pre` said to step the instruction; `post` is whether it asked for posts.
    Stepped {
        /// Post-handlers wanted (must be false: a nested hit runs no handler).
        post: bool,
    },
    /// `pre` redirected (must not happen: a nested hit runs no handler).
    Redirected,
}

/// One entry of the trace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    /// A hook started.
    Enter {
        /// The handler (as the core named it in the `Hit`).
        id: HandlerId,
        /// Which hook.
        hook: Hook,
        /// The hitting thread.
        tid: u32,
        /// The probed address.
        addr: u64,
        /// Whether the handler has a post hook (what it told the core).
        post: bool,
    },
    /// A hook hit the probe at `addr` from inside.
    Nested {
        /// The address.
        addr: u64,
        /// What happened.
        outcome: Nested,
    },
    /// A hook unregistered `target` from inside.
    Unregistered {
        /// The handler it unregistered.
        target: HandlerId,
        /// The outcome, as a comparable value.
        result: Result<HandlerStats, crate::model::ErrKind>,
    },
    /// A hook enabled or disabled `target` from inside.
    SetEnabled {
        /// The handler.
        target: HandlerId,
        /// Enabled (`true`) or disabled.
        on: bool,
        /// The outcome, as a comparable value.
        result: Result<(), crate::model::ErrKind>,
    },
    /// A pre-hook left `value` in its call data (`skipped`: and asked for no return),
    /// or a return hook got it.
    Data {
        /// The handler.
        id: HandlerId,
        /// `CallData[0]`.
        value: u64,
        /// The pre-hook called `skip_return`.
        skipped: bool,
    },
    /// A hook ended.
    Exit {
        /// The handler.
        id: HandlerId,
        /// Which hook.
        hook: Hook,
        /// How.
        ended: Ended,
    },
}

/// The context of the CPU that is dispatching on this OS thread.
pub(crate) struct Ctx {
    pub(crate) dispatcher: Dispatcher<SimSite>,
    pub(crate) ts: Rc<ThreadState>,
    pub(crate) tid: u32,
    pub(crate) mem: Arc<SimMemory>,
    pub(crate) registry: Option<Registry<SimBackend>>,
}

std::thread_local! {
    static CTX: RefCell<Option<Ctx>> = const { RefCell::new(None) };
    static TRACE: RefCell<Vec<Call>> = const { RefCell::new(Vec::new()) };
}

/// Sets the context for the guard's lifetime.
pub(crate) struct CtxGuard(());

impl CtxGuard {
    pub(crate) fn set(ctx: Ctx) -> CtxGuard {
        CTX.with(|c| *c.borrow_mut() = Some(ctx));
        CtxGuard(())
    }
}

impl Drop for CtxGuard {
    fn drop(&mut self) {
        // Take first, drop after: dropping a registry clone must not run under the borrow.
        let old = CTX.with(|c| c.borrow_mut().take());
        drop(old);
    }
}

/// Append to this OS thread's trace.
pub fn record(call: Call) {
    TRACE.with(|t| t.borrow_mut().push(call));
}

/// Take this OS thread's trace.
pub fn take() -> Vec<Call> {
    TRACE.with(|t| std::mem::take(&mut *t.borrow_mut()))
}

/// From inside a handler: the current thread executes the probed instruction at
/// `addr`, as a handler calling probed code would. The core must run no handler
/// (rule 6); the instruction's effect is not applied (it runs on scratch registers
/// and is not executed — only the dispatch is under test). `None` outside a dispatch.
pub fn nested_hit(addr: u64) -> Option<Nested> {
    CTX.with(|c| {
        let c = c.borrow();
        let ctx = c.as_ref()?;
        let mut regs = Regs {
            rip: addr,
            ..Regs::default()
        };
        let outcome = match ctx
            .dispatcher
            .pre(&ctx.ts, addr, ctx.tid, &mut regs, &*ctx.mem)
        {
            PreOutcome::NotOurs => Nested::NotOurs,
            PreOutcome::Redirect => Nested::Redirected,
            PreOutcome::Step(step) => Nested::Stepped {
                post: step.wants_post(),
            },
        };
        Some(outcome)
    })
}

/// From inside a handler: unregister `id` through the CPU's registry. `None` outside a
/// dispatch or when the CPU has no registry handle.
pub fn unregister(id: HandlerId) -> Option<multiprobe_core::Result<HandlerStats>> {
    let registry = CTX.with(|c| c.borrow().as_ref()?.registry.clone())?;
    Some(registry.unregister(id))
}

/// From inside a handler: enable or disable `id` through the CPU's registry. `None`
/// outside a dispatch or when the CPU has no registry handle.
pub fn set_enabled(id: HandlerId, on: bool) -> Option<multiprobe_core::Result<()>> {
    let registry = CTX.with(|c| c.borrow().as_ref()?.registry.clone())?;
    Some(if on {
        registry.enable(id)
    } else {
        registry.disable(id)
    })
}
