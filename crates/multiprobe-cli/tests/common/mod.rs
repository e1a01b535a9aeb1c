//! What the command's tests share: running multiprobe, reading its summary, the test
//! programs, and looking at a traced process from outside.
//!
//! `MULTIPROBE_UNDER_TEST`, if set, names the multiprobe executable to test instead of
//! this build's (to check that a new test fails on an older build).

#![allow(dead_code)] // each test file uses some of these

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStderr, Command, Output, Stdio};

use multiprobe_test_targets::{bin, spawn_until_first_line};

/// The multiprobe under test, started with every signal at its default action whatever
/// this harness inherited (see [`default_signals`]).
pub fn multiprobe() -> Command {
    let mut cmd = Command::new(
        std::env::var_os("MULTIPROBE_UNDER_TEST")
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_multiprobe").into()),
    );
    default_signals(&mut cmd);
    cmd
}

/// Start `cmd` with no signal ignored, as from a terminal.
///
/// Why: an ignored signal stays ignored across `exec`, and multiprobe keeps a signal
/// that was ignored when it started ignored (`nohup`; see `src/signals.rs`). A harness
/// started in the background of a non-interactive shell (`cargo test &` in a script, a
/// CI job) has SIGINT and SIGQUIT ignored, and every multiprobe it started then never
/// heard the tests' Ctrl-C: it served on, and a test waiting for it to detach waited
/// forever. A test that wants a signal ignored says so with its own `pre_exec`, which
/// runs after this one.
pub fn default_signals(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: between fork and exec the closure only calls `signal`, which is
    // async-signal-safe, on numbers (the invalid or reserved ones fail harmlessly).
    unsafe {
        cmd.pre_exec(|| {
            for sig in 1..=64 {
                if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                    libc::signal(sig, libc::SIG_DFL);
                }
            }
            Ok(())
        });
    }
}

pub fn run(args: &[&str]) -> Output {
    multiprobe().args(args).output().expect("run multiprobe")
}

/// The words of `run OPTIONS... -p PROBE... -- COMMAND...`: a `-p` for each of
/// `probes`.
pub fn run_line<'a>(options: &[&'a str], probes: &[&'a str], command: &[&'a str]) -> Vec<&'a str> {
    let mut line = vec!["run"];
    line.extend(options);
    for p in probes {
        line.extend(["-p", p]);
    }
    line.push("--");
    line.extend(command);
    line
}

/// [`run`], which must succeed: its stdout and stderr (the failure shows the stderr).
pub fn run_ok(args: &[&str]) -> (String, String) {
    let out = run(args);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{args:?}: {stderr}");
    (stdout, stderr)
}

/// Start multiprobe with `args` (an `attach`) with its stderr piped, and wait for its
/// first line (`attached to process PID; ...` once it attached): multiprobe, the rest of
/// its stderr, and that line.
pub fn spawn_attach(args: &[&str]) -> (Child, BufReader<ChildStderr>, String) {
    let mut mp = multiprobe()
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(mp.stderr.take().unwrap());
    let mut line = String::new();
    err.read_line(&mut line).unwrap();
    (mp, err, line)
}

/// [`spawn_attach`] of `attach PID -p PROBE...`, a `-p` for each of `probes`.
pub fn spawn_attach_probing(pid: i32, probes: &[&str]) -> (Child, BufReader<ChildStderr>, String) {
    let pid = pid.to_string();
    let mut args = vec!["attach", pid.as_str()];
    for p in probes {
        args.extend(["-p", p]);
    }
    spawn_attach(&args)
}

/// A fresh, empty directory for one test (`mp-NAME-PID` in the temporary directory).
pub fn scratch(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("mp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A validator of `--json` output against the schema the README documents
/// (`schema/output.schema.json`).
pub fn validator() -> jsonschema::Validator {
    let text = include_str!("../../schema/output.schema.json");
    let schema: serde_json::Value = serde_json::from_str(text).expect("the schema is JSON");
    jsonschema::validator_for(&schema).expect("the schema is a valid JSON Schema")
}

/// The `probes` of the `--json` summary (the last line of stderr).
pub fn json_probes(stderr: &str) -> Vec<serde_json::Value> {
    let summary: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap())
        .unwrap_or_else(|e| panic!("no JSON summary ({e}): {stderr}"));
    summary["probes"].as_array().unwrap().clone()
}

/// `name calls=N` from a test program's own report.
pub fn calls(stdout: &str, name: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} calls=")))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {name} count in {stdout:?}"))
}

/// The summary rows for `symbol_suffix`: (action, hits, missed, site).
pub fn rows(summary: &str, symbol_suffix: &str) -> Vec<(String, u64, u64, String)> {
    summary
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 6 && f[1].ends_with(symbol_suffix)).then(|| {
                (
                    f[2].to_string(),
                    f[3].parse().unwrap(),
                    f[4].parse().unwrap(),
                    f[0].to_string(),
                )
            })
        })
        .collect()
}

/// Start `mp-single --wait`, return it with its pid once it is ready.
pub fn waiting_target(iters: &str) -> (Child, i32, BufReader<std::process::ChildStdout>) {
    let (child, out, line) =
        spawn_until_first_line(Command::new(bin("mp-single")).args(["--wait", "--iters", iters]));
    let pid = line.trim().strip_prefix("ready ").unwrap().parse().unwrap();
    (child, pid, out)
}

/// Start multiprobe with `args`, a `run` of a program started with `--wait`, with stdin,
/// stdout and stderr piped, and wait until the program says `ready PID`: multiprobe, the
/// program's stdout after that line, and the program's pid.
pub fn spawn_run_waiting(args: &[&str]) -> (Child, BufReader<std::process::ChildStdout>, i32) {
    let (mp, out, line) = spawn_until_first_line(multiprobe().args(args).stderr(Stdio::piped()));
    let pid = line.trim().strip_prefix("ready ").unwrap().parse().unwrap();
    (mp, out, pid)
}

pub fn status_field(pid: i32, field: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field).map(|v| v.trim().to_string()))
        .unwrap()
}

pub fn code_at(pid: i32, addr: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(format!("/proc/{pid}/mem")).unwrap();
    let mut b = vec![0; len];
    f.read_exact_at(&mut b, addr).unwrap();
    b
}

pub fn function_bytes(pid: i32, name: &str) -> Vec<u8> {
    let syms = multiprobe_symbols::ProcessSymbols::read(pid as u32, Default::default()).unwrap();
    let f = syms.resolve(None, name).unwrap();
    code_at(pid, f.start, f.size as usize)
}

/// Whether every executable file mapping of `pid` holds exactly the bytes of its file
/// (no `int3` or jump left in the program or its libraries). `Err` names the first
/// difference.
pub fn text_is_pristine(pid: i32) -> Result<(), String> {
    use std::os::unix::fs::FileExt;
    let maps = multiprobe_symbols::Maps::read(pid as u32).map_err(|e| e.to_string())?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).map_err(|e| e.to_string())?;
    let mut checked = 0;
    for r in maps.regions.iter().filter(|r| r.exec && r.is_file()) {
        let file = std::fs::File::open(&r.path).map_err(|e| format!("{}: {e}", r.path))?;
        let size = file.metadata().map_err(|e| e.to_string())?.len();
        let len = (r.end - r.start).min(size.saturating_sub(r.offset)) as usize;
        let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
        mem.read_exact_at(&mut a, r.start)
            .map_err(|e| format!("{:#x}: {e}", r.start))?;
        file.read_exact_at(&mut b, r.offset)
            .map_err(|e| format!("{}: {e}", r.path))?;
        if let Some(i) = a.iter().zip(&b).position(|(x, y)| x != y) {
            let changed = a.iter().zip(&b).filter(|(x, y)| x != y).count();
            return Err(format!(
                "{changed} byte(s) changed in {}, the first at {:#x} ({:#04x}, was {:#04x})",
                r.path,
                r.start + i as u64,
                a[i],
                b[i]
            ));
        }
        checked += 1;
    }
    if checked == 0 {
        return Err(format!("process {pid} has no executable file mapping"));
    }
    Ok(())
}

/// `pid`'s tracer, 0 if none.
pub fn tracer_of(pid: i32) -> i32 {
    status_field(pid, "TracerPid:").parse().unwrap()
}

/// Poll `cond` until it holds or `timeout` passes; whether it held.
pub fn wait_until(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if std::time::Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Wait for `child` for at most `timeout`; kill it if it is still running then
/// (`None`).
pub fn wait_for(
    child: &mut Child,
    timeout: std::time::Duration,
) -> Option<std::process::ExitStatus> {
    let mut status = None;
    wait_until(timeout, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    status
}

/// Send `sig` to `pid`.
pub fn signal(pid: i32, sig: i32) {
    // SAFETY: sending a signal; no memory is involved.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "kill({pid}, {sig})");
}

/// Whether `pid` has exited (gone, or a zombie).
pub fn is_gone(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(true)
}

/// Kills process `0` when dropped unless it is gone already: a test that fails must not
/// leave a program behind that holds its pipes open.
pub struct KillOnDrop(pub i32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if !is_gone(self.0) {
            // SAFETY: sending a signal; no memory is involved.
            unsafe { libc::kill(self.0, libc::SIGKILL) };
        }
    }
}

/// Read `r` to its end on another thread (a pipe that a program we started may hold
/// open longer than the process we wait for).
pub fn read_in_background(
    mut r: impl std::io::Read + Send + 'static,
) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}
