//! The tracee's memory, two ways.
//!
//! * [`TraceeMemory`] is what handlers and the emulator get (the core's [`Memory`]):
//!   `process_vm_readv`/`writev`, which honour the tracee's page protections, so a
//!   handler or an emulated `push` cannot write where the program itself could not.
//! * [`CodeMemory`] patches code: `/proc/PID/mem`, whose writes go through read-only
//!   text the way a debugger's `PTRACE_POKETEXT` does (the kernel breaks copy-on-write,
//!   so other processes mapping the same file are untouched). It may be used from any
//!   thread of the tracer, which is what lets the registry arm and disarm probes from
//!   any thread. An open file keeps pointing at the address space it was opened for:
//!   after an exec it must be reopened.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;

use multiprobe_core::{Error, Memory, MemoryError, Result};

use crate::error;
use crate::sys::{self, Tid};

/// Handler-facing memory of process `pid`.
#[derive(Clone, Copy, Debug)]
pub struct TraceeMemory {
    pid: Tid,
}

impl TraceeMemory {
    pub(crate) fn new(pid: Tid) -> Self {
        TraceeMemory { pid }
    }
}

impl Memory for TraceeMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        match sys::vm_read(self.pid, addr, buf) {
            Ok(n) if n == buf.len() => Ok(()),
            Ok(n) => Err(MemoryError::Unmapped(addr + n as u64)),
            Err(e) => Err(error::mem(e, addr, false)),
        }
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        match sys::vm_write(self.pid, addr, data) {
            Ok(n) if n == data.len() => Ok(()),
            Ok(n) => Err(MemoryError::NotWritable(addr + n as u64)),
            Err(e) => Err(error::mem(e, addr, true)),
        }
    }
}

/// `/proc/PID/mem` of one address space, for reading and patching code.
#[derive(Debug)]
pub(crate) struct CodeMemory {
    file: File,
}

impl CodeMemory {
    pub(crate) fn open(pid: Tid) -> Result<Self> {
        let path = format!("/proc/{}/mem", pid.as_raw_pid());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| error::proc_io(e, format_args!("open {path}")))?;
        Ok(CodeMemory { file })
    }

    /// Read exactly `buf.len()` bytes at `addr`.
    pub(crate) fn read(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, addr)
            .map_err(|e| code_err(e, addr, "read"))
    }

    /// Write all of `data` at `addr`, through page protections.
    pub(crate) fn write(&self, addr: u64, data: &[u8]) -> Result<()> {
        self.file
            .write_all_at(data, addr)
            .map_err(|e| code_err(e, addr, "write"))
    }
}

fn code_err(e: std::io::Error, addr: u64, op: &str) -> Error {
    match e.kind() {
        // A read or write of 0 bytes: the address space is gone (the process exited
        // or exec'd since the file was opened).
        std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::WriteZero => Error::ProcessGone,
        _ if e.raw_os_error() == Some(libc::EIO) => Error::Unmapped { addr },
        _ => Error::io(format!("{op} tracee code at {addr:#x}"), e),
    }
}
