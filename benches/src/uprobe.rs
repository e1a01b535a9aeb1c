//! A kernel uprobe on a function of this process, through tracefs, as the baseline a
//! user would compare an in-process probe with.
//!
//! tracefs is mounted at `/sys/kernel/tracing` if it is not (root only); the probe is an
//! `uprobe_events` entry `p:multiprobe_bench/<name> <file>:<offset>` on the file and
//! offset `/proc/self/maps` gives for the address, enabled while the value lives and
//! removed on drop. Every hit is then one kernel `int3` handled in the kernel and one
//! event written to the trace buffer, which is what a kernel uprobe costs its user.

use std::fs;
use std::io::Write;
use std::path::Path;

const TRACEFS: &str = "/sys/kernel/tracing";
const GROUP: &str = "multiprobe_bench";

/// An enabled kernel uprobe; removed on drop.
#[derive(Debug)]
pub struct KernelUprobe {
    name: String,
}

fn append(file: &str, line: &str) -> std::io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(Path::new(TRACEFS).join(file))?;
    f.write_all(line.as_bytes())
}

fn mounted() -> bool {
    Path::new(TRACEFS).join("uprobe_events").exists()
}

/// The file and file offset of `addr` in process `pid` (`"self"` for this one).
fn file_offset_in(pid: &str, addr: u64) -> Option<(String, u64)> {
    let maps = fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let (range, _perms, off) = (it.next()?, it.next()?, it.next()?);
        let path = it.nth(2).unwrap_or("");
        let (lo, hi) = range.split_once('-')?;
        let (lo, hi) = (
            u64::from_str_radix(lo, 16).ok()?,
            u64::from_str_radix(hi, 16).ok()?,
        );
        if (lo..hi).contains(&addr) && path.starts_with('/') {
            let off = u64::from_str_radix(off, 16).ok()?;
            return Some((path.to_string(), addr - lo + off));
        }
    }
    None
}

impl KernelUprobe {
    /// A uprobe named `name` on `addr` (a function of this process's executable or a
    /// library). `Err` says why there is none (not root, no tracefs, no uprobes).
    pub fn new(name: &str, addr: u64) -> Result<KernelUprobe, String> {
        Self::with_kind(name, addr, 'p')
    }

    /// A uretprobe (the kernel's return probe, `r:`) named `name` on the function at
    /// `addr`; otherwise as [`KernelUprobe::new`].
    pub fn new_return(name: &str, addr: u64) -> Result<KernelUprobe, String> {
        Self::with_kind(name, addr, 'r')
    }

    /// A uprobe named `name` on the function at `addr` of process `pid` (another
    /// process: the probe is on the file, so every process mapping it is probed).
    pub fn new_in(pid: i32, name: &str, addr: u64) -> Result<KernelUprobe, String> {
        Self::with_kind_in(&pid.to_string(), name, addr, 'p')
    }

    /// A uretprobe named `name` on the function at `addr` of process `pid`; otherwise
    /// as [`KernelUprobe::new_in`].
    pub fn new_return_in(pid: i32, name: &str, addr: u64) -> Result<KernelUprobe, String> {
        Self::with_kind_in(&pid.to_string(), name, addr, 'r')
    }

    fn with_kind(name: &str, addr: u64, kind: char) -> Result<KernelUprobe, String> {
        Self::with_kind_in("self", name, addr, kind)
    }

    fn with_kind_in(pid: &str, name: &str, addr: u64, kind: char) -> Result<KernelUprobe, String> {
        if !mounted() {
            let _ = std::process::Command::new("mount")
                .args(["-t", "tracefs", "nodev", TRACEFS])
                .status();
        }
        if !mounted() {
            return Err(format!(
                "tracefs is not mounted at {TRACEFS} and could not be"
            ));
        }
        let (file, off) = file_offset_in(pid, addr)
            .ok_or_else(|| format!("{addr:#x} is not in a mapped file"))?;
        let p = KernelUprobe {
            name: name.to_string(),
        };
        append(
            "uprobe_events",
            &format!("{kind}:{GROUP}/{name} {file}:{off:#x}\n"),
        )
        .map_err(|e| format!("adding the uprobe: {e}"))?;
        append(&format!("events/{GROUP}/{name}/enable"), "1\n")
            .map_err(|e| format!("enabling the uprobe: {e}"))?;
        Ok(p)
    }
}

impl Drop for KernelUprobe {
    fn drop(&mut self) {
        let _ = append(&format!("events/{GROUP}/{}/enable", self.name), "0\n");
        let _ = append("uprobe_events", &format!("-:{GROUP}/{}\n", self.name));
    }
}
