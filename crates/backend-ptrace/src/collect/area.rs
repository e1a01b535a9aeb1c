//! The shared area: memory the tracee's collecting trampolines write (counters, a
//! record ring) and the tracer reads while the program runs.
//!
//! Made on a stopped thread of the tracee with injected system calls
//! ([`crate::inject`]): `memfd_create`, `ftruncate`, then the tracer opens
//! `/proc/PID/fd/N` and maps it `MAP_SHARED` itself, then the tracee maps it (`mmap`,
//! `MAP_SHARED`, read+write; at a given address with `MAP_FIXED_NOREPLACE` for a fork
//! child, whose copy must sit where its parent's was) and `close`s the descriptor. So
//! the program keeps no descriptor of ours, and what it wrote stays readable in the
//! tracer after it died (the tracer's mapping holds the pages).
//!
//! Any failure (seccomp, `ENOSYS`, no memory) undoes what was done in the tracee and
//! is reported: the caller keeps its sites on the one-stop path with that reason.
//!
//! `unsafe` here: the tracer's `mmap`/`munmap` of the descriptor, and handing out the
//! mapping as raw memory ([`Mapping`]), which only atomics may touch (the tracee writes
//! it concurrently).

use std::os::fd::AsFd;

use multiprobe_core::{Error, Memory, Result};

use crate::error;
use crate::inject;
use crate::sys::{Tid, UserRegs};
use crate::tracer::Tracer;

use super::Area;
use multiprobe_x86::collect::AreaLayout;

/// The tracer's `MAP_SHARED` mapping of the area's memfd.
#[derive(Debug)]
pub(crate) struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory, valid until drop; every access through
// `ptr` goes through atomics (see `as_ptr`'s contract), so sharing it between threads
// is as sound as sharing an `[AtomicU8]`.
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Map `len` bytes of `fd` shared, read+write.
    fn new(fd: impl AsFd, len: usize) -> std::io::Result<Mapping> {
        use rustix::mm::{mmap, MapFlags, ProtFlags};
        // SAFETY: a fresh mapping chosen by the kernel (null hint, no MAP_FIXED): it
        // replaces nothing of this process.
        let ptr = unsafe {
            mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                fd,
                0,
            )
        }?;
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }

    /// The start of the mapping. It stays valid while `self` lives; the tracee may
    /// write any byte at any time, so read and write it only with atomic operations.
    pub(crate) fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Store the area's header words (`header`: whole little-endian words).
    fn write_header(&self, header: &[u8]) {
        use std::sync::atomic::{AtomicU64, Ordering};
        for (i, w) in header.chunks_exact(8).enumerate() {
            let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            // SAFETY: `i * 8 + 8 <= header.len() <= len`, inside the mapping, 8-aligned
            // (the mapping is page-aligned); accessed atomically, as `as_ptr` requires.
            let word = unsafe { &*self.ptr.add(i * 8).cast::<AtomicU64>() };
            word.store(v, Ordering::Release);
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr..ptr+len` is the mapping made in `new`, unmapped only here;
        // whoever could still use it holds an `Arc<Mapping>`, so nobody does now.
        let _ = unsafe { rustix::mm::munmap(self.ptr.cast(), self.len) };
    }
}

/// The name the memfd shows in the tracee's `/proc/PID/maps` while mapped.
const NAME: &[u8] = b"multiprobe-collect\0";

impl Tracer {
    /// Make an area laid out as `layout` in the tracee, using the stopped thread `tid`
    /// whose registers are `ur`; at exactly `at` if given (a fork child). Its header is
    /// written before any code can use it.
    pub(crate) fn make_area(
        &mut self,
        tid: Tid,
        ur: &UserRegs,
        layout: AreaLayout,
        at: Option<u64>,
    ) -> Result<Area> {
        let len = layout.size();
        let pid = self.shared.pid;
        let insn = {
            let st = self.shared.lock();
            let code = st.usable()?;
            self.injector.insn(pid, code)?
        };
        let mem = self.mem;
        let mem_err = |e: multiprobe_core::MemoryError| Error::Backend(format!("{e}"));
        let call = |me: &mut Tracer, nr: i64, args: [u64; 6], what: &str| -> Result<u64> {
            inject::syscall(pid, tid, ur, insn, nr, args, &mut me.aside)?
                .map_err(|e| error::sys(e, format_args!("{what} in the tracee")))
        };
        // The memfd's name, below the thread's red zone (free stack by the ABI); the
        // bytes there are put back afterwards all the same.
        let scratch = (ur.rsp - 128 - 64) & !15;
        let mut saved = [0u8; NAME.len()];
        mem.read(scratch, &mut saved).map_err(mem_err)?;
        mem.write(scratch, NAME).map_err(mem_err)?;
        let fd = call(
            self,
            libc::SYS_memfd_create,
            [scratch, libc::MFD_CLOEXEC as u64, 0, 0, 0, 0],
            "memfd_create",
        );
        let _ = mem.write(scratch, &saved);
        let fd = fd?;
        let close = |me: &mut Tracer| {
            let _ = call(me, libc::SYS_close, [fd, 0, 0, 0, 0, 0], "close");
        };
        let made = (|| -> Result<Area> {
            call(
                self,
                libc::SYS_ftruncate,
                [fd, len as u64, 0, 0, 0, 0],
                "ftruncate",
            )?;
            let path = format!("/proc/{}/fd/{fd}", pid.as_raw_pid());
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(|e| Error::Backend(format!("open {path}: {e}")))?;
            let map = Mapping::new(&file, len)
                .map_err(|e| Error::Backend(format!("map the collecting area: {e}")))?;
            map.write_header(&layout.header());
            let flags = libc::MAP_SHARED | at.map_or(0, |_| libc::MAP_FIXED_NOREPLACE);
            let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
            let want = at.unwrap_or(0);
            let args = [want, len as u64, rw, flags as u64, fd, 0];
            let got = call(self, libc::SYS_mmap, args, "mmap the collecting area")?;
            if at.is_some_and(|a| a != got) {
                let undo = [got, len as u64, 0, 0, 0, 0];
                let _ = call(self, libc::SYS_munmap, undo, "munmap");
                return Err(Error::Backend(format!(
                    "the collecting area landed at {got:#x}, not {want:#x}"
                )));
            }
            Ok(Area {
                tracee: got,
                map: std::sync::Arc::new(map),
                layout,
                clock: std::sync::Arc::new(std::sync::Mutex::new(super::clock::Clock::new())),
            })
        })();
        close(self);
        made
    }

    /// Unmap the area at `addr` (`len` bytes) in the tracee, on the stopped thread
    /// `tid` (registers `ur`). Best effort: the caller is leaving the process.
    pub(crate) fn unmap_area(
        &mut self,
        tid: Tid,
        ur: &UserRegs,
        addr: u64,
        len: usize,
    ) -> Result<()> {
        let pid = self.shared.pid;
        let insn = {
            let st = self.shared.lock();
            let code = st.usable()?;
            self.injector.insn(pid, code)?
        };
        let args = [addr, len as u64, 0, 0, 0, 0];
        inject::syscall(pid, tid, ur, insn, libc::SYS_munmap, args, &mut self.aside)?
            .map_err(|e| error::sys(e, "munmap the collecting area in the tracee"))?;
        Ok(())
    }
}
