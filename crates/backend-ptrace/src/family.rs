//! Following fork children ([`Tracer::follow_forks`]): every followed process is a
//! [`Tracer`] of its own — its threads, its memory, its breakpoints, its XOL pages and
//! its registry — kept in the family of the first one, whose loop serves them all.
//!
//! The protocol, as users see it: at a fork of a followed process, the child is held
//! at its first stop, *clean* (every breakpoint, XOL page copy and raised semaphore it
//! inherited is taken out of its copy of memory, exactly as for a child that is not
//! followed), and [`Stop::Forked`] is returned. The user registers what it wants in
//! the child's registry ([`Tracer::registry_of`]) — the same probes as in the parent,
//! typically — and runs on; the child runs only then, so none of its calls is missed.
//! A vfork child shares its parent's memory: it runs as a thread of the parent (its
//! hits are the parent's) until it executes a program, and from there, followed, it is
//! a process of its own (`Stop::Forked` with `execed`, held at its new program's first
//! instruction). A follower's exec is [`Stop::ProcessExec`] (held as for [`Stop::Exec`]), its end
//! [`Stop::ProcessExited`]; when the first process ends while followed ones remain,
//! that is a `ProcessExited` too, and [`Stop::Exited`] (with the first process's
//! status) comes once no traced process is left. A collecting backend adopts the child
//! the same way: its registrations in the child's registry make the child's own copy.
//!
//! Invariants:
//! * Every event of a followed process's task is handled by that process's tracer: the
//!   first tracer's loop routes each report by the task (or, for a task not seen yet,
//!   by its thread group).
//! * What every tracer of the family must share is lent to the one handling an event
//!   and taken back after: the stops of new processes that came before their parent's
//!   fork event (`children`) and the reports set aside during an injection (`aside`).
//! * Without followers none of this costs anything: the family is empty and the
//!   routing is one emptiness check per event of an unknown task.

use multiprobe_core::Result;

use crate::sys::{Tid, Wait};
use crate::tracer::{ExitStatus, Stop, Tracer};

/// The followed processes of a [`Tracer`] (only the first tracer of a family has any)
/// and those born to a follower while it handled an event (moved to the first tracer's
/// family after it).
#[derive(Default)]
pub(crate) struct Family {
    pub(crate) members: Vec<Tracer>,
    pub(crate) born: Vec<Tracer>,
    /// Forks seen while stopping the family (`pause`), to report at the next run.
    pub(crate) queued: Vec<Stop>,
    /// Follow fork children (set on the first tracer, inherited by followers).
    pub(crate) follow: bool,
}

impl std::fmt::Debug for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Family")
            .field(
                "members",
                &self.members.iter().map(|m| m.pid()).collect::<Vec<_>>(),
            )
            .field("follow", &self.follow)
            .finish()
    }
}

/// What a follower's event meant to the family.
fn translate(pid: i32, stop: Stop) -> Stop {
    match stop {
        Stop::Exited(status) => Stop::ProcessExited { pid, status },
        Stop::Exec { unregistered } => Stop::ProcessExec { pid, unregistered },
        other => other,
    }
}

impl Tracer {
    /// Follow fork children from now on (`on`), or free them of every probe and let
    /// them go (the default). See the `family` module: each child is held at its first
    /// stop, clean, and reported as [`Stop::Forked`]; register its probes through
    /// [`Tracer::registry_of`] before running on. vfork children, which share the
    /// parent's memory, are followed either way until they exec or exit.
    pub fn follow_forks(&mut self, on: bool) {
        self.family.follow = on;
        for m in &mut self.family.members {
            m.family.follow = on;
        }
    }

    /// The registry of followed process `pid` (the first one's too).
    pub fn registry_of(
        &self,
        pid: i32,
    ) -> Option<&multiprobe_core::Registry<crate::PtraceBackend>> {
        if pid == self.pid() {
            return Some(&self.registry);
        }
        self.family
            .members
            .iter()
            .find(|m| m.pid() == pid)
            .map(|m| &m.registry)
    }

    /// The followed processes that are still traced, besides the first.
    pub fn followed(&self) -> Vec<i32> {
        self.family.members.iter().map(|m| m.pid()).collect()
    }

    /// The follower that handles `tid`'s reports, if one does (by its threads, or by
    /// thread group for a task not seen yet).
    pub(crate) fn follower_of(&self, tid: Tid) -> Option<usize> {
        if self.family.members.is_empty() {
            return None;
        }
        if let Some(i) = self
            .family
            .members
            .iter()
            .position(|m| m.threads.contains(tid))
        {
            return Some(i);
        }
        let tgid = crate::children::tgid_of(tid)?;
        self.family.members.iter().position(|m| m.pid() == tgid)
    }

    /// Run `f` on follower `i`, lending it what the family shares; then adopt the
    /// processes born meanwhile.
    pub(crate) fn with_follower<R>(&mut self, i: usize, f: impl FnOnce(&mut Tracer) -> R) -> R {
        let m = &mut self.family.members[i];
        std::mem::swap(&mut self.children, &mut m.children);
        std::mem::swap(&mut self.aside, &mut m.aside);
        let r = f(m);
        std::mem::swap(&mut self.children, &mut m.children);
        std::mem::swap(&mut self.aside, &mut m.aside);
        let born = std::mem::take(&mut m.family.born);
        let queued = std::mem::take(&mut m.family.queued);
        self.family.members.extend(born);
        self.family.queued.extend(queued);
        r
    }

    /// Handle a report of follower `i`'s task.
    pub(crate) fn handle_follower(&mut self, i: usize, w: Wait) -> Result<Option<Stop>> {
        let pid = self.family.members[i].pid();
        let stop = self.with_follower(i, |m| m.handle(w))?;
        let Some(stop) = stop else {
            return Ok(None);
        };
        if let Stop::Exited(_) = stop {
            // Its tracer goes; its registry lives on with whoever holds it.
            self.family.members.remove(i);
        }
        Ok(Some(translate(pid, stop)))
    }

    /// A followed fork child `child` of this process, held at its first stop and clean:
    /// its tracer, in the family (reported as [`Stop::Forked`] by the caller).
    pub(crate) fn adopt_child(&mut self, child: Tid) -> Result<()> {
        let deliver = self.aside.take_signal(child);
        let mut t = Tracer::follower(child, deliver)?;
        t.family.follow = self.family.follow;
        self.family.born.push(t);
        Ok(())
    }

    /// Take the processes born while this tracer handled an event into the family.
    pub(crate) fn adopt_born(&mut self) {
        let born = std::mem::take(&mut self.family.born);
        self.family.members.extend(born);
    }

    /// After a pause, which holds the family's reports instead of serving them: the
    /// exits it took are reported as serving them would have. A follower that is gone
    /// leaves the family with a [`Stop::ProcessExited`] queued; the first process, gone
    /// during the pause (`first_was_gone` false) with followers left, has one queued too
    /// (with none left, [`Stop::Exited`] comes next).
    pub(crate) fn queue_exits_taken(&mut self, first_was_gone: bool) {
        let mut i = 0;
        while i < self.family.members.len() {
            match self.family.members[i].exit_status() {
                Some(status) => {
                    let pid = self.family.members.remove(i).pid();
                    self.family
                        .queued
                        .push(translate(pid, Stop::Exited(status)));
                }
                None => i += 1,
            }
        }
        if let (false, Some(status)) = (first_was_gone, self.exit_status()) {
            if !self.family.members.is_empty() {
                let stop = self.first_gone(status);
                self.family.queued.push(stop);
            }
        }
    }

    /// End every held stop of the family's followers (see [`Tracer::run_until`]).
    pub(crate) fn resume_followers(&mut self) -> Result<()> {
        for i in 0..self.family.members.len() {
            self.with_follower(i, |m| m.prepare_resume())?;
        }
        Ok(())
    }

    /// The first process is gone: with followers left, that is one more process gone,
    /// not the end.
    pub(crate) fn first_gone(&mut self, status: ExitStatus) -> Stop {
        if self.family.members.is_empty() {
            Stop::Exited(status)
        } else {
            Stop::ProcessExited {
                pid: self.pid(),
                status,
            }
        }
    }
}
