//! For backend authors: what a backend implements ([`Backend`]) and the dispatch
//! machinery its trap path calls ([`Dispatcher`], [`ThreadState`], [`Step`], ...).
//! Users of a backend need none of this: they see the [`crate::Registry`], the
//! [`crate::Handler`] API and the [`crate::Hit`] a handler gets.
//!
//! The registry calls a backend under its writer lock, in this order for one address:
//! `prepare` (once, when the first handler arrives) → `arm` (when the first handler is
//! enabled) → `disarm` (when none is left enabled, or the last leaves) → drop of the
//! site data (after the grace period, when the last handler left). The site is visible
//! to dispatch from before `arm` until after `disarm`, so a thread that traps at the
//! breakpoint always finds it.
//!
//! The trap path, per hit:
//! 1. [`Dispatcher::pre`] with `rip` at the probed address. [`PreOutcome::NotOurs`]: no
//!    probe here (never was, or just disarmed). [`PreOutcome::Redirect`]: resume at the
//!    (changed) `rip`, skipping the instruction. [`PreOutcome::Step`]: execute the
//!    displaced instruction once; if [`Step::wants_post`], [`Step::defer_post`] and, after
//!    the instruction, [`Dispatcher::post`].
//! 2. If the displaced instruction faults: [`Dispatcher::fault`].
//!
//! A backend that executes the instruction itself right after the pre-handlers (by
//! emulation) may make step 1 one call: [`Dispatcher::pre_step_post`].
//!
//! Return probes (contract rule 10), for a backend that offers them
//! ([`Backend::check_return`]): give each thread's state a return stack
//! ([`ThreadState::reserve_returns`]) and the address of the backend's *return
//! trampoline* ([`ThreadState::set_return_trampoline`]) before dispatching. The core does
//! the rest at the hit: it swaps the call's return address at `[rsp]` for the trampoline
//! through the hit's memory. A thread that arrives at the trampoline is handed to
//! [`Dispatcher::ret`], which sets `rip` to the original return address (and runs the
//! return hooks); the backend resumes it there. Unwinders that walk the stack must see
//! original return addresses: [`ThreadState::restore_return_addresses`] puts them back
//! (and [`ThreadState::rehijack_returns`] the trampoline again); a backend that leaves a
//! process restores them for every thread and drops the frames
//! ([`Dispatcher::abandon_returns`]).
//!
//! Each thread that hits probes has its own [`ThreadState`]. Registers come through a
//! [`RegisterFile`] (a plain [`crate::Regs`] is one); memory through a
//! [`crate::Memory`] ([`NoMemory`] if the backend has none to offer).

pub use crate::dispatch::{Dispatcher, PreOutcome, Ran, Step, Stepped, ThreadState, MAX_PENDING};
pub use crate::memory::NoMemory;
pub use crate::regs::{RegisterFile, RFLAGS_TF};
pub use crate::returning::RetOutcome;
pub use crate::returns::{
    frame_words as return_frame_words, DEFAULT_WORDS as DEFAULT_RETURN_WORDS,
};

use crate::error::Result;

/// A place where breakpoints live: this process, another process, a simulator.
pub trait Backend: Send + Sync + 'static {
    /// Per-site data the backend needs at hit time (the out-of-line slot, the emulation
    /// plan, the original bytes). Reached from dispatch through [`Step::site`].
    /// Dropped in thread context after the grace period of the site's removal.
    type Site: Send + Sync + 'static;

    /// Called once by [`crate::Registry::new`] with the handle the backend's trap path
    /// calls into.
    fn attach(&self, dispatcher: Dispatcher<Self::Site>) {
        let _ = dispatcher;
    }

    /// Whether this backend dispatches inside signal handlers (an in-process backend):
    /// then its handlers must be async-signal-safe, and so must what the registry does
    /// when they call it — registry operations from inside a handler neither lock nor
    /// allocate: `unregister` requests the removal lock-free and answers
    /// [`crate::Error::InsideDispatch`], the others answer
    /// [`crate::Error::SignalContext`] (see [`crate::Registry::unregister`]). Backends
    /// whose handlers run in thread context (ptrace, a simulator) keep the default,
    /// `false`: there an unregister from inside a handler unlinks at once.
    fn dispatches_in_signal_handlers(&self) -> bool {
        false
    }

    /// Validate `addr` and build what a hit there needs. Nothing is changed in the
    /// target yet; on error nothing must be left behind.
    fn prepare(&self, addr: u64) -> Result<Self::Site>;

    /// Insert the breakpoint. On error nothing must be left inserted.
    fn arm(&self, addr: u64, site: &Self::Site) -> Result<()>;

    /// Whether a handler with a return hook may be registered at `addr` (called at each
    /// such registration, after `prepare`): `addr` must be a function's first
    /// instruction, where `[rsp]` is the return address — otherwise
    /// [`crate::Error::NotFunctionEntry`]. The default refuses: a backend offers return
    /// probes by implementing this and driving [`Dispatcher::ret`] (module docs).
    fn check_return(&self, addr: u64, site: &Self::Site) -> Result<()> {
        let _ = site;
        Err(crate::Error::NotFunctionEntry {
            addr,
            context: " (this backend has no return probes)".into(),
        })
    }

    /// Remove the breakpoint, restoring the original bytes exactly. If the code is no
    /// longer there — the process is gone ([`crate::Error::ProcessGone`]), or the
    /// memory was unmapped or replaced ([`crate::Error::CodeGone`]) — write nothing and
    /// say so: the registry takes either as the breakpoint being gone. Any other error
    /// means the breakpoint may still be there: the registry then keeps the site (so
    /// traps there stay transparent) and reports it.
    fn disarm(&self, addr: u64, site: &Self::Site) -> Result<()>;

    /// Told after every change of the handler list published for `addr` (a handler
    /// registered, unregistered, enabled or disabled), under the registry's writer
    /// lock, after the new list is published (and after `arm`, before `disarm`'s
    /// unpublishing): `enabled` are the handlers hits now run, in registration order,
    /// with their ids. A backend that runs some handlers without dispatching
    /// ([`crate::Handler::as_any`]) learns here what to run; the default ignores it.
    /// Must not call the registry (its lock is held) and should not block for long.
    fn handlers_changed(
        &self,
        addr: u64,
        site: &Self::Site,
        enabled: &[(crate::HandlerId, &dyn crate::Handler)],
    ) {
        let _ = (addr, site, enabled);
    }

    /// Told under the writer lock when handler `id` leaves `addr`'s list for good
    /// (unregistered, by itself or by a removal it asked for), after
    /// [`Backend::handlers_changed`] was told the list without it. A disable is only a
    /// `handlers_changed`: a backend that keeps a handler's work going past a disable
    /// (the returns of calls in flight, rule 10) ends it at the next
    /// [`Backend::quiesce`] only for handlers told here. Must not call the registry.
    /// The default ignores it.
    fn handler_removed(&self, addr: u64, site: &Self::Site, id: crate::HandlerId) {
        let _ = (addr, site, id);
    }

    /// Rule 3 for handlers the backend runs itself: called by `unregister` (and
    /// [`crate::Registry::synchronize`]) after the dispatcher's grace period, outside
    /// the registry's lock and never from inside a dispatch. Returns once no handler
    /// the backend learnt of through [`Backend::handlers_changed`] before this call can
    /// still be running for a list it no longer has (a tracee's thread inside the old
    /// code). The default has nothing to wait for.
    fn quiesce(&self) -> Result<()> {
        Ok(())
    }
}

/// Functions whose calls return twice on one stack (the C library's `returns_twice`
/// ones): a return probe on them cannot pair, and a second return through a return
/// trampoline would find no frame. Backends refuse them in
/// [`Backend::check_return`] ([`check_returns_once`]).
pub const RETURNS_TWICE: &[&str] = &[
    "vfork",
    "__vfork",
    "__libc_vfork",
    "setjmp",
    "_setjmp",
    "__setjmp",
    "sigsetjmp",
    "__sigsetjmp",
    "getcontext",
    "savectx",
];

/// [`crate::Error::ReturnsTwice`] if `name` (a symbol, maybe with a version or a library
/// prefix) is one of [`RETURNS_TWICE`].
pub fn check_returns_once(addr: u64, name: &str) -> crate::Result<()> {
    let bare = name.rsplit(':').next().unwrap_or(name);
    let bare = bare.split('@').next().unwrap_or(bare);
    if RETURNS_TWICE.contains(&bare) {
        return Err(crate::Error::ReturnsTwice {
            addr,
            name: name.to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod returns_twice_tests {
    #[test]
    fn vfork_and_setjmp_are_refused_under_any_spelling() {
        for n in [
            "vfork",
            "libc.so.6:vfork",
            "__sigsetjmp@GLIBC_2.2.5",
            "setjmp",
        ] {
            assert!(super::check_returns_once(1, n).is_err(), "{n}");
        }
        for n in ["malloc", "vforker", "libc.so.6:fork"] {
            assert!(super::check_returns_once(1, n).is_ok(), "{n}");
        }
    }
}
