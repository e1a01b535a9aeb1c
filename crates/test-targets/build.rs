//! Compiles the C test programs (`c/*.c`) into one static library; each is run by a
//! small Rust binary in `src/bin` that calls its `mp_*_main`.

fn main() {
    let programs = ["forkrace", "trapmask", "seccomp", "unmapxol", "forktree"];
    println!("cargo:rerun-if-changed=c/nommap.h");
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
    // Return-probe targets, without sibling calls: every call returns through its
    // caller, as return probes are tested on.
    println!("cargo:rerun-if-changed=c/rets.c");
    cc::Build::new()
        .file("c/rets.c")
        .flag("-O1")
        .flag("-fno-inline")
        .flag("-fno-optimize-sibling-calls")
        .warnings(true)
        .compile("mp_c_rets");
    println!("cargo:rerun-if-changed=c/throwret.cpp");
    cc::Build::new()
        .cpp(true)
        .file("c/throwret.cpp")
        .flag("-O1")
        .flag("-fno-inline")
        .flag("-fno-optimize-sibling-calls")
        .warnings(true)
        .compile("mp_cpp_rets");
    println!("cargo:rustc-link-lib=pthread");
}
