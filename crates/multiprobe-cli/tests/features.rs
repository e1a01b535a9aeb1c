//! What bpftrace, perf probe, ltrace and gdb users reach for, on real programs: every
//! call counted from the loader's start (compared with gdb's pending breakpoints and
//! bpftrace where they are installed), fork children followed per process, specs
//! resolved in each program an exec brings, libraries outside the search path, the
//! actions (ustack, count by key, str, filters), USDT probes with their semaphores,
//! `list`, file offsets in stripped binaries, and the usability items.
//!
//! Programs compiled here (a stack, a stripped and a static binary, a USDT program)
//! need a C compiler (the workspace's build needs one too); the USDT one needs
//! `<sys/sdt.h>` (Debian's systemtap-sdt-dev, which `.ci/run` installs). A test whose
//! tool is missing says SKIPPED and why.

mod common;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use multiprobe_test_targets::bin;

/// bpftrace's uprobes are the kernel's: while one is registered, every process that maps
/// the probed file has an int3 at the function, which multiprobe rightly refuses to share
/// ("already holds a breakpoint that is not ours"). So a test that runs bpftrace runs
/// alone, and every other test of this binary takes this lock shared.
static KERNEL_UPROBES: std::sync::RwLock<()> = std::sync::RwLock::new(());

/// Held by a test that does not place kernel uprobes.
fn beside_others() -> std::sync::RwLockReadGuard<'static, ()> {
    KERNEL_UPROBES.read().unwrap_or_else(|e| e.into_inner())
}

/// Held for the whole of a test that may place kernel uprobes (runs bpftrace).
fn alone() -> std::sync::RwLockWriteGuard<'static, ()> {
    KERNEL_UPROBES.write().unwrap_or_else(|e| e.into_inner())
}

/// Compile `source` with `cc` and `flags` into `dir/name`; `None` (said) without a
/// compiler.
fn compile(dir: &Path, name: &str, source: &str, flags: &[&str]) -> Option<PathBuf> {
    let src = dir.join(format!("{name}.c"));
    std::fs::write(&src, source).unwrap();
    let out = dir.join(name);
    let r = Command::new("cc")
        .args(flags)
        .arg("-o")
        .arg(&out)
        .arg(&src)
        .output();
    match r {
        Ok(o) if o.status.success() => Some(out),
        Ok(o) => {
            eprintln!("SKIPPED: cc {flags:?} failed: {}", text(&o.stderr));
            None
        }
        Err(e) => {
            eprintln!("SKIPPED: no C compiler (cc: {e})");
            None
        }
    }
}

fn have(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Hits of every `count` row of the text summary, by symbol.
fn counts(stderr: &str) -> HashMap<String, u64> {
    let mut m = HashMap::new();
    for l in stderr.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 6 && f[0].starts_with("0x") && f[2] == "count" {
            m.insert(f[1].to_string(), f[3].parse().unwrap());
        }
    }
    m
}

/// gdb's hit counts of pending breakpoints on `functions`, set before `run`: what gdb
/// users get. `None` (said) without gdb.
fn gdb_counts(functions: &[&str], cmd: &[&str]) -> Option<Vec<u64>> {
    if !have("gdb") {
        eprintln!("SKIPPED: the comparison with gdb: gdb is not installed");
        return None;
    }
    let mut script =
        String::from("set pagination off\nset confirm off\nset breakpoint pending on\n");
    for f in functions {
        script.push_str(&format!("break {f}\ncommands\nsilent\ncontinue\nend\n"));
    }
    script.push_str("run\ninfo breakpoints\nquit\n");
    let d = scratch("gdb");
    let path = d.join("script.gdb");
    std::fs::write(&path, script).unwrap();
    let out = Command::new("gdb")
        .args([
            "-q",
            "-batch",
            "-nx",
            "-x",
            path.to_str().unwrap(),
            "--args",
        ])
        .args(cmd)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = text(&out.stdout);
    let hits: Vec<u64> = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("breakpoint already hit "))
        .map(|r| r.split_whitespace().next().unwrap().parse().unwrap())
        .collect();
    assert_eq!(hits.len(), functions.len(), "gdb said: {text}");
    Some(hits)
}

/// bpftrace's counts of uprobes on `functions` of libc for `cmd` (a path), where
/// bpftrace is installed and can load programs here; `None` (said) otherwise.
fn bpftrace_counts(functions: &[&str], cmd: &str) -> Option<Vec<u64>> {
    if !have("bpftrace") {
        eprintln!("SKIPPED: the comparison with bpftrace: it is not installed");
        return None;
    }
    let libc = "/lib/x86_64-linux-gnu/libc.so.6";
    let mut prog = String::new();
    for (i, f) in functions.iter().enumerate() {
        prog.push_str(&format!(
            "uprobe:{libc}:{f} /pid == cpid/ {{ @c{i} = count(); }} "
        ));
    }
    let out = Command::new("bpftrace")
        .args(["-e", &prog, "-c", cmd])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = text(&out.stdout);
    if !out.status.success() {
        eprintln!(
            "SKIPPED: bpftrace cannot run here: {}",
            super_text(&out.stderr)
        );
        return None;
    }
    let mut got = Vec::new();
    for i in 0..functions.len() {
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("@c{i}: ")))
            .map_or(0, |v| v.trim().parse().unwrap());
        got.push(v);
    }
    Some(got)
}

fn super_text(b: &[u8]) -> String {
    text(b).lines().take(3).collect::<Vec<_>>().join(" / ")
}

/// Calls made before the entry point (the loader's and the libraries' constructors)
/// are counted: `ls /usr` and a C++ program (apt, whose libstdc++ allocates in its
/// constructor) count exactly what gdb's pending breakpoints and bpftrace count.
#[test]
fn calls_before_the_entry_point_are_counted_as_gdb_and_bpftrace_count_them() {
    let _kernel_uprobes = alone();
    let (_, stderr) = run_ok(&run_line(
        &[],
        &["libc:malloc", "libc:free"],
        &["/usr/bin/ls", "/usr"],
    ));
    let ours = counts(&stderr);
    let (malloc, free) = (ours["libc.so.6:malloc"], ours["libc.so.6:free"]);
    // The libraries' constructors allocate before main: an entry-point placement
    // misses them (the README's figure before was 221/111).
    assert!(malloc > 0 && free > 0, "{stderr}");
    if let Some(g) = gdb_counts(&["__libc_malloc", "__libc_free"], &["/usr/bin/ls", "/usr"]) {
        assert_eq!((malloc, free), (g[0], g[1]), "gdb counts {g:?}: {stderr}");
    }
    if let Some(b) = bpftrace_counts(&["malloc", "free"], "/usr/bin/ls /usr") {
        assert_eq!(
            (malloc, free),
            (b[0], b[1]),
            "bpftrace counts {b:?}: {stderr}"
        );
    }

    // A C++ program: libstdc++'s emergency pool is allocated by its constructor.
    let (_, stderr) = run_ok(&run_line(
        &[],
        &["libc:malloc"],
        &["/usr/bin/apt", "--version"],
    ));
    let malloc = counts(&stderr)["libc.so.6:malloc"];
    if let Some(g) = gdb_counts(&["__libc_malloc"], &["/usr/bin/apt", "--version"]) {
        assert_eq!(malloc, g[0], "gdb: {g:?}: {stderr}");
    }
}

/// The pid of every `pid=... calls=N` line of mp-c-forktree, with its calls.
fn tree_report(stdout: &str) -> HashMap<i32, u64> {
    stdout
        .lines()
        .filter_map(|l| {
            let pid = l
                .strip_prefix("pid=")?
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let calls = l.split("calls=").nth(1)?.trim().parse().ok()?;
            Some((pid, calls))
        })
        .collect()
}

/// `-f`: every descendant is probed and counted on its own row, exactly; without it,
/// children are freed of probes as before.
#[test]
fn fork_children_are_followed_with_exact_counts_per_process() {
    let _kernel_uprobes = beside_others();
    let tree = bin("mp-c-forktree");
    let (stdout, stderr) = run_ok(&run_line(
        &["-f", "--json"],
        &["mp_tree_work"],
        &[tree.to_str().unwrap(), "25", "3"],
    ));
    let report = tree_report(&stdout);
    assert_eq!(
        report.len(),
        7,
        "root, 3 children, 3 grandchildren: {stdout}"
    );
    let summary: serde_json::Value = serde_json::from_str(stderr.lines().last().unwrap()).unwrap();
    let mut rows: HashMap<i32, u64> = HashMap::new();
    for p in summary["probes"].as_array().unwrap() {
        rows.insert(
            p["pid"].as_i64().unwrap() as i32,
            p["hits"].as_u64().unwrap(),
        );
    }
    assert_eq!(rows, report, "{stderr}");
    let procs = summary["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 7);
    assert!(
        procs.iter().skip(1).all(|p| p["parent"].is_i64()),
        "{summary}"
    );
    assert_eq!(
        stderr
            .lines()
            .filter(|l| l.contains(r#""event":"fork""#))
            .count(),
        6,
        "{stderr}"
    );

    // Without -f only the first process counts; its children run unprobed.
    let (_, stderr) = run_ok(&run_line(
        &[],
        &["mp_tree_work"],
        &[tree.to_str().unwrap(), "25", "3"],
    ));
    assert_eq!(rows_of(&stderr, ":mp_tree_work"), vec![25], "{stderr}");

    // Fork then exec in the child, and a vfork-style spawn (Rust's Command) that execs:
    // each counted in its own process, through its exec.
    let forker = bin("mp-forker");
    let (stdout, stderr) = run_ok(&["run", "-f", "-p", "mp_add", "--", forker.to_str().unwrap()]);
    assert!(stdout.contains("exec-child calls=7") && stdout.contains("spawned calls=3"));
    let mut hits: Vec<u64> = stderr
        .lines()
        .filter(|l| l.contains(":mp_add") && !l.starts_with("stop at "))
        .map(|l| l.split_whitespace().nth(4).unwrap().parse().unwrap())
        .collect();
    hits.sort_unstable();
    assert_eq!(hits, vec![3, 5 + 7, 20], "{stderr}");
    // The column is right-aligned to the widest pid, so its indent varies with the pids.
    assert!(
        stderr
            .lines()
            .any(|l| l.trim_start().starts_with("PID  SITE")),
        "a PID column: {stderr}"
    );
}

/// The hits of the rows whose symbol ends with `suffix` (text summary).
fn rows_of(stderr: &str, suffix: &str) -> Vec<u64> {
    rows(stderr, suffix).into_iter().map(|r| r.1).collect()
}

/// A bare symbol the first program lacks but a program the command line names has is
/// pending until the exec brings it, and each row says which program it resolved in.
#[test]
fn specs_resolve_in_the_program_an_exec_brings() {
    let _kernel_uprobes = beside_others();
    let single = bin("mp-single");
    let script = format!("exec {} --iters 9", single.display());
    let (_, stderr) = run_ok(&run_line(
        &["--json"],
        &["mp_add"],
        &["/bin/sh", "-c", &script],
    ));
    assert!(
        stderr.contains("pending until"),
        "said why it waits: {stderr}"
    );
    let probes = json_probes(&stderr);
    assert_eq!(probes[0]["hits"], 9, "{stderr}");
    assert_eq!(probes[0]["symbol"], "mp-single:mp_add");
    assert_eq!(probes[0]["file"], single.to_str().unwrap());

    // A typo is still an error at once (nothing named has it).
    let out = run(&["run", "-p", "mp_addd", "--", "/bin/sh", "-c", &script]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty());

    // Python under a shell: the interpreter's own function.
    let python = Path::new("/usr/bin/python3.11");
    if !python.exists() {
        eprintln!("SKIPPED: the python part: /usr/bin/python3.11 is not installed");
        return;
    }
    let (_, stderr) = run_ok(&run_line(
        &[],
        &["PyList_Append"],
        &[
            "/bin/sh",
            "-c",
            "exec /usr/bin/python3.11 -c 'l=[]\nfor i in range(1000): l.append(i)'",
        ],
    ));
    let hits = rows_of(&stderr, "python3.11:PyList_Append");
    assert!(hits.len() == 1 && hits[0] >= 1000, "{stderr}");
}

/// A library loaded from outside the loader's search path (a Python extension module)
/// can be named, pending until the program loads it; a misspelt one is still an error.
#[test]
fn libraries_outside_the_search_path_can_be_named() {
    let _kernel_uprobes = beside_others();
    let python = "/usr/bin/python3.11";
    let module = "/usr/lib/python3.11/lib-dynload/_bz2.cpython-311-x86_64-linux-gnu.so";
    if !Path::new(python).exists() || !Path::new(module).exists() {
        eprintln!("SKIPPED: needs Debian's python3.11 with its _bz2 extension module");
        return;
    }
    let (_, stderr) = run_ok(&run_line(
        &[],
        &["_bz2:PyInit__bz2"],
        &[python, "-c", "import bz2"],
    ));
    assert_eq!(rows_of(&stderr, ":PyInit__bz2"), vec![1], "{stderr}");
    let out = run(&run_line(
        &[],
        &["_bz3:PyInit__bz2"],
        &[python, "-c", "import bz2"],
    ));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("no library \"_bz3\""));
}

const STACK_C: &str = r#"
#include <stdio.h>
#include <stdlib.h>
__attribute__((noinline)) int leaf(int x) { __asm__ volatile(""); return x * 3; }
__attribute__((noinline)) int c3(int x) { int r = leaf(x) + 1; __asm__ volatile(""); return r; }
__attribute__((noinline)) int b2(int x) { int r = c3(x) + 2; __asm__ volatile(""); return r; }
__attribute__((noinline)) int a1(int x) { int r = b2(x) + 3; __asm__ volatile(""); return r; }
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 10, s = 0;
    for (int i = 0; i < n; i++) s += a1(i) + (i % 2 ? leaf(i) : 0);
    printf("leaf calls=%d sum=%d\n", n + n / 2, s);
    return 0;
}
"#;

/// `ustack` unwinds by the unwind tables where there are some and by frame pointers
/// where there are none, symbolised, and counts hits per stack.
#[test]
fn ustack_with_and_without_frame_pointers() {
    let _kernel_uprobes = beside_others();
    let d = scratch("ustack");
    let cfi = ["-O2", "-fomit-frame-pointer"];
    let fp = [
        "-O2",
        "-fno-omit-frame-pointer",
        "-fno-asynchronous-unwind-tables",
        "-fno-unwind-tables",
    ];
    for (name, flags) in [("stack-cfi", &cfi[..]), ("stack-fp", &fp[..])] {
        let Some(prog) = compile(&d, name, STACK_C, flags) else {
            return;
        };
        let out = run(&run_line(
            &["--json"],
            &["leaf=ustack", "leaf=count:ustack"],
            &[prog.to_str().unwrap(), "10"],
        ));
        let stderr = text(&out.stderr);
        assert!(out.status.success(), "{name}: {stderr}");
        let probes = json_probes(&stderr);
        for p in &probes {
            assert_eq!(p["hits"], 15, "{name}: {p}");
            let top = p["stacks"]["top"].as_array().unwrap();
            assert_eq!(p["stacks"]["distinct"], 2, "{name}: {p}");
            let frames = |i: usize| -> Vec<String> {
                top[i]["key"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|f| f["symbol"].as_str().unwrap_or("?").to_string())
                    .collect()
            };
            let deep = frames(0);
            assert_eq!(top[0]["count"], 10, "{name}: {p}");
            let want = [":leaf", ":c3+", ":b2+", ":a1+", ":main+"];
            for (f, w) in deep.iter().zip(want) {
                assert!(f.starts_with(name) && f.contains(w), "{name}: {deep:?}");
            }
            let direct = frames(1);
            assert_eq!(top[1]["count"], 5);
            assert!(
                direct[1].contains(":main+"),
                "{name}: leaf called from main: {direct:?}"
            );
        }
        let hits: Vec<serde_json::Value> = stderr
            .lines()
            .filter(|l| l.contains(r#""type":"hit""#))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(hits.len(), 15, "one line per hit");
        assert!(hits
            .iter()
            .all(|h| h["ustack"].as_array().unwrap().len() >= 3));
    }
}

/// `count:KEY`, `str:ARG` and filters, on mp-single (mp_add(i, 3i)) and real programs.
#[test]
fn aggregations_strings_and_filters() {
    let _kernel_uprobes = beside_others();
    let single = bin("mp-single");
    let (_, stderr) = run_ok(&run_line(
        &["--json"],
        &[
            "mp_add=if:arg0>=500,count",
            "mp_add=if:arg0<3,count:arg1",
            "mp_add=count:tid",
        ],
        &[single.to_str().unwrap(), "--iters", "777"],
    ));
    let p = json_probes(&stderr);
    let by = |action: &str, filter: Option<&str>| -> &serde_json::Value {
        p.iter()
            .find(|r| r["action"] == action && r["filter"].as_str() == filter)
            .unwrap_or_else(|| panic!("{action}: {stderr}"))
    };
    let big = by("count", Some("arg0>=500"));
    assert_eq!(
        (big["hits"].as_u64(), big["filtered"].as_u64()),
        (Some(277), Some(500))
    );
    let small = by("count:arg1", Some("arg0<3"));
    assert_eq!(small["hits"], 3);
    let keys: Vec<(&str, u64)> = small["keys"]["top"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["key"].as_str().unwrap(), k["count"].as_u64().unwrap()))
        .collect();
    assert_eq!(keys, vec![("0x0", 1), ("0x3", 1), ("0x6", 1)]);
    let tid = by("count:tid", None);
    assert_eq!(tid["keys"]["distinct"], 1);
    assert_eq!(tid["keys"]["top"][0]["count"], 777);

    // A C string argument, bounded, and a bad pointer said, not fatal.
    let (_, stderr) = run_ok(&["run", "-p", "libc:getenv=str:0:4", "--", "/usr/bin/ls", "/"]);
    assert!(
        stderr
            .lines()
            .any(|l| l.ends_with(r#"libc.so.6:getenv arg0="LC_A"..."#)),
        "{stderr}"
    );
    assert!(stderr
        .lines()
        .any(|l| l.ends_with(r#"libc.so.6:getenv arg0="LANG""#)));
    let (_, stderr) = run_ok(&run_line(
        &[],
        &["mp_add=str:0"],
        &[single.to_str().unwrap(), "--iters", "3"],
    ));
    assert!(stderr.contains("arg0=0x0: null pointer"), "{stderr}");
    assert!(
        stderr.contains("arg0=0x1: "),
        "an unmapped address is said: {stderr}"
    );
}

const SDT_C: &str = r#"
#include <stdio.h>
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>
unsigned short mp_demo_tick_semaphore __attribute__((section(".probes")));
unsigned short mp_demo_loop_semaphore __attribute__((section(".probes")));
static volatile long big = 0x123456789;
int main(void) {
    long computed = 0;
    for (int i = 0; i < 20; i++) {
        DTRACE_PROBE2(mp_demo, loop, i, &big);
        if (mp_demo_tick_semaphore) { computed++; DTRACE_PROBE1(mp_demo, tick, i * 10); }
    }
    printf("computed=%ld\n", computed);
    return 0;
}
"#;

/// USDT probes: arguments from the note's specs, the semaphore raised while probed (so
/// the program computes the probe's arguments), and python's probes.
#[test]
fn usdt_probes_with_arguments_and_semaphores() {
    let _kernel_uprobes = alone();
    let d = scratch("usdt");
    let sdt = [
        "/usr/include/sys/sdt.h",
        "/usr/include/x86_64-linux-gnu/sys/sdt.h",
    ];
    if sdt.iter().any(|p| Path::new(p).exists()) {
        if let Some(prog) = compile(&d, "sdt", SDT_C, &["-O2"]) {
            let p = prog.to_str().unwrap();
            let plain = Command::new(p).output().unwrap();
            assert_eq!(text(&plain.stdout), "computed=0\n", "unprobed: semaphore 0");
            let (stdout, stderr) = run_ok(&run_line(
                &["--json"],
                &[
                    "usdt:mp_demo:loop=args:2",
                    "usdt:sdt:mp_demo:tick=count:arg0",
                ],
                &[p],
            ));
            assert_eq!(
                stdout, "computed=20\n",
                "the semaphore was raised: {stderr}"
            );
            let hits: Vec<serde_json::Value> = stderr
                .lines()
                .filter(|l| l.contains(r#""type":"hit""#))
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            assert_eq!(hits.len(), 20, "{stderr}");
            assert_eq!(hits[7]["args"][0], "0x7");
            let probes = json_probes(&stderr);
            let tick = probes.iter().find(|r| r["action"] == "count:arg0").unwrap();
            assert_eq!(tick["hits"], 20);
            assert_eq!(tick["keys"]["distinct"], 20);
            assert_eq!(tick["symbol"], "sdt:mp_demo:tick");
        }
    } else {
        eprintln!("SKIPPED: the C USDT part: <sys/sdt.h> (systemtap-sdt-dev) is not installed");
    }

    let python = "/usr/bin/python3.11";
    if !Path::new(python).exists() {
        eprintln!("SKIPPED: the python part: /usr/bin/python3.11 is not installed");
        return;
    }
    // Python's own probes (under `run`, from its first instruction), as bpftrace counts
    // them.
    let script = "import gc\nfor i in range(20): gc.collect()\n";
    let (_, stderr) = run_ok(&run_line(
        &["--json"],
        &[
            "usdt:python:gc__start=count:arg0",
            "usdt:python:import__find__load__start=count:str0",
        ],
        &[python, "-c", script],
    ));
    let probes = json_probes(&stderr);
    let gc = probes.iter().find(|p| p["action"] == "count:arg0").unwrap();
    let ours = gc["hits"].as_u64().unwrap();
    assert!(ours >= 20, "{stderr}");
    // Modules found and loaded, counted by name (a string argument of the probe).
    let imports = probes.iter().find(|p| p["action"] == "count:str0").unwrap();
    let top = imports["keys"]["top"].as_array().unwrap();
    assert!(
        imports["keys"]["distinct"].as_u64().unwrap() > 10,
        "{imports}"
    );
    assert!(
        top.iter()
            .all(|k| k["key"].as_str().unwrap().starts_with('"')),
        "modules keyed by their quoted names: {imports}"
    );
    if have("bpftrace") {
        let prog = format!("usdt:{python}:python:gc__start /pid == cpid/ {{ @n = count(); }}");
        let d = scratch("py");
        let file = d.join("gc.py");
        std::fs::write(&file, script).unwrap();
        let out = Command::new("bpftrace")
            .args(["-e", &prog, "-c", &format!("{python} {}", file.display())])
            .output()
            .unwrap();
        if out.status.success() {
            let n: u64 = text(&out.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("@n: "))
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            assert_eq!(ours, n, "bpftrace counts {n}");
        } else {
            eprintln!(
                "SKIPPED: bpftrace cannot run here: {}",
                super_text(&out.stderr)
            );
        }
    } else {
        eprintln!("SKIPPED: the comparison with bpftrace: it is not installed");
    }

    // Attached to a waiting python: its semaphore is set while probed, and cleared
    // when multiprobe detaches.
    let mut py = Command::new(python)
        .args(["-c", "import os,sys\nprint(os.getpid(), flush=True)\nsys.stdin.readline()\nimport gc\nfor i in range(20): gc.collect()\nprint('done', flush=True)\nsys.stdin.readline()"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let _guard = KillOnDrop(py.id() as i32);
    let mut out = BufReader::new(py.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let pid: i32 = line.trim().parse().unwrap();
    let sem = python_semaphore(pid, "gc__start");
    assert_eq!(sem_value(pid, sem), 0);
    let (mut mp, err, first) = spawn_attach_probing(pid, &["usdt:python:gc__start=count:arg0"]);
    assert!(first.contains("attached"), "{first}");
    assert_eq!(sem_value(pid, sem), 1, "raised while probed");
    py.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line, "done\n");
    signal(mp.id() as i32, libc::SIGINT);
    let rest = read_in_background(err);
    assert!(mp.wait().unwrap().success());
    let stderr = rest.join().unwrap();
    assert_eq!(sem_value(pid, sem), 0, "lowered at detach: {stderr}");
    // gc.collect() is a collection of generation 2 (the probe's argument, read from
    // the stack: -4@112(%rsp)).
    let row = stderr
        .lines()
        .find(|l| l.contains("python:gc__start"))
        .unwrap();
    let hits: u64 = row.split_whitespace().nth(3).unwrap().parse().unwrap();
    assert!(hits >= 20, "{stderr}");
    let gen2 = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("0x2 "))
        .map(|c| c.trim().parse::<u64>().unwrap());
    assert!(gen2.is_some_and(|n| n >= 20), "{stderr}");
    assert!(stderr.contains("detached"), "{stderr}");
    py.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    assert!(py.wait().unwrap().success());
}

/// The process address of python's semaphore of `probe`, from its notes.
fn python_semaphore(pid: i32, probe: &str) -> u64 {
    let syms = multiprobe_symbols::ProcessSymbols::read(pid as u32, Default::default()).unwrap();
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    let (elf, bias) = syms.file_symbols(exe.to_str().unwrap()).unwrap();
    let p = elf.usdt().iter().find(|p| p.name == probe).unwrap();
    p.semaphore.unwrap() + bias
}

fn sem_value(pid: i32, addr: u64) -> u16 {
    let b = code_at(pid, addr, 2);
    u16::from_le_bytes([b[0], b[1]])
}

/// `list`: functions with their file, address and whether they can be probed, USDT
/// probes, from a command, a pid and a file.
#[test]
fn list_shows_what_a_spec_could_name() {
    let _kernel_uprobes = beside_others();
    let out = run(&["list", "libc:mall*", "--", "/usr/bin/true"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let malloc = stdout
        .lines()
        .find(|l| l.split_whitespace().nth(3) == Some("malloc"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        malloc.starts_with("libc.so.6") && malloc.ends_with("yes"),
        "{malloc}"
    );
    assert!(
        stdout.contains("malloc_trim") && !stdout.contains(" free "),
        "{stdout}"
    );
    let strlen = run(&["list", "libc:strlen", "--", "/usr/bin/true"]);
    assert!(
        text(&strlen.stdout).contains("indirect"),
        "{}",
        text(&strlen.stdout)
    );
    let single = bin("mp-single");
    let out = run(&["list", "mp_*", single.to_str().unwrap()]);
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.contains(" mp_add ") && l.ends_with("yes")),
        "{stdout}"
    );
    // A file's addresses are its own, with file offsets beside them.
    assert!(
        stdout.starts_with("FILE") && stdout.contains("OFFSET"),
        "{stdout}"
    );
    // A library named with a program file: the library's own functions, said so
    // (before: "0 found", the program file has no `malloc` of its own).
    let out = run(&["list", "libc:malloc", single.to_str().unwrap()]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("libc.so.6") && l.contains(" malloc ")),
        "{stdout}"
    );
    assert!(
        stderr.contains("\"libc\" is not") && stderr.contains("listing"),
        "{stderr}"
    );
    let out = run(&["list", "libnosuchlib:f", single.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("names no library"),
        "{}",
        text(&out.stderr)
    );
    let (mut target, pid, _out) = waiting_target("1");
    let out = run(&["list", "mp_add", "-p", &pid.to_string()]);
    assert!(
        text(&out.stdout).contains("mp-single"),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(tracer_of(pid), 0, "list attaches to nothing");
    target.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    drop(target.stdin.take());
    assert!(target.wait().unwrap().success());
    if Path::new("/usr/bin/python3.11").exists() {
        let out = run(&["list", "usdt:python:*", "/usr/bin/python3.11"]);
        let stdout = text(&out.stdout);
        assert!(
            stdout.contains("python:function__entry") && stdout.contains("semaphore"),
            "{stdout}"
        );
    }
}

/// Stripped binaries: code without a name is probed by file offset (bpftrace's
/// path:0xADDR), and a missing name says the file is stripped.
#[test]
fn file_offsets_and_stripped_binaries() {
    let _kernel_uprobes = beside_others();
    let d = scratch("strip");
    let Some(prog) = compile(&d, "prog", STACK_C, &["-O1"]) else {
        return;
    };
    let elf = multiprobe_symbols::ElfSymbols::load(prog.to_str().unwrap()).unwrap();
    let leaf = elf.by_name("leaf")[0].addr;
    let offset = elf.offset_of_vaddr(leaf).unwrap();
    let stripped = d.join("prog-stripped");
    std::fs::copy(&prog, &stripped).unwrap();
    if !Command::new("strip")
        .arg(&stripped)
        .status()
        .is_ok_and(|s| s.success())
    {
        eprintln!("SKIPPED: strip is not installed");
        return;
    }
    let s = stripped.to_str().unwrap();
    let spec = format!("{s}:{offset:#x}");
    let (stdout, stderr) = run_ok(&["run", "-p", &spec, "--", s, "8"]);
    assert!(stdout.starts_with("leaf calls=12"));
    assert_eq!(rows(&stderr, &format!(":{offset:#x}"))[0].1, 12, "{stderr}");
    // By its file name too.
    let spec = format!("prog-stripped:{offset:#x}");
    run_ok(&["run", "-p", &spec, "--", s, "8"]);
    // A name it does not have: it is stripped, and how to probe it anyway.
    let out = run(&["run", "-p", "prog-stripped:leaf", "--", s, "8"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("stripped") && stderr.contains("prog-stripped:0xOFFSET"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
    // An offset that is not code.
    let out = run(&["run", "-p", &format!("{s}:0x0"), "--", s]);
    assert!(
        text(&out.stderr).contains("not in its code"),
        "{}",
        text(&out.stderr)
    );

    // A static binary without any symbol.
    if let Some(st) = compile(&d, "static", STACK_C, &["-O1", "-static", "-s"]) {
        let out = run(&["run", "-p", "leaf", "--", st.to_str().unwrap()]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains("stripped") && stderr.contains("static:0xOFFSET"),
            "{stderr}"
        );
    }
}

const SLOW_C: &str = r#"
#include <stdlib.h>
#include <unistd.h>
__attribute__((noinline)) void tick(int i) { __asm__ volatile("" :: "r"(i)); }
int main(int argc, char **argv) {
    int n = argc > 1 ? atoi(argv[1]) : 8, us = argc > 2 ? atoi(argv[2]) : 60000;
    for (int i = 0; i < n; i++) { tick(i); usleep(us); }
    return 0;
}
"#;

/// `-T` puts the wall-clock time on per-hit lines, and threads other than the main
/// one show as `[PID/TID]`; `--interval` shows each interval's hits beside the totals.
#[test]
fn times_pids_and_interval_counts() {
    let _kernel_uprobes = beside_others();
    let threads = bin("mp-threads");
    let (_, stderr) = run_ok(&run_line(
        &["-T"],
        &["mp_work=args:1"],
        &[threads.to_str().unwrap(), "--threads", "2", "--base", "3"],
    ));
    let lines: Vec<&str> = stderr.lines().filter(|l| l.contains(":mp_work(")).collect();
    assert_eq!(lines.len(), 3 * (1 + 1 + 2));
    let is_time = |t: &str| {
        let b = t.as_bytes();
        t.len() == 15
            && b[2] == b':'
            && b[5] == b':'
            && b[8] == b'.'
            && t[9..].bytes().all(|c| c.is_ascii_digit())
    };
    let mut pids = std::collections::HashSet::new();
    for l in &lines {
        let (time, rest) = l.split_once(' ').unwrap();
        assert!(is_time(time), "{l}");
        let who = rest.split(']').next().unwrap().trim_start_matches('[');
        pids.insert(who.split('/').next().unwrap().to_string());
    }
    assert_eq!(pids.len(), 1, "one process: {lines:?}");
    assert!(
        lines.iter().any(|l| l.contains('/')),
        "threads show PID/TID: {lines:?}"
    );

    let d = scratch("interval");
    let Some(slow) = compile(&d, "slow", SLOW_C, &["-O1"]) else {
        return;
    };
    let mut child = multiprobe()
        .args(["run", "--json", "--interval", "0.1", "-p", "tick", "--"])
        .arg(&slow)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let err = read_in_background(child.stderr.take().unwrap());
    assert!(wait_for(&mut child, Duration::from_secs(60)).is_some_and(|s| s.success()));
    let stderr = err.join().unwrap();
    let ticks: Vec<serde_json::Value> = stderr
        .lines()
        .filter(|l| l.contains(r#""type":"interval""#))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(ticks.len() >= 2, "{stderr}");
    let mut total = 0;
    for t in &ticks {
        let row = &t["probes"][0];
        total += row["interval_hits"].as_u64().unwrap();
        assert_eq!(
            row["hits"].as_u64().unwrap(),
            total,
            "each tick's total is the sum so far"
        );
    }
    let first = ticks[0]["probes"][0]["hits"].as_u64().unwrap();
    assert!(first < 8, "ticks came while it ran: {stderr}");
    assert_eq!(json_probes(&stderr)[0]["hits"], 8);

    // Ticks come on time while the program makes no hit at all (it sleeps 0.8 s).
    let (_, stderr) = run_ok(&run_line(
        &["--interval", "0.1"],
        &["tick"],
        &[slow.to_str().unwrap(), "1", "800000"],
    ));
    let ticks = stderr.lines().filter(|l| l.starts_with("--- ")).count();
    assert!(ticks >= 4, "{ticks} ticks in 0.8 s of sleep: {stderr}");
}

/// The usability items: help shows the grammar, `run` without `--` says how, "did you
/// mean" knows transpositions, patterns label sites by their canonical name, a file
/// offset is not a name, `uretprobe:` says what it is, and a detach says what it did.
#[test]
fn usability() {
    let _kernel_uprobes = beside_others();
    for cmd in ["run", "attach"] {
        let out = run(&[cmd, "--help"]);
        let help = text(&out.stdout);
        assert!(
            help.contains("SPEC:") && help.contains("usdt:[FILE:][PROVIDER:]NAME"),
            "{help}"
        );
        assert!(
            help.contains("count:KEY") && help.contains("if:argN OP NUM"),
            "{help}"
        );
    }
    let out = run(&["run", "-p", "malloc", "ls"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("put the program after --"), "{stderr}");
    let out = run(&["run", "-p", "libc:mallco", "--", "true"]);
    assert!(
        text(&out.stderr).contains("did you mean malloc"),
        "{}",
        text(&out.stderr)
    );
    let out = run(&["run", "--json", "-p", "libc:*alloc", "--", "true"]);
    let symbols: Vec<String> = json_probes(&text(&out.stderr))
        .iter()
        .map(|p| p["symbol"].as_str().unwrap().to_string())
        .collect();
    assert!(
        symbols.contains(&"libc.so.6:malloc".to_string()),
        "{symbols:?}"
    );
    assert!(
        !symbols.iter().any(|s| s.contains("__libc_malloc")),
        "{symbols:?}"
    );
    let out = run(&["run", "-p", "git:0x1000", "--", "true"]);
    assert!(
        !text(&out.stderr).contains("no function named"),
        "{}",
        text(&out.stderr)
    );
    // uretprobe: is the return probe: `ret` on the same target, every call paired.
    let out = run(&["run", "-p", "uretprobe:libc:malloc", "--", "ls", "/"]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stderr.contains("libc.so.6:malloc = 0x"), "{stderr}");
    let (_, hits, _, _) = rows(&stderr, ":malloc")[0].clone();
    assert!(hits > 0, "{stderr}");
    assert!(
        stderr.contains(&format!("libc.so.6:malloc ret: {hits} returned, 0 lost")),
        "{stderr}"
    );

    // After a detach: the rows say detached, and a note says what MISSED means.
    let (mut target, pid, _out) = waiting_target("100000000");
    let (mut mp, err, _attached) = spawn_attach_probing(pid, &["mp_add"]);
    target.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    signal(mp.id() as i32, libc::SIGINT);
    let rest = read_in_background(err);
    assert!(mp.wait().unwrap().success());
    let stderr = rest.join().unwrap();
    assert!(
        stderr.contains("detached: every probe was removed"),
        "{stderr}"
    );
    assert!(
        stderr.contains("MISSED counts hits that ran no handler"),
        "{stderr}"
    );
    let row = stderr.lines().find(|l| l.contains(":mp_add")).unwrap();
    assert!(row.ends_with("detached"), "{row}");
    let _ = target.kill();
    let _ = target.wait();
}
