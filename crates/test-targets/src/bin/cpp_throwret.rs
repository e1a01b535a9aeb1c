//! Runs the C++ test program `c/throwret.cpp` (see its header comment).

use std::ffi::{c_char, c_int, CString};

// The C++ code is in this crate's static library, linked with the crate.
use multiprobe_test_targets as _;

extern "C" {
    fn mp_cpp_rets_main(argc: c_int, argv: *mut *mut c_char) -> c_int;
}

fn main() {
    let args: Vec<CString> = std::env::args()
        .map(|a| CString::new(a).expect("no NUL in arguments"))
        .collect();
    let mut argv: Vec<*mut c_char> = args.iter().map(|a| a.as_ptr().cast_mut()).collect();
    argv.push(std::ptr::null_mut());
    // SAFETY: argv is a NULL-terminated array of NUL-terminated strings that outlive
    // the call, as a C main expects; the C code only reads them.
    let code = unsafe { mp_cpp_rets_main(args.len() as c_int, argv.as_mut_ptr()) };
    use std::io::Write;
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}
