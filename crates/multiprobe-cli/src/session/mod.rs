//! Placing the probes of a command line in a traced process, and keeping account of them.
//!
//! A spec becomes one handler per action on its site. Placement happens when the
//! program's own code is about to run: for `run`, with the program held at its entry
//! point (the dynamic loader has mapped every startup library by then); for `attach`, at
//! once. A spec on a library that is not mapped then, but exists on disk, is *pending*:
//! an internal probe on the dynamic loader (`loader`) tries again whenever `dlopen`
//! or `dlclose` changed the maps. At the first placement any spec that does not resolve
//! is fatal ([`Session::fatal`]) — the caller kills a spawned program before it ran its
//! code, or detaches from an attached one — so a typo never leaves a half-probed program
//! behind. The probes of a library that `dlclose` unmapped are unregistered (their
//! counts carried) and pending again, so they come back if the library is loaded again.
//!
//! A spec whose symbol is a wildcard pattern (`libc:str*`) becomes one site per matching
//! function, each with the spec's actions; every placement (start, `dlopen`, `exec`)
//! probes the matches that are not probed yet. At the first placement a pattern that
//! matches nothing is fatal; functions that cannot be probed are left out with one line
//! saying how many and why (unless none could be).
//!
//! The jobs: `resolve` (where a spec is), `place` (one placement), `rows` (the summary's
//! rows and their states), `loader` (watching `dlopen`/`dlclose`).
//!
//! Invariants (under the [`Shared`] mutex): every row belongs to one (spec, action) —
//! for a pattern, to one (spec, action, function); an armed row's handler is registered
//! in the registry at its site, where its `mapped` identity was mapped when it was
//! placed; a row's carried statistics are those of its registrations that ended.

mod loader;
mod place;
mod resolve;
mod rows;

use std::collections::HashSet;
use std::sync::{Arc, Mutex, MutexGuard};

use multiprobe_backend_ptrace::{DetachHandle, PtraceBackend};
use multiprobe_core::{HandlerId, HandlerInfo, Registry};
use multiprobe_symbols::{ProcessSymbols, SymbolCache};

use crate::error::Error;
use crate::report::Row;
use crate::sink::Sink;
use crate::spec::ProbeSpec;

use rows::Rows;

/// Everything the placement hooks and the command share.
#[derive(Debug)]
pub struct Session {
    specs: Vec<ProbeSpec>,
    rows: Rows,
    registry: Registry<PtraceBackend>,
    pid: i32,
    cache: Arc<SymbolCache>,
    sink: Arc<Sink>,
    ld_library_path: Option<String>,
    /// A requested detach (a signal) stops placing.
    cancel: Option<DetachHandle>,
    /// The error of the first placement: the run must end.
    fatal: Option<Error>,
    /// Internal handlers (the loader hook), not shown in the summary.
    hooks: Vec<HandlerId>,
    loader_watched: bool,
    /// Specs whose library was unloaded once (said once, not at every `dlclose`).
    unload_noted: HashSet<usize>,
}

/// Shared handle on the [`Session`].
pub type Shared = Arc<Mutex<Session>>;

/// Lock the session (a panic in a handler that held it leaves it usable: every change
/// is complete before the lock is released).
pub fn lock(s: &Shared) -> MutexGuard<'_, Session> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

impl Session {
    /// A placement plan for `specs` in process `pid`. `cancel`: the detach handle whose
    /// request stops placing.
    pub fn new(
        specs: Vec<ProbeSpec>,
        registry: Registry<PtraceBackend>,
        pid: i32,
        sink: Arc<Sink>,
        ld_library_path: Option<String>,
        cancel: Option<DetachHandle>,
    ) -> Shared {
        let rows = Rows::new(&specs);
        Arc::new(Mutex::new(Session {
            specs,
            rows,
            registry,
            pid,
            cache: Arc::new(SymbolCache::default()),
            sink,
            ld_library_path,
            cancel,
            fatal: None,
            hooks: Vec::new(),
            loader_watched: false,
            unload_noted: HashSet::new(),
        }))
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(DetachHandle::requested)
    }

    /// The error of the first placement, if any (taken: the caller ends the run).
    pub fn take_fatal(&mut self) -> Option<Error> {
        self.fatal.take()
    }

    /// How many handlers are registered.
    pub fn armed(&self) -> usize {
        self.rows.armed_count()
    }

    /// The process executed a new program: the old image's probes are gone
    /// (`unregistered` has their last statistics). Carry them; the next placement puts
    /// them in the new image.
    pub fn exec(&mut self, unregistered: &[HandlerInfo]) {
        self.rows.exec(unregistered);
        self.hooks.clear();
        self.loader_watched = false;
    }

    /// The summary rows, with live statistics.
    pub fn rows(&self) -> Vec<Row> {
        self.rows.summary(&self.registry)
    }
}

/// Place everything not placed yet (`first`: the first placement, where failures are
/// fatal); then watch the loader for pending libraries, and for libraries with probes
/// being unloaded.
pub fn place_now(shared: &Shared, first: bool) {
    let mut s = lock(shared);
    // One read of the maps serves the whole placement: what went, what came, and where
    // the probes are.
    let syms = match ProcessSymbols::read(s.pid as u32, Arc::clone(&s.cache)) {
        Ok(syms) => syms,
        Err(source) => {
            if first {
                s.fatal = Some(Error::Maps { pid: s.pid, source });
            }
            return; // later: gone, its exit comes next
        }
    };
    if !first {
        s.forget_unloaded(syms.maps());
    }
    s.place(first, &syms);
    if s.fatal.is_some() || s.loader_watched || s.cancelled() {
        return;
    }
    if s.rows.any_pending() || s.any_in_library(syms.maps()) {
        s.loader_watched = true;
        drop(s);
        loader::watch(shared);
    }
}
