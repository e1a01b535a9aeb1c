//! Per-thread state the signal path needs: the core's [`ThreadState`] and the thread id.
//!
//! Both live in `thread_local!`s with `const` initializers and *no* destructor, so the
//! first access — which may well happen inside the SIGTRAP handler — is a plain read of
//! static TLS: Rust registers a TLS destructor lazily on first access for types that
//! need drop, and that registration allocates, which a signal handler must not do.
//!
//! The `ThreadState` still has to be dropped when its thread exits (it gives back the
//! thread's counter shard and ends any deferred step, which would otherwise hold a grace
//! period open forever). That is done by a pthread key created once, in thread context,
//! when the backend is set up; its destructor runs at thread exit. The signal path
//! attaches the key to a thread on its first hit with `pthread_setspecific`, which for
//! the first 32 keys stores into the thread descriptor without allocating (glibc's
//! `specific_1stblock`, musl's `tsd` array); a key number beyond that is not used.
//!
//! Return probes: once the process has a return trampoline ([`set_return_trampoline`]),
//! a thread's first hit gives its state a return stack of
//! [`multiprobe_core::backend::DEFAULT_RETURN_WORDS`] words, mapped anonymous memory
//! (one `mmap`, async-signal-safe; its pages become resident as calls nest), unmapped
//! by the exit hook after the state is dropped. If the mapping fails, that thread's
//! returns are counted lost.
//!
//! After `fork` the child's only thread inherits the forking thread's TLS; its cached
//! thread id is reset by an `atfork` child handler.

use std::cell::{Cell, UnsafeCell};
use std::mem::ManuallyDrop;
use std::sync::Once;

use multiprobe_core::backend::ThreadState;

std::thread_local! {
    static STATE: UnsafeCell<ManuallyDrop<ThreadState>> =
        const { UnsafeCell::new(ManuallyDrop::new(ThreadState::new())) };
    static REGISTERED: Cell<bool> = const { Cell::new(false) };
    static TID: Cell<u32> = const { Cell::new(0) };
    /// Depth of our own machinery (the trampoline entry) on this thread.
    static MACHINERY: Cell<u32> = const { Cell::new(0) };
    /// `site::PUBLISHED` as the oldest trap handler running on this thread read it
    /// when it started (0: none runs).
    static OLDEST_TRAP: Cell<u64> = const { Cell::new(0) };
    /// The return stack lent to `STATE` (0: none).
    static RETURN_MEM: Cell<usize> = const { Cell::new(0) };
}

/// The return trampoline's entry, once return probes are in use (0: not yet).
static RETURN_ENTRY: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Bytes of a thread's return stack.
const RETURN_BYTES: usize = multiprobe_core::backend::DEFAULT_RETURN_WORDS * 8;

/// From now on, threads' return slots go to `entry` (the return trampoline).
pub(crate) fn set_return_trampoline(entry: u64) {
    RETURN_ENTRY.store(entry, std::sync::atomic::Ordering::Release);
}

/// Give `ts` its return stack and the trampoline (module docs). Async-signal-safe.
#[cold]
fn provide_returns(ts: &ThreadState, entry: u64) {
    if !ts.has_return_stack() {
        // SAFETY: a fresh private anonymous mapping; no memory of ours is touched.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                RETURN_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            // No retry: this thread's returns are lost (module docs).
        } else {
            // SAFETY: the mapping is ours alone, aligned and `RETURN_BYTES` long; it is
            // unmapped only after the state is dropped (`on_thread_exit`).
            let lent = unsafe { ts.lend_returns(p.cast(), RETURN_BYTES / 8) };
            if lent {
                RETURN_MEM.with(|m| m.set(p as usize));
            } else {
                // SAFETY: unmapping the mapping just made, unused.
                unsafe { libc::munmap(p, RETURN_BYTES) };
            }
        }
    }
    ts.set_return_trampoline(entry);
}

/// A trap handler starts on this thread having read `published`; returns what to give
/// [`trap_done`]. Async-signal-safe.
pub(crate) fn trap_started(published: u64) -> u64 {
    OLDEST_TRAP.with(|o| {
        let prev = o.get();
        if prev == 0 {
            o.set(published);
        }
        prev
    })
}

/// The trap handler that [`trap_started`] returned `prev` for ends.
pub(crate) fn trap_done(prev: u64) {
    OLDEST_TRAP.with(|o| o.set(prev));
}

/// What the oldest trap handler running on this thread read (0: none runs).
pub(crate) fn oldest_trap() -> u64 {
    OLDEST_TRAP.with(Cell::get)
}

/// This thread is inside the backend's machinery (a trampoline entry); a probe hit there
/// must run no handlers. Async-signal-safe.
#[derive(Debug)]
pub(crate) struct Machinery(());

impl Machinery {
    /// Enter, unless this thread is inside already (then `None`: a nested hit).
    #[inline(always)]
    pub(crate) fn enter() -> Option<Machinery> {
        MACHINERY.with(|m| {
            (m.get() == 0).then(|| {
                m.set(1);
                Machinery(())
            })
        })
    }

    /// Whether this thread is inside.
    pub(crate) fn inside() -> bool {
        MACHINERY.with(|m| m.get() > 0)
    }
}

impl Drop for Machinery {
    #[inline(always)]
    fn drop(&mut self) {
        MACHINERY.with(|m| m.set(0));
    }
}

static SETUP: Once = Once::new();
/// The pthread key whose destructor drops a thread's state; `u32::MAX` if unavailable.
static KEY: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(u32::MAX);

/// Create the exit hook and the fork hook. Thread context; idempotent.
pub(crate) fn setup() {
    SETUP.call_once(|| {
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: valid out-pointer and an `extern "C"` destructor.
        let r = unsafe { libc::pthread_key_create(&mut key, Some(on_thread_exit)) };
        // Only low keys are stored without allocation (module docs).
        if r == 0 && key < 32 {
            KEY.store(key, std::sync::atomic::Ordering::Release);
        }
        // SAFETY: registering a plain function as the child hook.
        unsafe { libc::pthread_atfork(None, None, Some(after_fork_child)) };
    });
}

extern "C" fn on_thread_exit(_value: *mut libc::c_void) {
    // Static TLS is still in place while pthread key destructors run. Drop the state
    // (ends deferred steps, gives back the shard) and put a fresh one in its place, in
    // case a later destructor of this thread hits a probe; that one re-attaches the key,
    // and glibc runs key destructors again for keys set during destruction.
    // SAFETY: blocking every signal (and restoring the mask) around the swap, with
    // valid local sigsets, so no handler can look at a half-replaced state.
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    };
    let _ = STATE.try_with(|s| {
        // SAFETY: thread context with signals blocked, not inside a dispatch (this is
        // the thread's exit path), so no reference into the state is live; the old
        // value is dropped exactly once and replaced.
        unsafe {
            ManuallyDrop::drop(&mut *s.get());
            s.get().write(ManuallyDrop::new(ThreadState::new()));
        }
    });
    // The dropped state's return stack (the fresh one has none yet).
    let mem = RETURN_MEM.try_with(|m| m.replace(0)).unwrap_or(0);
    if mem != 0 {
        // SAFETY: the mapping `provide_returns` lent to the state just dropped; nothing
        // refers to it any more.
        unsafe { libc::munmap(mem as *mut libc::c_void, RETURN_BYTES) };
    }
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    let _ = REGISTERED.try_with(|r| r.set(false));
}

extern "C" fn after_fork_child() {
    TID.with(|t| t.set(0));
    // The parent's other threads do not exist here: forget their read sections, or a
    // thread that was between a pre and its post at the fork would hold every grace
    // period of the child open forever. (Refused, harmlessly, if this thread forked from
    // inside a handler.)
    for d in crate::dispatchers::each() {
        d.reset_after_fork();
    }
}

/// Run `f` with this thread's dispatch state. Async-signal-safe.
#[inline(always)]
pub(crate) fn with_state<R>(f: impl FnOnce(&ThreadState) -> R) -> R {
    if !REGISTERED.with(Cell::get) {
        register();
    }
    // Only the address is taken inside the thread-local's closure, so `f`, however
    // large, is not compiled into an out-of-line `LocalKey::with` (which then reaches
    // the thread-local through a function pointer).
    let state: *const ThreadState = STATE.with(|s| {
        // SAFETY: a shared look at this thread's state (see below).
        unsafe { &**s.get() as *const ThreadState }
    });
    // SAFETY: this thread's state lives in its static TLS until the thread is gone; it
    // is only replaced by `on_thread_exit`, in thread context at thread exit, never
    // while a `with_state` call is running on this thread; and the reference does not
    // leave this call.
    let ts = unsafe { &*state };
    // Once return probes exist, each thread's state gets its return stack and the
    // trampoline's address before its first dispatch.
    let entry = RETURN_ENTRY.load(std::sync::atomic::Ordering::Acquire);
    if entry != 0 && ts.return_trampoline() != entry {
        provide_returns(ts, entry);
    }
    f(ts)
}

/// Attach this thread to the exit hook (its first hit).
#[cold]
#[inline(never)]
fn register() {
    REGISTERED.with(|r| r.set(true));
    let key = KEY.load(std::sync::atomic::Ordering::Acquire);
    if key != u32::MAX {
        // SAFETY: a key created by `setup`; a non-null value makes its destructor run
        // at thread exit. Allocation-free for low keys.
        unsafe { libc::pthread_setspecific(key, std::ptr::dangling::<libc::c_void>()) };
    }
}

/// Whether a handler is running on this thread (the core's `ThreadState::in_handler`),
/// without attaching the state to the exit hook as `with_state` does. Async-signal-safe.
pub(crate) fn in_handler() -> bool {
    // SAFETY: as in `with_state`: a shared look at the state, replaced only at thread
    // exit, never while this runs.
    STATE.with(|s| unsafe { &*s.get() }.in_handler())
}

/// This thread's kernel id, cached. Async-signal-safe.
#[inline]
pub(crate) fn tid() -> u32 {
    TID.with(|t| {
        let v = t.get();
        if v != 0 {
            return v;
        }
        // SAFETY: gettid has no preconditions.
        let v = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        t.set(v);
        v
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tid_is_the_kernel_thread_id_per_thread() {
        setup();
        // SAFETY: no preconditions.
        let real = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        assert_eq!(tid(), real);
        let other = std::thread::spawn(tid).join().unwrap();
        assert_ne!(other, real);
        assert_eq!(with_state(|s| s.pending()), 0);
    }
}
