//! Faults on purpose: `mp_fault_load` (`mov rax, [rdi]; ret`, in assembly so its first
//! instruction is known) is called with the pointer 0x10. The SIGSEGV handler prints
//! the fault address, the instruction pointer it interrupted and the function's
//! address, then exits with 42. Probed or not, the output must be the same.

use std::hint::black_box;
use std::io::Write;

std::arch::global_asm!(
    ".globl mp_fault_load",
    ".type mp_fault_load, @function",
    "mp_fault_load:",
    "mov rax, qword ptr [rdi]",
    "ret",
    ".size mp_fault_load, . - mp_fault_load",
);

extern "C" {
    fn mp_fault_load(p: *const u64) -> u64;
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn mp_add(a: u64, b: u64) -> u64 {
    black_box(a).wrapping_add(black_box(b))
}

fn put_hex(buf: &mut [u8], mut at: usize, v: u64) -> usize {
    for i in (0..16).rev() {
        buf[at] = b"0123456789abcdef"[((v >> (i * 4)) & 0xf) as usize];
        at += 1;
    }
    at
}

extern "C" fn on_segv(_sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes valid siginfo and ucontext pointers to SA_SIGINFO
    // handlers; only async-signal-safe calls (write, _exit) follow.
    unsafe {
        let addr = (*info).si_addr() as u64;
        let code = (*info).si_code as u64;
        let uc = ctx as *const libc::ucontext_t;
        let rip = (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] as u64;
        let mut buf = [0u8; 128];
        let mut n = 0;
        for (label, v) in [
            (&b"segv addr="[..], addr),
            (b" code=", code),
            (b" rip=", rip),
            (b" fn=", mp_fault_load as *const () as usize as u64),
        ] {
            buf[n..n + label.len()].copy_from_slice(label);
            n = put_hex(&mut buf, n + label.len(), v);
        }
        buf[n] = b'\n';
        libc::write(1, buf.as_ptr().cast(), n + 1);
        libc::_exit(42);
    }
}

fn main() {
    // SAFETY: a zeroed sigaction is valid; the handler has the SA_SIGINFO signature.
    unsafe { multiprobe_test_targets::install_siginfo_handler(libc::SIGSEGV, on_segv, 0) };
    let s = (0..5).fold(0, |s, i| s + mp_add(i, 1));
    println!("before fault sum={s}");
    std::io::stdout().flush().expect("flush");
    // SAFETY: deliberately not safe: the load faults and the handler exits.
    let v = unsafe { mp_fault_load(black_box(0x10 as *const u64)) };
    println!("not reached {v}");
}
