//! The cost of multiprobe-x86's trampoline itself, without any backend: a function whose
//! first two instructions are replaced by the `jmp` into a trampoline, against the same
//! function unprobed, paired samples in one run.
//!
//! * `empty/registers`, `empty/xsave`: the entry point returns at once; the difference
//!   is the state save (register moves against `XSAVEC`/`XRSTOR`).
//! * `dispatch/N`: the entry runs the core's dispatch with N counting pre-handlers (a
//!   registry over the core's test backend), in thread context.
//! * `dispatch-post/1`: one handler with a post-handler, the first instruction
//!   emulated in the entry and the posts run right after (what a backend does for an
//!   emulated first instruction); `post-stub/1`: the same through the post copy and the
//!   post stub (a second save, for first instructions that are not emulated).
//!
//! Run: `cargo bench -p multiprobe-benches --bench trampoline`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use multiprobe_benches::Ratios;
use multiprobe_core::backend::{Dispatcher, NoMemory, PreOutcome, ThreadState};
use multiprobe_core::testing::{TestBackend, TestSite};
use multiprobe_core::{FnHandler, Hit, PreAction, Registry};
use multiprobe_x86::{
    analyze, analyze_region, build_common, build_trampoline, Code, CpuState, Frame, Plan,
    StateSave, Trampoline, TrampolineSpec, Unwind, EXIT_POST, EXIT_REGION,
};

const PAGE: usize = 1 << 16;

struct Page(*mut u8);
// SAFETY: a process-wide mapping written once during set-up.
unsafe impl Send for Page {}
// SAFETY: as above.
unsafe impl Sync for Page {}

fn page() -> Page {
    // SAFETY: a fresh anonymous RWX mapping for generated code.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    Page(p.cast())
}

impl Page {
    fn addr(&self, off: usize) -> u64 {
        self.0 as u64 + off as u64
    }
    fn write(&self, off: usize, b: &[u8]) {
        assert!(off + b.len() <= PAGE);
        // SAFETY: inside our mapping; nothing executes it while set-up writes.
        unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), self.0.add(off), b.len()) };
    }
}

type Target = extern "C" fn(u64) -> u64;

/// `lea rax, [rdi+1]; lea rax, [rax+2]; ret` at `off`.
fn function(p: &Page, off: usize) -> (Target, Vec<u8>) {
    let mut a = CodeAssembler::new(64).unwrap();
    a.lea(rax, ptr(rdi + 1)).unwrap();
    a.lea(rax, ptr(rax + 2)).unwrap();
    a.ret().unwrap();
    let code = a.assemble(p.addr(off)).unwrap();
    p.write(off, &code);
    // SAFETY: the code just written follows the C ABI for `u64 -> u64`.
    (
        unsafe { std::mem::transmute::<u64, Target>(p.addr(off)) },
        code,
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Empty,
    Dispatch,
}

static MODE: AtomicU64 = AtomicU64::new(0);
/// Run posts through the stub (1) or emulate and run them in the entry (0).
static VIA_STUB: AtomicU64 = AtomicU64::new(0);
static DISPATCHER: OnceLock<Dispatcher<TestSite>> = OnceLock::new();
static MAPS: OnceLock<Vec<(u64, Trampoline)>> = OnceLock::new();
/// The first instruction's plan at the post-handler copy.
static PLAN: OnceLock<Plan> = OnceLock::new();

std::thread_local! {
    static TS: ThreadState = const { ThreadState::new() };
}

fn map_of(addr: u64) -> &'static Trampoline {
    let maps = MAPS.get().unwrap();
    &maps.iter().find(|(a, _)| *a == addr).unwrap().1
}

unsafe extern "C" fn pre(frame: *mut Frame, _ctx: u64, _event: u64) -> u64 {
    // SAFETY: the trampoline's frame, ours for the call.
    let f = unsafe { &mut *frame };
    if MODE.load(Relaxed) == Mode::Empty as u64 {
        return EXIT_REGION;
    }
    let d = DISPATCHER.get().unwrap();
    let addr = f.regs.rip;
    TS.with(|ts| match d.pre(ts, addr, 1, &mut f.regs, &NoMemory) {
        PreOutcome::Step(step) if step.wants_post() => {
            step.defer_post();
            if VIA_STUB.load(Relaxed) == 1 {
                return EXIT_POST;
            }
            let t = map_of(addr);
            PLAN.get().unwrap().emulate(&mut f.regs, &NoMemory).unwrap();
            d.post(ts, addr, 1, &mut f.regs, &NoMemory);
            f.leave(t, false, &NoMemory)
        }
        _ => EXIT_REGION,
    })
}

unsafe extern "C" fn post(frame: *mut Frame, _ctx: u64, _event: u64) -> u64 {
    // SAFETY: as in `pre`.
    let f = unsafe { &mut *frame };
    let d = DISPATCHER.get().unwrap();
    let t = map_of_post(f.regs.rip);
    TS.with(|ts| d.post(ts, t.region().addr(), 1, &mut f.regs, &NoMemory));
    f.leave_after(t, t.continuation(), &NoMemory)
}

fn map_of_post(cont: u64) -> &'static Trampoline {
    let maps = MAPS.get().unwrap();
    &maps
        .iter()
        .find(|(_, t)| t.continuation() == cont)
        .unwrap()
        .1
}

fn calls(f: Target, n: u64) -> Duration {
    let f = black_box(f);
    let t = Instant::now();
    for i in 0..n {
        black_box(f(black_box(i)));
    }
    t.elapsed()
}

fn main() {
    let mut c = multiprobe_benches::criterion(100, 300, 2);
    let ratios = Ratios::new();
    let p = page();
    let cpu = CpuState::get();
    let (direct, _) = function(&p, 0);
    let common_regs = build_common(StateSave::Registers, &cpu, p.addr(0x8000)).unwrap();
    p.write(0x8000, &common_regs.bytes);
    let common_xsave = build_common(StateSave::Xsave, &cpu, p.addr(0x9000)).unwrap();
    p.write(0x9000, &common_xsave.bytes);
    // Four probed copies: (function offset, trampoline offset, common stub).
    let mut maps = Vec::new();
    let mut probed = Vec::new();
    for (i, common) in [0x8000, 0x9000, 0x8000, 0x8000].into_iter().enumerate() {
        let off = 0x100 * (i + 1);
        let (f, code) = function(&p, off);
        let base = p.addr(off);
        let func = Code {
            addr: base,
            bytes: &code,
        };
        let region = analyze_region(base, func, Some(func.range()), Unwind::NoLandingPads).unwrap();
        let spec = TrampolineSpec {
            region: &region,
            ctx: 0,
            pre: pre as *const () as u64,
            post: post as *const () as u64,
            common: p.addr(common),
        };
        let t_off = 0x1000 + 0x800 * i;
        let built = build_trampoline(&spec, p.addr(t_off)).unwrap();
        p.write(t_off, &built.bytes);
        let (jmp, n) = region.jump_bytes(built.map.addr()).unwrap();
        p.write(off, &jmp[..n]);
        if i == 3 {
            let _ = PLAN.set(analyze(base, func, None).unwrap());
        }
        maps.push((base, built.map));
        probed.push((f, base));
    }
    let _ = MAPS.set(maps);
    let reg = Registry::new(TestBackend::new());
    let _ = DISPATCHER.set(reg.dispatcher());
    let hits = Arc::new(AtomicU64::new(0));
    let counter = |h: &Arc<AtomicU64>| {
        let h = Arc::clone(h);
        move |hit: &mut Hit<'_>| {
            black_box(hit.regs().rdi);
            h.fetch_add(1, Relaxed);
        }
    };

    let mut g = c.benchmark_group("trampoline");
    let mut bench = |name: &str, f: Target| {
        ratios.bench_paired(
            &mut g,
            name,
            "direct",
            |n| calls(f, n),
            |n| calls(direct, n),
        );
    };
    MODE.store(Mode::Empty as u64, Relaxed);
    bench("empty/registers", probed[0].0);
    bench("empty/xsave", probed[1].0);
    MODE.store(Mode::Dispatch as u64, Relaxed);
    let one = reg.register(probed[2].1, counter(&hits)).unwrap();
    bench("dispatch/1", probed[2].0);
    let more: Vec<_> = (0..2)
        .map(|_| reg.register(probed[2].1, counter(&hits)).unwrap())
        .collect();
    bench("dispatch/3", probed[2].0);
    let (a, b) = (Arc::clone(&hits), Arc::clone(&hits));
    let with_post = reg
        .register_handler(
            probed[3].1,
            FnHandler::new()
                .pre(move |_h: &mut Hit<'_>| {
                    a.fetch_add(1, Relaxed);
                    PreAction::Continue
                })
                .post(move |h: &mut Hit<'_>| {
                    black_box(h.regs().rax);
                    b.fetch_add(1, Relaxed);
                }),
        )
        .unwrap();
    bench("dispatch-post/1", probed[3].0);
    VIA_STUB.store(1, Relaxed);
    bench("post-stub/1", probed[3].0);
    g.finish();
    c.final_summary();
    assert!(one.stats().unwrap().hits > 0 && with_post.stats().unwrap().hits > 0);
    drop(more);
    ratios.print_means();
    for name in [
        "empty/registers",
        "empty/xsave",
        "dispatch/1",
        "dispatch/3",
        "dispatch-post/1",
        "post-stub/1",
    ] {
        ratios.paired_ratio(name, "direct");
    }
}
