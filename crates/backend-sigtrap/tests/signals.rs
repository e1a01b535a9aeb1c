//! Dispatches nested on one thread by asynchronous signals: an interval timer's SIGALRM
//! and SIGUSR1 sent to chosen threads with `pthread_kill` land while those threads hit
//! probes — at any instruction of a hit: inside the backend's SIGTRAP handler, inside a
//! handler, in an out-of-line slot between a pre and its post — and the signals' own
//! handlers call the probed functions too. Every call must be accounted for exactly, and
//! every read section must end (or unregistering would wait for ever).
//!
//! Its own test binary, `harness = false`: it installs process-wide signal handlers and
//! a timer, and its counts are exact only if every thread but the workers blocks those
//! signals (a test harness's own threads would not).

mod asm;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;
use std::time::{Duration, Instant};

use asm::*;
use multiprobe_core::{FnHandler, Hit, PreAction};

/// Calls of the probed functions made by the signal handlers.
static SIG_IMUL: AtomicU64 = AtomicU64::new(0);
static SIG_ENDBR: AtomicU64 = AtomicU64::new(0);
/// Wrong results seen by the signal handlers.
static SIG_WRONG: AtomicU64 = AtomicU64::new(0);

extern "C" fn on_signal(_sig: libc::c_int) {
    // SAFETY: integer in, integer out; both are probed, so each call traps inside this
    // signal handler, nested in whatever the thread was doing.
    let (a, b) = unsafe { (mp_t_imul(6), mp_t_endbr(41)) };
    SIG_IMUL.fetch_add(1, Relaxed);
    SIG_ENDBR.fetch_add(1, Relaxed);
    if (a, b) != (42, 42) {
        SIG_WRONG.fetch_add(1, Relaxed);
    }
}

fn set_mask(how: libc::c_int, sigs: &[libc::c_int]) {
    // SAFETY: building a local sigset and changing this thread's mask.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for &s in sigs {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(how, &set, std::ptr::null_mut());
    }
}

fn interval_timer(every: Duration) {
    let tv = libc::timeval {
        tv_sec: 0,
        tv_usec: every.as_micros() as libc::suseconds_t,
    };
    let it = libc::itimerval {
        it_interval: tv,
        it_value: tv,
    };
    // SAFETY: a valid itimerval; ITIMER_REAL raises SIGALRM, which has a handler.
    let r = unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) };
    assert_eq!(r, 0);
}

/// A few hundred nanoseconds of work, so signals often land inside a handler.
fn linger() {
    for _ in 0..64 {
        std::hint::spin_loop();
    }
}

fn main() {
    asynchronous_signals_nest_dispatches_on_the_same_thread_with_exact_counts();
    println!(
        "test asynchronous_signals_nest_dispatches_on_the_same_thread_with_exact_counts ... ok"
    );
}

fn asynchronous_signals_nest_dispatches_on_the_same_thread_with_exact_counts() {
    const WORKERS: usize = 3;
    const CALLS: u64 = 20_000;
    let signals = [libc::SIGALRM, libc::SIGUSR1];
    // Only the workers take the signals (the timer's SIGALRM goes to one of them): this
    // thread blocks them before any other exists, so every thread it starts does too
    // until it unblocks them (the backend's collector thread blocks them anyway).
    set_mask(libc::SIG_BLOCK, &signals);
    // SAFETY: a plain handler, SIGTRAP not in its mask (the backend's Limits).
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_signal as *const () as usize;
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        for s in signals {
            assert_eq!(libc::sigaction(s, &sa, std::ptr::null_mut()), 0);
        }
    }
    let reg = multiprobe_backend_sigtrap::registry();
    let (pre, post, pre2) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let (p, q, p2) = (Arc::clone(&pre), Arc::clone(&post), Arc::clone(&pre2));
    // `imul` is relocated: with a post-handler, each hit takes two traps with a deferred
    // step in between, while the thread runs the slot.
    let imul = reg
        .register_handler(
            mp_t_imul as *const () as u64,
            FnHandler::new()
                .pre(move |_h: &mut Hit<'_>| {
                    p.fetch_add(1, Relaxed);
                    linger();
                    PreAction::Continue
                })
                .post(move |_h: &mut Hit<'_>| {
                    q.fetch_add(1, Relaxed);
                }),
        )
        .unwrap();
    // `endbr64` is emulated: one trap per hit.
    let endbr = reg
        .register(mp_t_endbr as *const () as u64, move |_h: &mut Hit<'_>| {
            p2.fetch_add(1, Relaxed);
            linger();
        })
        .unwrap();

    let done = Arc::new(AtomicU64::new(0));
    let quiet = Arc::new(AtomicBool::new(false));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let (done, quiet, tid_tx) = (Arc::clone(&done), Arc::clone(&quiet), tid_tx.clone());
            std::thread::spawn(move || {
                // SAFETY: no preconditions.
                tid_tx.send(unsafe { libc::pthread_self() }).unwrap();
                set_mask(libc::SIG_UNBLOCK, &signals);
                let mut wrong = 0u64;
                for i in 0..CALLS {
                    let x = i ^ w as u64;
                    // SAFETY: integer in, integer out.
                    let (a, b) = unsafe { (mp_t_imul(x), mp_t_endbr(x)) };
                    wrong += u64::from(a != x.wrapping_mul(7) || b != x + 1);
                }
                done.fetch_add(1, SeqCst);
                // Stay (and keep taking signals) until nobody sends any more: a thread
                // must not exit while `pthread_kill` may still name it.
                while !quiet.load(SeqCst) {
                    std::thread::sleep(Duration::from_micros(100));
                }
                set_mask(libc::SIG_BLOCK, &signals);
                wrong
            })
        })
        .collect();
    let tids: Vec<libc::pthread_t> = (0..WORKERS).map(|_| tid_rx.recv().unwrap()).collect();
    interval_timer(Duration::from_micros(100));
    let kicks = std::thread::spawn({
        let done = Arc::clone(&done);
        move || {
            let mut sent = 0u64;
            while done.load(SeqCst) < WORKERS as u64 {
                for &t in &tids {
                    // SAFETY: the workers are alive until `quiet` is set, after this
                    // thread has stopped.
                    unsafe { libc::pthread_kill(t, libc::SIGUSR1) };
                    sent += 1;
                }
                std::thread::sleep(Duration::from_micros(10));
            }
            sent
        }
    });
    let sent = kicks.join().unwrap();
    interval_timer(Duration::ZERO);
    quiet.store(true, SeqCst);
    let wrong: u64 = workers.into_iter().map(|h| h.join().unwrap()).sum();
    // Every signal delivered has been handled by now (the workers block them before they
    // exit, this thread blocks them still): the counts are final.

    assert_eq!(wrong, 0, "a probed function returned a wrong result");
    assert_eq!(
        SIG_WRONG.load(Relaxed),
        0,
        "wrong result in a signal handler"
    );
    let in_signals = SIG_IMUL.load(Relaxed);
    assert!(
        in_signals > 100,
        "only {in_signals} signal handlers ran ({sent} SIGUSR1 sent)"
    );
    let calls_imul = WORKERS as u64 * CALLS + in_signals;
    let calls_endbr = WORKERS as u64 * CALLS + SIG_ENDBR.load(Relaxed);
    let (si, se) = (imul.stats().unwrap(), endbr.stats().unwrap());
    // Each call traps once at the probe: a hit (its pre ran) or, nested in a handler, a
    // miss. A hit's post runs unless the thread had no room left to defer it (a miss).
    assert_eq!(pre.load(Relaxed), si.hits, "imul: a pre per hit");
    assert_eq!(
        post.load(Relaxed) + si.missed,
        calls_imul,
        "imul: every call is a post or a miss ({si:?}, {} posts, {calls_imul} calls)",
        post.load(Relaxed)
    );
    assert!(post.load(Relaxed) <= si.hits);
    assert_eq!(pre2.load(Relaxed), se.hits, "endbr: a pre per hit");
    assert_eq!(se.hits + se.missed, calls_endbr, "endbr: {se:?}");
    assert!(
        si.missed + se.missed > 0,
        "no signal landed inside a handler: the nesting was not exercised"
    );
    assert_eq!(si.panics + se.panics, 0);
    eprintln!(
        "{calls_imul} + {calls_endbr} calls, {in_signals} from signal handlers, {} missed",
        si.missed + se.missed
    );

    // No read section was left behind: unregistering returns.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = (imul.unregister(), endbr.unregister());
        tx.send(r.0.is_ok() && r.1.is_ok()).unwrap();
        drop(reg);
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    match rx.recv_timeout(deadline - Instant::now()) {
        Ok(ok) => assert!(ok),
        Err(_) => panic!("unregister waited for a read section no thread holds"),
    }
}
