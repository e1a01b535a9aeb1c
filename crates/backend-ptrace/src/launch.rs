//! Getting a process under trace: spawning a command, or attaching to a running pid.
//!
//! Both use `PTRACE_SEIZE` (no stop at attach, `PTRACE_INTERRUPT` and proper
//! group-stop reports later) with the same options, so new threads, forks, vforks and
//! execs are reported the same way whichever way the process was found.

use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::Command;

use multiprobe_core::{Error, Result};

use crate::error;
use crate::sys::{self, Errno, Event, Pid, Signal, Tid, Wait};
use crate::tracer::{ThreadClaim, Tracer};

/// What program an address space runs, as far as probing goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Image {
    /// An x86-64 program: what this backend's instruction analysis is for.
    X86_64,
    /// Anything else (a 32-bit i386 or x32 program, another architecture's), named.
    Other(&'static str),
}

impl Image {
    /// An error unless probes can go into this image.
    pub(crate) fn check(self, pid: Pid) -> Result<()> {
        match self {
            Image::X86_64 => Ok(()),
            Image::Other(what) => Err(Error::Backend(format!(
                "process {} runs {what}: multiprobe probes x86-64 programs only",
                pid.as_raw_pid()
            ))),
        }
    }
}

/// The kind of program `pid` runs, from the ELF header of its executable
/// (`/proc/PID/exe`, which opens the very file it runs, whatever namespace it is in).
/// Unreadable: taken as x86-64 (the probes' own checks apply).
pub(crate) fn image_of(pid: Pid) -> Image {
    use std::io::Read;
    let mut head = [0u8; 20];
    let read = std::fs::File::open(format!("/proc/{}/exe", pid.as_raw_pid()))
        .and_then(|mut f| f.read_exact(&mut head));
    if read.is_err() || head[..4] != *b"\x7fELF" {
        return Image::X86_64;
    }
    let machine = u16::from_le_bytes([head[18], head[19]]);
    match (head[4], machine) {
        (2, 62) => Image::X86_64,
        (1, 3) => Image::Other("a 32-bit (i386) program"),
        (1, 62) => Image::Other("an x32 (32-bit pointer) program"),
        _ => Image::Other("a program that is not x86-64"),
    }
}

impl Tracer {
    /// Start `cmd` under trace. Returns with the new program loaded (its executable
    /// and the dynamic loader are mapped, its libraries not yet) and stopped before its
    /// first instruction, so probes can be registered before it runs; [`Tracer::run`]
    /// starts it. Its stdio is what `cmd` configured; [`Tracer::take_child`] gives the
    /// pipes.
    ///
    /// The program dies with the tracer if the tracer is killed outright
    /// (`PTRACE_O_EXITKILL`): it never runs on with breakpoints in it and nobody to
    /// serve them. A program that is not x86-64 (a 32-bit one) is refused — killed
    /// before it ran an instruction — with an error that says so.
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
            let got = sys::read_fd(&pid_r, &mut buf);
            drop(pid_w);
            let pid = match got {
                Ok(4) => sys::pid(i32::from_ne_bytes(buf)),
                _ => None,
            };
            let Some(pid) = pid else {
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
            };
            let seized = sys::seize(pid, sys::OPTIONS | libc::PTRACE_O_EXITKILL);
            if seized.is_err() {
                let _ = sys::kill(pid, Signal::KILL);
            }
            let _ = sys::write_fd(&go_w, &[1]);
            drop(go_w);
            // Returns once exec succeeded (or failed, and std reaped the child).
            let child = spawner.join().expect("spawn does not panic");
            if let Err(e) = seized {
                if let Ok(mut c) = child {
                    let _ = c.wait();
                }
                return Err(error::sys(
                    e,
                    format_args!("trace the new process {}", pid.as_raw_pid()),
                ));
            }
            let child = child.map_err(|e| Error::io("spawn", e))?;
            wait_exec(pid)?;
            if let Err(e) = image_of(pid).check(pid) {
                // Never run: killed at its first instruction, reaped here.
                let _ = sys::kill(pid, Signal::KILL);
                while let Ok(Some(w)) = sys::wait(Some(pid), false) {
                    if w.is_end() {
                        break;
                    }
                }
                return Err(e);
            }
            Tracer::new(pid, &[pid], &[], Some(claim), Some(child))
        })
    }

    /// Attach to the running process `pid` and all its threads. The process is not
    /// stopped. Errors: [`Error::ProcessGone`] for no such process,
    /// [`Error::PermissionDenied`] when the system refuses, saying why as far as it can
    /// be told (a zombie, a kernel thread, already traced, another user's or a more
    /// privileged process, `ptrace_scope`); a program that is not x86-64 (a 32-bit one)
    /// is refused before anything is done to it.
    pub fn attach(pid: i32) -> Result<Tracer> {
        let Some(pid) = sys::pid(pid) else {
            return Err(Error::ProcessGone);
        };
        if !std::path::Path::new(&format!("/proc/{}", pid.as_raw_pid())).exists() {
            return Err(Error::ProcessGone);
        }
        let claim = ThreadClaim::take()?;
        if pid.as_raw_pid() == std::process::id() as i32 {
            return Err(Error::PermissionDenied(
                "a process cannot trace itself".into(),
            ));
        }
        if let Some(why) = crate::diagnose::untraceable(pid) {
            return Err(Error::PermissionDenied(why));
        }
        image_of(pid).check(pid)?;
        if let Err(e) = sys::seize(pid, sys::OPTIONS) {
            return Err(attach_error(pid, e));
        }
        let mut seized = vec![pid];
        // Threads may be starting while we look: list until nothing new appears.
        // Threads created by an already seized thread are attached by the kernel.
        loop {
            let mut new = false;
            let tasks = std::fs::read_dir(format!("/proc/{}/task", pid.as_raw_pid()))
                .map_err(|e| error::proc_io(e, format_args!("list threads of {pid:?}")))?;
            for t in tasks.flatten() {
                let Some(tid) = t
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<i32>().ok())
                    .and_then(sys::pid)
                else {
                    continue;
                };
                if seized.contains(&tid) {
                    continue;
                }
                match sys::seize(tid, sys::OPTIONS) {
                    Ok(()) => {}
                    // Gone, or already ours (auto-attached as a child of a seized one).
                    Err(Errno::SRCH) | Err(Errno::PERM) => {}
                    Err(e) => return Err(error::sys(e, format_args!("trace thread {tid:?}"))),
                }
                seized.push(tid);
                new = true;
            }
            if !new {
                break;
            }
        }
        Tracer::new(pid, &[], &seized, Some(claim), None)
    }
}

fn attach_error(pid: Tid, e: Errno) -> Error {
    match e {
        Errno::SRCH => Error::ProcessGone,
        Errno::PERM => Error::PermissionDenied(crate::diagnose::refused(pid)),
        e => error::sys(e, format_args!("trace process {}", pid.as_raw_pid())),
    }
}

/// Wait for the seized child's exec event, delivering any signal it gets before.
fn wait_exec(pid: Tid) -> Result<()> {
    loop {
        let w =
            sys::wait(Some(pid), false).map_err(|e| error::sys(e, "wait for the new process"))?;
        match w {
            Some(Wait::Event(_, Event::Exec)) => return Ok(()),
            Some(Wait::Signal(_, sig)) => sys::cont(pid, Some(sig)),
            Some(w) if !w.is_end() => sys::cont(pid, None),
            Some(_) | None => return Err(Error::ProcessGone),
        }
        .map_err(|e| error::sys(e, "resume the new process"))?;
    }
}
