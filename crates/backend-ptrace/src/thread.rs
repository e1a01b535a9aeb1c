//! One traced thread: where it stands with the tracer ([`Run`], one state machine with
//! its transitions here, as the kernel's `uprobe_task` keeps one state per task), the
//! out-of-line slots it may be inside, and the core's per-thread dispatch state.
//!
//! ```text
//!            report (stop)            hold(deliver)
//!  Running ─────────────► served ──────────────────► Held { deliver }
//!     ▲                     │ resume_now(sig)            │ resume() = PTRACE_CONT(deliver)
//!     └─────────────────────┘◄───────────────────────────┘
//!     ▲                                                  │ group-stop report: hold_group_stop()
//!     └──────── resume() = PTRACE_LISTEN ◄──── GroupStop ◄┘
//! ```
//!
//! Every resume and detach request for a thread goes through [`Thread`]: a thread the
//! loop holds is never resumed twice, and one that is running is never detached (which
//! the kernel would refuse) — detaching first stops it (see `detach.rs`).
//!
//! Slots: `slots` lists the out-of-line slots the thread may be inside, innermost last:
//! one it was sent to and has not been seen stopped outside of since, and below it any
//! it will return to when a signal handler that interrupted it there returns
//! (`suspended`). Their references keep the slots' bytes from being reused.

use std::collections::HashMap;
use std::sync::Arc;

use multiprobe_core::backend::ThreadState;
use multiprobe_x86::SlotKind;

use crate::backend::{SiteInner, Slots};
use crate::sys::{self, Errno, RawSigInfo, Signal, SysResult, Tid};

/// Where a thread stands with the tracer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Run {
    /// Resumed: its next change is reported to the loop.
    Running,
    /// In a ptrace-stop that the loop has not ended; resumed delivering `deliver`.
    Held { deliver: Option<Signal> },
    /// In group-stop: "resumed" with `PTRACE_LISTEN`, which leaves it stopped but lets
    /// it report the `SIGCONT` that ends the stop.
    GroupStop,
}

/// What kind of task it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// A thread of the traced process.
    Thread,
    /// A vfork child: another process sharing the tracee's memory, followed until it
    /// execs or exits.
    VforkChild,
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
    pub(crate) deferred: Option<RawSigInfo>,
}

impl InSlot {
    pub(crate) fn new(site: Arc<SiteInner>, kind: SlotKind) -> InSlot {
        InSlot {
            site,
            kind,
            suspended: false,
            deferred: None,
        }
    }

    pub(crate) fn slots(&self) -> &Slots {
        self.site
            .slots
            .get()
            .expect("a thread is only sent to placed slots")
    }
}

#[derive(Debug)]
pub(crate) struct Thread {
    run: Run,
    kind: Kind,
    /// The core's dispatch state of this thread (read sections, deferred posts).
    pub(crate) ts: ThreadState,
    /// See the module docs.
    pub(crate) slots: Vec<InSlot>,
    /// Whether the last hit of this thread needed its registers: then the next one
    /// probably does too, and reads them all at once (`PTRACE_GETREGS`) instead of
    /// reading `rip` first and the rest when asked (which would be two requests).
    pub(crate) wants_regs: bool,
}

impl Thread {
    /// A thread reported for the first time while running (a new thread, or one just
    /// seized).
    pub(crate) fn running(kind: Kind) -> Thread {
        Thread {
            run: Run::Running,
            kind,
            ts: ThreadState::new(),
            slots: Vec::new(),
            wants_regs: false,
        }
    }

    /// A thread in a ptrace-stop the loop keeps until its next run.
    pub(crate) fn held(deliver: Option<Signal>) -> Thread {
        Thread {
            run: Run::Held { deliver },
            ..Thread::running(Kind::Thread)
        }
    }

    pub(crate) fn kind(&self) -> Kind {
        self.kind
    }

    pub(crate) fn is_held(&self) -> bool {
        self.run != Run::Running
    }

    /// Held in a ptrace-stop with no signal to deliver: a system call can be injected
    /// there without losing one (if the stop is not inside a system call).
    pub(crate) fn holds_nothing(&self) -> bool {
        self.run == Run::Held { deliver: None }
    }

    /// Keep the thread in the stop it reported, to be resumed with `deliver`.
    pub(crate) fn hold(&mut self, deliver: Option<Signal>) {
        self.run = Run::Held { deliver };
    }

    /// The thread reported its group-stop: keep it there.
    pub(crate) fn hold_group_stop(&mut self) {
        self.run = Run::GroupStop;
    }

    /// The signal a held thread is to get, taken away (it is delivered otherwise).
    pub(crate) fn take_deliver(&mut self) -> Option<Signal> {
        match &mut self.run {
            Run::Held { deliver } => deliver.take(),
            _ => None,
        }
    }

    /// End the stop the loop holds the thread in (`PTRACE_CONT` with its signal, or
    /// `PTRACE_LISTEN` in group-stop). A thread that is running is left alone. A thread
    /// killed meanwhile (`ESRCH`) counts as resumed: its exit is reported next.
    pub(crate) fn resume(&mut self, tid: Tid) -> SysResult<()> {
        let r = match self.run {
            Run::Running => return Ok(()),
            Run::Held { deliver } => sys::cont(tid, deliver),
            Run::GroupStop => sys::listen(tid),
        };
        self.run = Run::Running;
        gone_is_ok(r)
    }

    /// Resume the thread from the stop the loop is serving right now, delivering `sig`.
    pub(crate) fn resume_now(&mut self, tid: Tid, sig: Option<Signal>) -> SysResult<()> {
        self.run = Run::Running;
        gone_is_ok(sys::cont(tid, sig))
    }

    /// Stop tracing the thread, which must be held; it runs on with its signal (a
    /// thread in group-stop goes back to it).
    pub(crate) fn detach(mut self, tid: Tid) -> SysResult<()> {
        self.ts.abandon();
        let deliver = self.take_deliver();
        gone_is_ok(sys::detach(tid, deliver))
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

/// `ESRCH` from a request on a thread that was just killed is not an error for the
/// loop: the thread's exit is reported next.
pub(crate) fn gone_is_ok(r: SysResult<()>) -> SysResult<()> {
    match r {
        Err(Errno::SRCH) => Ok(()),
        r => r,
    }
}

/// Every traced thread (and vfork child), by id.
#[derive(Debug, Default)]
pub(crate) struct Threads {
    map: HashMap<Tid, Thread>,
}

impl Threads {
    pub(crate) fn new(initial: impl IntoIterator<Item = (Tid, Thread)>) -> Threads {
        Threads {
            map: initial.into_iter().collect(),
        }
    }

    pub(crate) fn get(&self, tid: Tid) -> Option<&Thread> {
        self.map.get(&tid)
    }

    pub(crate) fn get_mut(&mut self, tid: Tid) -> Option<&mut Thread> {
        self.map.get_mut(&tid)
    }

    /// The thread `tid`, which the caller knows is traced.
    pub(crate) fn known(&mut self, tid: Tid) -> &mut Thread {
        self.map.get_mut(&tid).expect("a traced thread")
    }

    pub(crate) fn contains(&self, tid: Tid) -> bool {
        self.map.contains_key(&tid)
    }

    /// Start tracking `tid` unless it is already.
    pub(crate) fn add(&mut self, tid: Tid, th: Thread) {
        self.map.entry(tid).or_insert(th);
    }

    /// Start tracking `tid` afresh (an exec'd leader), replacing what was known.
    pub(crate) fn replace(&mut self, tid: Tid, th: Thread) {
        if let Some(old) = self.map.insert(tid, th) {
            old.ts.abandon();
        }
    }

    /// The thread is gone: forget it (its deferred steps end).
    pub(crate) fn remove(&mut self, tid: Tid) -> Option<Thread> {
        let th = self.map.remove(&tid)?;
        th.ts.abandon();
        Some(th)
    }

    /// Forget every thread (the process is gone, or exec'd).
    pub(crate) fn clear(&mut self) {
        for (_, th) in self.map.drain() {
            th.ts.abandon();
        }
    }

    /// Every thread, taken out (to detach them).
    pub(crate) fn take_all(&mut self) -> Vec<(Tid, Thread)> {
        self.map.drain().collect()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    pub(crate) fn tids(&self) -> Vec<Tid> {
        self.map.keys().copied().collect()
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = (Tid, &Thread)> {
        self.map.iter().map(|(&t, th)| (t, th))
    }

    /// Threads that are running (not held by the loop).
    pub(crate) fn running(&self) -> Vec<Tid> {
        self.iter()
            .filter(|(_, t)| !t.is_held())
            .map(|(t, _)| t)
            .collect()
    }

    /// Threads the loop holds.
    pub(crate) fn held(&self) -> Vec<Tid> {
        self.iter()
            .filter(|(_, t)| t.is_held())
            .map(|(t, _)| t)
            .collect()
    }

    pub(crate) fn all_held(&self) -> bool {
        self.map.values().all(Thread::is_held)
    }

    /// Whether some thread still waits for post-handlers (inside a trap-after slot).
    pub(crate) fn any_pending_post(&self) -> bool {
        self.map.values().any(|t| t.ts.pending() != 0)
    }

    /// End every stop the loop holds; the first failure other than a thread gone.
    pub(crate) fn resume_held(&mut self) -> SysResult<()> {
        let mut result = Ok(());
        for (&tid, th) in &mut self.map {
            if let Err(e) = th.resume(tid) {
                result = result.and(Err(e));
            }
        }
        result
    }
}
