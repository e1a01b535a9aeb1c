//! Collecting trampolines run for real, in this process: a generated function is called
//! through its trampoline as if the trampoline were the function (what a promoted
//! site's jump does), from several threads, with the area read by the reader while
//! the calls run. Results must be the function's, counters exact, records equal to
//! what was passed, a full ring must drop and count without losing or duplicating a
//! record, and a `mem:` fault must resume committed as faulted.

mod collect_util;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use collect_util::{call_from_threads, expected, guard_pages, serve_faults, thread_ids, Setup};
use iced_x86::{Decoder, DecoderOptions, Mnemonic};
use multiprobe_x86::collect::{Action, Collector, ThreadId, COUNTER_STRIPES, RECORD_DATA_MAX};
use multiprobe_x86::Location;

fn args_of(t: u64, i: u64) -> [u64; 6] {
    [
        t,
        i,
        t.wrapping_mul(0x9e37_79b9) ^ i,
        !i,
        i << 20 | t,
        u64::MAX - i,
    ]
}

fn words(data: &[u8]) -> Vec<u64> {
    data.chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

const COLLECTORS: [Collector; 3] = [
    Collector {
        slot: 0,
        action: Action::Count,
    },
    Collector {
        slot: 3,
        action: Action::Args(6),
    },
    Collector {
        slot: 5,
        action: Action::Count,
    },
];

/// 4 threads × N calls; counts exact, every record its thread's arguments, once.
#[test]
fn counts_are_exact_and_records_are_the_arguments_from_four_threads() {
    const N: u64 = 5000;
    for near in [true, false] {
        for tid in thread_ids() {
            let s = Arc::new(Setup::new(&COLLECTORS, 1 << 15, near, tid));
            let bases = call_from_threads(&s, 4, N, args_of, None);
            let mut r = s.reader();
            for slot in [0, 3, 5] {
                let c = r.counters(slot);
                assert_eq!((c.hits, c.dropped, c.faulted), (4 * N, 0, 0), "slot {slot}");
            }
            assert_eq!(r.counters(1).hits, 0, "an unused slot stays 0");
            // The hits went into the threads' own stripes (a line each), not one line.
            let base = s.area.layout.counter_offset(0) / 8;
            let mem = s.area.words();
            let stripes: Vec<u64> = (0..COUNTER_STRIPES)
                .map(|k| mem[base + k * 8].load(Ordering::Relaxed))
                .collect();
            let used = stripes.iter().filter(|&&h| h > 0).count();
            assert!(
                used >= 2,
                "4 threads' hits in {used} stripe(s): {stripes:?}"
            );
            let mut seen = HashSet::new();
            let n = r.drain(|rec| {
                assert_eq!((rec.site, rec.slot, rec.faulted), (7, 3, false));
                let w = words(rec.data);
                let (t, i) = (w[0], w[1]);
                assert_eq!(w, args_of(t, i), "near {near} {tid:?}");
                assert_eq!(rec.thread, bases[t as usize], "the record's thread");
                assert!(rec.tsc != 0);
                assert!(seen.insert((t, i)), "duplicate record {t} {i}");
            });
            assert_eq!(n as u64, 4 * N);
            assert_eq!(r.drain(|_| panic!("drained twice")), 0);
        }
    }
}

/// A ring of 16 cells with no reader: exactly 16 records, the rest dropped and counted.
#[test]
fn a_full_ring_drops_and_counts_exactly() {
    let s = Setup::new(&COLLECTORS, 16, true, ThreadId::FsZero);
    let f = s.probed();
    for i in 0..40 {
        let a = args_of(9, i);
        assert_eq!(f(a[0], a[1], a[2], a[3], a[4], a[5]), expected(a));
    }
    let mut r = s.reader();
    let c = r.counters(3);
    assert_eq!((c.hits, c.dropped), (40, 24));
    assert_eq!(
        r.counters(0).hits,
        40,
        "counting goes on when the ring is full"
    );
    let mut got = Vec::new();
    r.drain(|rec| got.push(words(rec.data)[1]));
    assert_eq!(got, (0..16).collect::<Vec<u64>>(), "the first 16, in order");
    // The drained cells are free again.
    let a = args_of(9, 99);
    f(a[0], a[1], a[2], a[3], a[4], a[5]);
    let mut got = Vec::new();
    r.drain(|rec| got.push(words(rec.data)[1]));
    assert_eq!(got, [99]);
    assert_eq!(r.counters(3).dropped, 24);
}

/// 4 producers against a small ring and a reader draining concurrently: every hit is
/// either one record or one drop, no record lost or duplicated, each thread's records
/// in its call order.
#[test]
fn a_concurrent_reader_loses_and_duplicates_nothing() {
    const N: u64 = 20_000;
    let s = Arc::new(Setup::new(&COLLECTORS, 64, false, ThreadId::FsZero));
    let done = Arc::new(AtomicBool::new(false));
    let reader = {
        let (s, done) = (s.clone(), done.clone());
        std::thread::spawn(move || {
            let mut r = s.reader();
            let mut recs = Vec::new();
            loop {
                let finished = done.load(Ordering::Acquire);
                r.drain(|rec| {
                    let w = words(rec.data);
                    assert_eq!(w, args_of(w[0], w[1]));
                    recs.push((w[0], w[1]));
                });
                if finished {
                    break;
                }
                std::thread::yield_now();
            }
            recs
        })
    };
    // Two cores here: producers yield every 16 calls to let the reader in, so the
    // ring both fills and drains during the run.
    call_from_threads(&s, 4, N, args_of, Some(16));
    done.store(true, Ordering::Release);
    let recs = reader.join().unwrap();
    let r = s.reader();
    let c = r.counters(3);
    assert_eq!(c.hits, 4 * N);
    assert_eq!(
        recs.len() as u64 + c.dropped,
        4 * N,
        "{} records",
        recs.len()
    );
    eprintln!("{} records, {} dropped", recs.len(), c.dropped);
    assert!(!recs.is_empty());
    assert_eq!(r.reserved(), recs.len() as u64);
    let mut last = [None::<u64>; 4];
    let mut seen = HashSet::new();
    for (t, i) in recs {
        assert!(seen.insert((t, i)), "duplicate {t} {i}");
        let l = &mut last[t as usize];
        assert!(l.is_none_or(|p| p < i), "thread {t}: {i} after {l:?}");
        *l = Some(i);
    }
}

/// `mem:` records hold the pointed bytes; several actions on one site run in order.
#[test]
fn mem_records_hold_the_pointed_bytes() {
    let cs = [
        Collector {
            slot: 1,
            action: Action::Mem {
                arg: 1,
                len: RECORD_DATA_MAX as u16,
            },
        },
        Collector {
            slot: 2,
            action: Action::Mem { arg: 6, len: 3 },
        },
        Collector {
            slot: 4,
            action: Action::Args(2),
        },
    ];
    for near in [true, false] {
        let s = Setup::new(&cs, 64, near, ThreadId::FsZero);
        let big: Vec<u8> = (0..RECORD_DATA_MAX).map(|i| (i * 13 + 1) as u8).collect();
        let small = *b"xyz";
        let a = [big.as_ptr() as u64, 2, 3, 4, 5, small.as_ptr() as u64];
        assert_eq!(s.probed()(a[0], a[1], a[2], a[3], a[4], a[5]), expected(a));
        let mut r = s.reader();
        let mut got = Vec::new();
        r.drain(|rec| got.push((rec.slot, rec.ptr, rec.data.to_vec(), rec.faulted)));
        assert_eq!(
            got,
            [
                (1, a[0], big.clone(), false),
                (2, a[5], small.to_vec(), false),
                (4, 0, words_bytes(&a[..2]), false)
            ]
        );
    }
}

fn words_bytes(w: &[u64]) -> Vec<u8> {
    w.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The fault table lists exactly the copies from the program's memory, and a fault
/// there, resumed as a tracer would, commits the record as faulted with the bytes read
/// before it, counts it, and the program runs on with the right result.
#[test]
fn a_fault_in_mem_is_resumed_committed_as_faulted() {
    let cs = [
        Collector {
            slot: 1,
            action: Action::Mem { arg: 2, len: 200 },
        },
        Collector {
            slot: 2,
            action: Action::Args(2),
        },
        Collector {
            slot: 3,
            action: Action::Mem { arg: 1, len: 8 },
        },
    ];
    let s = Box::leak(Box::new(Setup::new(&cs, 64, true, ThreadId::FsZero)));
    let map = &s.built.map;
    let faults: Vec<_> = map.faults().collect();
    assert_eq!(faults.len(), 2);
    for ((ip, f), slot) in faults.iter().zip([1, 3]) {
        assert_eq!(f.slot, slot);
        assert_eq!(map.fault(*ip), Some(*f));
        assert!(map.contains(f.resume) && map.locate(f.resume) == Some(Location::Inside));
        let off = (ip - map.addr()) as usize;
        let insn = Decoder::with_ip(64, &s.built.bytes[off..], *ip, DecoderOptions::NONE).decode();
        assert_eq!(insn.mnemonic(), Mnemonic::Movsb);
        assert!(insn.has_rep_prefix());
    }
    // Every other instruction reads only the stack, the area (through r11, rbx, rip or,
    // for the hits, rdx = the thread's stripe of the counters), or the literals.
    let mut dec = Decoder::with_ip(64, &s.built.bytes, map.addr(), DecoderOptions::NONE);
    for insn in &mut dec {
        if insn.mnemonic() == Mnemonic::Int3 {
            break; // the literals follow
        }
        if map.fault(insn.ip()).is_none() && insn.op_count() > 0 {
            use iced_x86::Register as R;
            let mem = (0..insn.op_count()).any(|i| insn.op_kind(i) == iced_x86::OpKind::Memory);
            if mem && insn.mnemonic() != Mnemonic::Lea {
                let b = insn.memory_base();
                assert!(
                    matches!(b, R::RSP | R::R11 | R::RBX | R::RDX | R::RIP | R::None),
                    "{insn} at {:#x} reads program memory",
                    insn.ip()
                );
            }
        }
    }
    let served = serve_faults(map);
    let (readable, bad) = guard_pages();
    // 100 readable bytes, then the inaccessible page.
    let a = [readable, bad - 100, 0, 0, 0, 0];
    assert_eq!(s.probed()(a[0], a[1], a[2], a[3], a[4], a[5]), expected(a));
    assert_eq!(served.load(Ordering::SeqCst), 1);
    let mut r = s.reader();
    assert_eq!(r.counters(1).faulted, 1);
    assert_eq!(r.counters(1).hits, 1);
    let mut got = Vec::new();
    r.drain(|rec| got.push((rec.slot, rec.ptr, rec.data.to_vec(), rec.faulted)));
    let expect_partial: Vec<u8> = (4096 - 100..4096).map(|i| (i % 251) as u8).collect();
    let first8: Vec<u8> = (0..8).map(|i| (i % 251) as u8).collect();
    assert_eq!(
        got,
        [
            (1, bad - 100, expect_partial, true),
            (2, 0, words_bytes(&a[..2]), false),
            (3, readable, first8, false)
        ]
    );
    // A null pointer: nothing readable, the record is empty and faulted.
    let a = [readable, 0, 0, 0, 0, 0];
    assert_eq!(s.probed()(a[0], a[1], a[2], a[3], a[4], a[5]), expected(a));
    let mut got = Vec::new();
    r.drain(|rec| got.push((rec.slot, rec.ptr, rec.data.len(), rec.faulted)));
    assert_eq!(
        got,
        [(1, 0, 0, true), (2, 0, 16, false), (3, readable, 8, false)]
    );
    assert_eq!(r.counters(1).faulted, 2);
    assert_eq!(r.counters(3).faulted, 0);
}

/// Several sites share one area: each collector counts its own slot, records name
/// their site, and the ring interleaves them without loss (two functions, two threads
/// each, calling alternately).
#[test]
fn sites_sharing_an_area_keep_their_counters_and_records_apart() {
    const N: u64 = 3000;
    let s = Arc::new(Setup::new(&COLLECTORS, 1 << 15, false, ThreadId::FsZero));
    let other = [
        Collector {
            slot: 6,
            action: Action::Args(2),
        },
        Collector {
            slot: 0,
            action: Action::Count,
        },
    ];
    let g = s.add_site(1, 8, &other);
    let threads: Vec<_> = (0..4u64)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let f = if t % 2 == 0 { s.probed() } else { g };
                for i in 0..N {
                    let a = args_of(t, i);
                    assert_eq!(f(a[0], a[1], a[2], a[3], a[4], a[5]), expected(a));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let mut r = s.reader();
    // Slot 0 counts on both sites.
    assert_eq!(r.counters(0).hits, 4 * N);
    assert_eq!((r.counters(3).hits, r.counters(5).hits), (2 * N, 2 * N));
    assert_eq!(r.counters(6).hits, 2 * N);
    let mut per_site = [0u64; 2];
    let mut seen = HashSet::new();
    r.drain(|rec| {
        let w = words(rec.data);
        let (t, i) = (w[0], w[1]);
        match (rec.site, rec.slot) {
            (7, 3) => assert_eq!((t % 2, w.len()), (0, 6)),
            (8, 6) => assert_eq!((t % 2, w.len()), (1, 2)),
            other => panic!("record of {other:?}"),
        }
        per_site[(rec.site - 7) as usize] += 1;
        assert!(seen.insert((t, i)));
    });
    assert_eq!(per_site, [2 * N, 2 * N]);
}
