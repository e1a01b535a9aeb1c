//! Collecting actions in the tracee (issue 14): the cost of one hit of a promoted site
//! with `count` and with `args:6`, against, in the same run on the same kind of tracee
//! (`mp-bench`, which calls `mp_bench_fn` — `imul; ret`, a promotable region — N times
//! per command and answers when done):
//!
//! * `direct`: the tracee unprobed (a direct call, the floor);
//! * `collect/count`, `collect/args6`: a `Collect` on the site, promoted (no stop);
//! * `one-stop/count`: the same `Collect::count` beside a closure, which keeps the site
//!   on the one-stop path (ptrace stop per hit, collector run in the tracer);
//! * `uprobe`: a kernel uprobe on the same function through tracefs (root only);
//! * `collect/ret` (issue 15): a `Collect::ret` on the site, promoted: the return
//!   address swapped at the entry, a record of the return value, latency and arguments
//!   at the return, no stop; against `collect/args6` (an entry probe writing one record
//!   of the same arguments: the target is a return probe at most 2x its entry
//!   probe alone);
//! * `collect/latency`: a `Collect::latency` (a histogram in the tracee, no record),
//!   against `collect/count`, the entry probe that counts;
//! * `uretprobe`: the kernel's return probe on the same function (another copy of the
//!   executable, as for `uprobe`), beside its `uprobe` for the kernel's own ratio;
//! * `uprobe-push`, `uretprobe-push`: the same two kernel probes on `mp_bench_push`
//!   (`push rbx; ...`), paired with a direct call of that function. The kernel
//!   emulates a `push` at its breakpoint but must single-step an `imul` out of line,
//!   and a single step is dear in some VMs (a #DB exit: ~22 µs against ~0.65 µs on
//!   our test VM), so these are the kernel's best case, the fair baseline. Our
//!   trampolines relocate either instruction: their cost does not depend on it.
//!
//! Per hit = (routine time − nothing) / N, where every routine includes the same
//! command round trip; the `RATIO` lines divide per-hit costs measured in paired
//! samples (each sample of a probed routine preceded by one of `direct`).
//!
//! The bench pins itself and its tracees to one CPU (as `ptrace_hit` does: a stop
//! between two vCPUs of an idle VM costs ~70 µs instead of ~4 µs).
//!
//! Run: `cargo bench -p multiprobe-benches --bench ptrace_collect`

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use multiprobe_backend_ptrace::collect::{Collect, Collection, SitePath};
use multiprobe_backend_ptrace::{PtraceBackend, Tracer};
use multiprobe_benches::uprobe::KernelUprobe;
use multiprobe_benches::{fmt_ns, Ratios};
use multiprobe_core::Registration;

const IMUL: u8 = 1;
const PUSH: u8 = 2;

fn command() -> Command {
    let mut c = Command::new(multiprobe_test_targets::bin("mp-bench"));
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    c
}

fn ask(child: &mut Child, n: u64) {
    ask_to(child, IMUL, n)
}

/// Ask for `n` calls of the function `what` names (`IMUL`, `PUSH`).
fn ask_to(child: &mut Child, what: u8, n: u64) {
    let mut cmd = [0u8; 9];
    cmd[0] = what;
    cmd[1..].copy_from_slice(&n.to_le_bytes());
    child.stdin.as_mut().unwrap().write_all(&cmd).unwrap();
}

fn done(child: &mut Child) {
    let mut b = [0u8];
    child.stdout.as_mut().unwrap().read_exact(&mut b).unwrap();
}

/// `n` calls in a tracee that runs on its own (unprobed, promoted, or kernel-probed).
fn calls(child: &mut Child, n: u64) -> Duration {
    calls_to(child, IMUL, n)
}

/// `n` calls of the function `what` names.
fn calls_to(child: &mut Child, what: u8, n: u64) -> Duration {
    let start = Instant::now();
    ask_to(child, what, n);
    done(child);
    start.elapsed()
}

/// A traced `mp-bench` with collectors on `mp_bench_fn`, its tracer on a thread of
/// its own (a thread has one tracer): promoted, that thread only holds it (nothing
/// stops); on the stop path, it runs the loop until the tracee exits.
struct Traced {
    /// `mp_bench_fn` in the tracee.
    f: u64,
    /// `mp_bench_push` in the tracee (unprobed).
    push: u64,
    child: Child,
    col: Collection,
    first: Collect,
    quit: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Traced {
    fn new(cols: Vec<Collect>, stop_path: bool) -> Traced {
        let (tx, rx) = std::sync::mpsc::channel();
        let (quit, quit_rx) = std::sync::mpsc::channel::<()>();
        let first = cols[0].clone();
        let thread = std::thread::spawn(move || {
            let mut t = Tracer::spawn(&mut command()).unwrap();
            assert_eq!(t.run_to_entry().unwrap(), None);
            let mut child = t.take_child().unwrap();
            let f = t.resolve("mp_bench_fn").unwrap();
            let push = t.resolve("mp_bench_push").unwrap();
            let mut regs: Vec<Registration<PtraceBackend>> = Vec::new();
            for c in &cols {
                regs.push(t.registry().register_handler(f, c.clone()).unwrap());
            }
            if stop_path {
                let n = Arc::new(AtomicU64::new(0));
                regs.push(
                    t.registry()
                        .register(f, move |_| {
                            n.fetch_add(1, Relaxed);
                        })
                        .unwrap(),
                );
            }
            // Promote (or not) now: one call, served or run in the tracee, while a
            // thread wakes the loop (a promoted site makes no event).
            let wake = t.detach_handle().unwrap();
            let stop_waking = Arc::new(std::sync::atomic::AtomicBool::new(false));
            let q = Arc::clone(&stop_waking);
            let waker = std::thread::spawn(move || {
                while !q.load(Relaxed) {
                    wake.wake();
                    std::thread::sleep(Duration::from_millis(2));
                }
            });
            ask(&mut child, 1);
            let col = t.collection();
            let c0 = cols[0].clone();
            let ready = |t: &Tracer| {
                col.drain();
                c0.stats().hits >= 1 && (stop_path || t.collect_path(f) == Some(SitePath::InTracee))
            };
            while !ready(&t) {
                // The tracer promotes between events (the waker's rings are events):
                // let the loop go round a few times.
                let mut k = 0;
                let stop = t
                    .run_until(|| {
                        k += 1;
                        k > 3
                    })
                    .unwrap();
                assert!(stop.is_none());
            }
            done(&mut child);
            stop_waking.store(true, Relaxed);
            waker.join().unwrap();
            let path = t.collect_path(f);
            println!(
                "PATH {:?} stop_path={stop_path}: {path:?}",
                cols[0].action()
            );
            assert_eq!(path == Some(SitePath::InTracee), !stop_path, "{path:?}");
            tx.send((child, col, f, push)).unwrap();
            if stop_path {
                let _ = t.run();
            } else {
                let _ = quit_rx.recv();
            }
            drop(regs);
        });
        let (child, col, f, push) = rx.recv().unwrap();
        Traced {
            f,
            push,
            child,
            col,
            first,
            quit,
            thread: Some(thread),
        }
    }

    fn run(&mut self, n: u64) -> Duration {
        let d = calls(&mut self.child, n);
        self.col.drain();
        d
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }
}

impl Drop for Traced {
    fn drop(&mut self) {
        let _ = self.quit.send(());
        drop(self.child.stdin.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn pin_to_this_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no argument and only returns a number.
    let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).ok()?;
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET sets bit `cpu` of `set`; a CPU number from the kernel is in range.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t of the size passed; pid 0 is this thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    (r == 0).then_some(cpu)
}

fn main() {
    match pin_to_this_cpu() {
        Some(cpu) => println!("PINNED bench and tracees to CPU {cpu}"),
        None => println!("NOT PINNED"),
    }
    let mut c = multiprobe_benches::criterion(20, 300, 2);
    let r = Ratios::new();
    let mut direct = command().spawn().unwrap();
    let mut count = Traced::new(vec![Collect::count()], false);
    let mut args = Traced::new(vec![Collect::args(6).unwrap()], false);
    let mut stop = Traced::new(vec![Collect::count()], true);
    let mut ret = Traced::new(vec![Collect::ret()], false);
    let mut lat = Traced::new(vec![Collect::latency()], false);
    // A kernel uprobe is on the file, in every process that maps it: its tracee runs
    // a copy of the executable, so the other routines' processes carry no uprobe.
    let copy = std::env::temp_dir().join(format!("mp-bench-uprobe-{}", std::process::id()));
    std::fs::copy(multiprobe_test_targets::bin("mp-bench"), &copy).unwrap();
    let mut kprobed = Command::new(&copy)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let ret_copy = std::env::temp_dir().join(format!("mp-bench-uretprobe-{}", std::process::id()));
    std::fs::copy(multiprobe_test_targets::bin("mp-bench"), &ret_copy).unwrap();
    let mut kret = Command::new(&ret_copy)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // One uprobe (on `mp_bench_fn` and on `mp_bench_push`) per process and kind: the
    // addresses in that process are those of `count`'s tracee moved to its own load
    // address (the same executable).
    let base = |pid: i32| -> u64 {
        // A process just spawned may still be in its exec: look again shortly.
        for _ in 0..200 {
            let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
            if let Some(l) = maps.lines().find(|l| l.contains("mp-bench")) {
                return u64::from_str_radix(l.split('-').next().unwrap(), 16).unwrap();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("no mp-bench in the maps of {pid}")
    };
    let kernel_probe = |child: &Child, name: &str, at: u64, ret: bool| {
        let pid = child.id() as i32;
        let addr = at - base(count.pid()) + base(pid);
        let made = if ret {
            KernelUprobe::new_return_in(pid, name, addr)
        } else {
            KernelUprobe::new_in(pid, name, addr)
        };
        made.map_err(|e| println!("NO KERNEL PROBE {name}: {e}"))
            .ok()
    };
    let uprobe = kernel_probe(&kprobed, "collect_bench", count.f, false);
    let uretprobe = kernel_probe(&kret, "collect_bench_ret", count.f, true);
    let uprobe_push = kernel_probe(&kprobed, "collect_bench_push", count.push, false);
    let uretprobe_push = kernel_probe(&kret, "collect_bench_ret_push", count.push, true);
    {
        let mut g = c.benchmark_group("collect");
        let mut d = |n| calls(&mut direct, n);
        r.bench_paired(&mut g, "collect/count", "direct", |n| count.run(n), &mut d);
        r.bench_paired(&mut g, "collect/args6", "direct", |n| args.run(n), &mut d);
        r.bench_paired(&mut g, "one-stop/count", "direct", |n| stop.run(n), &mut d);
        r.bench_paired(&mut g, "collect/ret", "direct", |n| ret.run(n), &mut d);
        r.bench_paired(&mut g, "collect/latency", "direct", |n| lat.run(n), &mut d);
        if uprobe.is_some() {
            r.bench_paired(
                &mut g,
                "uprobe",
                "direct",
                |n| calls(&mut kprobed, n),
                &mut d,
            );
        }
        if uretprobe.is_some() {
            r.bench_paired(
                &mut g,
                "uretprobe",
                "direct",
                |n| calls(&mut kret, n),
                &mut d,
            );
        }
        let mut dp = |n| calls_to(&mut direct, PUSH, n);
        if uprobe_push.is_some() {
            let k = &mut kprobed;
            r.bench_paired(
                &mut g,
                "uprobe-push",
                "direct-push",
                |n| calls_to(k, PUSH, n),
                &mut dp,
            );
        }
        if uretprobe_push.is_some() {
            let k = &mut kret;
            r.bench_paired(
                &mut g,
                "uretprobe-push",
                "direct-push",
                |n| calls_to(k, PUSH, n),
                &mut dp,
            );
        }
        g.finish();
    }
    c.final_summary();
    r.print_means();
    let extra_over = |name: &str, base: &str| {
        let o = r.mean_ns(name)?;
        let b = r.mean_ns(&format!("{name} vs {base}"))?;
        let e = o - b;
        println!(
            "PER HIT {name}: {} over a direct call ({} vs {})",
            fmt_ns(e),
            fmt_ns(o),
            fmt_ns(b)
        );
        Some(e)
    };
    let extra = |name: &str| extra_over(name, "direct");
    let cnt = extra("collect/count");
    let a6 = extra("collect/args6");
    let one = extra("one-stop/count");
    let up = if uprobe.is_some() {
        extra("uprobe")
    } else {
        None
    };
    let target = |what: &str, v: Option<f64>, goal: f64, at_most: bool| {
        if let Some(v) = v {
            let ok = if at_most { v <= goal } else { v >= goal };
            println!(
                "TARGET {what} {} {goal}: {v:.1} {}",
                if at_most { "<=" } else { ">=" },
                if ok { "met" } else { "MISSED" }
            );
        }
    };
    target("count ns per hit", cnt, 100.0, true);
    target("args:6 ns per hit", a6, 200.0, true);
    target(
        "uprobe / count",
        up.zip(cnt).map(|(u, c)| u / c),
        10.0,
        false,
    );
    target(
        "one-stop / count",
        one.zip(cnt).map(|(o, c)| o / c),
        40.0,
        false,
    );
    let rt = extra("collect/ret");
    let lt = extra("collect/latency");
    let urt = if uretprobe.is_some() {
        extra("uretprobe")
    } else {
        None
    };
    target(
        "collect/ret / collect/args6 (issue 15)",
        rt.zip(a6).map(|(r, a)| r / a),
        2.0,
        true,
    );
    target(
        "collect/latency / collect/count (issue 15)",
        lt.zip(cnt).map(|(l, c)| l / c),
        2.0,
        true,
    );
    if let (Some(u), Some(ur), Some(rt)) = (up, urt, rt) {
        println!(
            "RATIO kernel uretprobe / uprobe: {:.2}x; uretprobe / collect/ret: {:.1}x",
            ur / u,
            ur / rt
        );
    }
    let up_push = uprobe_push
        .as_ref()
        .and_then(|_| extra_over("uprobe-push", "direct-push"));
    let urt_push = uretprobe_push
        .as_ref()
        .and_then(|_| extra_over("uretprobe-push", "direct-push"));
    if let (Some(u), Some(ur)) = (up_push, urt_push) {
        println!(
            "RATIO kernel uretprobe / uprobe on push (the kernel's best case): {:.2}x; \
             uprobe-push / collect/count: {:.1}x; uretprobe-push / collect/ret: {}",
            ur / u,
            cnt.map_or(f64::NAN, |c| u / c),
            rt.map_or("-".into(), |r| format!("{:.1}x", ur / r)),
        );
    }
    if let (Some(u), Some(p)) = (up, up_push) {
        println!(
            "RATIO kernel uprobe on imul (single-stepped) / on push (emulated): {:.1}x",
            u / p
        );
    }
    assert!(ret.first.stats().returns > 0 && lat.first.histogram().count() > 0);
    assert!(count.first.stats().hits > 0 && args.first.stats().hits > 0);
    drop(uprobe);
    drop(uretprobe);
    drop(uprobe_push);
    drop(uretprobe_push);
    for k in [&mut kprobed, &mut kret] {
        let _ = k.kill();
        let _ = k.wait();
    }
    let _ = std::fs::remove_file(&copy);
    let _ = std::fs::remove_file(&ret_copy);
    let _ = direct.kill();
}
