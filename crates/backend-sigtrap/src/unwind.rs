//! Unwinders through return-probed calls: a return-probed call's return slot holds the
//! return trampoline's address, which has no unwind information — an unwinder that
//! walked into it would stop there (a C++ exception would find no handler and call
//! `std::terminate`; `backtrace(3)` would end early). As uftrace does, the entry points
//! of the unwinders are wrapped: they put the original return addresses back into the
//! thread's return slots first ([`ThreadState::restore_return_addresses`]; the calls
//! stay awaited), and where the program goes on with the calls still in flight — after
//! a backtrace, when a C++ handler catches (`__cxa_begin_catch`) or an exception object
//! is deleted (`_Unwind_DeleteException`, which Rust's `catch_unwind` calls too) — the
//! trampoline goes back into the slots of the calls still live, those above the stack
//! pointer there ([`ThreadState::rehijack_returns`]). Calls an exception skipped are
//! dropped by their stack pointer later and counted lost, as after a `longjmp`.
//!
//! Wrapped (this executable's definitions take precedence over libgcc_s's and
//! libstdc++'s for every caller that links to them dynamically, and statically for code
//! linked in): `_Unwind_RaiseException`, `_Unwind_Resume`, `_Unwind_Resume_or_Rethrow`
//! (they unwind: tail jumps in assembly, so no frame of ours lies between the thrower
//! and the unwinder), `_Unwind_Backtrace`, `backtrace`, `__cxa_begin_catch`,
//! `_Unwind_DeleteException`. The real functions are found with
//! `dlsym(RTLD_NEXT, ...)`, at backend creation or at first use.
//!
//! Limits: unwinders that do not go through these entry points — `pthread_exit` and
//! cancellation (glibc's own `_Unwind_ForcedUnwind` through its private handle on
//! libgcc_s), a debugger, a profiler that reads the stack — see the trampoline's
//! address. A program that links no C++ library exports the wrappers only to the code
//! linked into it (a C++ library `dlopen`ed later keeps libgcc_s's). An exception thrown
//! by a handler (a Rust panic, caught by the core) restores nothing: it never leaves the
//! dispatch.

use std::ffi::{c_int, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};

use multiprobe_core::backend::ThreadState;

use crate::memory::LocalMemory;
use crate::thread;

const MEM: LocalMemory = LocalMemory::installed();

/// The real functions, by index (0: not resolved yet).
static REAL: [AtomicUsize; 7] = [const { AtomicUsize::new(0) }; 7];
const NAMES: [&CStr; 7] = [
    c"_Unwind_RaiseException",
    c"_Unwind_Resume",
    c"_Unwind_Resume_or_Rethrow",
    c"_Unwind_Backtrace",
    c"backtrace",
    c"__cxa_begin_catch",
    c"_Unwind_DeleteException",
];
const RAISE: usize = 0;
const RESUME: usize = 1;
const RESUME_OR_RETHROW: usize = 2;
const UNWIND_BACKTRACE: usize = 3;
const BACKTRACE: usize = 4;
const BEGIN_CATCH: usize = 5;
const DELETE_EXCEPTION: usize = 6;

/// Resolve every real function now (thread context): later calls, maybe in a signal
/// handler, then make no `dlsym` call.
pub(crate) fn install() {
    for i in 0..NAMES.len() {
        let _ = real(i);
    }
}

/// The real function `i`, resolved on first use (0 if there is none).
fn real(i: usize) -> usize {
    let f = REAL[i].load(Ordering::Acquire);
    if f != 0 {
        return f;
    }
    // SAFETY: a NUL-terminated name; RTLD_NEXT finds the definition after this
    // executable's (ours), in the libraries loaded after it.
    let f = unsafe { libc::dlsym(libc::RTLD_NEXT, NAMES[i].as_ptr()) } as usize;
    REAL[i].store(f, Ordering::Release);
    f
}

/// The real function `i`, or an abort with a message if the process has none (it
/// called a wrapper of a function no library of it defines).
fn real_or_abort(i: usize) -> usize {
    match real(i) {
        0 => {
            let msg = b"multiprobe: an unwinder entry point wrapped for return probes has no real definition; aborting\n";
            // SAFETY: a write of a local buffer to stderr, then abort.
            unsafe {
                libc::write(2, msg.as_ptr().cast(), msg.len());
                libc::abort()
            }
        }
        f => f,
    }
}

fn with_returns(f: impl FnOnce(&ThreadState)) {
    // A handler's own panic never leaves the dispatch (module docs).
    if thread::in_handler() {
        return;
    }
    thread::with_state(|ts| {
        if ts.returns_in_flight() > 0 {
            f(ts);
        }
    });
}

/// Put the original return addresses back; returns the real function `i` to jump to.
/// Called by the assembly wrappers (with their argument registers saved).
extern "C" fn before_unwind(i: usize) -> usize {
    with_returns(|ts| {
        ts.restore_return_addresses(&MEM);
    });
    real_or_abort(i)
}

/// The calls above `sp` are live again: the trampoline back into their slots.
fn live_above(sp: u64) {
    with_returns(|ts| {
        ts.rehijack_returns(sp, &MEM);
    });
}

// The unwinding entry points: save the argument, restore the return slots, restore the
// argument and jump to the real function, so that it sees its caller as its caller.
macro_rules! unwinding_wrapper {
    ($name:literal, $index:expr) => {
        std::arch::global_asm!(
            concat!(".globl ", $name),
            concat!(".type ", $name, ",@function"),
            concat!($name, ":"),
            ".cfi_startproc",
            "push rdi",
            ".cfi_adjust_cfa_offset 8",
            "mov edi, {index}",
            "call {before}",
            "pop rdi",
            ".cfi_adjust_cfa_offset -8",
            "jmp rax",
            ".cfi_endproc",
            concat!(".size ", $name, ", . - ", $name),
            index = const $index,
            before = sym before_unwind,
        );
    };
}

unwinding_wrapper!("_Unwind_RaiseException", RAISE);
unwinding_wrapper!("_Unwind_Resume", RESUME);
unwinding_wrapper!("_Unwind_Resume_or_Rethrow", RESUME_OR_RETHROW);

// The other entry points: the caller's stack pointer (above the return address) as an
// extra argument in `$reg`, then a jump to the Rust function, which returns to the caller.
macro_rules! shim {
    ($name:literal, $reg:literal, $imp:path) => {
        std::arch::global_asm!(
            concat!(".globl ", $name),
            concat!(".type ", $name, ",@function"),
            concat!($name, ":"),
            ".cfi_startproc",
            concat!("lea ", $reg, ", [rsp + 8]"),
            "jmp {imp}",
            ".cfi_endproc",
            concat!(".size ", $name, ", . - ", $name),
            imp = sym $imp,
        );
    };
}

shim!("_Unwind_Backtrace", "rdx", unwind_backtrace);
shim!("backtrace", "rdx", glibc_backtrace);
shim!("__cxa_begin_catch", "rsi", begin_catch);
shim!("_Unwind_DeleteException", "rsi", delete_exception);

type TraceFn = unsafe extern "C" fn(*mut c_void, *mut c_void) -> c_int;

/// `_Unwind_Backtrace` (Rust's `std::backtrace`, C++ code that calls it); `sp` is the
/// caller's stack pointer.
///
/// # Safety
/// As the real function's.
unsafe extern "C" fn unwind_backtrace(trace: TraceFn, arg: *mut c_void, sp: u64) -> c_int {
    let f = before_unwind(UNWIND_BACKTRACE);
    // SAFETY: the real `_Unwind_Backtrace`, with the caller's arguments.
    let f: unsafe extern "C" fn(TraceFn, *mut c_void) -> c_int = unsafe { std::mem::transmute(f) };
    // SAFETY: as the caller's contract.
    let r = unsafe { f(trace, arg) };
    live_above(sp);
    r
}

/// glibc's `backtrace(3)`.
///
/// # Safety
/// As the real function's: `buf` holds `size` pointers.
unsafe extern "C" fn glibc_backtrace(buf: *mut *mut c_void, size: c_int, sp: u64) -> c_int {
    let f = before_unwind(BACKTRACE);
    // SAFETY: the real `backtrace`, with the caller's arguments.
    let f: unsafe extern "C" fn(*mut *mut c_void, c_int) -> c_int =
        unsafe { std::mem::transmute(f) };
    // SAFETY: as the caller's contract.
    let r = unsafe { f(buf, size) };
    live_above(sp);
    r
}

/// The C++ runtime's `__cxa_begin_catch`: a handler caught, the calls above it go on.
///
/// # Safety
/// As the real function's.
unsafe extern "C" fn begin_catch(exc: *mut c_void, sp: u64) -> *mut c_void {
    let f = real_or_abort(BEGIN_CATCH);
    // SAFETY: the real `__cxa_begin_catch`, with the caller's argument.
    let f: unsafe extern "C" fn(*mut c_void) -> *mut c_void = unsafe { std::mem::transmute(f) };
    // SAFETY: as the caller's contract.
    let r = unsafe { f(exc) };
    live_above(sp);
    r
}

/// `_Unwind_DeleteException`: an exception is done with (Rust's `catch_unwind` caught a
/// panic, or a C++ handler ended); the calls above go on.
///
/// # Safety
/// As the real function's.
unsafe extern "C" fn delete_exception(exc: *mut c_void, sp: u64) {
    let f = real_or_abort(DELETE_EXCEPTION);
    // SAFETY: the real `_Unwind_DeleteException`, with the caller's argument.
    let f: unsafe extern "C" fn(*mut c_void) = unsafe { std::mem::transmute(f) };
    // SAFETY: as the caller's contract.
    unsafe { f(exc) };
    live_above(sp);
}
