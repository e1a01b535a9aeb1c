//! Registers on demand: a hit costs `PTRACE_GETREGS` only when a handler (or the
//! emulation) needs the registers, and reads them at once (not `rip` first) when the
//! thread's last hit needed them. Counted through the ptrace requests the tracer
//! thread makes (`baseline::requests`), so these tests say exactly what a hit costs.

mod common;

use std::io::{Read, Write};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use multiprobe_backend_ptrace::baseline::{requests, Requests};
use multiprobe_backend_ptrace::{ExitStatus, Stop, Tracer};
use multiprobe_core::{FnHandler, Hit, PreAction};

const NOP: u8 = 0;
const IMUL: u8 = 1;
const PUSH: u8 = 2;

/// `mp-bench` under the tracer, driven through its pipes.
struct Bench {
    t: Tracer,
    child: Child,
}

impl Bench {
    fn new() -> Bench {
        let mut cmd = common::command("mp-bench", &[]);
        cmd.stdin(Stdio::piped());
        let mut t = Tracer::spawn(&mut cmd).unwrap();
        let child = t.take_child().unwrap();
        Bench { t, child }
    }

    fn addr(&self, site: u8) -> u64 {
        let sym = match site {
            NOP => "mp_bench_nop",
            PUSH => "mp_bench_push",
            _ => "mp_bench_fn",
        };
        self.t.resolve(sym).unwrap()
    }

    /// Have the program call `site` `n` times (`mp_bench_fn(i)` for i in 0..n), serving
    /// hits until `count` has gone up by `n`; the requests the tracer made meanwhile.
    fn calls(&mut self, site: u8, n: u64, count: &AtomicU64) -> Requests {
        let target = count.load(Relaxed) + n;
        let before = requests();
        let mut cmd = [0u8; 9];
        cmd[0] = site;
        cmd[1..].copy_from_slice(&n.to_le_bytes());
        self.child.stdin.as_mut().unwrap().write_all(&cmd).unwrap();
        let stop = self.t.run_until(|| count.load(Relaxed) >= target).unwrap();
        assert_eq!(stop, None);
        let spent = requests() - before;
        let mut done = [0u8];
        self.child
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut done)
            .unwrap();
        spent
    }

    fn end(mut self) {
        drop(self.child.stdin.take());
        assert_eq!(self.t.run().unwrap(), Stop::Exited(ExitStatus::Code(0)));
    }
}

fn per_hit(n: u64, get_regs: u64, peek: u64, poke: u64, siginfo: u64) -> Requests {
    Requests {
        get_regs: n * get_regs,
        set_regs: 0,
        peek_user: n * peek,
        poke_user: n * poke,
        get_sig_info: n * siginfo,
        cont: n,
        other: 0,
    }
}

#[test]
fn a_counting_hit_fetches_no_registers() {
    let mut b = Bench::new();
    // Per site: the hits (first handler) and the calls of all three handlers.
    let hits = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let calls = Arc::new(AtomicU64::new(0));
    let mut guards = Vec::new();
    for site in [NOP, IMUL] {
        for k in 0..3 {
            let (h, c) = (Arc::clone(&hits[usize::from(site)]), Arc::clone(&calls));
            let handler = move |_: &mut Hit<'_>| {
                if k == 0 {
                    h.fetch_add(1, Relaxed);
                }
                c.fetch_add(1, Relaxed);
            };
            guards.push(b.t.registry().register(b.addr(site), handler).unwrap());
        }
    }
    // The first hit of the relocated site maps the out-of-line page (an injected mmap,
    // which saves and restores the registers): not counted.
    b.calls(IMUL, 1, &hits[1]);
    let n = 100;
    // Relocated: read rip to know the site, move it to the jump-back slot, resume.
    let spent = b.calls(IMUL, n, &hits[1]);
    assert_eq!(spent, per_hit(n, 0, 1, 1, 0));
    // Emulated one-byte nop: read rip, ask whether the SIGTRAP came from the int3 (a
    // thread standing after a one-byte instruction could also have been sent one);
    // the kernel's rip is already the next instruction.
    let spent = b.calls(NOP, n, &hits[0]);
    assert_eq!(spent, per_hit(n, 0, 1, 0, 1));
    assert_eq!(calls.load(Relaxed), 3 * (2 * n + 1));
    let nop = b.addr(NOP);
    for g in &guards {
        let want = if g.addr() == nop { n } else { n + 1 };
        assert_eq!(g.stats().unwrap().hits, want);
    }
    drop(guards);
    b.end();
}

/// An instruction that could be emulated (`push rbx`) but whose hit has no post-handler
/// goes through its jump-back slot: emulating would read the registers and write `rsp`,
/// `rip` and the stack; the slot needs one write of `rip`. With a post-handler it is
/// emulated, so the posts run in the same stop.
#[test]
fn an_emulable_instruction_without_posts_goes_through_its_slot() {
    let mut b = Bench::new();
    let hits = Arc::new(AtomicU64::new(0));
    let h = Arc::clone(&hits);
    let g =
        b.t.registry()
            .register(b.addr(PUSH), move |_| {
                h.fetch_add(1, Relaxed);
            })
            .unwrap();
    b.calls(PUSH, 1, &hits); // maps the out-of-line page
    let n = 100;
    // `push rbx` is one byte long, so the SIGTRAP's origin is asked too (see the nop).
    assert_eq!(b.calls(PUSH, n, &hits), per_hit(n, 0, 1, 1, 1));
    // With a post-handler: emulated, the post runs at once, one stop per hit.
    let posts = Arc::new(AtomicU64::new(0));
    let p = Arc::clone(&posts);
    let with_post =
        b.t.registry()
            .register_handler(
                b.addr(PUSH),
                FnHandler::new().post(move |_| {
                    p.fetch_add(1, Relaxed);
                }),
            )
            .unwrap();
    let spent = b.calls(PUSH, n, &hits);
    assert_eq!(spent.cont, n, "one stop per hit");
    assert_eq!(posts.load(Relaxed), n);
    assert_eq!(g.stats().unwrap().hits, 2 * n + 1);
    drop((g, with_post));
    b.end();
}

#[test]
fn handlers_reading_rdi_see_it_for_one_getregs_per_hit() {
    let mut b = Bench::new();
    let count = Arc::new(AtomicU64::new(0));
    let sums = [Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0))];
    let addr = b.addr(IMUL);
    let c = Arc::clone(&count);
    let _counting =
        b.t.registry()
            .register(addr, move |_| {
                c.fetch_add(1, Relaxed);
            })
            .unwrap();
    let readers: Vec<_> = sums
        .iter()
        .map(|s| {
            let s = Arc::clone(s);
            let h = move |hit: &mut Hit<'_>| {
                assert_eq!(hit.regs().rip, hit.addr());
                s.fetch_add(hit.regs().rdi, Relaxed);
            };
            b.t.registry().register(addr, h).unwrap()
        })
        .collect();
    b.calls(IMUL, 1, &count); // places the slots
    let n = 100;
    // mp_bench_fn(i) for i in 0..n.
    let want = n * (n - 1) / 2;
    let sums_now = || [sums[0].load(Relaxed), sums[1].load(Relaxed)];

    let before = sums_now();
    let spent = b.calls(IMUL, n, &count);
    // The last hit read the registers, so every hit reads them at once, without
    // reading rip first; once for both readers; nothing but rip written back.
    assert_eq!(spent, per_hit(n, 1, 0, 1, 0));
    assert_eq!(sums_now(), [before[0] + want, before[1] + want]);

    // Only counting: the first hit still guesses that the registers are wanted.
    for r in &readers {
        r.disable().unwrap();
    }
    let spent = b.calls(IMUL, n, &count);
    let guess = Requests {
        get_regs: 1,
        peek_user: n - 1,
        ..per_hit(n, 0, 0, 1, 0)
    };
    assert_eq!(spent, guess);

    // Reading again: the first hit reads rip, then the registers.
    for r in &readers {
        r.enable().unwrap();
    }
    let before = sums_now();
    let spent = b.calls(IMUL, n, &count);
    let guess = Requests {
        peek_user: 1,
        ..per_hit(n, 1, 0, 1, 0)
    };
    assert_eq!(spent, guess);
    assert_eq!(sums_now(), [before[0] + want, before[1] + want]);
    b.end();
}

#[test]
fn a_handler_that_returns_early_redirects_through_fetched_registers() {
    // mp_add(i, 3i) is made to return 7 at once: rip from the stack, rsp past it.
    let iters = 40u64;
    let mut cmd = common::command("mp-single", &["--iters", "40"]);
    let mut t = Tracer::spawn(&mut cmd).unwrap();
    let add = t.resolve("mp_add").unwrap();
    let (before, after) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let b = Arc::clone(&before);
    let _counting = t
        .registry()
        .register(add, move |_| {
            b.fetch_add(1, Relaxed);
        })
        .unwrap();
    let _returns = t
        .registry()
        .register_handler(
            add,
            FnHandler::new().pre(|hit| {
                let ret = hit.mem().read_u64(hit.regs().rsp).unwrap();
                let r = hit.regs_mut();
                r.rax = 7;
                r.rsp += 8;
                r.rip = ret;
                PreAction::Continue // the moved rip alone ends the walk
            }),
        )
        .unwrap();
    let a = Arc::clone(&after);
    let _never = t
        .registry()
        .register(add, move |_| {
            a.fetch_add(1, Relaxed);
        })
        .unwrap();
    let out = common::run_to_exit(&mut t, 0);
    assert!(
        out.contains(&format!("mp_add calls={iters} sum={}\n", 7 * iters)),
        "{out}"
    );
    assert_eq!(before.load(Relaxed), iters);
    assert_eq!(
        after.load(Relaxed),
        0,
        "handlers after a redirect do not run"
    );
}
