//! Hits on a promoted (trap-free) site, for instruction counts: the load-independent
//! measure of the trampoline path on a shared machine.
//!
//! `promoted_hits N H [post|ret]`: registers `H` handlers counting per thread (the first
//! with a post-handler if `post`, with a return hook that counts too if `ret`: the
//! return then goes through the return trampoline) on the site the `sigtrap` bench uses (`push rbx; mov
//! rbx, rdi; lea rax, [rbx+7]; pop rbx; ret`, promoted to a jump), then calls it `N`
//! times. Per hit = the difference between `N` and `0` hits over `N`:
//!
//! ```text
//! cargo build --release -p multiprobe-benches --example promoted_hits
//! valgrind --tool=callgrind target/release/examples/promoted_hits 100000 3
//! valgrind --tool=callgrind target/release/examples/promoted_hits 0 3
//! ```
//!
//! (Under valgrind the CPU has no AVX-512, so the common stub saves `ymm0-15`, not
//! `zmm0-31` and the opmasks: the count is the code's, not this machine's vector save.)

use std::hint::black_box;

use multiprobe_backend_sigtrap::{Mode, SigtrapBackend};
use multiprobe_benches::{counted_on_this_thread, tls_counter, tls_with_post, tls_with_return};
use multiprobe_core::Registry;

core::arch::global_asm!(
    ".pushsection .text.mp_hits,\"ax\",@progbits",
    ".globl mp_h_jump",
    ".type mp_h_jump,@function",
    ".p2align 4",
    "mp_h_jump:",
    "push rbx",
    "mov rbx, rdi",
    "lea rax, [rbx + 7]",
    "pop rbx",
    "ret",
    ".size mp_h_jump, . - mp_h_jump",
    ".popsection",
);

extern "C" {
    fn mp_h_jump(x: u64) -> u64;
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: promoted_hits HITS HANDLERS [post|ret]";
    let hits: u64 = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let handlers: usize = args.next().and_then(|a| a.parse().ok()).expect(usage);
    let extra = args.next();
    let post = extra.as_deref() == Some("post");
    let ret = extra.as_deref() == Some("ret");
    let reg = Registry::new(SigtrapBackend::with_promotion(true));
    let site = mp_h_jump as *const () as u64;
    let guards: Vec<_> = (0..handlers)
        .map(|k| {
            if post && k == 0 {
                reg.register_handler(site, tls_with_post())
            } else if ret && k == 0 {
                reg.register_handler(site, tls_with_return())
            } else {
                reg.register(site, tls_counter)
            }
            .expect("register")
        })
        .collect();
    assert_eq!(
        reg.backend().mode_at(site),
        Some(Mode::Jump),
        "not promoted"
    );
    for i in 0..hits {
        // SAFETY: integer in, integer out.
        black_box(unsafe { mp_h_jump(black_box(i)) });
    }
    let expected = hits * (handlers as u64 + u64::from((post || ret) && handlers > 0));
    assert_eq!(counted_on_this_thread(), expected, "every hit counted");
    drop(guards);
}
