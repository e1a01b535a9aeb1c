//! The out-of-line (XOL) area: pages the tracer maps into the tracee (by an injected
//! `mmap`, see [`crate::inject`]) to hold the sites' slots.
//!
//! A page is split into units of [`UNIT`] bytes, each holding one site's two slots
//! (jump-back at the unit's start, trap-after [`multiprobe_x86::MAX_SLOT_LEN`] bytes
//! later). Unit 0 of every page holds a `syscall; int3` gadget, which later injected
//! system calls execute. Pages are mapped read+execute only; the tracer writes them
//! through `/proc/PID/mem`.
//!
//! Invariant: a unit is free only when its site was dropped, which happens only when
//! no thread can be inside its slots (see `SiteInner`'s drop), so a unit's bytes are
//! never rewritten under a running thread.

use multiprobe_x86::MAX_SLOT_LEN;

pub(crate) const PAGE: u64 = 4096;
/// Bytes of one site's allocation: both slot variants.
pub(crate) const UNIT: u64 = 2 * MAX_SLOT_LEN as u64;
const UNITS: u64 = PAGE / UNIT;
const _: () = assert!(UNITS >= 2 && UNITS <= 64);

/// `syscall; int3`, at the start of every page.
pub(crate) const GADGET: [u8; 3] = [0x0f, 0x05, multiprobe_x86::INT3];

#[derive(Debug)]
struct Page {
    base: u64,
    /// Bit `i`: unit `i` is taken. Unit 0 is the gadget.
    used: u64,
}

/// The XOL pages of the current image.
#[derive(Debug, Default)]
pub(crate) struct Xol {
    pages: Vec<Page>,
}

impl Xol {
    /// Whether `addr` lies in one of the pages.
    pub(crate) fn contains(&self, addr: u64) -> bool {
        self.pages
            .iter()
            .any(|p| (p.base..p.base + PAGE).contains(&addr))
    }

    /// Base addresses of the pages.
    pub(crate) fn pages(&self) -> Vec<u64> {
        self.pages.iter().map(|p| p.base).collect()
    }

    /// Address of a `syscall; int3` gadget, once a page exists.
    pub(crate) fn gadget(&self) -> Option<u64> {
        self.pages.first().map(|p| p.base)
    }

    /// Take a free unit whose address satisfies `ok` (reach constraints).
    pub(crate) fn alloc(&mut self, ok: impl Fn(u64) -> bool) -> Option<u64> {
        for p in &mut self.pages {
            for i in 1..UNITS {
                let at = p.base + i * UNIT;
                if p.used & (1 << i) == 0 && ok(at) {
                    p.used |= 1 << i;
                    return Some(at);
                }
            }
        }
        None
    }

    /// A page mapped at `base` (its gadget already written).
    pub(crate) fn add_page(&mut self, base: u64) {
        self.pages.push(Page { base, used: 1 });
    }

    /// Give back the unit at `at`.
    pub(crate) fn free(&mut self, at: u64) {
        if let Some(p) = self
            .pages
            .iter_mut()
            .find(|p| (p.base..p.base + PAGE).contains(&at))
        {
            p.used &= !(1 << ((at - p.base) / UNIT));
        }
    }

    /// Forget every page (the address space they were in is gone or was cleaned).
    pub(crate) fn clear(&mut self) {
        self.pages.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn units_are_handed_out_once_and_reused_after_free() {
        let mut x = Xol::default();
        assert_eq!(x.alloc(|_| true), None);
        x.add_page(0x10000);
        assert_eq!(x.gadget(), Some(0x10000));
        let all: Vec<u64> = std::iter::from_fn(|| x.alloc(|_| true)).collect();
        assert_eq!(all.len() as u64, UNITS - 1);
        assert_eq!(all[0], 0x10000 + UNIT);
        assert!(all.iter().all(|a| x.contains(*a) && a % UNIT == 0));
        x.free(all[3]);
        assert_eq!(x.alloc(|a| a != all[3]), None);
        assert_eq!(x.alloc(|_| true), Some(all[3]));
        assert!(!x.contains(0x10000 + PAGE));
    }
}
