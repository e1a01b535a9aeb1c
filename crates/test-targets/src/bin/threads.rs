//! Multi-threaded: `--threads N` threads (default 4) run at once; thread `t` calls
//! `mp_work(t, j)` `(t + 1) * --base` times (default 200). Each thread prints its own
//! kernel thread id and call count; the main thread makes `--base` calls of its own.
//! Every call of `mp_work` is followed by one of `mp_tload` (a load through a pointer,
//! in assembly: a first instruction that runs out of line when probed).

use multiprobe_test_targets::util;
use std::hint::black_box;
use std::sync::{Arc, Barrier};

std::arch::global_asm!(
    ".globl mp_tload",
    ".type mp_tload, @function",
    "mp_tload:",
    "mov rax, qword ptr [rdi]",
    "ret",
    ".size mp_tload, . - mp_tload",
);

extern "C" {
    fn mp_tload(p: *const u64) -> u64;
}

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
        // SAFETY: mp_tload reads the u64 it is given.
        acc = acc.wrapping_add(unsafe { mp_tload(&j) });
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
    util::maybe_wait_end();
}
