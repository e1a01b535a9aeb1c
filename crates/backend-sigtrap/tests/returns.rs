//! Return probes (contract rule 10) on real functions of this process, on `int3` sites
//! and on promoted (trap-free) sites: return values paired with the entry's arguments,
//! exact counts of entries and returns, recursion, threads, unregistering with calls in
//! flight. (C and C++ control flow — `longjmp`, exceptions, `backtrace(3)` — is in
//! `tests/unwind.rs`.)

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Barrier};

use multiprobe_backend_sigtrap::{fn_addr, HitRing, Mode, SigtrapBackend};
use multiprobe_core::{CallData, Error, FnHandler, PreAction, Registry};

// One function per test: tests run in parallel, and an address takes one registry.
macro_rules! squares {
    ($($name:ident),*) => {$(
        #[inline(never)]
        fn $name(x: u64) -> u64 {
            black_box(x).wrapping_mul(x) + 1
        }
    )*};
}
squares!(square, square_jump, square_threads, square_inside);

#[inline(never)]
fn depth(n: u64) -> u64 {
    if black_box(n) == 0 {
        0
    } else {
        black_box(depth(n - 1)) + 1
    }
}

#[inline(never)]
fn deep(n: u64) -> u64 {
    if black_box(n) == 0 {
        0
    } else {
        black_box(deep(n - 1)) + 1
    }
}

#[inline(never)]
fn slow_square(x: u64) -> u64 {
    // Long enough for the other thread to unregister while calls are in flight.
    let until = std::time::Instant::now() + std::time::Duration::from_micros(200);
    while std::time::Instant::now() < until {
        std::hint::spin_loop();
    }
    black_box(x) * x
}

// A tail call: `mp_sig_tail_outer(x)` jumps to `mp_sig_tail_inner(x + 1)`, so both
// entries see one return slot and both calls return at once (compilers emit such
// `jmp`s at -O2; Rust gives no way to ask for one). 8 bytes before each control
// transfer: both are promotable.
std::arch::global_asm!(
    ".globl mp_sig_tail_inner",
    ".type mp_sig_tail_inner, @function",
    "mp_sig_tail_inner:",
    "imul rax, rdi, 3",
    "add rax, 0",
    "ret",
    ".size mp_sig_tail_inner, . - mp_sig_tail_inner",
    ".globl mp_sig_tail_outer",
    ".type mp_sig_tail_outer, @function",
    "mp_sig_tail_outer:",
    "add rdi, 1",
    "nop dword ptr [rax]",
    "jmp mp_sig_tail_inner",
    ".size mp_sig_tail_outer, . - mp_sig_tail_outer",
);

extern "C" {
    fn mp_sig_tail_inner(x: u64) -> u64;
    fn mp_sig_tail_outer(x: u64) -> u64;
}

fn addr(f: fn(u64) -> u64) -> u64 {
    fn_addr(f)
}

/// A record of one call: the entry's argument and thread, and at the return the value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
struct Ret {
    arg: u64,
    tid: u32,
    value: u64,
}

/// A return probe that keeps `rdi` at the entry and pushes `(arg, tid, rax)` at the
/// return.
fn returns_into(ring: &Arc<HitRing<Ret>>) -> impl multiprobe_core::Handler {
    let r = Arc::clone(ring);
    FnHandler::new()
        .pre(|hit| {
            let (a, tid) = (hit.regs().rdi, u64::from(hit.tid()));
            if let Some(d) = hit.call_data_mut() {
                d[0] = a;
                d[1] = tid;
            }
            PreAction::Continue
        })
        .ret(move |hit, data: &CallData| {
            assert_eq!(data[1], u64::from(hit.tid()), "returned on its own thread");
            assert!(r.push(Ret {
                arg: data[0],
                tid: hit.tid(),
                value: hit.regs().rax,
            }));
        })
}

/// Both modes, whatever the environment says: `int3` sites and promoted ones.
fn each_mode(mut f: impl FnMut(&Registry<SigtrapBackend>, &str)) {
    for promote in [false, true] {
        let reg = Registry::new(SigtrapBackend::with_promotion(promote));
        f(&reg, if promote { "promoted" } else { "int3" });
    }
}

#[test]
fn return_values_pair_with_their_arguments_and_every_entry_returns_once() {
    each_mode(|reg, mode| {
        let a = addr(square);
        let ring = Arc::new(HitRing::<Ret>::new(512));
        let g = reg.register_handler(a, returns_into(&ring)).unwrap();
        if mode == "int3" {
            assert!(matches!(reg.backend().mode_at(a), Some(Mode::Trap(_))));
        } else {
            println!(
                "square on a {mode} registry: {:?}",
                reg.backend().mode_at(a)
            );
        }
        for i in 0..300u64 {
            assert_eq!(square(black_box(i)), i * i + 1);
        }
        let rets = ring.drain();
        assert_eq!(rets.len(), 300, "{mode}");
        for (i, r) in rets.iter().enumerate() {
            let i = i as u64;
            assert_eq!((r.arg, r.value), (i, i * i + 1), "{mode}");
        }
        let s = g.stats().unwrap();
        assert_eq!((s.hits, s.returns, s.returns_lost), (300, 300, 0), "{mode}");
        g.unregister().unwrap();
        // Unprobed again: same results, nothing recorded.
        assert_eq!(square(black_box(7)), 50);
        assert!(ring.drain().is_empty());
    });
}

#[test]
fn a_promoted_site_returns_through_the_trampoline_without_a_trap() {
    let reg = Registry::new(SigtrapBackend::with_promotion(true));
    let a = addr(square_jump);
    let ring = Arc::new(HitRing::<Ret>::new(64));
    let g = reg.register_handler(a, returns_into(&ring)).unwrap();
    if reg.backend().mode_at(a) != Some(Mode::Jump) {
        println!(
            "SKIPPED: square_jump's entry is not promotable here: {:?}",
            reg.backend().mode_at(a)
        );
        return;
    }
    let before = multiprobe_backend_sigtrap::traps_on_this_thread();
    for i in 0..50u64 {
        assert_eq!(square_jump(black_box(i)), i * i + 1);
    }
    assert_eq!(multiprobe_backend_sigtrap::traps_on_this_thread(), before);
    assert_eq!(ring.drain().len(), 50);
    assert_eq!(g.stats().unwrap().returns, 50);
}

#[test]
fn recursion_a_thousand_deep_returns_innermost_first() {
    each_mode(|reg, mode| {
        let ring = Arc::new(HitRing::<Ret>::new(4096));
        let g = reg
            .register_handler(addr(depth), returns_into(&ring))
            .unwrap();
        assert_eq!(depth(black_box(1000)), 1000);
        let rets = ring.drain();
        assert_eq!(rets.len(), 1001, "{mode}");
        for (k, r) in rets.iter().enumerate() {
            // depth(k) returns k, innermost (k = 0) first.
            assert_eq!((r.arg, r.value), (k as u64, k as u64), "{mode}");
        }
        let s = g.stats().unwrap();
        assert_eq!(
            (s.hits, s.returns, s.returns_lost),
            (1001, 1001, 0),
            "{mode}"
        );
    });
}

#[test]
fn four_threads_each_get_their_own_returns() {
    each_mode(|reg, mode| {
        let ring = Arc::new(HitRing::<Ret>::new(8192));
        let g = reg
            .register_handler(addr(square_threads), returns_into(&ring))
            .unwrap();
        let start = Arc::new(Barrier::new(4));
        let tids: Vec<u32> = (0..4u64)
            .map(|t| {
                let start = Arc::clone(&start);
                std::thread::spawn(move || {
                    start.wait();
                    for i in 0..1000 {
                        let x = t * 10_000 + i;
                        assert_eq!(square_threads(black_box(x)), x.wrapping_mul(x) + 1);
                    }
                    // SAFETY: no preconditions.
                    unsafe { libc::syscall(libc::SYS_gettid) as u32 }
                })
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|h| h.join().unwrap())
            .collect();
        let rets = ring.drain();
        assert_eq!(rets.len(), 4000, "{mode}");
        for r in &rets {
            let t = (r.arg / 10_000) as usize;
            assert_eq!(
                r.tid, tids[t],
                "{mode}: the call of thread {t} returned elsewhere"
            );
            assert_eq!(r.value, r.arg.wrapping_mul(r.arg) + 1);
        }
        let s = g.stats().unwrap();
        assert_eq!(
            (s.hits, s.returns, s.returns_lost),
            (4000, 4000, 0),
            "{mode}"
        );
    });
}

#[test]
fn unregister_with_calls_in_flight_on_two_threads_runs_no_return_hook_after_it() {
    each_mode(|reg, mode| {
        let unregistered = Arc::new(AtomicBool::new(false));
        let late = Arc::new(AtomicU64::new(0));
        let returns = Arc::new(AtomicU64::new(0));
        let h = {
            let (u, late, returns) = (
                Arc::clone(&unregistered),
                Arc::clone(&late),
                Arc::clone(&returns),
            );
            FnHandler::new()
                .pre(|_| PreAction::Continue)
                .ret(move |_, _: &CallData| {
                    returns.fetch_add(1, SeqCst);
                    if u.load(SeqCst) {
                        late.fetch_add(1, SeqCst);
                    }
                })
        };
        let g = reg.register_handler(addr(slow_square), h).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..2)
            .map(|t| {
                let stop = Arc::clone(&stop);
                std::thread::spawn(move || {
                    let mut n = 0u64;
                    while !stop.load(SeqCst) {
                        let x = t * 1000 + n % 1000;
                        assert_eq!(slow_square(black_box(x)), x * x);
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        while returns.load(SeqCst) < 20 {
            std::thread::yield_now();
        }
        g.unregister().unwrap();
        unregistered.store(true, SeqCst);
        // The calls in flight at the unregister return now, through the trampoline.
        std::thread::sleep(std::time::Duration::from_millis(20));
        stop.store(true, SeqCst);
        let calls: u64 = workers.into_iter().map(|w| w.join().unwrap()).sum();
        assert_eq!(
            late.load(SeqCst),
            0,
            "{mode}: a return hook ran after unregister"
        );
        assert!(calls > returns.load(SeqCst), "{mode}: the program ran on");
        // Still unprobed and working.
        assert_eq!(slow_square(black_box(9)), 81);
    });
}

#[test]
fn a_return_probe_inside_a_function_is_a_clear_error_and_arms_nothing() {
    let reg = multiprobe_backend_sigtrap::registry();
    let a = addr(square_inside);
    let inside = (1..16)
        .map(|k| a + k)
        .find(|&x| {
            reg.register(x, |_| {})
                .map(|g| g.unregister().unwrap())
                .is_ok()
        })
        .expect("an instruction boundary after the first");
    let h = FnHandler::new()
        .pre(|_| PreAction::Continue)
        .ret(|_, _: &CallData| {});
    match reg.register_handler(inside, h) {
        Err(e @ Error::NotFunctionEntry { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains("square_inside+0x"), "{msg}");
        }
        other => panic!("expected NotFunctionEntry, got {other:?}"),
    }
    assert!(reg.is_empty());
    assert_eq!(square_inside(black_box(3)), 10);
}

#[test]
fn a_full_return_stack_loses_the_deepest_returns_and_the_program_runs_on() {
    use multiprobe_core::backend::{return_frame_words, DEFAULT_RETURN_WORDS};
    // More calls in flight than a thread's return stack holds (one handler's frames).
    let room = (DEFAULT_RETURN_WORDS / return_frame_words(1)) as u64;
    let n = room + 1000;
    each_mode(|reg, mode| {
        let ring = Arc::new(HitRing::<Ret>::new(room as usize + 16));
        let g = reg
            .register_handler(addr(deep), returns_into(&ring))
            .unwrap();
        // A stack big enough for the recursion itself.
        let got = std::thread::Builder::new()
            .stack_size(256 << 20)
            .spawn(move || deep(black_box(n)))
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(got, n, "{mode}");
        let s = g.stats().unwrap();
        assert_eq!(
            (s.hits, s.returns, s.returns_lost),
            (n + 1, room, n + 1 - room),
            "{mode}"
        );
        // The outermost calls returned (the deepest found no room), innermost first.
        let rets = ring.drain();
        assert_eq!(rets.len() as u64, room);
        assert_eq!((rets[0].arg, rets[0].value), (n + 1 - room, n + 1 - room));
        assert_eq!(rets.last().map(|r| r.arg), Some(n));
    });
}

#[test]
fn a_tail_call_between_two_return_probed_functions_returns_through_both() {
    each_mode(|reg, mode| {
        let outer = mp_sig_tail_outer as *const () as u64;
        let inner = mp_sig_tail_inner as *const () as u64;
        let (ro, ri) = (
            Arc::new(HitRing::<Ret>::new(512)),
            Arc::new(HitRing::<Ret>::new(512)),
        );
        let go = reg.register_handler(outer, returns_into(&ro)).unwrap();
        let gi = reg.register_handler(inner, returns_into(&ri)).unwrap();
        for i in 0..200u64 {
            // SAFETY: the assembly above follows the C ABI (reads rdi, returns rax).
            let got = unsafe { mp_sig_tail_outer(black_box(i)) };
            assert_eq!(got, 3 * (i + 1), "{mode}");
        }
        for (ring, g, shift) in [(&ro, &go, 0), (&ri, &gi, 1)] {
            let rets = ring.drain();
            assert_eq!(rets.len(), 200, "{mode}");
            for (i, r) in rets.iter().enumerate() {
                let i = i as u64;
                // Each call's own argument (x at the outer entry, x + 1 at the inner),
                // both returning the inner's value.
                assert_eq!((r.arg, r.value), (i + shift, 3 * (i + 1)), "{mode}");
            }
            let s = g.stats().unwrap();
            assert_eq!((s.hits, s.returns, s.returns_lost), (200, 200, 0), "{mode}");
        }
    });
}
