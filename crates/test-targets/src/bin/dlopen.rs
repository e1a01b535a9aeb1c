//! Loads a library after start-up: `dlopen("libz.so.1")` (zlib, part of every Debian
//! system), then calls its `zlibVersion` `--iters` times (default 100) and prints its own
//! count. A probe on `libz:zlibVersion` given before the program starts is pending until
//! the `dlopen` maps the library, then counts every call.

use multiprobe_test_targets::util;

fn main() {
    let iters: u64 = util::arg("--iters", 100);
    util::maybe_wait();
    // SAFETY: a NUL-terminated name; the handle is checked before use.
    let lib = unsafe { libc::dlopen(c"libz.so.1".as_ptr(), libc::RTLD_NOW) };
    assert!(!lib.is_null(), "dlopen libz.so.1 failed");
    // SAFETY: a symbol lookup in a valid handle.
    let sym = unsafe { libc::dlsym(lib, c"zlibVersion".as_ptr()) };
    assert!(!sym.is_null(), "zlibVersion not found");
    // SAFETY: zlibVersion is `const char *zlibVersion(void)`.
    let f: extern "C" fn() -> *const libc::c_char = unsafe { std::mem::transmute(sym) };
    let mut len = 0;
    for _ in 0..iters {
        // SAFETY: zlib returns a static NUL-terminated string.
        len = unsafe { std::ffi::CStr::from_ptr(f()) }.to_bytes().len();
    }
    println!("zlibVersion calls={iters} version_len={len}");
}
