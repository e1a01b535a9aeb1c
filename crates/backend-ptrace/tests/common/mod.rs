//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::io::Read;
use std::process::{Command, Stdio};

pub use multiprobe_test_targets::bin;

/// Test program `name` with `args` under a tracer, stopped at its entry point, and
/// its child handle (stdout piped).
pub fn spawn_at_entry(
    name: &str,
    args: &[&str],
) -> (multiprobe_backend_ptrace::Tracer, std::process::Child) {
    let mut t = multiprobe_backend_ptrace::Tracer::spawn(&mut command(name, args)).unwrap();
    assert!(t.run_to_entry().unwrap().is_none());
    let child = t.take_child().unwrap();
    (t, child)
}

/// A command for test program `name` with `args`, stdout piped.
pub fn command(name: &str, args: &[&str]) -> Command {
    let mut c = Command::new(bin(name));
    c.args(args).stdout(Stdio::piped()).stderr(Stdio::inherit());
    c
}

/// What an unprobed run of the program prints, and its exit code.
pub fn unprobed(name: &str, args: &[&str]) -> (String, Option<i32>) {
    let out = command(name, args).output().expect("run test program");
    (String::from_utf8(out.stdout).unwrap(), out.status.code())
}

/// Read everything from the child's stdout.
pub fn read_all(child: &mut std::process::Child) -> String {
    let mut s = String::new();
    child
        .stdout
        .take()
        .expect("stdout piped")
        .read_to_string(&mut s)
        .expect("read stdout");
    s
}

/// The executable, read-only mappings of `pid` and their bytes: the program's code.
pub fn text(pid: i32) -> Vec<(String, u64, Vec<u8>)> {
    use std::os::unix::fs::FileExt;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut out = Vec::new();
    for line in maps.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if !f[1].contains('x') || f.get(5).is_some_and(|p| p.starts_with("[v")) {
            continue;
        }
        let (s, e) = f[0].split_once('-').unwrap();
        let (s, e) = (
            u64::from_str_radix(s, 16).unwrap(),
            u64::from_str_radix(e, 16).unwrap(),
        );
        let mut buf = vec![0; (e - s) as usize];
        mem.read_exact_at(&mut buf, s).unwrap();
        out.push((f.get(5).unwrap_or(&"").to_string(), s, buf));
    }
    out
}

/// A handler that counts its pre calls into `hits` and has an (empty) post-handler, so
/// every hit sends the thread through a trap-after slot.
pub fn counting_with_post(
    hits: &std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> impl multiprobe_core::Handler {
    let h = std::sync::Arc::clone(hits);
    multiprobe_core::FnHandler::new()
        .pre(move |_| {
            h.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            multiprobe_core::PreAction::Continue
        })
        .post(|_| {})
}

/// Run the spawned program `t` traces to its end, which must be an exit with `code`:
/// what it printed.
pub fn run_to_exit(t: &mut multiprobe_backend_ptrace::Tracer, code: i32) -> String {
    use multiprobe_backend_ptrace::{ExitStatus, Stop};
    let mut child = t.take_child().unwrap();
    assert_eq!(t.run().unwrap(), Stop::Exited(ExitStatus::Code(code)));
    read_all(&mut child)
}

/// A hit counter and the handler that counts into it.
pub fn counter() -> (
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    impl Fn(&mut multiprobe_core::Hit<'_>) + Send + Sync + 'static,
) {
    let c = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let c2 = std::sync::Arc::clone(&c);
    (c, move |_: &mut multiprobe_core::Hit<'_>| {
        c2.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    })
}

/// Start `name --wait args` untraced and wait until it says it is ready. Keep the
/// reader: the program dies of SIGPIPE writing its report into a closed pipe.
pub fn start_waiting(
    name: &str,
    args: &[&str],
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
) {
    let (child, out, line) =
        multiprobe_test_targets::spawn_until_first_line(command(name, args).arg("--wait"));
    assert_eq!(line.trim(), format!("ready {}", child.id()));
    (child, out)
}

/// Wakes the tracer loop every few milliseconds while it lives.
pub struct Ticker(std::sync::Arc<std::sync::atomic::AtomicBool>);
impl Drop for Ticker {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
pub fn ticker(h: multiprobe_backend_ptrace::DetachHandle) -> Ticker {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s = std::sync::Arc::clone(&stop);
    std::thread::spawn(move || {
        while !s.load(std::sync::atomic::Ordering::Relaxed) {
            h.wake();
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    });
    Ticker(stop)
}
