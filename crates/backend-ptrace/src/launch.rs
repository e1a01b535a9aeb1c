//! Getting a process under trace: spawning a command, or attaching to a running pid.
//!
//! Both use `PTRACE_SEIZE` (no stop at attach, `PTRACE_INTERRUPT` and proper
//! group-stop reports later) with the same options, so new threads, forks, vforks and
//! execs are reported the same way whichever way the process was found.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::process::CommandExt;
use std::process::Command;

use multiprobe_core::{Error, Result};

use crate::error;
use crate::sys::{self, Errno, Tid, Wait};
use crate::tracer::{ThreadClaim, Tracer};

impl Tracer {
    /// Start `cmd` under trace. Returns with the new program loaded (its executable
    /// and the dynamic loader are mapped, its libraries not yet) and stopped before its
    /// first instruction, so probes can be registered before it runs; [`Tracer::run`]
    /// starts it. Its stdio is what `cmd` configured; [`Tracer::take_child`] gives the
    /// pipes.
    ///
    /// How: the child, between fork and exec, sends its pid through a pipe and waits for
    /// a byte on another; the tracer seizes it meanwhile, then lets it exec, and sees
    /// the exec as the first event. `cmd.spawn()` itself runs on a helper thread because
    /// it returns only after the exec.
    pub fn spawn(cmd: &mut Command) -> Result<Tracer> {
        let claim = ThreadClaim::take()?;
        let e = |e| error::sys(e, "create a pipe");
        let (pid_r, pid_w) = sys::pipe().map_err(e)?;
        let (go_r, go_w) = sys::pipe().map_err(e)?;
        let (pw, gr) = (pid_w.as_raw_fd(), go_r.as_raw_fd());
        // SAFETY: the closure runs in the forked child before exec and makes only
        // async-signal-safe calls (getpid, write, read) on fds that stay open in the
        // child until exec (they are close-on-exec).
        unsafe {
            cmd.pre_exec(move || {
                let pid = libc::getpid().to_ne_bytes();
                if libc::write(pw, pid.as_ptr().cast(), 4) != 4 {
                    return Err(std::io::Error::last_os_error());
                }
                let mut go = 0u8;
                if libc::read(gr, (&mut go as *mut u8).cast(), 1) != 1 {
                    return Err(std::io::Error::other("the tracer went away"));
                }
                Ok(())
            });
        }
        std::thread::scope(|s| {
            let spawner = s.spawn(|| cmd.spawn());
            let mut buf = [0u8; 4];
            let got = sys::read_fd(pid_r.as_fd(), &mut buf);
            drop(pid_w);
            if got != Ok(4) {
                // The fork failed: spawn reports why.
                drop(go_w);
                return match spawner.join().expect("spawn does not panic") {
                    Ok(mut c) => {
                        let _ = c.kill();
                        let _ = c.wait();
                        Err(Error::Backend("the child did not report its pid".into()))
                    }
                    Err(e) => Err(Error::io("spawn", e)),
                };
            }
            let pid = i32::from_ne_bytes(buf);
            let seized = sys::seize(pid);
            if seized.is_err() {
                let _ = sys::kill(pid, libc::SIGKILL);
            }
            let _ = sys::write_fd(go_w.as_fd(), &[1]);
            drop(go_w);
            // Returns once exec succeeded (or failed, and std reaped the child).
            let child = spawner.join().expect("spawn does not panic");
            if let Err(e) = seized {
                if let Ok(mut c) = child {
                    let _ = c.wait();
                }
                return Err(error::sys(e, format_args!("trace the new process {pid}")));
            }
            let child = child.map_err(|e| Error::io("spawn", e))?;
            wait_exec(pid)?;
            let mut t = Tracer::new(pid, &[(pid, Some(0))], claim)?;
            t.child = Some(child);
            Ok(t)
        })
    }

    /// Attach to the running process `pid` and all its threads. The process is not
    /// stopped. Errors: [`Error::ProcessGone`] for no such process,
    /// [`Error::PermissionDenied`] when the system refuses — saying so when another
    /// tracer (a debugger) already has it.
    pub fn attach(pid: i32) -> Result<Tracer> {
        if pid <= 0 || !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            return Err(Error::ProcessGone);
        }
        let claim = ThreadClaim::take()?;
        if pid == std::process::id() as i32 {
            return Err(Error::PermissionDenied(
                "a process cannot trace itself".into(),
            ));
        }
        if let Err(e) = sys::seize(pid) {
            return Err(attach_error(pid, e));
        }
        let mut seized = vec![pid];
        // Threads may be starting while we look: list until nothing new appears.
        // Threads created by an already seized thread are attached by the kernel.
        loop {
            let mut new = false;
            let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
                .map_err(|e| error::proc_io(e, format_args!("list threads of {pid}")))?;
            for t in tasks.flatten() {
                let Some(tid) = t.file_name().to_str().and_then(|s| s.parse::<Tid>().ok()) else {
                    continue;
                };
                if seized.contains(&tid) {
                    continue;
                }
                match sys::seize(tid) {
                    Ok(()) => {}
                    // Gone, or already ours (auto-attached as a child of a seized one).
                    Err(Errno::ESRCH) | Err(Errno::EPERM) => {}
                    Err(e) => return Err(error::sys(e, format_args!("trace thread {tid}"))),
                }
                seized.push(tid);
                new = true;
            }
            if !new {
                break;
            }
        }
        let held: Vec<(Tid, Option<i32>)> = seized.iter().map(|&t| (t, None)).collect();
        Tracer::new(pid, &held, claim)
    }
}

fn tracer_of(pid: Tid) -> Option<Tid> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))?
        .trim()
        .parse()
        .ok()
        .filter(|&t| t != 0)
}

fn attach_error(pid: Tid, e: Errno) -> Error {
    match e {
        Errno::ESRCH => Error::ProcessGone,
        Errno::EPERM => match tracer_of(pid) {
            Some(t) => Error::PermissionDenied(format!(
                "process {pid} is already traced by process {t} (a debugger?)"
            )),
            None => Error::PermissionDenied(format!(
                "not allowed to trace process {pid} (another user's process, or \
                 kernel.yama.ptrace_scope forbids it)"
            )),
        },
        e => error::sys(e, format_args!("trace process {pid}")),
    }
}

/// Wait for the seized child's exec event, delivering any signal it gets before.
fn wait_exec(pid: Tid) -> Result<()> {
    loop {
        match sys::wait(pid, false).map_err(|e| error::sys(e, "wait for the new process"))? {
            Some(Wait::Stopped {
                event: libc::PTRACE_EVENT_EXEC,
                ..
            }) => return Ok(()),
            Some(Wait::Stopped { sig, event, .. }) => {
                let sig = if event == 0 { sig } else { 0 };
                sys::cont(pid, sig).map_err(|e| error::sys(e, "resume the new process"))?;
            }
            Some(_) | None => return Err(Error::ProcessGone),
        }
    }
}
