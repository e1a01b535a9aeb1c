//! In-process probes for [`multiprobe_core`]: `int3` breakpoints in this process's own
//! code, a SIGTRAP handler, and out-of-line (XOL) slots, so a hit costs one trap — and,
//! where the code allows, sites promoted to a `jmp` into a trampoline, so a hit costs
//! no trap at all.
//!
//! ```
//! use std::hint::black_box;
//! use std::sync::Arc;
//!
//! use multiprobe_backend_sigtrap::{fn_addr, HitRecord, HitRing};
//!
//! #[inline(never)]
//! fn work(x: u64) -> u64 {
//!     black_box(x) * 2
//! }
//!
//! let reg = multiprobe_backend_sigtrap::registry();
//! let ring = Arc::new(HitRing::<HitRecord>::new(1024));
//! let r = Arc::clone(&ring);
//! let probe = reg.register(fn_addr(work as fn(u64) -> u64), move |hit| {
//!     r.push(HitRecord::of(hit)); // signal-safe hand-out
//! })?;
//! // An opaque argument: the optimizer may not compute `work(21)` without calling it.
//! assert_eq!(work(black_box(21)), 42);
//! assert_eq!(ring.pop().unwrap().args[0], 21);
//! probe.unregister()?;
//!
//! // By name: `library:symbol` (or a symbol of the program), resolved in this process.
//! // A handler may also end the call with a value of its own.
//! let getppid = reg.register(multiprobe_backend_sigtrap::resolve("libc:getppid")?, |hit| {
//!     let _ = hit.return_now(4242);
//! })?;
//! // SAFETY: getppid has no preconditions.
//! assert_eq!(unsafe { libc::getppid() }, 4242);
//! getppid.unregister()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # How a hit works
//!
//! Arming writes `int3` over the instruction's first byte (through `/proc/self/mem`, so
//! the code never becomes writable; one byte, so concurrent threads see the old or the
//! new instruction, never a mix). A thread that executes it gets SIGTRAP; the handler
//! runs the pre-handlers, then executes the displaced instruction once: emulated on the
//! registers when `multiprobe-x86` can (nops, `endbr64`, `push`, `jmp`, `jcc`, `call`,
//! `ret`, ...), else from a slot within ±2 GiB that jumps back — one trap per hit. When
//! a post-handler is registered, the hit uses the slot variant that ends in `int3`
//! instead (two traps), or runs the post-handlers right after emulation (one trap). A
//! displaced instruction that faults in its slot is reported to the fault handlers and,
//! if none handles it, delivered to the program as if it had faulted at its original
//! address.
//!
//! # Two modes: jump sites and trap sites
//!
//! Every site is armed as an `int3` site. Right after, it is *promoted* when the
//! instructions covering 5 bytes from the probed address may be replaced by a `jmp
//! rel32` (multiprobe-x86's region checks, kprobes' optprobes rules: no branch of the
//! function into those bytes, no jump table, no exception landing pad there, no
//! `call`/`ret`/`jmp`/`syscall` before their end, a trampoline within ±2 GiB) and the
//! every-thread check passes. A promoted site's hits run in thread context: the
//! trampoline skips the red zone, saves every register and the vector/x87 state, calls
//! the core's dispatch (unchanged), restores, and runs the relocated instructions —
//! ~50 ns a hit instead of a ~2 µs trap (BENCHMARKS.md). [`Site::mode`] /
//! [`SigtrapBackend::mode_at`] say which mode a site is in and, for a trap site, why
//! ([`TrapReason`]). A site that cannot be promoted is simply a trap site: never an
//! error. `SigtrapBackend::with_promotion(false)` or [`SigtrapBackend::keep_as_trap`]
//! keep sites as `int3` sites; [`SigtrapBackend::promote`] and
//! [`SigtrapBackend::demote`] switch an armed site.
//!
//! Promotion follows the kernel's `text_poke_bp`: with the `int3` on the first byte,
//! every other thread is stopped briefly in a signal handler (a queued SIGFPE carrying a
//! magic value; see the `threads` module for why that signal) and any that stands in
//! the replaced bytes — or is parked in a signal handler whose interrupted context is
//! there, or in one of the site's slots — is moved to the same point of the relocated
//! copy; then bytes 1.. are written, every core serialized (`membarrier` SYNC_CORE),
//! then the `jmp` opcode. Demotion does the reverse. A thread that does not answer the
//! check (SIGFPE blocked) keeps the site an `int3` site, and says so. Trampolines are
//! never reused or freed, so a thread may be inside one at any time.
//!
//! What handlers see and may do is the same in both modes (this section and the next
//! apply to both: the trampoline path is held to the signal path's rules), with these
//! differences: on a jump site handlers run in thread context (so the async-signal
//! rules are stricter than needed there, but a site may go back to being a trap site
//! at any time); a hit arriving while the thread is inside the backend's own machinery
//! is counted as missed, as is a hit from a signal handler that interrupted a
//! trampoline's dispatch; a site whose first instruction is a `call` and that has
//! post-handlers leaves its trampoline through one trap per hit (the emulated call
//! moves the stack down, which only the trap exit can restore). A promoted site needs
//! ~4 KiB of stack below the probed code's `rsp` (the frame and the vector state),
//! about what a signal frame needs.
//!
//! # Return probes
//!
//! A handler with a return hook ([`multiprobe_core::FnHandler::ret`]) at a function's
//! first instruction sees each call's return: its pre-hook leaves a fixed-size
//! [`multiprobe_core::CallData`] and the return hook gets it with the return value
//! registers (`rax`, `rdx`; the vector registers are restored unchanged). At the entry
//! the core swaps the return address at `[rsp]` for the process's *return trampoline*
//! (generated with multiprobe-x86's assembler, the same frame and state save as a
//! promoted site's) and keeps it on the thread's return stack (512 KiB of address space
//! per thread that hits probes once return probes exist, mapped at its first hit); the
//! trampoline calls the core's return dispatch in thread context, on trap sites and
//! promoted sites alike, then continues at the original return address. An address
//! inside a function is refused ([`multiprobe_core::Error::NotFunctionEntry`]).
//!
//! Calls left without returning — `longjmp`, a C++ exception, a Rust panic — are
//! recognised by their stack pointer and counted in `returns_lost`. Unwinders get through:
//! the unwinder entry points (`_Unwind_RaiseException`, `_Unwind_Resume`,
//! `_Unwind_Backtrace`, `backtrace`, ...) are wrapped to put the original return
//! addresses back first and the trampoline again where the program goes on (see the
//! `unwind` module: its limits include `pthread_exit`/cancellation and stack walkers
//! that bypass those entry points, such as debuggers and profilers). A return hook runs
//! no sooner than its call's return and never after its handler's `unregister` returned;
//! calls still in flight then return normally through the trampoline, which is never
//! freed.
//!
//! # Module structure
//!
//! Leaf modules (they import nothing of this crate): `site` (per-site types), `context`,
//! `memory` (the guarded copy), `known`, `patch`. Above them, without cycles:
//! `dispatchers` (imports `site`), `thread` (`dispatchers`, for its fork hook),
//! `signals` (`thread`), `slots` (`site`, `patch`), `collect` (`dispatchers`), `unwind`
//! (`thread`, `memory`). The signal path — `trap` (SIGTRAP), `fault`
//! (SIGSEGV/SIGBUS/SIGFPE/SIGILL) — and the trampoline paths — `entry`, `returning` (the
//! return trampoline's) — import only those, `tramps` (lookups over leaked
//! trampoline descriptions) and `threads` (whose signal-side hook parks a thread with
//! atomics and a futex); nothing they import reaches `backend`, `promote` or `source`,
//! the thread-context code, so what must be async-signal-safe can be audited from the
//! imports.
//!
//! # What handlers may do
//!
//! Handlers run **inside a signal handler**, on the thread that hit the probe, at an
//! arbitrary point of its execution — possibly inside `malloc`, or holding a lock.
//! So a handler must be async-signal-safe:
//! * no allocation or freeing (`Box`, `Vec` growth, `String`, `format!`, `println!`);
//! * no locks (`Mutex`, `RwLock`, `std::io::stdout()`); atomics are fine;
//! * only async-signal-safe system calls (`write(2)` to a raw fd is fine);
//! * read and write the interrupted thread's registers through [`multiprobe_core::Hit`];
//!   read memory through `Hit::mem()` (a [`LocalMemory`]: fault-guarded, no system call);
//! * to hand data to the rest of the program, push `Copy` records into a preallocated
//!   [`HitRing`] and read them from a normal thread (or bump atomic counters).
//!
//! From inside a handler, the registry neither locks nor allocates (the core's
//! contract, *What each backend delivers*):
//! * a handler removes itself with [`multiprobe_core::PreAction::Remove`], and removes
//!   others with `unregister` / `unregister_batch` or by dropping their guards: the
//!   removal is requested lock-free (hits that begin afterwards do not run them), the
//!   call answers `InsideDispatch`, and the backend's collector thread (one per process,
//!   asleep on a futex until a hit asks) finishes the bookkeeping — the `int3` goes
//!   without the program calling into the registry;
//! * every other registry method that returns a `Result` answers `SignalContext` and
//!   changes nothing; don't call `len`, `handlers`, `site`, `sites` or `register` there.
//!
//! Panics in handlers are caught (rule 8 of the core's contract). The backend installs
//! a panic hook, wrapping the one in place when the first backend is created, that stays
//! silent for a handler's panic — the default one would lock stderr, allocate and maybe
//! walk the stack inside the signal handler — and passes every other panic on; a hook
//! installed later replaces it, and can ask [`in_handler`] to do the same. Unwinding
//! still allocates its exception, so catching is best effort in signal context: a panic
//! while the interrupted code held the allocator's lock deadlocks. Don't panic.
//!
//! A hit makes no system call, except that a thread's first hit learns the thread's id
//! (one `gettid`, cached), a thread's first hit once return probes exist maps its return
//! stack (one `mmap`) — [`prepare_thread`] does both ahead, in thread context — and a
//! hit whose handler asked for a removal wakes the collector thread (one `futex` wake).
//!
//! # Limits
//! * A probed instruction executed while SIGTRAP is blocked (e.g. inside a signal
//!   handler installed with a full mask) kills the process: the kernel forces the
//!   default action for a blocked synchronous trap. Install such handlers with
//!   `SIGTRAP` unblocked.
//! * Install your own SIGSEGV/SIGBUS/SIGFPE/SIGILL/SIGTRAP handlers *before* creating
//!   the first backend; ours chain to them. A handler installed later replaces ours.
//! * Code of the probe machinery (this crate, `multiprobe-core`, `multiprobe-x86`,
//!   libc's string functions, signal trampolines) is refused when symbols say so; a
//!   trap in our own trap path is stepped without running handlers in any case.
//! * A hit with a post-handler on a relocated instruction keeps a read section of the
//!   core open while the thread runs the slot (until its trailing `int3`). A thread that
//!   never gets there — a signal handler that `siglongjmp`s out of the slot — leaves it
//!   open, and `unregister` at that address then waits forever. (A thread that exits
//!   gives its state back.)
//! * `fork` with probes armed: the child inherits the breakpoints and slots and keeps
//!   working; the read sections of the parent's other threads (a thread between a pre
//!   and its post at the fork) are forgotten in the child. As with any mutex, a fork
//!   while another thread is inside a registration leaves the child's registry locked.
//!   The child has no collector thread until it creates a backend: its removals from
//!   inside handlers are finished by its registries' next operations.
//! * Dropping the last handle on a registry inside a handler (a guard that holds the
//!   only remaining `Registry` clone) drops the registry there, which locks and frees.
//! * Signals the program ignores stay ignored when another process sends them; a fault
//!   or trap the kernel forces (a foreign `int3`, a bad load) is not stopped by an
//!   ignored disposition, with probes as without.
#![warn(missing_docs)]

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("multiprobe-backend-sigtrap supports x86-64 Linux only");

mod backend;
mod collect;
mod context;
mod dispatchers;
mod entry;
mod fault;
mod known;
mod memory;
mod patch;
mod place;
mod promote;
mod returning;
mod ring;
mod signals;
mod site;
mod slots;
mod source;
mod symbols;
mod thread;
mod threads;
mod tramps;
mod trap;
mod unwind;

#[doc(hidden)]
pub use backend::jump_covering;
pub use backend::{Class, Mode, SigtrapBackend, Site, TrapReason};
pub use memory::LocalMemory;
pub use place::{fn_addr, resolve, FnPtr, ResolveError};
pub use ring::{HitRecord, HitRing};

/// How many traps in this process hit a probe at the moment it was being removed (or
/// re-armed) and were resolved by re-executing the instruction at the probed address —
/// the race every breakpoint removal has with threads already trapping on it.
pub fn reexecuted_traps() -> u64 {
    trap::REEXECUTED.load(std::sync::atomic::Ordering::Relaxed)
}

/// How many `int3` traps the calling thread has taken into the backend's SIGTRAP
/// handler so far: what a hit costs, in traps (a boosted or emulated hit takes one, a hit
/// with a post-handler on a relocated instruction two).
pub fn traps_on_this_thread() -> u64 {
    trap::traps_on_this_thread()
}

/// Whether a probe handler is running on the calling thread right now: for a panic hook
/// installed after the first backend, which replaces the backend's quiet one, to stay
/// silent too for the panics of handlers (caught and counted; printing them would lock
/// and allocate in a signal handler). Async-signal-safe.
pub fn in_handler() -> bool {
    thread::in_handler()
}

/// Do now, in thread context, what the calling thread's first hit would otherwise do in
/// the signal handler: learn its thread id (one `gettid` system call) and attach its
/// dispatch state to the thread-exit hook. Optional — both are async-signal-safe — for
/// a thread that must make no system call when it first hits a probe.
pub fn prepare_thread() {
    thread::tid();
    thread::with_state(|_| ());
}

/// A registry of probes in this process.
pub type SigtrapRegistry = multiprobe_core::Registry<SigtrapBackend>;

/// A new registry over a new [`SigtrapBackend`].
pub fn registry() -> SigtrapRegistry {
    multiprobe_core::Registry::new(SigtrapBackend::new())
}

/// This crate's README example, run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
