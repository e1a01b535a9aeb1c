//! Pinning a ptrace bench to one CPU: the tracer and its tracees then hand each stop over
//! on one core instead of waking each other across cores, which adds a cross-CPU wake-up
//! to every stop and makes the ratios noisy.

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
