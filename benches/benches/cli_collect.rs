//! The command on real programs with its actions collecting in the tracee (issue 14),
//! against the same programs unprobed and against `--stop` (one ptrace stop per hit),
//! round by round in one run:
//!
//! * `ls /usr` with `libc:malloc` and `libc:free` counted. Start-up (what multiprobe
//!   adds to `true` with the same probes) is subtracted from the probed time. Target:
//!   within 1.3x of unprobed.
//! * `sort` of a generated 20 MB file in the `C.UTF-8` locale (so every comparison is a
//!   `strcoll` call) with `-p libc:strcoll` counted: several million probed calls.
//!   Target: within 1.5x of unprobed.
//! * The peers on the same job, each where installed, measured once on a smaller input
//!   (each makes a stop or a trap per call): `perf stat` of a kernel uprobe (`perf
//!   probe -x libc strcoll`) on a 2 MB file, `ltrace -c -e strcoll` on a 200 kB one,
//!   gdb with a silent breakpoint that continues on a 20 kB one; multiprobe on the same
//!   files. Each is
//!   given as its cost per call over unprobed `sort` of that file, and as a multiple of
//!   multiprobe's.
//!
//! Figures are medians of the rounds; ratios are medians of per-round ratios. Which
//! CPUs the processes ran on is the scheduler's (no pinning): the tracee path makes no
//! stop, so placement matters only to the `--stop` figures.
//!
//! Run: `cargo bench -p multiprobe-benches --bench cli_collect` (`MP_ROUNDS=N`,
//! default 5).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

use multiprobe_benches::{median, workspace_bin};

fn timed(cmd: &mut Command) -> (f64, std::process::Output) {
    let t = Instant::now();
    let out = cmd.output().expect("run a command");
    (t.elapsed().as_secs_f64(), out)
}

fn quiet(program: &str, args: &[&str]) -> Command {
    let mut c = Command::new(program);
    c.args(args).stdin(Stdio::null()).env("LC_ALL", "C.UTF-8");
    c
}

/// (hits of every probe, paths) from a `--json` summary (the last line of stderr).
fn summary(stderr: &[u8]) -> (u64, Vec<String>) {
    let text = String::from_utf8_lossy(stderr);
    let last = text.lines().last().expect("a summary line");
    let v: serde_json::Value = serde_json::from_str(last).expect("the JSON summary");
    let probes = v["probes"].as_array().expect("probes");
    (
        probes.iter().map(|p| p["hits"].as_u64().unwrap()).sum(),
        probes
            .iter()
            .map(|p| p["path"].as_str().unwrap_or("-").to_string())
            .collect(),
    )
}

/// A file of `bytes` bytes of random words, one line each.
fn words(bytes: usize) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("mp-sort-{}-{bytes}.txt", std::process::id()));
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut n = 0;
    while n < bytes {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 4 + (x % 20) as usize;
        let w: String = (0..len)
            .map(|i| (b'a' + ((x >> (i % 60)) % 26) as u8) as char)
            .collect();
        writeln!(f, "{w}").unwrap();
        n += len + 1;
    }
    f.flush().unwrap();
    path
}

fn main() {
    let rounds: usize = std::env::var("MP_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let mp = workspace_bin("multiprobe-cli", "multiprobe");
    let mp = mp.to_str().unwrap();
    let big = words(20 << 20);
    let big = big.to_str().unwrap().to_string();

    let probe_ls = ["-p", "libc:malloc", "-p", "libc:free", "--json", "--"];
    let run = |extra: &[&str], probes: &[&str], cmd: &[&str]| -> (f64, u64, Vec<String>) {
        let mut args = vec!["run"];
        args.extend_from_slice(extra);
        args.extend_from_slice(probes);
        args.extend_from_slice(cmd);
        let (t, o) = timed(&mut quiet(mp, &args));
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let (hits, paths) = summary(&o.stderr);
        (t, hits, paths)
    };

    let (mut ls_ratio, mut ls_stop_ratio, mut sort_ratio, mut startup) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut lat_ratio, mut lat_hits) = (Vec::new(), 0);
    let (mut ls_hits, mut sort_hits, mut t_sort, mut t_sort_mp) = (0, 0, Vec::new(), Vec::new());
    let mut paths = Vec::new();
    for round in 0..=rounds {
        let (t_ls, o) = timed(&mut quiet("ls", &["/usr"]));
        assert!(o.status.success());
        let (t_true, _) = timed(&mut quiet("true", &[]));
        let (t_mp_true, _, _) = run(&[], &probe_ls, &["true"]);
        let (t_probed, hits, p) = run(&[], &probe_ls, &["ls", "/usr"]);
        let (t_stop_true, _, _) = run(&["--stop"], &probe_ls, &["true"]);
        let (t_stop, _, _) = run(&["--stop"], &probe_ls, &["ls", "/usr"]);
        let (t_plain_sort, o) = timed(&mut quiet("sort", &["-o", "/dev/null", &big]));
        assert!(o.status.success());
        let (t_mp_sort, s_hits, sp) = run(
            &[],
            &["-p", "libc:strcoll", "--json", "--"],
            &["sort", "-o", "/dev/null", &big],
        );
        let (t_lat_sort, l_hits, lp) = run(
            &[],
            &["-p", "libc:strcoll=latency", "--json", "--"],
            &["sort", "-o", "/dev/null", &big],
        );
        if round == 0 {
            continue; // warm-up: page cache, first reads of the symbol tables
        }
        lat_ratio.push(t_lat_sort / t_plain_sort);
        lat_hits = l_hits;
        paths.extend(lp);
        let s = t_mp_true - t_true;
        startup.push(s);
        ls_ratio.push((t_probed - s) / t_ls);
        ls_stop_ratio.push((t_stop - (t_stop_true - t_true)) / t_ls);
        sort_ratio.push(t_mp_sort / t_plain_sort);
        t_sort.push(t_plain_sort);
        t_sort_mp.push(t_mp_sort);
        ls_hits = hits;
        sort_hits = s_hits;
        paths.extend(p.into_iter().chain(sp));
    }
    paths.sort();
    paths.dedup();
    println!("paths of the probes: {paths:?}");
    println!(
        "ls /usr, malloc+free counted ({ls_hits} hits): start-up {:.1} ms; \
         (probed - start-up) / unprobed = {:.2}x (target <= 1.3x); with --stop {:.2}x",
        median(startup) * 1e3,
        median(ls_ratio),
        median(ls_stop_ratio)
    );
    println!(
        "sort 20 MB (C.UTF-8), strcoll counted ({sort_hits} hits): unprobed {:.2} s, \
         probed {:.2} s: {:.2}x (target <= 1.5x)",
        median(t_sort),
        median(t_sort_mp),
        median(sort_ratio)
    );
    println!(
        "sort 20 MB (C.UTF-8), strcoll latency histogram ({lat_hits} calls timed): \
         probed / unprobed = {:.2}x (a return probe on every call; issue 15)",
        median(lat_ratio)
    );
    peers(&run);
    let _ = std::fs::remove_file(&big);
}

/// Runs the peers (ltrace, perf with a kernel uprobe, gdb) and multiprobe on the same
/// small sorts and prints each one's cost per `strcoll` call over unprobed.
/// Runs multiprobe with (options, probes, command): (seconds, hits, each probe's path).
type Run<'a> = &'a dyn Fn(&[&str], &[&str], &[&str]) -> (f64, u64, Vec<String>);

fn peers(run: Run<'_>) {
    let installed = |tool: &str, flag: &str| {
        Command::new(tool)
            .arg(flag)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    // Sizes so that each peer takes seconds, not minutes (ltrace ~140 us a call here).
    let (small, mid, tiny) = (words(2 << 20), words(200 << 10), words(20 << 10));
    for file in [&small, &mid, &tiny] {
        let f = file.to_str().unwrap();
        let sort = ["sort", "-o", "/dev/null", f];
        let (t_plain, _) = timed(&mut quiet("sort", &sort[1..]));
        let (t_mp, calls, _) = run(&[], &["-p", "libc:strcoll", "--json", "--"], &sort);
        let per_call = |t: f64| (t - t_plain) / calls.max(1) as f64 * 1e6;
        let mp_us = per_call(t_mp);
        println!(
            "{} kB sort, strcoll ({calls} calls): unprobed {t_plain:.3} s; multiprobe \
             {t_mp:.3} s, {:.4} us a call over unprobed",
            file.metadata().map(|m| m.len() >> 10).unwrap_or(0),
            mp_us
        );
        let mut peer = |name: &str, t: f64| {
            println!(
                "  {name}: {t:.3} s, {:.2} us a call ({:.0}x multiprobe's)",
                per_call(t),
                per_call(t) / mp_us.max(1e-6)
            )
        };
        if file == &small {
            perf_uprobe(&sort, &mut peer);
        } else if file == &mid {
            if installed("ltrace", "-V") {
                let (t, o) = timed(&mut quiet(
                    "ltrace",
                    &[&["-c", "-e", "strcoll"], &sort[..]].concat(),
                ));
                assert!(o.status.success());
                peer("ltrace -c", t);
            } else {
                println!("  ltrace: SKIPPED (not installed: apt-get install ltrace)");
            }
        } else if installed("gdb", "--version") {
            let script = std::env::temp_dir().join(format!("mp-gdb-{}.gdb", std::process::id()));
            std::fs::write(
                &script,
                "set pagination off\nset breakpoint pending on\nbreak strcoll\n\
                 commands\nsilent\ncontinue\nend\nrun\ninfo breakpoints\n",
            )
            .unwrap();
            let s = script.to_str().unwrap();
            let (t, o) = timed(&mut quiet(
                "gdb",
                &[&["-batch", "-nx", "-x", s, "--args"], &sort[..]].concat(),
            ));
            let out = String::from_utf8_lossy(&o.stdout);
            let hits = out
                .lines()
                .find_map(|l| l.trim().strip_prefix("breakpoint already hit "));
            println!("  gdb counted: {}", hits.unwrap_or("(no count)"));
            peer("gdb, a silent breakpoint that continues", t);
            let _ = std::fs::remove_file(script);
        } else {
            println!("  gdb: SKIPPED (not installed: apt-get install gdb)");
        }
        let _ = std::fs::remove_file(file);
    }
}

/// `perf stat` of a kernel uprobe on libc's `strcoll` (`perf probe -x`), removed after.
fn perf_uprobe(sort: &[&str], peer: &mut dyn FnMut(&str, f64)) {
    let libc = "/lib/x86_64-linux-gnu/libc.so.6";
    let add = Command::new("perf")
        .args(["probe", "-q", "-x", libc, "mp_strcoll=strcoll"])
        .output();
    if !add.as_ref().is_ok_and(|o| o.status.success()) {
        println!(
            "  perf uprobe: SKIPPED (perf or tracefs not available: apt-get install linux-perf)"
        );
        return;
    }
    let (t, o) = timed(&mut quiet(
        "perf",
        &[&["stat", "-x,", "-e", "probe_libc:mp_strcoll"], sort].concat(),
    ));
    let _ = Command::new("perf")
        .args(["probe", "-q", "-d", "probe_libc:mp_strcoll"])
        .output();
    let counted = String::from_utf8_lossy(&o.stderr);
    println!(
        "  perf counted: {}",
        counted
            .lines()
            .last()
            .and_then(|l| l.split(',').next())
            .unwrap_or("?")
    );
    peer("perf stat, a kernel uprobe", t);
}
