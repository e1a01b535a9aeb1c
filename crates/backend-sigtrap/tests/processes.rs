//! Tests that need a process of their own: a probed instruction that faults (the process
//! must see the fault at the original address, as if unprobed), the program's own
//! dispositions of the signals the backend handles (ignored, default, its handlers; sent
//! from outside or raised by a fault) and `fork` with probes armed. `harness = false`: `main` runs single-threaded, so forking is safe, and
//! re-executes this binary for scenarios that end the process.

mod asm;

use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use asm::*;
use multiprobe_core::{FaultAction, FnHandler, PreAction};

static PRE: AtomicU64 = AtomicU64::new(0);
static FAULT_HOOK: AtomicU64 = AtomicU64::new(0);

fn hex(mut v: u64, out: &mut [u8; 16]) {
    for i in (0..16).rev() {
        out[i] = b"0123456789abcdef"[(v & 15) as usize];
        v >>= 4;
    }
}

/// The program's own SIGSEGV handler: reports where the fault was seen, then exits.
extern "C" fn report_segv(_sig: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: kernel-provided pointers of an SA_SIGINFO handler.
    let (rip, addr) = unsafe {
        let uc = &*ctx.cast::<libc::ucontext_t>();
        (
            uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64,
            (*info).si_addr() as u64,
        )
    };
    let mut line =
        *b"rip=................ addr=................ pre=................ hook=................\n";
    let mut h = [0u8; 16];
    for (v, at) in [
        (rip, 4),
        (addr, 26),
        (PRE.load(Relaxed), 47),
        (FAULT_HOOK.load(Relaxed), 69),
    ] {
        hex(v, &mut h);
        line[at..at + 16].copy_from_slice(&h);
    }
    // SAFETY: async-signal-safe write and exit.
    unsafe {
        libc::write(1, line.as_ptr().cast(), line.len());
        libc::_exit(42);
    }
}

fn probe_load(
    reg: &multiprobe_backend_sigtrap::SigtrapRegistry,
) -> multiprobe_core::Registration<multiprobe_backend_sigtrap::SigtrapBackend> {
    reg.register_handler(
        mp_t_load as *const () as u64,
        FnHandler::new()
            .pre(|_h| {
                PRE.fetch_add(1, Relaxed);
                PreAction::Continue
            })
            .fault(|h, f| {
                assert_eq!(
                    h.regs().rip,
                    h.addr(),
                    "fault handlers see the original rip"
                );
                assert_eq!((f.signal, f.addr), (libc::SIGSEGV, 8));
                FAULT_HOOK.fetch_add(1, Relaxed);
                FaultAction::NotHandled
            }),
    )
    .unwrap()
}

fn install_report(sig: i32) {
    // SAFETY: installing a plain SA_SIGINFO handler.
    unsafe { multiprobe_test_targets::install_siginfo_handler(sig, report_segv, 0) };
}

fn install_report_segv() {
    install_report(libc::SIGSEGV);
}

/// Child: a divide error in a relocated `div`: the program's SIGFPE handler sees `rip`
/// and `si_addr` (the faulting instruction, for SIGFPE) at the original address.
fn child_fpe_with_handler() {
    install_report(libc::SIGFPE);
    let reg = multiprobe_backend_sigtrap::registry();
    let _g = reg
        .register(mp_t_div as *const () as u64, |_h| {
            PRE.fetch_add(1, Relaxed);
        })
        .unwrap();
    println!("probe={:016x}", mp_t_div as *const () as u64);
    // SAFETY: deliberately divides by zero; the handler exits.
    unsafe { mp_t_div(1, 0) };
    unreachable!("the division faults");
}

/// Child: the program has its own SIGSEGV handler (installed before the backend).
fn child_segv_with_handler() {
    install_report_segv();
    let reg = multiprobe_backend_sigtrap::registry();
    let _g = probe_load(&reg);
    println!("probe={:016x}", mp_t_load as *const () as u64);
    // SAFETY: deliberately faults; the handler above exits.
    unsafe { mp_t_load(8) };
    unreachable!("the load faults");
}

/// Child: the program has its own SIGSEGV handler and faults in code that is not
/// probed: the backend's fault handler must pass it on untouched.
fn child_segv_unprobed() {
    install_report_segv();
    let reg = multiprobe_backend_sigtrap::registry();
    let _g = reg
        .register(mp_t_imul as *const () as u64, |_h| {})
        .unwrap();
    println!("probe={:016x}", mp_t_load as *const () as u64);
    // SAFETY: deliberately faults; the handler exits.
    unsafe { mp_t_load(8) };
    unreachable!("the load faults");
}

/// Child: an `int3` that is not a probe, under the default SIGTRAP action.
fn child_foreign_int3() {
    let reg = multiprobe_backend_sigtrap::registry();
    let _g = reg
        .register(mp_t_imul as *const () as u64, |_h| {})
        .unwrap();
    // SAFETY: deliberately traps.
    unsafe { mp_t_int3() };
    std::process::exit(0);
}

static FOREIGN_TRAPS: AtomicU64 = AtomicU64::new(0);

extern "C" fn count_trap(_sig: i32, _info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    FOREIGN_TRAPS.fetch_add(1, Relaxed);
}

/// Runs first, before this process has a backend: the program's own SIGTRAP handler
/// keeps receiving its own `int3`s once the backend is installed over it.
fn a_foreign_int3_reaches_the_programs_sigtrap_handler() {
    // SAFETY: installing a plain SA_SIGINFO handler.
    unsafe { multiprobe_test_targets::install_siginfo_handler(libc::SIGTRAP, count_trap, 0) };
    let reg = multiprobe_backend_sigtrap::registry();
    let a = mp_t_imul as *const () as u64;
    let g = reg.register(a, |_h| {}).unwrap();
    // SAFETY: `int3; ret`: the program's handler returns after the int3.
    unsafe { mp_t_int3() };
    assert_eq!(FOREIGN_TRAPS.load(Relaxed), 1);
    // SAFETY: integer in, integer out. Our own probe is not handed on.
    assert_eq!(unsafe { mp_t_imul(3) }, 21);
    assert_eq!(FOREIGN_TRAPS.load(Relaxed), 1);
    assert_eq!(g.unregister().unwrap().hits, 1);
}

/// Child: no handler of the program's (only Rust's default one): the process must die
/// of SIGSEGV.
fn child_segv_default() {
    let reg = multiprobe_backend_sigtrap::registry();
    let _g = probe_load(&reg);
    // SAFETY: deliberately faults.
    unsafe { mp_t_load(8) };
    unreachable!("the load faults");
}

/// Child: the program ignores `sig`, then probes exist; another process sends it `sig`
/// (`kill(2)`) while it waits for a line on stdin. It must survive, and its probe still
/// works afterwards.
fn child_ignores_sent(sig: i32) {
    // SAFETY: setting a disposition before any handler of ours exists.
    unsafe { libc::signal(sig, libc::SIG_IGN) };
    let reg = multiprobe_backend_sigtrap::registry();
    let g = reg
        .register(mp_t_imul as *const () as u64, |_| {
            PRE.fetch_add(1, Relaxed);
        })
        .unwrap();
    println!("ready");
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).unwrap();
    // SAFETY: integer in, integer out.
    assert_eq!(unsafe { mp_t_imul(3) }, 21);
    println!("pre={:016x}", g.unregister().unwrap().hits);
}

/// Child: SIGTRAP ignored, and an `int3` that is not a probe: the kernel forces a
/// trap over an ignored disposition, so the process dies of SIGTRAP as it would unprobed.
fn child_ignored_foreign_int3() {
    // SAFETY: setting a disposition before any handler of ours exists.
    unsafe { libc::signal(libc::SIGTRAP, libc::SIG_IGN) };
    let reg = multiprobe_backend_sigtrap::registry();
    let _g = reg.register(mp_t_imul as *const () as u64, |_| {}).unwrap();
    // SAFETY: deliberately traps.
    unsafe { mp_t_int3() };
    std::process::exit(0);
}

/// Child: SIGSEGV at `disposition` (the default, or ignored: the kernel forces a fault
/// over that) and a fault in a probed instruction, executed out of line.
fn child_segv_disposition(disposition: libc::sighandler_t) {
    // SAFETY: setting a disposition before any handler of ours exists (this replaces
    // Rust's own SIGSEGV handler).
    unsafe { libc::signal(libc::SIGSEGV, disposition) };
    let reg = multiprobe_backend_sigtrap::registry();
    let _g = probe_load(&reg);
    // SAFETY: deliberately faults.
    unsafe { mp_t_load(8) };
    unreachable!("the load faults");
}

fn run_child(scenario: &str) -> std::process::Output {
    Command::new(std::env::current_exe().unwrap())
        .env("MP_SCENARIO", scenario)
        .output()
        .unwrap()
}

/// Run `scenario` in a child, which must exit 42 (its signal handler reported): what it
/// printed.
fn exited_42(scenario: &str) -> String {
    let out = run_child(scenario);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        out.status.code(),
        Some(42),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

fn field(out: &str, name: &str) -> u64 {
    let v = out
        .split(|c: char| c.is_whitespace())
        .find_map(|w| w.strip_prefix(&format!("{name}=")))
        .unwrap_or_else(|| panic!("no {name} in {out:?}"));
    u64::from_str_radix(v, 16).unwrap()
}

fn segv_is_seen_at_the_original_address_by_the_programs_handler() {
    let text = exited_42("segv_handler");
    assert_eq!(field(&text, "rip"), field(&text, "probe"), "{text}");
    assert_eq!(field(&text, "addr"), 8);
    assert_eq!(field(&text, "pre"), 1);
    assert_eq!(field(&text, "hook"), 1);
}

fn a_fault_outside_slots_reaches_the_programs_handler_untouched() {
    let text = exited_42("segv_unprobed");
    assert_eq!(field(&text, "rip"), field(&text, "probe"), "{text}");
    assert_eq!((field(&text, "addr"), field(&text, "pre")), (8, 0));
}

fn sigfpe_is_seen_at_the_original_address_with_its_si_addr() {
    let text = exited_42("fpe_handler");
    let probe = field(&text, "probe");
    assert_eq!(
        (field(&text, "rip"), field(&text, "addr")),
        (probe, probe),
        "{text}"
    );
    assert_eq!(field(&text, "pre"), 1);
}

fn a_foreign_int3_under_the_default_action_kills_with_sigtrap() {
    use std::os::unix::process::ExitStatusExt;
    let out = run_child("foreign_int3");
    assert_eq!(out.status.signal(), Some(libc::SIGTRAP), "{:?}", out);
}

fn segv_under_the_default_action_kills_the_process_with_sigsegv() {
    use std::os::unix::process::ExitStatusExt;
    let out = run_child("segv_default");
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{:?}", out);
}

fn a_fault_handler_can_handle_the_fault() {
    let reg = multiprobe_backend_sigtrap::registry();
    let a = mp_t_load as *const () as u64;
    let g = reg
        .register_handler(
            a,
            FnHandler::new().fault(|h, _f| {
                // Skip the 3-byte load, pretending it read 77.
                let r = h.regs_mut();
                r.rax = 77;
                r.rip += 3;
                FaultAction::Handled
            }),
        )
        .unwrap();
    // SAFETY: the fault is handled by the probe.
    assert_eq!(unsafe { mp_t_load(8) }, 77);
    let x = 1234u64;
    // SAFETY: a valid pointer.
    assert_eq!(unsafe { mp_t_load(&x as *const u64 as u64) }, 1234);
    g.unregister().unwrap();
}

fn fork_with_probes_armed() {
    static HITS: AtomicU64 = AtomicU64::new(0);
    let reg = multiprobe_backend_sigtrap::registry();
    let a = mp_t_imul as *const () as u64;
    let g = reg
        .register(a, |_h| {
            HITS.fetch_add(1, Relaxed);
        })
        .unwrap();
    // A jump where the site was promoted, an int3 where not.
    let armed = bytes(a, 1);
    assert!(armed == [0xcc] || armed == [0xe9], "{armed:02x?}");
    // SAFETY: single-threaded here (harness = false), so the child may do anything.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // The child inherits the breakpoint (or jump), the slots, the trampoline and the
        // handler.
        // SAFETY: integer in, integer out.
        let ok = (0..3).all(|x| unsafe { mp_t_imul(x) } == 7 * x) && HITS.load(Relaxed) == 3;
        let unreg = g.unregister().is_ok_and(|s| s.hits == 3);
        let restored = bytes(a, 1) != armed;
        // SAFETY: integer in, integer out.
        let after = unsafe { mp_t_imul(5) } == 35 && HITS.load(Relaxed) == 3;
        // SAFETY: leaving the child without running the parent's atexit machinery.
        unsafe {
            libc::_exit(if ok && unreg && restored && after {
                0
            } else {
                1
            })
        };
    }
    let mut status = 0;
    // SAFETY: waiting for our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    // The parent's probe is untouched by what the child did.
    assert_eq!(bytes(a, 1), armed);
    assert_eq!(HITS.load(Relaxed), 0);
    // SAFETY: integer in, integer out.
    assert_eq!(unsafe { mp_t_imul(2) }, 14);
    assert_eq!(g.unregister().unwrap().hits, 1);
}

/// A thread is inside a hit (its pre-handler is running) when the process forks. In the
/// child that thread does not exist, but its read section was copied: the backend's fork
/// hook must forget it, or unregistering in the child would wait forever.
fn fork_while_another_thread_is_inside_a_hit() {
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;
    static INSIDE: AtomicBool = AtomicBool::new(false);
    static RELEASE: AtomicBool = AtomicBool::new(false);
    let reg = multiprobe_backend_sigtrap::registry();
    let a = mp_t_imul as *const () as u64;
    let g = reg
        .register(a, |_h| {
            INSIDE.store(true, Relaxed);
            while !RELEASE.load(Relaxed) {
                std::hint::spin_loop();
            }
        })
        .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let d2 = Arc::clone(&done);
    let hitter = std::thread::spawn(move || {
        // SAFETY: integer in, integer out.
        let r = unsafe { mp_t_imul(3) };
        d2.store(true, Relaxed);
        r
    });
    while !INSIDE.load(Relaxed) {
        std::hint::spin_loop();
    }
    // SAFETY: the child only unregisters (no allocation-sensitive locks are held by the
    // spinning thread: it is inside a handler that touches atomics only) and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ok = g.unregister().is_ok();
        // SAFETY: leaving the child without the parent's atexit machinery.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // A deadline, so a hang fails the test instead of stalling it.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        // SAFETY: waiting for our own child, without blocking.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r == pid {
            break;
        }
        if std::time::Instant::now() > deadline {
            // SAFETY: killing our own hung child.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            panic!("the child's unregister waited for a thread that does not exist there");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child status {status:#x}"
    );
    RELEASE.store(true, Relaxed);
    assert_eq!(hitter.join().unwrap(), 21);
    assert!(done.load(Relaxed));
    assert_eq!(g.unregister().unwrap().hits, 1);
}

/// Whether `sig` is pending for process `pid` (its shared pending set).
fn shared_pending(pid: u32, sig: i32) -> bool {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("ShdPnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .is_some_and(|m| m & (1 << (sig - 1)) != 0)
}

fn an_ignored_signal_sent_from_outside_is_ignored(sig: i32) {
    use std::io::Write;
    use std::os::unix::process::ExitStatusExt;
    let (mut child, mut out, line) = multiprobe_test_targets::spawn_until_first_line(
        Command::new(std::env::current_exe().unwrap())
            .env("MP_SCENARIO", format!("ignore_sent_{sig}")),
    );
    assert_eq!(line, "ready\n");
    let pid = child.id();
    for _ in 0..3 {
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
        // Delivered (or the child died of it) before the next one and before "go".
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while shared_pending(pid, sig) && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    // A child killed by the signal no longer reads: ignore the broken pipe.
    let _ = child.stdin.take().unwrap().write_all(b"go\n");
    let mut rest = String::new();
    let _ = std::io::Read::read_to_string(&mut out, &mut rest);
    let status = child.wait().unwrap();
    assert_eq!(
        (status.code(), status.signal()),
        (Some(0), None),
        "signal {sig} sent to a program that ignores it: {rest}"
    );
    assert_eq!(field(&rest, "pre"), 1, "{rest}");
}

fn an_ignored_sigtrap_sent_from_outside_is_ignored() {
    an_ignored_signal_sent_from_outside_is_ignored(libc::SIGTRAP);
}

fn an_ignored_sigsegv_sent_from_outside_is_ignored() {
    an_ignored_signal_sent_from_outside_is_ignored(libc::SIGSEGV);
}

fn an_ignored_sigtrap_does_not_stop_a_foreign_int3_from_killing() {
    use std::os::unix::process::ExitStatusExt;
    let out = run_child("ignored_foreign_int3");
    assert_eq!(out.status.signal(), Some(libc::SIGTRAP), "{:?}", out);
}

/// Run this binary with `scenario` under ptrace, passing every signal on, and count its
/// main thread's system calls number `nr`. Returns the wait status it ended with.
fn count_syscalls(scenario: &str, nr: libc::c_long) -> (i32, u32) {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let exe = CString::new(std::env::current_exe().unwrap().as_os_str().as_bytes()).unwrap();
    let env = CString::new(format!("MP_SCENARIO={scenario}")).unwrap();
    let argv = [exe.as_ptr(), std::ptr::null()];
    let envp = [env.as_ptr(), std::ptr::null()];
    // SAFETY: single-threaded here (harness = false); the child only calls
    // async-signal-safe functions before it execs.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
            libc::execve(exe.as_ptr(), argv.as_ptr(), envp.as_ptr());
            libc::_exit(127);
        }
    }
    let mut status = 0;
    // SAFETY: our traced child; it stops with SIGTRAP at its exec.
    unsafe {
        libc::waitpid(pid, &mut status, 0);
        assert!(libc::WIFSTOPPED(status), "status {status:#x}");
        libc::ptrace(
            libc::PTRACE_SETOPTIONS,
            pid,
            0,
            libc::PTRACE_O_TRACESYSGOOD | libc::PTRACE_O_EXITKILL,
        );
    }
    /// `struct ptrace_syscall_info` up to the entry's number.
    #[repr(C)]
    struct SyscallInfo {
        op: u8,
        _pad: [u8; 3],
        arch: u32,
        ip: u64,
        sp: u64,
        nr: u64,
        args: [u64; 6],
    }
    let (mut sig, mut count) = (0, 0);
    loop {
        // SAFETY: resuming and waiting for our traced child.
        unsafe {
            libc::ptrace(libc::PTRACE_SYSCALL, pid, 0, sig);
            libc::waitpid(pid, &mut status, 0);
        }
        sig = 0;
        if !libc::WIFSTOPPED(status) {
            return (status, count);
        }
        let stop = libc::WSTOPSIG(status);
        if stop != libc::SIGTRAP | 0x80 {
            sig = stop; // a signal: hand it on
            continue;
        }
        // SAFETY: all-zero is a valid value of this plain struct.
        let mut info: SyscallInfo = unsafe { std::mem::zeroed() };
        // SAFETY: the kernel writes at most the given size into `info`.
        let n = unsafe {
            libc::ptrace(
                libc::PTRACE_GET_SYSCALL_INFO,
                pid,
                std::mem::size_of::<SyscallInfo>(),
                &mut info as *mut SyscallInfo,
            )
        };
        assert!(n > 0, "PTRACE_GET_SYSCALL_INFO failed");
        // Op 1: a system call entry.
        if info.op == 1 && info.nr == nr as u64 {
            count += 1;
        }
    }
}

/// A fault out of line under the default action (or ignored, which the kernel
/// overrides for a fault) is queued again exactly once, and kills with SIGSEGV.
fn a_fault_given_the_default_action_is_queued_again_once() {
    for scenario in ["segv_dfl", "segv_ign", "segv_default"] {
        let (status, queued) = count_syscalls(scenario, libc::SYS_rt_tgsigqueueinfo);
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSEGV,
            "{scenario}: status {status:#x}"
        );
        assert_eq!(queued, 1, "{scenario}: rt_tgsigqueueinfo calls");
    }
}

fn main() {
    match std::env::var("MP_SCENARIO").as_deref() {
        Ok("segv_handler") => return child_segv_with_handler(),
        Ok("segv_default") => return child_segv_default(),
        Ok("segv_unprobed") => return child_segv_unprobed(),
        Ok("foreign_int3") => return child_foreign_int3(),
        Ok("fpe_handler") => return child_fpe_with_handler(),
        Ok("ignored_foreign_int3") => return child_ignored_foreign_int3(),
        Ok("segv_dfl") => return child_segv_disposition(libc::SIG_DFL),
        Ok("segv_ign") => return child_segv_disposition(libc::SIG_IGN),
        Ok(s) if s.starts_with("ignore_sent_") => {
            return child_ignores_sent(s["ignore_sent_".len()..].parse().unwrap())
        }
        _ => {}
    }
    let tests: [(&str, fn()); 13] = [
        // First: it must install its SIGTRAP handler before any backend exists.
        (
            "a_foreign_int3_reaches_the_programs_sigtrap_handler",
            a_foreign_int3_reaches_the_programs_sigtrap_handler,
        ),
        (
            "a_fault_outside_slots_reaches_the_programs_handler_untouched",
            a_fault_outside_slots_reaches_the_programs_handler_untouched,
        ),
        (
            "sigfpe_is_seen_at_the_original_address_with_its_si_addr",
            sigfpe_is_seen_at_the_original_address_with_its_si_addr,
        ),
        (
            "a_foreign_int3_under_the_default_action_kills_with_sigtrap",
            a_foreign_int3_under_the_default_action_kills_with_sigtrap,
        ),
        (
            "segv_is_seen_at_the_original_address_by_the_programs_handler",
            segv_is_seen_at_the_original_address_by_the_programs_handler,
        ),
        (
            "segv_under_the_default_action_kills_the_process_with_sigsegv",
            segv_under_the_default_action_kills_the_process_with_sigsegv,
        ),
        (
            "a_fault_handler_can_handle_the_fault",
            a_fault_handler_can_handle_the_fault,
        ),
        ("fork_with_probes_armed", fork_with_probes_armed),
        (
            "an_ignored_sigtrap_sent_from_outside_is_ignored",
            an_ignored_sigtrap_sent_from_outside_is_ignored,
        ),
        (
            "an_ignored_sigsegv_sent_from_outside_is_ignored",
            an_ignored_sigsegv_sent_from_outside_is_ignored,
        ),
        (
            "an_ignored_sigtrap_does_not_stop_a_foreign_int3_from_killing",
            an_ignored_sigtrap_does_not_stop_a_foreign_int3_from_killing,
        ),
        (
            "a_fault_given_the_default_action_is_queued_again_once",
            a_fault_given_the_default_action_is_queued_again_once,
        ),
        // Last: it leaves a thread behind until it releases it.
        (
            "fork_while_another_thread_is_inside_a_hit",
            fork_while_another_thread_is_inside_a_hit,
        ),
    ];
    // `cargo test --test processes -- NAME...` runs the tests whose names contain one of
    // the NAMEs (the first one, which must run before any backend exists, included).
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let mut ran = 0;
    for (k, (name, t)) in tests.into_iter().enumerate() {
        if k > 0 && !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
            continue;
        }
        t();
        ran += 1;
        println!("test {name} ... ok");
    }
    println!("\n{ran} passed, 0 failed");
}
