//! Asymmetric memory barriers: nearly free for readers, expensive for writers.
//!
//! The read side of [`crate::srcu`] needs a full barrier between announcing itself and
//! reading the table (a store→load ordering, the "store buffering" pattern), and so does
//! the writer between unlinking and checking for readers. A full fence costs tens of
//! cycles on every hit; the writer's happens a few times per removal. So, as liburcu's
//! "memb" flavour and folly's asymmetric fences do, readers use a compiler-only fence and
//! the writer uses `membarrier(MEMBARRIER_CMD_PRIVATE_EXPEDITED)`, which makes every
//! running thread of the process execute a full barrier (threads not running will
//! execute one when they are switched in). Where membarrier is unavailable both sides
//! use a real `SeqCst` fence, which is correct on its own.
//!
//! This is the real implementation; the loom model's is in the facade's `model`.

use std::sync::atomic::{compiler_fence, fence, AtomicU8, Ordering};

const UNKNOWN: u8 = 0;
const ASYMMETRIC: u8 = 1;
const SYMMETRIC: u8 = 2;

/// Decided once, before the first read domain exists; never goes back.
static MODE: AtomicU8 = AtomicU8::new(UNKNOWN);

/// The `membarrier(2)` commands used, and the system call; elsewhere than Linux every
/// call fails, so both sides use `SeqCst` fences.
#[cfg(target_os = "linux")]
mod cmd {
    pub(super) use libc::{
        MEMBARRIER_CMD_GLOBAL as GLOBAL, MEMBARRIER_CMD_PRIVATE_EXPEDITED as PRIVATE_EXPEDITED,
        MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED as REGISTER_PRIVATE_EXPEDITED,
    };

    pub(super) fn membarrier(cmd: libc::c_int) -> bool {
        // SAFETY: membarrier takes two integer arguments (and a cpu id for some
        // commands, unused here) and touches no memory of ours.
        unsafe { libc::syscall(libc::SYS_membarrier, cmd, 0, 0) == 0 }
    }
}

#[cfg(not(target_os = "linux"))]
mod cmd {
    pub(super) const GLOBAL: i32 = 0;
    pub(super) const PRIVATE_EXPEDITED: i32 = 0;
    pub(super) const REGISTER_PRIVATE_EXPEDITED: i32 = 0;

    pub(super) fn membarrier(_cmd: i32) -> bool {
        false
    }
}

use cmd::membarrier;

/// Register for expedited barriers. Called from thread context (a domain's
/// creation) before any reader of that domain can exist.
pub(crate) fn init() {
    if MODE.load(Ordering::Acquire) != UNKNOWN {
        return;
    }
    let mode = if membarrier(cmd::REGISTER_PRIVATE_EXPEDITED) {
        ASYMMETRIC
    } else {
        SYMMETRIC
    };
    let _ = MODE.compare_exchange(UNKNOWN, mode, Ordering::AcqRel, Ordering::Acquire);
}

/// Reader side.
#[inline(always)]
pub(crate) fn light() {
    if MODE.load(Ordering::Relaxed) == ASYMMETRIC {
        compiler_fence(Ordering::SeqCst);
    } else {
        fence(Ordering::SeqCst);
    }
}

/// Writer side.
pub(crate) fn heavy() {
    fence(Ordering::SeqCst);
    if MODE.load(Ordering::Relaxed) != ASYMMETRIC {
        return;
    }
    if membarrier(cmd::PRIVATE_EXPEDITED) {
        return;
    }
    // Registration is per address space; a forked child starts unregistered.
    if membarrier(cmd::REGISTER_PRIVATE_EXPEDITED) && membarrier(cmd::PRIVATE_EXPEDITED) {
        return;
    }
    // The global barrier needs no registration (it waits for an RCU grace period).
    if membarrier(cmd::GLOBAL) {
        return;
    }
    // Readers rely on this barrier for correctness; going on would be unsound.
    eprintln!("multiprobe: membarrier failed after it was registered; aborting");
    std::process::abort();
}
