//! Probes at the entry of real Rust functions: aggregation, order, argument capture,
//! redirection, reentrancy, panics, and concurrent hits during (un)registration.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;

use multiprobe_backend_sigtrap::{HitRecord, HitRing};
use multiprobe_core::{FnHandler, PreAction};

#[inline(never)]
fn add3(a: u64, b: u64, c: u64) -> u64 {
    std::hint::black_box(a) + b * 10 + c * 100
}

// A redirect changes what a call returns behind the compiler's back, so the results
// must be opaque to it (it would otherwise infer `ret_one` returns 0 or 1 and fold the
// comparison with 2).
#[inline(never)]
fn ret_one(x: u64) -> u64 {
    std::hint::black_box(x);
    std::hint::black_box(1)
}

#[inline(never)]
fn ret_two(x: u64) -> u64 {
    std::hint::black_box(x);
    std::hint::black_box(2)
}

#[inline(never)]
fn fib(n: u64) -> u64 {
    if std::hint::black_box(n) < 2 {
        n
    } else {
        fib(n - 1) + fib(n - 2)
    }
}

#[inline(never)]
fn shared_target(x: u64) -> u64 {
    std::hint::black_box(x) ^ 0x5a
}

#[inline(never)]
fn panic_target(x: u64) -> u64 {
    std::hint::black_box(x) + 7
}

fn addr_of(f: fn(u64) -> u64) -> u64 {
    multiprobe_backend_sigtrap::fn_addr(f)
}

#[test]
fn three_handlers_at_a_function_entry_count_capture_arguments_and_run_in_order() {
    let reg = multiprobe_backend_sigtrap::registry();
    let a = multiprobe_backend_sigtrap::fn_addr(add3 as fn(u64, u64, u64) -> u64);
    let ring = Arc::new(HitRing::<(u8, HitRecord)>::new(256));
    let guards: Vec<_> = (0..3u8)
        .map(|k| {
            let r = Arc::clone(&ring);
            reg.register(a, move |h| {
                assert!(r.push((k, HitRecord::of(h))));
            })
            .unwrap()
        })
        .collect();
    for i in 0..20u64 {
        assert_eq!(add3(i, i + 1, i + 2), i + (i + 1) * 10 + (i + 2) * 100);
    }
    let recs = ring.drain();
    assert_eq!(recs.len(), 60);
    for (i, hit) in recs.chunks(3).enumerate() {
        let i = i as u64;
        // Registration order, every hit.
        assert_eq!([hit[0].0, hit[1].0, hit[2].0], [0, 1, 2]);
        for (_, r) in hit {
            assert_eq!(r.addr, a);
            assert_eq!(&r.args[..3], &[i, i + 1, i + 2]);
        }
        assert!(hit[0].1.tsc <= hit[2].1.tsc);
        assert_eq!(hit[0].1.handler, guards[0].id());
    }
    assert_eq!(reg.site(a).unwrap().hits, 20);
    for g in guards {
        let s = g.unregister().unwrap();
        assert_eq!((s.hits, s.missed, s.panics), (20, 0, 0));
    }
}

#[test]
fn a_pre_handler_that_redirects_skips_the_function_and_later_handlers() {
    let reg = multiprobe_backend_sigtrap::registry();
    let a = addr_of(ret_one);
    let alt = addr_of(ret_two);
    let later = Arc::new(AtomicU64::new(0));
    let posts = Arc::new(AtomicU64::new(0));
    let (l, p) = (Arc::clone(&later), Arc::clone(&posts));
    let g1 = reg
        .register_handler(
            a,
            FnHandler::new()
                .pre(move |h| {
                    h.regs_mut().rip = alt;
                    PreAction::Redirect
                })
                .post(move |_h| {
                    p.fetch_add(1, Relaxed);
                }),
        )
        .unwrap();
    let g2 = reg
        .register(a, move |_h| {
            l.fetch_add(1, Relaxed);
        })
        .unwrap();
    assert_eq!(ret_one(5), 2, "redirected to ret_two");
    assert_eq!(later.load(Relaxed), 0, "the walk ended at the redirect");
    assert_eq!(posts.load(Relaxed), 0, "no post-handler after a redirect");
    drop(g1);
    assert_eq!(ret_one(5), 1);
    assert_eq!(later.load(Relaxed), 1);
    g2.unregister().unwrap();
}

#[test]
fn a_handler_calling_the_probed_function_is_missed_not_recursive() {
    let reg = multiprobe_backend_sigtrap::registry();
    let a = addr_of(fib);
    let inner = Arc::new(AtomicU64::new(0));
    let i2 = Arc::clone(&inner);
    let g = reg
        .register(a, move |h| {
            // Calls the probed function from inside the handler: every nested hit is a
            // miss, and the nested calls still compute.
            if h.regs().rdi == 10 {
                i2.store(fib(10), Relaxed);
            }
        })
        .unwrap();
    assert_eq!(fib(10), 55);
    assert_eq!(inner.load(Relaxed), 55);
    let s = g.unregister().unwrap();
    // fib(10) makes 177 calls; the handler's fib(10) another 177, all missed.
    assert_eq!((s.hits, s.missed), (177, 177));
}

#[test]
fn a_panicking_handler_is_caught_counted_and_the_others_still_run() {
    let reg = multiprobe_backend_sigtrap::registry();
    let a = addr_of(panic_target);
    let ok = Arc::new(AtomicU64::new(0));
    let o = Arc::clone(&ok);
    let prev = std::panic::take_hook();
    // The default hook prints (locks stderr, allocates); keep the output quiet.
    std::panic::set_hook(Box::new(|_| {}));
    let g1 = reg.register(a, |_h| panic!("handler bug")).unwrap();
    let g2 = reg
        .register(a, move |_h| {
            o.fetch_add(1, Relaxed);
        })
        .unwrap();
    for i in 0..3 {
        assert_eq!(panic_target(i), i + 7);
    }
    std::panic::set_hook(prev);
    assert_eq!(ok.load(Relaxed), 3);
    let s1 = g1.unregister().unwrap();
    assert_eq!((s1.hits, s1.panics), (3, 3));
    assert_eq!(g2.unregister().unwrap().hits, 3);
}

#[test]
fn four_threads_hit_while_a_fifth_registers_and_unregisters() {
    let reg = multiprobe_backend_sigtrap::registry();
    let a = addr_of(shared_target);
    let base = Arc::new(AtomicU64::new(0));
    let b = Arc::clone(&base);
    let g0 = reg
        .register(a, move |_h| {
            b.fetch_add(1, Relaxed);
        })
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let hitters: Vec<_> = (0..4)
        .map(|t| {
            let (calls, stop) = (Arc::clone(&calls), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Relaxed) {
                    assert_eq!(shared_target(t), t ^ 0x5a);
                    calls.fetch_add(1, SeqCst);
                    n += 1;
                }
                n
            })
        })
        .collect();
    for round in 0..50 {
        let seen = Arc::new(AtomicU64::new(0));
        let s = Arc::clone(&seen);
        let post = round % 2 == 1;
        let c0 = calls.load(SeqCst);
        let g = if post {
            let s2 = Arc::clone(&seen);
            reg.register_handler(
                a,
                FnHandler::new()
                    .pre(move |_h| {
                        s.fetch_add(1, Relaxed);
                        PreAction::Continue
                    })
                    .post(move |_h| {
                        s2.fetch_add(1 << 32, Relaxed);
                    }),
            )
        } else {
            reg.register(a, move |_h| {
                s.fetch_add(1, Relaxed);
            })
        }
        .unwrap();
        let c1 = calls.load(SeqCst);
        while calls.load(SeqCst) < c1 + 40 {
            std::thread::yield_now();
        }
        let c2 = calls.load(SeqCst);
        let stats = g.unregister().unwrap();
        let c3 = calls.load(SeqCst);
        let at_unregister = seen.load(Relaxed);
        // Rule 4: every call that began after register returned ran the handler; each
        // of the 4 threads may have had one call in flight across each boundary.
        assert!(
            stats.hits + 4 >= c2 - c1,
            "round {round}: {} < {}",
            stats.hits,
            c2 - c1
        );
        assert!(stats.hits <= c3 - c0 + 4, "round {round}");
        assert_eq!(at_unregister & 0xffff_ffff, stats.hits, "round {round}");
        if post {
            assert_eq!(
                at_unregister >> 32,
                stats.hits,
                "round {round}: a post per pre"
            );
        }
        // Rule 3: nothing runs after unregister returned.
        let c4 = calls.load(SeqCst);
        while calls.load(SeqCst) < c4 + 20 {
            std::thread::yield_now();
        }
        assert_eq!(
            seen.load(Relaxed),
            at_unregister,
            "round {round}: ran after unregister"
        );
    }
    stop.store(true, Relaxed);
    let made: u64 = hitters.into_iter().map(|h| h.join().unwrap()).sum();
    let s0 = g0.unregister().unwrap();
    assert_eq!(made, calls.load(SeqCst));
    // The handler registered throughout saw every call, exactly once.
    assert_eq!((s0.hits, s0.missed), (made, 0));
    assert_eq!(base.load(Relaxed), made);
}

#[inline(never)]
fn churn_target(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(0x9e37_79b9)
}

#[test]
fn arming_and_disarming_while_threads_run_the_code_stays_transparent() {
    // The only handler comes and goes, so the int3 is written and removed while two
    // threads execute the function: a trap can find its probe already gone and must
    // re-execute the restored instruction (or the process would die of SIGTRAP).
    let reg = multiprobe_backend_sigtrap::registry();
    let a = addr_of(churn_target);
    let calls = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let hitters: Vec<_> = (0..2u64)
        .map(|t| {
            let (calls, stop) = (Arc::clone(&calls), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    assert_eq!(churn_target(t), t.wrapping_mul(0x9e37_79b9));
                    calls.fetch_add(1, SeqCst);
                }
            })
        })
        .collect();
    let mut hits = 0;
    let c0 = calls.load(SeqCst);
    for _ in 0..300 {
        let g = reg.register(a, |_h| {}).unwrap();
        std::thread::yield_now();
        hits += g.unregister().unwrap().hits;
    }
    let c1 = calls.load(SeqCst);
    stop.store(true, Relaxed);
    for h in hitters {
        h.join().unwrap();
    }
    assert!(hits <= c1 - c0 + 2, "{hits} hits for {} calls", c1 - c0);
    println!(
        "{hits} hits, {} calls, {} re-executed traps so far in this process",
        c1 - c0,
        multiprobe_backend_sigtrap::reexecuted_traps()
    );
}

#[test]
fn short_lived_threads_give_their_state_back() {
    // Each thread's dispatch state is created on its first hit, inside the signal
    // handler, and dropped at thread exit by a pthread key destructor: many threads that
    // hit once and exit must all be counted, and the grace period of the unregister
    // below must end (no exiting thread may leave a read section behind).
    let reg = multiprobe_backend_sigtrap::registry();
    let a = addr_of(churn_target2);
    let g = reg.register(a, |_h| {}).unwrap();
    for i in 0..40u64 {
        std::thread::spawn(move || assert_eq!(churn_target2(i), i + 11))
            .join()
            .unwrap();
    }
    assert_eq!(g.unregister().unwrap().hits, 40);
}

#[inline(never)]
fn churn_target2(x: u64) -> u64 {
    std::hint::black_box(x) + 11
}
