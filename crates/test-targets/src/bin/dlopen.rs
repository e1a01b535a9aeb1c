//! Loads a library after start-up: `dlopen("libz.so.1")` (zlib, part of every Debian
//! system), then calls its `zlibVersion` `--iters` times (default 100) and prints its own
//! count. A probe on `libz:zlibVersion` given before the program starts is pending until
//! the `dlopen` maps the library, then counts every call.
//!
//! With `--reloads N` it then unloads the library (`dlclose`) and loads it again N
//! times, calling it `--iters` times after each load, and says whether every `dlclose`
//! really unmapped it (`unloaded=yes`): a probe must follow the library out and back in.
//!
//! With `--step` a test drives it through stdin: after each step it prints a line and
//! waits for one (any) before the next — `loaded at=ADDR` (the address `dlsym` gave for
//! `zlibVersion`), `called calls=N` (all calls so far), and, between rounds,
//! `closed unloaded=yes|no` — so the tracer can register, promote and check at each.

use multiprobe_test_targets::util;

/// Load libz and return its `zlibVersion`, with the handle.
fn load() -> (*mut libc::c_void, extern "C" fn() -> *const libc::c_char) {
    // SAFETY: a NUL-terminated name; the handle is checked before use.
    let lib = unsafe { libc::dlopen(c"libz.so.1".as_ptr(), libc::RTLD_NOW) };
    assert!(!lib.is_null(), "dlopen libz.so.1 failed");
    // SAFETY: a symbol lookup in a valid handle.
    let sym = unsafe { libc::dlsym(lib, c"zlibVersion".as_ptr()) };
    assert!(!sym.is_null(), "zlibVersion not found");
    // SAFETY: zlibVersion is `const char *zlibVersion(void)`.
    let f = unsafe {
        std::mem::transmute::<*mut libc::c_void, extern "C" fn() -> *const libc::c_char>(sym)
    };
    (lib, f)
}

fn libz_mapped() -> bool {
    std::fs::read_to_string("/proc/self/maps").is_ok_and(|m| m.contains("libz.so"))
}

/// With `--step`: say what was just done and wait for a line on stdin.
fn step(what: &str) {
    use std::io::{BufRead, Write};
    if util::flag("--step") {
        println!("{what}");
        std::io::stdout().flush().expect("flush");
        let mut line = String::new();
        std::io::stdin().lock().read_line(&mut line).expect("stdin");
    }
}

fn main() {
    let iters: u64 = util::arg("--iters", 100);
    let reloads: u64 = util::arg("--reloads", 0);
    util::maybe_wait();
    let mut calls = 0;
    let mut len = 0;
    let mut unloaded = true;
    for round in 0..=reloads {
        let (lib, f) = load();
        step(&format!("loaded at={:#x}", f as usize));
        for _ in 0..iters {
            // SAFETY: zlib returns a static NUL-terminated string.
            len = unsafe { std::ffi::CStr::from_ptr(f()) }.to_bytes().len();
            calls += 1;
        }
        step(&format!("called calls={calls}"));
        if round < reloads {
            // SAFETY: the handle came from dlopen and `f` is not used after this.
            assert_eq!(unsafe { libc::dlclose(lib) }, 0, "dlclose failed");
            let gone = !libz_mapped();
            unloaded &= gone;
            step(&format!(
                "closed unloaded={}",
                if gone { "yes" } else { "no" }
            ));
        }
    }
    println!("zlibVersion calls={calls} version_len={len}");
    if reloads > 0 {
        println!("unloaded={}", if unloaded { "yes" } else { "no" });
    }
}
