//! One hit of the in-process backend, against the floor and the naive scheme, measured
//! in the same run.
//!
//! * `raw-int3`: a function starting with `int3`, with an empty `SA_SIGINFO` SIGTRAP
//!   handler: one trap and `sigreturn`, nothing else. The floor for any trap-based probe.
//! * `naive/3`: the classic scheme — at the `int3`, run 3 handlers (with the registers
//!   loaded from the ucontext, as ours get them), put the original byte back, set TF;
//!   at the single-step trap, re-insert `int3` and clear TF. Two traps per hit. Its code
//!   sits in a writable page, so restoring and re-inserting are plain stores: the
//!   cheapest the naive scheme can be.
//! * `boosted/N`: multiprobe, N pre-handlers on `imul rax, rdi, 7` (relocated into a
//!   jump-back slot): one trap.
//! * `post/N`: the same site with N handlers of which one has a post-handler: the
//!   trap-after slot, two traps.
//! * `emulated/N`, `emulated-post/1`: on `push rbx` (emulated: one trap, post-handlers
//!   run right after emulation).
//! * `promoted/N`, `promoted-post/1`: the trap-free site (`push rbx; mov rbx, rdi; lea`
//!   replaced by a jump into a trampoline), N handlers counting per thread, against the
//!   same function unprobed; `boosted/3 again` and `kernel-uprobe` (a tracefs uprobe on
//!   the unprobed twin) paired with `promoted/3`; `promoted/3-2threads`: a second thread
//!   hits the same site at the same time (time per hit on this one).
//! * `promoted/3-sse`, `kernel-uprobe-sse`: the same function with a legacy SSE
//!   instruction (`movd xmm0, eax`) after the region, as compiled code has everywhere,
//!   against its unprobed twin: it pays any SSE/AVX state transition a hit leaves
//!   behind (a hit that restores `zmm` dirty costs ~10x more there on an Intel CPU
//!   that saves the upper halves at the transition).
//!
//! Each iteration calls the probed function once; handlers bump an atomic counter.
//! Every sample of a routine is immediately preceded by a sample of its baseline with
//! the same iteration count, and ratios are taken over those paired samples (see
//! `Ratios::measure_paired`). Run: `cargo bench -p multiprobe-benches --bench sigtrap`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use multiprobe_backend_sigtrap::SigtrapBackend;
use multiprobe_benches::uprobe::KernelUprobe;
use multiprobe_benches::{calls, tls_counter, tls_with_post, Ratios, Target};
use multiprobe_core::{FnHandler, Hit, PreAction, Regs};

core::arch::global_asm!(
    ".pushsection .text.mp_bench,\"ax\",@progbits",
    ".globl mp_b_raw",
    ".type mp_b_raw,@function",
    ".p2align 4",
    "mp_b_raw:",
    "int3",
    "ret",
    ".size mp_b_raw, . - mp_b_raw",
    ".globl mp_b_imul",
    ".type mp_b_imul,@function",
    ".p2align 4",
    "mp_b_imul:",
    "imul rax, rdi, 7",
    "ret",
    ".size mp_b_imul, . - mp_b_imul",
    ".globl mp_b_push",
    ".type mp_b_push,@function",
    ".p2align 4",
    "mp_b_push:",
    "push rbx",
    "mov rax, rdi",
    "pop rbx",
    "ret",
    ".size mp_b_push, . - mp_b_push",
    // Trap-free sites: `push rbx; mov rbx, rdi; lea rax, [rbx + 7]` is the region
    // (emulated first instruction), and an identical twin that is never probed by us.
    ".globl mp_b_jump",
    ".type mp_b_jump,@function",
    ".p2align 4",
    "mp_b_jump:",
    "push rbx",
    "mov rbx, rdi",
    "lea rax, [rbx + 7]",
    "pop rbx",
    "ret",
    ".size mp_b_jump, . - mp_b_jump",
    ".globl mp_b_twin",
    ".type mp_b_twin,@function",
    ".p2align 4",
    "mp_b_twin:",
    "push rbx",
    "mov rbx, rdi",
    "lea rax, [rbx + 7]",
    "pop rbx",
    "ret",
    ".size mp_b_twin, . - mp_b_twin",
    // The same with a legacy SSE instruction after the region, as compiled code has
    // everywhere: it pays any SSE/AVX transition the hit left behind.
    ".globl mp_b_jump_sse",
    ".type mp_b_jump_sse,@function",
    ".p2align 4",
    "mp_b_jump_sse:",
    "push rbx",
    "mov rbx, rdi",
    "lea rax, [rbx + 7]",
    "movd xmm0, eax",
    "movd eax, xmm0",
    "pop rbx",
    "ret",
    ".size mp_b_jump_sse, . - mp_b_jump_sse",
    ".globl mp_b_twin_sse",
    ".type mp_b_twin_sse,@function",
    ".p2align 4",
    "mp_b_twin_sse:",
    "push rbx",
    "mov rbx, rdi",
    "lea rax, [rbx + 7]",
    "movd xmm0, eax",
    "movd eax, xmm0",
    "pop rbx",
    "ret",
    ".size mp_b_twin_sse, . - mp_b_twin_sse",
    ".popsection",
);

extern "C" {
    fn mp_b_raw(x: u64) -> u64;
    fn mp_b_imul(x: u64) -> u64;
    fn mp_b_push(x: u64) -> u64;
    fn mp_b_jump(x: u64) -> u64;
    fn mp_b_twin(x: u64) -> u64;
    fn mp_b_jump_sse(x: u64) -> u64;
    fn mp_b_twin_sse(x: u64) -> u64;
}

/// `imul rax, rdi, 7; ret`, for the naive scheme's writable copy.
const IMUL_RET: [u8; 5] = [0x48, 0x6b, 0xc7, 0x07, 0xc3];
/// `EFLAGS.TF` as the ucontext's signed register word holds it.
const TF: i64 = multiprobe_core::backend::RFLAGS_TF as i64;

static NAIVE_PAGE: AtomicU64 = AtomicU64::new(0);
static NAIVE_COUNTERS: [AtomicU64; 3] = [const { AtomicU64::new(0) }; 3];

extern "C" fn empty_handler(_: i32, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn regs_of(uc: &libc::ucontext_t) -> Regs {
    let g = &uc.uc_mcontext.gregs;
    let r = |i: i32| g[i as usize] as u64;
    Regs {
        rax: r(libc::REG_RAX),
        rbx: r(libc::REG_RBX),
        rcx: r(libc::REG_RCX),
        rdx: r(libc::REG_RDX),
        rsi: r(libc::REG_RSI),
        rdi: r(libc::REG_RDI),
        rbp: r(libc::REG_RBP),
        rsp: r(libc::REG_RSP),
        r8: r(libc::REG_R8),
        r9: r(libc::REG_R9),
        r10: r(libc::REG_R10),
        r11: r(libc::REG_R11),
        r12: r(libc::REG_R12),
        r13: r(libc::REG_R13),
        r14: r(libc::REG_R14),
        r15: r(libc::REG_R15),
        rip: r(libc::REG_RIP),
        rflags: r(libc::REG_EFL),
        fs_base: 0,
        gs_base: 0,
    }
}

extern "C" fn naive_handler(_: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: kernel-provided pointers of an SA_SIGINFO handler.
    let (si, uc) = unsafe { (&*info, &mut *ctx.cast::<libc::ucontext_t>()) };
    let page = NAIVE_PAGE.load(Relaxed) as *mut u8;
    let g = &mut uc.uc_mcontext.gregs;
    if si.si_code == libc::SI_KERNEL {
        let mut regs = regs_of(uc);
        regs.rip -= 1;
        for c in &NAIVE_COUNTERS {
            black_box(&mut regs);
            c.fetch_add(1, Relaxed);
        }
        // SAFETY: the bench's own writable code page.
        unsafe { page.write_volatile(IMUL_RET[0]) };
        let g = &mut uc.uc_mcontext.gregs;
        g[libc::REG_RIP as usize] -= 1;
        g[libc::REG_EFL as usize] |= TF;
    } else {
        // The single step after the restored instruction.
        // SAFETY: as above.
        unsafe { page.write_volatile(0xcc) };
        g[libc::REG_EFL as usize] &= !TF;
    }
}

/// Run `f` with `handler` as the SIGTRAP action, then put the previous one back.
fn with_sigtrap<R>(
    handler: extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void),
    f: impl FnOnce() -> R,
) -> R {
    // SAFETY: installing and restoring a signal action with valid structures.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_NODEFER;
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGTRAP, &sa, &mut old);
        let r = f();
        libc::sigaction(libc::SIGTRAP, &old, std::ptr::null_mut());
        r
    }
}

fn naive_page() -> unsafe extern "C" fn(u64) -> u64 {
    // SAFETY: a fresh anonymous RWX mapping holding a copy of the function.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let p = p.cast::<u8>();
        std::ptr::copy_nonoverlapping(IMUL_RET.as_ptr(), p, IMUL_RET.len());
        p.write(0xcc);
        NAIVE_PAGE.store(p as u64, Relaxed);
        std::mem::transmute::<*mut u8, unsafe extern "C" fn(u64) -> u64>(p)
    }
}

fn counter(c: &Arc<AtomicU64>) -> impl Fn(&mut Hit<'_>) + Send + Sync + 'static {
    let c = Arc::clone(c);
    move |h: &mut Hit<'_>| {
        black_box(h.regs().rdi);
        c.fetch_add(1, Relaxed);
    }
}

fn with_post(c: &Arc<AtomicU64>) -> impl multiprobe_core::Handler {
    let (a, b) = (Arc::clone(c), Arc::clone(c));
    FnHandler::new()
        .pre(move |_h| {
            a.fetch_add(1, Relaxed);
            PreAction::Continue
        })
        .post(move |h| {
            black_box(h.regs().rax);
            b.fetch_add(1, Relaxed);
        })
}

fn raw(n: u64) -> Duration {
    with_sigtrap(empty_handler, || calls(mp_b_raw, n))
}

fn main() {
    let mut c = multiprobe_benches::criterion(100, 300, 2);
    let ratios = Ratios::new();
    // The trap figures keep their meaning: this registry never promotes its sites.
    let reg = multiprobe_core::Registry::new(SigtrapBackend::with_promotion(false));
    let naive = naive_page();
    let imul = mp_b_imul as *const () as u64;
    let push = mp_b_push as *const () as u64;
    let hits = Arc::new(AtomicU64::new(0));

    let mut g = c.benchmark_group("sigtrap");
    // Measure `name` = `ours(n)`, each sample preceded by `base(n)`, recorded as
    // `name` + " vs " + `base_name`.
    let mut bench = |name: &str,
                     base_name: &str,
                     base: &dyn Fn(u64) -> Duration,
                     ours: &dyn Fn(u64) -> Duration| {
        ratios.bench_paired(&mut g, name, base_name, ours, base);
    };
    bench("raw-int3", "unprobed", &|n| calls(mp_b_imul, n), &raw);
    for (name, addr, f, handlers, post) in [
        ("boosted/1", imul, mp_b_imul as Target, 1, false),
        ("boosted/3", imul, mp_b_imul, 3, false),
        ("post/1", imul, mp_b_imul, 1, true),
        ("post/3", imul, mp_b_imul, 3, true),
        ("emulated/1", push, mp_b_push, 1, false),
        ("emulated/3", push, mp_b_push, 3, false),
        ("emulated-post/1", push, mp_b_push, 1, true),
    ] {
        let mut guards = Vec::new();
        for k in 0..handlers {
            guards.push(if post && k == 0 {
                reg.register_handler(addr, with_post(&hits)).unwrap()
            } else {
                reg.register(addr, counter(&hits)).unwrap()
            });
        }
        bench(name, "raw-int3", &raw, &|n| calls(f, n));
        if name == "boosted/3" {
            // The naive scheme with the same three handlers, paired with boosted/3.
            bench("naive/3", "boosted/3", &|n| calls(f, n), &|n| {
                with_sigtrap(naive_handler, || calls(naive, n))
            });
        }
        for gd in guards {
            assert!(gd.unregister().unwrap().hits > 0);
        }
    }
    // Trap-free: the same kind of handlers on a promoted site.
    let jreg = multiprobe_core::Registry::new(SigtrapBackend::with_promotion(true));
    let jump = mp_b_jump as *const () as u64;
    let mut guards = Vec::new();
    for (name, handlers, post) in [
        ("promoted/1", 1, false),
        ("promoted/3", 3, false),
        ("promoted-post/1", 1, true),
    ] {
        for gd in guards.drain(..) {
            drop(gd);
        }
        jreg.synchronize().unwrap();
        for k in 0..handlers {
            guards.push(if post && k == 0 {
                jreg.register_handler(jump, tls_with_post()).unwrap()
            } else {
                jreg.register(jump, tls_counter).unwrap()
            });
        }
        assert_eq!(
            jreg.backend().mode_at(jump),
            Some(multiprobe_backend_sigtrap::Mode::Jump),
            "{name}: the site must be promoted"
        );
        bench(name, "unprobed", &|n| calls(mp_b_twin, n), &|n| {
            calls(mp_b_jump, n)
        });
        if name == "promoted/3" {
            {
                let boosted_again = |n| {
                    let gs: Vec<_> = (0..3)
                        .map(|_| reg.register(imul, counter(&hits)).unwrap())
                        .collect();
                    let d = calls(mp_b_imul, n);
                    drop(gs);
                    d
                };
                bench(
                    "boosted/3 again",
                    "promoted/3",
                    &|n| calls(mp_b_jump, n),
                    &boosted_again,
                );
                match KernelUprobe::new("twin", mp_b_twin as *const () as u64) {
                    Ok(u) => {
                        bench(
                            "kernel-uprobe",
                            "promoted/3",
                            &|n| calls(mp_b_jump, n),
                            &|n| calls(mp_b_twin, n),
                        );
                        drop(u);
                    }
                    Err(e) => println!("NOTE kernel uprobe not measured: {e}"),
                }
                // The same with a legacy SSE instruction after the region (a site of
                // its own with three handlers; the kernel's uprobe on its twin).
                let jump_sse = mp_b_jump_sse as *const () as u64;
                let sse_guards: Vec<_> = (0..3)
                    .map(|_| jreg.register(jump_sse, tls_counter).unwrap())
                    .collect();
                assert_eq!(
                    jreg.backend().mode_at(jump_sse),
                    Some(multiprobe_backend_sigtrap::Mode::Jump),
                    "promoted/3-sse: the site must be promoted"
                );
                bench(
                    "promoted/3-sse",
                    "unprobed-sse",
                    &|n| calls(mp_b_twin_sse, n),
                    &|n| calls(mp_b_jump_sse, n),
                );
                match KernelUprobe::new("twin_sse", mp_b_twin_sse as *const () as u64) {
                    Ok(u) => {
                        bench(
                            "kernel-uprobe-sse",
                            "promoted/3-sse",
                            &|n| calls(mp_b_jump_sse, n),
                            &|n| calls(mp_b_twin_sse, n),
                        );
                        drop(u);
                    }
                    Err(e) => println!("NOTE kernel uprobe (sse) not measured: {e}"),
                }
                drop(sse_guards);
                // Two threads on the one site: time per hit on this thread while another
                // hits it as often.
                bench(
                    "promoted/3-2threads",
                    "promoted/3",
                    &|n| calls(mp_b_jump, n),
                    &|n| {
                        let other = std::thread::spawn(move || calls(mp_b_jump, n));
                        let d = calls(mp_b_jump, n);
                        other.join().unwrap();
                        d
                    },
                );
            }
        }
    }
    g.finish();
    c.final_summary();
    drop(guards);
    assert!(NAIVE_COUNTERS.iter().all(|c| c.load(Relaxed) > 0));
    ratios.print_means();
    ratios.check("boosted/3", "raw-int3", 1.15, true);
    ratios.check("naive/3", "boosted/3", 2.5, false);
    ratios.check("post/1", "raw-int3", 2.3, true);
    ratios.check("post/3", "raw-int3", 2.3, true);
    ratios.paired_ratio("raw-int3", "unprobed");
    for name in ["boosted/1", "emulated/1", "emulated/3", "emulated-post/1"] {
        ratios.paired_ratio(name, "raw-int3");
    }
    // Trap-free targets.
    for name in ["promoted/1", "promoted/3", "promoted-post/1"] {
        ratios.paired_ratio(name, "unprobed");
    }
    ratios.paired_ratio("promoted/3-sse", "unprobed-sse");
    if let Some(ns) = ratios.mean_ns("promoted/3") {
        let ok = ns <= 50.0;
        println!(
            "TARGET promoted/3 <= 50 ns a hit: {ns:.2} ns: {}",
            if ok { "met" } else { "MISSED" }
        );
    }
    ratios.check("boosted/3 again", "promoted/3", 25.0, false);
    ratios.check("kernel-uprobe", "promoted/3", 20.0, false);
    ratios.check("kernel-uprobe-sse", "promoted/3-sse", 20.0, false);
    ratios.check("promoted/3-2threads", "promoted/3", 1.2, true);
    if let (Some(p), Some(b)) = (
        ratios.mean_ns("promoted-post/1"),
        ratios.mean_ns("promoted/1"),
    ) {
        let extra = p - b;
        println!(
            "TARGET a post-handler adds <= 10 ns: {extra:.2} ns (promoted-post/1 {p:.2} - promoted/1 {b:.2}): {}",
            if extra <= 10.0 { "met" } else { "MISSED" }
        );
    }
}
