//! The [`Backend`] implementation: validating an address, preparing its slots, and
//! inserting and removing the `int3`.
//!
//! Invariants:
//! * `ARMED` maps every address where some backend of this process has its `int3` to
//!   the original byte; it is changed only together with the code (under its lock), so
//!   a copy of code read under the lock can have its original bytes put back exactly.
//! * A site's [`BlockInfo`] is leaked and never changes once its block is published
//!   (slots are never reused: see [`crate::slots`]); the signal path reaches it either
//!   through the site or through the block header.

use std::collections::BTreeMap;
use std::sync::{Mutex, OnceLock};

use multiprobe_core::backend::{Backend, Dispatcher};
use multiprobe_core::{Error, Result};
use multiprobe_x86::{Plan, Slot, SlotKind, INT3, MAX_INSN_LEN, MAX_SLOT_LEN};

use multiprobe_symbols::{MappedAt, Maps};

use crate::{
    collect, dispatchers, fault, known, memory, patch, slots, source, symbols, thread, trap,
};

/// Addresses armed by any backend in this process → original first byte.
static ARMED: Mutex<BTreeMap<u64, u8>> = Mutex::new(BTreeMap::new());

fn armed() -> std::sync::MutexGuard<'static, BTreeMap<u64, u8>> {
    ARMED.lock().unwrap_or_else(|p| p.into_inner())
}

/// Everything a hit at one address needs, at fixed addresses for the process lifetime.
#[derive(Debug)]
pub(crate) struct BlockInfo {
    pub(crate) addr: u64,
    pub(crate) plan: Plan,
    /// The jump-back slot: every hit without post-handlers that is not emulated.
    pub(crate) boost: Slot,
    /// The trailing-`int3` slot, when the instruction has one (`ret`, `jmp [mem]` and
    /// `call [mem]` do not: they are always emulated).
    pub(crate) post: Option<Slot>,
}

impl BlockInfo {
    /// What the site has for continuing a hit (the shared decision's input).
    pub(crate) fn ways(&self) -> multiprobe_x86::Ways<'_> {
        multiprobe_x86::Ways {
            plan: &self.plan,
            jump_back: Some(&self.boost),
            trap_after: self.post.as_ref(),
            trampoline: None,
        }
    }

    /// The slot of this block that contains `ip`, if any.
    pub(crate) fn slot_at(&self, ip: u64) -> Option<&Slot> {
        [Some(&self.boost), self.post.as_ref()]
            .into_iter()
            .flatten()
            .find(|s| s.contains(ip))
    }
}

/// Per-site data of the sigtrap backend.
#[derive(Debug)]
pub struct Site {
    pub(crate) info: &'static BlockInfo,
    /// What was mapped at the address when it was prepared: disarm writes the byte back
    /// only into the same code (not into a library loaded where an unloaded one was).
    mapped: MappedAt,
}

/// How a hit at a site executes the instruction the `int3` displaced.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Class {
    /// Emulated on the interrupted registers (`nop`, `endbr64`, `push`, `jmp`, `jcc`,
    /// `call`, `ret`, ...): no slot, one trap even with post-handlers.
    Emulated,
    /// Executed from an out-of-line slot within ±2 GiB of the code: a slot that jumps
    /// back (one trap), or, with post-handlers, one that ends in `int3` (two).
    OutOfLine,
}

impl Site {
    /// Whether the code this site was prepared on is still at `addr`, with our `int3`
    /// on it (`now` holds the bytes there, as long as the instruction).
    ///
    /// A file mapping is known by its file and offset. Anonymous memory has no name that
    /// survives the kernel splitting or merging its mapping — which happens to a JIT's
    /// region when it changes the protection of some of its pages, to neighbours mapped
    /// with the same flags (slot memory, another JIT buffer), and briefly to any code
    /// `patch`'s `mprotect` fallback writes — so its region's start cannot tell: it is
    /// the same code while it is anonymous and the instruction's bytes after the first
    /// are unchanged.
    fn still_there(&self, maps: &Maps, addr: u64, now: &[u8]) -> bool {
        let orig = self.info.plan.bytes();
        if now.first() != Some(&INT3) {
            return false;
        }
        match (maps.mapped_at(addr), &self.mapped) {
            (Some(MappedAt::Anonymous { .. }), MappedAt::Anonymous { .. }) => {
                now.get(1..) == orig.get(1..)
            }
            (Some(m), _) => m == self.mapped,
            (None, _) => false,
        }
    }

    /// How hits at this site execute the probed instruction.
    pub fn class(&self) -> Class {
        match self.info.plan.class() {
            multiprobe_x86::Class::Emulated(_) => Class::Emulated,
            multiprobe_x86::Class::Relocated(_) => Class::OutOfLine,
        }
    }

    /// The probed instruction, disassembled.
    pub fn instruction(&self) -> String {
        self.info.plan.disassemble()
    }
}

/// Probes in the current process. See the crate documentation.
#[derive(Debug, Default)]
pub struct SigtrapBackend {
    entry: OnceLock<usize>,
}

impl SigtrapBackend {
    /// A backend for this process. Installs the process-wide SIGTRAP and fault handlers
    /// the first time one is created (install your own fault handlers before that, so
    /// ours can hand faults on to them).
    pub fn new() -> Self {
        install();
        SigtrapBackend::default()
    }
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
        let armed = armed();
        if armed.contains_key(&addr) {
            return Err(Error::AlreadyBreakpoint { addr });
        }
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
        let info = block_info(addr, prepared.plan)?;
        known::insert(addr);
        Ok(Site { info, mapped })
    }

    fn arm(&self, addr: u64, site: &Site) -> Result<()> {
        let mut armed = armed();
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
        armed.insert(addr, orig);
        Ok(())
    }

    fn disarm(&self, addr: u64, site: &Site) -> Result<()> {
        let mut armed = armed();
        let orig = site.info.plan.bytes()[0];
        // The code may have been unloaded (`dlclose`), and other code loaded there.
        let maps = Maps::read(0).map_err(|e| Error::io("reading /proc/self/maps", e))?;
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
fn block_info(addr: u64, plan: Plan) -> Result<&'static BlockInfo> {
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
