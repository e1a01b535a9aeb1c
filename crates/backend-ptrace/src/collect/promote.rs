//! Promotion: a site whose enabled handlers are all collectors (no return hook but a
//! `Collect::ret`'s) gets a `jmp rel32` to a collecting trampoline in an out-of-line page, built by
//! `multiprobe_x86::collect`; every other site keeps (or gets back) its `int3`.
//!
//! Who does what, from which thread:
//! * The registry (any thread) tells the backend of every change of a site's enabled
//!   handlers (`handlers_changed`, under the registry's lock) and disarms through
//!   `disarm`. At a site whose text holds our jump, both write one byte — an `int3`
//!   over the jump's first byte, which is safe with the threads running (the
//!   int3-first protocol: a thread that already decoded the jump runs the old
//!   trampoline, which is never freed; every later one traps) — mark the site dirty and
//!   ring the tracer's doorbell. A thread that traps there meanwhile runs its handlers on
//!   the stop path with the *new* list and continues in the installed trampoline's
//!   relocated copy of the region ([`Jumped::trapping`]): the bytes after the `int3`
//!   are not the original instructions, so neither the site's jump-back slot nor
//!   emulation may be used.
//! * The tracer thread ([`Tracer::rework_collect`], before each wait of its loop)
//!   takes the dirty sites, stops every thread of the process (never while a vfork
//!   child shares the memory: its parent cannot stop until the child execs or exits,
//!   so the work waits for that), and for each site builds a new trampoline (never
//!   rewriting one a thread may be in), writes it, moves threads standing in the
//!   region's interior to the same point of the copy, and writes the jump (bytes 1..,
//!   then byte 0) — or demotes: the original bytes back behind the `int3`, and the
//!   `int3` itself too when the site is gone. A site whose handlers changed again
//!   while its trampoline was built gets no jump (the changing thread saw no jump to
//!   trap, so nothing waits for the old list to end): it keeps its `int3` until the
//!   next round. In the same pause, threads standing in any trampoline's action code
//!   are let run out of it, which settles every change made before the pause for
//!   `unregister`'s wait (`quiet.rs`).
//!
//! Invariants (under the backend's state lock):
//! * `jumped` holds exactly the addresses whose text holds our jump (`trapping`: with
//!   our `int3` over its first byte); the original bytes are the region's.
//! * A jump goes with its code: a library unloaded by `dlclose` (and maybe loaded again
//!   at the same address, from the same file, with its own bytes) no longer holds it.
//!   Every write at a jumped site first checks that the same mapping is there and that
//!   the text still holds our jump ([`State::forget_gone_jump`]); if not, the entry is
//!   forgotten and nothing is written (the reloaded text is not ours).
//! * Every trampoline ever built in this image stays mapped and in `trampolines` until
//!   the image ends (detach unmaps them after moving every thread out).
//! * Text changes other than the one-byte `int3` happen only with every thread of the
//!   process stopped.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use multiprobe_core::backend::RFLAGS_TF;
use multiprobe_core::{HandlerId, Result};
use multiprobe_symbols::{BranchInto, LandingPads, MappedAt, Maps, ProcessSymbols};
use multiprobe_x86::collect::{
    build_collect_trampoline, CollectMap, CollectSpec, Collector, ThreadId, COLLECT_LEN,
};
use multiprobe_x86::{
    CodeSource, Function, Location, Mapping, OutsideBranch, Region, MAX_REGION_LEN,
};

use super::handler::lock;
use super::{AreaState, Collect, Heat, SitePath, Wanted};
use crate::backend::{SiteInner, State, Status, INT3};
use crate::sys::{self, Tid};
use crate::thread::Kind;
use crate::tracer::Tracer;
use crate::xol::PAGE;

/// A site whose text holds our jump.
#[derive(Clone, Debug)]
pub(crate) struct Jumped {
    pub(crate) region: Region,
    /// The trampoline the jump targets.
    pub(crate) map: CollectMap,
    /// Our `int3` is over the jump's first byte: a change waits for the tracer.
    pub(crate) trapping: bool,
    /// What was mapped at the site when the jump was written.
    pub(crate) mapped: MappedAt,
    /// The bytes written over the region (the first `region.len()` of them).
    pub(crate) jump: [u8; MAX_REGION_LEN],
}

impl Jumped {
    /// Whether `now`, the text of the region as read, holds this jump (with or without
    /// our `int3` over its first byte).
    pub(crate) fn is_in(&self, now: &[u8]) -> bool {
        let n = self.region.len();
        now.len() == n && (now[0] == self.jump[0] || now[0] == INT3) && now[1..] == self.jump[1..n]
    }
}

/// `promote`'s answer when no held thread can make a system call right now (all at
/// event stops): try again after the next event.
const RETRY: &str = "";
/// How many collecting sites of one image are promoted before their first hit (see
/// `rework_collect`).
const EAGER_SITES: usize = 256;
/// How long one pause of the program may promote sites; the rest waits for the next,
/// which comes after the program ran four times as long.
const REWORK_BUDGET: std::time::Duration = std::time::Duration::from_millis(20);

/// How far a trampoline may be from its site: a `jmp rel32` from the region and the
/// trampoline's own jump back (and its rip-relative references to the area, which the
/// generator checks itself).
const REACH: u64 = (1 << 31) - 2 * COLLECT_LEN as u64;

/// Trampoline memory: pages of the XOL area given over to trampolines, mapped
/// [`CHUNK_PAGES`] at a time, each filled from its start, never reused within an image.
/// A trampoline lies within one page (what `xol` keeps of a page, for a fork child or
/// a page the program unmapped, is per page).
#[derive(Debug, Default)]
pub(crate) struct TrampolinePages {
    /// (page base, bytes used).
    pages: Vec<(u64, u64)>,
}

/// Trampoline pages mapped by one injected `mmap`: a pause can inject on a thread
/// only once, and each promotion wants a page's worth at the most (COLLECT_LEN),
/// so one page at a time made every pause promote a single site.
const CHUNK_PAGES: u64 = 16;

impl TrampolinePages {
    /// The next free address of each page within reach of `near` that has any room.
    fn candidates(&self, near: u64) -> Vec<u64> {
        self.pages
            .iter()
            .filter(|&&(b, used)| used < PAGE && (b + used).abs_diff(near) < REACH)
            .map(|&(b, used)| b + used)
            .collect()
    }

    /// The room left in the page of `at` (from `candidates`).
    fn room(at: u64) -> u64 {
        PAGE - at % PAGE
    }

    /// `len` bytes at `at` (from `candidates`) are taken; `PAGE` fills its page.
    fn take(&mut self, at: u64, len: u64) {
        if let Some(p) = self
            .pages
            .iter_mut()
            .find(|p| (p.0..p.0 + PAGE).contains(&at))
        {
            p.1 = (at - p.0 + len).next_multiple_of(16).min(PAGE);
        }
    }

    pub(crate) fn clear(&mut self) {
        self.pages.clear();
    }
}

impl State {
    /// The text at `addr` holds our jump (or our `int3` over it): make sure it is the
    /// `int3` (one byte, safe with threads running) and mark the site dirty. Whether
    /// it held one — not if its code went meanwhile (then the entry is forgotten and
    /// nothing written: [`State::forget_gone_jump`]). `pid`: the process, whose maps
    /// are read only if `addr` is jumped.
    pub(crate) fn trap_jump(&mut self, addr: u64, pid: i32) -> bool {
        if !self.collect.jumped.contains_key(&addr) {
            return false;
        }
        let maps = crate::error::maps(pid).ok();
        if self.forget_gone_jump(addr, maps.as_ref()) {
            return false;
        }
        let Some(j) = self.collect.jumped.get(&addr).cloned() else {
            return false;
        };
        if !j.trapping {
            if let Some(code) = self
                .code
                .as_ref()
                .filter(|_| self.status == Status::Attached)
            {
                if code.write(addr, &[INT3]).is_err() {
                    return true; // gone: nothing to undo
                }
            }
            if let Some(j) = self.collect.jumped.get_mut(&addr) {
                j.trapping = true;
            }
        }
        self.collect.dirty.insert(addr);
        true
    }

    /// Whether the jump recorded at `addr` is gone: the mapping there is no longer the
    /// one it was written into (by `maps`, when they could be read), or the text no
    /// longer holds it (a library unloaded and loaded again at the same address has
    /// the same mapping and its own bytes). Then the entry is forgotten, without writing
    /// anything: the text there is not ours. `false` if `addr` is not jumped.
    pub(crate) fn forget_gone_jump(&mut self, addr: u64, maps: Option<&Maps>) -> bool {
        let Some(j) = self.collect.jumped.get(&addr) else {
            return false;
        };
        let same_mapping = maps.is_none_or(|m| m.mapped_at(addr).as_ref() == Some(&j.mapped));
        let mut now = [0u8; MAX_REGION_LEN];
        let now = &mut now[..j.region.len()];
        let ours = same_mapping
            && self.status == Status::Attached
            && self
                .code
                .as_ref()
                .is_some_and(|c| c.read(addr, now).is_ok() && j.is_in(now));
        if !ours {
            self.collect.jumped.remove(&addr);
        }
        !ours
    }

    /// [`State::forget_gone_jump`] for every jumped site whose region overlaps
    /// `range`.
    pub(crate) fn forget_gone_jumps(&mut self, maps: &Maps, range: std::ops::Range<u64>) {
        let addrs: Vec<u64> = self
            .collect
            .jumped
            .iter()
            .filter(|(&a, j)| a < range.end && range.start < a + j.region.len() as u64)
            .map(|(&a, _)| a)
            .collect();
        for a in addrs {
            self.forget_gone_jump(a, Some(maps));
        }
    }

    /// Where a thread that trapped on `addr` continues when the text there holds our
    /// jump: the installed trampoline's copy of the region. Also when the jump is back
    /// in place (not `trapping`): a thread can report a trap of the `int3` that was
    /// there only after the tracer stopped everyone and rewrote the jump (its SIGTRAP
    /// was still pending at its interrupt stop), and the bytes after the first are not
    /// the original instructions, so the site's own slot would run into the jump's
    /// displacement.
    pub(crate) fn trapped_copy(&self, addr: u64) -> Option<u64> {
        self.collect.jumped.get(&addr).map(|j| j.map.copy_of(0))
    }

    /// Put the original bytes of jumped regions overlapping `addr..` into `buf`.
    pub(crate) fn unjump(&self, addr: u64, buf: &mut [u8]) {
        let end = addr + buf.len() as u64;
        for (&a, j) in &self.collect.jumped {
            for (i, &b) in j.region.bytes().iter().enumerate() {
                let at = a + i as u64;
                if (addr..end).contains(&at) {
                    buf[(at - addr) as usize] = b;
                }
            }
        }
    }
}

/// The traced image as the shared prepare pipeline reads it.
struct Remote<'a> {
    st: &'a State,
    syms: &'a ProcessSymbols,
    maps: &'a multiprobe_symbols::Maps,
    site: u64,
}

impl CodeSource for Remote<'_> {
    fn mapping(&self, addr: u64) -> Result<Option<Mapping>> {
        Ok(self.maps.find(addr).map(|r| Mapping {
            start: r.start,
            end: r.end,
            exec: r.exec,
        }))
    }

    fn function(&self, addr: u64) -> Option<Function> {
        self.syms.function_bounds(addr).map(|s| Function {
            name: s.name,
            start: s.start,
            end: s.start + s.size,
        })
    }

    fn read_original(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.st.read_original(addr, buf)
    }

    fn landing_pads(&self, f: &Function) -> Option<Vec<u64>> {
        match self.syms.landing_pads(f.start) {
            LandingPads::None => Some(Vec::new()),
            LandingPads::At(v) => Some(v),
            LandingPads::Unknown => None,
        }
    }

    fn probe_in(&self, range: std::ops::Range<u64>) -> Option<u64> {
        self.st
            .armed
            .keys()
            .chain(self.st.collect.jumped.keys())
            .copied()
            .filter(|&a| a != self.site && range.contains(&a))
            .min()
    }

    fn branch_into(&self, range: std::ops::Range<u64>) -> OutsideBranch {
        match self.syms.branch_into(range) {
            BranchInto::None => OutsideBranch::None,
            BranchInto::At { from, to } => OutsideBranch::At { from, to },
            BranchInto::Entry { at } => OutsideBranch::Entry { at },
            BranchInto::Unknown => OutsideBranch::Unknown,
        }
    }
}

/// What a dirty site should become.
struct Work {
    addr: u64,
    site: Option<Arc<SiteInner>>,
    /// Its collectors, when every enabled handler is one.
    want: Option<Vec<(HandlerId, Collect)>>,
}

/// One process's part of a rework, decided with its threads running
/// (`rework_plan`) and done with every thread of the family held (`rework_held`).
pub(crate) struct Rework {
    work: Vec<Work>,
    /// The change count the pause settles for `unregister` (`quiet.rs`).
    target: u64,
    settle: bool,
}

impl Tracer {
    /// Promote, repoint or demote the sites whose handlers changed (module docs), in
    /// this process and in every followed one. On the first tracer's thread, between
    /// events: one pause of the whole family (only the first tracer can wait for its
    /// threads' stops), the text changes of each process, and every thread resumed.
    pub(crate) fn rework_collect(&mut self) -> Result<()> {
        // Followers by pid: the pause handles their reports, and one that exits
        // meanwhile leaves the family (the others' indices move).
        let mut plans = Vec::new();
        if let Some(p) = self.rework_plan() {
            plans.push((None, p));
        }
        for i in 0..self.family.members.len() {
            if let Some(p) = self.with_follower(i, Tracer::rework_plan) {
                plans.push((Some(self.family.members[i].pid()), p));
            }
        }
        if plans.is_empty() {
            return Ok(());
        }
        let first_was_gone = self.is_gone();
        if self.pause()?.is_some() {
            return Ok(());
        }
        self.queue_exits_taken(first_was_gone);
        for (who, plan) in plans {
            match who {
                None => self.rework_held(plan)?,
                Some(pid) => {
                    // Gone: its sites went with it.
                    if let Some(i) = self.family.members.iter().position(|m| m.pid() == pid) {
                        self.with_follower(i, |m| m.rework_held(plan))?;
                    }
                }
            }
        }
        if !self.family.queued.is_empty() {
            // A fork or an exit reported during the pause: a fork child is held until
            // its user has seen it (and placed its probes), and so is the rest of the
            // family until `run_until` is entered again, which resumes everyone.
            return Ok(());
        }
        if !self.is_gone() {
            self.prepare_resume()?;
        }
        self.resume_followers()
    }

    /// What this process's rework is to do, if anything (its threads running): takes
    /// the dirty sites.
    fn rework_plan(&mut self) -> Option<Rework> {
        if !self.shared.collect_dirty.load(Ordering::Acquire) {
            return None;
        }
        if self.is_gone() || self.shared.lock().status != Status::Attached {
            self.shared.collect_dirty.store(false, Ordering::Release);
            self.shared.quiet.end();
            return None;
        }
        if self
            .threads
            .iter()
            .any(|(_, t)| t.kind() == Kind::VforkChild)
        {
            // Its parent is inside vfork and cannot stop: wait for the child's exec or
            // exit (traps meanwhile take the stop path).
            return None;
        }
        if self
            .shared
            .lock()
            .collect
            .rework_after
            .is_some_and(|t| std::time::Instant::now() < t)
        {
            return None; // the program's turn (a wake-up or an event comes back here)
        }
        self.shared.collect_dirty.store(false, Ordering::Release);
        // Every change made so far has its `int3` written: the pause below settles it.
        let target = self.shared.quiet.target();
        let gen = self.shared.gen();
        let addrs: Vec<u64> = std::mem::take(&mut self.shared.lock().collect.dirty)
            .into_iter()
            .collect();
        let mut work = Vec::new();
        let mut cold_sites = Vec::new();
        // Sites of `work` without a jump yet.
        let mut fresh = 0;
        for addr in addrs {
            let site = self
                .dispatcher
                .with_site(addr, |s| Arc::clone(&s.0))
                .filter(|s| s.gen == gen);
            let want = site.as_ref().and_then(|s| match &lock(&s.collect).wanted {
                Wanted::All(c) => Some(c.clone()),
                _ => None,
            });
            let jumped = self.shared.lock().collect.jumped.contains_key(&addr);
            // Only the first EAGER_SITES collecting sites of an image are promoted at
            // once: with `-p 'libc:*'` most functions are never called, and analysing
            // and patching thousands of them would hold the program for seconds. The
            // others keep the stop path until their first hit (`note_collecting_hit`),
            // which brings them back here, hot.
            let promoted = self.shared.lock().collect.jumped.len() + fresh;
            let hit = site
                .as_ref()
                .is_some_and(|s| lock(&s.collect).heat == Heat::Hit);
            if !jumped && want.is_some() && promoted >= EAGER_SITES && !hit {
                cold_sites.push((addr, site));
                continue;
            }
            if want.is_some() || jumped {
                fresh += usize::from(!jumped);
                work.push(Work { addr, site, want });
            }
        }
        for (_, site) in cold_sites {
            if let Some(s) = site {
                let mut sc = lock(&s.collect);
                sc.heat = Heat::Cold;
                sc.path = Some(SitePath::Stop(format!(
                    "not hit yet: beyond the first {EAGER_SITES} collecting sites of a \
                     process, a site is promoted at its first hit"
                )));
            }
        }
        let settle = self.shared.quiet.behind(target);
        if work.is_empty() && !settle {
            return None;
        }
        // The region checks of new jumps look up the branches of each site's file: a
        // file's first decoding (~10 ms for libc) is done here, with the program
        // running, not in the pause that holds it.
        let fresh: Vec<u64> = {
            let st = self.shared.lock();
            work.iter()
                .filter(|w| w.want.is_some() && !st.collect.jumped.contains_key(&w.addr))
                .map(|w| w.addr)
                .collect()
        };
        if !fresh.is_empty() {
            if let Ok(maps) = crate::error::maps(self.pid()) {
                let syms = ProcessSymbols::from_maps(maps, Arc::clone(&self.shared.symbols));
                for a in fresh {
                    syms.index_branches(a);
                }
            }
        }
        Some(Rework {
            work,
            target,
            settle,
        })
    }

    /// Do `plan` with every thread of the family held; leaves them held.
    fn rework_held(&mut self, plan: Rework) -> Result<()> {
        let Rework {
            work,
            target,
            settle,
        } = plan;
        if self.is_gone() {
            return Ok(());
        }
        if settle {
            self.finish_actions();
            self.shared.quiet.settle(target);
        }
        if work.iter().any(|w| w.want.is_some()) {
            match self.held_thread() {
                Some((tid, ur)) => self.ensure_area(tid, &ur),
                None if matches!(self.shared.lock().collect.area, AreaState::NotTried) => {
                    // No thread can make a system call now (all at event stops): try
                    // again after the next event; hits take the stop path meanwhile.
                    let mut st = self.shared.lock();
                    st.collect.dirty.extend(work.iter().map(|w| w.addr));
                    self.shared.collect_dirty.store(true, Ordering::Release);
                    drop(st);
                    return Ok(());
                }
                None => {}
            }
            self.ensure_waker();
        }
        self.note_all_threads();
        // Read once per pause: every site of the batch is in the same memory map (a
        // page of trampolines mapped meanwhile holds no probed code).
        let maps = match crate::error::maps(self.pid()) {
            Ok(m) => m,
            Err(_) => return Ok(()),
        };
        // Jumps whose code went (dlclose) are forgotten before anything is decided by
        // them: a site reloaded at the same address is not a promoted one.
        self.shared.lock().forget_gone_jumps(&maps, 0..u64::MAX);
        let syms = ProcessSymbols::from_maps(maps.clone(), Arc::clone(&self.shared.symbols));
        // The program is held while we work: a large batch (`-p 'libc:*'`) is done
        // over several pauses, the rest left dirty for the next round.
        let budget = std::time::Instant::now();
        let mut work = work.into_iter();
        while let Some(w) = work.next() {
            if budget.elapsed() > REWORK_BUDGET {
                let mut st = self.shared.lock();
                st.collect.dirty.insert(w.addr);
                st.collect.dirty.extend(work.map(|w| w.addr));
                self.shared.collect_dirty.store(true, Ordering::Release);
                break;
            }
            let why = match (&w.want, &w.site) {
                (Some(cols), Some(site)) => match self.promote(site, cols, &maps, &syms) {
                    Ok(()) => None,
                    Err(why) if why == RETRY => {
                        self.shared.lock().collect.dirty.insert(w.addr);
                        self.shared.collect_dirty.store(true, Ordering::Release);
                        continue;
                    }
                    Err(why) => Some(why),
                },
                _ => Some(String::new()),
            };
            if let Some(why) = why {
                self.demote(w.addr, w.site.is_some(), Some(&maps));
                if let (Some(s), false) = (&w.site, why.is_empty()) {
                    lock(&s.collect).path = Some(SitePath::Stop(why));
                }
            } else if let Some(s) = &w.site {
                lock(&s.collect).path = Some(SitePath::InTracee);
            }
        }
        // A rework cut short by its budget: the program gets four times as long as it
        // was held before the next one (a short one leaves the next free to come at
        // once: sites registered at start-up are promoted before the program is far).
        let held = budget.elapsed();
        self.shared.lock().collect.rework_after =
            (held > REWORK_BUDGET).then(|| std::time::Instant::now() + 4 * held);
        Ok(())
    }

    /// Build a trampoline for `cols` at `site` and point the site's jump at it (every
    /// thread is held). `Err`: why the site stays (or becomes again) a stop site.
    fn promote(
        &mut self,
        site: &SiteInner,
        cols: &[(HandlerId, Collect)],
        maps: &Maps,
        syms: &ProcessSymbols,
    ) -> std::result::Result<(), String> {
        let pid = self.pid();
        let addr = site.addr;
        let (region, area, layout, site_index, thread_id) = {
            let mut st = self.shared.lock();
            // The jump goes over our `int3` in the code the site was placed in: not
            // into code loaded there since (its breakpoint went with the old code).
            let mut now = [0u8];
            let ours = maps.mapped_at(addr).as_ref() == Some(&site.mapped)
                && st.armed.contains_key(&addr)
                && st.usable().is_ok_and(|c| c.read(addr, &mut now).is_ok())
                && now[0] == INT3;
            if !ours {
                return Err("its code is no longer mapped where it was placed".into());
            }
            let area = match &st.collect.area {
                AreaState::Mapped(a) => (a.tracee, a.layout),
                AreaState::Failed(why) => return Err(why.clone()),
                AreaState::NotTried => return Err(RETRY.into()),
            };
            let src = Remote {
                st: &st,
                syms,
                maps,
                site: addr,
            };
            let prepared = multiprobe_x86::prepare(addr, &src).map_err(|e| e.to_string())?;
            let region = prepared
                .region
                .map_err(|r| format!("the region cannot be replaced: {r}"))?;
            let index = st.collect.site_index(addr);
            let tid_mode = *st
                .collect
                .thread_id
                .get_or_insert_with(|| thread_id_of(pid));
            (region, area.0, area.1, index, tid_mode)
        };
        let rets = cols.iter().any(|(_, c)| c.action().at_return());
        let shadow = if rets {
            self.ensure_return_hooks(addr);
            self.ensure_shadow()?
        } else {
            0
        };
        let tsc_ns_q32 = match &self.shared.lock().collect.area {
            AreaState::Mapped(a) => super::handler::lock(&a.clock).ns_per_tick_q32(),
            _ => 0,
        };
        let collectors: Vec<Collector> = cols
            .iter()
            .map(|(_, c)| Collector {
                slot: c.0.bound.get().map_or(u32::MAX, |b| b.slot),
                action: c.0.action,
            })
            .collect();
        let spec = CollectSpec {
            region: &region,
            site: site_index,
            collectors: &collectors,
            area,
            layout: &layout,
            thread_id,
            shadow,
            tsc_ns_q32,
        };
        let built = self.place_collect_trampoline(addr, &spec)?;
        {
            let mut st = self.shared.lock();
            let procs = &mut st.collect;
            procs
                .retiring
                .retain(|r| !collectors.iter().any(|c| c.slot == r.slot));
            if let AreaState::Mapped(a) = &procs.area {
                for c in collectors.iter().filter(|c| c.action.at_return()) {
                    super::reader::set_live(a, c.slot, true);
                }
            }
        }
        // Threads in the site's out-of-line slots would jump back into the interior:
        // out of them first. Then threads standing in the interior go to the same point
        // of the copy.
        let held = self.threads.held();
        let mut served = Vec::new();
        for &tid in &held {
            if self.out_of_site_slots(tid, addr) {
                served.push(tid);
            }
        }
        for tid in held {
            if let Ok(mut ur) = sys::get_regs(tid) {
                if ur.rip == addr && served.contains(&tid) {
                    // Its handlers ran at its stop: on to the copy, past the actions.
                    ur.rip = built.copy_of(0);
                    let _ = sys::set_regs(tid, &ur);
                } else if region.in_interior(ur.rip) {
                    if let Some(i) = region.boundary_index(ur.rip) {
                        ur.rip = built.copy_of(i);
                        let _ = sys::set_regs(tid, &ur);
                    }
                }
            }
        }
        let (jump, len) = region
            .jump_bytes(built.addr())
            .ok_or_else(|| "the trampoline is out of reach".to_string())?;
        let mut st = self.shared.lock();
        if st.collect.dirty.contains(&addr) {
            // Its handlers changed while this was built (from another thread, which
            // saw no jump to trap and so waits for nothing): the trampoline runs the
            // old list, so no jump to it. The site keeps its `int3` and is redone
            // next time; the trampoline stays unused.
            return Err(RETRY.into());
        }
        st.usable()
            .and_then(|code| code.write(addr + 1, &jump[1..len]))
            .map_err(|e| e.to_string())?;
        // From here the text holds our jump's bytes behind the `int3`: recorded at once
        // (`trapping`), so that if byte 0 cannot be written the caller's demote puts the
        // region back — never a restore of byte 0 alone over the jump's displacement.
        st.collect.jumped.insert(
            addr,
            Jumped {
                region,
                map: built,
                trapping: true,
                mapped: site.mapped.clone(),
                jump,
            },
        );
        st.usable()
            .and_then(|code| code.write(addr, &jump[..1]))
            .map_err(|e| e.to_string())?;
        if let Some(j) = st.collect.jumped.get_mut(&addr) {
            j.trapping = false;
        }
        Ok(())
    }

    /// Move the held thread `tid` out of the slots of the site at `addr`, to the
    /// equivalent original address (single-stepping to the slot's next boundary first if
    /// it is between two); its post-handlers there are given up (a promoted site has
    /// none), a signal held back for the slot is delivered later. Whether it was in one
    /// (then its hit was served already).
    fn out_of_site_slots(&mut self, tid: Tid, addr: u64) -> bool {
        let Some(site) = self.dispatcher.with_site(addr, |s| Arc::clone(&s.0)) else {
            return false;
        };
        let Some(slots) = site.slots.get() else {
            return false;
        };
        // By where it is, not by what the thread's slot stack says (pruned or not).
        match sys::get_regs(tid) {
            Ok(ur) if slots.contains(ur.rip) => {}
            _ => return false,
        }
        if let Some(th) = self.threads.get_mut(tid) {
            if let Some(i) = th.slots.iter().rposition(|s| s.site.addr == addr) {
                let slot = th.slots.remove(i);
                if let Some(sig) = slot.deferred.and_then(|d| d.signal()) {
                    self.aside.push_signal(tid, sig);
                }
            }
        }
        for _ in 0..16 {
            let Ok(ur) = sys::get_regs(tid) else {
                return false;
            };
            let Some(s) = slots.slot_of(ur.rip) else {
                return true;
            };
            let mut regs = crate::regs::to_core(&ur);
            if s.fixup_ip(&mut regs) {
                let _ = sys::set_regs(tid, &crate::regs::from_core(&ur, &regs));
                return true;
            }
            if sys::single_step(tid, None).is_err() {
                return true;
            }
            match sys::wait(Some(tid), false) {
                Ok(Some(crate::sys::Wait::Signal(_, crate::sys::Signal::TRAP))) => {}
                Ok(Some(crate::sys::Wait::Signal(_, sig))) => self.aside.push_signal(tid, sig),
                Ok(Some(w)) => {
                    self.aside.push_wait(w);
                    return false;
                }
                _ => return false,
            }
        }
        true
    }

    /// Build the trampoline of `spec` near `addr` and write it into trampoline memory
    /// (mapping a chunk of pages when none within reach has room).
    fn place_collect_trampoline(
        &mut self,
        addr: u64,
        spec: &CollectSpec<'_>,
    ) -> std::result::Result<CollectMap, String> {
        for _ in 0..2 {
            let candidates = self.shared.lock().collect.pages.candidates(addr);
            for at in candidates {
                // Built where it goes (its references are rip-relative); a page without
                // room for it is done with.
                let built = build_collect_trampoline(spec, at).map_err(|e| e.to_string())?;
                let len = built.bytes.len() as u64;
                let mut st = self.shared.lock();
                if len > TrampolinePages::room(at) {
                    st.collect.pages.take(at, PAGE);
                    continue;
                }
                st.write_slot(at, &built.bytes).map_err(|e| e.to_string())?;
                st.collect.pages.take(at, len);
                st.collect.trampolines.push(built.map);
                return Ok(built.map);
            }
            self.map_trampoline_pages(addr)?;
        }
        Err("no trampoline memory within reach".into())
    }

    /// Map [`CHUNK_PAGES`] trampoline pages within reach of `addr`, with one injected
    /// `mmap` on a held thread.
    fn map_trampoline_pages(&mut self, addr: u64) -> std::result::Result<(), String> {
        let (tid, ur) = self.held_thread().ok_or(RETRY)?;
        let maps = crate::error::maps(self.pid()).map_err(|e| e.to_string())?;
        let len = CHUNK_PAGES * PAGE;
        let want = maps
            .free_near(addr, addr + 1, len, REACH)
            .ok_or_else(|| format!("no free memory within reach of {addr:#x}"))?;
        let got = self
            .map_pages(tid, &ur, want, len)
            .map_err(|e| e.to_string())?;
        let mut st = self.shared.lock();
        for page in (got..got + len).step_by(PAGE as usize) {
            st.xol.add_reserved_page(page);
            st.collect.pages.pages.push((page, 0));
        }
        Ok(())
    }

    /// Put the original bytes of a jumped region back (every thread is held), behind
    /// our `int3` if the site is still armed (and `keep` allows it). Nothing is
    /// written where the jump went with its code (`maps`: the process's, if read).
    fn demote(&mut self, addr: u64, keep: bool, maps: Option<&Maps>) {
        let mut st = self.shared.lock();
        if st.forget_gone_jump(addr, maps) {
            return;
        }
        let armed = keep && st.armed.contains_key(&addr);
        let Some(j) = st.collect.jumped.get(&addr).cloned() else {
            return;
        };
        let Ok(code) = st.usable() else {
            st.collect.jumped.remove(&addr);
            return;
        };
        let orig = j.region.bytes();
        let first = if armed { INT3 } else { orig[0] };
        if code.write(addr, &[INT3]).is_ok()
            && code.write(addr + 1, &orig[1..]).is_ok()
            && code.write(addr, &[first]).is_ok()
        {
            st.collect.jumped.remove(&addr);
        }
    }

    /// Demote every site and move every held thread out of the trampolines, for
    /// detach: afterwards no thread is in trampoline memory. Every thread is held.
    pub(crate) fn unjump_all(&mut self) {
        let addrs: Vec<u64> = self.shared.lock().collect.jumped.keys().copied().collect();
        let maps = crate::error::maps(self.pid()).ok();
        for a in addrs {
            self.demote(a, false, maps.as_ref());
        }
        let maps: Vec<CollectMap> = self.shared.lock().collect.trampolines.clone();
        let tids = self.threads.held();
        for tid in tids {
            self.out_of_trampolines(tid, &maps);
        }
    }

    /// Move the stopped thread `tid` out of any trampoline in `maps`: let it run out of
    /// the action code ([`Tracer::run_out_of_actions`]), then to the original
    /// instruction its copy stands for.
    pub(crate) fn out_of_trampolines(&mut self, tid: Tid, maps: &[CollectMap]) {
        let Some(m) = self.run_out_of_actions(tid, maps) else {
            return;
        };
        if let Ok(ur) = sys::get_regs(tid) {
            let mut regs = crate::regs::to_core(&ur);
            if m.fixup(&mut regs).is_some() {
                let _ = sys::set_regs(tid, &crate::regs::from_core(&ur, &regs));
            }
        }
    }

    /// Rule 3 at a pause (every thread held): let each thread that stands in the
    /// action code of a trampoline run out of it, so that none is left running a list
    /// that changed before the pause (`quiet.rs`). They stay in the copies, which go
    /// on as before (trampolines are never freed while the image lives).
    fn finish_actions(&mut self) {
        let maps: Vec<CollectMap> = self.shared.lock().collect.trampolines.clone();
        if maps.is_empty() {
            return;
        }
        let tids = self.threads.held();
        for tid in tids {
            self.run_out_of_actions(tid, &maps);
        }
    }

    /// Single-step the stopped thread `tid` (bounded) while it is in the action code of
    /// a trampoline in `maps`; returns the trampoline it stands in afterwards (in a
    /// relocated copy), `None` outside them all (or if it could not be stepped). An
    /// action's fault on the way resumes as at run time (the record is committed as
    /// faulted); other signals are held back for later. The action code saves and
    /// restores `rflags` (`pushfq` ... `popfq`): a step over the `pushfq` saves the trap
    /// flag, which the `popfq` puts back, so it is cleared at the end unless the thread
    /// had it before (otherwise the program would die of the next SIGTRAP).
    fn run_out_of_actions(&mut self, tid: Tid, maps: &[CollectMap]) -> Option<CollectMap> {
        let had_tf = sys::get_regs(tid).is_ok_and(|r| r.eflags & RFLAGS_TF != 0);
        let mut stepped = false;
        for _ in 0..4096 {
            let mut ur = sys::get_regs(tid).ok()?;
            let m = *maps.iter().find(|m| m.contains(ur.rip))?;
            if m.locate(ur.rip) != Some(Location::Inside) {
                if stepped && !had_tf && ur.eflags & RFLAGS_TF != 0 {
                    ur.eflags &= !RFLAGS_TF;
                    let _ = sys::set_regs(tid, &ur);
                }
                return Some(m);
            }
            stepped = true;
            sys::single_step(tid, None).ok()?;
            match sys::wait(Some(tid), false) {
                Ok(Some(crate::sys::Wait::Signal(_, crate::sys::Signal::TRAP))) => {}
                Ok(Some(crate::sys::Wait::Signal(_, sig)))
                    if sig.is_fault() && self.action_fault(tid) => {}
                Ok(Some(crate::sys::Wait::Signal(_, sig))) => self.aside.push_signal(tid, sig),
                Ok(Some(w)) => {
                    self.aside.push_wait(w);
                    return None;
                }
                _ => return None,
            }
        }
        None
    }

    /// A SIGSEGV or SIGBUS of `tid` at `rip`: if it is an action's access in a
    /// trampoline, resume it at the fault table's resume point (which commits the
    /// record as faulted and counts it) and say so; the program never sees it.
    pub(crate) fn action_fault(&mut self, tid: Tid) -> bool {
        let Ok(mut ur) = sys::get_regs(tid) else {
            return false;
        };
        let resume = {
            let st = self.shared.lock();
            st.collect.trampolines.iter().find_map(|m| m.fault(ur.rip))
        };
        let Some(f) = resume else {
            return false;
        };
        ur.rip = f.resume;
        sys::set_regs(tid, &ur).is_ok()
    }

    /// Record every held thread's fs base (records name threads by it).
    fn note_all_threads(&mut self) {
        let mut seen = Vec::new();
        for (tid, th) in self.threads.iter() {
            if th.is_held() {
                if let Ok(ur) = sys::get_regs(tid) {
                    seen.push((ur.fs_base, tid.as_raw_pid()));
                }
            }
        }
        let mut st = self.shared.lock();
        for (fs, tid) in seen {
            st.collect.threads.note(fs, tid);
        }
    }

    /// The clone event of `creator` made thread `new`: note its fs base (the clone's
    /// TLS argument: `r8` of `clone`, `tls` of `clone3`'s arguments).
    pub(crate) fn note_clone(&mut self, creator: Tid, new: Tid) {
        if matches!(self.shared.lock().collect.area, AreaState::NotTried) {
            return;
        }
        let Ok(ur) = sys::get_regs(creator) else {
            return;
        };
        // Only a clone that sets the new thread's TLS gives it a fs base of its own
        // (without CLONE_SETTLS it shares its creator's, and `tls` means nothing).
        let settls = libc::CLONE_SETTLS as u64;
        let tls = match ur.orig_rax as i64 {
            libc::SYS_clone if ur.rdi & settls != 0 => Some(ur.r8),
            libc::SYS_clone3 => {
                use multiprobe_core::Memory;
                let mut b = [0u8; 64];
                // struct clone_args: flags is the 1st u64, tls the 8th.
                self.mem.read(ur.rdi, &mut b).ok().and_then(|_| {
                    let word =
                        |i: usize| u64::from_le_bytes(b[8 * i..8 * i + 8].try_into().unwrap());
                    (word(0) & settls != 0).then(|| word(7))
                })
            }
            _ => None,
        };
        if let Some(fs) = tls {
            self.shared
                .lock()
                .collect
                .threads
                .note(fs, new.as_raw_pid());
        }
    }

    /// The doorbell's line, for waking the loop when a registration changes a jumped
    /// site from another thread.
    fn ensure_waker(&mut self) {
        if self.shared.waker.get().is_none() {
            if let Ok(h) = self.bell.handle() {
                let _ = self.shared.waker.set(h);
            }
        }
    }
}

/// How the tracee's threads can read their fs base: `rdfsbase` if its kernel lets
/// user space (`HWCAP2_FSGSBASE` in its auxiliary vector), else `fs:[0]`.
fn thread_id_of(pid: i32) -> ThreadId {
    const AT_HWCAP2: u64 = 26;
    const HWCAP2_FSGSBASE: u64 = 1 << 1;
    let auxv = std::fs::read(format!("/proc/{pid}/auxv")).unwrap_or_default();
    let has = auxv.chunks_exact(16).any(|e| {
        let k = u64::from_le_bytes(e[..8].try_into().expect("8"));
        let v = u64::from_le_bytes(e[8..].try_into().expect("8"));
        k == AT_HWCAP2 && v & HWCAP2_FSGSBASE != 0
    });
    if has {
        ThreadId::RdFsBase
    } else {
        ThreadId::FsZero
    }
}
