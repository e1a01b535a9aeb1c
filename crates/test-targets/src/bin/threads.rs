//! Multi-threaded: `--threads N` threads (default 4) run at once; thread `t` calls
//! `mp_work(t, j)` `(t + 1) * --base` times (default 200). Each thread prints its own
//! kernel thread id and call count; the main thread makes `--base` calls of its own.

use multiprobe_test_targets::util;
use std::hint::black_box;
use std::sync::{Arc, Barrier};

#[no_mangle]
#[inline(never)]
pub extern "C" fn mp_work(t: u64, j: u64) -> u64 {
    black_box(t)
        .wrapping_mul(1_000_003)
        .wrapping_add(black_box(j))
}

fn run(t: u64, calls: u64) -> (i32, u64) {
    let mut acc = 0u64;
    for j in 0..calls {
        acc = acc.wrapping_add(mp_work(t, j));
    }
    (util::gettid(), acc)
}

fn main() {
    let threads: u64 = util::arg("--threads", 4);
    let base: u64 = util::arg("--base", 200);
    util::maybe_wait();
    let barrier = Arc::new(Barrier::new(threads as usize + 1));
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let b = Arc::clone(&barrier);
            std::thread::spawn(move || {
                b.wait();
                run(t + 1, (t + 1) * base)
            })
        })
        .collect();
    barrier.wait();
    let (tid, acc) = run(0, base);
    println!("thread 0 tid={tid} calls={base} acc={acc}");
    for (t, h) in handles.into_iter().enumerate() {
        let (tid, acc) = h.join().expect("thread panicked");
        let calls = (t as u64 + 1) * base;
        println!("thread {} tid={tid} calls={calls} acc={acc}", t + 1);
    }
}
