//! Compiles the C test programs (`c/*.c`) into one static library; each is run by a
//! small Rust binary in `src/bin` that calls its `mp_*_main`. The in-process targets
//! (`c/inproc.c`, `c/throw.cpp`: the `inproc` module) and the return-probe programs
//! (`c/rets.c`, `c/throwret.cpp`) go into libraries of their own.

/// A library of `file` without sibling calls: every call in it returns through its
/// caller, as return probes need to be tested on.
fn no_sibling_calls(file: &str, lib: &str) {
    println!("cargo:rerun-if-changed={file}");
    cc::Build::new()
        .cpp(file.ends_with(".cpp"))
        .file(file)
        .flag("-O1")
        .flag("-fno-inline")
        .flag("-fno-optimize-sibling-calls")
        .warnings(true)
        .compile(lib);
}

fn main() {
    let programs = [
        "forkrace", "trapmask", "seccomp", "unmapxol", "forktree", "collect",
    ];
    println!("cargo:rerun-if-changed=c/nommap.h");
    println!("cargo:rerun-if-changed=c/coro.h");
    let mut build = cc::Build::new();
    for p in programs {
        let path = format!("c/{p}.c");
        println!("cargo:rerun-if-changed={path}");
        build.file(path);
    }
    build
        .flag("-O1")
        .flag("-fno-inline")
        .warnings(true)
        .compile("mp_c_targets");
    no_sibling_calls("c/inproc.c", "mp_c_inproc");
    no_sibling_calls("c/throw.cpp", "mp_cpp_inproc");
    no_sibling_calls("c/rets.c", "mp_c_rets");
    no_sibling_calls("c/throwret.cpp", "mp_cpp_rets");
    println!("cargo:rustc-link-lib=pthread");
}
