//! `--json` is pure JSON: every line of every kind of session — per-hit lines of each
//! action, notes (dropped lines, attach, detach, unloaded libraries), process records
//! of `-f`, the live table, the summary of a program that exited, was killed, or was
//! detached from, to stderr and to `-o FILE` — is one object valid against the schema
//! the README documents (`schema/output.schema.json`), and the summary is the last one.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

use common::*;
use multiprobe_test_targets::bin;

/// Every line of `output` is a record valid against the schema; the last is the
/// summary. Returns the records.
fn check(v: &jsonschema::Validator, what: &str, output: &str) -> Vec<serde_json::Value> {
    let mut records = Vec::new();
    for (i, line) in output.lines().enumerate() {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("{what}: line {} is not JSON ({e}): {line}", i + 1));
        let errors: Vec<String> = v.iter_errors(&value).map(|e| e.to_string()).collect();
        assert!(
            errors.is_empty(),
            "{what}: line {}: {errors:?}: {line}",
            i + 1
        );
        records.push(value);
    }
    assert!(!records.is_empty(), "{what}: no output");
    assert_eq!(
        records.last().unwrap()["type"],
        "summary",
        "{what}: the summary comes last: {output}"
    );
    assert_eq!(
        records.iter().filter(|r| r["type"] == "summary").count(),
        1,
        "{what}"
    );
    records
}

fn kinds(records: &[serde_json::Value]) -> Vec<String> {
    records
        .iter()
        .map(|r| r["type"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn every_line_of_every_session_matches_the_schema() {
    let v = validator();
    let single = bin("mp-single");
    let s = single.to_str().unwrap();

    // Every action that prints, aggregations, a filter, and the rate limit's note.
    let actions = |library: &str| {
        run(&run_line(
            &["--json", "--max-lines", "20"],
            &[
                "mp_add=args:2,regs,mem:1:8,str:0,ustack:4,count:arg0,count:tid",
                "mp_add=if:arg0>5,count",
                library,
            ],
            &[s, "--iters", "50"],
        ))
    };
    let out = actions("libnotloaded_xyz:f");
    // (A library that is neither loaded nor installed is bad input: nothing printed.)
    assert_eq!(out.status.code(), Some(2));
    let out = actions("libz:zlibVersion");
    assert!(out.status.success(), "{}", text(&out.stderr));
    let records = check(&v, "actions", &text(&out.stderr));
    let k = kinds(&records);
    assert!(
        k.contains(&"hit".into()) && k.contains(&"note".into()),
        "{k:?}"
    );
    let summary = records.last().unwrap();
    let pending = summary["probes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["symbol"] == "libz:zlibVersion")
        .unwrap();
    assert!(pending["site"].is_null() && pending["state"] == "pending");
    // ... and said so when the program started, once (as gdb says a breakpoint is
    // pending on a future library load).
    let said: Vec<_> = records
        .iter()
        .filter(|r| r["type"] == "note")
        .filter_map(|r| r["message"].as_str())
        .filter(|m| m.contains("libz:zlibVersion") && m.contains("pending until"))
        .collect();
    assert_eq!(said.len(), 1, "{records:?}");
    // One type per field: every site is a hex string (or null while pending).
    for r in &records {
        if r["type"] == "hit" {
            assert!(r["site"].as_str().unwrap().starts_with("0x"));
        }
    }

    // -f: process records; the live table.
    let tree = bin("mp-c-forktree");
    let (_, stderr) = run_ok(&run_line(
        &["--json", "-f", "--interval", "0.01"],
        &["mp_tree_work=args:1"],
        &[tree.to_str().unwrap(), "3", "2"],
    ));
    let records = check(&v, "fork", &stderr);
    assert!(kinds(&records).contains(&"process".into()));

    // dlclose and dlopen again: notes of unloaded code.
    let (_, stderr) = run_ok(&run_line(
        &["--json"],
        &["libz:zlibVersion=args:1"],
        &[
            bin("mp-dlopen").to_str().unwrap(),
            "--iters",
            "2",
            "--reloads",
            "2",
        ],
    ));
    let records = check(&v, "dlopen", &stderr);
    assert!(records
        .iter()
        .any(|r| r["type"] == "note" && r["message"].as_str().unwrap().contains("unloaded")));

    // A program killed by a signal: the summary says so (and multiprobe dies of it).
    let out = run(&run_line(
        &["--json"],
        &["libc:malloc"],
        &["/bin/sh", "-c", "kill -9 $$"],
    ));
    let records = check(&v, "killed", &text(&out.stderr));
    let outcome = &records.last().unwrap()["outcome"];
    assert_eq!(outcome["kind"], "killed");
    assert_eq!(outcome["name"], "SIGKILL");

    // To -o FILE, attached and detached: notes of the attach and of the detach.
    let d = std::env::temp_dir().join(format!("mp-json-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    let file = d.join("out.jsonl");
    let (mut target, pid, _out) = waiting_target("100000000");
    let _kill = KillOnDrop(pid);
    let mut mp = multiprobe()
        .args([
            "attach",
            &pid.to_string(),
            "--json",
            "-o",
            file.to_str().unwrap(),
        ])
        .args(["-p", "mp_add", "-p", "mp_add=args:1", "--max-lines", "3"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(wait_until(std::time::Duration::from_secs(10), || {
        std::fs::read_to_string(&file).is_ok_and(|t| t.contains("attached to process"))
    }));
    target.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    signal(mp.id() as i32, libc::SIGINT);
    let mut err = String::new();
    BufReader::new(mp.stderr.take().unwrap())
        .read_line(&mut err)
        .unwrap();
    assert!(mp.wait().unwrap().success(), "{err}");
    assert!(err.is_empty(), "nothing on stderr with -o: {err}");
    let records = check(&v, "attach -o", &std::fs::read_to_string(&file).unwrap());
    assert_eq!(records.last().unwrap()["outcome"]["kind"], "detached");
    assert!(records
        .iter()
        .any(|r| r["type"] == "note" && r["message"].as_str().unwrap().starts_with("detached:")));
    assert!(records.last().unwrap()["probes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["state"] == "detached"));
    let _ = target.kill();
    let _ = target.wait();
    std::fs::remove_dir_all(&d).unwrap();
}

/// The schema is not vacuous: what `--json` printed before it (an outcome that is a
/// string, a site that is a number, a summary without a type) is refused.
#[test]
fn the_schema_refuses_the_old_shapes() {
    let v = validator();
    let row = serde_json::json!({
        "pid": 1, "site": "0x10", "symbol": "p:f", "file": null, "action": "count",
        "filter": null, "hits": 1, "missed": 0, "filtered": 0, "state": "armed"
    });
    let good = serde_json::json!({
        "type": "summary", "pid": 1, "outcome": { "kind": "detached" }, "duration_ms": 1,
        "dropped_lines": 0, "processes": [], "probes": [row]
    });
    assert!(v.is_valid(&good));
    let mut bad = good.clone();
    bad["outcome"] = "detached".into();
    assert!(!v.is_valid(&bad), "an outcome string");
    let mut bad = good.clone();
    bad["probes"][0]["site"] = 16.into();
    assert!(!v.is_valid(&bad), "a numeric site");
    let mut bad = good.clone();
    bad.as_object_mut().unwrap().remove("type");
    assert!(!v.is_valid(&bad), "no type");
    let hit = serde_json::json!({
        "type": "hit", "time": 1.5, "pid": 1, "tid": 1, "site": 16, "symbol": "f", "action": "args:1",
        "args": ["0x1"]
    });
    assert!(!v.is_valid(&hit), "a hit's numeric site");
}
