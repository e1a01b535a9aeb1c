//! `-o FILE`: a write that fails is an error, never silence; nothing the user did not
//! mean is destroyed or followed; what is written is private (`src/outfile.rs`).

mod common;

use std::os::unix::fs::PermissionsExt;

use common::*;
use multiprobe_test_targets::bin;

/// `multiprobe run -o FILE -p SPEC -- PROGRAM...`.
fn run_to(file: &str, spec: &str, program: &[&str]) -> std::process::Output {
    let mut args = vec!["run", "-o", file, "-p", spec, "--"];
    args.extend_from_slice(program);
    run(&args)
}

/// Output to a full device: exit status 2 and one line saying what was lost; the
/// program's own run is not disturbed.
#[test]
fn a_full_disk_is_an_error_not_silence() {
    let single = bin("mp-single");
    let out = run_to(
        "/dev/full",
        "mp_add",
        &[single.to_str().unwrap(), "--iters", "50"],
    );
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(out.status.code(), Some(2), "{:?} {stderr}", out.status);
    assert_eq!(calls(&stdout, "mp_add"), 50);
    let last = stderr.lines().last().unwrap_or("");
    assert!(
        last.starts_with("multiprobe: error: writing /dev/full failed: No space left on device"),
        "{stderr}"
    );
    // The summary that could not be written comes on stderr instead.
    assert_eq!(rows(&stderr, ":mp_add")[0].1, 50, "{stderr}");
}

/// `-o` naming the traced program (or any executable or ELF file) is refused before
/// anything is written: the program is intact.
#[test]
fn the_traced_program_and_other_executables_are_never_overwritten() {
    let d = scratch("exe");
    let copy = d.join("prog");
    std::fs::copy(bin("mp-single"), &copy).unwrap();
    let before = std::fs::read(&copy).unwrap();
    let copy_s = copy.to_str().unwrap();
    let out = run_to(copy_s, "mp_add", &[copy_s]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("refusing to write over an executable"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "the program did not run");
    assert_eq!(
        std::fs::read(&copy).unwrap(),
        before,
        "the program is intact"
    );

    // A library (an ELF file without `x` bits) is refused too.
    let lib = d.join("libz-copy.so.1");
    std::fs::copy("/lib/x86_64-linux-gnu/libz.so.1", &lib).unwrap();
    std::fs::set_permissions(&lib, std::fs::Permissions::from_mode(0o644)).unwrap();
    let before = std::fs::read(&lib).unwrap();
    let out = run_to(lib.to_str().unwrap(), "mp_add", &[copy_s]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("refusing to write over an ELF file"));
    assert_eq!(std::fs::read(&lib).unwrap(), before);
    std::fs::remove_dir_all(&d).unwrap();
}

/// Bad input leaves an existing output file as it was, and creates none.
#[test]
fn bad_input_leaves_the_output_file_alone() {
    let d = scratch("bad");
    let old = d.join("old.log");
    std::fs::write(&old, "yesterday's run\n").unwrap();
    let new = d.join("new.log");
    let single = bin("mp-single");
    for file in [&old, &new] {
        let out = run_to(
            file.to_str().unwrap(),
            "no_such_function_xyz",
            &[single.to_str().unwrap()],
        );
        assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
        assert!(text(&out.stderr).contains("no function named"));
    }
    assert_eq!(std::fs::read_to_string(&old).unwrap(), "yesterday's run\n");
    assert!(!new.exists(), "no file left from a run that never started");
    // The same with a good probe replaces it.
    let out = run_to(
        old.to_str().unwrap(),
        "mp_add",
        &[single.to_str().unwrap(), "--iters", "3"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let written = std::fs::read_to_string(&old).unwrap();
    assert!(!written.contains("yesterday"), "{written}");
    assert_eq!(rows(&written, ":mp_add")[0].1, 3, "{written}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A symbolic link is not followed (as root, one planted in a shared directory would
/// point the output anywhere); a new file is readable by its owner only.
#[test]
fn symlinks_are_refused_and_new_files_are_private() {
    let d = scratch("link");
    let victim = d.join("victim");
    std::fs::write(&victim, "precious\n").unwrap();
    let link = d.join("out");
    std::os::unix::fs::symlink(&victim, &link).unwrap();
    let single = bin("mp-single");
    let out = run_to(
        link.to_str().unwrap(),
        "mp_add=args:2",
        &[single.to_str().unwrap()],
    );
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("symbolic link"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious\n");

    let private = d.join("dump");
    let out = run_to(
        private.to_str().unwrap(),
        "mp_load=mem:0:8",
        &[single.to_str().unwrap(), "--iters", "2"],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let mode = std::fs::metadata(&private).unwrap().permissions().mode();
    assert_eq!(mode & 0o077, 0, "memory dumps readable by others: {mode:o}");
    assert!(std::fs::read_to_string(&private)
        .unwrap()
        .contains(":mp_load arg0="));
    std::fs::remove_dir_all(&d).unwrap();
}

/// Output to a closed pipe (`multiprobe attach PID ... 2>&1 | head -1`): nothing
/// multiprobe writes can reach anyone, so it detaches at the first failed write and
/// exits 2 — it does not stay attached, slowing the program for nobody, and does not
/// panic writing its error to the closed stderr (exit 101). The program runs on
/// unprobed with every call made.
#[test]
fn a_closed_output_pipe_ends_the_session_and_the_program_runs_on() {
    use std::io::{BufRead, Write};
    let (mut target, pid, mut out) = waiting_target("3000");
    let _target = KillOnDrop(pid);
    let (mut mp, err, line) = spawn_attach_probing(pid, &["mp_add=args:1"]);
    assert!(line.contains("attached"), "{line}");
    drop(err); // the reader is gone: the next write to multiprobe's stderr fails
    target.stdin.as_mut().unwrap().write_all(b"go\n").unwrap();
    let mut report = String::new();
    for _ in 0..3 {
        out.read_line(&mut report).unwrap();
    }
    assert_eq!(calls(&report, "mp_add"), 3000, "{report}");
    let status = wait_for(&mut mp, std::time::Duration::from_secs(30))
        .expect("multiprobe ends at the failed write, not with the program");
    assert_eq!(status.code(), Some(2), "{status:?}");
    assert_eq!(tracer_of(pid), 0, "still traced");
    assert!(
        !status_field(pid, "State:").starts_with('t'),
        "left stopped"
    );
    text_is_pristine(pid).unwrap();
    drop(target.stdin.take());
    let status = wait_for(&mut target, std::time::Duration::from_secs(30)).expect("it ends");
    assert!(status.success(), "{status:?}");
}
