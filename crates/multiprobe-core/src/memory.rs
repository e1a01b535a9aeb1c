//! Access to the probed program's memory, supplied by the backend.
//!
//! In-process backends read memory directly (guarded against faults where they can),
//! ptrace reads the tracee with `process_vm_readv`, the simulator reads its own array.
//! Errors are plain `Copy` values so that reporting one allocates nothing — handlers
//! may run inside a signal handler.

/// Why a memory access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemoryError {
    /// Nothing is mapped at (part of) the range.
    #[error("memory at {0:#x} is not mapped or not readable")]
    Unmapped(u64),
    /// The backend does not allow writes, or the range is not writable.
    #[error("memory at {0:#x} is not writable here")]
    NotWritable(u64),
    /// The process is gone.
    #[error("the target process is gone")]
    ProcessGone,
}

/// Read (and where the backend allows it, write) the target's memory.
pub trait Memory {
    /// Fill `buf` with the bytes at `addr`. All or nothing.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError>;

    /// Write `data` at `addr`. Backends that cannot write return
    /// [`MemoryError::NotWritable`] (the default).
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let _ = data;
        Err(MemoryError::NotWritable(addr))
    }
}

impl dyn Memory + '_ {
    /// Read a little-endian `u64`.
    #[inline]
    pub fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    /// Write a little-endian `u64`.
    #[inline]
    pub fn write_u64(&self, addr: u64, value: u64) -> Result<(), MemoryError> {
        self.write(addr, &value.to_le_bytes())
    }
}

/// A [`Memory`] with nothing in it: every access fails. For backends and tests that
/// have no target memory to offer.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoMemory;

impl Memory for NoMemory {
    fn read(&self, addr: u64, _buf: &mut [u8]) -> Result<(), MemoryError> {
        Err(MemoryError::Unmapped(addr))
    }
}
