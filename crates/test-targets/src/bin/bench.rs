//! The benchmark tracee. Reads commands from stdin — one byte naming a site, then a
//! little-endian u64 count — calls that site's function `count` times, and answers
//! with one byte on stdout. EOF ends it. Sites: 0 = `mp_bench_nop` (`nop; ret`, the
//! one-byte instruction the raw baselines put their int3 over), 1 = `mp_bench_fn`
//! (`imul rax, rdi, 3; ret`: a first instruction that is executed out of line), 2 =
//! `mp_bench_push` (`push rbx; ...`: a first instruction that can be emulated, as at
//! most function entries).

use std::hint::black_box;
use std::io::{Read, Write};

std::arch::global_asm!(
    ".globl mp_bench_nop",
    ".type mp_bench_nop, @function",
    "mp_bench_nop:",
    "nop",
    "ret",
    ".size mp_bench_nop, . - mp_bench_nop",
    ".globl mp_bench_fn",
    ".type mp_bench_fn, @function",
    "mp_bench_fn:",
    "imul rax, rdi, 3",
    "ret",
    ".size mp_bench_fn, . - mp_bench_fn",
    ".globl mp_bench_push",
    ".type mp_bench_push, @function",
    "mp_bench_push:",
    "push rbx",
    "lea rax, [rdi + 1]",
    "pop rbx",
    "ret",
    ".size mp_bench_push, . - mp_bench_push",
);

extern "C" {
    fn mp_bench_nop();
    fn mp_bench_fn(x: u64) -> u64;
    fn mp_bench_push(x: u64) -> u64;
}

fn main() {
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut cmd = [0u8; 9];
    while stdin.read_exact(&mut cmd).is_ok() {
        let count = u64::from_le_bytes(cmd[1..].try_into().expect("8 bytes"));
        let mut acc = 0u64;
        for i in 0..count {
            // SAFETY: the functions are plain leaf functions defined above.
            unsafe {
                match cmd[0] {
                    0 => mp_bench_nop(),
                    2 => acc = acc.wrapping_add(mp_bench_push(black_box(i))),
                    _ => acc = acc.wrapping_add(mp_bench_fn(black_box(i))),
                }
            }
        }
        black_box(acc);
        stdout.write_all(&[1]).expect("answer");
        stdout.flush().expect("flush");
    }
}
