//! Many independent handlers on one machine-code address, with one real breakpoint
//! underneath: armed when the first handler arrives, removed when the last one leaves.
//!
//! # Quick start
//!
//! A [`Registry`] over a backend (which puts the breakpoints in: this process, another
//! one, a simulator) takes handlers per address. Here the crate's own
//! [`testing::TestBackend`] stands in for a real one, so the example runs anywhere:
//!
//! ```
//! use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
//! use std::sync::Arc;
//!
//! use multiprobe_core::{FnHandler, PreAction, Registry, Regs};
//!
//! let registry = Registry::new(multiprobe_core::testing::TestBackend::new());
//! let addr = 0x40_1000; // with a real backend: a function's entry, say
//!
//! // A closure is a pre-handler: it runs before the instruction at `addr`.
//! let calls = Arc::new(AtomicU64::new(0));
//! let c = Arc::clone(&calls);
//! let counter = registry.register(addr, move |_hit| {
//!     c.fetch_add(1, Relaxed);
//! })?;
//!
//! // A second, independent handler on the same breakpoint, with a post-handler too
//! // (it runs after the probed instruction executed).
//! let first_args = Arc::new(AtomicU64::new(0));
//! let a = Arc::clone(&first_args);
//! let args = registry.register_handler(
//!     addr,
//!     FnHandler::new()
//!         .pre(move |hit| {
//!             a.fetch_add(hit.arg(0).unwrap_or(0), Relaxed);
//!             PreAction::Continue
//!         })
//!         .post(|hit| assert_ne!(hit.regs().rip, hit.addr())),
//! )?;
//! assert_eq!(registry.site(addr).unwrap().handlers, 2);
//!
//! // A thread hits the breakpoint with 7 in its first argument register (what a real
//! // backend's trap handler does; the test backend lets us do it by hand).
//! let thread = multiprobe_core::backend::ThreadState::new();
//! let mut regs = Regs { rdi: 7, ..Regs::default() };
//! registry.backend().hit(&thread, 1, addr, &mut regs);
//! assert_eq!(calls.load(Relaxed), 1);
//! assert_eq!(first_args.load(Relaxed), 7);
//! assert_eq!(counter.stats()?.hits, 1);
//!
//! args.unregister()?; // waits until no hit can still be running it
//! drop(counter); // unregisters without waiting; the last one out disarms
//! assert!(registry.is_empty());
//! # Ok::<(), multiprobe_core::Error>(())
//! ```
//!
//! With a real backend only the registry and the address change: in this process,
//! `multiprobe_backend_sigtrap::registry()` and an address from its `fn_addr(f)` or
//! `resolve("libc:getppid")`; in another process, `multiprobe_backend_ptrace::Tracer`
//! (`tracer.registry()`, `tracer.resolve("main")`). A handler may also end the probed
//! call with a value of its own ([`Hit::return_now`]).
//!
//! This crate is the backend-independent core: the [`Registry`], the lock-free,
//! async-signal-safe dispatch backends call when a thread hits a breakpoint, the
//! [`Handler`] API and statistics. Backends implement [`backend::Backend`]; what they
//! need is in [`backend`], out of a user's way.
//!
//! # The contract
//!
//! 1. **Aggregation.** Any number of handlers may share an address; the first arms the
//!    breakpoint, the last to leave disarms it and restores the original bytes. An
//!    [`Options::exclusive`] registration conflicts with any other, both ways.
//! 2. **Order.** Enabled pre-handlers run in registration order (Linux kprobes runs the
//!    newest first; ours is deliberate). Then the original instruction executes once,
//!    then the post-handlers of the handlers whose pre ran. A pre-handler that moves
//!    `rip` (or returns [`PreAction::Redirect`]) ends the walk; the instruction and all
//!    post-handlers are skipped.
//! 3. **Quiescence.** When [`Registry::unregister`] returns, the handler never runs
//!    again and the hot path references nothing of it. From inside a handler it returns
//!    [`Error::InsideDispatch`] instead of deadlocking (hits that begin afterwards do not
//!    run the handler). Dropping a [`Registration`] unregisters without waiting; handlers
//!    are owned by the table, so that is safe. A handler removes *itself*, from any
//!    context, with [`PreAction::Remove`]. Dropping the last handle on a registry (every
//!    `Registry` clone and every `Registration`, which holds one) disarms every site,
//!    restoring the original bytes, before the drop returns.
//! 4. **Visibility.** A hit that begins after `register` returned runs the new handler.
//! 5. **The hot path never blocks**: no lock, allocation, free or system call, so it can
//!    run in a signal handler that interrupted anything, the registry's writer included.
//!    (What a backend adds around it is its own: see below.)
//! 6. **Reentrancy.** A hit on a thread that is already running a handler runs nothing;
//!    it counts as `missed` and the instruction still executes.
//! 7. **Transparency.** Besides what handlers change, the program behaves as unprobed;
//!    a faulting probed instruction faults as it would have, after the fault handlers.
//! 8. **Handlers are untrusted.** Panics are caught and counted.
//! 9. **Stats.** Per handler hits/missed/panics, per address hits, readable any time.
//! 10. **Returns.** A handler with a return hook ([`Handler::ret`], [`FnHandler::ret`])
//!     pairs a call's entry with its return. It must be registered at a function's first
//!     instruction, where `[rsp]` is the return address; the backend checks, and
//!     anywhere else registration fails with [`Error::NotFunctionEntry`] (nothing armed).
//!     At a hit whose walk ran its pre-hook (which may leave [`CallData`] for the return
//!     hook: [`Hit::call_data_mut`]), the call's return address is swapped for the
//!     backend's return trampoline and kept on the thread's return stack; when the call
//!     returns, the return hook runs with the registers then (`rax`: the return value,
//!     `rip`: where the call returns to) and that data, and the thread continues at the
//!     original return address.
//!     * *Order*: the return hooks of one call run in registration order; a call's
//!       return comes after the returns of every call it made (recursion unwinds
//!       innermost first).
//!     * *Quiescence*: once [`Registry::unregister`] returned, the return hook never
//!       runs again, also for calls that entered before — they return to their callers
//!       unobserved. No read section is held across a call: the return looks its
//!       handlers up afresh.
//!     * *Enable/disable*: a call whose entry ran the pre-hook gets its return hook even
//!       if the handler was disabled since (pairs are never broken by a disable); a call
//!       whose entry did not run it (disabled then, enabled since) gets none.
//!     * *Reentrancy*: a call entered while its thread runs a handler is missed (rule 6)
//!       and arms no return; return hooks run with the thread dispatching, so probed
//!       calls they make are missed too.
//!     * *Counted*: each call whose entry ran the pre-hook ends in exactly one of the
//!       handler's `returns` and `returns_lost` (while it is registered): lost when the
//!       thread's return stack was full, the walk redirected ([`PreAction::Redirect`],
//!       [`Hit::return_now`]) or moved `rsp`, the stack could not be written, the call
//!       was skipped by a `longjmp` or an exception (recognised by its stack pointer at a
//!       later return or entry on the thread), or the thread ended inside it. Not armed,
//!       and in neither: a pre-hook that panicked, returned [`PreAction::Remove`] or
//!       called [`Hit::skip_return`]. Lost calls run on unchanged.
//!     * *Other stacks*: a call in flight on a stack the thread switched away from
//!       (coroutines, `swapcontext`, an alternate signal stack) is kept while its return
//!       slot still holds the trampoline, even where its stack pointer says "skipped"; it
//!       is counted lost then, and moved to `returns` if it does return.
//!
//! # What each backend delivers
//!
//! The rules hold for every backend; where handlers run decides what else holds. A
//! backend that dispatches inside signal handlers says so
//! ([`backend::Backend::dispatches_in_signal_handlers`]), and the registry then never
//! locks or allocates for a call made from inside a handler.
//!
//! | | in-process (`multiprobe-backend-sigtrap`) | another process (`-ptrace`), the simulator, the test backend |
//! | --- | --- | --- |
//! | handlers run | in the SIGTRAP handler of the thread that hit: they must be async-signal-safe | in thread context (the tracer's thread, the caller's) |
//! | `unregister`, `unregister_batch`, a guard's drop, from inside a handler | request the removal lock-free and allocation-free (`unregister` finds the id by scanning the table) and answer `InsideDispatch`; the backend's collector thread finishes the bookkeeping | unlink at once, under the registry's lock, and answer `InsideDispatch` |
//! | other registry calls from inside a handler | those returning a `Result` answer [`Error::SignalContext`] and change nothing; `len`, `handlers`, `site`, `sites` must not be called there; `register` must not (the handler passed in is dropped there) | work as from anywhere |
//! | [`PreAction::Remove`] | lock-free; the collector thread finishes it soon after | lock-free; finished by the next registry operation or [`Registry::collect`] (the simulator's first CPU collects after each of its hits) |
//! | a handler's panic | caught and counted; the backend's panic hook stays silent for it (no stderr lock, no backtrace), but unwinding still allocates: best effort in a signal handler | caught and counted; the panic hook prints as usual |
//! | system calls of a hit | none, but a thread's first hit learns its id (one `gettid`; `prepare_thread()` does it ahead), a thread's first hit that arms a return maps its return stack (one `mmap`), and a hit whose handler asked for a removal wakes the collector (one `futex` wake, if it was not already woken) | the backend's own (ptrace stops) |
//! | a return (rule 10) | the return trampoline: a generated stub that runs the return hooks in thread context (jump-site mode), or an `int3` and a SIGTRAP | one stop at an `int3` in the tracee's out-of-line page |
//!
//! # Registers are fetched on demand
//!
//! A hit's registers come from the backend's [`backend::RegisterFile`]; the [`Hit`] a handler
//! gets fetches them the first time [`Hit::regs`], [`Hit::regs_mut`] or [`Hit::arg`]
//! is called. Where fetching costs a system call (ptrace), a hit whose handlers only
//! count costs none, and only what changed is written back. Backends that have the
//! registers anyway pass a plain [`Regs`].
//!
//! # How the table is published
//!
//! `arc-swap`'s `load` is not async-signal-safe (thread-local debt slots are allocated
//! lazily and dropping a guard can free), and a single swapped snapshot would make every
//! change copy the whole table; so the crate does not use it. The table is a directory of
//! immutable buckets published through `AtomicPtr`s; readers bracket their use with an
//! SRCU-style read section (two epochs of sharded counters, the module `srcu`) that
//! writers wait for before freeing anything, with asymmetric barriers (`membarrier`) so
//! the read side costs no fence. A change copies one bucket, so its cost does not grow
//! with the number of probes, and a batch of removals waits for one grace period.
//!
//! # How hits are counted
//!
//! A hit bumps one counter, that of the site view it walked (on its thread's shard
//! line), whatever the number of handlers; a handler's hits are derived from the walks
//! of the views that listed it, minus the walks a redirect ended before it (the module
//! `tally`). So each extra handler costs its call and a few instructions.

#![warn(missing_docs)]
// The loom facade is the only module that names synchronization primitives (see
// `clippy.toml`): checked on the model build, where the facade's names are loom's.
#![cfg_attr(
    loom,
    deny(
        clippy::disallowed_types,
        clippy::disallowed_methods,
        clippy::disallowed_macros
    )
)]

pub mod backend;
mod dispatch;
mod error;
mod handler;
mod memory;
mod registry;
mod regs;
mod removal;
mod returning;
mod returns;
mod shard;
mod srcu;
mod stats;
mod sync;
mod table;
mod tally;
pub mod testing;

pub use error::{Error, Result};
pub use handler::{
    CallData, Fault, FaultAction, FaultHook, FnHandler, Handler, Hit, NoHook, PostHook, PreAction,
    PreHook, RetHook, CALL_DATA_WORDS,
};
pub use memory::{Memory, MemoryError};
pub use registry::{HandlerInfo, Options, Registration, Registry, Request};
pub use regs::{Gpr, Regs, SYSV_ARGS};
pub use stats::{HandlerStats, SiteStats};

/// Identifies one registered handler. Never reused within a registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandlerId(pub u64);

impl std::fmt::Display for HandlerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// This crate's README example, run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
