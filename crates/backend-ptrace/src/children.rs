//! New threads, new processes and new programs: adopting threads the kernel attached,
//! freeing fork children of every breakpoint (or, with [`Tracer::follow_forks`],
//! cleaning them the same way and following them: `family.rs`), following vfork
//! children (they share the memory) until they exec, and replacing the image at an
//! exec.
//!
//! Invariant: a fork child never runs with one of our `int3`s in it that nobody serves
//! — it is held at its first stop until every byte we ever armed in this image is
//! restored in its copy of memory, its copy of the XOL pages unmapped and the
//! semaphores we raised lowered again, and only then let go (or handed to its own
//! tracer, which holds it until its user registered its probes). What the child has is
//! read from the child itself: a child forked while another thread was mapping a page
//! has no copy of that page, and nothing of ours is executed in it.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use multiprobe_core::Result;
use multiprobe_symbols::Maps;

use crate::backend::{Armed, INT3};
use crate::inject::{self, Injector};
use crate::mem::CodeMemory;
use crate::sys::{self, Signal, Tid, Wait};
use crate::thread::{Kind, Thread};
use crate::tracer::{Stop, Tracer};
use crate::xol::PAGE;

/// Stops of new processes reported before their parent's fork event.
#[derive(Debug, Default)]
pub(crate) struct Children {
    early: HashMap<Tid, Wait>,
}

impl Children {
    /// `tid` is gone: forget an early stop of it.
    pub(crate) fn forget(&mut self, tid: Tid) {
        self.early.remove(&tid);
    }

    /// The ones never claimed by a fork event, taken out.
    pub(crate) fn take_all(&mut self) -> Vec<Tid> {
        self.early.drain().map(|(t, _)| t).collect()
    }
}

/// The thread group (process) of task `tid`, from `/proc`.
pub(crate) fn tgid_of(tid: Tid) -> Option<i32> {
    std::fs::read_to_string(format!("/proc/{}/status", tid.as_raw_pid()))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Tgid:").map(|v| v.trim().parse::<i32>()))
        })
        .and_then(|r| r.ok())
}

impl Tracer {
    /// A stop from a thread not seen before. A new thread of the tracee is adopted
    /// (true), or held until its creator's clone event (false); a new process is parked
    /// until its parent's fork event (false).
    pub(crate) fn adopt(&mut self, tid: Tid, w: Wait) -> bool {
        let tgid = tgid_of(tid);
        if tgid == Some(self.pid()) {
            if self.trap.adopted(self.shared.pid, tid) {
                // Seen before its creator's clone event, which names the creator whose
                // mask it has: held until then (see `sigtrap.rs`).
                let deliver = match w {
                    Wait::Signal(_, sig) => Some(sig),
                    _ => None,
                };
                self.threads.add(tid, Thread::held(deliver));
                return false;
            }
            self.threads.add(tid, Thread::running(Kind::Thread));
            true
        } else {
            self.children.early.insert(tid, w);
            false
        }
    }

    /// The first stop of a new process `child`, forked or vforked by a tracee thread.
    fn child_first_stop(&mut self, child: Tid) -> bool {
        if self.children.early.remove(&child).is_some() {
            return true;
        }
        matches!(sys::wait(Some(child), false), Ok(Some(w)) if !w.is_end())
    }

    /// A fork child gets its own copy of memory, breakpoints included: take them out
    /// and let it go — or, following forks, hand it to a tracer of its own (returns
    /// true: the caller reports it). A vfork child shares the memory: follow it like a
    /// thread until it execs or exits.
    pub(crate) fn new_child(&mut self, child: Tid, vfork: bool, forker: Tid) -> Result<bool> {
        if !self.child_first_stop(child) {
            return Ok(false);
        }
        if vfork {
            self.threads.add(child, Thread::running(Kind::VforkChild));
            self.resume(child, None)?;
            return Ok(false);
        }
        if self.family.follow {
            self.clean_child(child, Some(forker));
            match self.adopt_child(child) {
                Ok(()) => return Ok(true),
                // It cannot be traced on its own (gone meanwhile, or its memory cannot
                // be opened): let it go clean.
                Err(_) => {
                    let sig = self.aside.take_signal(child);
                    let _ = sys::detach(child, sig);
                    return Ok(false);
                }
            }
        }
        self.free_child(child, Some(forker));
        Ok(false)
    }

    /// Clean `child` (see [`Tracer::clean_child`]) and detach it.
    pub(crate) fn free_child(&mut self, child: Tid, forker: Option<Tid>) {
        self.clean_child(child, forker);
        let sig = self.aside.take_signal(child);
        let _ = sys::detach(child, sig);
    }

    /// Restore every byte we ever armed in `child`'s copy of memory, lower the
    /// semaphores we raised, move it out of the slot it was forked in (when `forker`,
    /// the thread that forked, was in one: a relocated `syscall` that forked), and unmap
    /// the XOL pages it has a copy of. Best effort: a child that died meanwhile needs
    /// nothing.
    pub(crate) fn clean_child(&mut self, child: Tid, forker: Option<Tid>) {
        if let Some(f) = forker {
            self.out_of_forkers_slot(child, f);
        }
        let st = self.shared.lock();
        let history: Vec<(u64, Armed)> = st.history.iter().map(|(&a, b)| (a, b.clone())).collect();
        let pages = st.xol.pages();
        let area = match &st.collect.area {
            crate::collect::AreaState::Mapped(a) => Some((a.tracee, a.map.len() as u64)),
            _ => None,
        };
        let jumped: Vec<(u64, crate::collect::Jumped)> = st
            .collect
            .jumped
            .iter()
            .map(|(&a, j)| (a, j.clone()))
            .collect();
        let trampolines = st.collect.trampolines.clone();
        let shadow = match st.collect.shadow {
            crate::collect::ShadowState::Mapped(a) => Some(a),
            _ => None,
        };
        let raised = st.semaphores.raised();
        drop(st);
        let maps = crate::error::maps(child.as_raw_pid());
        if let (Ok(code), Ok(maps)) = (CodeMemory::open(child), maps) {
            if let Some(f) = forker {
                self.restore_returns_in_child(&code, f);
            }
            self.restore_shadow_in_child(&code);
            // Our jumps: the whole region back (the child has its own copy of the text),
            // where its text still holds them (not code it loaded at that address since).
            for (addr, j) in &jumped {
                let mut now = vec![0; j.region.len()];
                if maps.mapped_at(*addr).as_ref() == Some(&j.mapped)
                    && code.read(*addr, &mut now).is_ok()
                    && j.is_in(&now)
                {
                    let _ = code.write(*addr, j.region.bytes());
                }
            }
            if !trampolines.is_empty() {
                // Forked from a relocated `syscall` in a trampoline: out of it.
                self.out_of_trampolines(child, &trampolines);
            }
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
            crate::refctr::lower_all(&code, &maps, &raised);
            let mut copies: Vec<(u64, u64)> = pages
                .into_iter()
                .filter(|&p| is_xol_copy(&maps, p))
                .map(|p| (p, PAGE))
                .collect();
            // Its copy of the collecting area (the same shared pages as ours: it must
            // not write into them).
            copies.extend(area.filter(|&(a, _)| maps.find(a).is_some_and(|r| r.start == a)));
            // And its copy of the shadow stacks, read above (its calls in flight got
            // their return addresses back).
            let shadow_len = multiprobe_x86::collect::shadow::SHADOW_LEN as u64;
            copies.extend(
                shadow
                    .filter(|&a| maps.find(a).is_some_and(|r| r.start == a))
                    .map(|a| (a, shadow_len)),
            );
            if !copies.is_empty() {
                self.unmap_in_child(child, &code, &copies);
            }
        }
    }

    /// The fork child starts where its forking thread was: if that is inside one of our
    /// slots (its copy of the page is about to go), put it where the original code goes
    /// on, stepping to the slot's next boundary first if it is between two. A suspended
    /// slot counts too (a signal handler that returned into it may have forked there):
    /// the child's own `rip` decides.
    fn out_of_forkers_slot(&mut self, child: Tid, forker: Tid) {
        let Some(site) = self
            .threads
            .get(forker)
            .and_then(|t| t.slots.last())
            .map(|s| Arc::clone(&s.site))
        else {
            return;
        };
        let Some(slots) = site.slots.get() else {
            return;
        };
        for _ in 0..16 {
            let Ok(ur) = sys::get_regs(child) else {
                return;
            };
            let Some(slot) = slots.slot_of(ur.rip) else {
                return; // not inside: nothing to do
            };
            let mut regs = crate::regs::to_core(&ur);
            if slot.fixup_ip(&mut regs) {
                let _ = sys::set_regs(child, &crate::regs::from_core(&ur, &regs));
                return;
            }
            if sys::single_step(child, None).is_err() {
                return;
            }
            match sys::wait(Some(child), false) {
                Ok(Some(Wait::Signal(_, Signal::TRAP))) => {}
                Ok(Some(Wait::Signal(_, sig))) => self.aside.push_signal(child, sig),
                _ => return,
            }
        }
    }

    /// Unmap `ranges` (start, length) in the fork child, with a system call executed
    /// by the child at a `syscall` instruction of its own memory.
    fn unmap_in_child(&mut self, child: Tid, code: &CodeMemory, ranges: &[(u64, u64)]) {
        let Ok(saved) = sys::get_regs(child) else {
            return;
        };
        let Ok(insn) = Injector::default().insn(child, code) else {
            return;
        };
        for &(start, len) in ranges {
            let args = [start, len, 0, 0, 0, 0];
            let r = inject::syscall(
                child,
                child,
                &saved,
                insn,
                libc::SYS_munmap,
                args,
                &mut self.aside,
            );
            if r.is_err() {
                break;
            }
        }
    }

    pub(crate) fn on_exec(&mut self, tid: Tid) -> Result<Option<Stop>> {
        if self
            .threads
            .get(tid)
            .is_some_and(|t| t.kind() == Kind::VforkChild)
        {
            // A vfork child started its own program: nothing of ours is in it. Followed,
            // it is a process of its own from here, held at its first instruction.
            self.threads.remove(tid);
            if self.family.follow && self.adopt_child(tid).is_ok() {
                return Ok(Some(Stop::Forked {
                    parent: self.pid(),
                    child: tid.as_raw_pid(),
                    execed: true,
                }));
            }
            let _ = sys::detach(tid, None);
            return Ok(None);
        }
        // The main process: every other thread is gone, and so is the old image with
        // our breakpoints, jumps and XOL pages. What it wrote is still in our mapping.
        self.final_drain();
        self.threads.clear();
        let pid = self.tid();
        self.threads.replace(pid, Thread::held(None));
        {
            let mut st = self.shared.lock();
            self.shared.gen.fetch_add(1, Ordering::AcqRel);
            st.armed.clear();
            st.history.clear();
            st.xol.clear();
            st.semaphores.clear();
            st.collect.forget_image();
            // The old image's trampolines are gone with it: nobody waits for them.
            self.shared.quiet.restart();
            st.code = Some(CodeMemory::open(pid)?);
            st.image = crate::launch::image_of(pid);
        }
        self.injector.forget();
        self.returns.forget();
        self.trap.start(pid, &[pid]);
        let unregistered = self.registry.handlers();
        let ids: Vec<_> = unregistered.iter().map(|h| h.id).collect();
        if !ids.is_empty() {
            // Their disarm finds a stale image and writes nothing.
            let _ = self.registry.unregister_batch(&ids);
        }
        Ok(Some(Stop::Exec { unregistered }))
    }
}

/// Whether `maps` (of a fork child) have an anonymous executable page at `page`: the
/// child's copy of one of our XOL pages.
fn is_xol_copy(maps: &Maps, page: u64) -> bool {
    maps.find(page)
        .is_some_and(|r| r.exec && r.inode == 0 && r.path.is_empty() && r.start <= page)
}
