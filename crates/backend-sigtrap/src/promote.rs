//! Promotion of an armed `int3` site to a `jmp rel32` into its trampoline, and demotion
//! back, with the int3-first protocol of the kernel's `text_poke_bp`. Thread context,
//! under the backend's arm lock.
//!
//! Promote (the `int3` is on the first byte already, every core serialized since):
//! 1. the trampoline, built (or found again) within reach;
//! 2. the trampoline published to the trap path (hits continue in its copies from now
//!    on, not in the slots, which jump back into the interior), then the every-thread
//!    check ([`crate::threads`]): nobody in the interior or in the site's slots, nobody
//!    about to return there, no trap of the site half-handled;
//! 3. bytes 1.. of the region: the jump's displacement, `int3` over the rest; every
//!    core serialized (`membarrier` SYNC_CORE, in [`crate::patch::write`]);
//! 4. byte 0: the jump's opcode; serialized again.
//!
//! Until step 4 every thread that arrives takes the `int3` and the trap path, whatever
//! bytes 1.. hold (nobody executes them: step 2). A failure at step 3 or 4 puts the
//! original bytes 1.. back: a working `int3` site and the original code remain.
//!
//! Demote, in reverse: `int3` on byte 0 (serialized: from now on arrivals trap), then
//! the original bytes 1.. (serialized). No thread can be executing bytes 1.. (they were
//! the jump's displacement), and threads inside the trampoline finish there: it is
//! never reused.

use std::sync::atomic::Ordering;

use multiprobe_x86::{Region, INT3};

use crate::threads::{self, CheckFailure};
use crate::tramps::{self, TrampFailure, TrampInfo};
use crate::{entry, patch};

/// Why a promotion did not happen (the site stays an `int3` site).
#[derive(Debug)]
pub(crate) enum PromoteFailure {
    /// No trampoline.
    Trampoline(TrampFailure),
    /// The thread check refused.
    Threads(CheckFailure),
    /// Writing the jump failed (the original bytes were put back).
    Write(std::io::Error),
}

impl std::fmt::Display for PromoteFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PromoteFailure::Trampoline(e) => write!(f, "{e}"),
            PromoteFailure::Threads(e) => write!(f, "{e}"),
            PromoteFailure::Write(e) => write!(f, "writing the jump failed: {e}"),
        }
    }
}

/// Replace `region` (whose first byte holds our `int3`) by the jump to `block`'s
/// trampoline (module docs).
pub(crate) fn promote(
    region: &Region,
    block: &'static crate::site::BlockInfo,
    promoted: &[u64],
) -> Result<&'static TrampInfo, PromoteFailure> {
    let (pre, post) = (
        entry::pre as *const () as u64,
        entry::post as *const () as u64,
    );
    let info =
        tramps::trampoline_for(region, block, pre, post).map_err(PromoteFailure::Trampoline)?;
    let map = info.map();
    let Some((bytes, n)) = region.jump_bytes(map.addr()) else {
        return Err(PromoteFailure::Trampoline(TrampFailure::Build(
            multiprobe_x86::TrampolineError::OutOfReach {
                at: map.addr(),
                target: region.addr(),
            },
        )));
    };
    // From now on the trap path continues hits in the trampoline, never in a slot (the
    // slots jump back into the interior): set before the check, which then waits for
    // traps already past that decision.
    let _ = block.tramp.set(map);
    block.jump.store(true, Ordering::Release);
    crate::site::PUBLISHED.fetch_add(1, Ordering::AcqRel);
    if let Err(e) = threads::check_all(region, map, block, promoted) {
        block.jump.store(false, Ordering::Release);
        return Err(PromoteFailure::Threads(e));
    }
    let addr = region.addr();
    let restore = || {
        // Best effort: the same write that just failed may fail again; the int3 on
        // byte 0 keeps the site working either way.
        let _ = patch::write(addr + 1, &region.bytes()[1..]);
    };
    if let Err(e) = patch::write(addr + 1, &bytes[1..n]) {
        restore();
        block.jump.store(false, Ordering::Release);
        return Err(PromoteFailure::Write(e));
    }
    if let Err(e) = patch::write(addr, &bytes[..1]) {
        restore();
        block.jump.store(false, Ordering::Release);
        return Err(PromoteFailure::Write(e));
    }
    Ok(info)
}

/// Put the `int3` site back: `int3` on byte 0, then the original bytes 1.. (module
/// docs). On error the site may be left promoted (if byte 0 failed) or as an `int3`
/// site with bytes 1.. of the jump (harmless: nobody executes them).
pub(crate) fn demote(region: &Region, block: &crate::site::BlockInfo) -> std::io::Result<()> {
    let addr = region.addr();
    patch::write(addr, &[INT3])?;
    patch::write(addr + 1, &region.bytes()[1..])?;
    // The interior is the original code again: hits may use the slots.
    block.jump.store(false, Ordering::Release);
    Ok(())
}
