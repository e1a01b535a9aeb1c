//! Fault-guarded access to this process's memory, usable inside a signal handler.
//!
//! Handlers get a [`multiprobe_core::Memory`] that must not crash the process on a bad
//! pointer and must not make a system call per access (`process_vm_readv` would cost
//! more than the trap). So the copy is one `rep movsb` (an 8-byte access one `mov`) in
//! a tiny assembly routine whose single faulting instruction is known: the backend's
//! SIGSEGV/SIGBUS handler ([`crate::fault`]) sees a fault whose `rip` is one of those
//! instructions, moves `rip` to the routines' fix-up label and returns, and the copy
//! reports failure — the kernel's exception-table technique. Nothing else is guarded,
//! so a fault anywhere else is never mistaken for a failed copy.
//!
//! Invariant: the fault handlers are installed before any copy runs (the backend
//! installs them on construction; [`LocalMemory`] is only handed out by the backend).

use multiprobe_core::{Memory, MemoryError};

core::arch::global_asm!(
    ".pushsection .text.multiprobe_sigtrap_copy,\"ax\",@progbits",
    ".balign 16",
    ".globl multiprobe_sigtrap_copy",
    ".hidden multiprobe_sigtrap_copy",
    ".type multiprobe_sigtrap_copy,@function",
    // rdi = destination, rsi = source, rdx = length; returns eax = 0 ok, 1 faulted.
    "multiprobe_sigtrap_copy:",
    "    mov rcx, rdx",
    ".globl multiprobe_sigtrap_copy_insn",
    ".hidden multiprobe_sigtrap_copy_insn",
    "multiprobe_sigtrap_copy_insn:",
    "    rep movsb",
    "    xor eax, eax",
    "    ret",
    // Eight bytes, the size of most accesses (a pushed or popped word, a pointer), by
    // one `mov`: a short `rep movsb` costs tens of cycles to start, and a `mov` that
    // faults has written nothing.
    // rdi = source, rsi = where to put the value; returns eax = 0 ok, 1 faulted.
    ".globl multiprobe_sigtrap_load8_insn",
    ".hidden multiprobe_sigtrap_load8_insn",
    "multiprobe_sigtrap_load8_insn:",
    "    mov rax, qword ptr [rdi]",
    "    mov qword ptr [rsi], rax",
    "    xor eax, eax",
    "    ret",
    // rdi = destination, rsi = value; returns eax = 0 ok, 1 faulted.
    ".globl multiprobe_sigtrap_store8_insn",
    ".hidden multiprobe_sigtrap_store8_insn",
    "multiprobe_sigtrap_store8_insn:",
    "    mov qword ptr [rdi], rsi",
    "    xor eax, eax",
    "    ret",
    ".globl multiprobe_sigtrap_copy_fixup",
    ".hidden multiprobe_sigtrap_copy_fixup",
    "multiprobe_sigtrap_copy_fixup:",
    "    mov eax, 1",
    "    ret",
    ".size multiprobe_sigtrap_copy, . - multiprobe_sigtrap_copy",
    ".popsection",
);

extern "C" {
    fn multiprobe_sigtrap_copy(dst: *mut u8, src: *const u8, len: usize) -> u32;
    fn multiprobe_sigtrap_copy_insn();
    fn multiprobe_sigtrap_load8_insn(src: *const u8, out: *mut u64) -> u32;
    fn multiprobe_sigtrap_store8_insn(dst: *mut u8, value: u64) -> u32;
    fn multiprobe_sigtrap_copy_fixup();
}

/// If a fault at `rip` is the guarded copy's, where to resume instead.
pub(crate) fn fixup_for(rip: u64) -> Option<u64> {
    [
        multiprobe_sigtrap_copy_insn as *const () as u64,
        multiprobe_sigtrap_load8_insn as *const () as u64,
        multiprobe_sigtrap_store8_insn as *const () as u64,
    ]
    .contains(&rip)
    .then_some(multiprobe_sigtrap_copy_fixup as *const () as u64)
}

/// The address range of the guarded copy routine (reserved: never probed).
pub(crate) fn copy_routine() -> (u64, u64) {
    let start = multiprobe_sigtrap_copy as *const () as u64;
    (start, multiprobe_sigtrap_copy_fixup as *const () as u64 + 8)
}

/// Copy `len` bytes from `src` to `dst`, either of which may be bad. Returns false if a
/// fault stopped it (some bytes may have been written).
///
/// # Safety
/// `dst` must not overlap memory whose change would break Rust's aliasing rules (the
/// caller vouches for what it writes to), and the fault handlers must be installed.
pub(crate) unsafe fn guarded_copy(dst: *mut u8, src: *const u8, len: usize) -> bool {
    debug_assert!(crate::signals::installed(libc::SIGSEGV));
    // SAFETY: the routine only touches `len` bytes at `dst`/`src`; a fault there is
    // turned into a failure return by the installed fault handler (module docs).
    unsafe { multiprobe_sigtrap_copy(dst, src, len) == 0 }
}

/// This process's memory as handlers see it: every access is fault-guarded, costs no
/// system call and is async-signal-safe.
///
/// Writes are allowed to writable memory only (a write to read-only memory fails, it
/// does not force its way like a debugger would). Writing to memory the interrupted
/// program is using is the handler's responsibility.
#[derive(Debug, Clone, Copy)]
pub struct LocalMemory {
    _private: (),
}

impl LocalMemory {
    /// For the signal path, where installation already happened. (`new`, which
    /// installs the fault handlers, is in `crate::fault`: this module stays a leaf.)
    pub(crate) const fn installed() -> Self {
        LocalMemory { _private: () }
    }
}

impl Memory for LocalMemory {
    #[inline]
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if addr.checked_add(buf.len() as u64).is_none() {
            return Err(MemoryError::Unmapped(addr));
        }
        let ok = if let Ok(word) = <&mut [u8; 8]>::try_from(&mut *buf) {
            let mut v = 0u64;
            // SAFETY: the load is guarded (module docs) and `v` is ours to write; the
            // fault handlers are installed (`LocalMemory` invariant).
            let ok = unsafe { multiprobe_sigtrap_load8_insn(addr as *const u8, &mut v) } == 0;
            *word = v.to_le_bytes();
            ok
        } else {
            // SAFETY: `buf` is ours to write; the source is guarded.
            unsafe { guarded_copy(buf.as_mut_ptr(), addr as *const u8, buf.len()) }
        };
        ok.then_some(()).ok_or(MemoryError::Unmapped(addr))
    }

    #[inline]
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        if addr.checked_add(data.len() as u64).is_none() {
            return Err(MemoryError::NotWritable(addr));
        }
        let ok = if let Ok(word) = <[u8; 8]>::try_from(data) {
            // SAFETY: the store is guarded (module docs); what a handler writes into the
            // program's memory is its own business (documented on the type).
            unsafe {
                multiprobe_sigtrap_store8_insn(addr as *mut u8, u64::from_le_bytes(word)) == 0
            }
        } else {
            // SAFETY: the destination is guarded; as above for what is written.
            unsafe { guarded_copy(addr as *mut u8, data.as_ptr(), data.len()) }
        };
        ok.then_some(()).ok_or(MemoryError::NotWritable(addr))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guarded_reads_and_writes_fail_cleanly_on_bad_addresses() {
        let m = LocalMemory::new();
        let x: u64 = 0x1122_3344_5566_7788;
        let mem: &dyn Memory = &m;
        assert_eq!(mem.read_u64(&x as *const u64 as u64), Ok(x));
        assert_eq!(mem.read_u64(8), Err(MemoryError::Unmapped(8)));
        let mut y = 0u64;
        let ya = &mut y as *mut u64 as u64;
        mem.write_u64(ya, 42).unwrap();
        assert_eq!(std::hint::black_box(y), 42);
        // Read-only memory (this function's code) cannot be written.
        let code = guarded_reads_and_writes_fail_cleanly_on_bad_addresses as *const () as u64;
        assert_eq!(
            mem.write(code, &[0xcc]),
            Err(MemoryError::NotWritable(code))
        );
        assert!(mem.read(u64::MAX - 2, &mut [0u8; 8]).is_err());
    }
}
