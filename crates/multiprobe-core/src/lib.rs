//! Many independent handlers on one machine-code address, with one real breakpoint
//! underneath: armed when the first handler arrives, removed when the last one leaves.
//!
//! This crate is the backend-independent core: the [`Registry`], the lock-free,
//! async-signal-safe [`Dispatcher`] backends call when a thread hits a breakpoint, the
//! [`Handler`] API and statistics. Backends (in-process `int3`, ptrace, a simulator)
//! implement [`Backend`].
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
//!    [`Error::InsideDispatch`] instead of deadlocking. Dropping a [`Registration`]
//!    unregisters without waiting; handlers are owned by the table, so that is safe.
//! 4. **Visibility.** A hit that begins after `register` returned runs the new handler.
//! 5. **The hot path never blocks**: no lock, allocation, free or system call, so it can
//!    run in a signal handler that interrupted anything, the registry's writer included.
//! 6. **Reentrancy.** A hit on a thread that is already running a handler runs nothing;
//!    it counts as `missed` and the instruction still executes.
//! 7. **Transparency.** Besides what handlers change, the program behaves as unprobed;
//!    a faulting probed instruction faults as it would have, after the fault handlers.
//! 8. **Handlers are untrusted.** Panics are caught and counted.
//! 9. **Stats.** Per handler hits/missed/panics, per address hits, readable any time.
//!
//! # Registers are fetched on demand
//!
//! A hit's registers come from the backend's [`RegisterFile`]; the [`Hit`] a handler
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

mod backend;
mod barrier;
mod dispatch;
mod error;
mod handler;
mod memory;
mod registry;
mod regs;
mod removal;
mod shard;
mod srcu;
mod stats;
mod sync;
mod table;
mod tally;
pub mod testing;

pub use backend::Backend;
pub use dispatch::{Dispatcher, PreOutcome, Step, ThreadState, MAX_PENDING};
pub use error::{Error, Result};
pub use handler::{
    Fault, FaultAction, FaultHook, FnHandler, Handler, Hit, NoHook, PostHook, PreAction, PreHook,
};
pub use memory::{Memory, MemoryError, NoMemory};
pub use registry::{HandlerInfo, Options, Registration, Registry, Request};
pub use regs::{Gpr, RegisterFile, Regs, RFLAGS_TF, SYSV_ARGS};
pub use stats::{HandlerStats, SiteStats};

/// Identifies one registered handler. Never reused within a registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HandlerId(pub u64);

impl std::fmt::Display for HandlerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}
