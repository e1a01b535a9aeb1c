//! The coverage targets as a regression test: at least 99.5% of function entries and
//! 98% of instruction boundaries of the system's libc must be probeable, and at least
//! 90% of the function entries of libc and libstdc++ promotable to a jump (trap-free).
//! The full report is the `coverage` example; see BENCHMARKS.md.

#[allow(dead_code)]
#[path = "../examples/coverage.rs"]
mod coverage;

#[test]
fn libc_and_libstdcxx_meet_the_coverage_targets() {
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
    let promoted = t.promotable();
    assert!(promoted >= 90.0, "libc entries promotable: {promoted:.3}%");
    match files.iter().find(|p| p.ends_with("libstdc++.so.6")) {
        Some(cxx) => {
            let t = coverage::analyze_file(cxx).expect("libstdc++ parses");
            let promoted = t.promotable();
            assert!(
                promoted >= 90.0,
                "libstdc++ entries promotable: {promoted:.3}%"
            );
        }
        None => eprintln!("no libstdc++.so.6 found: its promotion share is not checked"),
    }
}
