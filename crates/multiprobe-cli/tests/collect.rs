//! The command's default path: `count`, `args`, `regs` and `mem` collect inside the
//! program without a stop where the site can be promoted (`src/collected.rs`), with
//! the counts and lines the one-stop path (`--stop`) gives; the summary says per site
//! which path it took and why a stop site was not promoted.

mod common;

use common::*;
use multiprobe_test_targets::bin;

/// `multiprobe run ARGS... -- mp-c-collect MODE...`: (stdout, stderr), exit 0.
fn collect_run(args: &[&str], mode: &[&str]) -> (String, String) {
    let prog = bin("mp-c-collect");
    let mut all: Vec<&str> = vec!["run"];
    all.extend_from_slice(args);
    all.push("--");
    all.push(prog.to_str().unwrap());
    all.extend_from_slice(mode);
    run_ok(&all)
}

/// The summary line of `symbol`'s `action` row, split into fields.
fn row<'a>(stderr: &'a str, symbol: &str, action: &str) -> Vec<&'a str> {
    stderr
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && f[1].ends_with(symbol) && f[2] == action)
        .unwrap_or_else(|| panic!("no {symbol} {action} row in {stderr}"))
}

/// The column `name` of the summary header, as an index into a row's fields.
fn col(stderr: &str, name: &str) -> usize {
    stderr
        .lines()
        .find(|l| l.trim_start().starts_with("SITE") || l.trim_start().starts_with("PID"))
        .and_then(|h| h.split_whitespace().position(|c| c == name))
        .unwrap_or_else(|| panic!("no {name} column in {stderr}"))
}

/// The value after `key=` in the program's line.
fn field(stdout: &str, key: &str) -> u64 {
    stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {key}= in {stdout:?}"))
}

/// The program's checksums recomputed from the `args:6` lines: (lines, sum, mix).
fn checksums(stderr: &str) -> (u64, u64, u64) {
    let (mut n, mut sum, mut mix) = (0u64, 0u64, 0u64);
    for l in stderr.lines() {
        let Some(args) = l
            .split_once(":mp_col_target(")
            .and_then(|(_, r)| r.strip_suffix(')'))
        else {
            continue;
        };
        n += 1;
        for (k, a) in args.split(", ").enumerate() {
            let v = u64::from_str_radix(a.trim_start_matches("0x"), 16).unwrap();
            sum = sum.wrapping_add(v);
            mix = mix.wrapping_add(v.wrapping_mul(k as u64 + 1) ^ (v >> 7));
        }
    }
    (n, sum, mix)
}

/// Counts and argument lines from 4 threads on a promoted site: exact, the arguments
/// the program passed (it checksums them), the site served in the tracee; `--stop`
/// gives the same on the one-stop path.
#[test]
fn count_and_args_collect_in_the_tracee_as_the_stop_path_would() {
    // The function by name, the same by name with --stop, and matched by a pattern
    // (whose matches once kept the stop path).
    for (target, stop) in [
        ("mp_col_target", false),
        ("mp_col_target", true),
        ("mp_col_targ*", false),
    ] {
        let with_args = format!("{target}=args:6");
        let mut args = vec!["--max-lines", "0", "-p", target, "-p", &with_args];
        if stop {
            args.push("--stop");
        }
        let (out, err) = collect_run(&args, &["threads", "4", "500"]);
        assert_eq!(field(&out, "calls"), 2000, "{out}");
        let path = col(&err, "PATH");
        for action in ["count", "args:6"] {
            let r = row(&err, ":mp_col_target", action);
            assert_eq!(r[3], "2000", "--stop {stop}: {err}");
            assert_eq!(r[path], if stop { "stop" } else { "tracee" }, "{err}");
        }
        let (n, sum, mix) = checksums(&err);
        assert_eq!(n, 2000, "one line per call");
        assert_eq!(
            (sum, mix),
            (field(&out, "sum"), field(&out, "mix")),
            "--stop {stop}: the lines carry the arguments passed"
        );
        // Lines of other threads than the main one name their thread.
        assert!(err.contains('/'), "{err}");
    }
}

/// 1 M records a second for a second (`mp-c-collect rate`): a default run (its rate
/// limit on lines) drains the ring in time and drops no record; with the limit off
/// (`--max-lines 0`), every call's line is printed, in order. A debug build of the
/// command drains ~10x slower, so there the program makes a tenth as many (`cargo test
/// --release` checks the full rate).
#[test]
fn a_million_records_a_second_are_drained_without_a_drop() {
    let per_ms: u64 = if cfg!(debug_assertions) { 100 } else { 1000 };
    let calls = 1000 * per_ms;
    let mode = ["rate", "1000", &per_ms.to_string()].map(String::from);
    let mode: Vec<&str> = mode.iter().map(String::as_str).collect();
    let (out, err) = collect_run(&["-p", "mp_col_target=args:1"], &mode);
    assert_eq!(field(&out, "calls"), calls, "{out}");
    let r = row(&err, ":mp_col_target", "args:1");
    assert_eq!(r[3], calls.to_string(), "{err}");
    assert!(
        !err.contains("DROPPED"),
        "no record dropped: {}",
        r.join(" ")
    );
    assert!(
        err.contains("hit lines dropped (limit"),
        "the lines were limited"
    );

    let (out, err) = collect_run(&["--max-lines", "0", "-p", "mp_col_target=args:1"], &mode);
    let r = row(&err, ":mp_col_target", "args:1");
    assert!(
        !err.contains("DROPPED"),
        "no record dropped: {}",
        r.join(" ")
    );
    let firsts: Vec<u64> = err
        .lines()
        .filter_map(|l| l.split_once("mp_col_target(0x")?.1.strip_suffix(')'))
        .map(|h| u64::from_str_radix(h, 16).unwrap())
        .collect();
    assert_eq!(firsts.len() as u64, calls, "a line per call");
    assert!(
        firsts.iter().enumerate().all(|(i, &v)| v == i as u64),
        "in call order"
    );
    assert_eq!(firsts.iter().sum::<u64>(), field(&out, "sum"));
}

/// A program that kills itself (SIGKILL) right after its calls: the summary has every
/// count and the lines every call, read from the area after the program was gone.
#[test]
fn a_program_killed_after_its_calls_is_reported_with_everything_it_collected() {
    let prog = bin("mp-c-collect");
    let out = run(&[
        "run",
        "--max-lines",
        "0",
        "-p",
        "mp_col_target",
        "-p",
        "mp_col_target=args:6",
        "--",
        prog.to_str().unwrap(),
        "killed",
        "4",
        "5000",
    ]);
    let (stdout, err) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(field(&stdout, "calls"), 20000, "{stdout}");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(9),
        "multiprobe ends as its program did"
    );
    let path = col(&err, "PATH");
    for action in ["count", "args:6"] {
        let r = row(&err, ":mp_col_target", action);
        assert_eq!((r[3], r[path]), ("20000", "tracee"), "{err}");
    }
    let (n, sum, mix) = checksums(&err);
    assert_eq!(n, 20000, "one line per call");
    assert_eq!((sum, mix), (field(&stdout, "sum"), field(&stdout, "mix")));
}

/// `mem:` on a NULL pointer: the program runs on as unprobed, the line says the read
/// faulted, the summary counts the faults; the good pointer's bytes are shown.
#[test]
fn mem_on_a_null_pointer_reports_the_fault_and_the_program_runs_on() {
    let (out, err) = collect_run(&["-p", "mp_col_mem=mem:0:16"], &["mem", "10"]);
    assert!(out.starts_with("calls=10 ok r="), "{out}");
    assert_eq!(field(&out, "r"), 5 * (u64::from(b'm') + 16) + 5 * 16);
    assert_eq!(err.matches("mp-col-mem-data!").count(), 5, "{err}");
    assert_eq!(
        err.matches("cannot read 16 bytes at 0x0").count(),
        5,
        "{err}"
    );
    let r = row(&err, ":mp_col_mem", "mem:0:16");
    assert_eq!(r[3], "10", "{err}");
    assert_eq!(r[col(&err, "FAULTED")], "5", "{err}");
    assert_eq!(r[col(&err, "PATH")], "tracee", "{err}");
}

/// A function whose region cannot take a jump (a loop's head in its first five bytes)
/// keeps a one-stop site that counts exactly, and the summary says why.
#[test]
fn a_site_that_cannot_be_promoted_counts_exactly_and_says_why() {
    let (out, err) = collect_run(&["-p", "mp_col_loop"], &["stoponly", "300"]);
    assert_eq!(field(&out, "calls"), 1200);
    let r = row(&err, ":mp_col_loop", "count");
    assert_eq!(r[3], "1200", "{err}");
    assert_eq!(r[col(&err, "PATH")], "stop", "{err}");
    let why = err
        .lines()
        .find(|l| l.starts_with("stop at ") && l.contains(":mp_col_loop: "))
        .unwrap_or_else(|| panic!("no reason in {err}"));
    assert!(why.contains("branch"), "{why}");
}

/// An action that needs the tracer (a condition here) keeps the whole site on the stop
/// path, with the collectors beside it counting the same; `--json` says the path and
/// why for each row.
#[test]
fn a_site_with_an_action_that_needs_the_tracer_takes_a_stop_and_json_says_why() {
    let (out, err) = collect_run(
        &[
            "--json",
            "-p",
            "mp_col_target=if:arg1>0,count",
            "-p",
            "mp_col_target",
            "-p",
            "mp_col_mem",
        ],
        &["fork", "5"],
    );
    assert!(out.contains("parent calls=10 child=0"), "{out}");
    let v = validator();
    for l in err.lines() {
        let j: serde_json::Value = serde_json::from_str(l).unwrap();
        assert!(v.is_valid(&j), "{l}");
    }
    let probes = json_probes(&err);
    let target: Vec<_> = probes
        .iter()
        .filter(|p| p["symbol"].as_str().unwrap().ends_with(":mp_col_target"))
        .collect();
    assert_eq!(target.len(), 2, "{err}");
    for p in &target {
        assert_eq!(p["path"], "stop", "{p}");
        assert!(
            p["why"]
                .as_str()
                .unwrap()
                .contains("condition of \"mp_col_target=if:arg1>0,count\""),
            "{p}"
        );
    }
    // The fork child is freed of probes (no -f): the parent's 10 calls, 5 of them with
    // arg1 > 0.
    let hits: Vec<u64> = target.iter().map(|p| p["hits"].as_u64().unwrap()).collect();
    assert!(hits.contains(&5) && hits.contains(&10), "{hits:?}");
    let mem = probes
        .iter()
        .find(|p| p["symbol"].as_str().unwrap().ends_with(":mp_col_mem"))
        .unwrap();
    assert_eq!(mem["hits"], 0);
}

/// `-f`: a fork child collects into its own area, counted in its own rows; the
/// parent's count is its own calls only.
#[test]
fn a_followed_fork_child_collects_into_its_own_rows() {
    let (out, err) = collect_run(&["-f", "-p", "mp_col_target"], &["fork", "50"]);
    assert!(out.contains("child calls=100"), "{out}");
    assert!(out.contains("parent calls=100 child=0"), "{out}");
    let path = col(&err, "PATH");
    let rows: Vec<Vec<&str>> = err
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() > 4 && f[2].ends_with(":mp_col_target"))
        .collect();
    assert_eq!(rows.len(), 2, "one row per process: {err}");
    for r in &rows {
        assert_eq!(r[4], "100", "{err}");
    }
    // Both sites are jumps (the child's placed anew in its own registry, and promoted
    // in the family's pauses: it once stayed on the stop path).
    assert_eq!(rows[0][path], "tracee", "{err}");
    assert_eq!(rows[1][path], "tracee", "{err}");
}

/// An `exec` ends the image's collecting: its counts are kept and the new program's
/// probe counts on.
#[test]
fn counts_survive_an_exec_and_the_new_image_collects_again() {
    let (out, err) = collect_run(
        &["-p", "mp_col_target", "-p", "mp_col_target=args:2"],
        &["exec", "40"],
    );
    assert!(out.contains("before exec calls=40"), "{out}");
    assert_eq!(field(out.lines().last().unwrap(), "calls"), 40, "{out}");
    assert_eq!(row(&err, ":mp_col_target", "count")[3], "80", "{err}");
    assert_eq!(row(&err, ":mp_col_target", "args:2")[3], "80", "{err}");
    assert_eq!(err.matches(":mp_col_target(").count(), 80, "{err}");
}

/// A function of a stripped library that has no symbol — libc's `strlen`
/// implementation, behind its IFUNC — is bounded by its unwind entry and promoted (it
/// took the stop path before: "the enclosing function is unknown"), and counts what
/// the stop path counts. The program makes a few calls of its own (stdio): the count
/// with none made by the loop is the baseline.
#[test]
fn a_stripped_libc_function_without_a_symbol_is_promoted_and_counts_exactly() {
    let hits = |args: &[&str], n: &str| {
        let mut all = args.to_vec();
        all.extend_from_slice(&["-p", "libc:strlen"]);
        let (out, err) = collect_run(&all, &["strlen", n]);
        assert_eq!(field(&out, "calls"), n.parse::<u64>().unwrap(), "{out}");
        let r = row(&err, "libc.so.6:strlen", "count");
        let path = r[col(&err, "PATH")].to_string();
        (r[3].parse::<u64>().unwrap(), path, err)
    };
    let (base, path, err) = hits(&[], "0");
    assert_eq!(path, "tracee", "{err}");
    let (n, path, err) = hits(&[], "20000");
    assert_eq!((n - base, path.as_str()), (20000, "tracee"), "{err}");
    let (n, path, err) = hits(&["--stop"], "2000");
    assert_eq!((n - base, path.as_str()), (2000, "stop"), "{err}");
}

/// An indirect function whose library keeps no GOT slot of its own for it (glibc's
/// `strstr`: nothing in libc calls it through one) is probed at the implementation
/// multiprobe's own loader chose for the same libc on this CPU, and counts every call
/// (before: "the library does not say which implementation it chose: probe it by
/// address", and the session did not start).
#[test]
fn an_indirect_function_without_a_slot_is_probed_where_the_program_calls_it() {
    let (out, err) = collect_run(&["-p", "libc:strstr"], &["strstr", "20000"]);
    assert_eq!(field(&out, "calls"), 20000, "{out}");
    assert_eq!(field(&out, "found"), 20000, "{out}");
    let r = row(&err, "libc.so.6:strstr", "count");
    assert_eq!(r[3], "20000", "{err}");
    assert_eq!(r[col(&err, "PATH")], "tracee", "{err}");
}

/// Where multiprobe's own choice of an indirect function's implementation cannot be
/// the program's (it runs with other `GLIBC_TUNABLES`), the probe is not placed: the
/// reason is said once, the row says `failed` (not "no such function": the function
/// exists), and the program runs on unprobed.
#[test]
fn an_indirect_function_under_other_tunables_is_not_guessed() {
    let prog = bin("mp-c-collect");
    let (out, err) = run_ok(&[
        "run",
        "-p",
        "libc:strstr",
        "--",
        "env",
        "GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=4096",
        prog.to_str().unwrap(),
        "strstr",
        "10",
    ]);
    assert_eq!(field(&out, "calls"), 10, "{out}");
    assert!(
        err.contains("probe \"libc:strstr\"") && err.contains("does not say which implementation"),
        "{err}"
    );
    let r = err
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() >= 6 && f[1] == "libc.so.6:strstr")
        .unwrap_or_else(|| panic!("no strstr row in {err}"));
    assert_eq!((r[3], *r.last().unwrap()), ("0", "failed"), "{err}");
}
