//! Trampoline memory: 64 KiB `r-x` regions within ±2 GiB of the code they serve (found
//! like slot regions), cut into [`UNIT`]-byte units, one per promoted address, plus one
//! unit for the process's common stub (the vector save, shared by every trampoline).
//!
//! A site's unit starts with a header — a pointer to its leaked [`TrampInfo`] and a magic
//! word — and its code at [`CODE_OFF`]; the signal path finds the description of a
//! trampoline a thread faulted or trapped in from its `rip` alone ([`lookup`]).
//!
//! Invariants:
//! * Units are never unmapped or reused for other code: a thread may be inside a
//!   trampoline long after its site was demoted (parked in a signal handler, say), and
//!   its bytes never change under it. Promoting the same address with the same original
//!   bytes again reuses the same unit unchanged.
//! * A unit's code is written before its header, and its header before the jump that
//!   leads there; the region table is append-only with the count published last
//!   (`Release`/`Acquire`), as for slots.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

use multiprobe_x86::{
    build_common, build_return_trampoline, build_trampoline, CpuState, Region, ReturnTrampoline,
    StateSave, Trampoline, TrampolineError, TrampolineSpec,
};

use crate::site::BlockInfo;
use crate::{patch, slots};

/// Size of one unit: header and a trampoline of at most `TRAMPOLINE_LEN` bytes.
pub(crate) const UNIT: u64 = 2048;
/// Where a unit's code starts.
pub(crate) const CODE_OFF: u64 = 64;
const _: () = assert!(CODE_OFF + multiprobe_x86::TRAMPOLINE_LEN as u64 <= UNIT);
const _: () = assert!(multiprobe_x86::COMMON_LEN as u64 <= UNIT);
const _: () = assert!(multiprobe_x86::RETURN_TRAMPOLINE_LEN as u64 <= UNIT);
const REGION: u64 = 64 * 1024;
const MAX_REGIONS: usize = 256;
/// Marks a written header ("TXtramp!" read backwards).
const MAGIC: u64 = 0x2170_6d61_7274_5854;

/// What the signal path and the entry points need about one promoted address. Leaked:
/// lives as long as the process.
#[derive(Debug)]
pub(crate) struct TrampInfo {
    /// The probed address.
    pub(crate) addr: u64,
    /// The site's plan and slots.
    pub(crate) block: &'static BlockInfo,
    /// Set once the code is built (before the header is written).
    map: OnceLock<Trampoline>,
}

impl TrampInfo {
    /// The trampoline's map. Always set once the info is reachable from a header or
    /// a jump.
    pub(crate) fn map(&self) -> &Trampoline {
        self.map.get().expect("published after the map is set")
    }
}

struct RegionEntry {
    start: AtomicU64,
}

static REGIONS: [RegionEntry; MAX_REGIONS] = [const {
    RegionEntry {
        start: AtomicU64::new(0),
    }
}; MAX_REGIONS];
static NREGIONS: AtomicUsize = AtomicUsize::new(0);

struct Alloc {
    next: Vec<u64>,
    /// Trampolines built, by probed address: (original region bytes, info).
    built: BTreeMap<u64, (Vec<u8>, &'static TrampInfo)>,
    /// The common stub's address.
    common: Option<u64>,
}

static ALLOC: Mutex<Alloc> = Mutex::new(Alloc {
    next: Vec::new(),
    built: BTreeMap::new(),
    common: None,
});

fn region_of(a: u64) -> Option<u64> {
    let n = NREGIONS.load(Ordering::Acquire);
    REGIONS[..n].iter().find_map(|r| {
        let s = r.start.load(Ordering::Relaxed);
        (s <= a && a < s + REGION).then_some(s)
    })
}

/// Whether `a` is trampoline memory. Async-signal-safe.
pub(crate) fn contains(a: u64) -> bool {
    region_of(a).is_some()
}

/// The trampoline holding `rip`, if `rip` is inside a published one. Async-signal-safe.
pub(crate) fn lookup(rip: u64) -> Option<&'static TrampInfo> {
    region_of(rip)?;
    let unit = rip & !(UNIT - 1);
    // SAFETY: the region is mapped readable for the life of the process (module
    // invariants) and the header lies inside it.
    let [info, magic] = unsafe { *(unit as *const [u64; 2]) };
    if magic != MAGIC {
        return None;
    }
    // SAFETY: a header with the magic points to a leaked, never-freed `TrampInfo` whose
    // map was set before the header was written.
    let info = unsafe { &*(info as *const TrampInfo) };
    info.map.get().filter(|m| m.contains(rip))?;
    Some(info)
}

/// A free unit within reach of `center`, in a new region if need be.
fn unit_near(a: &mut Alloc, center: u64) -> io::Result<u64> {
    let near = |s: u64| s.abs_diff(center) < (1 << 31) - 2 * REGION;
    let n = NREGIONS.load(Ordering::Acquire);
    for (i, r) in REGIONS[..n].iter().enumerate() {
        let start = r.start.load(Ordering::Relaxed);
        if a.next[i] + UNIT <= REGION && near(start) && near(start + REGION) {
            let unit = start + a.next[i];
            a.next[i] += UNIT;
            return Ok(unit);
        }
    }
    if n == MAX_REGIONS {
        return Err(io::Error::other("out of trampoline regions"));
    }
    let start = slots::map_region_near(center, REGION)?;
    REGIONS[n].start.store(start, Ordering::Relaxed);
    a.next.push(UNIT);
    NREGIONS.store(n + 1, Ordering::Release);
    Ok(start)
}

/// Why a trampoline could not be had.
#[derive(Debug)]
pub(crate) enum TrampFailure {
    /// No memory within reach.
    Memory(io::Error),
    /// It could not be built.
    Build(TrampolineError),
}

impl std::fmt::Display for TrampFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TrampFailure::Memory(e) => write!(f, "no trampoline memory within reach: {e}"),
            TrampFailure::Build(e) => write!(f, "{e}"),
        }
    }
}

/// How the common stub saves the vector state (the fast register moves; see
/// `multiprobe_x86::StateSave`).
pub(crate) const STATE_SAVE: StateSave = StateSave::Registers;

fn common(a: &mut Alloc, near: u64) -> Result<u64, TrampFailure> {
    if let Some(c) = a.common {
        return Ok(c);
    }
    let unit = unit_near(a, near).map_err(TrampFailure::Memory)?;
    let stub = build_common(STATE_SAVE, &CpuState::get(), unit).map_err(TrampFailure::Build)?;
    patch::write(unit, &stub.bytes).map_err(TrampFailure::Memory)?;
    a.common = Some(unit);
    Ok(unit)
}

/// The process's return trampoline (return probes), calling `entry` (the return entry
/// point, `crate::returning`): built and placed once, in a unit of its own (no header:
/// [`lookup`] never finds it), near `near`, then the same for the life of the process.
pub(crate) fn return_trampoline(
    near: u64,
    entry: u64,
) -> Result<&'static ReturnTrampoline, TrampFailure> {
    static RET: OnceLock<ReturnTrampoline> = OnceLock::new();
    let mut a = ALLOC.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(t) = RET.get() {
        return Ok(t);
    }
    let common = common(&mut a, near)?;
    let unit = unit_near(&mut a, near).map_err(TrampFailure::Memory)?;
    let t =
        build_return_trampoline(entry, 0, common, unit + CODE_OFF).map_err(TrampFailure::Build)?;
    patch::write(t.at, &t.bytes).map_err(TrampFailure::Memory)?;
    Ok(RET.get_or_init(|| t))
}

/// The trampoline of `region` (the site `block`), calling the entry points `pre` and
/// `post` (the trampoline path's, `crate::entry`): the one built before for the same
/// original bytes, or a new one, written and published.
pub(crate) fn trampoline_for(
    region: &Region,
    block: &'static BlockInfo,
    pre: u64,
    post: u64,
) -> Result<&'static TrampInfo, TrampFailure> {
    let addr = region.addr();
    let mut a = ALLOC.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((orig, info)) = a.built.get(&addr) {
        if orig.as_slice() == region.bytes() {
            return Ok(info);
        }
    }
    let common = common(&mut a, addr)?;
    let unit = unit_near(&mut a, addr).map_err(TrampFailure::Memory)?;
    let info: &'static TrampInfo = Box::leak(Box::new(TrampInfo {
        addr,
        block,
        map: OnceLock::new(),
    }));
    let spec = TrampolineSpec {
        region,
        ctx: info as *const TrampInfo as u64,
        pre,
        post,
        common,
    };
    // A unit that fails to build stays unused (never handed out again): harmless.
    let built = build_trampoline(&spec, unit + CODE_OFF).map_err(TrampFailure::Build)?;
    patch::write(unit + CODE_OFF, &built.bytes).map_err(TrampFailure::Memory)?;
    let _ = info.map.set(built.map);
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(&(info as *const TrampInfo as u64).to_le_bytes());
    header[8..].copy_from_slice(&MAGIC.to_le_bytes());
    patch::write(unit, &header).map_err(TrampFailure::Memory)?;
    a.built.insert(addr, (region.bytes().to_vec(), info));
    Ok(info)
}
