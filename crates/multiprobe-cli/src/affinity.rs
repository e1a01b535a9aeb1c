//! `--pin`: put the traced program and the tracer on one CPU.
//!
//! Every hit is a stop of the program and a wake-up of the tracer, then the reverse. On
//! two CPUs each of those is a cross-CPU wake-up; on a virtual machine such a wake-up is
//! an inter-processor interrupt through the hypervisor, and a hit costs tens of
//! microseconds instead of a few (measured: `cli_ls` in BENCHMARKS.md). On one CPU each is
//! a plain context switch. The price: the program's threads share that CPU, and the
//! program can see its affinity mask changed — so it is an option, not the default.
//!
//! `attach` restores every thread's original mask before detaching.

use std::io;

fn set(tid: i32, mask: &libc::cpu_set_t) -> io::Result<()> {
    // SAFETY: a valid, fully initialized mask of the size passed.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), mask) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn get(tid: i32) -> io::Result<libc::cpu_set_t> {
    // SAFETY: an all-zero `cpu_set_t` is a valid (empty) mask.
    let mut mask: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: writes at most the size passed into `mask`.
    let r =
        unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut mask) };
    if r == 0 {
        Ok(mask)
    } else {
        Err(io::Error::last_os_error())
    }
}

fn threads(pid: i32) -> io::Result<Vec<i32>> {
    Ok(std::fs::read_dir(format!("/proc/{pid}/task"))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse().ok())
        .collect())
}

/// What `--pin` changed, to put back.
#[derive(Debug)]
pub struct Pinned {
    /// The CPU everything runs on.
    pub cpu: usize,
    saved: Vec<(i32, libc::cpu_set_t)>,
}

/// Pin the calling thread (the tracer) and every thread of `pid` to the CPU the caller
/// runs on now.
pub fn pin_together(pid: i32) -> io::Result<Pinned> {
    // SAFETY: no arguments, no memory.
    let cpu = unsafe { libc::sched_getcpu() };
    let cpu = usize::try_from(cpu).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: an all-zero `cpu_set_t` is a valid (empty) mask.
    let mut one: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: `cpu` came from the kernel, so it is below the mask's size.
    unsafe { libc::CPU_SET(cpu, &mut one) };
    set(0, &one)?;
    let mut saved = Vec::new();
    for tid in threads(pid)? {
        let mask = get(tid)?;
        set(tid, &one)?;
        saved.push((tid, mask));
    }
    Ok(Pinned { cpu, saved })
}

impl Pinned {
    /// Give the program's threads their masks back (threads born since get the
    /// program's main thread's original mask). Best effort: threads may have exited.
    pub fn restore(&self, pid: i32) {
        let main = self.saved.iter().find(|(t, _)| *t == pid).map(|(_, m)| *m);
        for tid in threads(pid).unwrap_or_default() {
            let mask = self
                .saved
                .iter()
                .find(|(t, _)| *t == tid)
                .map(|(_, m)| *m)
                .or(main);
            if let Some(m) = mask {
                let _ = set(tid, &m);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_a_process_and_restores_it() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        let before = get(pid).unwrap();
        let mine = get(0).unwrap();
        let p = pin_together(pid).unwrap();
        let now = get(pid).unwrap();
        // SAFETY: reading a mask we own.
        let count = unsafe { libc::CPU_COUNT(&now) };
        assert_eq!(count, 1);
        // SAFETY: `p.cpu` is a CPU the kernel reported, within the mask.
        assert!(unsafe { libc::CPU_ISSET(p.cpu, &now) });
        p.restore(pid);
        // SAFETY: comparing plain bit masks.
        let same = unsafe {
            libc::memcmp(
                (&get(pid).unwrap() as *const libc::cpu_set_t).cast(),
                (&before as *const libc::cpu_set_t).cast(),
                std::mem::size_of::<libc::cpu_set_t>(),
            )
        } == 0;
        assert!(same, "the original mask is back");
        set(0, &mine).unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
