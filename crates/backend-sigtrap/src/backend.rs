//! The [`Backend`] implementation: validating an address, preparing its slots,
//! inserting and removing the `int3`, and promoting armed sites to jumps (and back).
//!
//! Invariants:
//! * `ARMED` maps every address where some backend of this process has its `int3` or
//!   its jump to the original bytes there ([`Armed`]); it is changed only together with
//!   the code (under its lock), so a copy of code read under the lock can have its
//!   original bytes put back exactly.
//! * A site's [`BlockInfo`] is leaked and never changes once its block is published
//!   (slots and trampolines are never reused: see [`crate::slots`], [`crate::tramps`]);
//!   the signal path reaches it through the site, the block header or the trampoline's.
//! * A promoted site is demoted (`int3` on byte 0, then the original bytes) before its
//!   `int3` is removed; a site is promoted only while armed.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Mutex, OnceLock};

use multiprobe_core::backend::{Backend, Dispatcher};
use multiprobe_core::{Error, Result};
use multiprobe_x86::{Plan, Region, SlotKind, INT3, MAX_INSN_LEN, MAX_SLOT_LEN};

use multiprobe_symbols::Maps;

use crate::site::{BlockInfo, SiteState};
pub use crate::site::{Class, Mode, Site, TrapReason};
use crate::{
    collect, dispatchers, fault, known, memory, patch, promote, returning, slots, source, symbols,
    thread, tramps, trap, unwind,
};

/// One armed address of this process: the original byte under the `int3`, and the
/// original region under the jump while promoted.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Armed {
    pub(crate) orig: u8,
    pub(crate) jump: Option<Region>,
}

/// Addresses armed by any backend in this process.
static ARMED: Mutex<BTreeMap<u64, Armed>> = Mutex::new(BTreeMap::new());

fn armed() -> std::sync::MutexGuard<'static, BTreeMap<u64, Armed>> {
    ARMED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Probes in the current process. See the crate documentation.
#[derive(Debug)]
pub struct SigtrapBackend {
    entry: OnceLock<usize>,
    /// Promote armed sites to jumps when their region allows.
    promote: bool,
    /// Addresses to keep as `int3` sites whatever the regions say.
    keep: Mutex<HashSet<u64>>,
}

impl Default for SigtrapBackend {
    fn default() -> Self {
        SigtrapBackend::new()
    }
}

impl SigtrapBackend {
    /// A backend for this process, promoting armed sites to trap-free jumps where the
    /// code allows (unless the environment variable `MULTIPROBE_SIGTRAP_PROMOTE` is `0`,
    /// which keeps every site of backends made by `new` an `int3` site: how the test
    /// suite runs on trap sites too). Installs the process-wide SIGTRAP and fault
    /// handlers the first time one is created (install your own fault handlers before
    /// that, so ours can hand faults on to them).
    pub fn new() -> Self {
        let promote = std::env::var_os("MULTIPROBE_SIGTRAP_PROMOTE").is_none_or(|v| v != "0");
        Self::with_promotion(promote)
    }

    /// A backend that promotes sites (`true`, the default of [`SigtrapBackend::new`]) or
    /// keeps every site an `int3` site (`false`).
    pub fn with_promotion(promote: bool) -> Self {
        install();
        SigtrapBackend {
            entry: OnceLock::new(),
            promote,
            keep: Mutex::new(HashSet::new()),
        }
    }

    /// Keep the site at `addr` an `int3` site (for a probe registered after this call;
    /// an armed one: [`SigtrapBackend::demote`]).
    pub fn keep_as_trap(&self, addr: u64) {
        self.keep
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(addr);
    }

    fn info(&self, addr: u64) -> Option<&'static BlockInfo> {
        let i = *self.entry.get()?;
        dispatchers::get(i)?.with_site(addr, |s| s.info)
    }

    /// Whether hits at `addr` are trap-free, if a probe of this backend is there.
    pub fn mode_at(&self, addr: u64) -> Option<Mode> {
        Some(self.info(addr)?.state().mode.clone())
    }

    /// Promote the armed site at `addr` now (it may have been demoted, or refused when
    /// a thread did not answer); returns its mode afterwards. A site the region checks
    /// refuse stays an `int3` site ([`Mode::Trap`] says why): that is not an error.
    pub fn promote(&self, addr: u64) -> Result<Mode> {
        let info = self.info(addr).ok_or_else(|| no_probe(addr))?;
        let mut armed = armed();
        if !armed.contains_key(&addr) {
            return Ok(Mode::Trap(TrapReason::NotArmed));
        }
        info.state().promote = true;
        try_promote(info, &mut armed);
        Ok(info.state().mode.clone())
    }

    /// Make the site at `addr` an `int3` site (it stays one until
    /// [`SigtrapBackend::promote`]).
    pub fn demote(&self, addr: u64) -> Result<()> {
        let info = self.info(addr).ok_or_else(|| no_probe(addr))?;
        let mut armed = armed();
        let mut st = info.state();
        st.promote = false;
        if let Some(a) = armed.get_mut(&addr) {
            if let Some(region) = a.jump {
                promote::demote(&region, info)
                    .map_err(|e| Error::io(format!("demoting the site at {addr:#x}"), e))?;
                a.jump = None;
            }
            st.mode = Mode::Trap(TrapReason::Kept);
        }
        Ok(())
    }
}

fn no_probe(addr: u64) -> Error {
    Error::Backend(format!("no probe of this backend at {addr:#x}"))
}

/// The promoted site whose jump covers `addr` (its first byte or its region's other
/// bytes), if one does: for tests that check bytes next to other registries' sites.
#[doc(hidden)]
pub fn jump_covering(addr: u64) -> Option<u64> {
    let armed = armed();
    armed
        .range(addr.saturating_sub(multiprobe_x86::MAX_REGION_LEN as u64)..=addr)
        .find(|(&a, arm)| arm.jump.is_some_and(|r| addr >= a && addr < r.end()))
        .map(|(&a, _)| a)
}

/// Promote `info`'s armed site if its state allows, recording the outcome in its mode.
/// Under the arm lock.
fn try_promote(info: &'static BlockInfo, armed: &mut BTreeMap<u64, Armed>) {
    let addr = info.addr;
    let mut st = info.state();
    if armed.get(&addr).is_some_and(|a| a.jump.is_some()) {
        st.mode = Mode::Jump;
        return;
    }
    if !st.promote {
        st.mode = Mode::Trap(TrapReason::Kept);
        return;
    }
    let region = match &st.region {
        Ok(r) => *r,
        Err(why) => {
            st.mode = Mode::Trap(TrapReason::Region(*why));
            return;
        }
    };
    // Another site armed inside the region since it was prepared.
    if let Some((&at, _)) = armed.range(addr + 1..region.end()).next() {
        st.mode = Mode::Trap(TrapReason::Region(
            multiprobe_x86::RegionRefusal::ProbeInside { at },
        ));
        return;
    }
    // Sites promoted now (their trampolines' exits cannot reach into this region).
    let promoted: Vec<u64> = armed
        .iter()
        .filter(|(_, a)| a.jump.is_some())
        .map(|(&a, _)| a)
        .collect();
    st.mode = match promote::promote(&region, info, &promoted) {
        Ok(t) => {
            let _ = info.tramp.set(t.map());
            if let Some(a) = armed.get_mut(&addr) {
                a.jump = Some(region);
            }
            Mode::Jump
        }
        Err(promote::PromoteFailure::Trampoline(e)) => {
            Mode::Trap(TrapReason::Trampoline(e.to_string()))
        }
        Err(promote::PromoteFailure::Threads(e)) => Mode::Trap(TrapReason::Threads(e.to_string())),
        Err(e @ promote::PromoteFailure::Write(_)) => Mode::Trap(TrapReason::Write(e.to_string())),
    };
}

/// A site being prepared at `addr` lies inside the region of a promoted site: put that
/// one back to an `int3` site first (its jump covers this instruction). Under the arm
/// lock.
fn demote_enclosing(addr: u64, armed: &mut BTreeMap<u64, Armed>) -> Result<()> {
    let enclosing = armed
        .range(..addr)
        .next_back()
        .and_then(|(&a, arm)| arm.jump.filter(|r| r.in_interior(addr)).map(|r| (a, r)));
    if let Some((a, region)) = enclosing {
        let info = dispatchers::each().find_map(|d| d.with_site(a, |s| s.info));
        match info {
            Some(info) => {
                promote::demote(&region, info)
                    .map_err(|e| Error::io(format!("demoting {a:#x}"), e))?;
                info.state().mode = Mode::Trap(TrapReason::Region(
                    multiprobe_x86::RegionRefusal::ProbeInside { at: addr },
                ));
            }
            None => return Err(no_probe(a)),
        }
        armed.get_mut(&a).expect("just found").jump = None;
    }
    Ok(())
}

impl SigtrapBackend {
    /// How hits at `addr` are served, if a probe of this backend is there.
    pub fn class_at(&self, addr: u64) -> Option<Class> {
        let i = *self.entry.get()?;
        dispatchers::get(i)?.with_site(addr, |s| s.class())
    }
}

/// Install the process-wide handlers and per-thread hooks (idempotent).
pub(crate) fn install() {
    thread::setup();
    fault::install();
    trap::install();
    quiet_panics_in_handlers();
    unwind::install();
    collect::start();
}

/// Wrap the panic hook installed now so that it stays silent for a panic of a handler:
/// the core catches and counts it, and the default hook would lock stderr, allocate and
/// maybe walk the stack for a backtrace — inside a signal handler. Panics anywhere else
/// go to the previous hook as before. (A hook installed later replaces this one; it can
/// call [`crate::in_handler`] to do the same.)
fn quiet_panics_in_handlers() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !thread::in_handler() {
                prev(info);
            }
        }));
    });
}

impl Drop for SigtrapBackend {
    fn drop(&mut self) {
        if let Some(&i) = self.entry.get() {
            dispatchers::detach(i);
        }
    }
}

fn bad(addr: u64, reason: &'static str) -> Error {
    Error::InvalidAddress { addr, reason }
}

impl Backend for SigtrapBackend {
    type Site = Site;

    fn attach(&self, dispatcher: Dispatcher<Site>) {
        let i = dispatchers::attach(dispatcher)
            .expect("more than 64 sigtrap registries alive in one process");
        let _ = self.entry.set(i);
    }

    /// Handlers run in the SIGTRAP handler: registry calls from there neither lock nor
    /// allocate (the core's rules for that case).
    fn dispatches_in_signal_handlers(&self) -> bool {
        true
    }

    fn prepare(&self, addr: u64) -> Result<Site> {
        if addr >= multiprobe_x86::USER_END {
            return Err(bad(addr, "not a user-space address"));
        }
        let maps = Maps::read(0).map_err(|e| Error::io("reading /proc/self/maps", e))?;
        if slots::contains(addr) {
            return Err(Error::Reserved {
                addr,
                what: "out-of-line slot memory",
            });
        }
        if tramps::contains(addr) {
            return Err(Error::Reserved {
                addr,
                what: "trampoline memory",
            });
        }
        let (cs, ce) = memory::copy_routine();
        if (cs..ce).contains(&addr) || trap::is_handler_entry(addr) {
            return Err(Error::Reserved {
                addr,
                what: "the backend's signal handlers",
            });
        }
        if symbols::reserved_entry(addr) {
            return Err(Error::Reserved {
                addr,
                what: "libc function on the trap path",
            });
        }
        let sym = symbols::enclosing(addr, &maps);
        if let Some(what) = sym.as_ref().and_then(symbols::reserved) {
            return Err(Error::Reserved { addr, what });
        }
        // Under the arm lock, so the code read has exactly our breakpoints to put back.
        let mut armed = armed();
        if armed.contains_key(&addr) {
            return Err(Error::AlreadyBreakpoint { addr });
        }
        demote_enclosing(addr, &mut armed)?;
        let src = source::Local {
            maps: &maps,
            armed: &armed,
            sym: sym.as_ref(),
        };
        let prepared = multiprobe_x86::prepare(addr, &src)?;
        drop(armed);
        let mapped = maps
            .find(addr)
            .map(|m| m.mapped_at(addr))
            .ok_or(Error::Unmapped { addr })?;
        let info = block_info(addr, prepared.plan, prepared.region)?;
        {
            let mut st = info.state();
            st.region = prepared.region;
            st.promote = self.promote
                && !self
                    .keep
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .contains(&addr);
            st.mode = Mode::Trap(TrapReason::NotArmed);
        }
        known::insert(addr);
        Ok(Site { info, mapped })
    }

    fn arm(&self, addr: u64, site: &Site) -> Result<()> {
        let mut armed = armed();
        // A site promoted since this one was prepared may cover it now.
        demote_enclosing(addr, &mut armed)?;
        let mut now = [0u8];
        patch::read(addr, &mut now).map_err(|e| Error::io("reading code", e))?;
        let orig = site.info.plan.bytes()[0];
        if now[0] != orig {
            return Err(if now[0] == INT3 {
                Error::AlreadyBreakpoint { addr }
            } else {
                Error::Backend(format!(
                    "the code at {addr:#x} changed since it was analyzed"
                ))
            });
        }
        patch::write(addr, &[INT3])
            .map_err(|e| Error::io(format!("writing int3 at {addr:#x}"), e))?;
        armed.insert(addr, Armed { orig, jump: None });
        if let Some(&i) = self.entry.get() {
            site.info
                .owner
                .store(i, std::sync::atomic::Ordering::Relaxed);
        }
        // A working int3 site now; promotion, if it fails, leaves it so.
        try_promote(site.info, &mut armed);
        Ok(())
    }

    /// A return probe needs `addr` to be a function's first instruction: refused when
    /// the symbols say `addr` lies inside a function; code without symbols (generated
    /// code) is taken at its word. The process's return trampoline is built at the
    /// first such registration (`crate::returning`).
    fn check_return(&self, addr: u64, _site: &Site) -> Result<()> {
        let maps = Maps::read(0).map_err(|e| Error::io("reading /proc/self/maps", e))?;
        if let Some(sym) = symbols::enclosing(addr, &maps) {
            if sym.start != addr {
                return Err(Error::NotFunctionEntry {
                    addr,
                    context: format!(" (it is {}+{:#x})", sym.name, addr - sym.start),
                });
            }
            multiprobe_core::backend::check_returns_once(addr, &sym.name)?;
        }
        let entry = returning::ret as *const () as u64;
        let t = tramps::return_trampoline(addr, entry)
            .map_err(|e| Error::Backend(format!("building the return trampoline: {e}")))?;
        returning::installed(t);
        Ok(())
    }

    fn disarm(&self, addr: u64, site: &Site) -> Result<()> {
        let mut armed = armed();
        let orig = site.info.plan.bytes()[0];
        // The code may have been unloaded (`dlclose`), and other code loaded there.
        let maps = Maps::read(0).map_err(|e| Error::io("reading /proc/self/maps", e))?;
        if let Some(region) = armed.get(&addr).and_then(|a| a.jump) {
            // The jump goes first, back to the int3 site (int3-first, in reverse), and
            // only into the code it was written into.
            let want = site
                .info
                .tramp
                .get()
                .and_then(|t| region.jump_bytes(t.addr()));
            let mut now = vec![0u8; region.len()];
            let ours = patch::read(addr, &mut now).is_ok()
                && site.same_code(&maps, addr, || {
                    want.as_ref().is_some_and(|(b, n)| now[..] == b[..*n])
                });
            if !ours {
                armed.remove(&addr);
                return Err(Error::CodeGone { addr });
            }
            promote::demote(&region, site.info)
                .map_err(|e| Error::io(format!("demoting the site at {addr:#x}"), e))?;
            if let Some(a) = armed.get_mut(&addr) {
                a.jump = None;
            }
        }
        site.info.state().mode = Mode::Trap(TrapReason::NotArmed);
        let mut now = [0u8; MAX_INSN_LEN];
        let now = &mut now[..site.info.plan.bytes().len()];
        if patch::read(addr, now).is_err() || !site.still_there(&maps, addr, now) {
            armed.remove(&addr);
            return Err(Error::CodeGone { addr });
        }
        patch::write(addr, &[orig])
            .map_err(|e| Error::io(format!("restoring the byte at {addr:#x}"), e))?;
        armed.remove(&addr);
        Ok(())
    }
}

/// Build (or find again) the slot block of `plan` and its leaked description.
fn block_info(
    addr: u64,
    plan: Plan,
    region: std::result::Result<Region, multiprobe_x86::RegionRefusal>,
) -> Result<&'static BlockInfo> {
    let center = plan
        .slot_window()
        .map_or(addr, |w| w.start() / 2 + w.end() / 2);
    let slot_err = |e: multiprobe_x86::SlotError| {
        Error::Backend(format!("building a slot for {addr:#x}: {e}"))
    };
    let (block, existing) = slots::block_for(addr, center, plan.bytes())
        .map_err(|e| Error::io("allocating slot memory", e))?;
    if let Some(info) = existing {
        return Ok(info);
    }
    let boost = plan
        .build_slot(SlotKind::JumpBack, slots::boost_at(block))
        .map_err(slot_err)?;
    let post = if plan.has_trap_after_slot() {
        Some(
            plan.build_slot(SlotKind::TrapAfter, slots::post_at(block))
                .map_err(slot_err)?,
        )
    } else {
        None
    };
    let info: &'static BlockInfo = Box::leak(Box::new(BlockInfo {
        addr,
        plan,
        boost,
        post,
        tramp: OnceLock::new(),
        jump: std::sync::atomic::AtomicBool::new(false),
        owner: std::sync::atomic::AtomicUsize::new(usize::MAX),
        state: Mutex::new(SiteState {
            region,
            promote: false,
            mode: Mode::Trap(TrapReason::NotArmed),
        }),
    }));
    let mut code = [INT3; 2 * MAX_SLOT_LEN];
    code[..boost.bytes().len()].copy_from_slice(boost.bytes());
    if let Some(p) = &post {
        code[MAX_SLOT_LEN..MAX_SLOT_LEN + p.bytes().len()].copy_from_slice(p.bytes());
    }
    slots::publish(block, info, &code, plan.bytes())
        .map_err(|e| Error::io("writing slot memory", e))?;
    Ok(info)
}
