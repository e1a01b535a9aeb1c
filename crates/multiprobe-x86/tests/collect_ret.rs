//! `ret` collectors run for real, in this process: the trampoline is called as if it
//! were the function, swaps the return address for its return code, and the function's
//! own `ret` lands there. Every call must return its result to its caller, counters
//! must be exact, each record must pair the return value with the same call's
//! arguments, and a collector taken off its site (live word 0) must let calls return
//! unobserved.

#[allow(dead_code, reason = "shared with the other collecting tests")]
mod collect_util;

use std::sync::Arc;

use collect_util::{call_from_threads, expected, fs_base, peek, thread_ids, Setup};
use multiprobe_x86::collect::shadow::{block_header, block_offset, blocks_of, THREADS};
use multiprobe_x86::collect::{Action, Collector, ThreadId, RET_LEN};

const COLLECTORS: [Collector; 3] = [
    Collector {
        slot: 1,
        action: Action::Count,
    },
    Collector {
        slot: 2,
        action: Action::Ret,
    },
    Collector {
        slot: 4,
        action: Action::Args(2),
    },
];

fn args_of(t: u64, i: u64) -> [u64; 6] {
    [t << 32 | i, i * 7, !i, t, i ^ 0x55, u64::MAX - t]
}

fn words(data: &[u8]) -> Vec<u64> {
    data.chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Every block the threads claimed, with its depth. Each is one its owner looks at
/// (`blocks_of`, what the tracer uses to find a thread's block).
fn blocks(s: &Setup) -> Vec<(u64, u64)> {
    (0..THREADS)
        .map(|i| {
            let at = s.shadow + block_offset(i) as u64;
            let mut h = [0u8; 16];
            h[..8].copy_from_slice(&peek(at).to_le_bytes());
            h[8..].copy_from_slice(&peek(at + 8).to_le_bytes());
            (i, block_header(&h))
        })
        .filter(|&(_, (owner, _))| owner != 0)
        .inspect(|&(i, (owner, _))| {
            assert!(
                blocks_of(owner).any(|b| b == i),
                "block {i} of fs base {owner:#x}"
            )
        })
        .map(|(_, b)| b)
        .collect()
}

#[test]
fn every_return_pairs_its_value_with_its_own_arguments_from_four_threads() {
    const N: u64 = 4000;
    for near in [true, false] {
        for tid in thread_ids() {
            let s = Arc::new(Setup::new(&COLLECTORS, 1 << 15, near, tid));
            let bases = call_from_threads(&s, 4, N, args_of, None);
            let mut r = s.reader();
            let c = r.counters(2);
            assert_eq!(
                (c.hits, c.returns_lost, c.dropped),
                (4 * N, 0, 0),
                "near {near} {tid:?}"
            );
            let mut rets = 0;
            r.drain(|rec| {
                if rec.slot != 2 {
                    return;
                }
                rets += 1;
                assert_eq!(rec.data.len(), RET_LEN);
                let w = words(rec.data);
                let a: [u64; 6] = w[3..9].try_into().unwrap();
                let (t, i) = (a[0] >> 32, a[0] & 0xffff_ffff);
                assert_eq!(a, args_of(t, i), "the entry's arguments");
                assert_eq!(w[1], expected(a), "rax at the return: the call's result");
                assert!(
                    w[0] != 0 && w[0] <= rec.tsc,
                    "entry tsc before the return's"
                );
                assert_eq!(rec.thread, bases[t as usize]);
            });
            assert_eq!(rets, 4 * N);
            // Four threads, four blocks, every stack empty again.
            let b = blocks(&s);
            assert_eq!(b.len(), 4, "{b:x?}");
            assert!(b
                .iter()
                .all(|&(owner, depth)| bases.contains(&owner) && depth == 0));
        }
    }
}

#[test]
fn a_collector_taken_off_its_site_lets_calls_return_unobserved() {
    let s = Setup::new(&COLLECTORS, 1 << 10, true, ThreadId::FsZero);
    let f = s.probed();
    let a = args_of(1, 2);
    assert_eq!(f(a[0], a[1], a[2], a[3], a[4], a[5]), expected(a));
    let mut r = s.reader();
    r.set_live(2, false);
    for i in 0..10 {
        let a = args_of(3, i);
        assert_eq!(f(a[0], a[1], a[2], a[3], a[4], a[5]), expected(a));
    }
    let c = r.counters(2);
    assert_eq!((c.hits, c.returns_lost, c.dropped), (11, 0, 0));
    let mut n = 0;
    r.drain(|rec| n += usize::from(rec.slot == 2));
    assert_eq!(n, 1, "no record after the live word went to 0");
    assert_eq!(blocks(&s), [(fs_base(), 0)], "the frames were still popped");
}

#[test]
fn ret_without_shadow_stacks_or_more_than_two_is_refused() {
    use multiprobe_x86::collect::{build_collect_trampoline, AreaLayout, CollectSpec};
    use multiprobe_x86::{analyze_region, Code, TrampolineError, Unwind};
    let func = [0x0f, 0x1f, 0x44, 0x00, 0x00, 0xc3];
    let at = 0x7000_0000;
    let code = Code {
        addr: at,
        bytes: &func,
    };
    let region = analyze_region(at, code, None, Unwind::NoLandingPads).unwrap();
    let layout = AreaLayout::new(64, 8);
    let ret = |slot| Collector {
        slot,
        action: Action::Ret,
    };
    for (cols, shadow) in [
        (vec![ret(0)], 0),
        (vec![ret(0), ret(1), ret(2)], 0x1000_0000),
    ] {
        let spec = CollectSpec {
            region: &region,
            site: 0,
            collectors: &cols,
            area: at + 0x10_0000,
            layout: &layout,
            thread_id: ThreadId::FsZero,
            shadow,
            tsc_ns_q32: 0,
        };
        let r = build_collect_trampoline(&spec, at + 0x20_0000);
        assert!(
            matches!(
                r,
                Err(TrampolineError::BadCollector { .. } | TrampolineError::TooManyCollectors(_))
            ),
            "{r:?}"
        );
    }
}

#[test]
fn latency_counts_every_return_in_its_histogram_without_records() {
    const N: u64 = 3000;
    let cols = [
        Collector {
            slot: 3,
            action: Action::Latency,
        },
        Collector {
            slot: 2,
            action: Action::Ret,
        },
    ];
    let s = Arc::new(Setup::new(&cols, 1 << 15, true, ThreadId::FsZero));
    call_from_threads(&s, 2, N, args_of, None);
    let mut r = s.reader();
    let h = r.histogram(3);
    assert_eq!(h.count(), 2 * N, "every return, none dropped");
    let (min, max) = h.min_max.expect("calls were timed");
    assert!(min <= max && h.sum >= min * 2 * N && h.sum <= max * 2 * N);
    // A few instructions and a record: well under a millisecond each (a preempted
    // call may take longer, but not most of them).
    let under_1ms: u64 = h.buckets[..=20].iter().sum();
    assert!(under_1ms * 10 >= 9 * 2 * N, "{:?}", h.buckets);
    let mut recs = 0;
    r.drain(|rec| {
        assert_eq!(rec.slot, 2, "latency writes no record");
        recs += 1;
    });
    assert_eq!(recs, 2 * N);
    r.set_live(3, false);
    let f = s.probed();
    let a = args_of(9, 9);
    assert_eq!(f(a[0], a[1], a[2], a[3], a[4], a[5]), expected(a));
    assert_eq!(r.histogram(3).count(), 2 * N, "off its site: not counted");
    assert_eq!(r.histogram(2).count(), 0, "ret has no histogram");
}

static NESTED_FN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static NESTED_CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
static NESTED_BAD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A signal handler that calls the probed function, wherever the signal caught the
/// thread (inside the entry's push, the return code's pop, the function itself).
extern "C" fn call_probed(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    use std::sync::atomic::Ordering::SeqCst;
    let f = NESTED_FN.load(SeqCst);
    if f == 0 {
        return;
    }
    // SAFETY: the test stores the address of its probed trampoline, which has the C
    // ABI of the function and stays mapped; it only touches registers and the area.
    let f = unsafe { std::mem::transmute::<u64, collect_util::Func>(f) };
    let n = NESTED_CALLS.fetch_add(1, SeqCst);
    let a = args_of(99, n);
    if f(a[0], a[1], a[2], a[3], a[4], a[5]) != expected(a) {
        NESTED_BAD.fetch_add(1, SeqCst);
    }
}

#[test]
fn calls_from_signal_handlers_nested_anywhere_in_a_call_pair_correctly() {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    const N: u64 = 100_000;
    let s = Setup::new(&COLLECTORS, 1 << 20, true, ThreadId::FsZero);
    let f = s.probed();
    NESTED_FN.store(f as usize as u64, SeqCst);
    // SAFETY: the handler only calls the probed code and counts with atomics.
    unsafe {
        multiprobe_test_targets::install_siginfo_handler(libc::SIGUSR2, call_probed, 0);
    }
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::syscall(libc::SYS_gettid) } as libc::pid_t;
    let done = std::sync::Arc::new(AtomicBool::new(false));
    let d = std::sync::Arc::clone(&done);
    let kicker = std::thread::spawn(move || {
        let mut sent = 0u64;
        let mut x = 0x9e37_79b9_u64;
        while !d.load(SeqCst) {
            let before = NESTED_CALLS.load(SeqCst);
            // SAFETY: tgkill to a thread of this process that handles SIGUSR2.
            unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), me, libc::SIGUSR2) };
            sent += 1;
            // One signal at a time (back to back, they would keep the thread in its
            // handler and the test would never end), then a pseudo-random pause so
            // the next one lands elsewhere in a call.
            while NESTED_CALLS.load(SeqCst) == before && !d.load(SeqCst) {
                std::thread::yield_now();
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            for _ in 0..x % 4096 {
                std::hint::spin_loop();
            }
        }
        sent
    });
    let mut r = s.reader();
    let mut seen = 0u64;
    // Until a thousand signals have nested (each interrupting the thread at some point
    // of a call), at most 20 s.
    let start = std::time::Instant::now();
    let mut calls = 0u64;
    while NESTED_CALLS.load(SeqCst) < 1000 && start.elapsed().as_secs() < 20 || calls < N {
        let a = args_of(1, calls);
        assert_eq!(f(a[0], a[1], a[2], a[3], a[4], a[5]), expected(a));
        calls += 1;
        if calls.is_multiple_of(1000) {
            seen += r.drain(|rec| check_ret(&rec)) as u64;
        }
    }
    done.store(true, SeqCst);
    let sent = kicker.join().unwrap();
    NESTED_FN.store(0, SeqCst);
    seen += r.drain(|rec| check_ret(&rec)) as u64;
    let nested = NESTED_CALLS.load(SeqCst);
    assert_eq!(
        NESTED_BAD.load(SeqCst),
        0,
        "a nested call returned a wrong value"
    );
    assert!(
        nested >= 1000,
        "only {nested} nested calls ({sent} signals sent)"
    );
    let c = r.counters(2);
    assert_eq!((c.hits, c.returns_lost, c.dropped), (calls + nested, 0, 0));
    // Both records of each call: the args:2 one at the entry, the ret one at the return.
    assert_eq!(seen, 2 * (calls + nested));
    assert_eq!(blocks(&s), [(fs_base(), 0)], "every frame popped");
}

/// A `ret` record must pair its return value with its own call's arguments.
fn check_ret(rec: &multiprobe_x86::collect::RecordRef<'_>) {
    if rec.slot != 2 {
        return;
    }
    let w = words(rec.data);
    let a: [u64; 6] = w[3..9].try_into().unwrap();
    assert_eq!(
        w[1],
        expected(a),
        "the return value of the call with {a:x?}"
    );
}
