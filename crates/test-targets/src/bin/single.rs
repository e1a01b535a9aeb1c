//! Single-threaded: calls `mp_add(i, 3 * i)`, `mp_args8(i, .., i + 7)`, `mp_load(&i)`
//! and `mp_riprel(i)` `--iters` times and prints its own counts and sums, then exits with `--exit` (default 0).
//! `--wait` prints `ready PID` and waits for a line on stdin before the loop, and for
//! stdin to close before exiting;
//! `--then-exec` execs this program again (without that flag) after printing.

use multiprobe_test_targets::util;
use std::hint::black_box;

// Two functions whose first instruction cannot be emulated, so probes on them run it
// out of line: a load through a pointer, and a RIP-relative load (its slot must be
// placed within reach of `MP_ONE`).
std::arch::global_asm!(
    ".globl mp_load",
    ".type mp_load, @function",
    "mp_load:",
    "mov rax, qword ptr [rdi]",
    "ret",
    ".size mp_load, . - mp_load",
    ".globl mp_riprel",
    ".type mp_riprel, @function",
    "mp_riprel:",
    "mov rax, qword ptr [rip + {one}]",
    "add rax, rdi",
    "ret",
    ".size mp_riprel, . - mp_riprel",
    one = sym MP_ONE,
);

#[no_mangle]
static MP_ONE: u64 = 1;

extern "C" {
    fn mp_load(p: *const u64) -> u64;
    fn mp_riprel(x: u64) -> u64;
}

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
    let (mut sum, mut mix, mut loaded) = (0u64, 0u64, 0u64);
    for i in 0..iters {
        sum = sum.wrapping_add(mp_add(i, 3 * i));
        mix ^= mp_args8(i, i + 1, i + 2, i + 3, i + 4, i + 5, i + 6, i + 7);
        // SAFETY: mp_load reads the u64 it is given; mp_riprel reads MP_ONE.
        unsafe {
            loaded = loaded.wrapping_add(mp_load(&i));
            loaded = loaded.wrapping_add(mp_riprel(i));
        }
    }
    println!("mp_add calls={iters} sum={sum}");
    println!("mp_args8 calls={iters} mix={mix}");
    println!("mp_load calls={iters} mp_riprel calls={iters} loaded={loaded}");
    util::maybe_wait_end();
    if util::flag("--then-exec") {
        use std::io::Write;
        std::io::stdout().flush().expect("flush");
        let args = std::env::args().skip(1).filter(|a| a != "--then-exec");
        let me = std::env::current_exe().expect("current_exe");
        let err =
            std::os::unix::process::CommandExt::exec(std::process::Command::new(me).args(args));
        panic!("exec failed: {err}");
    }
    std::process::exit(code);
}
