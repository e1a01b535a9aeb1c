//! The `multiprobe` command's main job, end to end: `ls /usr` with malloc and free
//! counted, against the same `ls` unprobed, the raw one-stop ptrace round trip (the floor
//! per hit) and gdb doing the same counting — all measured in one run, round by round.
//!
//! Target (issue 7): probed time <= unprobed time + start-up + 1.2 x floor x hits, with
//! start-up (what multiprobe adds to a program that makes almost no hits: `true`) under
//! 200 ms.
//!
//! Each round times, back to back: `ls /usr`; `multiprobe run -p libc:malloc -p libc:free
//! --json -- ls /usr` (its summary gives the hit count); `true` and `multiprobe run ... --
//! true`; 2000 raw one-stop round trips on `mp-bench`; and, if gdb is installed, gdb with
//! two silent breakpoints that continue. Figures are medians of the rounds; ratios are
//! medians of per-round ratios.
//!
//! Run: `cargo bench -p multiprobe-benches --bench cli_ls` (`MP_ROUNDS=N`, default 15)

use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use multiprobe_backend_ptrace::baseline::RawTarget;
use multiprobe_benches::{fmt_ns, median, workspace_bin};

const FLOOR_HITS: u64 = 2000;

fn timed(cmd: &mut Command) -> (Duration, std::process::Output) {
    let t = Instant::now();
    let out = cmd.output().expect("run a command");
    (t.elapsed(), out)
}

fn quiet(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args).stdin(Stdio::null());
    c
}

/// Hits of every probe in a `--json` summary (the last line of stderr).
fn total_hits(stderr: &[u8]) -> u64 {
    let text = String::from_utf8_lossy(stderr);
    let last = text.lines().last().expect("a summary line");
    let v: serde_json::Value = serde_json::from_str(last).expect("the JSON summary");
    v["probes"]
        .as_array()
        .expect("probes")
        .iter()
        .map(|p| p["hits"].as_u64().unwrap())
        .sum()
}

const GDB_SCRIPT: &str = "set pagination off\nset confirm off\nset breakpoint pending on\n\
break malloc\ncommands\nsilent\ncontinue\nend\nbreak free\ncommands\nsilent\ncontinue\nend\nrun\nquit\n";

fn main() {
    let rounds: usize = std::env::var("MP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(15);
    let mp = workspace_bin("multiprobe-cli", "multiprobe");
    let mp = mp.to_str().unwrap();
    let gdb = Command::new("gdb")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    let script = std::env::temp_dir().join(format!("mp-cli-bench-{}.gdb", std::process::id()));
    std::fs::write(&script, GDB_SCRIPT).unwrap();
    let script = script.to_str().unwrap().to_string();

    let mut bench = Command::new(multiprobe_test_targets::bin("mp-bench"));
    bench.stdin(Stdio::piped()).stdout(Stdio::piped());
    let (mut raw, addrs) = RawTarget::spawn(&mut bench, &["mp_bench_nop"]).unwrap();
    raw.insert(addrs[0]).unwrap();
    let mut floor = |n: u64| -> Duration {
        let mut cmd = [0u8; 9];
        cmd[1..].copy_from_slice(&n.to_le_bytes());
        let t = Instant::now();
        raw.child().stdin.as_mut().unwrap().write_all(&cmd).unwrap();
        raw.one_stop(n).unwrap();
        let mut b = [0u8];
        raw.child()
            .stdout
            .as_mut()
            .unwrap()
            .read_exact(&mut b)
            .unwrap();
        t.elapsed()
    };

    let probes = ["-p", "libc:malloc", "-p", "libc:free", "--json"];
    let mut m = Measured::default();
    let mut hits = 0;
    for round in 0..=rounds {
        let (t_plain, o) = timed(&mut quiet("ls", &["/usr"]));
        assert!(o.status.success());
        let mut args: Vec<&str> = vec!["run"];
        args.extend(probes);
        args.extend(["--", "ls", "/usr"]);
        let (t_probed, o) = timed(&mut quiet(mp, &args));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        hits = total_hits(&o.stderr);
        let (t_true, _) = timed(&mut quiet("true", &[]));
        let mut args: Vec<&str> = vec!["run"];
        args.extend(probes);
        args.extend(["--", "true"]);
        let (t_mp_true, o) = timed(&mut quiet(mp, &args));
        assert!(o.status.success());
        let true_hits = total_hits(&o.stderr);
        let f = floor(FLOOR_HITS).as_secs_f64() / FLOOR_HITS as f64;
        let t_gdb = gdb.then(|| {
            let (t, o) = timed(&mut quiet(
                "gdb",
                &["-q", "-batch", "-nx", "-x", &script, "--args", "ls", "/usr"],
            ));
            assert!(
                o.status.success(),
                "gdb: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            t.as_secs_f64()
        });
        if round == 0 {
            continue; // warm-up: page cache, first reads of the symbol tables
        }
        // What multiprobe adds to a program that makes almost no hits, less those hits.
        let startup = t_mp_true.as_secs_f64() - t_true.as_secs_f64() - true_hits as f64 * f;
        let extra = t_probed.as_secs_f64() - t_plain.as_secs_f64() - startup;
        m.plain.push(t_plain.as_secs_f64());
        m.probed.push(t_probed.as_secs_f64());
        m.startup.push(startup);
        m.floor.push(f);
        m.per_hit.push(extra / hits as f64);
        m.ratio.push(extra / (hits as f64 * f));
        m.gdb.extend(t_gdb);
        if let Some(g) = t_gdb {
            m.gdb_ratio.push(g / t_probed.as_secs_f64());
        }
    }
    let _ = std::fs::remove_file(&script);
    let ns = |s: f64| fmt_ns(s * 1e9);
    println!("ROUNDS {rounds}; hits per probed run (malloc + free): {hits}");
    println!("MEAN ls /usr unprobed: {}", ns(median(m.plain)));
    println!("MEAN ls /usr under multiprobe: {}", ns(median(m.probed)));
    println!("MEAN one-stop floor per hit: {}", ns(median(m.floor)));
    println!(
        "MEAN multiprobe per hit ((probed - unprobed - start-up) / hits): {}",
        ns(median(m.per_hit))
    );
    let s = median(m.startup);
    println!(
        "MEAN start-up (run -- true, less true and its hits): {}",
        ns(s)
    );
    let r = median(m.ratio);
    println!(
        "TARGET per-hit cost / one-stop floor <= 1.2: {r:.3} {}",
        if r <= 1.2 { "met" } else { "MISSED" }
    );
    println!(
        "TARGET start-up < 200 ms: {} {}",
        ns(s),
        if s < 0.2 { "met" } else { "MISSED" }
    );
    if m.gdb.is_empty() {
        println!("SKIPPED gdb comparison: gdb is not installed");
    } else {
        println!(
            "MEAN gdb, same breakpoints (silent, continue): {}",
            ns(median(m.gdb))
        );
        println!(
            "RATIO gdb / multiprobe on ls /usr: {:.2}",
            median(m.gdb_ratio)
        );
    }
}

/// Per-round measurements, in seconds.
#[derive(Default)]
struct Measured {
    plain: Vec<f64>,
    probed: Vec<f64>,
    startup: Vec<f64>,
    floor: Vec<f64>,
    per_hit: Vec<f64>,
    ratio: Vec<f64>,
    gdb: Vec<f64>,
    gdb_ratio: Vec<f64>,
}
