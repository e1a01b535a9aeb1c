//! multiprobe's backend for another process: many handlers on one address of a traced
//! program, one real `int3` underneath, and **one ptrace stop per hit**.
//!
//! ```
//! use std::process::{Command, Stdio};
//! use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
//! use std::sync::Arc;
//!
//! use multiprobe_backend_ptrace::{ExitStatus, Stop, Tracer};
//!
//! // A program that calls libc's `write` (the shell's `echo`), spawned traced.
//! let mut cmd = Command::new("/bin/sh");
//! cmd.args(["-c", "echo hello"]).stdout(Stdio::null());
//! let mut tracer = Tracer::spawn(&mut cmd)?;
//! tracer.run_to_entry()?; // the dynamic loader has mapped libc: `libc:` names resolve
//! let write = tracer.resolve("libc:write")?;
//!
//! let to_stdout = Arc::new(AtomicU64::new(0));
//! let n = Arc::clone(&to_stdout);
//! let probe = tracer.registry().register(write, move |hit| {
//!     // Handlers run in the tracer, with the tracee's registers and memory.
//!     if hit.arg(0) == Ok(1) {
//!         n.fetch_add(1, Relaxed);
//!     }
//! })?;
//! let stop = tracer.run()?; // until it exits, execs, or a DetachHandle asks
//! assert_eq!(stop, Stop::Exited(ExitStatus::Code(0)));
//! assert!(to_stdout.load(Relaxed) >= 1);
//! assert!(probe.stats()?.hits >= to_stdout.load(Relaxed));
//! # Ok::<(), multiprobe_core::Error>(())
//! ```
//!
//! # How a hit works
//!
//! Arming writes `int3` over the instruction's first byte (through `/proc/PID/mem`,
//! from any thread). At the first hit of a site the tracer maps an out-of-line (XOL)
//! page near the code with an `mmap` system call it makes the stopped thread execute,
//! and writes the site's two slots there (built by `multiprobe-x86`): the relocated
//! instruction followed by a jump back, and the same followed by `int3`. A hit is then
//! one stop: the pre-handlers run in the tracer with the thread's registers (changes
//! are written back) and memory (`process_vm_readv`/`writev`), then the instruction is
//! emulated or the thread resumes in the jump-back slot. Only when post-handlers want
//! to run after an instruction that is not emulated does the thread take the
//! trap-after slot, a second stop.
//!
//! # What a hit costs
//!
//! Each ptrace request costs a good fraction of the stop itself (on a VM, 0.3–0.9 µs
//! against ~4 µs), so a hit makes as few as it can. Registers are fetched
//! (`PTRACE_GETREGS`) only when a handler asks for them ([`multiprobe_core::Hit::regs`],
//! `regs_mut`, `arg`) or the emulation of the instruction needs them (`push`, `call`,
//! `ret`, jumps, ...); a handler that only counts costs none. Per hit, besides the stop
//! and the final `PTRACE_CONT`:
//!
//! * `PTRACE_PEEKUSER` of `rip`, to know which probe the thread stopped at — or, when
//!   the thread's previous hit needed the registers (a guess that its handlers will
//!   again), `PTRACE_GETREGS` right away, which tells `rip` too: handlers that read
//!   registers then cost one request, not two, and a wrong guess costs what reading
//!   them would have;
//! * an emulated one-byte instruction (`nop`): also `PTRACE_GETSIGINFO` (see Limits),
//!   and nothing to write back: the kernel's `rip` is already past it;
//! * a relocated instruction (jump-back slot) or a longer `nop`/`endbr64`:
//!   `PTRACE_POKEUSER` of `rip`;
//! * registers fetched: one `PTRACE_GETREGS` per hit however many handlers read them,
//!   and writing back only the fields that changed (one `PTRACE_POKEUSER` each, or one
//!   `PTRACE_SETREGS` for more than two).
//!
//! If the thread is killed while its handlers run, a fetch fails: the handlers then see
//! zeros in every register but `rip` (the thread never runs again).
//!
//! # Return probes
//!
//! A handler with a return hook ([`multiprobe_core::Handler::ret`]) on a function's
//! first instruction sees the call return: at the entry hit the return address on the
//! tracee's stack is swapped for a trampoline (an `int3` in the XOL page), and the
//! stop there runs the return hooks with the return value in `rax`/`rdx` and resumes at
//! the real return address. Calls left by `longjmp` or an exception are counted lost.
//! Unwinders get through (a C++ exception is caught as unprobed, `backtrace(3)` sees
//! every frame): the unwinders' entry points are probed to put the real return addresses
//! back while they walk. Detach, and a fork child freed of probes, put them back too.
//! Costs one more stop per call (see `returns.rs` for the details and limits).
//!
//! # Collecting in the tracee, without a stop
//!
//! A handler that is a [`collect::Collect`] value (`count`, `args:N`, `regs`,
//! `mem:ARG:LEN`) instead of a closure needs no stop: at a site where every enabled
//! handler is one (and none has a return hook), the tracer replaces the instructions
//! there by a jump to generated code in an out-of-line page, which counts and writes
//! records into memory shared with the tracer, then runs the relocated instructions
//! and jumps back. Promotion happens on the tracer thread between events, with every
//! thread of the process stopped; a site that cannot be promoted (a region the checks
//! refuse, no area in a process under seccomp, a closure beside the collectors) stays a
//! one-stop site whose collectors run in the tracer with the same results, and
//! [`Tracer::collect_path`] says which path a site took and why. Records are read
//! with [`collect::Collection::drain`] from any thread (the tracer drains at exit,
//! exec and detach: nothing written is lost). See [`collect`] for the API, the
//! threads that may call it, and the limits.
//!
//! # Processes, threads, signals
//!
//! A spawned program dies with the tracer if the tracer is killed outright
//! (`PTRACE_O_EXITKILL`); an attached one is left alone. Only x86-64 programs are
//! traced: a 32-bit (i386 or x32) program is refused at spawn, at attach and after an
//! exec, before anything is written to it. Symbols are read from the file that is
//! really mapped (`/proc/PID/map_files`, checked by device and inode), so a program in
//! a container or another mount namespace gets its own symbols.
//!
//! New threads are traced automatically. A fork child is freed of every breakpoint, of
//! the XOL pages it has (read from its own maps: a child forked while the page was
//! being mapped has none) and of the USDT semaphores raised for it, and let go — or,
//! with [`Tracer::follow_forks`], cleaned the same way and followed: it becomes a
//! process of its own in the tracer's family, held at its first stop until its user
//! registered its probes in its own registry ([`Stop::Forked`],
//! [`Tracer::registry_of`]). A vfork child, which shares the memory, is followed until
//! it execs or exits (followed, it is a process of its own from its exec). An exec ends every probe of the old image ([`Stop::Exec`]). The
//! tracee's own signals are delivered unchanged, its own SIGTRAP too (ours come from an
//! `int3` at one of our addresses); group-stop is honoured with `PTRACE_LISTEN`. A
//! displaced instruction that faults in its slot is delivered to the program with `rip`
//! at the probed address, after the fault handlers.
//!
//! # Detach
//!
//! [`Tracer::detach`], dropping the tracer, or [`DetachHandle::request`] (from any
//! thread or a signal handler, e.g. Ctrl-C) removes every breakpoint, moves threads out
//! of slots, unmaps the XOL pages and lets the process run on, its code byte-identical
//! to before.
//!
//! # Threads of the tracer
//!
//! ptrace takes requests only from the thread that attached: a [`Tracer`] stays on the
//! thread that created it (it is neither `Send` nor `Sync`), handlers run there, and a
//! thread has one tracer at a time. Its loop waits for every tracee and child of that
//! thread, so do not start other processes from it. The registry is `Send + Sync`:
//! registering, enabling and unregistering work from any thread (arming writes through
//! `/proc/PID/mem`, which needs no ptrace request). On the tracer thread itself, call
//! [`Tracer::settle`] before unregistering while threads may wait for post-handlers.
//!
//! # The program never pays
//!
//! * Injected system calls (the `mmap` of an XOL page, `munmap` at detach and in fork
//!   children) execute a `syscall` instruction of the program's own memory, checked
//!   before each use; they are never made in a thread under seccomp (a filter could
//!   kill the program for it: its hits then take the classic two-stop path, which needs
//!   none), give up on a fault at the injected instruction, and never loop.
//! * A program that unmaps an XOL page never sees the fault: the page is mapped again
//!   at the same address with the same bytes, or its sites step in place from then on.
//! * A trap of ours resets a blocked or ignored SIGTRAP, and the handler of a thread
//!   that blocks it (the kernel's rule for forced signals); the tracer puts the
//!   program's mask and action back before the thread runs on — a handler's address is
//!   read beforehand (when a thread that blocks SIGTRAP is first seen in a process
//!   that catches it; at attach the process is stopped briefly for it), and a hit
//!   inside the program's own SIGTRAP handler is caught too. A program that neither
//!   blocks nor ignores SIGTRAP pays no request for this; one that blocks it, two per
//!   hit of such a thread (see Limits for what the tracer cannot know).
//! * The doorbell child (see [`DetachHandle`]) is out of the terminal's reach and
//!   ignores stray signals; if it is killed anyway, a new one is started.
//!
//! # Limits
//!
//! * What the program set for SIGTRAP is read at the start of each run, at execs, for
//!   each new thread before it runs, and (its action, in a process that catches it) at
//!   each of its own SIGTRAPs; a program that changes its SIGTRAP mask or action in
//!   between is not seen until then — a hit meanwhile puts back what was known, and a
//!   handler installed after the last reading and reset by a hit before the next one
//!   is lost. A handler of another signal that blocks SIGTRAP while it runs is not
//!   known to. In a thread under seccomp the mask is put back but not the action.
//! * Under seccomp every hit at a relocated instruction takes two stops, during which
//!   other threads may pass the site unprobed.
//! * A signal that arrives while a thread is being used for an injected system call (or
//!   a fallback single-step) is delivered afterwards with a synthetic `siginfo`.
//! * An asynchronous signal that catches a thread entering a slot is held back until the
//!   displaced instruction has run, then delivered with its exact `siginfo` and `rip`
//!   back in the original code. Two cases are delivered inside the slot instead (the
//!   handler then sees the slot's address in its `ucontext`, and returns into the slot):
//!   a second signal while one is held, and any signal at a relocated `syscall`, which
//!   may block and must stay interruptible. If the tracer detaches while such a handler
//!   runs, the XOL pages stay mapped and the slot is made to work without the tracer.
//! * Where no XOL page can be mapped within reach, hits fall back to the classic
//!   two-stop scheme, during which other threads may pass the site unprobed.
//! * A hit at a one-byte instruction costs one more request (`PTRACE_GETSIGINFO`): a
//!   thread standing right after such an instruction could also be stopped by a
//!   SIGTRAP sent to it, which must reach the program.
//! * After an exec, every probe of the old image is unregistered ([`Stop::Exec`]);
//!   probes are not carried over to the new program.
//! * A followed fork child's probes are registered anew in it (its copy of the parent's
//!   breakpoints is taken out first): each fork costs the child a write per site, twice.

#![warn(missing_docs)]

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("multiprobe-backend-ptrace supports x86-64 Linux only");

mod backend;
#[doc(hidden)]
pub mod baseline;
mod children;
pub mod collect;
mod detach;
mod diagnose;
mod doorbell;
mod error;
mod family;
mod hit;
mod inject;
mod launch;
mod mem;
mod refctr;
mod regs;
mod returns;
mod signals;
mod sigtrap;
mod sys;
mod thread;
mod tracer;
mod xol;

pub use backend::{PtraceBackend, Site};
pub use doorbell::DetachHandle;
pub use mem::TraceeMemory;
pub use sys::Signal;
pub use tracer::{ExitStatus, ResolveError, Stop, Tracer};

/// This crate's README example, run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
