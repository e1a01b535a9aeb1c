//! The `multiprobe` command, driven as a user drives it: on the workspace's test programs
//! (which report their own call counts) and on programs installed everywhere.

mod common;

use std::io::{BufRead, Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use multiprobe_test_targets::bin;

/// Far more than a detach takes: a multiprobe that has not ended by then never will.
const DETACH: Duration = Duration::from_secs(60);

#[test]
fn counts_match_what_the_program_reports_and_actions_share_one_site() {
    let single = bin("mp-single");
    let out = run(&run_line(
        &[],
        &["mp_add", "mp_add=args:2", "mp_load", "mp_riprel,"],
        &[single.to_str().unwrap(), "--iters", "777"],
    ));
    // A symbol that does not exist (`mp_riprel,`) fails the whole run before it starts.
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());

    let (stdout, stderr) = run_ok(&run_line(
        &["--max-lines", "0"],
        &["mp_add", "mp_add=args:2", "mp_load", "mp_riprel"],
        &[single.to_str().unwrap(), "--iters", "777"],
    ));
    let n = calls(&stdout, "mp_add");
    assert_eq!(n, 777);
    let add = rows(&stderr, ":mp_add");
    assert_eq!(add.len(), 2, "{stderr}");
    assert_eq!(add[0].3, add[1].3, "two actions, one site");
    for (_, hits, missed, _) in &add {
        assert_eq!((*hits, *missed), (n, 0));
    }
    assert_eq!(rows(&stderr, ":mp_load")[0].1, 777);
    assert_eq!(rows(&stderr, ":mp_riprel")[0].1, 777);
    // Every hit printed its arguments: mp_add(i, 3i).
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(":mp_add(")).collect();
    assert_eq!(lines.len(), 777);
    assert!(
        lines.iter().any(|l| l.ends_with(":mp_add(0x5, 0xf)")),
        "{:?}",
        &lines[..3]
    );
}

#[test]
fn threads_are_all_counted() {
    let (stdout, stderr) = run_ok(&run_line(
        &["--json"],
        &["mp_work"],
        &[
            bin("mp-threads").to_str().unwrap(),
            "--threads",
            "3",
            "--base",
            "150",
        ],
    ));
    let total: u64 = stdout
        .lines()
        .filter_map(|l| l.split("calls=").nth(1))
        .map(|r| r.split_whitespace().next().unwrap().parse::<u64>().unwrap())
        .sum();
    assert_eq!(total, 150 * (1 + 1 + 2 + 3));
    let summary: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    assert_eq!(
        summary["outcome"],
        serde_json::json!({ "kind": "exited", "code": 0 })
    );
    assert_eq!(summary["probes"][0]["hits"], total);
    assert_eq!(summary["probes"][0]["action"], "count");
}

#[test]
fn ls_runs_unchanged_with_malloc_and_free_probed() {
    let plain = Command::new("ls").arg("-la").arg("/usr").output().unwrap();
    let out = run(&run_line(
        &[],
        &["libc:malloc", "libc:free", "libc:malloc=args:1"],
        &["ls", "-la", "/usr"],
    ));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), plain.status.code());
    assert_eq!(
        out.stdout, plain.stdout,
        "the program's output passes through unchanged"
    );
    let malloc = rows(&stderr, ":malloc");
    assert_eq!(malloc.len(), 2, "{stderr}");
    assert!(malloc[0].1 > 10, "{stderr}");
    assert_eq!(malloc[0].1, malloc[1].1);
    assert!(rows(&stderr, ":free")[0].1 > 0);
    // One line per malloc from the args action.
    let lines = stderr.lines().filter(|l| l.contains(":malloc(0x")).count() as u64;
    assert_eq!(lines, malloc[0].1);

    // env, with a failing command: its exit status comes through.
    let out = run(&["run", "-p", "libc:getenv", "--", "/usr/bin/env", "false"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
}

#[test]
fn exit_codes_and_deaths_by_signal_are_the_programs() {
    let out = run(&run_line(
        &[],
        &["mp_add"],
        &[
            bin("mp-single").to_str().unwrap(),
            "--iters",
            "3",
            "--exit",
            "7",
        ],
    ));
    assert_eq!(out.status.code(), Some(7));
    use std::os::unix::process::ExitStatusExt;
    let out = run(&["run", "-p", "libc:kill", "--", "sh", "-c", "kill -SEGV $$"]);
    assert_eq!(out.status.signal(), Some(libc::SIGSEGV), "{:?}", out.status);
    // A program that handles its own fault in a probed instruction still does.
    let fault = bin("mp-fault");
    let plain = Command::new(&fault).output().unwrap();
    let out = run(&["run", "-p", "mp_fault_load", "--", fault.to_str().unwrap()]);
    assert_eq!(out.status.code(), plain.status.code());
    assert_eq!(
        text(&out.stdout).lines().next(),
        text(&plain.stdout).lines().next()
    );
}

#[test]
fn probes_follow_exec_and_dlopen() {
    let out = run(&run_line(
        &[],
        &["mp_add"],
        &[
            bin("mp-single").to_str().unwrap(),
            "--iters",
            "10",
            "--then-exec",
        ],
    ));
    assert!(out.status.success());
    assert_eq!(
        rows(&text(&out.stderr), ":mp_add")[0].1,
        20,
        "both images count"
    );

    let out = run(&run_line(
        &[],
        &["libz:zlibVersion"],
        &[bin("mp-dlopen").to_str().unwrap(), "--iters", "42"],
    ));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(calls(&text(&out.stdout), "zlibVersion"), 42);
    let r = rows(&stderr, ":zlibVersion");
    assert_eq!((r[0].1, r[0].0.as_str()), (42, "count"), "{stderr}");

    // Unloaded and loaded again (at the same address or not): the probes follow it out
    // and back in, nothing is written where the library was, and every call counts.
    let (stdout, stderr) = run_ok(&run_line(
        &[],
        &["libz:zlibVersion", "libz:zlibVersion=args:1"],
        &[
            bin("mp-dlopen").to_str().unwrap(),
            "--iters",
            "5",
            "--reloads",
            "3",
        ],
    ));
    assert!(
        stdout.contains("unloaded=yes"),
        "dlclose unmapped it: {stdout}"
    );
    assert_eq!(calls(&stdout, "zlibVersion"), 20);
    let r = rows(&stderr, ":zlibVersion");
    assert_eq!(r.len(), 2, "{stderr}");
    assert!(r.iter().all(|(_, hits, ..)| *hits == 20), "{stderr}");
    assert_eq!(stderr.matches("zlibVersion(0x").count(), 20, "{stderr}");
    assert_eq!(
        stderr.matches("its code was unloaded").count(),
        2,
        "said once per probe: {stderr}"
    );
    // Placed again in each life of the library, the site is promoted afresh each time
    // (the jump of the old life once outlived its code and left the site on the stop
    // path, "changed while it was promoted").
    let paths: Vec<&str> = stderr
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() >= 7 && f[1].ends_with(":zlibVersion"))
        .map(|f| f[5])
        .collect();
    assert_eq!(paths, ["tracee", "tracee"], "{stderr}");
}

/// C++ functions by their demangled names, in a C++ program every Debian system has
/// (`apt`, linked with libstdc++): with parameters, without, or ambiguous.
#[test]
fn cpp_functions_by_demangled_name() {
    let plain = Command::new("apt").arg("--version").output().unwrap();
    let out = run(&run_line(
        &["--json"],
        &[
            "libstdc++:operator new(unsigned long)",
            "libstdc++:operator new(unsigned long)=args:1",
            "std::__throw_bad_alloc",
        ],
        &["apt", "--version"],
    ));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(out.stdout, plain.stdout, "apt's output unchanged");
    assert!(
        stderr.contains(r#""action":"args:1","args":["0x"#),
        "per-hit lines: {stderr}"
    );
    let probes = json_probes(&stderr);
    let hits = |symbol_end: &str| -> Vec<u64> {
        probes
            .iter()
            .filter(|p| p["symbol"].as_str().unwrap().ends_with(symbol_end))
            .map(|p| p["hits"].as_u64().unwrap())
            .collect()
    };
    let news = hits(":operator new(unsigned long)");
    assert_eq!(news.len(), 2, "{stderr}");
    assert!(news[0] > 0 && news[0] == news[1], "{stderr}");
    assert_eq!(hits(":std::__throw_bad_alloc()"), [0], "{stderr}");

    // Every overload answers to the name without parameters: say which there are.
    let out = run(&run_line(
        &[],
        &["libstdc++:operator new"],
        &["apt", "--version"],
    ));
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("is ambiguous")
            && stderr.contains("operator new(unsigned long, std::nothrow_t const&)"),
        "{stderr}"
    );
}

/// libc's `strlen` and `memcpy` are GNU indirect functions: their symbols are resolvers
/// that run once, at load time. By name, the probe goes on the implementation the loader
/// chose (read from the library's GOT), so calls count; on the resolver they would not.
#[test]
fn indirect_functions_probe_the_chosen_implementation() {
    let (_, stderr) = run_ok(&run_line(
        &["--json"],
        &["libc:strlen", "memcpy", "libc:strle?"],
        &["ls", "/usr"],
    ));
    let probes = json_probes(&stderr);
    // `strle?` is a pattern that matches only the indirect `strlen`: the same site.
    assert_eq!(probes.len(), 3, "{stderr}");
    for p in &probes {
        assert!(p["hits"].as_u64().unwrap() > 0, "{p}");
    }
    let strlen: Vec<&serde_json::Value> = probes
        .iter()
        .filter(|p| p["symbol"].as_str().unwrap().ends_with(":strlen"))
        .collect();
    assert_eq!(strlen.len(), 2, "{stderr}");
    assert_eq!(strlen[0]["site"], strlen[1]["site"], "{stderr}");
    let out = run(&["run", "-p", "libc:strlen+0x4", "--", "true"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("GNU indirect function"),
        "{}",
        text(&out.stderr)
    );
}

/// A wildcard pattern probes every function that matches, each its own site with the
/// spec's actions — also in a library loaded later, and again after it is reloaded.
#[test]
fn patterns_probe_every_matching_function() {
    let out = run(&run_line(
        &["--json"],
        &["libz:zlib*", "libz:zlibVers?on=args:1"],
        &[
            bin("mp-dlopen").to_str().unwrap(),
            "--iters",
            "7",
            "--reloads",
            "1",
        ],
    ));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(calls(&text(&out.stdout), "zlibVersion"), 14);
    let probes = json_probes(&stderr);
    let symbols: Vec<&str> = probes
        .iter()
        .map(|p| p["symbol"].as_str().unwrap())
        .collect();
    assert!(
        symbols.iter().any(|s| s.ends_with(":zlibCompileFlags")),
        "every match is probed: {symbols:?}"
    );
    let version: Vec<(&str, u64)> = probes
        .iter()
        .filter(|p| p["symbol"].as_str().unwrap().ends_with(":zlibVersion"))
        .map(|p| (p["action"].as_str().unwrap(), p["hits"].as_u64().unwrap()))
        .collect();
    assert_eq!(version, [("count", 14), ("args:1", 14)], "{stderr}");
    assert_eq!(
        symbols
            .iter()
            .filter(|s| s.ends_with(":zlibVersion"))
            .count(),
        2,
        "one row per action, kept across the reload: {symbols:?}"
    );
}

#[test]
fn live_view_prints_while_the_program_runs() {
    let out = run(&run_line(
        &["--interval", "0.1"],
        &["libc:nanosleep", "libc:clock_nanosleep"],
        &["sh", "-c", "for i in 1 2 3 4 5 6; do sleep 0.1; done"],
    ));
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let tables = stderr.lines().filter(|l| l.starts_with("SITE")).count();
    assert!(tables >= 4, "live tables and the summary: {stderr}");
}

#[test]
fn attach_counts_then_detach_leaves_the_program_running_unchanged() {
    let (mut target, pid, mut out) = waiting_target("300");
    let (mut mp, mut err, line) = spawn_attach_probing(pid, &["mp_add", "mp_add=args:2"]);
    assert!(
        line.contains(&format!("attached to process {pid}")),
        "{line}"
    );
    // Let the program run its loop, and wait for its report.
    target.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut report = String::new();
    for _ in 0..3 {
        out.read_line(&mut report).unwrap();
    }
    assert_eq!(calls(&report, "mp_add"), 300);
    // Ctrl-C detaches; multiprobe prints the summary and exits 0.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(mp.id() as i32, libc::SIGINT) };
    let status = wait_for(&mut mp, DETACH).expect("multiprobe detaches on SIGINT");
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "{rest}");
    let add = rows(&rest, ":mp_add");
    assert_eq!(add.len(), 2, "{rest}");
    assert!(add.iter().all(|r| r.1 == 300), "{rest}");
    assert_eq!(rest.lines().filter(|l| l.contains(":mp_add(")).count(), 300);
    // The program is no longer traced or stopped, and its code is what an unprobed copy
    // of the same program has.
    assert_eq!(status_field(pid, "TracerPid:"), "0");
    assert!(!status_field(pid, "State:").starts_with('t'));
    let (mut fresh, fresh_pid, _o) = waiting_target("1");
    assert_eq!(
        function_bytes(pid, "mp_add"),
        function_bytes(fresh_pid, "mp_add")
    );
    fresh.kill().unwrap();
    fresh.wait().unwrap();
    // It finishes normally.
    drop(target.stdin.take());
    assert!(target.wait().unwrap().success());
}

/// Bad input: one line on stderr, exit status 2, and the program is left as it was: a
/// spawned one never ran its own code, an attached one runs on, untraced, unpatched.
#[test]
fn bad_input_is_a_one_line_error_and_leaves_nothing_behind() {
    let single = bin("mp-single");
    let single = single.to_str().unwrap();
    // Probe specs run on mp-single (`run -p SPEC -- mp-single`), then whole command lines.
    let specs = [
        ("libc:zzz_nothing*", "no function matches"),
        ("libz:zzz_nothing*", "matches \"zzz_nothing*\""),
        ("mp_adx", "did you mean mp_add"),
        ("libnotthere:f", "no library \"libnotthere\""),
        ("libc:no_such_function_xyz", "no function named"),
        ("mp_add=args:x", "bad probe spec"),
        ("mp_add+0x1", "instruction boundary"),
    ];
    let lines: [(&[&str], &str); 3] = [
        (&["run", "-p", "mp_add"], "<CMD>"),
        (
            &["run", "-p", "mp_add", "--", "/nonexistent/program"],
            "cannot run",
        ),
        (&["attach", "999999", "-p", "mp_add"], "no process 999999"),
    ];
    let cases = specs
        .into_iter()
        .map(|(spec, why)| (vec!["run", "-p", spec, "--", single], why))
        .chain(lines.into_iter().map(|(args, why)| (args.to_vec(), why)));
    for (args, why) in cases {
        let out = run(&args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("multiprobe: error: "), "{stderr}");
        assert!(stderr.contains(why), "{args:?}: {stderr}");
        assert!(
            out.stdout.is_empty(),
            "{args:?}: the program ran: {}",
            text(&out.stdout)
        );
    }

    // Attach: an unknown symbol, a process already traced, a process we may not trace.
    let (mut target, pid, _out) = waiting_target("5");
    let before = function_bytes(pid, "mp_add");
    let out = run(&["attach", &pid.to_string(), "-p", "mp_add", "-p", "nope_xyz"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("nope_xyz"));
    let (mut holder, _err, _attached) = spawn_attach_probing(pid, &["mp_add"]);
    let out = run(&["attach", &pid.to_string(), "-p", "mp_add"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("already traced"), "{stderr}");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(holder.id() as i32, libc::SIGINT) };
    let status = wait_for(&mut holder, DETACH).expect("multiprobe detaches on SIGINT");
    assert!(status.success());
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_multiprobe"))
        .args(["attach", &pid.to_string(), "-p", "mp_add"])
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("cannot attach") || stderr.contains("permission"),
        "{stderr}"
    );
    assert_eq!(status_field(pid, "TracerPid:"), "0");
    assert_eq!(function_bytes(pid, "mp_add"), before);
    let deadline = Instant::now() + Duration::from_secs(5);
    while status_field(pid, "State:").starts_with('t') && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !status_field(pid, "State:").starts_with('t'),
        "left stopped"
    );
    target.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    drop(target.stdin.take());
    assert!(target.wait().unwrap().success());
}

/// The Ctrl-C tests hold however their harness was started. A harness started in the
/// background of a script (`cargo test &`, a CI job) has SIGINT and SIGQUIT ignored; every
/// multiprobe it started inherited that and kept it (a signal ignored at start stays
/// ignored, as under `nohup`), so the tests' Ctrl-C was never heard: multiprobe served
/// on, and the two tests above waited for it for ever. They run again here in such a
/// harness, in its own process group (killed whole if it does not finish).
#[test]
fn the_ctrl_c_tests_hold_in_a_harness_that_ignores_sigint() {
    use std::os::unix::process::CommandExt;
    let log = std::env::temp_dir().join(format!("mp-sigign-{}.log", std::process::id()));
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "--exact",
        "--test-threads=2",
        "attach_counts_then_detach_leaves_the_program_running_unchanged",
        "bad_input_is_a_one_line_error_and_leaves_nothing_behind",
    ])
    .stdin(Stdio::null())
    .stdout(file.try_clone().unwrap())
    .stderr(file)
    .process_group(0);
    // SAFETY: between fork and exec the closure only calls `signal`, which is
    // async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::signal(libc::SIGINT, libc::SIG_IGN);
            libc::signal(libc::SIGQUIT, libc::SIG_IGN);
            Ok(())
        });
    }
    let mut harness = cmd.spawn().unwrap();
    let group = harness.id() as i32;
    let status = wait_for(&mut harness, Duration::from_secs(3 * 60));
    if status.is_none() {
        // SAFETY: killing the process group of our own child; no memory is involved.
        unsafe { libc::kill(-group, libc::SIGKILL) };
    }
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    let status = status.unwrap_or_else(|| panic!("the tests hung:\n{out}"));
    assert!(status.success(), "{out}");
    assert!(out.contains("test result: ok. 2 passed"), "{out}");
}

#[test]
fn pin_keeps_every_count_and_attach_gives_the_cpu_mask_back() {
    let out = run(&run_line(
        &["--pin"],
        &["mp_work"],
        &[
            bin("mp-threads").to_str().unwrap(),
            "--threads",
            "2",
            "--base",
            "100",
        ],
    ));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(rows(&text(&out.stderr), ":mp_work")[0].1, 100 * (1 + 1 + 2));

    let (mut target, pid, mut out) = waiting_target("50");
    let before = status_field(pid, "Cpus_allowed_list:");
    let (mut mp, mut err, line) =
        spawn_attach(&["attach", "--pin", &pid.to_string(), "-p", "mp_add"]);
    assert!(line.contains("attached"), "{line}");
    let pinned = status_field(pid, "Cpus_allowed_list:");
    assert!(
        !pinned.contains(['-', ',']),
        "one CPU while attached: {pinned}"
    );
    target.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut report = String::new();
    for _ in 0..3 {
        out.read_line(&mut report).unwrap();
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(mp.id() as i32, libc::SIGINT) };
    let status = wait_for(&mut mp, DETACH).expect("multiprobe detaches on SIGINT");
    assert!(status.success());
    let mut rest = String::new();
    err.read_to_string(&mut rest).unwrap();
    assert_eq!(rows(&rest, ":mp_add")[0].1, 50, "{rest}");
    assert_eq!(status_field(pid, "Cpus_allowed_list:"), before);
    drop(target.stdin.take());
    assert!(target.wait().unwrap().success());
}
