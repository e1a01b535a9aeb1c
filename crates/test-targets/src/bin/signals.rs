//! Raises its own SIGTRAP (with `raise` and with an `int3` instruction of its own) and
//! sends itself SIGUSR1, with handlers for both (and one for SIGUSR2, which only a test
//! sends), between calls of `mp_add`. Prints what
//! its handlers saw; a probed run must print the same as an unprobed one. The main loop
//! and the SIGUSR handlers all call `mp_sload` (a load, in assembly: run out of line
//! when probed), so a SIGUSR1 that interrupts the main loop's call inside its slot nests
//! a second hit.

use std::hint::black_box;
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering::Relaxed};

static TRAPS: AtomicU64 = AtomicU64::new(0);
static TRAP_KERNEL: AtomicU64 = AtomicU64::new(0);
static USR1: AtomicU64 = AtomicU64::new(0);
static USR2: AtomicU64 = AtomicU64::new(0);
static LAST_CODE: AtomicI32 = AtomicI32::new(0);
static SLOADS: AtomicU64 = AtomicU64::new(0);

std::arch::global_asm!(
    ".globl mp_sload",
    ".type mp_sload, @function",
    "mp_sload:",
    "mov rax, qword ptr [rdi]",
    "ret",
    ".size mp_sload, . - mp_sload",
);

extern "C" {
    fn mp_sload(p: *const u64) -> u64;
}

fn sload(v: u64) {
    // SAFETY: mp_sload reads the u64 it is given; atomics are signal-safe.
    SLOADS.fetch_add(unsafe { mp_sload(&v) }, Relaxed);
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn mp_add(a: u64, b: u64) -> u64 {
    black_box(a).wrapping_add(black_box(b))
}

extern "C" fn on_trap(_sig: i32, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    TRAPS.fetch_add(1, Relaxed);
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    LAST_CODE.store(code, Relaxed);
    if code == 0x80 {
        TRAP_KERNEL.fetch_add(1, Relaxed);
    }
}

extern "C" fn on_usr1(_sig: i32) {
    USR1.fetch_add(1, Relaxed);
    sload(1000);
}

extern "C" fn on_usr2(_sig: i32) {
    USR2.fetch_add(1, Relaxed);
    sload(2000);
}

fn install(sig: i32, handler: usize, siginfo: bool) {
    // SAFETY: a zeroed sigaction is valid; the handler is an extern "C" fn of the
    // matching signature and only touches atomics (async-signal-safe).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler;
        sa.sa_flags = if siginfo { libc::SA_SIGINFO } else { 0 };
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
    }
}

fn main() {
    install(libc::SIGTRAP, on_trap as *const () as usize, true);
    install(libc::SIGUSR1, on_usr1 as *const () as usize, false);
    install(libc::SIGUSR2, on_usr2 as *const () as usize, false);
    let rounds: u64 = multiprobe_test_targets::util::arg("--rounds", 20);
    let mut sum = 0u64;
    for i in 0..rounds {
        sum = sum.wrapping_add(mp_add(i, 1));
        sload(i);
        // SAFETY: raising a signal we handle.
        unsafe { libc::raise(libc::SIGTRAP) };
        sum = sum.wrapping_add(mp_add(i, 2));
        // SAFETY: signalling ourselves with a signal we handle.
        unsafe { libc::kill(libc::getpid(), libc::SIGUSR1) };
        // SAFETY: an int3 of the program's own; its SIGTRAP handler returns past it.
        unsafe { std::arch::asm!("int3") };
    }
    println!(
        "rounds={rounds} sum={sum} sigtrap={} sigtrap_kernel={} sigusr1={} sigusr2={} sloads={}",
        TRAPS.load(Relaxed),
        TRAP_KERNEL.load(Relaxed),
        USR1.load(Relaxed),
        USR2.load(Relaxed),
        SLOADS.load(Relaxed)
    );
}
