//! A thread parked inside the region's interior while the site is promoted: it faulted
//! on the region's second instruction and waits in its SIGSEGV handler, so its
//! interrupted context — `rip` at the second instruction, whose bytes the jump is about
//! to overwrite — lives in a signal frame on its stack. Promotion must find that frame
//! and move the thread to the same point of the relocated copy; when the handler fixes
//! the pointer and returns, the thread must finish the function correctly.
//!
//! Its own test binary: the program's SIGSEGV handler is installed before the backend's
//! (which chains to it), as the crate documentation asks.

mod regions;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::Arc;

use multiprobe_backend_sigtrap::{Mode, SigtrapBackend};
use multiprobe_core::{Hit, Registry};
use regions::*;

static PARKED: AtomicBool = AtomicBool::new(false);
static RELEASE: AtomicBool = AtomicBool::new(false);
static GOOD: AtomicU64 = AtomicU64::new(41);
static FAULT_RIP: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_segv(_sig: i32, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel's ucontext for an SA_SIGINFO handler.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    FAULT_RIP.store(uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64, SeqCst);
    PARKED.store(true, SeqCst);
    while !RELEASE.load(SeqCst) {
        std::hint::spin_loop();
    }
    // Point the faulting load at a good value and retry it.
    uc.uc_mcontext.gregs[libc::REG_RDI as usize] = GOOD.as_ptr() as i64;
}

#[test]
fn a_thread_parked_at_the_regions_second_instruction_resumes_in_the_relocated_copy() {
    // SAFETY: installing a handler with a valid sigaction, SIGTRAP not blocked in it.
    unsafe { multiprobe_test_targets::install_siginfo_handler(libc::SIGSEGV, on_segv, 0) };
    let a = addr(mp_r_load as *const ());
    let orig = bytes(a, 16);
    // The thread enters the function unprobed and faults on its second instruction.
    let t = std::thread::spawn(|| {
        // SAFETY: a bad pointer on purpose; the SIGSEGV handler fixes it.
        unsafe { mp_r_load(std::ptr::dangling::<u64>()) }
    });
    while !PARKED.load(SeqCst) {
        std::thread::yield_now();
    }
    assert_eq!(
        FAULT_RIP.load(SeqCst),
        a + 1,
        "parked at the second instruction"
    );
    let reg = Registry::new(SigtrapBackend::with_promotion(true));
    let hits = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hits);
    let g = reg
        .register(a, move |_hit: &mut Hit<'_>| {
            h.fetch_add(1, SeqCst);
        })
        .unwrap();
    assert_eq!(reg.backend().mode_at(a), Some(Mode::Jump));
    assert_eq!(bytes(a, 1)[0], 0xe9);
    RELEASE.store(true, SeqCst);
    assert_eq!(t.join().unwrap(), 42, "finished from the relocated copy");
    assert_eq!(
        hits.load(SeqCst),
        0,
        "it had passed the probe before it was placed"
    );
    // SAFETY: a good pointer.
    assert_eq!(unsafe { mp_r_load(GOOD.as_ptr()) }, 42);
    assert_eq!(hits.load(SeqCst), 1);
    drop(g);
    reg.synchronize().unwrap();
    assert_eq!(bytes(a, 16), orig);
}
