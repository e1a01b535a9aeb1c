//! Hostile and extreme input to the command: intervals too short to serve the program,
//! libraries that are linker scripts, an attached process killed under us.

mod common;

use std::io::{BufReader, Read};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use multiprobe_test_targets::bin;

/// `--interval` below the minimum (or not a usable number) is bad input: one line,
/// exit 2, the program never runs.
#[test]
fn intervals_too_short_or_absurd_are_refused() {
    let single = bin("mp-single");
    for (secs, why) in [
        ("0.001", "too short"),
        ("1e-9", "too short"),
        ("1e300", "not a positive number"),
        ("0", "not a positive number"),
    ] {
        let out = run(&run_line(
            &["--interval", secs],
            &["mp_add"],
            &[single.to_str().unwrap()],
        ));
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{secs}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{secs}: {stderr}");
        assert!(stderr.contains(why), "{secs}: {stderr}");
        assert!(out.stdout.is_empty(), "{secs}: the program ran");
    }
}

/// The shortest interval with a table that takes several times that to print (6,500
/// rows: `libc:*` three times): ticks are skipped, never queued, so the program is
/// still served and finishes; there are never more tables than intervals.
#[test]
fn a_slow_live_table_never_starves_the_program() {
    let mut mp = multiprobe()
        .args(["run", "--interval", "0.01"])
        .args(["-p", "libc:*", "-p", "libc:*", "-p", "libc:*", "--"])
        .arg(bin("mp-single"))
        .args(["--iters", "20000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    let stderr = mp.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        BufReader::new(stderr).read_to_string(&mut s).unwrap();
        s
    });
    let status = wait_for(&mut mp, Duration::from_secs(120));
    let elapsed = started.elapsed();
    let err = reader.join().unwrap();
    let status = status.unwrap_or_else(|| {
        panic!(
            "starved: still running after {elapsed:?}, {} tables printed",
            err.matches("SITE ").count()
        )
    });
    assert!(status.success(), "{status:?}");
    let mut out = String::new();
    mp.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert_eq!(calls(&out, "mp_add"), 20000);
    let tables = err.lines().filter(|l| l.starts_with("--- ")).count() as u128;
    assert!(
        tables <= elapsed.as_millis() / 10 + 1,
        "{tables} live tables in {elapsed:?}"
    );
}

/// `libm.so` in a -dev package is a linker script, not a library: a pending probe on
/// `libm` must find `libm.so.6`, not fail on the script.
#[test]
fn library_prefixes_skip_linker_scripts() {
    let script = std::path::Path::new("/usr/lib/x86_64-linux-gnu/libm.so");
    let is_script = std::fs::read(script).is_ok_and(|b| !b.starts_with(b"\x7fELF"));
    if !is_script {
        eprintln!(
            "skipped: {} is not a linker script here (libc6-dev not installed)",
            script.display()
        );
        return;
    }
    // `true` does not load libm: the probe is pending, checked on disk.
    let (_, stderr) = run_ok(&["run", "-p", "libm:cbrt", "--", "true"]);
    let r = rows(&stderr, "libm:cbrt");
    assert_eq!(r.len(), 1, "{stderr}");
    assert!(
        stderr.lines().last().unwrap().ends_with("pending"),
        "{stderr}"
    );
    // Named by path, the script is refused with a reason.
    let out = run(&run_line(
        &[],
        &["/usr/lib/x86_64-linux-gnu/libm.so:cbrt"],
        &["true"],
    ));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("not an ELF shared object"), "{stderr}");
}

/// An attached process killed by SIGKILL: multiprobe says so and exits 1, a status
/// that cannot be taken for multiprobe's own death by a signal (137).
#[test]
fn attach_says_when_the_process_was_killed() {
    let (mut target, pid, _out) = waiting_target("5");
    let _target = KillOnDrop(pid);
    let (mut mp, mut err, line) = spawn_attach_probing(pid, &["mp_add"]);
    assert!(line.contains("attached"), "{line}");
    signal(pid, libc::SIGKILL);
    let status = wait_for(&mut mp, Duration::from_secs(30)).expect("multiprobe ends");
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert_eq!(status.code(), Some(1), "{status:?}: {rest}");
    assert!(
        rest.contains(&format!("multiprobe: process {pid} was killed by SIGKILL")),
        "{rest}"
    );
    let _ = target.wait();
}
