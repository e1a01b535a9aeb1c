//! Out-of-line (XOL) slot memory: executable pages within ±2 GiB of the probed code,
//! so relocated RIP-relative operands and the `jmp rel32` back still reach.
//!
//! Memory is organized as *regions* (64 KiB anonymous `r-x` mappings, found in a gap of
//! the address space near the code and mapped with `MAP_FIXED_NOREPLACE`) cut into
//! 256-byte *blocks*, one per probed address. A block starts with a header (a pointer to
//! the site's leaked [`BlockInfo`] and a magic word) that the signal path reads to learn
//! which probe a trapping or faulting slot belongs to, followed by the two slot variants
//! (jump-back and trailing-`int3`); unused bytes are `int3`.
//!
//! Invariants:
//! * Regions and blocks are never unmapped or reused for another address, so a slot's
//!   bytes never change while a thread may still be inside it. A block is written once,
//!   before it is published (before the probe is armed), and a later `prepare` of the same
//!   address with the same original instruction reuses the same block unchanged.
//! * The region table is append-only: an entry's bounds are stored before the count
//!   that makes it visible (`Release`), so the signal path (`Acquire`) never reads a
//!   block that is not fully mapped.

use std::collections::BTreeMap;
use std::io;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use multiprobe_x86::MAX_SLOT_LEN;

use crate::site::BlockInfo;
use multiprobe_symbols::Maps;

use crate::patch;

/// Size of one block: header, jump-back slot, trap-after slot, each 64-byte aligned.
pub(crate) const BLOCK: u64 = 256;
const BOOST_OFF: u64 = 64;
const POST_OFF: u64 = BOOST_OFF + MAX_SLOT_LEN as u64;
const _: () = assert!(POST_OFF + MAX_SLOT_LEN as u64 <= BLOCK);
const REGION: u64 = 64 * 1024;
const MAX_REGIONS: usize = 256;
/// Keep blocks this far inside the ±2 GiB window around their center.
const REACH: u64 = multiprobe_x86::slot_reach(REGION);
/// Marks a written header (the second word of a block).
const MAGIC: u64 = 0x6d70_726f_6265_5854; // "TXebormp"

struct Region {
    start: AtomicU64,
}

static REGIONS: [Region; MAX_REGIONS] = [const {
    Region {
        start: AtomicU64::new(0),
    }
}; MAX_REGIONS];
static NREGIONS: AtomicUsize = AtomicUsize::new(0);

struct Built {
    block: u64,
    orig: Vec<u8>,
    info: &'static BlockInfo,
}

struct Alloc {
    /// Per region: next free offset.
    next: Vec<u64>,
    /// Blocks already built, by probed address.
    built: BTreeMap<u64, Built>,
}

static ALLOC: Mutex<Alloc> = Mutex::new(Alloc {
    next: Vec::new(),
    built: BTreeMap::new(),
});

fn region_of(a: u64) -> Option<u64> {
    let n = NREGIONS.load(Ordering::Acquire);
    REGIONS[..n].iter().find_map(|r| {
        let s = r.start.load(Ordering::Relaxed);
        (s <= a && a < s + REGION).then_some(s)
    })
}

/// The description of the block containing `rip`, if `rip` is in a published block.
/// Async-signal-safe.
pub(crate) fn lookup(rip: u64) -> Option<&'static BlockInfo> {
    region_of(rip)?;
    let block = rip & !(BLOCK - 1);
    // SAFETY: the region is mapped readable for the life of the process (module
    // invariants) and the header lies inside it.
    let [info, magic] = unsafe { *(block as *const [u64; 2]) };
    if magic != MAGIC {
        return None;
    }
    // SAFETY: a header with the magic was written by `publish` (header last), and its
    // pointer is a leaked, never-freed `BlockInfo`.
    Some(unsafe { &*(info as *const BlockInfo) })
}

/// Whether `a` is inside slot memory. Async-signal-safe.
pub(crate) fn contains(a: u64) -> bool {
    region_of(a).is_some()
}

fn near(a: u64, b: u64) -> bool {
    a.abs_diff(b) < REACH
}

/// Where the jump-back slot of `block` goes.
pub(crate) fn boost_at(block: u64) -> u64 {
    block + BOOST_OFF
}

/// Where the trap-after slot of `block` goes.
pub(crate) fn post_at(block: u64) -> u64 {
    block + POST_OFF
}

/// The block for probed address `addr` whose original instruction bytes are `orig`:
/// the one built before, with its description, if there is one; else a fresh block
/// within reach of `center` that the caller fills with [`publish`].
pub(crate) fn block_for(
    addr: u64,
    center: u64,
    orig: &[u8],
) -> io::Result<(u64, Option<&'static BlockInfo>)> {
    let mut a = ALLOC.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(b) = a.built.get(&addr) {
        if b.orig == orig {
            return Ok((b.block, Some(b.info)));
        }
    }
    let n = NREGIONS.load(Ordering::Acquire);
    for (i, r) in REGIONS[..n].iter().enumerate() {
        let start = r.start.load(Ordering::Relaxed);
        if a.next[i] + BLOCK <= REGION && near(start, center) && near(start + REGION, center) {
            let block = start + a.next[i];
            a.next[i] += BLOCK;
            return Ok((block, None));
        }
    }
    if n == MAX_REGIONS {
        return Err(io::Error::other("out of slot regions"));
    }
    let start = map_region_near(center, REGION)?;
    REGIONS[n].start.store(start, Ordering::Relaxed);
    a.next.push(BLOCK);
    NREGIONS.store(n + 1, Ordering::Release);
    Ok((start, None))
}

/// Write a block's slot code (`code`, from the boost slot's offset on) and then its
/// header, and remember it for reuse.
pub(crate) fn publish(
    block: u64,
    info: &'static BlockInfo,
    code: &[u8],
    orig: &[u8],
) -> io::Result<()> {
    assert!(BOOST_OFF + code.len() as u64 <= BLOCK, "slot code too long");
    patch::write(boost_at(block), code)?;
    let mut header = [0u8; 16];
    header[..8].copy_from_slice(&(info as *const BlockInfo as u64).to_le_bytes());
    header[8..].copy_from_slice(&MAGIC.to_le_bytes());
    patch::write(block, &header)?;
    let mut a = ALLOC.lock().unwrap_or_else(|p| p.into_inner());
    a.built.insert(
        info.addr,
        Built {
            block,
            orig: orig.to_vec(),
            info,
        },
    );
    Ok(())
}

/// Map a `len`-byte `r-x` region in the free gap closest to `center` that keeps all of
/// it within reach (slots and trampolines alike).
pub(crate) fn map_region_near(center: u64, len: u64) -> io::Result<u64> {
    // Another thread may map something into the gap between reading the maps and our
    // mmap: MAP_FIXED_NOREPLACE then fails, and we look again.
    for _ in 0..8 {
        let maps = Maps::read(0)?;
        let Some(s) = maps.free_near(center, center + 1, len, REACH) else {
            break;
        };
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
        let p = unsafe {
            libc::mmap(
                s as *mut libc::c_void,
                len as usize,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            continue;
        }
        if p as u64 != s {
            // An old kernel without MAP_FIXED_NOREPLACE treats the address as a hint.
            // SAFETY: the mapping just made, unused.
            unsafe { libc::munmap(p, len as usize) };
            break;
        }
        return Ok(s);
    }
    Err(io::Error::other(format!(
        "no free address space for slots within 2 GiB of {center:#x}"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_near_their_center_and_blocks_distinct() {
        let code = regions_are_near_their_center_and_blocks_distinct as *const () as u64;
        let (b1, none) = block_for(code, code, &[0x0f, 0x0b]).unwrap();
        assert!(none.is_none());
        assert!(near(b1, code));
        assert_eq!(b1 % BLOCK, 0);
        assert!(contains(b1) && contains(post_at(b1)));
        assert!(lookup(b1 + 20).is_none(), "unpublished block has no header");
        let (b2, _) = block_for(code, code, &[0x0f, 0x0b]).unwrap();
        assert_ne!(b1, b2, "an unpublished block is not handed out twice");
        // A far center gets its own region.
        let x = 0u8;
        let stack = &x as *const u8 as u64;
        let (b3, _) = block_for(stack, stack, &[0x90]).unwrap();
        assert!(near(b3, stack));
        assert!(!contains(code));
    }
}
