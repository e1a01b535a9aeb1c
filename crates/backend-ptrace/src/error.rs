//! Mapping system-call failures to the core's [`Error`], with what was being done.

use multiprobe_core::{Error, MemoryError};

use crate::sys::Errno;

/// `ESRCH` (the thread or process is gone) becomes [`Error::ProcessGone`], `EPERM`
/// [`Error::PermissionDenied`], anything else [`Error::Io`] with `what`.
pub(crate) fn sys(e: Errno, what: impl std::fmt::Display) -> Error {
    match e {
        Errno::SRCH => Error::ProcessGone,
        Errno::PERM => Error::PermissionDenied(format!("{what}: {e}")),
        _ => Error::io(what.to_string(), e.into()),
    }
}

/// An I/O error on a `/proc` file of the tracee: a missing file means it is gone.
pub(crate) fn proc_io(e: std::io::Error, what: impl std::fmt::Display) -> Error {
    match e.raw_os_error() {
        Some(libc::ENOENT) | Some(libc::ESRCH) => Error::ProcessGone,
        Some(libc::EACCES) | Some(libc::EPERM) => Error::PermissionDenied(format!("{what}: {e}")),
        _ => Error::io(what.to_string(), e),
    }
}

/// A remote memory access failure as a handler sees it.
pub(crate) fn mem(e: Errno, addr: u64, write: bool) -> MemoryError {
    match e {
        Errno::SRCH => MemoryError::ProcessGone,
        _ if write => MemoryError::NotWritable(addr),
        _ => MemoryError::Unmapped(addr),
    }
}

/// `/proc/PID/maps` of the tracee.
pub(crate) fn maps(pid: i32) -> multiprobe_core::Result<multiprobe_symbols::Maps> {
    multiprobe_symbols::Maps::read(pid as u32)
        .map_err(|e| proc_io(e, format_args!("read /proc/{pid}/maps")))
}
