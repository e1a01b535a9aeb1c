//! What a probed address has: its leaked [`BlockInfo`] (plan, slots, trampoline) that the
//! signal and trampoline paths read, and the [`Site`] the core's table holds. A leaf
//! module: it imports nothing else of this crate, so the hot paths that need these types
//! do not import the backend's thread-context code.
//!
//! Invariants:
//! * A `BlockInfo` is leaked and its hot fields (`plan`, `boost`, `post`) never change
//!   once its block is published; `tramp` is set once, before the site's jump is
//!   written, and never changes. `state` is thread context only (the arm lock orders
//!   its changes with the code's).
//! * At most one armed site exists per address in the process (the backend's arm lock
//!   and its table of armed addresses), so the per-address `state` is that site's.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

use multiprobe_symbols::{MappedAt, Maps};
use multiprobe_x86::{Plan, Region, RegionRefusal, Slot, Trampoline, Ways, INT3};

/// Bumped after a site's trampoline is published to the trap path (`BlockInfo::tramp`):
/// a trap handler that read a value at least this new decides its continuation with
/// the trampoline in view (see `crate::threads`).
pub(crate) static PUBLISHED: AtomicU64 = AtomicU64::new(1);

/// How a site is served now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Promoted: the probed instruction (and what follows it up to 5 bytes) is a `jmp`
    /// into a trampoline; a hit costs no trap.
    Jump,
    /// An `int3` site: every hit is a SIGTRAP; why it is not (or no longer) a jump.
    Trap(TrapReason),
}

/// Why a site is an `int3` site.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TrapReason {
    /// Not armed (no enabled handler), so neither.
    #[error("not armed")]
    NotArmed,
    /// Kept as an `int3` site on request (`SigtrapBackend::with_promotion(false)`,
    /// `keep_as_trap`, or `demote`).
    #[error("kept as an int3 site on request")]
    Kept,
    /// The instructions under the jump cannot be replaced.
    #[error("{0}")]
    Region(RegionRefusal),
    /// No trampoline could be built or placed.
    #[error("no trampoline: {0}")]
    Trampoline(String),
    /// The every-thread check refused.
    #[error("{0}")]
    Threads(String),
    /// Writing the jump failed (the int3 site and the original bytes were kept).
    #[error("{0}")]
    Write(String),
}

/// Thread-context state of the site at an address.
#[derive(Debug)]
pub(crate) struct SiteState {
    /// The region the jump would replace, or why none (from the latest prepare).
    pub(crate) region: Result<Region, RegionRefusal>,
    /// Whether this site may be promoted (the backend's option and `keep_as_trap`).
    pub(crate) promote: bool,
    /// Its mode.
    pub(crate) mode: Mode,
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
    /// The trampoline's map, once built.
    pub(crate) tramp: OnceLock<&'static Trampoline>,
    /// Set from just before a promotion's thread check until the site is demoted: hits
    /// continue in the trampoline's copies then (the slots jump back into the
    /// interior, which holds the jump's bytes); in the slots otherwise (the trampoline's
    /// copies skip any probe placed inside the region after a demotion).
    pub(crate) jump: AtomicBool,
    /// The dispatcher index of the registry that armed it last (a hint: the entry asks
    /// it first).
    pub(crate) owner: std::sync::atomic::AtomicUsize,
    /// Thread context only.
    pub(crate) state: Mutex<SiteState>,
}

impl BlockInfo {
    /// What the site has for continuing a hit (the shared decision's input): its slots,
    /// or, while it is promoted (or being promoted), only its trampoline's copies (see
    /// `jump`).
    pub(crate) fn ways(&self) -> Ways<'_> {
        match self
            .tramp
            .get()
            .filter(|_| self.jump.load(Ordering::Acquire))
        {
            Some(t) => Ways {
                plan: &self.plan,
                jump_back: None,
                trap_after: None,
                trampoline: Some(t),
            },
            None => Ways {
                plan: &self.plan,
                jump_back: Some(&self.boost),
                trap_after: self.post.as_ref(),
                trampoline: None,
            },
        }
    }

    /// Where a thread continuing at original address `rip` goes: inside the region of a
    /// built trampoline, to the same point of its relocated copy.
    pub(crate) fn resume_target(&self, rip: u64) -> u64 {
        match self.tramp.get() {
            Some(t) if self.jump.load(Ordering::Acquire) => t.resume_target(rip),
            _ => rip,
        }
    }

    /// The slot of this block that contains `ip`, if any.
    pub(crate) fn slot_at(&self, ip: u64) -> Option<&Slot> {
        [Some(&self.boost), self.post.as_ref()]
            .into_iter()
            .flatten()
            .find(|s| s.contains(ip))
    }

    /// The thread-context state.
    pub(crate) fn state(&self) -> std::sync::MutexGuard<'_, SiteState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
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

/// Per-site data of the sigtrap backend.
#[derive(Debug)]
pub struct Site {
    pub(crate) info: &'static BlockInfo,
    /// What was mapped at the address when it was prepared: disarm writes the byte back
    /// only into the same code (not into a library loaded where an unloaded one was).
    pub(crate) mapped: MappedAt,
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
    pub(crate) fn still_there(&self, maps: &Maps, addr: u64, now: &[u8]) -> bool {
        let orig = self.info.plan.bytes();
        if now.first() != Some(&INT3) {
            return false;
        }
        self.same_code(maps, addr, || now.get(1..) == orig.get(1..))
    }

    /// Whether the mapping at `addr` is still the one prepared on; for anonymous memory
    /// `bytes_match` decides (see [`Site::still_there`]).
    pub(crate) fn same_code(&self, maps: &Maps, addr: u64, bytes_match: impl Fn() -> bool) -> bool {
        match (maps.mapped_at(addr), &self.mapped) {
            (Some(MappedAt::Anonymous { .. }), MappedAt::Anonymous { .. }) => bytes_match(),
            (Some(m), _) => m == self.mapped,
            (None, _) => false,
        }
    }

    /// How hits at this site execute the probed instruction on a trap.
    pub fn class(&self) -> Class {
        match self.info.plan.class() {
            multiprobe_x86::Class::Emulated(_) => Class::Emulated,
            multiprobe_x86::Class::Relocated(_) => Class::OutOfLine,
        }
    }

    /// Whether hits are trap-free now, and if not, why.
    pub fn mode(&self) -> Mode {
        self.info.state().mode.clone()
    }

    /// The probed instruction, disassembled.
    pub fn instruction(&self) -> String {
        self.info.plan.disassemble()
    }
}
