//! Forks and execs. The parent calls `mp_add` 10 times, `fork`s a child that calls it 5
//! times and then execs this program again (`exec-child`, 7 calls), waits for it, runs
//! this program once more through `std::process::Command` (`spawned`, 3 calls: the C
//! library starts it with a vfork-style clone), then calls `mp_add` 10 more times and
//! prints what everyone reported. Parent and forked child also call `mp_fload` (a load
//! in assembly: probed, it runs out of line), and the child reports how many anonymous
//! executable mappings it has (an unprobed run has none).

use std::hint::black_box;
use std::io::Write;

std::arch::global_asm!(
    ".globl mp_fload",
    ".type mp_fload, @function",
    "mp_fload:",
    "mov rax, qword ptr [rdi]",
    "ret",
    ".size mp_fload, . - mp_fload",
);

extern "C" {
    fn mp_fload(p: *const u64) -> u64;
}

fn fload(v: u64) -> u64 {
    // SAFETY: mp_fload reads the u64 it is given.
    unsafe { mp_fload(&v) }
}

/// Executable mappings without a file or pseudo name: what a tracer's out-of-line page
/// would look like.
fn anon_exec() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .expect("maps")
        .lines()
        .filter(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f[1].contains('x') && f.len() < 6
        })
        .count()
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn mp_add(a: u64, b: u64) -> u64 {
    black_box(a).wrapping_add(black_box(b))
}

fn calls(n: u64) -> u64 {
    (0..n).fold(0, |s, i| s.wrapping_add(mp_add(i, 1)))
}

fn main() {
    let me = std::env::current_exe().expect("current_exe");
    match std::env::args().nth(1).as_deref() {
        Some("exec-child") => {
            calls(7);
            println!("exec-child calls=7");
            return;
        }
        Some("spawned") => {
            calls(3);
            println!("spawned calls=3");
            return;
        }
        _ => {}
    }
    calls(10);
    let f = fload(5);
    std::io::stdout().flush().expect("flush");
    // SAFETY: this program is single-threaded here, so the child may do anything.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        calls(5);
        println!("child calls=5 fload={} anon_exec={}", fload(6), anon_exec());
        std::io::stdout().flush().expect("flush");
        let err = std::os::unix::process::CommandExt::exec(
            std::process::Command::new(&me).arg("exec-child"),
        );
        panic!("exec failed: {err}");
    }
    let mut status = 0;
    // SAFETY: plain waitpid on our own child with a valid status pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid, "waitpid");
    let child = if libc::WIFEXITED(status) {
        format!("exit {}", libc::WEXITSTATUS(status))
    } else {
        format!("signal {}", libc::WTERMSIG(status))
    };
    let spawned = std::process::Command::new(&me)
        .arg("spawned")
        .status()
        .expect("spawn");
    calls(10);
    println!(
        "parent calls=20 fload={} child={child} spawned={spawned}",
        f + fload(7)
    );
}
