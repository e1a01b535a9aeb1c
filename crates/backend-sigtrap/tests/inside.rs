//! What a handler may do from inside the SIGTRAP handler, and what the backend does for
//! it there: remove itself or unregister others without a lock or an allocation (even
//! when the interrupted code holds the registry's lock), the breakpoint going away in
//! thread context without the program calling the registry, panics that stay quiet,
//! and a first hit that makes no system call once the thread was prepared.
//!
//! `harness = false`: the panic-hook test must run before any backend exists, and a
//! scenario that deadlocks on failure runs in a child process (this binary again).

mod asm;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use asm::*;
use multiprobe_backend_sigtrap::{SigtrapBackend, Site};
use multiprobe_core::backend::{Backend, Dispatcher};
use multiprobe_core::{Error, FnHandler, HandlerId, Hit, PreAction, Registry};
use multiprobe_test_targets::alloc_count::{allocations, Counting};

/// Counts the allocations and frees of the threads inside `allocations`.
#[global_allocator]
static GLOBAL: Counting = Counting;

/// Poll `done` until it holds or 20 s pass.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "{what}: still not after 20 s");
        std::thread::sleep(Duration::from_millis(1));
    }
}

static HOOK_CALLS: AtomicU64 = AtomicU64::new(0);

/// First: the program's panic hook, installed before any backend, still sees the panics
/// of the program, but not those of handlers (caught and counted by the core; printing
/// them would lock and allocate inside the signal handler).
fn a_handlers_panic_reaches_no_panic_hook_but_the_programs_do() {
    std::panic::set_hook(Box::new(|info| {
        HOOK_CALLS.fetch_add(1, SeqCst);
        eprintln!("the program's panic hook: {info}");
    }));
    let reg = multiprobe_backend_sigtrap::registry();
    let g = reg
        .register(mp_t_imul as *const () as u64, |_h: &mut Hit<'_>| {
            assert!(multiprobe_backend_sigtrap::in_handler());
            panic!("a handler's bug");
        })
        .unwrap();
    for x in 0..3 {
        // SAFETY: integer in, integer out.
        assert_eq!(unsafe { mp_t_imul(x) }, 7 * x);
    }
    assert_eq!(g.unregister().unwrap().panics, 3);
    assert_eq!(
        HOOK_CALLS.load(SeqCst),
        0,
        "a handler's panic reached the hook"
    );
    assert!(!multiprobe_backend_sigtrap::in_handler());
    assert!(std::panic::catch_unwind(|| panic!("the program's own")).is_err());
    assert_eq!(
        HOOK_CALLS.load(SeqCst),
        1,
        "the program's panic missed its hook"
    );
    let _ = std::panic::take_hook();
}

fn unregister_from_a_handler_neither_allocates_nor_locks_and_the_thread_finishes_it() {
    static REG: OnceLock<multiprobe_backend_sigtrap::SigtrapRegistry> = OnceLock::new();
    static TARGET: AtomicU64 = AtomicU64::new(0);
    let reg = REG.get_or_init(multiprobe_backend_sigtrap::registry);
    let endbr = mp_t_endbr as *const () as u64;
    let before = bytes(endbr, 1);
    let target_calls = Arc::new(AtomicU64::new(0));
    let t = Arc::clone(&target_calls);
    let target = reg
        .register(endbr, move |_h: &mut Hit<'_>| {
            t.fetch_add(1, SeqCst);
        })
        .unwrap()
        .into_id();
    TARGET.store(target.0, SeqCst);
    let seen: Arc<Mutex<Option<(String, usize)>>> = Arc::default();
    let s = Arc::clone(&seen);
    let killer = reg
        .register(mp_t_imul as *const () as u64, move |_h: &mut Hit<'_>| {
            let id = HandlerId(TARGET.load(SeqCst));
            let (r, n) = allocations(|| REG.get().unwrap().unregister(id));
            let r = format!("{:?}", r.map(|_| ()));
            // (The test's own bookkeeping may allocate: outside the count.)
            s.lock().unwrap().get_or_insert((r, n));
        })
        .unwrap();
    // SAFETY: integer in, integer out.
    assert_eq!(unsafe { mp_t_imul(2) }, 14);
    let got = seen.lock().unwrap().take();
    assert_eq!(
        got,
        Some((
            format!("{:?}", Err::<(), _>(Error::InsideDispatch(target))),
            0
        )),
        "unregister from a handler: (answer, allocations and frees)"
    );
    // Hits that begin now do not run it ...
    // SAFETY: integer in, integer out.
    assert_eq!(unsafe { mp_t_endbr(1) }, 2);
    assert_eq!(target_calls.load(SeqCst), 0);
    // ... and the backend's thread finishes the removal: the breakpoint goes without
    // another call into the registry (stats only read).
    eventually("the unregistered handler's breakpoint removed", || {
        bytes(endbr, 1) == before
    });
    assert!(matches!(reg.stats(target), Err(Error::UnknownHandler(_))));
    killer.unregister().unwrap();
}

fn a_handler_that_removes_itself_stops_trapping_without_a_registry_call() {
    let reg = multiprobe_backend_sigtrap::registry();
    let push = mp_t_push as *const () as u64;
    let before = bytes(push, 1);
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    let id = reg
        .register_handler(
            push,
            FnHandler::new()
                .pre(move |_h: &mut Hit<'_>| {
                    c.fetch_add(1, SeqCst);
                    PreAction::Remove
                })
                .post(|_h: &mut Hit<'_>| panic!("no post for the hit that asked")),
        )
        .unwrap()
        .into_id();
    // SAFETY: integer in, integer out.
    assert_eq!(unsafe { mp_t_push(5) }, 7);
    eventually("the self-removed handler's breakpoint removed", || {
        bytes(push, 1) == before
    });
    let traps = multiprobe_backend_sigtrap::traps_on_this_thread();
    for x in 0..10 {
        // SAFETY: integer in, integer out.
        assert_eq!(unsafe { mp_t_push(x) }, x + 2);
    }
    assert_eq!(
        multiprobe_backend_sigtrap::traps_on_this_thread(),
        traps,
        "still trapping"
    );
    assert_eq!(calls.load(SeqCst), 1);
    assert!(matches!(reg.unregister(id), Err(Error::UnknownHandler(_))));
}

/// The first hit of a prepared thread makes no system call: on a thread whose `gettid`
/// is made to fail by a seccomp filter, it still reports the right thread id.
fn a_prepared_thread_first_hit_makes_no_system_call() {
    let reg = multiprobe_backend_sigtrap::registry();
    let tids = Arc::new(Mutex::new(Vec::new()));
    let t = Arc::clone(&tids);
    let g = reg
        .register(mp_t_alt as *const () as u64, move |h: &mut Hit<'_>| {
            t.lock().unwrap().push(h.tid());
        })
        .unwrap();
    let real = std::thread::spawn(|| {
        multiprobe_backend_sigtrap::prepare_thread();
        // SAFETY: no preconditions.
        let real = unsafe { libc::syscall(libc::SYS_gettid) } as u32;
        fail_gettid_on_this_thread();
        // SAFETY: no preconditions; must fail now.
        let after = unsafe { libc::syscall(libc::SYS_gettid) };
        assert_eq!(after, -1, "filter in place");
        // SAFETY: integer in, integer out.
        assert_eq!(unsafe { mp_t_alt(1) }, 101);
        real
    })
    .join()
    .unwrap();
    assert_eq!(*tids.lock().unwrap(), [real]);
    g.unregister().unwrap();
}

/// A seccomp filter on the calling thread only: `gettid` fails with EPERM.
fn fail_gettid_on_this_thread() {
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    let stmt = |code: u16, k: u32| libc::sock_filter {
        code,
        jt: 0,
        jf: 0,
        k,
    };
    let jeq = |k: u32, jt: u8, jf: u8| libc::sock_filter {
        code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
        jt,
        jf,
        k,
    };
    let ld = (libc::BPF_LD | libc::BPF_W | libc::BPF_ABS) as u16;
    let ret = (libc::BPF_RET | libc::BPF_K) as u16;
    let mut prog = [
        stmt(ld, 4), // arch
        jeq(AUDIT_ARCH_X86_64, 1, 0),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
        stmt(ld, 0), // nr
        jeq(libc::SYS_gettid as u32, 0, 1),
        stmt(ret, libc::SECCOMP_RET_ERRNO | libc::EPERM as u32),
        stmt(ret, libc::SECCOMP_RET_ALLOW),
    ];
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_mut_ptr(),
    };
    // SAFETY: a valid filter program for this thread; no-new-privs first, as required.
    unsafe {
        assert_eq!(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), 0);
        assert_eq!(
            libc::prctl(
                libc::PR_SET_SECCOMP,
                libc::SECCOMP_MODE_FILTER,
                &fprog as *const libc::sock_fprog
            ),
            0
        );
    }
}

/// A backend over the in-process one that, while the registry arms `mp_t_lea` (under
/// its writer lock), calls a probed function on the same thread: as a signal handler
/// interrupting the registry's own code would find the registry.
struct Reentrant(SigtrapBackend);

impl Backend for Reentrant {
    type Site = Site;
    fn attach(&self, d: Dispatcher<Site>) {
        self.0.attach(d)
    }
    fn dispatches_in_signal_handlers(&self) -> bool {
        self.0.dispatches_in_signal_handlers()
    }
    fn prepare(&self, addr: u64) -> multiprobe_core::Result<Site> {
        self.0.prepare(addr)
    }
    fn arm(&self, addr: u64, site: &Site) -> multiprobe_core::Result<()> {
        if addr == mp_t_lea as *const () as u64 {
            // SAFETY: integer in, integer out (probed: it traps, here).
            assert_eq!(unsafe { mp_t_riprel(1) }, 6);
        }
        self.0.arm(addr, site)
    }
    fn disarm(&self, addr: u64, site: &Site) -> multiprobe_core::Result<()> {
        self.0.disarm(addr, site)
    }
}

static REENTRANT: OnceLock<Registry<Reentrant>> = OnceLock::new();

/// Child: a handler unregisters another while its thread holds the registry's lock.
fn child_unregister_under_the_registrys_lock() {
    let reg = REENTRANT.get_or_init(|| Registry::new(Reentrant(SigtrapBackend::new())));
    let other = reg
        .register(mp_t_endbr as *const () as u64, |_h: &mut Hit<'_>| {})
        .unwrap()
        .into_id();
    let answer = Arc::new(Mutex::new(String::new()));
    let a = Arc::clone(&answer);
    let _g = reg
        .register(mp_t_riprel as *const () as u64, move |_h: &mut Hit<'_>| {
            let r = REENTRANT.get().unwrap().unregister(other);
            *a.lock().unwrap() = format!("{:?}", r.map(|_| ()));
        })
        .unwrap();
    let _armed = reg
        .register(mp_t_lea as *const () as u64, |_h: &mut Hit<'_>| {})
        .unwrap();
    println!("answer={}", answer.lock().unwrap());
}

fn a_handler_unregistering_while_its_thread_holds_the_registrys_lock_does_not_deadlock() {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .env("MP_SCENARIO", "unregister_under_lock")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("the handler's unregister waited for the lock its own thread holds");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut out = String::new();
    std::io::Read::read_to_string(&mut child.stdout.take().unwrap(), &mut out).unwrap();
    assert!(status.success(), "{status:?}: {out}");
    assert!(out.contains("answer=Err(InsideDispatch("), "{out}");
}

fn main() {
    if std::env::var("MP_SCENARIO").as_deref() == Ok("unregister_under_lock") {
        return child_unregister_under_the_registrys_lock();
    }
    let tests: [(&str, fn()); 5] = [
        // First: before any backend exists.
        (
            "a_handlers_panic_reaches_no_panic_hook_but_the_programs_do",
            a_handlers_panic_reaches_no_panic_hook_but_the_programs_do,
        ),
        (
            "unregister_from_a_handler_neither_allocates_nor_locks_and_the_thread_finishes_it",
            unregister_from_a_handler_neither_allocates_nor_locks_and_the_thread_finishes_it,
        ),
        (
            "a_handler_that_removes_itself_stops_trapping_without_a_registry_call",
            a_handler_that_removes_itself_stops_trapping_without_a_registry_call,
        ),
        (
            "a_prepared_thread_first_hit_makes_no_system_call",
            a_prepared_thread_first_hit_makes_no_system_call,
        ),
        (
            "a_handler_unregistering_while_its_thread_holds_the_registrys_lock_does_not_deadlock",
            a_handler_unregistering_while_its_thread_holds_the_registrys_lock_does_not_deadlock,
        ),
    ];
    for (name, t) in tests {
        t();
        println!("test {name} ... ok");
    }
    println!("\n{} passed, 0 failed", tests.len());
}
