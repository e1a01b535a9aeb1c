//! Placing the probes of a command line in the traced processes, and keeping account
//! of them.
//!
//! A spec becomes one handler per action on its site, in each process of the session
//! (the traced one; with `-f`, every fork child too: [`Proc`]). Placement follows the
//! life of a program image so that no call is missed, its startup included:
//!
//! 1. **At exec** (the program is held at its first instruction, which is the dynamic
//!    loader's for a dynamic program): the specs that name the program itself, or bare
//!    symbols it defines, or the loader, are placed at once; and an internal probe goes
//!    on the loader's `_dl_debug_state`, which the loader calls with its `r_debug`
//!    state after it changed the list of loaded objects (as gdb's shared-library
//!    breakpoint does).
//! 2. **Startup complete** (`_dl_debug_state` with `RT_CONSISTENT` for the first time):
//!    every startup library is mapped and relocated and none of their constructors has
//!    run. Everything is placed. This is the *first placement* of the traced program:
//!    a spec that does not resolve (and is not pending: see below) ends the program
//!    right there, killed inside the hook, so a typo never leaves a half-probed
//!    program behind and the program never ran its own code.
//! 3. **Later** `dlopen` and `dlclose` (`_dl_debug_state` with `RT_CONSISTENT` again):
//!    pending specs are placed, and the probes of a library that is gone are
//!    unregistered (counts carried) and pending again, as gdb's pending breakpoints
//!    are.
//!
//! A static program has no loader: everything is placed at exec. `attach` places
//! everything at once (the first placement) and watches the loader for what comes.
//!
//! A spec on a library that is not loaded yet but exists on disk is *pending*; so is a
//! spec whose library or program is not in the first program but that a program named
//! on the command line has (`-p PyList_Append -- sh -c 'exec python3 ...'`): it is
//! placed when an `exec` brings that program. Every exec places the specs again in the
//! new program; each row says where it resolved.
//!
//! A spec whose symbol is a wildcard pattern (`libc:str*`), and every USDT spec, becomes
//! one site per match, each with the spec's actions; every placement probes the matches
//! that are not probed yet.
//!
//! The jobs: `resolve` (where a spec is), `place` (one placement), `rows` (the summary's
//! rows and their states), `loader` (the hook on the loader), `programs` (programs a
//! command line names).
//!
//! Invariants (under the [`Shared`] mutex): every row belongs to one process and one
//! (spec, action) — for a pattern, to one (spec, action, match); an armed row's handler
//! is registered in its process's registry at its site, where its `mapped` identity was
//! mapped when it was placed; a row's carried statistics are those of its registrations
//! that ended, and its [`crate::actions::RowState`] is shared by all of them.

pub(crate) mod ifunc;
mod loader;
mod place;
pub mod programs;
mod resolve;
mod rows;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use multiprobe_backend_ptrace::{DetachHandle, PtraceBackend};
use multiprobe_core::{HandlerId, HandlerInfo, Registry};
use multiprobe_symbols::{ProcessSymbols, SymbolCache};

use crate::collected::Collected;
use crate::error::Error;
use crate::report::{Outcome, Process, Row};
use crate::sink::{ProcessEvent, Sink};
use crate::spec::ProbeSpec;
use crate::ustack::Stacks;

use rows::Rows;

/// Where the current program image of a process is in its life (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// Just executed: the loader has not mapped the libraries yet.
    Exec,
    /// The loader is mapping the startup libraries (its hook is in place).
    Loading,
    /// Startup is over (or the process was attached to): everything was placed.
    Running,
}

/// One traced process.
#[derive(Debug)]
pub struct Proc {
    pid: i32,
    parent: Option<i32>,
    registry: Registry<PtraceBackend>,
    rows: Rows,
    stage: Stage,
    /// The first image of the traced program: failures of its first placement are
    /// fatal.
    first: bool,
    /// The program it runs (its executable).
    program: Option<String>,
    /// Internal handlers (the loader hook), not shown in the summary.
    hooks: Vec<HandlerId>,
    /// The loader's `r_debug`, once known.
    r_debug: Option<u64>,
    loader_watched: bool,
    /// Specs said once (unloaded, not in this program, ...).
    noted: HashSet<(usize, &'static str)>,
    stacks: Arc<Stacks>,
    /// How it ended.
    outcome: Option<Outcome>,
}

/// Everything the placement hooks and the command share.
#[derive(Debug)]
pub struct Session {
    specs: Vec<ProbeSpec>,
    procs: Vec<Proc>,
    cache: Arc<SymbolCache>,
    sink: Arc<Sink>,
    ld_library_path: Option<String>,
    /// Programs the command line names (besides the first), for specs they may hold.
    cmd_programs: Vec<PathBuf>,
    /// A requested detach (a signal) stops placing.
    cancel: Option<DetachHandle>,
    /// The error of the first placement: the run must end.
    fatal: Option<Error>,
    /// Per-hit lines show the time.
    time: bool,
    /// Where collecting actions print (`None`: `--stop`).
    collected: Option<Arc<Collected>>,
}

/// Shared handle on the [`Session`].
pub type Shared = Arc<Mutex<Session>>;

/// Lock the session (a panic in a handler that held it leaves it usable: every change
/// is complete before the lock is released).
pub fn lock(s: &Shared) -> MutexGuard<'_, Session> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// What [`Session::new`] needs.
#[derive(Debug)]
pub struct Setup {
    /// The probes.
    pub specs: Vec<ProbeSpec>,
    /// Output.
    pub sink: Arc<Sink>,
    /// For libraries not loaded yet.
    pub ld_library_path: Option<String>,
    /// Programs the command line names.
    pub cmd_programs: Vec<PathBuf>,
    /// The detach handle whose request stops placing.
    pub cancel: Option<DetachHandle>,
    /// `-T`.
    pub time: bool,
    /// Collecting actions print through it; `None` (`--stop`): every action is a
    /// closure on the one-stop path.
    pub collected: Option<Arc<Collected>>,
}

impl Session {
    /// A session for the traced process `pid`, whose probes go through `registry`.
    pub fn new(setup: Setup, pid: i32, registry: Registry<PtraceBackend>) -> Shared {
        let cache = Arc::new(SymbolCache::default());
        let mut s = Session {
            procs: Vec::new(),
            cache,
            sink: setup.sink,
            ld_library_path: setup.ld_library_path,
            cmd_programs: setup.cmd_programs,
            cancel: setup.cancel,
            fatal: None,
            time: setup.time,
            collected: setup.collected,
            specs: setup.specs,
        };
        s.add_proc(pid, None, registry, true);
        Arc::new(Mutex::new(s))
    }

    fn add_proc(
        &mut self,
        pid: i32,
        parent: Option<i32>,
        registry: Registry<PtraceBackend>,
        first: bool,
    ) {
        self.procs.push(Proc {
            pid,
            parent,
            registry,
            rows: Rows::new(&self.specs),
            stage: Stage::Exec,
            first,
            program: program_of(pid),
            hooks: Vec::new(),
            r_debug: None,
            loader_watched: false,
            noted: HashSet::new(),
            stacks: Arc::new(Stacks::new(pid, Arc::clone(&self.cache))),
            outcome: None,
        });
    }

    fn proc_mut(&mut self, pid: i32) -> Option<&mut Proc> {
        self.procs.iter_mut().find(|p| p.pid == pid)
    }

    fn proc_index(&self, pid: i32) -> Option<usize> {
        self.procs.iter().position(|p| p.pid == pid)
    }

    fn cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(DetachHandle::requested)
    }

    /// The error of the first placement, if any (taken: the caller ends the run).
    pub fn take_fatal(&mut self) -> Option<Error> {
        self.fatal.take()
    }

    /// Whether the first placement failed (the program was killed for it).
    pub fn has_fatal(&self) -> bool {
        self.fatal.is_some()
    }

    /// Where collecting actions print, unless `--stop`.
    pub fn collected(&self) -> Option<Arc<Collected>> {
        self.collected.clone()
    }

    /// How many handlers are registered in process `pid`.
    pub fn armed(&self, pid: i32) -> usize {
        self.procs
            .iter()
            .find(|p| p.pid == pid)
            .map_or(0, |p| p.rows.armed_count())
    }

    /// Process `pid` executed a new program: the old image's probes are gone
    /// (`unregistered` has their last statistics). Carry them; the exec placement
    /// ([`place_at_exec`]) puts them in the new image.
    pub fn exec(&mut self, pid: i32, unregistered: &[HandlerInfo]) {
        let Some(p) = self.proc_mut(pid) else { return };
        p.rows.exec(unregistered);
        p.hooks.clear();
        p.loader_watched = false;
        p.r_debug = None;
        p.stage = Stage::Exec;
        p.first = false;
        p.program = program_of(pid);
        p.noted.clear();
        p.stacks.maps_changed();
        let program = p.program.clone();
        self.sink.process(
            ProcessEvent {
                pid,
                kind: "exec",
                parent: None,
                program: program.as_deref(),
                outcome: None,
            },
            &format!(
                "process {pid} executed {}",
                program.as_deref().unwrap_or("a new program")
            ),
        );
    }

    /// `child` was forked from `parent` and is followed (`-f`): it gets its own rows,
    /// placed like the parent's (its memory is a copy of the parent's, without our
    /// probes). Call [`place_forked`] next.
    pub fn forked(&mut self, parent: i32, child: i32, registry: Registry<PtraceBackend>) {
        self.add_proc(child, Some(parent), registry, false);
        self.sink.process(
            ProcessEvent {
                pid: child,
                kind: "fork",
                parent: Some(parent),
                program: None,
                outcome: None,
            },
            &format!("process {child} forked from {parent}"),
        );
    }

    /// Process `pid` ended (`-f`: one of several; or the traced one).
    pub fn ended(&mut self, pid: i32, outcome: Outcome, say: bool) {
        let Some(p) = self.proc_mut(pid) else { return };
        p.outcome = Some(outcome.clone());
        if say && outcome != Outcome::Detached {
            let text = match &outcome {
                Outcome::Exited(c) => format!("process {pid} exited with status {c}"),
                Outcome::Killed(s) => match crate::signals::Signal::from_raw(*s) {
                    Some(sig) => {
                        format!("process {pid} was killed by {}", crate::signals::name(sig))
                    }
                    None => format!("process {pid} is gone (how it ended is unknown)"),
                },
                Outcome::Detached => unreachable!("not said"),
            };
            self.sink.process(
                ProcessEvent {
                    pid,
                    kind: "exit",
                    parent: None,
                    program: None,
                    outcome: Some(&outcome),
                },
                &text,
            );
        }
    }

    /// The summary rows of every process, with live statistics. `end`: how the session
    /// ended for processes that have no outcome of their own (still running: detached).
    pub fn rows(&self, end: Option<&Outcome>) -> Vec<Row> {
        let mut out = Vec::new();
        for p in &self.procs {
            let over = p.outcome.as_ref().or(end);
            out.extend(p.rows.summary(
                &p.registry,
                p.pid,
                over,
                &self.specs,
                self.collected.is_none(),
            ));
        }
        out
    }

    /// Every process of the session, in order of appearance, with `end` for those
    /// still running.
    pub fn processes(&self, end: &Outcome) -> Vec<Process> {
        self.procs
            .iter()
            .map(|p| Process {
                pid: p.pid,
                parent: p.parent,
                program: p.program.clone(),
                outcome: p.outcome.clone().unwrap_or_else(|| end.clone()),
            })
            .collect()
    }

    /// Whether more than the first process was traced.
    pub fn followed_any(&self) -> bool {
        self.procs.len() > 1
    }

    fn note_once(&mut self, pid: i32, spec: usize, what: &'static str, text: &str) {
        if let Some(p) = self.proc_mut(pid) {
            if !p.noted.insert((spec, what)) {
                return;
            }
        }
        self.sink.note_for(Some(pid), text);
    }
}

/// The executable `pid` runs.
fn program_of(pid: i32) -> Option<String> {
    std::fs::read_link(format!("/proc/{pid}/exe"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}

/// How much of the process a placement covers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Scope {
    /// Only the main program and the loader (at exec).
    Exec,
    /// Everything mapped.
    All,
}

/// Place in process `pid` everything not placed yet: `scope` says what is mapped,
/// `first` whether failures are fatal. Returns whether anything changed in the maps
/// since the last placement is unknown: callers place after every change.
fn place_now(shared: &Shared, pid: i32, scope: Scope, first: bool) {
    let mut s = lock(shared);
    let Some(i) = s.proc_index(pid) else { return };
    // One read of the maps serves the whole placement: what went, what came, and where
    // the probes are.
    let syms = match ProcessSymbols::read(pid as u32, Arc::clone(&s.cache)) {
        Ok(syms) => syms,
        Err(source) => {
            if first {
                s.fatal = Some(Error::Maps { pid, source });
            }
            return; // later: gone, its exit comes next
        }
    };
    s.procs[i].stacks.maps_changed();
    if scope == Scope::All && !first {
        s.forget_unloaded(i, syms.maps());
    }
    s.place(i, scope, first, &syms);
}

/// The exec placement of process `pid` (held at its new program's first instruction):
/// the program's own specs, then the loader hook — or, for a static program,
/// everything (see the module docs). For the traced program's first image, failures
/// are fatal ([`Session::take_fatal`]; the caller kills it).
pub fn place_at_exec(shared: &Shared, pid: i32) {
    let (first, dynamic) = {
        let s = lock(shared);
        let Some(p) = s.procs.iter().find(|p| p.pid == pid) else {
            return;
        };
        let dynamic = ProcessSymbols::read(pid as u32, Arc::clone(&s.cache))
            .map(|syms| syms.files().len() > 1)
            .unwrap_or(false);
        (p.first, dynamic)
    };
    if !dynamic {
        place_now(shared, pid, Scope::All, first);
        startup_done(shared, pid, first);
        loader::watch(shared, pid, false);
        return;
    }
    place_now(shared, pid, Scope::Exec, first);
    if lock(shared).has_fatal() {
        return;
    }
    if !loader::watch(shared, pid, true) {
        // No loader hook: the libraries cannot be waited for. Place what there is now
        // (the loader has mapped nothing yet: library specs stay pending).
        place_now(shared, pid, Scope::All, first);
        startup_done(shared, pid, first);
    }
}

/// `attach`: everything at once (the first placement), then the loader hook.
pub fn place_attached(shared: &Shared, pid: i32) {
    place_now(shared, pid, Scope::All, true);
    if lock(shared).has_fatal() {
        return;
    }
    startup_done(shared, pid, true);
    loader::watch(shared, pid, false);
}

/// A followed fork child: placed like its parent (its startup is its parent's).
pub fn place_forked(shared: &Shared, pid: i32) {
    place_now(shared, pid, Scope::All, false);
    startup_done(shared, pid, false);
    loader::watch(shared, pid, false);
}

/// The first full placement of an image is done: from now on the loader hook places
/// after every `dlopen` and `dlclose`.
fn startup_done(shared: &Shared, pid: i32, first: bool) {
    let mut s = lock(shared);
    if let Some(p) = s.proc_mut(pid) {
        p.stage = Stage::Running;
        p.first = false;
    }
    if first && s.fatal.is_none() {
        // The output file is ours only now (see `Sink::claim`).
        if let Err(e) = s.sink.claim(pid) {
            s.fatal = Some(e.into());
        }
    }
}
