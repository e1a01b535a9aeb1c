//! Why a process cannot be traced, in words: the kernel answers `EPERM` for a zombie, a
//! kernel thread, a process another tracer has, another user's, a more privileged one
//! or one in another user namespace, and for `ptrace_scope`; the user needs to know
//! which. Everything here reads `/proc` only.

use crate::sys::Pid;

/// `PF_KTHREAD` in the flags field of `/proc/PID/stat`.
const PF_KTHREAD: u64 = 0x0020_0000;

fn status(pid: Pid) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{}/status", pid.as_raw_pid())).ok()
}

fn field<'a>(status: &'a str, key: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(str::trim)
}

/// The process's name (`Name:` of its status), for messages.
fn name(pid: Pid) -> String {
    status(pid)
        .and_then(|s| field(&s, "Name:").map(str::to_string))
        .unwrap_or_default()
}

/// A reason `pid` can never be traced, known before asking the kernel: a zombie, or a
/// kernel thread.
pub(crate) fn untraceable(pid: Pid) -> Option<String> {
    let n = pid.as_raw_pid();
    let st = status(pid)?;
    let state = field(&st, "State:").unwrap_or("");
    if state.starts_with('Z') || state.starts_with('X') {
        return Some(format!(
            "process {n} ({}) is a zombie: it has exited and only waits for its parent to \
             reap it; there is no program left to trace",
            name(pid)
        ));
    }
    let stat = std::fs::read_to_string(format!("/proc/{n}/stat")).ok()?;
    // The fields after the command name, which is in parentheses and may hold spaces.
    let after = stat.rsplit_once(") ")?.1;
    let flags: u64 = after.split_whitespace().nth(6)?.parse().ok()?;
    if flags & PF_KTHREAD != 0 {
        return Some(format!(
            "process {n} ({}) is a kernel thread: it runs no user-space program to probe",
            name(pid)
        ));
    }
    None
}

/// Why the kernel refused to let us trace `pid` (`EPERM` from `PTRACE_SEIZE`), as far
/// as `/proc` tells.
pub(crate) fn refused(pid: Pid) -> String {
    let n = pid.as_raw_pid();
    if let Some(why) = untraceable(pid) {
        return why;
    }
    let Some(theirs) = status(pid) else {
        return format!("process {n} is gone or cannot be inspected");
    };
    let mine =
        status(Pid::from_raw(std::process::id() as i32).expect("own pid")).unwrap_or_default();
    if let Some(t) = field(&theirs, "TracerPid:").filter(|t| *t != "0") {
        return format!("process {n} is already traced by process {t} (a debugger?)");
    }
    let uid =
        |s: &str| field(s, "Uid:").and_then(|v| v.split_whitespace().nth(1).map(str::to_string));
    if uid(&theirs) != uid(&mine) && uid(&mine).as_deref() != Some("0") {
        return format!(
            "process {n} belongs to another user (uid {}); only that user or root may trace it",
            uid(&theirs).unwrap_or_default()
        );
    }
    let ns = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/user")).ok();
    if ns(&n.to_string()).is_none() || ns(&n.to_string()) != ns("self") {
        return format!(
            "process {n} ({}) runs in another user namespace than this one (a container \
             boundary, or a more privileged part of the system): it cannot be traced from here",
            name(pid)
        );
    }
    let caps = |s: &str| field(s, "CapPrm:").and_then(|v| u64::from_str_radix(v, 16).ok());
    if let (Some(t), Some(m)) = (caps(&theirs), caps(&mine)) {
        if t & !m != 0 {
            return format!(
                "process {n} ({}) has privileges (capabilities {t:#x}) this process lacks",
                name(pid)
            );
        }
    }
    let scope = std::fs::read_to_string("/proc/sys/kernel/yama/ptrace_scope")
        .ok()
        .and_then(|s| s.trim().parse::<u32>().ok());
    match scope {
        Some(1) => format!(
            "not allowed to trace process {n}: kernel.yama.ptrace_scope is 1 (only a \
             process's ancestors may trace it; run as root or with CAP_SYS_PTRACE)"
        ),
        Some(2) => format!(
            "not allowed to trace process {n}: kernel.yama.ptrace_scope is 2 (only root \
             or CAP_SYS_PTRACE)"
        ),
        Some(3) => format!(
            "not allowed to trace process {n}: kernel.yama.ptrace_scope is 3 (no process \
             may be attached to)"
        ),
        _ => format!(
            "not allowed to trace process {n} ({}): the kernel refused (a security module, \
             or the program made itself undumpable)",
            name(pid)
        ),
    }
}
