//! The map of a built collecting trampoline: where a thread with `rip` inside it
//! stands, the relocated copies of the region, and the fault table of the actions'
//! accesses to the program's memory. `Copy` and heap-free, like
//! [`crate::Trampoline`]'s.

use multiprobe_core::Regs;

use crate::relocate::CopyMap;
use crate::trampoline::Location;

/// Upper bound on a collecting trampoline's length: allocate units of this size.
pub const COLLECT_LEN: usize = 4096;
/// Most collectors one site's trampoline runs.
pub const MAX_COLLECTORS: usize = 16;

/// An entry of the fault table: a `mem:` collector's copy from the program's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ActionFault {
    /// The collector's counter slot.
    pub slot: u32,
    /// Where to resume the thread (set `rip`, suppress the signal): the resume code
    /// commits the cell as faulted and counts `faulted` itself.
    pub resume: u64,
}

/// A built collecting trampoline's map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CollectMap {
    pub(crate) addr: u64,
    pub(crate) len: u16,
    pub(crate) copies: CopyMap,
    pub(crate) nfaults: u8,
    /// The return code's address (`ret` collectors), 0 without.
    pub(crate) ret_code: u64,
    /// (offset of the faulting instruction, its entry).
    pub(crate) faults: [(u16, ActionFault); MAX_COLLECTORS],
    /// Offsets of the shadow-stack code's `int3`s that ask the tracer (at an entry, at
    /// a return) and of the return code's `ud2`; zeros without `ret` collectors.
    pub(crate) asks: [u16; 3],
}

/// What the thread at an `int3` of a trampoline's shadow-stack code asks the tracer
/// (`shadow`'s module docs). Either way the thread is resumed after the `int3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ask {
    /// An entry found a frame below its slot that is not a suspect: `rdi` holds the
    /// thread's block, `rsi` the entry's slot, `rdx` the block's depth. Sweep the block
    /// for an entry at that slot and set `rdx` to the new depth.
    Entry,
    /// A return whose frame is not the innermost, with the program's registers (`rsp`
    /// is past the popped slot). Put the innermost frame recorded at `rsp - 8` on top,
    /// or, if there is none, send the thread to `broken` (a `ud2`: it cannot go on).
    Return {
        /// The address of the return code's `ud2`.
        broken: u64,
    },
}

/// A collecting trampoline: its bytes to place at [`CollectMap::addr`], and its map.
#[derive(Clone, Debug)]
pub struct BuiltCollect {
    /// The code.
    pub bytes: Vec<u8>,
    /// The map (keep it while the code may run).
    pub map: CollectMap,
}

impl CollectMap {
    /// Where it lives; its first byte is the entry the region's jump targets.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Its length.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `ip` lies inside it.
    pub fn contains(&self, ip: u64) -> bool {
        ip.wrapping_sub(self.addr) < u64::from(self.len)
    }

    /// Where `ip` stands, or `None` outside: at a relocated instruction of the region
    /// (or the jump back), or [`Location::Inside`] the action code, which a thread must
    /// be let run out of (it may hold a claimed cell): it leaves the action code at
    /// [`CollectMap::copy_of`]`(0)`, the first relocated instruction, with every register
    /// and flag restored (a fault resume goes back into the action code first).
    pub fn locate(&self, ip: u64) -> Option<Location> {
        self.contains(ip)
            .then(|| self.copies.locate(ip.wrapping_sub(self.addr)))
    }

    /// The fault table: `Some` when `ip` is an action's access to the program's memory.
    pub fn fault(&self, ip: u64) -> Option<ActionFault> {
        let off = ip.wrapping_sub(self.addr);
        self.faults[..usize::from(self.nfaults)]
            .iter()
            .find(|(o, _)| u64::from(*o) == off)
            .map(|&(_, f)| f)
    }

    /// Every fault table entry, with the faulting instruction's address.
    pub fn faults(&self) -> impl Iterator<Item = (u64, ActionFault)> + '_ {
        self.faults[..usize::from(self.nfaults)]
            .iter()
            .map(|&(o, f)| (self.addr + u64::from(o), f))
    }

    /// The address of its return code, which return slots of calls in flight hold,
    /// if it has `ret` collectors.
    pub fn ret_code(&self) -> Option<u64> {
        (self.ret_code != 0).then_some(self.ret_code)
    }

    /// `Some` when `ip` is one of the `int3`s by which the shadow-stack code asks the
    /// tracer.
    pub fn ask(&self, ip: u64) -> Option<Ask> {
        let [entry, ret, broken] = self.asks;
        if self.ret_code == 0 || !self.contains(ip) {
            return None;
        }
        let off = ip - self.addr;
        if off == u64::from(entry) {
            Some(Ask::Entry)
        } else if off == u64::from(ret) {
            Some(Ask::Return {
                broken: self.addr + u64::from(broken),
            })
        } else {
            None
        }
    }

    /// The relocated copy of region instruction `i`.
    pub fn copy_of(&self, i: usize) -> u64 {
        self.addr + u64::from(self.copies.copy_off(i))
    }

    /// A thread stopped at `regs.rip` inside a relocated copy (a fault, or being moved
    /// out): rewrite `regs` to the equivalent original state and return `Some(first)`
    /// (whether it is the probed instruction); `None`, changing nothing, elsewhere.
    pub fn fixup(&self, regs: &mut Regs) -> Option<bool> {
        if !self.contains(regs.rip) {
            return None;
        }
        self.copies.fixup(self.addr, regs)
    }
}
