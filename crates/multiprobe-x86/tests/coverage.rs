//! The coverage targets as a regression test: at least 99.5% of function entries and
//! 98% of instruction boundaries of the system's libc must be probeable (the full
//! report is the `coverage` example; see BENCHMARKS.md).

#[allow(dead_code)]
#[path = "../examples/coverage.rs"]
mod coverage;

#[test]
fn libc_meets_the_coverage_targets() {
    let files = coverage::default_files();
    let Some(libc) = files.iter().find(|p| p.ends_with("libc.so.6")) else {
        eprintln!("no libc.so.6 found; nothing to measure");
        return;
    };
    let t = coverage::analyze_file(libc).expect("libc parses");
    assert!(
        t.functions > 1000,
        "too few functions found: {}",
        t.functions
    );
    let (entries, boundaries) = t.probeable();
    assert!(entries >= 99.5, "function entries probeable: {entries:.3}%");
    assert!(
        boundaries >= 98.0,
        "instruction boundaries probeable: {boundaries:.3}%"
    );
}
