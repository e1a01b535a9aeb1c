//! The return actions on a C program with known return values and durations
//! (`mp-c-rets`): `ret`, `latency` (sleeps of 1, 10 and 100 ms in their buckets),
//! `args:N,ret` on one line, `uretprobe:`, exact counts, and a return action off a
//! function entry refused. Every `--json` line is checked against the schema.

mod common;

use common::*;
use multiprobe_test_targets::bin;

fn rets() -> String {
    bin("mp-c-rets").to_str().unwrap().to_string()
}

/// Every line of `stderr` as JSON, each valid against the schema.
fn records(stderr: &str) -> Vec<serde_json::Value> {
    let v = validator();
    stderr
        .lines()
        .map(|l| {
            let r: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            let errors: Vec<String> = v.iter_errors(&r).map(|e| e.to_string()).collect();
            assert!(errors.is_empty(), "{errors:?}: {l}");
            r
        })
        .collect()
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a count: {v}"))
}

/// The power-of-two bucket of `ns`, as `[low, high)`.
fn bucket_of(ns: u64) -> (u64, u64) {
    let k = 64 - ns.leading_zeros();
    (1 << (k - 1), 1 << k)
}

#[test]
fn latency_of_sleeps_of_1_10_100_ms_lands_in_their_buckets() {
    let p = rets();
    let (stdout, stderr) = run_ok(&run_line(
        &["--json"],
        &["mp_ret_nap=latency", "mp_ret_nap=ret"],
        &[&p, "nap", "1", "10", "100"],
    ));
    assert_eq!(stdout, "nap 1=3\nnap 10=30\nnap 100=300\n");
    let recs = records(&stderr);
    // The `ret` lines: each call's return value and its own time.
    let rets: Vec<&serde_json::Value> = recs.iter().filter(|r| r["type"] == "hit").collect();
    assert_eq!(rets.len(), 3);
    let mut times = Vec::new();
    for (r, ms) in rets.iter().zip([1u64, 10, 100]) {
        assert_eq!(r["action"], "ret");
        assert_eq!(r["ret"], format!("{:#x}", 3 * ms));
        let ns = n(&r["latency_ns"]);
        // A sleep takes at least its time; no more than that and a second here.
        assert!(
            ns >= ms * 1_000_000 && ns < ms * 1_000_000 + 1_000_000_000,
            "{ms} ms: {ns} ns"
        );
        times.push(ns);
    }
    let probes = json_probes(&stderr);
    let lat = probes.iter().find(|p| p["action"] == "latency").unwrap();
    assert_eq!(
        (n(&lat["hits"]), n(&lat["returns"]), n(&lat["returns_lost"])),
        (3, 3, 0)
    );
    let h = &lat["latency"];
    assert_eq!((h["unit"].as_str(), n(&h["count"])), (Some("ns"), 3));
    assert!(
        n(&h["min"]) >= 1_000_000 && n(&h["max"]) >= 100_000_000,
        "{h}"
    );
    assert!(n(&h["min"]) <= n(&h["avg"]) && n(&h["avg"]) <= n(&h["max"]));
    // Buckets: consecutive powers of two from the lowest that counted to the highest,
    // one call in the bucket of each call's time (as its `ret` line measured it).
    let buckets: Vec<(u64, u64, u64)> = h["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| (n(&b["low"]), n(&b["high"]), n(&b["count"])))
        .collect();
    for w in buckets.windows(2) {
        assert_eq!(w[0].1, w[1].0, "consecutive: {buckets:?}");
    }
    assert_eq!(buckets.iter().map(|b| b.2).sum::<u64>(), 3);
    for ns in &times {
        let (low, high) = bucket_of(*ns);
        assert!(
            buckets
                .iter()
                .any(|&(l, hi, c)| (l, hi) == (low, high) && c >= 1),
            "{ns} ns: bucket [{low}, {high}) in {buckets:?}"
        );
    }
    // On a machine that is not overloaded: [1M, 2M) or [512K, 1M) (a sleep within
    // 48 us of 1 ms), [8M, 16M), [64M, 128M). Each is at least the sleep's own bucket.
    for (ns, ms) in times.iter().zip([1u64, 10, 100]) {
        assert!(bucket_of(*ns).0 >= bucket_of(ms * 1_000_000).0);
    }
    let nonzero: Vec<(u64, u64)> = buckets
        .iter()
        .filter(|b| b.2 > 0)
        .map(|b| (b.0, b.1))
        .collect();
    assert_eq!(
        nonzero.len(),
        3,
        "three calls of distinct durations: {buckets:?}"
    );

    // The text summary: the histogram bpftrace-style.
    let out = run(&run_line(
        &[],
        &["mp_ret_nap=latency"],
        &[&p, "nap", "1", "10", "100"],
    ));
    assert!(out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("mp-c-rets:mp_ret_nap latency: 3 returned, 0 lost"),
        "{err}"
    );
    assert!(
        err.contains("  min ") && err.contains("(ns buckets)"),
        "{err}"
    );
    assert!(
        err.contains("[64M, 128M)") || err.contains("[128M, 256M)"),
        "{err}"
    );
    assert_eq!(err.matches('|').count() % 2, 0);
}

#[test]
fn args_and_ret_make_one_call_line_with_exact_counts() {
    let p = rets();
    let (stdout, err) = run_ok(&["run", "-p", "mp_ret_add=args:2,ret", "--", &p, "add", "5"]);
    assert_eq!(stdout, "sum=30 calls=5\n");
    let calls: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("mp_ret_add("))
        .map(|l| l.split_once("] ").unwrap().1.split(" <").next().unwrap())
        .collect();
    let want: Vec<String> = (0..5u64)
        .map(|i| {
            format!(
                "mp-c-rets:mp_ret_add({:#x}, {:#x}) = {:#x}",
                i,
                2 * i,
                3 * i
            )
        })
        .collect();
    assert_eq!(calls, want, "{err}");
    let rows = rows(&err, "mp_ret_add");
    assert_eq!(rows.len(), 1, "one handler: {err}");
    assert_eq!((rows[0].1, rows[0].2), (5, 0), "hits and missed");
    assert!(
        err.contains("mp-c-rets:mp_ret_add args:2,ret: 5 returned, 0 lost"),
        "{err}"
    );
}

#[test]
fn uretprobe_prints_return_values_innermost_first() {
    let p = rets();
    let (_, stderr) = run_ok(&run_line(
        &["--json"],
        &["uretprobe:mp_ret_depth"],
        &[&p, "depth", "100"],
    ));
    let recs = records(&stderr);
    let vals: Vec<String> = recs
        .iter()
        .filter(|r| r["type"] == "hit")
        .map(|r| r["ret"].as_str().unwrap().to_string())
        .collect();
    let want: Vec<String> = (0..=100u64).map(|k| format!("{k:#x}")).collect();
    assert_eq!(vals, want);
    let probes = json_probes(&stderr);
    assert_eq!(probes[0]["action"], "ret");
    assert_eq!(
        (n(&probes[0]["hits"]), n(&probes[0]["returns"])),
        (101, 101)
    );
}

#[test]
fn a_return_action_off_a_function_entry_is_one_clear_error() {
    let p = rets();
    // mp_ret_add starts with a one-byte `push rbp`: +1 is an instruction, not the entry.
    let out = run(&["run", "-p", "mp_ret_add+1=ret", "--", &p, "add", "2"]);
    assert_eq!(out.status.code(), Some(2));
    let err = text(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("not a function's first instruction") && err.contains("mp_ret_add+0x1"),
        "{err}"
    );
    assert!(
        text(&out.stdout).is_empty(),
        "the program never ran its own code"
    );
}

/// The call lines of `mp_ret_add` in `err`, without the pid and the latency.
fn add_calls(err: &str) -> Vec<String> {
    err.lines()
        .filter(|l| l.contains("mp_ret_add("))
        .map(|l| {
            let call = l.split_once("] ").map_or(l, |(_, c)| c);
            call.split(" <").next().unwrap().to_string()
        })
        .collect()
}

#[test]
fn return_actions_run_in_the_tracee_with_the_lines_of_the_one_stop_path() {
    let p = rets();
    let args = ["add", "20000"];
    let probes = ["mp_ret_add=args:2,ret", "mp_ret_add=latency"];
    let mut prog = vec![p.as_str()];
    prog.extend(args);
    let (out_tracee, err_tracee) = run_ok(&run_line(&["--max-lines", "0"], &probes, &prog));
    let (out_stop, err_stop) = run_ok(&run_line(&["--max-lines", "0", "--stop"], &probes, &prog));
    assert_eq!(out_tracee, out_stop);
    let calls = add_calls(&err_tracee);
    assert_eq!(calls.len(), 20000, "{err_tracee}");
    let stop = add_calls(&err_stop);
    let first_difference = calls.iter().zip(&stop).position(|(a, b)| a != b);
    assert_eq!(
        (first_difference, stop.len()),
        (None, calls.len()),
        "the same lines, in the same order"
    );
    assert_eq!(calls[7], "mp-c-rets:mp_ret_add(0x7, 0xe) = 0x15");
    let path = |err: &str| -> Vec<String> {
        err.lines()
            .filter(|l| l.contains("mp_ret_add ") && l.contains(" armed"))
            .map(|l| l.split_whitespace().nth(5).unwrap().to_string())
            .collect()
    };
    assert_eq!(path(&err_tracee), ["tracee", "tracee"], "{err_tracee}");
    assert_eq!(path(&err_stop), ["stop", "stop"], "{err_stop}");
    for err in [&err_tracee, &err_stop] {
        assert!(
            err.contains("mp-c-rets:mp_ret_add args:2,ret: 20000 returned, 0 lost")
                && err.contains("mp-c-rets:mp_ret_add latency: 20000 returned, 0 lost"),
            "{err}"
        );
    }
}

#[test]
fn latency_of_a_busy_function_times_every_call() {
    let p = rets();
    // 300,000 calls in a few milliseconds: far more than the ring of records holds
    // between two drains, but the histogram is counted in the tracee.
    let (stdout, stderr) = run_ok(&run_line(
        &["--json"],
        &["mp_ret_add=latency"],
        &[&p, "add", "300000"],
    ));
    assert!(stdout.starts_with("sum="), "{stdout}");
    let recs = records(&stderr);
    let summary = recs.iter().find(|r| r["type"] == "summary").unwrap();
    let probe = &summary["probes"][0];
    assert_eq!(probe["action"], "latency");
    assert_eq!(probe["path"], "tracee", "{probe}");
    assert_eq!(
        (n(&probe["hits"]), n(&probe["returns"])),
        (300_000, 300_000)
    );
    let hist = &probe["latency"];
    assert_eq!(n(&hist["count"]), 300_000);
    let counted: u64 = hist["buckets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| n(&b["count"]))
        .sum();
    assert_eq!(counted, 300_000, "every call in a bucket");
}

/// What `program args` prints unprobed.
fn unprobed_stdout(program: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_cpp_exception_through_return_probed_functions_of_the_program_is_caught() {
    // The program's own functions are probed at its exec, before its libraries (the
    // unwinder's among them) are loaded: the unwinder is hooked when they are, before
    // the program runs.
    let p = bin("mp-cpp-throwret").to_str().unwrap().to_string();
    let want = unprobed_stdout(&p, &["10"]);
    let (stdout, stderr) = run_ok(&run_line(
        &[],
        &["mp_cpp_through=latency", "mp_cpp_thrower=latency"],
        &[&p, "10"],
    ));
    assert_eq!(stdout, want, "{stderr}");
    assert!(stderr.contains("latency    10"), "{stderr}");
}

#[test]
fn backtrace_through_return_probed_functions_of_the_program_sees_every_frame() {
    let p = rets();
    let want = unprobed_stdout(&p, &["bt"]);
    let (stdout, stderr) = run_ok(&run_line(
        &[],
        &["mp_ret_bt_outer=args:0,ret", "mp_ret_bt=args:0,ret"],
        &[&p, "bt"],
    ));
    assert_eq!(stdout, want, "{stderr}");
}

#[test]
fn coroutines_that_switch_stacks_inside_return_probed_calls_run_as_unprobed() {
    // Every return of mp_ret_co_resume comes while a call of mp_ret_co_yield is in
    // flight on the other coroutine's stack (c/coro.h). Before, the program died of
    // SIGILL at the first such return.
    let p = rets();
    for above in ["0", "1"] {
        let want = unprobed_stdout(&p, &["coro", "300", above]);
        let (stdout, stderr) = run_ok(&run_line(
            &["--max-lines", "0"],
            &["mp_ret_co_resume=latency", "mp_ret_co_yield=ret"],
            &[&p, "coro", "300", above],
        ));
        assert_eq!(stdout, want, "{stderr}");
        for summary in [
            "mp_ret_co_yield ret: 300 returned, 0 lost",
            "mp_ret_co_resume latency: 301 returned, 0 lost",
        ] {
            assert!(stderr.contains(summary), "{summary}: {stderr}");
        }
        assert_eq!(
            stderr.matches("mp_ret_co_yield = ").count(),
            300,
            "{stderr}"
        );
    }
}
