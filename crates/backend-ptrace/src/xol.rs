//! The out-of-line (XOL) area: pages the tracer maps into the tracee (by an injected
//! `mmap`, see [`crate::inject`]) to hold the sites' slots.
//!
//! A page is split into units of [`UNIT`] bytes, each holding one site's two slots
//! (jump-back at the unit's start, trap-after [`multiprobe_x86::MAX_SLOT_LEN`] bytes
//! later). Pages are mapped read+execute only; the tracer writes them through
//! `/proc/PID/mem`. Injected system calls never execute code of these pages (see
//! [`crate::inject`]): a process may not have them (a fork child copied before the page
//! was mapped, a program that unmapped it).
//!
//! Invariant: a unit is free only when its site was dropped, which happens only when
//! no thread can be inside its slots (see `SiteInner`'s drop), so a unit's bytes are
//! never rewritten under a running thread.

use multiprobe_x86::MAX_SLOT_LEN;

pub(crate) const PAGE: u64 = 4096;
/// How far an XOL page may be from the code it serves, so rel32 jumps reach.
pub(crate) const REACH: u64 = multiprobe_x86::slot_reach(PAGE);
/// Bytes of one site's allocation: both slot variants.
pub(crate) const UNIT: u64 = 2 * MAX_SLOT_LEN as u64;
const UNITS: u64 = PAGE / UNIT;
const _: () = assert!(UNITS >= 1 && UNITS <= 64);

#[derive(Debug)]
struct Page {
    base: u64,
    /// Bit `i`: unit `i` is taken.
    used: u64,
    /// What the tracer wrote into the page: to write it again if the program unmaps
    /// the page and it is mapped anew at the same address.
    bytes: Vec<u8>,
    /// The program unmapped it and it could not be mapped again: its slots are not
    /// used any more (its units stay taken: sites keep their addresses).
    dead: bool,
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

    /// Base addresses of the pages (dead ones too: a fork child may have a copy).
    pub(crate) fn pages(&self) -> Vec<u64> {
        self.pages.iter().map(|p| p.base).collect()
    }

    /// Take a free unit whose address satisfies `ok` (reach constraints).
    pub(crate) fn alloc(&mut self, ok: impl Fn(u64) -> bool) -> Option<u64> {
        for p in self.pages.iter_mut().filter(|p| !p.dead) {
            for i in 0..UNITS {
                let at = p.base + i * UNIT;
                if p.used & (1 << i) == 0 && ok(at) {
                    p.used |= 1 << i;
                    return Some(at);
                }
            }
        }
        None
    }

    /// A page mapped at `base` for other code than slots (collecting trampolines): no
    /// unit of it is handed out.
    pub(crate) fn add_reserved_page(&mut self, base: u64) {
        self.add_page(base);
        if let Some(p) = self.pages.last_mut() {
            p.used = u64::MAX;
        }
    }

    /// A page mapped at `base`.
    pub(crate) fn add_page(&mut self, base: u64) {
        self.pages.push(Page {
            base,
            used: 0,
            bytes: vec![0; PAGE as usize],
            dead: false,
        });
    }

    fn page_of(&mut self, addr: u64) -> Option<&mut Page> {
        self.pages
            .iter_mut()
            .find(|p| (p.base..p.base + PAGE).contains(&addr))
    }

    /// Remember that `data` was written at `addr` (inside a page).
    pub(crate) fn record(&mut self, addr: u64, data: &[u8]) {
        if let Some(p) = self.page_of(addr) {
            let at = (addr - p.base) as usize;
            let end = (at + data.len()).min(PAGE as usize);
            p.bytes[at..end].copy_from_slice(&data[..end - at]);
        }
    }

    /// The page holding `addr` (base and everything written into it), if one does.
    pub(crate) fn page_holding(&self, addr: u64) -> Option<(u64, Vec<u8>)> {
        self.pages
            .iter()
            .find(|p| (p.base..p.base + PAGE).contains(&addr))
            .map(|p| (p.base, p.bytes.clone()))
    }

    /// Whether the page holding `addr` is still in use.
    pub(crate) fn is_live(&self, addr: u64) -> bool {
        self.pages
            .iter()
            .any(|p| (p.base..p.base + PAGE).contains(&addr) && !p.dead)
    }

    /// The page holding `addr` is gone for good.
    pub(crate) fn mark_dead(&mut self, addr: u64) {
        if let Some(p) = self.page_of(addr) {
            p.dead = true;
        }
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
        let all: Vec<u64> = std::iter::from_fn(|| x.alloc(|_| true)).collect();
        assert_eq!(all.len() as u64, UNITS);
        assert_eq!(all[0], 0x10000);
        assert!(all.iter().all(|a| x.contains(*a) && a % UNIT == 0));
        x.free(all[3]);
        assert_eq!(x.alloc(|a| a != all[3]), None);
        assert_eq!(x.alloc(|_| true), Some(all[3]));
        assert!(!x.contains(0x10000 + PAGE));
    }
}
