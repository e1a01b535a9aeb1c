//! New threads, new processes and new programs: adopting threads the kernel attached,
//! freeing fork children of every breakpoint, following vfork children (they share the
//! memory) until they exec, and replacing the image at an exec.
//!
//! Invariant: a fork child never runs with one of our `int3`s in it — it is held at its
//! first stop until every byte we ever armed in this image is restored in its copy of
//! memory (and its copy of the XOL pages unmapped), and only then let go.

use std::sync::atomic::Ordering;

use multiprobe_core::Result;

use crate::backend::{Armed, INT3};
use crate::inject;
use crate::mem::CodeMemory;
use crate::sys::{self, Tid, Wait};
use crate::tracer::{Stop, Thread, Tracer};
use crate::xol::PAGE;

impl Tracer {
    /// A stop from a thread not seen before. A new thread of the tracee is adopted
    /// (true); a new process is parked until its parent's fork event (false).
    pub(crate) fn adopt(&mut self, tid: Tid, w: Wait) -> Result<bool> {
        let tgid = std::fs::read_to_string(format!("/proc/{tid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("Tgid:").map(|v| v.trim().parse::<i32>()))
            })
            .and_then(|r| r.ok());
        if tgid == Some(self.pid()) {
            self.threads.insert(tid, Thread::new(None));
            Ok(true)
        } else {
            self.orphans.insert(tid, w);
            Ok(false)
        }
    }

    /// The first stop of a new process `child`, forked or vforked by a tracee thread.
    pub(crate) fn child_first_stop(&mut self, child: Tid) -> Result<bool> {
        if self.orphans.remove(&child).is_some() {
            return Ok(true);
        }
        Ok(matches!(
            sys::wait(child, false),
            Ok(Some(Wait::Stopped { .. }))
        ))
    }

    /// A fork child gets its own copy of memory, breakpoints included: take them out
    /// and let it go. A vfork child shares the memory: follow it like a thread until it
    /// execs or exits.
    pub(crate) fn new_child(&mut self, child: Tid, vfork: bool) -> Result<()> {
        if !self.child_first_stop(child)? {
            return Ok(());
        }
        if vfork {
            let mut th = Thread::new(None);
            th.vfork_child = true;
            self.threads.insert(child, th);
            return self.resume(child, 0);
        }
        self.free_child(child);
        Ok(())
    }

    /// Restore every byte we ever armed in `child`'s copy of memory, unmap its copy of
    /// the XOL pages, and detach it. Best effort: a child that died meanwhile needs
    /// nothing.
    pub(crate) fn free_child(&mut self, child: Tid) {
        let st = self.shared.lock();
        let history: Vec<(u64, Armed)> = st.history.iter().map(|(&a, b)| (a, b.clone())).collect();
        let pages = st.xol.pages();
        drop(st);
        let maps = crate::error::maps(child);
        if let (Ok(code), Ok(maps)) = (CodeMemory::open(child), maps) {
            for (addr, armed) in history {
                let mut now = [0u8];
                if armed.still_mapped(&maps, addr)
                    && code.read(addr, &mut now).is_ok()
                    && now[0] == INT3
                    && armed.orig != INT3
                {
                    let _ = code.write(addr, &[armed.orig]);
                }
            }
        }
        if let (Some(&gadget), Ok(saved)) = (pages.first(), sys::get_regs(child)) {
            // The gadget's own page goes last.
            for &page in pages.iter().rev() {
                let args = [page, PAGE, 0, 0, 0, 0];
                let r = inject::syscall(
                    child,
                    &saved,
                    gadget,
                    libc::SYS_munmap,
                    args,
                    &mut self.aside,
                );
                if r.is_err() {
                    break;
                }
            }
        }
        let sig = self
            .aside
            .signals
            .iter()
            .position(|&(t, _)| t == child)
            .map_or(0, |i| self.aside.signals.remove(i).1);
        let _ = sys::detach(child, sig);
    }

    pub(crate) fn on_exec(&mut self, tid: Tid) -> Result<Option<Stop>> {
        if self.threads.get(&tid).is_some_and(|t| t.vfork_child) {
            // A vfork child started its own program: nothing of ours is in it.
            if let Some(th) = self.threads.remove(&tid) {
                th.ts.abandon();
            }
            let _ = sys::detach(tid, 0);
            return Ok(None);
        }
        // The main process: every other thread is gone, and so is the old image with
        // our breakpoints and XOL pages.
        for (_, th) in self.threads.drain() {
            th.ts.abandon();
        }
        let pid = self.pid();
        self.threads.insert(pid, Thread::new(Some(0)));
        {
            let mut st = self.shared.lock();
            self.shared.gen.fetch_add(1, Ordering::AcqRel);
            st.armed.clear();
            st.history.clear();
            st.xol.clear();
            st.code = Some(CodeMemory::open(pid)?);
        }
        self.syscall_insn = None;
        let unregistered = self.registry.handlers();
        let ids: Vec<_> = unregistered.iter().map(|h| h.id).collect();
        if !ids.is_empty() {
            // Their disarm finds a stale image and writes nothing.
            let _ = self.registry.unregister_batch(&ids);
        }
        Ok(Some(Stop::Exec { unregistered }))
    }
}
