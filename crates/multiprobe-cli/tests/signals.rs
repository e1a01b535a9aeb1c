//! Signals to multiprobe: every one that would end it detaches first, also while probes
//! are being placed, and multiprobe then ends as the signal would have ended it
//! (`src/signals.rs` has the table). The program never pays: no `int3` is left in it, it
//! is not left traced or stopped, and it runs on (or, for `run`, meets the signal as it
//! would have unprobed).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use multiprobe_test_targets::bin;

const LONG: Duration = Duration::from_secs(60);

/// After multiprobe is gone: the target is untraced, running, byte-identical to its
/// files, and finishes its loop with every call made.
fn target_runs_on_unprobed(
    mut target: std::process::Child,
    pid: i32,
    out: &mut BufReader<std::process::ChildStdout>,
    iters: u64,
    what: &str,
) {
    assert!(
        wait_until(Duration::from_secs(10), || tracer_of(pid) == 0),
        "{what}: still traced"
    );
    assert!(
        !status_field(pid, "State:").starts_with('t'),
        "{what}: left stopped"
    );
    if let Err(e) = text_is_pristine(pid) {
        panic!("{what}: {e}");
    }
    target.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut report = String::new();
    for _ in 0..3 {
        out.read_line(&mut report).unwrap();
    }
    assert_eq!(calls(&report, "mp_add"), iters, "{what}: {report}");
    drop(target.stdin.take());
    let status = wait_for(&mut target, LONG).expect("the target finishes");
    assert!(status.success(), "{what}: the target ended {status:?}");
}

/// `attach`, then a signal to multiprobe: it detaches, prints its summary and ends as
/// the signal says (SIGINT and SIGTERM: exit 0; the others: killed by that signal); the
/// process runs on as if never probed.
#[test]
fn attach_detaches_on_every_signal_that_would_end_it() {
    for sig in [
        libc::SIGINT,
        libc::SIGTERM,
        libc::SIGHUP,
        libc::SIGQUIT,
        libc::SIGUSR1,
        libc::SIGUSR2,
        libc::SIGALRM,
        libc::SIGPROF,
        libc::SIGRTMIN() + 1,
    ] {
        let (target, pid, mut out) = waiting_target("40");
        let _target = KillOnDrop(pid);
        let (mut mp, mut err, line) = spawn_attach_probing(pid, &["mp_add", "libc:write"]);
        assert!(line.contains("attached"), "signal {sig}: {line}");
        signal(mp.id() as i32, sig);
        let status = wait_for(&mut mp, LONG).expect("multiprobe ends");
        let mut rest = String::new();
        err.read_to_string(&mut rest).unwrap();
        if sig == libc::SIGINT || sig == libc::SIGTERM {
            assert_eq!(status.code(), Some(0), "signal {sig}: {rest}");
        } else {
            assert_eq!(
                status.signal(),
                Some(sig),
                "signal {sig}: {status:?} {rest}"
            );
        }
        assert_eq!(
            rows(&rest, ":mp_add").len(),
            1,
            "signal {sig}: the summary: {rest}"
        );
        target_runs_on_unprobed(target, pid, &mut out, 40, &format!("signal {sig}"));
    }
}

/// A signal that arrives while `-p 'libc:*'` (some 2,000 sites) is being placed on an
/// attached process: the placement stops, everything placed is taken out again.
#[test]
fn a_signal_during_placement_leaves_nothing_behind() {
    // From before the first breakpoint to the last, wherever this machine's speed puts
    // them (the test says how many handlers each round had placed).
    let rounds = [
        (libc::SIGINT, 0),
        (libc::SIGHUP, 100),
        (libc::SIGTERM, 200),
        (libc::SIGINT, 240),
        (libc::SIGHUP, 280),
        (libc::SIGINT, 320),
        (libc::SIGUSR1, 380),
        (libc::SIGTERM, 450),
        (libc::SIGINT, 600),
    ];
    for (round, (sig, delay)) in rounds.into_iter().enumerate() {
        let (target, pid, mut out) = waiting_target("25");
        let _target = KillOnDrop(pid);
        let mut mp = multiprobe()
            .args(["attach", &pid.to_string(), "-p", "libc:*", "-p", "mp_add"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let err = read_in_background(mp.stderr.take().unwrap());
        // As soon as it has the process (placement starts right after), with a few
        // milliseconds more in later rounds.
        assert!(wait_until(LONG, || tracer_of(pid) != 0), "never attached");
        std::thread::sleep(Duration::from_millis(delay));
        signal(mp.id() as i32, sig);
        let status = wait_for(&mut mp, LONG).expect("multiprobe ends");
        let err = err.join().unwrap();
        let placed = err.lines().filter(|l| l.ends_with(" armed")).count();
        eprintln!("signal {sig}, round {round}: {placed} handlers had been placed");
        let what = format!(
            "signal {sig}, round {round}: {}",
            err.lines().next().unwrap_or("")
        );
        match sig {
            libc::SIGINT | libc::SIGTERM => assert_eq!(status.code(), Some(0), "{what}"),
            _ => assert_eq!(status.signal(), Some(sig), "{what}: {status:?}"),
        }
        target_runs_on_unprobed(target, pid, &mut out, 25, &what);
    }
}

/// `multiprobe run -p mp_add -- mp-single --wait --iters 5` once the program is ready:
/// multiprobe, the program's stdout, its pid, and multiprobe's stderr read in the
/// background.
fn run_single_waiting() -> (
    std::process::Child,
    BufReader<std::process::ChildStdout>,
    i32,
    std::thread::JoinHandle<String>,
) {
    let single = bin("mp-single");
    let (mut mp, out, pid) = spawn_run_waiting(&[
        "run",
        "-p",
        "mp_add",
        "--",
        single.to_str().unwrap(),
        "--wait",
        "--iters",
        "5",
    ]);
    let err = read_in_background(mp.stderr.take().unwrap());
    (mp, out, pid, err)
}

/// `run`, then a signal to multiprobe (not from the terminal): it detaches, passes the
/// signal on to the program, and dies of it. A program that dies of it dies; one that
/// ignores it (`nohup`-style: `trap '' HUP`) runs on unprobed and finishes.
#[test]
fn run_passes_the_signal_on_after_detaching() {
    for sig in [libc::SIGHUP, libc::SIGTERM, libc::SIGALRM, libc::SIGUSR1] {
        let (mut mp, _out, pid, err) = run_single_waiting();
        let _program = KillOnDrop(pid);
        signal(mp.id() as i32, sig);
        let status = wait_for(&mut mp, LONG).expect("multiprobe ends");
        assert_eq!(status.signal(), Some(sig), "signal {sig}: {status:?}");
        assert!(
            wait_until(Duration::from_secs(10), || is_gone(pid)),
            "signal {sig}: the program did not get it"
        );
        let err = err.join().unwrap();
        assert_eq!(rows(&err, ":mp_add").len(), 1, "the summary: {err}");
    }

    // The program ignores SIGHUP: it runs on, untraced and unpatched, and finishes. (The
    // probe is on libc, which `sh` has too: specs are resolved in the first program.)
    let script = format!(
        "trap '' HUP; exec {} --wait --iters 7",
        bin("mp-single").display()
    );
    let (mut mp, mut out, pid) =
        spawn_run_waiting(&["run", "-p", "libc:write", "--", "sh", "-c", &script]);
    let _program = KillOnDrop(pid);
    let mut stdin = mp.stdin.take().unwrap();
    signal(mp.id() as i32, libc::SIGHUP);
    let status = wait_for(&mut mp, LONG).expect("multiprobe ends");
    assert_eq!(status.signal(), Some(libc::SIGHUP), "{status:?}");
    assert!(wait_until(Duration::from_secs(10), || tracer_of(pid) == 0));
    if let Err(e) = text_is_pristine(pid) {
        panic!("{e}");
    }
    stdin.write_all(b"go\n").unwrap();
    drop(stdin);
    let mut report = String::new();
    out.read_to_string(&mut report).unwrap();
    assert_eq!(calls(&report, "mp_add"), 7, "{report}");
}

/// `run`: a first SIGINT sent to multiprobe alone is passed on (as the terminal would
/// have sent it to both), and the program decides; here it dies of it, and so does
/// multiprobe, after its summary.
#[test]
fn run_passes_a_first_sigint_on_and_follows_the_program() {
    let (mut mp, _out, pid, err) = run_single_waiting();
    let _program = KillOnDrop(pid);
    signal(mp.id() as i32, libc::SIGINT);
    let status = wait_for(&mut mp, LONG).expect("multiprobe ends");
    assert_eq!(status.signal(), Some(libc::SIGINT), "{status:?}");
    assert!(wait_until(Duration::from_secs(10), || is_gone(pid)));
    let err = err.join().unwrap();
    assert_eq!(rows(&err, ":mp_add").len(), 1, "the summary: {err}");
}

/// `-o` reaching the file size limit (`ulimit -f`): SIGXFSZ does not kill multiprobe
/// (which would leave every `int3` in the program); the write fails, the program runs
/// to its end, and multiprobe says what was lost and exits 2.
#[test]
fn the_file_size_limit_is_a_write_error_not_a_death() {
    use std::os::unix::process::CommandExt;
    let dir = std::env::temp_dir().join(format!("mp-fsize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("out");
    let mut cmd = multiprobe();
    cmd.args(["run", "--max-lines", "0", "-p", "mp_add=args:2", "-o"])
        .arg(&file)
        .arg("--")
        .arg(bin("mp-single"))
        .args(["--iters", "3000"]);
    // SAFETY: setrlimit is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            let lim = libc::rlimit {
                rlim_cur: 8192,
                rlim_max: 8192,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &lim) == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        });
    }
    let out = cmd.output().unwrap();
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{:?} {stderr}", out.status);
    assert_eq!(calls(&stdout, "mp_add"), 3000, "the program ran to its end");
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("multiprobe: error: writing ") && last.contains("File too large"),
        "{stderr}"
    );
    assert_eq!(
        rows(&stderr, ":mp_add")[0].1,
        3000,
        "the summary on stderr: {stderr}"
    );
    assert!(std::fs::metadata(&file).unwrap().len() <= 8192);
    std::fs::remove_dir_all(&dir).unwrap();
}
