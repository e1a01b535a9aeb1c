//! The tracer: owns the traced process's threads and runs the event loop that serves
//! hits, on the one thread that may make ptrace requests for them.
//!
//! Invariants:
//! * Every thread of the tracee (and every vfork child, which shares its memory) has
//!   a [`Thread`] in `threads` from its first reported stop on, and loses it at its
//!   exit; its state machine (`thread.rs`) says whether the loop holds it stopped.
//! * Handlers run here, with the thread stopped: a hit is one stop — pre-handlers, then
//!   the instruction emulated or run from the jump-back slot — and a second stop only
//!   for post-handlers of a relocated instruction (the trap-after slot).
//!
//! Each part of the tracer's state is owned by the module that changes it: `threads`
//! by `thread.rs`, `children` (new processes not yet claimed) by `children.rs`,
//! `aside` and `injector` by `inject.rs`, `bell` by `doorbell.rs`, `resend` by
//! `detach.rs`, `trap` by `sigtrap.rs`; this module keeps the process's end and the
//! entry hold.

use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use multiprobe_core::backend::Dispatcher;
use multiprobe_core::{Error, HandlerInfo, Registry, Result};
use multiprobe_symbols::ProcessSymbols;

use crate::backend::{PtraceBackend, Shared, Site, Status};
use crate::children::Children;
use crate::doorbell::{Bell, DetachHandle};
use crate::error;
use crate::family::Family;
use crate::inject::{Aside, Injector};
use crate::mem::{CodeMemory, TraceeMemory};
use crate::sigtrap::TrapGuard;
use crate::sys::{self, Errno, Event, Signal, Tid, Wait};
use crate::thread::{Kind, Thread, Threads};

/// How the traced process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it (`SIGKILL` from someone else included: the program did not
    /// end on its own).
    Signal(Signal),
    /// It went without a report the tracer could read (reaped by someone else).
    Unknown,
}

/// Why [`Tracer::run`] returned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The process is gone.
    Exited(ExitStatus),
    /// The process executed a new program. Its probes went with the old image: they
    /// were unregistered (their last statistics are here). The process is held stopped
    /// at the new program's first instruction until the next `run`, so probes can be
    /// registered on the new image first.
    Exec {
        /// The handlers that were registered on the old image.
        unregistered: Vec<HandlerInfo>,
    },
    /// A [`DetachHandle`] asked the loop to detach, and it did.
    Detached,
    /// With [`Tracer::follow_forks`]: a followed process forked `child`, which is
    /// traced, held at its first stop with none of our probes in it until the next
    /// run; register its probes through [`Tracer::registry_of`] first.
    Forked {
        /// The process that forked.
        parent: i32,
        /// The new one.
        child: i32,
        /// The child is a vfork child (it shared its parent's memory, and ran as part
        /// of it) that has just executed a new program: it is held at that program's
        /// first instruction, as after [`Stop::Exec`].
        execed: bool,
    },
    /// A followed process (not the first) executed a new program: as [`Stop::Exec`].
    ProcessExec {
        /// The process.
        pid: i32,
        /// The handlers that were registered on its old image.
        unregistered: Vec<HandlerInfo>,
    },
    /// A traced process ended while others are still traced (with
    /// [`Tracer::follow_forks`]): a follower, or the first one. [`Stop::Exited`] comes
    /// when none is left.
    ProcessExited {
        /// The process.
        pid: i32,
        /// How it ended.
        status: ExitStatus,
    },
}

/// What waiting for the next tracee event gave.
enum Next {
    Event(Wait),
    /// No tracee is left.
    Gone(Stop),
}

/// A traced process and the registry of its probes.
///
/// Create one with [`Tracer::spawn`] or [`Tracer::attach`] on the thread that will run
/// its loop: ptrace accepts requests only from the thread that attached, so a
/// `Tracer` is neither `Send` nor `Sync`, and a thread has at most one at a time (its
/// loop waits for every tracee and child of the thread: do not start other child
/// processes from that thread while it traces). Probes are registered through
/// [`Tracer::registry`] (from any thread; the registry is `Send + Sync`), and hits are
/// served — handlers run — inside [`Tracer::run`] on this thread.
///
/// Dropping a `Tracer` detaches: every breakpoint is removed and the process runs on
/// as if it had never been traced.
pub struct Tracer {
    pub(crate) shared: Arc<Shared>,
    pub(crate) registry: Registry<PtraceBackend>,
    pub(crate) dispatcher: Dispatcher<Site>,
    pub(crate) mem: TraceeMemory,
    pub(crate) threads: Threads,
    pub(crate) children: Children,
    pub(crate) aside: Aside,
    pub(crate) injector: Injector,
    pub(crate) bell: Bell,
    pub(crate) trap: TrapGuard,
    /// Signals to send again with `tgkill` after detaching (they were held back and
    /// the thread's stop at detach cannot deliver them).
    pub(crate) resend: Vec<(Tid, Signal)>,
    child: Option<std::process::Child>,
    exit: Option<ExitStatus>,
    /// A breakpoint address whose hit holds the thread instead of serving it (see
    /// [`Tracer::run_to_entry`]), and the flag raised when that happens.
    hold_at: Option<(u64, Arc<AtomicBool>)>,
    /// Followed fork children (see `family.rs`).
    pub(crate) family: Family,
    /// Return probes: the trampoline and the unwinder hooks (`returns.rs`).
    pub(crate) returns: crate::returns::Returns,
    /// This thread's one tracer (also what makes `Tracer` neither `Send` nor `Sync`);
    /// a follower has none: it lives in the first tracer's family.
    _claim: Option<ThreadClaim>,
}

std::thread_local! {
    static CLAIMED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// The right to trace from this thread. The loop waits for any tracee of its thread
/// (`waitpid(-1, __WNOTHREAD)`: ptrace has no "wait for one of these"), so two tracers on
/// one thread would take each other's events; one claim per thread prevents it.
#[derive(Debug)]
pub(crate) struct ThreadClaim(PhantomData<*const ()>);

impl ThreadClaim {
    pub(crate) fn take() -> Result<ThreadClaim> {
        CLAIMED.with(|c| {
            if c.replace(true) {
                Err(Error::Backend(
                    "this thread already has a live Tracer; use one thread per traced process"
                        .into(),
                ))
            } else {
                Ok(ThreadClaim(PhantomData))
            }
        })
    }
}

impl Drop for ThreadClaim {
    fn drop(&mut self) {
        CLAIMED.with(|c| c.set(false));
    }
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("pid", &self.shared.pid)
            .field("threads", &self.threads.len())
            .field("exit", &self.exit)
            .finish_non_exhaustive()
    }
}

impl Tracer {
    /// A tracer for `pid`, whose threads are already seized: `held` ones are stopped
    /// (and stay so until the first run), `running` ones run.
    pub(crate) fn new(
        pid: Tid,
        held: &[Tid],
        running: &[Tid],
        claim: Option<ThreadClaim>,
        child: Option<std::process::Child>,
    ) -> Result<Tracer> {
        let shared = Shared::new(pid, CodeMemory::open(pid)?, crate::launch::image_of(pid));
        let registry = Registry::new(PtraceBackend {
            shared: Arc::clone(&shared),
        });
        let dispatcher = registry.dispatcher();
        let threads = Threads::new(
            held.iter()
                .map(|&t| (t, Thread::held(None)))
                .chain(running.iter().map(|&t| (t, Thread::running(Kind::Thread)))),
        );
        let mut tracer = Tracer {
            shared,
            registry,
            dispatcher,
            mem: TraceeMemory::new(pid),
            threads,
            children: Children::default(),
            aside: Aside::default(),
            injector: Injector::default(),
            bell: Bell::default(),
            trap: TrapGuard::default(),
            resend: Vec::new(),
            child,
            exit: None,
            hold_at: None,
            family: Family::default(),
            returns: Default::default(),
            _claim: claim,
        };
        tracer.trap.start(pid, &tracer.threads.tids());
        if tracer.trap.needs_action() && held.is_empty() {
            // Attached to a process that catches SIGTRAP and blocks it somewhere: the
            // handler's address must be read before any probe can hit (a hit in a
            // blocking thread resets it). That takes a stopped thread: stop them all,
            // briefly.
            tracer.pause()?;
            tracer.trap.refresh(pid, &tracer.threads);
            tracer.learn_action_if_held();
            tracer.resume_held()?;
        }
        Ok(tracer)
    }

    /// The tracer of a followed fork child `pid`, held at its first stop (to be
    /// resumed delivering `deliver`), its memory already freed of our probes.
    pub(crate) fn follower(pid: Tid, deliver: Option<Signal>) -> Result<Tracer> {
        let mut t = Tracer::new(pid, &[pid], &[], None, None)?;
        t.threads.known(pid).hold(deliver);
        Ok(t)
    }

    pub(crate) fn tid(&self) -> Tid {
        self.shared.pid
    }

    /// The traced process's id.
    pub fn pid(&self) -> i32 {
        self.shared.pid.as_raw_pid()
    }

    /// The registry of this process's probes. Clone it to register from other threads.
    pub fn registry(&self) -> &Registry<PtraceBackend> {
        &self.registry
    }

    /// The process's memory, as handlers see it.
    pub fn memory(&self) -> TraceeMemory {
        self.mem
    }

    /// How the process ended, once it has.
    pub fn exit_status(&self) -> Option<ExitStatus> {
        self.exit
    }

    pub(crate) fn is_gone(&self) -> bool {
        self.exit.is_some()
    }

    /// Thread ids currently traced.
    pub fn threads(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.threads.tids().iter().map(|t| t.as_raw_pid()).collect();
        v.sort_unstable();
        v
    }

    /// The address of a function in the tracee: `symbol` (the main program first, then
    /// every mapped file) or `file:symbol` (`libc:write`). A name that does not resolve
    /// is a [`ResolveError::Symbol`] with the reason as structured data (no such
    /// library, no such function and the names close to it, an indirect function, an
    /// ambiguous name); it converts into the core's error with `?`.
    pub fn resolve(&self, spec: &str) -> std::result::Result<u64, ResolveError> {
        let maps = error::maps(self.pid()).map_err(ResolveError::Process)?;
        let syms = ProcessSymbols::from_maps(maps, Arc::clone(&self.shared.symbols));
        let (library, name) = match spec.rsplit_once(':') {
            Some((l, n)) => (Some(l), n),
            None => (None, spec),
        };
        syms.resolve(library, name)
            .map(|l| l.start)
            .map_err(ResolveError::Symbol)
    }

    /// Run a just-spawned (or just exec'd) program to its entry point, where the dynamic
    /// loader has mapped its libraries: then `library:symbol` resolves. Returns
    /// `Ok(None)` with the program stopped there (held until the next run), or the stop
    /// that came first. Uses a temporary probe at the entry address, whose hit is not
    /// served but held: the thread executes the entry instruction when resumed.
    pub fn run_to_entry(&mut self) -> Result<Option<Stop>> {
        let maps = error::maps(self.pid())?;
        let entry = ProcessSymbols::from_maps(maps, Arc::clone(&self.shared.symbols))
            .entry(None)
            .ok_or_else(|| Error::Backend("the program's entry point is unknown".into()))?;
        let reached = Arc::new(AtomicBool::new(false));
        let probe = self.registry.register(entry, |_| {})?;
        self.hold_at = Some((entry, Arc::clone(&reached)));
        let stop = self.run_until(|| reached.load(Ordering::Relaxed));
        self.hold_at = None;
        // Unregisters at once (no hit can be running it: the thread is held), which puts
        // the entry instruction back.
        drop(probe);
        stop
    }

    /// Whether a trap at `addr` is the entry hold's (see [`Tracer::run_to_entry`]):
    /// then it is marked reached, and the caller holds the thread there.
    pub(crate) fn reached_entry_hold(&self, addr: u64) -> bool {
        match &self.hold_at {
            Some((a, reached)) if *a == addr => {
                reached.store(true, Ordering::Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Base addresses of the out-of-line pages mapped into the tracee.
    pub fn xol_pages(&self) -> Vec<u64> {
        self.shared.lock().xol.pages()
    }

    /// The spawned child's `std::process::Child` (for its stdin/stdout/stderr pipes).
    /// Do not `wait` on it: the tracer reaps the process and reports its exit status.
    pub fn take_child(&mut self) -> Option<std::process::Child> {
        self.child.take()
    }

    /// A handle that asks [`Tracer::run`] to detach, usable from any thread or from a
    /// signal handler (a Ctrl-C handler). Forks the small doorbell process the first
    /// time (see the `doorbell` module).
    pub fn detach_handle(&mut self) -> Result<DetachHandle> {
        self.bell.handle()
    }

    /// Serve hits until the process exits, execs, or a detach is requested.
    pub fn run(&mut self) -> Result<Stop> {
        loop {
            if let Some(stop) = self.run_until(|| false)? {
                return Ok(stop);
            }
        }
    }

    /// Like [`Tracer::run`], but also return `Ok(None)` as soon as `done()` is true;
    /// it is checked before waiting for each event. The process keeps running.
    pub fn run_until(&mut self, mut done: impl FnMut() -> bool) -> Result<Option<Stop>> {
        // Reports queued first: a follower's exit taken while the family was paused
        // comes before the end it may lead to.
        if !self.family.queued.is_empty() {
            self.adopt_born();
            return Ok(Some(self.take_queued()));
        }
        if let (Some(status), true) = (self.exit, self.family.members.is_empty()) {
            return Ok(Some(Stop::Exited(status)));
        }
        if self.shared.lock().status == Status::Detached {
            return Ok(Some(Stop::Detached));
        }
        if self.exit.is_none() {
            self.prepare_resume()?;
        }
        self.resume_followers()?;
        loop {
            if self.bell.requested() {
                self.detach_now()?;
                return Ok(Some(Stop::Detached));
            }
            if done() {
                return Ok(None);
            }
            // Collectors registered, changed or gone: promote, repoint or demote with
            // every thread stopped (`collect/promote.rs`).
            self.rework_collect()?;
            // Libraries loaded since the return trampoline was placed: their unwinders.
            self.rehook_unwinders();
            if !self.family.queued.is_empty() {
                // A fork or a follower's exit reported while the rework stopped
                // everyone: the family stays held until the user has seen it.
                self.adopt_born();
                return Ok(Some(self.take_queued()));
            }
            if let (Some(status), true) = (self.exit, self.family.members.is_empty()) {
                // It ended while the rework stopped everyone (that exit report was
                // taken there).
                return Ok(Some(Stop::Exited(status)));
            }
            // Asked again right before the wait: a ring during the rework was taken (and
            // the doorbell let go) by the rework's own waits, so nothing would wake the
            // wait below for it, and an idle program would stay attached.
            if self.bell.requested() {
                self.detach_now()?;
                return Ok(Some(Stop::Detached));
            }
            if let Some(stop) = self.serve_one()? {
                return Ok(Some(stop));
            }
            if !self.family.queued.is_empty() {
                // A fork seen inside another event's handling (a single-stepped
                // `syscall`): its child is held until its user has seen it.
                return Ok(Some(self.take_queued()));
            }
        }
    }

    /// Serve events until no thread is inside a trap-after slot waiting for its
    /// post-handlers, then return `Ok(None)` (or the stop that came first).
    ///
    /// A thread waiting for its post holds a read section of the registry on this
    /// thread, so [`multiprobe_core::Registry::unregister`] called here would return
    /// `InsideDispatch` instead of waiting for it: settle first. (Threads get there
    /// quickly: one instruction and a trap; a thread that sits in a signal handler
    /// meanwhile is waited for.)
    pub fn settle(&mut self) -> Result<Option<Stop>> {
        if !self.threads.any_pending_post() {
            return Ok(None);
        }
        self.resume_held()?;
        while self.threads.any_pending_post() {
            if let Some(stop) = self.serve_one()? {
                return Ok(Some(stop));
            }
        }
        Ok(None)
    }

    /// Wait for the next event and serve it; `Some` if it ended the run (the process is
    /// gone, or a stop the caller must see).
    fn serve_one(&mut self) -> Result<Option<Stop>> {
        match self.next_event()? {
            Next::Event(w) => {
                let stop = self.handle(w);
                self.adopt_born();
                stop
            }
            Next::Gone(stop) => Ok(Some(stop)),
        }
    }

    /// The next event: one set aside earlier (during an injection), else the next
    /// `waitpid` report of any tracee of this thread.
    fn next_event(&mut self) -> Result<Next> {
        if let Some(w) = self.aside.pop_wait() {
            return Ok(Next::Event(w));
        }
        for m in &mut self.family.members {
            if let Some(w) = m.aside.pop_wait() {
                return Ok(Next::Event(w));
            }
        }
        loop {
            match sys::wait(None, false) {
                Ok(Some(w)) => return Ok(Next::Event(w)),
                Ok(None) => continue,
                // Nothing left to wait for: the process went without a report (reaped
                // elsewhere).
                Err(Errno::CHILD) => {
                    let status = self.exit.unwrap_or_else(|| self.gone(ExitStatus::Unknown));
                    self.family.members.clear();
                    return Ok(Next::Gone(Stop::Exited(status)));
                }
                Err(e) => return Err(error::sys(e, "wait for the tracee")),
            }
        }
    }

    /// Before running on: read what the program set for SIGTRAP, and end every stop the
    /// loop holds.
    pub(crate) fn prepare_resume(&mut self) -> Result<()> {
        self.trap.refresh(self.shared.pid, &self.threads);
        self.learn_action_if_held();
        self.resume_held()
    }

    fn resume_held(&mut self) -> Result<()> {
        self.threads
            .resume_held()
            .map_err(|e| error::sys(e, "resume the traced threads"))
    }

    /// The first stop queued while the family was held (non-empty queue), as this
    /// tracer reports it: an exec queued by this process's own tracer is its
    /// [`Stop::Exec`].
    fn take_queued(&mut self) -> Stop {
        match self.family.queued.remove(0) {
            Stop::ProcessExec { pid, unregistered } if pid == self.pid() => {
                Stop::Exec { unregistered }
            }
            other => other,
        }
    }

    /// Resume `tid` from the stop being served, delivering `sig` — or, with none, a
    /// signal held back for it during an injection.
    pub(crate) fn resume(&mut self, tid: Tid, sig: Option<Signal>) -> Result<()> {
        let sig = sig.or_else(|| self.aside.take_signal(tid));
        let Some(th) = self.threads.get_mut(tid) else {
            return Ok(()); // gone meanwhile
        };
        th.resume_now(tid, sig)
            .map_err(|e| error::sys(e, format_args!("resume thread {tid:?}")))
    }

    /// The process is gone: forget its threads, stop patching.
    pub(crate) fn gone(&mut self, status: ExitStatus) -> ExitStatus {
        // What the tracee wrote is still in our mapping of the area.
        self.final_drain();
        for tid in self.threads.tids() {
            self.returns_thread_gone(tid);
        }
        self.threads.clear();
        let mut st = self.shared.lock();
        st.status = Status::Gone;
        st.code = None;
        st.armed.clear();
        st.xol.clear();
        st.semaphores.clear();
        drop(st);
        self.shared.quiet.end();
        self.exit = Some(status);
        status
    }

    /// An exit report: of the doorbell, a thread, a vfork child or the process.
    fn on_end(&mut self, w: Wait) -> Result<Option<Stop>> {
        let tid = w.tid();
        if self.bell.on_exit(tid) {
            return Ok(None);
        }
        self.returns_thread_gone(tid);
        self.shadow_thread_gone(tid);
        self.threads.remove(tid);
        self.children.forget(tid);
        self.trap.forget(tid);
        if tid != self.tid() {
            return Ok(None);
        }
        let status = match w {
            Wait::Exited(_, c) => ExitStatus::Code(c),
            Wait::Killed(_, s) => ExitStatus::Signal(s),
            _ => unreachable!("only ends come here"),
        };
        let status = self.gone(status);
        Ok(Some(self.first_gone(status)))
    }

    pub(crate) fn handle(&mut self, w: Wait) -> Result<Option<Stop>> {
        let tid = w.tid();
        if !self.threads.contains(tid) {
            if let Some(i) = self.follower_of(tid) {
                return self.handle_follower(i, w);
            }
        }
        if w.is_end() {
            return self.on_end(w);
        }
        if self.bell.on_stop(tid) {
            return Ok(None);
        }
        if !self.threads.contains(tid) && !self.adopt(tid, w) {
            return Ok(None);
        }
        match w {
            Wait::Signal(_, Signal::TRAP) => self.on_trap(tid)?,
            Wait::Signal(_, sig) => self.on_signal(tid, sig)?,
            Wait::Syscall(_) => self.resume(tid, None)?,
            Wait::Event(_, Event::Stop(sig)) if sig.is_stop() => {
                // Group-stop: stay stopped, but report the SIGCONT that ends it.
                let th = self.threads.known(tid);
                th.hold_group_stop();
                th.resume(tid).map_err(|e| error::sys(e, "listen"))?;
            }
            Wait::Event(_, Event::Clone) => {
                if let Ok(new) = sys::event_pid(tid) {
                    self.note_clone(tid, new);
                    self.claim_thread(tid, new)?;
                }
                self.resume(tid, None)?;
            }
            Wait::Event(_, Event::Stop(_)) if self.trap.first_stop(tid) => {
                // A new thread announced by its creator, before its first instruction.
                self.learn_action(tid);
                self.resume(tid, None)?;
            }
            Wait::Event(_, ev @ (Event::Fork | Event::Vfork)) => {
                let mut followed = None;
                if let Ok(child) = sys::event_pid(tid) {
                    if self.new_child(child, ev == Event::Vfork, tid)? {
                        followed = Some(child);
                    }
                }
                self.resume(tid, None)?;
                if let Some(child) = followed {
                    return Ok(Some(Stop::Forked {
                        parent: self.pid(),
                        child: child.as_raw_pid(),
                        execed: false,
                    }));
                }
            }
            Wait::Event(_, Event::Exec) => return self.on_exec(tid),
            Wait::Event(..) => self.resume(tid, None)?,
            Wait::Exited(..) | Wait::Killed(..) => unreachable!("handled above"),
        }
        Ok(None)
    }
}

/// Why [`Tracer::resolve`] gave no address.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// The name does not resolve in the process (the reason, with what exists).
    #[error("{0}")]
    Symbol(#[from] multiprobe_symbols::ResolveError),
    /// The process's address space could not be read (it is gone, or not ours).
    #[error(transparent)]
    Process(Error),
}

impl From<ResolveError> for Error {
    fn from(e: ResolveError) -> Error {
        match e {
            ResolveError::Process(e) => e,
            ResolveError::Symbol(e) => Error::Backend(e.to_string()),
        }
    }
}
