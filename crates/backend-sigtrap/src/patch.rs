//! Changing this process's code while other threads may be running it.
//!
//! Writes go through `/proc/self/mem`, which the kernel performs with `FOLL_FORCE` on
//! the physical page (breaking copy-on-write for private file mappings), so the code
//! pages never become writable in the page tables and no thread can ever see them
//! without execute permission. If the kernel forbids that (`proc_mem.force_override`),
//! the fallback briefly adds `PROT_WRITE` to the page (keeping read and execute, so
//! threads running there are not disturbed) and restores the mapping's permissions.
//!
//! Only single bytes are ever written to live code — `int3` over an instruction's first
//! byte, or that byte back — and a one-byte store is atomic: a concurrent thread sees
//! either the old or the new instruction start, never a torn mix. Slot bytes are written
//! before any thread can reach them. After each change all threads are made to execute
//! a serializing instruction (`membarrier` `SYNC_CORE`) where the kernel offers it, the
//! cross-modifying-code rule of the Intel SDM (§8.1.3).
//!
//! All writers are serialized by one lock (thread context only). The `/proc/self/mem`
//! descriptor is reopened after `fork`: an inherited one still refers to the parent.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

use multiprobe_symbols::{Maps, Region};

struct Mem {
    pid: libc::pid_t,
    file: Option<File>,
    membarrier: Option<bool>,
}

static MEM: Mutex<Mem> = Mutex::new(Mem {
    pid: 0,
    file: None,
    membarrier: None,
});

const MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 5;
const MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE: libc::c_long = 1 << 6;

impl Mem {
    fn file(&mut self) -> io::Result<&File> {
        // SAFETY: no preconditions.
        let pid = unsafe { libc::getpid() };
        if self.pid != pid || self.file.is_none() {
            self.file = Some(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open("/proc/self/mem")?,
            );
            self.pid = pid;
            self.membarrier = None;
        }
        Ok(self.file.as_ref().expect("opened above"))
    }

    fn sync_cores(&mut self) {
        let ok = *self.membarrier.get_or_insert_with(|| {
            // SAFETY: registering for the expedited sync-core barrier has no
            // preconditions; failure just means it is unsupported.
            unsafe {
                libc::syscall(
                    libc::SYS_membarrier,
                    MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED_SYNC_CORE,
                    0,
                ) == 0
            }
        });
        if ok {
            // SAFETY: as above; registered.
            unsafe {
                libc::syscall(
                    libc::SYS_membarrier,
                    MEMBARRIER_CMD_PRIVATE_EXPEDITED_SYNC_CORE,
                    0,
                )
            };
        }
    }
}

fn lock() -> std::sync::MutexGuard<'static, Mem> {
    MEM.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read `buf.len()` bytes of code at `addr` (works for execute-only pages too).
pub(crate) fn read(addr: u64, buf: &mut [u8]) -> io::Result<()> {
    lock().file()?.read_exact_at(buf, addr)
}

/// Write `bytes` at `addr` in code or slot memory, then serialize every core.
pub(crate) fn write(addr: u64, bytes: &[u8]) -> io::Result<()> {
    let mut m = lock();
    let r = match m.file()?.write_all_at(bytes, addr) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EIO | libc::EPERM | libc::EACCES)
            ) =>
        {
            write_mprotect(addr, bytes)
        }
        Err(e) => Err(e),
    };
    if r.is_ok() {
        m.sync_cores();
    }
    r
}

/// `PROT_*` bits of a mapping.
fn prot(r: &Region) -> libc::c_int {
    let mut p = 0;
    if r.read {
        p |= libc::PROT_READ;
    }
    if r.write {
        p |= libc::PROT_WRITE;
    }
    if r.exec {
        p |= libc::PROT_EXEC;
    }
    p
}

/// The fallback: make the pages writable too, store, restore their permissions.
fn write_mprotect(addr: u64, bytes: &[u8]) -> io::Result<()> {
    let maps = Maps::read(0)?;
    let map = maps
        .find(addr)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFAULT))?;
    if addr + bytes.len() as u64 > map.end {
        return Err(io::Error::from_raw_os_error(libc::EFAULT));
    }
    let page = 4096u64;
    let start = addr & !(page - 1);
    let len = ((addr + bytes.len() as u64 + page - 1) & !(page - 1)) - start;
    // SAFETY: the range lies within one existing mapping; adding PROT_WRITE keeps it
    // readable and executable for every thread running there.
    if unsafe { libc::mprotect(start as *mut _, len as usize, prot(map) | libc::PROT_WRITE) } != 0 {
        return Err(io::Error::last_os_error());
    }
    for (i, b) in bytes.iter().enumerate() {
        // SAFETY: writable now; volatile single-byte stores (module docs: atomic).
        unsafe { std::ptr::write_volatile((addr as *mut u8).add(i), *b) };
    }
    // SAFETY: restores the permissions read from /proc/self/maps.
    if unsafe { libc::mprotect(start as *mut _, len as usize, prot(map)) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_read_only_executable_memory_and_restores_it() {
        // A private read+exec page of our own, so no code anyone runs is touched.
        // SAFETY: a fresh anonymous mapping.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let a = p as u64 + 100;
        write(a, &[0xcc, 0x90]).unwrap();
        let mut b = [0u8; 2];
        read(a, &mut b).unwrap();
        assert_eq!(b, [0xcc, 0x90]);
        // SAFETY: readable page.
        assert_eq!(unsafe { *(a as *const u8) }, 0xcc);
        write_mprotect(a, &[0x00]).unwrap();
        // SAFETY: readable page.
        assert_eq!(unsafe { *(a as *const u8) }, 0x00);
        // Permissions are as before.
        let maps = Maps::read(0).unwrap();
        let m = maps.find(a).unwrap();
        assert!(m.exec && !m.write);
        assert_eq!(prot(m), libc::PROT_READ | libc::PROT_EXEC);
        // SAFETY: our mapping.
        unsafe { libc::munmap(p, 4096) };
        // Nothing mapped, nothing written. (Not at `a`: other tests' threads may map
        // memory there again at any moment. Nothing can be below `mmap_min_addr`.)
        assert!(write(0x1000, &[1]).is_err());
    }
}
