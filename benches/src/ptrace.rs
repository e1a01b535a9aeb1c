//! What the ptrace benches share: the `mp-bench` tracee and its protocol (a command is a
//! site number and a call count; the tracee makes the calls and answers one byte), and
//! pinning to one CPU: the tracer and its tracees then hand each stop over on one core
//! instead of waking each other across cores, which adds a cross-CPU wake-up to every
//! stop and makes the ratios noisy.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};

/// `mp-bench` with its stdin and stdout piped (the command channel).
pub fn command() -> Command {
    let mut c = Command::new(multiprobe_test_targets::bin("mp-bench"));
    c.stdin(Stdio::piped()).stdout(Stdio::piped());
    c
}

/// Ask the tracee for `n` calls of `site`.
pub fn ask(child: &mut Child, site: u8, n: u64) {
    let mut cmd = [0u8; 9];
    cmd[0] = site;
    cmd[1..].copy_from_slice(&n.to_le_bytes());
    child.stdin.as_mut().unwrap().write_all(&cmd).unwrap();
}

/// Wait for the tracee's answer: the calls asked for are made.
pub fn done(child: &mut Child) {
    let mut b = [0u8];
    child.stdout.as_mut().unwrap().read_exact(&mut b).unwrap();
}

/// Pin the calling thread — the tracer — and so the tracees it spawns later (a child
/// inherits its parent's affinity) to the CPU it runs on now. Returns that CPU.
pub fn pin_to_this_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no argument and only returns a number.
    let cpu = usize::try_from(unsafe { libc::sched_getcpu() }).ok()?;
    // SAFETY: cpu_set_t is a plain bit array; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET only sets bit `cpu` of `set`, with a checked index (a CPU number
    // from the kernel is below CPU_SETSIZE in any case).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: `set` is a valid cpu_set_t and the size passed is its own; pid 0 is the
    // calling thread.
    let r = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    (r == 0).then_some(cpu)
}

/// [`pin_to_this_cpu`], and say on stdout whether it worked (`PINNED tracer and
/// {tracees} to CPU N`, or `NOT PINNED`), so a run's output tells how it was measured.
pub fn pin_and_say(tracees: &str) {
    match pin_to_this_cpu() {
        Some(cpu) => println!("PINNED tracer and {tracees} to CPU {cpu}"),
        None => println!("NOT PINNED: sched_setaffinity failed; expect noisy ratios"),
    }
}
