//! The simulated address space: one array of atomic bytes with three regions.
//!
//! | region | range | program may | handlers may |
//! | --- | --- | --- | --- |
//! | code  | [`CODE`]  | execute only  | read |
//! | data  | [`DATA`]  | read, write   | read, write |
//! | stack | [`STACK`] | read, write   | read, write |
//!
//! Everything else (address 0 included) is unmapped. Code is execute-only for the
//! program so that a probed program cannot observe its breakpoints by reading its own
//! code — the one way a breakpoint is visible on real hardware that no backend can hide.
//! Only the backend writes code bytes (arm and disarm, one byte each).
//!
//! Bytes are atomics so CPUs on several OS threads can share memory without locks;
//! an 8-byte access is not atomic as a whole (programs that race on one word see torn
//! values, deterministically in the interleaved machine).

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering::Relaxed};

use multiprobe_core::{Fault, Memory, MemoryError};

use crate::isa::{Bus, SEGV_ACCERR, SEGV_MAPERR, SIGSEGV};

/// Executable code.
pub const CODE: Range<u64> = 0x1000..0x1800;
/// Shared data.
pub const DATA: Range<u64> = 0x2000..0x2800;
/// Stacks, [`STACK_SIZE`] bytes per thread, thread 0 lowest.
pub const STACK: Range<u64> = 0x3000..0x4000;
/// Bytes of stack per thread.
pub const STACK_SIZE: u64 = 0x200;
/// Size of the address space.
pub const SIZE: u64 = 0x4000;
/// The backend's return trampoline: the last 16 bytes of the code region, never part
/// of a program (they hold no instruction). A thread whose `ret` lands here is handed to
/// the core's return dispatch ([`crate::cpu`]).
pub const RET_TRAMPOLINE: u64 = CODE.end - 16;

/// The region an address is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Region {
    /// Code.
    Code,
    /// Data or stack (the program may read and write it).
    Data,
    /// Nothing.
    Unmapped,
}

/// The region of `addr`.
pub fn region(addr: u64) -> Region {
    if CODE.contains(&addr) {
        Region::Code
    } else if DATA.contains(&addr) || STACK.contains(&addr) {
        Region::Data
    } else {
        Region::Unmapped
    }
}

/// Whether all of `addr..addr + len` lies in one region `r`.
pub(crate) fn within(addr: u64, len: u64, r: Region) -> bool {
    len > 0
        && addr
            .checked_add(len - 1)
            .is_some_and(|last| region(last) == r)
        && region(addr) == r
}

/// The simulated memory.
#[derive(Debug)]
pub struct SimMemory {
    bytes: Box<[AtomicU8]>,
    /// A program load (not a `ret`) read the trampoline address: the program has seen
    /// a return probe on its stack, and may behave differently from an unprobed run.
    saw_trampoline: AtomicBool,
}

impl Default for SimMemory {
    fn default() -> Self {
        Self::new()
    }
}

impl SimMemory {
    /// All zero.
    pub fn new() -> Self {
        SimMemory {
            bytes: (0..SIZE).map(|_| AtomicU8::new(0)).collect(),
            saw_trampoline: AtomicBool::new(false),
        }
    }

    /// Whether a program load (other than a `ret`'s) read [`RET_TRAMPOLINE`]: a return
    /// probe's swapped return address is visible to a program that reads its own stack,
    /// as on real hardware, and such a program may then diverge from an unprobed run.
    pub fn saw_trampoline(&self) -> bool {
        self.saw_trampoline.load(Relaxed)
    }

    /// The program's view for a `ret`: loads that read the trampoline address are the
    /// return mechanism, not the program looking.
    pub fn for_ret(&self) -> RetBus<'_> {
        RetBus(self)
    }

    /// The byte at `addr` (any region; 0 outside the address space).
    pub fn byte(&self, addr: u64) -> u8 {
        self.bytes.get(addr as usize).map_or(0, |b| b.load(Relaxed))
    }

    /// Set the byte at `addr`, whatever the region (loading a program, the backend
    /// patching code). Panics outside the address space.
    pub fn set_byte(&self, addr: u64, value: u8) {
        self.bytes[addr as usize].store(value, Relaxed);
    }

    /// Copy of `range`.
    pub fn snapshot(&self, range: Range<u64>) -> Vec<u8> {
        range.map(|a| self.byte(a)).collect()
    }

    /// The code bytes from `addr` to the end of the code region (for decoding).
    pub fn code_from(&self, addr: u64) -> Vec<u8> {
        let end = CODE.end.min(addr.saturating_add(8));
        (addr..end).map(|a| self.byte(a)).collect()
    }

    fn read_u64(&self, addr: u64) -> u64 {
        let mut b = [0u8; 8];
        for (i, v) in b.iter_mut().enumerate() {
            *v = self.byte(addr + i as u64);
        }
        u64::from_le_bytes(b)
    }

    fn write_u64(&self, addr: u64, value: u64) {
        for (i, v) in value.to_le_bytes().into_iter().enumerate() {
            self.set_byte(addr + i as u64, v);
        }
    }

    fn data_fault(addr: u64) -> Fault {
        let code = if region(addr) == Region::Code || region(addr.wrapping_add(7)) == Region::Code {
            SEGV_ACCERR
        } else {
            SEGV_MAPERR
        };
        Fault {
            signal: SIGSEGV,
            code,
            addr,
        }
    }
}

/// The program's view: data and stack only.
impl Bus for SimMemory {
    fn load(&self, addr: u64) -> Result<u64, Fault> {
        let v = self.for_ret().load(addr)?;
        // Any byte of a swapped return address counts, not only an aligned read of the
        // whole of it: a load at `rsp + 14` reads parts of two stack slots.
        let overlaps = (addr.saturating_sub(7)..=addr.saturating_add(7))
            .any(|a| self.read_u64(a) == RET_TRAMPOLINE);
        if overlaps {
            self.saw_trampoline.store(true, Relaxed);
        }
        Ok(v)
    }

    fn store(&self, addr: u64, value: u64) -> Result<(), Fault> {
        if !within(addr, 8, Region::Data) {
            return Err(Self::data_fault(addr));
        }
        self.write_u64(addr, value);
        Ok(())
    }
}

/// [`SimMemory::for_ret`].
#[derive(Clone, Copy, Debug)]
pub struct RetBus<'a>(&'a SimMemory);

impl Bus for RetBus<'_> {
    fn load(&self, addr: u64) -> Result<u64, Fault> {
        if !within(addr, 8, Region::Data) {
            return Err(SimMemory::data_fault(addr));
        }
        Ok(self.0.read_u64(addr))
    }

    fn store(&self, addr: u64, value: u64) -> Result<(), Fault> {
        self.0.store(addr, value)
    }
}

/// The handlers' view (a debugger's): everything mapped is readable, code included
/// (breakpoints show); data and stack are writable.
impl Memory for SimMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let len = buf.len() as u64;
        if len > 0 && !(within(addr, len, Region::Code) || within(addr, len, Region::Data)) {
            return Err(MemoryError::Unmapped(addr));
        }
        for (i, v) in buf.iter_mut().enumerate() {
            *v = self.byte(addr + i as u64);
        }
        Ok(())
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let len = data.len() as u64;
        if len > 0 && !within(addr, len, Region::Data) {
            return Err(MemoryError::NotWritable(addr));
        }
        for (i, v) in data.iter().enumerate() {
            self.set_byte(addr + i as u64, *v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_and_handler_views_enforce_regions() {
        let m = SimMemory::new();
        assert_eq!(m.load(CODE.start).unwrap_err().code, SEGV_ACCERR);
        assert_eq!(m.load(0).unwrap_err().code, SEGV_MAPERR);
        assert_eq!(m.load(DATA.end - 4).unwrap_err().signal, SIGSEGV);
        m.store(DATA.start, 0x1122).unwrap();
        assert_eq!(m.load(DATA.start).unwrap(), 0x1122);
        m.store(STACK.end - 8, 5).unwrap();
        let mem: &dyn Memory = &m;
        assert_eq!(mem.read_u64(DATA.start).unwrap(), 0x1122);
        let mut b = [0u8; 2];
        mem.read(CODE.start, &mut b).unwrap();
        assert!(mem.write(CODE.start, &[1]).is_err());
        assert!(mem.read(SIZE - 1, &mut b).is_err());
    }
}
