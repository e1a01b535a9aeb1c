//! Compiles the C test programs (`c/*.c`) into one static library; each is run by a
//! small Rust binary in `src/bin` that calls its `mp_*_main`. The in-process targets
//! (`c/inproc.c`, `c/throw.cpp`: the `inproc` module) go into libraries of their own.

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
    // In-process targets (the `inproc` module), without sibling calls: every call in
    // them returns through its caller, as return probes need to be tested on.
    println!("cargo:rerun-if-changed=c/inproc.c");
    cc::Build::new()
        .file("c/inproc.c")
        .flag("-O1")
        .flag("-fno-inline")
        .flag("-fno-optimize-sibling-calls")
        .warnings(true)
        .compile("mp_c_inproc");
    println!("cargo:rerun-if-changed=c/throw.cpp");
    cc::Build::new()
        .cpp(true)
        .file("c/throw.cpp")
        .flag("-O1")
        .flag("-fno-inline")
        .flag("-fno-optimize-sibling-calls")
        .warnings(true)
        .compile("mp_cpp_inproc");
    println!("cargo:rustc-link-lib=pthread");
}
