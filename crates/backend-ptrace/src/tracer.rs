//! The tracer: owns the traced process's threads and runs the event loop that serves
//! hits, on the one thread that may make ptrace requests for them.
//!
//! Invariants:
//! * Every thread of the tracee (and every vfork child, which shares its memory) has
//!   a [`Thread`] here from its first reported stop on, and loses it at its exit.
//! * `held` is `Some` exactly while a thread sits in a ptrace-stop that the loop has
//!   not resumed; it says which signal to deliver when it is resumed or detached.
//! * `slots` lists the out-of-line slots a thread may be inside, innermost last: one
//!   it was sent to and has not been seen stopped outside of since, and below it any
//!   it will return to when a signal handler that interrupted it there returns
//!   (`suspended`). Their references keep the slots' bytes from being reused.
//! * Handlers run here, with the thread stopped: a hit is one stop — pre-handlers, then
//!   the instruction emulated or run from the jump-back slot — and a second stop only
//!   for post-handlers of a relocated instruction (the trap-after slot).

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use multiprobe_core::backend::{Dispatcher, ThreadState};
use multiprobe_core::{Error, HandlerInfo, Registry, Result};
use multiprobe_symbols::ProcessSymbols;
use multiprobe_x86::SlotKind;

use crate::backend::{PtraceBackend, Shared, Site, SiteInner, Slots, Status};
use crate::doorbell::{DetachHandle, Doorbell};
use crate::error;
use crate::inject::Aside;
use crate::mem::{CodeMemory, TraceeMemory};
use crate::sys::{self, Errno, Tid, Wait};

/// How the traced process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
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
}

const PTRACE_EVENT_STOP: i32 = 128;
/// Offset of `rip` in `user_regs_struct`, for `PTRACE_POKEUSER`.
pub(crate) const RIP: usize = 16 * 8;

/// What waiting for the next tracee event gave.
enum Next {
    Event(Wait),
    /// Interrupted or nothing reported: wait again.
    Again,
    /// No tracee is left.
    Gone(Stop),
}

/// A slot a thread may be inside.
#[derive(Debug)]
pub(crate) struct InSlot {
    pub(crate) site: Arc<SiteInner>,
    pub(crate) kind: SlotKind,
    /// A signal handler interrupted the thread here; it comes back on return.
    pub(crate) suspended: bool,
    /// An asynchronous signal that arrived as the thread entered the slot, held back
    /// until the instruction has run (delivered at the slot's trailing `int3`).
    pub(crate) deferred: Option<sys::RawSigInfo>,
}

impl InSlot {
    pub(crate) fn slots(&self) -> &Slots {
        self.site
            .slots
            .get()
            .expect("a thread is only sent to placed slots")
    }
}

#[derive(Debug)]
pub(crate) struct Thread {
    pub(crate) ts: ThreadState,
    pub(crate) slots: Vec<InSlot>,
    pub(crate) held: Option<i32>,
    /// Held in group-stop (resume with `PTRACE_LISTEN`).
    pub(crate) group_stop: bool,
    /// A vfork child: another process sharing the tracee's memory, followed until it
    /// execs or exits.
    pub(crate) vfork_child: bool,
    /// Whether the last hit of this thread needed its registers: then the next one
    /// probably does too, and reads them all at once (`PTRACE_GETREGS`) instead of
    /// reading `rip` first and the rest when asked (which would be two requests).
    pub(crate) wants_regs: bool,
}

impl Thread {
    pub(crate) fn new(held: Option<i32>) -> Thread {
        Thread {
            ts: ThreadState::new(),
            slots: Vec::new(),
            held,
            group_stop: false,
            vfork_child: false,
            wants_regs: false,
        }
    }

    /// The thread stopped at `rip`: forget the slots it has provably left. The
    /// innermost one is left unless `rip` is in it; a suspended one only on its return.
    pub(crate) fn prune(&mut self, rip: u64) {
        while let Some(top) = self.slots.last_mut() {
            if top.slots().contains(rip) {
                top.suspended = false;
                return;
            }
            if top.suspended {
                return;
            }
            self.slots.pop();
        }
    }
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
    pub(crate) threads: HashMap<Tid, Thread>,
    /// Stops of new processes reported before their parent's fork event.
    pub(crate) orphans: HashMap<Tid, Wait>,
    pub(crate) aside: Aside,
    pub(crate) doorbell: Option<Doorbell>,
    pub(crate) detach_flag: Arc<AtomicBool>,
    pub(crate) child: Option<std::process::Child>,
    pub(crate) syscall_insn: Option<u64>,
    pub(crate) exit: Option<ExitStatus>,
    /// A breakpoint address whose hit holds the thread instead of serving it (see
    /// [`Tracer::run_to_entry`]), and the flag raised when that happens.
    pub(crate) hold_at: Option<(u64, Arc<AtomicBool>)>,
    /// Signals to send again with `tgkill` after detaching (they were held back and
    /// the thread's stop at detach cannot deliver them).
    pub(crate) resend: Vec<(Tid, i32)>,
    /// This thread's one tracer (also what makes `Tracer` neither `Send` nor `Sync`).
    pub(crate) _claim: ThreadClaim,
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

fn is_stop_signal(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSTOP | libc::SIGTSTP | libc::SIGTTIN | libc::SIGTTOU
    )
}

impl Tracer {
    /// A tracer for `pid`, whose threads are already seized (`held`: those stopped).
    pub(crate) fn new(pid: Tid, held: &[(Tid, Option<i32>)], claim: ThreadClaim) -> Result<Tracer> {
        let shared = Shared::new(pid, CodeMemory::open(pid)?);
        let registry = Registry::new(PtraceBackend {
            shared: Arc::clone(&shared),
        });
        let dispatcher = registry.dispatcher();
        let threads = held.iter().map(|&(t, h)| (t, Thread::new(h))).collect();
        Ok(Tracer {
            shared,
            registry,
            dispatcher,
            mem: TraceeMemory::new(pid),
            threads,
            orphans: HashMap::new(),
            aside: Aside::default(),
            doorbell: None,
            detach_flag: Arc::new(AtomicBool::new(false)),
            child: None,
            syscall_insn: None,
            exit: None,
            hold_at: None,
            resend: Vec::new(),
            _claim: claim,
        })
    }

    /// The traced process's id.
    pub fn pid(&self) -> i32 {
        self.shared.pid
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

    /// Thread ids currently traced.
    pub fn threads(&self) -> Vec<i32> {
        let mut v: Vec<i32> = self.threads.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// The address of a function in the tracee: `symbol` (the main program first, then
    /// every mapped file) or `file:symbol` (`libc:write`).
    pub fn resolve(&self, spec: &str) -> Result<u64> {
        let maps = error::maps(self.pid())?;
        let syms = ProcessSymbols::from_maps(maps, Arc::clone(&self.shared.symbols));
        let (library, name) = match spec.rsplit_once(':') {
            Some((l, n)) => (Some(l), n),
            None => (None, spec),
        };
        syms.resolve(library, name)
            .map(|l| l.start)
            .map_err(|e| Error::Backend(format!("process {}: {e}", self.pid())))
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
        if self.doorbell.is_none() {
            self.doorbell = Some(Doorbell::new()?);
        }
        let bell = self.doorbell.as_ref().expect("just created");
        Ok(bell.handle(&self.detach_flag))
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
        if let Some(status) = self.exit {
            return Ok(Some(Stop::Exited(status)));
        }
        if self.shared.lock().status == Status::Detached {
            return Ok(Some(Stop::Detached));
        }
        self.resume_held()?;
        loop {
            if self.detach_flag.load(Ordering::SeqCst) {
                self.detach_now()?;
                return Ok(Some(Stop::Detached));
            }
            if done() {
                return Ok(None);
            }
            if let Some(stop) = self.serve_one()? {
                return Ok(Some(stop));
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
        if self.threads.values().all(|t| t.ts.pending() == 0) {
            return Ok(None);
        }
        self.resume_held()?;
        loop {
            if self.threads.values().all(|t| t.ts.pending() == 0) {
                return Ok(None);
            }
            if let Some(stop) = self.serve_one()? {
                return Ok(Some(stop));
            }
        }
    }

    /// Wait for the next event and serve it; `Some` if it ended the run (the process is
    /// gone, or a stop the caller must see).
    fn serve_one(&mut self) -> Result<Option<Stop>> {
        match self.next_event()? {
            Next::Event(w) => self.handle(w),
            Next::Again => Ok(None),
            Next::Gone(stop) => Ok(Some(stop)),
        }
    }

    /// The next event: one set aside earlier (during an injection), else the next
    /// `waitpid` report of any tracee of this thread.
    fn next_event(&mut self) -> Result<Next> {
        if let Some(w) = self.aside.waits.pop_front() {
            return Ok(Next::Event(w));
        }
        match sys::wait(-1, false) {
            Ok(Some(w)) => Ok(Next::Event(w)),
            Ok(None) => Ok(Next::Again),
            // Nothing left to wait for: the process went without a report (reaped
            // elsewhere).
            Err(Errno::ECHILD) => Ok(Next::Gone(Stop::Exited(self.gone(ExitStatus::Signal(0))))),
            Err(e) => Err(error::sys(e, "wait for the tracee")),
        }
    }

    fn resume_held(&mut self) -> Result<()> {
        let tids: Vec<Tid> = self
            .threads
            .iter()
            .filter(|(_, t)| t.held.is_some())
            .map(|(&t, _)| t)
            .collect();
        for tid in tids {
            let th = self.threads.get_mut(&tid).expect("listed");
            let sig = th.held.take().unwrap_or(0);
            let r = if th.group_stop {
                sys::listen(tid)
            } else {
                sys::cont(tid, sig)
            };
            // A thread killed meanwhile reports its exit to the loop.
            if let Err(e) = r.filter_gone() {
                return Err(error::sys(e, format_args!("resume thread {tid}")));
            }
        }
        Ok(())
    }

    /// Resume `tid` from a stop, delivering `sig` or a signal held back during an
    /// injection.
    pub(crate) fn resume(&mut self, tid: Tid, sig: i32) -> Result<()> {
        let mut sig = sig;
        if sig == 0 {
            if let Some(i) = self.aside.signals.iter().position(|&(t, _)| t == tid) {
                sig = self.aside.signals.remove(i).1;
            }
        }
        sys::cont(tid, sig)
            .filter_gone()
            .map_err(|e| error::sys(e, format_args!("resume thread {tid}")))
    }

    /// The process is gone: forget its threads, stop patching.
    pub(crate) fn gone(&mut self, status: ExitStatus) -> ExitStatus {
        for (_, th) in self.threads.drain() {
            th.ts.abandon();
        }
        let mut st = self.shared.lock();
        st.status = Status::Gone;
        st.code = None;
        st.armed.clear();
        st.xol.clear();
        drop(st);
        self.exit = Some(status);
        status
    }

    pub(crate) fn handle(&mut self, w: Wait) -> Result<Option<Stop>> {
        let pid = self.pid();
        let (tid, sig, event) = match w {
            Wait::Exited(tid, _) | Wait::Signaled(tid, _) => {
                if self.doorbell.as_ref().is_some_and(|d| d.pid == tid) {
                    // Reaped: its pid may be reused at once, never signal it again.
                    if let Some(mut d) = self.doorbell.take() {
                        d.reaped = true;
                    }
                    return Ok(None);
                }
                if let Some(th) = self.threads.remove(&tid) {
                    th.ts.abandon();
                }
                self.orphans.remove(&tid);
                if tid == pid {
                    let status = match w {
                        Wait::Exited(_, c) => ExitStatus::Code(c),
                        Wait::Signaled(_, s) => ExitStatus::Signal(s),
                        Wait::Stopped { .. } => unreachable!(),
                    };
                    return Ok(Some(Stop::Exited(self.gone(status))));
                }
                return Ok(None);
            }
            Wait::Stopped { tid, sig, event } => (tid, sig, event),
        };
        if let Some(bell) = &self.doorbell {
            if bell.pid == tid {
                bell.rearm();
                return Ok(None);
            }
        }
        if !self.threads.contains_key(&tid) && !self.adopt(tid, w)? {
            return Ok(None);
        }
        match event {
            0 if sig == libc::SIGTRAP => self.on_trap(tid)?,
            0 if sig == libc::SIGTRAP | 0x80 => self.resume(tid, 0)?,
            0 => self.on_signal(tid, sig)?,
            PTRACE_EVENT_STOP if is_stop_signal(sig) => {
                // Group-stop: stay stopped, but report the SIGCONT that ends it.
                sys::listen(tid)
                    .filter_gone()
                    .map_err(|e| error::sys(e, "listen"))?;
            }
            libc::PTRACE_EVENT_CLONE => {
                if let Ok(new) = sys::event_msg(tid) {
                    self.threads
                        .entry(new as Tid)
                        .or_insert_with(|| Thread::new(None));
                }
                self.resume(tid, 0)?;
            }
            libc::PTRACE_EVENT_FORK | libc::PTRACE_EVENT_VFORK => {
                if let Ok(child) = sys::event_msg(tid) {
                    self.new_child(child as Tid, event == libc::PTRACE_EVENT_VFORK)?;
                }
                self.resume(tid, 0)?;
            }
            libc::PTRACE_EVENT_EXEC => return self.on_exec(tid),
            _ => self.resume(tid, 0)?,
        }
        Ok(None)
    }
}

/// `ESRCH` from a request on a thread that was just killed is not an error for the
/// loop: the thread's exit is reported next.
pub(crate) trait FilterGone {
    fn filter_gone(self) -> std::result::Result<(), Errno>;
}

impl FilterGone for std::result::Result<(), Errno> {
    fn filter_gone(self) -> std::result::Result<(), Errno> {
        match self {
            Err(Errno::ESRCH) => Ok(()),
            r => r,
        }
    }
}
