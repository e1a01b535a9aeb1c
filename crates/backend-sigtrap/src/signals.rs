//! Installing the backend's signal handlers and handing on what is not ours.
//!
//! Each handler is installed once per process with `SA_SIGINFO | SA_NODEFER` (an `int3`
//! or fault raised while its signal is blocked makes the kernel reset the action to the
//! default and kill the process, so our handlers must never block their own signal),
//! remembering the action it replaced. A signal that is not ours is passed to that
//! previous action as the kernel would have delivered it:
//! * a handler: called with the same `siginfo`/`ucontext`, under its own `sa_mask`;
//! * the default action: the default is restored and the signal queued again so that it
//!   takes effect when the thread resumes ([`default_action`]): the process ends the way
//!   it would have, and a core dump shows the interrupted registers;
//! * "ignore": dropped, as the kernel drops an ignored signal — unless the kernel would
//!   have *forced* it ([`forced`]: a fault or trap it raised itself, which an ignored or
//!   blocked disposition does not stop), which takes the default action as above.
//!
//! Invariant: `PREV[sig]` is written once, before our handler for `sig` is installed,
//! and only read afterwards (by that handler); the `Release`/`Acquire` on `ready` orders
//! the two.

use std::cell::UnsafeCell;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use libc::{c_int, c_void, sigaction, siginfo_t};

/// The signature of an `SA_SIGINFO` handler.
pub(crate) type SigAction = extern "C" fn(c_int, *mut siginfo_t, *mut c_void);

const NSIG: usize = 32;

struct Prev {
    ready: AtomicBool,
    act: UnsafeCell<Option<sigaction>>,
}

// SAFETY: `act` is written once by the installer before `ready` is released, then only
// read (module invariant).
unsafe impl Sync for Prev {}

static PREV: [Prev; NSIG] = [const {
    Prev {
        ready: AtomicBool::new(false),
        act: UnsafeCell::new(None),
    }
}; NSIG];

static INSTALL: Mutex<()> = Mutex::new(());

/// Install `handler` for `sig` unless this process already has it. `on_stack` asks for
/// the thread's alternate signal stack (needed to see stack-overflow faults).
pub(crate) fn install(sig: c_int, handler: SigAction, on_stack: bool) -> io::Result<()> {
    let slot = &PREV[sig as usize];
    if slot.ready.load(Ordering::Acquire) {
        return Ok(());
    }
    let _g = INSTALL.lock().unwrap_or_else(|p| p.into_inner());
    if slot.ready.load(Ordering::Acquire) {
        return Ok(());
    }
    // SAFETY: all-zero is a valid `sigaction` (empty mask, no flags) to be filled in.
    let mut new: sigaction = unsafe { std::mem::zeroed() };
    new.sa_sigaction = handler as usize;
    new.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER | libc::SA_RESTART;
    if on_stack {
        new.sa_flags |= libc::SA_ONSTACK;
    }
    // SAFETY: as above.
    let mut old: sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: `sa_mask` is a valid sigset to initialize.
    unsafe { libc::sigemptyset(&mut new.sa_mask) };
    // Record the previous action first (read it without changing anything), so our
    // handler never runs without knowing where to chain.
    // SAFETY: valid pointers; a null new action only queries.
    if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ready` is false, so no handler of ours reads `act` yet, and we hold
    // the install lock.
    unsafe { *slot.act.get() = Some(old) };
    slot.ready.store(true, Ordering::Release);
    // SAFETY: valid pointers. (A handler another thread installs between the query and
    // this call would be replaced without being chained: the record above is final,
    // because our handler may already be reading it. Installation happens once, when
    // the first backend is created; install yours before that.)
    if unsafe { libc::sigaction(sig, &new, std::ptr::null_mut()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Whether our handler for `sig` is installed.
pub(crate) fn installed(sig: c_int) -> bool {
    PREV[sig as usize].ready.load(Ordering::Acquire)
}

fn prev(sig: c_int) -> Option<&'static sigaction> {
    let slot = PREV.get(sig as usize)?;
    if !slot.ready.load(Ordering::Acquire) {
        return None;
    }
    // SAFETY: written before `ready` was released, never written again.
    unsafe { (*slot.act.get()).as_ref() }
}

/// What [`chain`] did with a signal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Chained {
    /// The program's handler ran (and may have changed the disposition since).
    Handler,
    /// The default action was restored and the signal queued again ([`default_action`]).
    Default,
    /// The program ignores it and the kernel would not have forced it: dropped.
    Ignored,
}

/// `si_code` of SIGBUS for a memory error found in the background (`BUS_MCEERR_AO`):
/// sent, not forced, unlike the other SIGBUS codes.
const BUS_MCEERR_AO: c_int = 5;
/// `si_code` of SIGTRAP for a perf event (`TRAP_PERF`): sent, not forced.
const TRAP_PERF: c_int = 6;

/// Whether the kernel forces `sig` with this `si_code` on the thread, overriding an
/// ignored (or blocked) disposition: the faults and traps it raises for the instruction
/// the thread is executing (`force_sig_fault` and friends, `si_code > 0`: SEGV_MAPERR,
/// TRAP_BRKPT, `SI_KERNEL` for `int3`, ...). A signal a process sent (`kill`, `tgkill`,
/// `sigqueue`: `si_code <= 0`) or the kernel merely sent (`BUS_MCEERR_AO`, `TRAP_PERF`)
/// is dropped when ignored.
pub(crate) fn forced(sig: c_int, code: c_int) -> bool {
    code > 0
        && !(sig == libc::SIGBUS && code == BUS_MCEERR_AO)
        && !(sig == libc::SIGTRAP && code == TRAP_PERF)
}

/// Deliver a signal that is not ours to the action our handler replaced, as the kernel
/// would have delivered it had ours not been installed (module docs).
///
/// # Safety
/// `info` and `ctx` are the arguments our `SA_SIGINFO` handler received for `sig`.
pub(crate) unsafe fn chain(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) -> Chained {
    let h = prev(sig).map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    if h == libc::SIG_IGN {
        // SAFETY: the kernel's siginfo for this signal (caller contract).
        let code = unsafe { (*info).si_code };
        if !forced(sig, code) {
            return Chained::Ignored;
        }
    }
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        // SAFETY: forwarded caller contract.
        unsafe { default_action(sig, info, ctx) };
        return Chained::Default;
    }
    let p = prev(sig).expect("checked above");
    // Run it under the mask the kernel would have set for it.
    // SAFETY: sigset manipulation on local values; `pthread_sigmask` is
    // async-signal-safe; `h` is the handler the program installed, of the kind its
    // flags say, called with the arguments the kernel gave us.
    unsafe {
        let mut mask = p.sa_mask;
        if p.sa_flags & libc::SA_NODEFER == 0 {
            libc::sigaddset(&mut mask, sig);
        }
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::pthread_sigmask(libc::SIG_BLOCK, &mask, &mut old);
        if p.sa_flags & libc::SA_SIGINFO != 0 {
            let f: SigAction = std::mem::transmute::<usize, SigAction>(h);
            f(sig, info, ctx);
        } else {
            let f: extern "C" fn(c_int) = std::mem::transmute::<usize, extern "C" fn(c_int)>(h);
            f(sig);
        }
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut());
    }
    Chained::Handler
}

/// Deliver a fault that happened out of line to the program, after the registers in
/// `ctx` were moved back to the original code: like [`chain`], and if the program's
/// handler reset the action to the default (as Rust's own SIGSEGV handler does for
/// faults that are not stack overflows) the default action then takes effect at the
/// original address instead of the instruction running (and being probed) again. A
/// signal `chain` already gave the default action is not queued a second time.
///
/// # Safety
/// As for [`chain`].
pub(crate) unsafe fn deliver(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    // SAFETY: forwarded caller contract.
    if unsafe { chain(sig, info, ctx) } != Chained::Handler {
        return;
    }
    // SAFETY: querying the current action into a local.
    let now = unsafe {
        let mut a: sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut a);
        a.sa_sigaction
    };
    if now == libc::SIG_DFL {
        // SAFETY: forwarded caller contract.
        unsafe { default_action(sig, info, ctx) };
    }
}

/// Let `sig` take its default effect as if no handler had ever been installed, at the
/// registers in `ctx`: the default action is restored, the signal is blocked for the
/// rest of this handler and queued again with the same `siginfo`, and unblocked in the
/// mask `sigreturn` restores. So it is delivered, under the default action, the moment
/// the thread resumes with `ctx`'s registers — a core dump shows them.
///
/// # Safety
/// `info` and `ctx` are the arguments our `SA_SIGINFO` handler received for `sig`.
pub(crate) unsafe fn default_action(sig: c_int, info: *mut siginfo_t, ctx: *mut c_void) {
    // SAFETY: async-signal-safe calls on valid local data; `info`/`ctx` per the contract.
    unsafe {
        let mut dfl: sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        let uc = &mut *ctx.cast::<libc::ucontext_t>();
        libc::sigdelset(&mut uc.uc_sigmask, sig);
        let (pid, tid) = (libc::getpid(), crate::thread::tid());
        let r = libc::syscall(libc::SYS_rt_tgsigqueueinfo, pid, tid, sig, info);
        if r != 0 {
            libc::syscall(libc::SYS_tgkill, pid, tid, sig);
        }
    }
}

/// Keeps `errno` of the interrupted code intact across a handler (the libc calls a
/// handler or the chaining makes may set it).
pub(crate) struct ErrnoGuard(c_int);

impl ErrnoGuard {
    pub(crate) fn save() -> Self {
        // SAFETY: `__errno_location` returns this thread's errno slot, always valid.
        ErrnoGuard(unsafe { *libc::__errno_location() })
    }
}

impl Drop for ErrnoGuard {
    fn drop(&mut self) {
        // SAFETY: as in `save`.
        unsafe { *libc::__errno_location() = self.0 };
    }
}
