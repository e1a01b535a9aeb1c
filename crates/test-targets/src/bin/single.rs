//! Single-threaded: calls `mp_add(i, 3 * i)` and `mp_args8(i, .., i + 7)` `--iters`
//! times and prints its own counts and sums, then exits with `--exit` (default 0).
//! `--wait` prints `ready PID` and waits for a line on stdin before the loop.

use multiprobe_test_targets::util;
use std::hint::black_box;

#[no_mangle]
#[inline(never)]
pub extern "C" fn mp_add(a: u64, b: u64) -> u64 {
    black_box(a).wrapping_add(black_box(b))
}

#[no_mangle]
#[inline(never)]
#[allow(clippy::too_many_arguments)]
pub extern "C" fn mp_args8(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64, g: u64, h: u64) -> u64 {
    black_box(a ^ b.rotate_left(1) ^ c.rotate_left(2) ^ d.rotate_left(3))
        ^ black_box(e.rotate_left(4) ^ f.rotate_left(5) ^ g.rotate_left(6) ^ h.rotate_left(7))
}

fn main() {
    let iters: u64 = util::arg("--iters", 1000);
    let code: i32 = util::arg("--exit", 0);
    util::maybe_wait();
    let (mut sum, mut mix) = (0u64, 0u64);
    for i in 0..iters {
        sum = sum.wrapping_add(mp_add(i, 3 * i));
        mix ^= mp_args8(i, i + 1, i + 2, i + 3, i + 4, i + 5, i + 6, i + 7);
    }
    println!("mp_add calls={iters} sum={sum}");
    println!("mp_args8 calls={iters} mix={mix}");
    std::process::exit(code);
}
