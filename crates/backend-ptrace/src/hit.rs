//! The hot path: a thread stopped with SIGTRAP. One of our breakpoints (run the
//! pre-handlers, then emulate the instruction or send the thread through its slot),
//! the trailing `int3` of a trap-after slot (run the post-handlers), a breakpoint
//! that was just removed (re-execute the restored instruction), or the tracee's own
//! SIGTRAP (deliver it unchanged).
//!
//! Cost of a hit, in system calls besides the stop itself:
//! * one request to learn where the thread stopped: `PTRACE_PEEKUSER` of `rip`, or
//!   `PTRACE_GETREGS` when the thread's last hit needed the registers (a guess that this
//!   one will too; then they cost nothing more);
//! * otherwise `PTRACE_GETREGS` only if a handler or the emulation asks ([`ThreadRegs`]);
//! * the write-back of what changed: nothing after an emulated `nop` (the kernel's `rip`
//!   is already past it), one `PTRACE_POKEUSER` of `rip` to enter a slot or skip a
//!   longer `nop`, more only for what handlers changed;
//! * `PTRACE_GETSIGINFO` only where a SIGTRAP at `addr + 1` could also be a signal sent
//!   to a thread standing there: after a one-byte instruction;
//! * `PTRACE_CONT`.

use std::sync::Arc;

use multiprobe_core::backend::{PreOutcome, RegisterFile};
use multiprobe_core::{Memory, Result};
use multiprobe_x86::{Class, EmulatedKind, Plan, SlotKind};

use crate::backend::{SiteInner, Slots, INT3};
use crate::error;
use crate::inject;
use crate::regs::{self, to_core, ThreadRegs};
use crate::sys::{self, Event, Signal, Tid, UserOffset, UserRegs, Wait, SI_KERNEL};
use crate::thread::{gone_is_ok, InSlot};
use crate::tracer::Tracer;
use crate::xol::{PAGE, REACH, UNIT};

/// The most stops a fallback single-step takes (signals arriving meanwhile are held
/// back) before it gives up and lets the thread run on at the probed address.
const MAX_STEP_STOPS: usize = 64;

/// What to do with a thread after its pre-handlers.
enum Next {
    /// Resume with the registers as they are (emulated, redirected, or re-execute).
    Resume,
    /// Resume at this slot.
    Slot(SlotKind),
    /// No slot could be placed: execute the original instruction in place.
    InPlace { post: bool },
}

impl Tracer {
    pub(crate) fn on_trap(&mut self, tid: Tid) -> Result<()> {
        let th = self.threads.known(tid);
        // Where did it stop? Read all the registers right away if they will be needed:
        // at the end of a trap-after slot (to find the way back), or when the last hit
        // of this thread needed them (a guess: its handlers probably do again).
        let in_trap_after = th
            .slots
            .last()
            .is_some_and(|s| s.kind == SlotKind::TrapAfter);
        let (rip, read) = if th.wants_regs || in_trap_after {
            match sys::get_regs(tid) {
                Ok(ur) => (ur.rip, Some(ur)),
                Err(_) => return Ok(()), // killed meanwhile: its exit comes next
            }
        } else {
            match sys::peek_user(tid, UserOffset::RIP) {
                Ok(rip) => (rip, None),
                Err(_) => return Ok(()),
            }
        };
        if self.returns.trampoline() == Some(rip.wrapping_sub(1)) {
            return self.on_return(tid, read);
        }
        let th = self.threads.known(tid);
        // The trailing int3 of the trap-after slot the thread was sent to last?
        if let Some(top) = th.slots.last() {
            let trap = top.slots().trap_after.filter(|s| s.contains(rip - 1));
            if let (SlotKind::TrapAfter, Some(trap)) = (top.kind, trap) {
                let Some(ur) = read.or_else(|| sys::get_regs(tid).ok()) else {
                    return Ok(());
                };
                let mut regs = to_core(&ur);
                if trap.fixup_trap(ur.rip, &mut regs) {
                    let top = th.slots.pop().expect("just seen");
                    let d = &self.dispatcher;
                    // No deferred step when the thread was switched here only to hold
                    // back a signal: then no post-handler runs.
                    d.post(
                        &th.ts,
                        top.site.addr,
                        tid.as_raw_pid() as u32,
                        &mut regs,
                        &self.mem,
                    );
                    let mut sig = None;
                    if let Some(info) = top.deferred {
                        gone_is_ok(sys::set_sig_info(tid, &info))
                            .map_err(|e| error::sys(e, "deliver a held-back signal"))?;
                        sig = info.signal();
                    }
                    gone_is_ok(regs::write_back(tid, &ur, &regs))
                        .map_err(|e| error::sys(e, "set registers"))?;
                    self.restore_trap(tid);
                    return self.resume(tid, sig);
                }
            }
        }
        th.prune(rip);
        let addr = rip.wrapping_sub(1);
        let site = self.dispatcher.with_site(addr, |s| Arc::clone(&s.0));
        let Some(site) = site.filter(|s| s.gen == self.shared.gen()) else {
            // Not a probe: the shadow-stack code asking (looked up only here, off the
            // path of a hit).
            if let Some(ask) = self.shadow_ask_at(addr) {
                let Some(ur) = read.or_else(|| sys::get_regs(tid).ok()) else {
                    return Ok(()); // killed meanwhile: its exit comes next
                };
                return self.shadow_ask(tid, ur, ask);
            }
            return self.not_ours(tid, addr);
        };
        if self.reached_entry_hold(addr) {
            // Not served: held on the breakpoint, to execute its instruction once the
            // probe is gone.
            self.restore_trap(tid);
            self.threads.known(tid).hold(None);
            return gone_is_ok(sys::poke_user(tid, UserOffset::RIP, addr))
                .map_err(|e| error::sys(e, "set rip"));
        }
        if site.plan.len() == 1 && !from_int3(tid) {
            return self.deliver_own_trap(tid);
        }
        let trapped = self.shared.lock().trapped_copy(addr);
        if let Some(copy) = trapped {
            return self.hit_over_jump(tid, rip, read, site, copy);
        }
        self.hit(tid, rip, read, site)
    }

    /// Serve a hit of `site`: the thread stopped with `rip` (the kernel's, just past
    /// the `int3`), and its registers `read` if they were. Registers are fetched only
    /// if a handler or the emulation asks.
    fn hit(
        &mut self,
        tid: Tid,
        rip: u64,
        read: Option<UserRegs>,
        site: Arc<SiteInner>,
    ) -> Result<()> {
        self.restore_trap(tid);
        let mut regs = ThreadRegs::new(tid, rip, site.addr, read);
        let placed = site.slots.get().map(|s| s.base);
        // Slots in a page the program unmapped, which could not be mapped again, are
        // no use: such a site steps in place from now on.
        let mut have_slots = placed.is_some_and(|b| self.shared.lock().xol.is_live(b));
        // Every site but a nop-like one gets its slots at the first hit, emulated ones
        // too: a hit without post-handlers is cheapest through the jump-back slot (one
        // write of `rip`), where emulating would read the registers and write some of them
        // and maybe the stack. Only a nop needs nothing but `rip` either way.
        let nop_like = site.plan.class() == Class::Emulated(EmulatedKind::Nop);
        if placed.is_none() && !nop_like {
            // Injecting the `mmap` needs the registers (to restore them after).
            have_slots = match regs.kernel() {
                Some(ur) => self.place_slots(tid, &ur, &site).is_ok(),
                None => return Ok(()), // gone
            };
        }
        if site.has_collectors() {
            // Its collectors will want the area (promotion writes into it).
            if let Some(ur) = regs.kernel() {
                self.ensure_area(tid, &ur);
                if site.has_ret_collectors() {
                    // And its `ret` collectors the shadow stacks: made here, on a
                    // thread stopped outside any system call, not at the pause.
                    let _ = self.ensure_shadow_on(tid, &ur);
                }
            }
            self.note_collecting_hit(&site);
        }
        self.returns_before_entry(tid, &regs, site.addr);
        let th = self.threads.known(tid);
        let d = &self.dispatcher;
        let pre = d.pre(
            &th.ts,
            site.addr,
            tid.as_raw_pid() as u32,
            &mut regs,
            &self.mem,
        );
        let shadow = self
            .returns
            .after_entry(tid, &th.ts, &self.mem, &self.registry);
        for put in shadow {
            // Read only when asked: a plain hit must not fetch the registers.
            let fs = Some(regs.regs().fs_base);
            crate::collect::for_calls(&self.shared, &self.mem, fs, put);
        }
        let next = match pre {
            // Unregistered since the lookup: its byte is back, run it.
            PreOutcome::NotOurs | PreOutcome::Redirect => Next::Resume,
            PreOutcome::Step(step) => {
                let post = step.wants_post();
                let plan = &site.plan;
                // Emulate when that is a stop cheaper: with post-handlers (they run
                // right after, no second stop), for a nop, or when there is no slot.
                let emulate_it = post || nop_like || !have_slots;
                if plan.is_emulated() && emulate_it && emulate(plan, &mut regs, &self.mem) {
                    if post {
                        step.defer_post();
                        d.post(
                            &th.ts,
                            site.addr,
                            tid.as_raw_pid() as u32,
                            &mut regs,
                            &self.mem,
                        );
                    }
                    Next::Resume
                } else if !have_slots {
                    if post {
                        step.defer_post();
                    }
                    Next::InPlace { post }
                } else if post && plan.has_trap_after_slot() {
                    step.defer_post();
                    Next::Slot(SlotKind::TrapAfter)
                } else {
                    // A post that cannot be had (the instruction leaves through a
                    // computed target and its emulation failed: it is about to fault).
                    drop(step);
                    Next::Slot(SlotKind::JumpBack)
                }
            }
        };
        th.wants_regs = regs.fetched().is_some();
        // A handler said libraries were loaded (the loader's hook): their unwinders
        // are hooked before this thread runs on into the code they may unwind.
        self.rehook_unwinders();
        match next {
            Next::Resume => self.finish(tid, &regs),
            Next::Slot(kind) => {
                let slots = site.slots.get().expect("placed");
                regs.set_rip(match kind {
                    SlotKind::TrapAfter => slots.trap_after.expect("has one").addr(),
                    SlotKind::JumpBack => slots.jump_back.addr(),
                });
                let th = self.threads.known(tid);
                th.slots.push(InSlot::new(site, kind));
                self.finish(tid, &regs)
            }
            Next::InPlace { post } => self.step_in_place(tid, regs, &site, post),
        }
    }

    /// A hit at our `int3` over a jump whose change waits for the tracer: the
    /// pre-handlers of the current list run here, then the thread continues in the
    /// installed trampoline's relocated copy of the region at `copy` (the bytes after the
    /// `int3` are the jump's, so neither a slot nor emulation can serve). Post and return
    /// hooks registered meanwhile start with the tracer's rework.
    fn hit_over_jump(
        &mut self,
        tid: Tid,
        rip: u64,
        read: Option<UserRegs>,
        site: Arc<SiteInner>,
        copy: u64,
    ) -> Result<()> {
        self.restore_trap(tid);
        let mut regs = ThreadRegs::new(tid, rip, site.addr, read);
        let th = self.threads.known(tid);
        let pre = self.dispatcher.pre(
            &th.ts,
            site.addr,
            tid.as_raw_pid() as u32,
            &mut regs,
            &self.mem,
        );
        match pre {
            PreOutcome::Redirect => {}
            PreOutcome::NotOurs => regs.set_rip(copy),
            PreOutcome::Step(step) => {
                drop(step);
                regs.set_rip(copy);
            }
        }
        th.wants_regs = regs.fetched().is_some();
        self.finish(tid, &regs)
    }

    /// Write back what changed, and resume.
    fn finish(&mut self, tid: Tid, regs: &ThreadRegs) -> Result<()> {
        gone_is_ok(regs.write_back()).map_err(|e| error::sys(e, "set registers"))?;
        self.resume(tid, None)
    }

    /// A SIGTRAP at `addr + 1` where no probe is registered now.
    fn not_ours(&mut self, tid: Tid, addr: u64) -> Result<()> {
        let st = self.shared.lock();
        if let Some(copy) = st.trapped_copy(addr) {
            // A jumped site being demoted: on through its trampoline's copy.
            drop(st);
            self.restore_trap(tid);
            gone_is_ok(sys::poke_user(tid, UserOffset::RIP, copy))
                .map_err(|e| error::sys(e, "set rip"))?;
            return self.resume(tid, None);
        }
        let ours_once = st.history.contains_key(&addr);
        let mut now = [INT3];
        if let Ok(code) = st.usable() {
            let _ = code.read(addr, &mut now);
        }
        drop(st);
        if ours_once && now[0] != INT3 && from_int3(tid) {
            // Our breakpoint, removed after the thread trapped on it: run the restored
            // instruction.
            self.restore_trap(tid);
            gone_is_ok(sys::poke_user(tid, UserOffset::RIP, addr))
                .map_err(|e| error::sys(e, "set rip"))?;
            return self.resume(tid, None);
        }
        self.deliver_own_trap(tid)
    }

    /// Map (if needed) and fill the slots of `site`, using the stopped thread `tid`
    /// (registers `ur`) for any injected system call.
    fn place_slots(&mut self, tid: Tid, ur: &UserRegs, site: &Arc<SiteInner>) -> Result<()> {
        let window = site.plan.slot_window();
        let addr = site.addr;
        let ok = move |a: u64| {
            a.abs_diff(addr) < REACH
                && window
                    .as_ref()
                    .is_none_or(|w| w.contains(&a) && w.contains(&(a + UNIT / 2)))
        };
        let mut unit = self.shared.lock().xol.alloc(&ok);
        if unit.is_none() {
            self.map_page_near(tid, ur, addr)?;
            unit = self.shared.lock().xol.alloc(&ok);
        }
        let unit = unit.ok_or_else(|| {
            multiprobe_core::Error::Backend(format!(
                "no out-of-line slot within reach of {addr:#x}"
            ))
        })?;
        let build = || -> Result<Slots> {
            let plan = &site.plan;
            let jump_back = plan
                .build_slot(SlotKind::JumpBack, unit)
                .map_err(|e| multiprobe_core::Error::Backend(e.to_string()))?;
            let trap_after = if plan.has_trap_after_slot() {
                let s = plan
                    .build_slot(SlotKind::TrapAfter, unit + UNIT / 2)
                    .map_err(|e| multiprobe_core::Error::Backend(e.to_string()))?;
                Some(s)
            } else {
                None
            };
            let mut st = self.shared.lock();
            st.write_slot(jump_back.addr(), jump_back.bytes())?;
            if let Some(t) = &trap_after {
                st.write_slot(t.addr(), t.bytes())?;
            }
            Ok(Slots {
                base: unit,
                jump_back,
                trap_after,
            })
        };
        match build() {
            Ok(slots) => {
                let _ = site.slots.set(slots);
                Ok(())
            }
            Err(e) => {
                self.shared.lock().xol.free(unit);
                Err(e)
            }
        }
    }

    /// Map a new XOL page within reach of `addr` with an injected `mmap`.
    pub(crate) fn map_page_near(&mut self, tid: Tid, ur: &UserRegs, addr: u64) -> Result<()> {
        let maps = error::maps(self.pid())?;
        let want = maps.free_near(addr, addr + 1, PAGE, REACH).ok_or_else(|| {
            multiprobe_core::Error::Backend(format!("no free page within reach of {addr:#x}"))
        })?;
        let got = self.map_page(tid, ur, want)?;
        self.shared.lock().xol.add_page(got);
        Ok(())
    }

    /// Map one read+execute page at exactly `want` with an injected `mmap` on the
    /// stopped thread `tid` (registers `ur`).
    pub(crate) fn map_page(&mut self, tid: Tid, ur: &UserRegs, want: u64) -> Result<u64> {
        self.map_pages(tid, ur, want, PAGE)
    }

    /// Map `len` bytes (whole pages) read+execute at exactly `want`, as [`Self::map_page`].
    pub(crate) fn map_pages(
        &mut self,
        tid: Tid,
        ur: &UserRegs,
        want: u64,
        len: u64,
    ) -> Result<u64> {
        let insn = {
            let st = self.shared.lock();
            let code = st.usable()?;
            self.injector.insn(self.shared.pid, code)?
        };
        let args = [
            want,
            len,
            (libc::PROT_READ | libc::PROT_EXEC) as u64,
            (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE) as u64,
            u64::MAX,
            0,
        ];
        let pid = self.shared.pid;
        let got = inject::syscall(pid, tid, ur, insn, libc::SYS_mmap, args, &mut self.aside)?
            .map_err(|e| error::sys(e, format_args!("map an out-of-line page at {want:#x}")))?;
        if got != want {
            // A kernel without MAP_FIXED_NOREPLACE put it elsewhere: give it back.
            let undo = [got, len, 0, 0, 0, 0];
            let _ = inject::syscall(pid, tid, ur, insn, libc::SYS_munmap, undo, &mut self.aside);
            return Err(multiprobe_core::Error::Backend(format!(
                "the out-of-line page landed at {got:#x}, not {want:#x}"
            )));
        }
        Ok(got)
    }

    /// The fallback when no slot can be had: put the original byte back, single-step
    /// the thread over the instruction, re-insert the breakpoint (the classic two-stop
    /// scheme; other threads may run through the site unprobed meanwhile). Needs no
    /// system call in the tracee, so it also serves programs under seccomp.
    fn step_in_place(
        &mut self,
        tid: Tid,
        mut regs: ThreadRegs,
        site: &Arc<SiteInner>,
        post: bool,
    ) -> Result<()> {
        regs.set_rip(site.addr);
        let Some(ur) = regs.kernel() else {
            return Ok(()); // gone
        };
        gone_is_ok(regs::write_back(tid, &ur, regs.regs()))
            .map_err(|e| error::sys(e, "set registers"))?;
        self.step_over_original(tid, site, post)
    }

    /// The thread `tid` stands at `site`'s address: execute the original instruction
    /// there (its byte put back for one single-step), run the deferred post-handlers
    /// if `post`, and resume it.
    pub(crate) fn step_over_original(
        &mut self,
        tid: Tid,
        site: &Arc<SiteInner>,
        post: bool,
    ) -> Result<()> {
        let addr = site.addr;
        let orig = site.plan.bytes()[0];
        {
            let st = self.shared.lock();
            if st.armed.contains_key(&addr) {
                st.usable()?.write(addr, &[orig])?;
            }
        }
        let stepped = self.step_once(tid, None);
        {
            let st = self.shared.lock();
            if st.armed.contains_key(&addr) {
                if let Ok(code) = st.usable() {
                    code.write(addr, &[INT3])?;
                }
            }
        }
        let Some(after) = stepped? else {
            // Gone, or it would not step: it runs on from the probed address (a hit
            // not completed is better than a thread left stopped).
            return self.resume(tid, None);
        };
        if self.aside.has_end_of(tid) {
            return Ok(());
        }
        let mut regs = to_core(&after);
        if post {
            let th = self.threads.known(tid);
            self.dispatcher
                .post(&th.ts, addr, tid.as_raw_pid() as u32, &mut regs, &self.mem);
        }
        gone_is_ok(regs::write_back(tid, &after, &regs))
            .map_err(|e| error::sys(e, "set registers"))?;
        self.resume(tid, None)
    }

    /// Execute one instruction of the stopped thread `tid` (delivering `sig` first: into
    /// a handler, the step stops at its first instruction); its registers afterwards,
    /// or `None` if it is gone or did not complete the step within [`MAX_STEP_STOPS`].
    pub(crate) fn step_once(&mut self, tid: Tid, sig: Option<Signal>) -> Result<Option<UserRegs>> {
        let e = |e| error::sys(e, "single-step a thread");
        let mut sig = sig;
        for _ in 0..MAX_STEP_STOPS {
            gone_is_ok(sys::single_step(tid, sig.take())).map_err(e)?;
            match sys::wait(Some(tid), false).map_err(e)? {
                Some(Wait::Signal(_, Signal::TRAP)) => {
                    return sys::get_regs(tid).map(Some).or(Ok(None));
                }
                Some(Wait::Signal(_, sig)) => self.aside.push_signal(tid, sig),
                // The instruction is a `syscall` that created a thread: it may be held
                // waiting for this event (see `sigtrap.rs`).
                Some(Wait::Event(_, Event::Clone)) => {
                    if let Ok(new) = sys::event_pid(tid) {
                        self.claim_thread(tid, new)?;
                    }
                }
                // A `syscall` that forked: the child is freed or followed as at any
                // fork (left alone it would stay parked at its first stop). A followed
                // one is reported at the next run.
                Some(Wait::Event(_, Event::Fork)) => {
                    if let Ok(child) = sys::event_pid(tid) {
                        if self.new_child(child, false, tid)? {
                            let (parent, child) = (self.pid(), child.as_raw_pid());
                            self.family.queued.push(crate::tracer::Stop::Forked {
                                parent,
                                child,
                                execed: false,
                            });
                        }
                    }
                }
                // A vfork: the parent's step ends only when the child execs or exits,
                // and the child's own stops must be served meanwhile: give the step up
                // (the caller resumes the thread, which then finishes the system call)
                // and follow the child like any vfork child.
                Some(Wait::Event(_, Event::Vfork)) => {
                    if let Ok(child) = sys::event_pid(tid) {
                        self.new_child(child, true, tid)?;
                    }
                    return Ok(None);
                }
                Some(w) if w.is_end() => {
                    self.aside.push_wait(w);
                    return Ok(None);
                }
                _ => {}
            }
        }
        Ok(None)
    }
}

/// Execute the displaced instruction of `plan` by emulation; false if it cannot be
/// (a memory access failed: the slot will raise the real fault). A `nop`-like
/// instruction only moves `rip`, so it fetches no register.
fn emulate(plan: &Plan, regs: &mut ThreadRegs, mem: &dyn Memory) -> bool {
    if plan.class() == Class::Emulated(EmulatedKind::Nop) && regs.fetched().is_none() {
        regs.set_rip(plan.next());
        return true;
    }
    plan.emulate(regs.regs_mut(), mem).is_ok()
}

/// Whether the SIGTRAP `tid` stopped for came from an `int3` (the kernel's `SI_KERNEL`)
/// rather than from `kill`/`raise`.
fn from_int3(tid: Tid) -> bool {
    sys::sig_info(tid).is_ok_and(|s| s.code == SI_KERNEL)
}
