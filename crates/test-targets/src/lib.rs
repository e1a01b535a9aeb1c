//! Small programs that multiprobe's process backends and command are tested against,
//! and [`bin`], which finds (building them on first use) their executables.
//!
//! Every program prints what it did — its own call counts, per thread where it has
//! threads — so a test can compare a probe's hit counts with the program's own account,
//! and a probed run's output with an unprobed one. The functions meant to be probed are
//! `#[no_mangle] extern "C"` and `#[inline(never)]`, so they have a symbol and a
//! System V argument layout. The `mp-c-*` programs are written in C (`c/*.c`, built by
//! the cc crate into a static library that a small Rust `main` calls), where a fault
//! scenario needs what C does plainly (fork storms, seccomp filters, signal masks).

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("multiprobe-test-targets supports x86-64 Linux only");

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// A signal handler with the `SA_SIGINFO` signature.
pub type SigInfoHandler = extern "C" fn(i32, *mut libc::siginfo_t, *mut libc::c_void);

/// Install `handler` for `sig` with `SA_SIGINFO` and `flags`, no other signal blocked
/// while it runs; panics if `sigaction` fails.
///
/// # Safety
/// `handler` must do only what is safe in a signal handler, and whatever it does to the
/// interrupted context (the `ucontext_t` it is given) must be sound for the code it
/// interrupts.
pub unsafe fn install_siginfo_handler(sig: i32, handler: SigInfoHandler, flags: i32) {
    // SAFETY: a zeroed sigaction is a valid start; the caller vouches for the handler.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | flags;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(sig, &sa, std::ptr::null_mut()), 0);
    }
}

/// Spawn `cmd` with stdin and stdout piped and wait for the first line it prints (a
/// program started with `--wait` says `ready PID`): the child, the rest of its stdout,
/// and that line.
///
/// # Panics
/// If it cannot be started or its stdout cannot be read.
pub fn spawn_until_first_line(
    cmd: &mut Command,
) -> (
    std::process::Child,
    std::io::BufReader<std::process::ChildStdout>,
    String,
) {
    use std::io::BufRead;
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout piped"));
    let mut line = String::new();
    out.read_line(&mut line).expect("read the first line");
    (child, out, line)
}

/// Names of the programs, as built.
pub const PROGRAMS: [&str; 15] = [
    "mp-single",
    "mp-threads",
    "mp-forker",
    "mp-signals",
    "mp-fault",
    "mp-bench",
    "mp-dlopen",
    "mp-c-forkrace",
    "mp-c-trapmask",
    "mp-c-seccomp",
    "mp-c-unmapxol",
    "mp-c-forktree",
    "mp-c-rets",
    "mp-cpp-throwret",
    "mp-c-collect",
];

/// Path of the test program `name` (one of [`PROGRAMS`]).
///
/// Cargo builds the binaries of a package only for that package's own tests, so tests
/// elsewhere in the workspace call this: the first call in a process runs
/// `cargo build -p multiprobe-test-targets --bins` into the target directory and profile
/// of the running test or bench executable (cargo's own locking makes concurrent callers
/// safe), later calls just return the path.
///
/// # Panics
/// If the build fails, or `name` is not a known program.
pub fn bin(name: &str) -> PathBuf {
    assert!(PROGRAMS.contains(&name), "unknown test program {name}");
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(build).join(name)
}

fn build() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // <target>/<profile>/deps/<exe>, or <target>/<profile>/<exe> for a plain binary.
    let mut profile_dir = exe.parent().expect("exe has a parent").to_path_buf();
    if profile_dir.file_name().is_some_and(|n| n == "deps") {
        profile_dir.pop();
    }
    let release = profile_dir.file_name().is_some_and(|n| n == "release");
    let target_dir = profile_dir.parent().unwrap_or(Path::new("target"));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args(["build", "--quiet", "--bins", "--manifest-path"])
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir);
    if release {
        cmd.arg("--release");
    }
    let status = cmd.status().expect("run cargo to build the test programs");
    assert!(
        status.success(),
        "building the test programs failed: {status}"
    );
    profile_dir
}

/// The `main` of an `mp-c-*` program: declares the C program's `main` (`$c_main`, in this
/// crate's static library), calls it with the process's arguments as C's `argc`/`argv`,
/// flushes stdout and exits with its status.
#[macro_export]
macro_rules! c_program {
    ($c_main:ident) => {
        use std::ffi::{c_char, c_int, CString};

        // The C code is in this crate's static library, linked with the crate.
        use multiprobe_test_targets as _;

        extern "C" {
            fn $c_main(argc: c_int, argv: *mut *mut c_char) -> c_int;
        }

        fn main() {
            let args: Vec<CString> = std::env::args()
                .map(|a| CString::new(a).expect("no NUL in arguments"))
                .collect();
            let mut argv: Vec<*mut c_char> = args.iter().map(|a| a.as_ptr().cast_mut()).collect();
            argv.push(std::ptr::null_mut());
            // SAFETY: argv is a NULL-terminated array of NUL-terminated strings that
            // outlive the call, as a C main expects; the C code only reads them.
            let code = unsafe { $c_main(args.len() as c_int, argv.as_mut_ptr()) };
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::process::exit(code);
        }
    };
}

pub mod alloc_count;

/// Helpers the programs share.
pub mod util {
    /// The calling thread's kernel thread id.
    pub fn gettid() -> i32 {
        // SAFETY: gettid has no preconditions and cannot fail.
        unsafe { libc::gettid() }
    }

    /// Parse `--name value` from the arguments, or `default`.
    pub fn arg<T: std::str::FromStr>(name: &str, default: T) -> T {
        let args: Vec<String> = std::env::args().collect();
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .map(|v| {
                v.parse()
                    .unwrap_or_else(|_| panic!("bad value for {name}: {v}"))
            })
            .unwrap_or(default)
    }

    /// Whether the flag `name` is present.
    pub fn flag(name: &str) -> bool {
        std::env::args().any(|a| a == name)
    }

    /// With `--wait`: print `ready PID` and block until a line arrives on stdin, so a
    /// test can attach first. The program calls [`maybe_wait_end`] before it exits.
    pub fn maybe_wait() {
        use std::io::{BufRead, Write};
        if flag("--wait") {
            println!("ready {}", std::process::id());
            std::io::stdout().flush().expect("flush");
            let mut line = String::new();
            std::io::stdin().lock().read_line(&mut line).expect("stdin");
        }
    }

    /// With `--wait`: flush stdout and block until stdin is closed (or a line arrives),
    /// so a test can look at the process after its work and before it exits. Exits with
    /// 99 if that read fails (a tracer that broke the blocked system call, say).
    pub fn maybe_wait_end() {
        use std::io::{BufRead, Write};
        if flag("--wait") {
            std::io::stdout().flush().expect("flush");
            let mut line = String::new();
            if let Err(e) = std::io::stdin().lock().read_line(&mut line) {
                eprintln!("the final read failed: {e}");
                std::process::exit(99);
            }
        }
    }
}

/// C and C++ functions linked into the calling executable, for in-process tests of
/// control flow that Rust does not offer (`longjmp`, C++ exceptions, `backtrace(3)`):
/// each is `extern "C"`, not inlined, and makes its calls without sibling-call
/// optimization. Safe wrappers; the C++ exception never leaves `catch_odd`.
pub mod inproc {
    use std::os::raw::{c_int, c_long, c_void};

    extern "C" {
        fn mp_rp_setjmp_run(x: c_long) -> c_long;
        fn mp_rp_bt_outer(buf: *mut *mut c_void, n: c_int) -> c_int;
        fn mp_rp_catch(x: c_long) -> c_long;
        fn mp_rp_co_run(n: c_long, a_above: c_int) -> c_long;
    }

    /// The entry addresses of the functions, by name: for probes.
    pub fn addr(name: &str) -> u64 {
        extern "C" {
            fn mp_rp_jumper(x: c_long) -> c_long;
            fn mp_rp_jump_via(x: c_long) -> c_long;
            fn mp_rp_bt_inner(buf: *mut *mut c_void, n: c_int) -> c_int;
            fn mp_rp_thrower(x: c_long) -> c_long;
            fn mp_rp_through(x: c_long) -> c_long;
            fn mp_rp_co_resume(x: c_long) -> c_long;
            fn mp_rp_co_yield(x: c_long) -> c_long;
        }
        match name {
            "mp_rp_setjmp_run" => mp_rp_setjmp_run as *const () as u64,
            "mp_rp_jump_via" => mp_rp_jump_via as *const () as u64,
            "mp_rp_jumper" => mp_rp_jumper as *const () as u64,
            "mp_rp_bt_outer" => mp_rp_bt_outer as *const () as u64,
            "mp_rp_bt_inner" => mp_rp_bt_inner as *const () as u64,
            "mp_rp_catch" => mp_rp_catch as *const () as u64,
            "mp_rp_through" => mp_rp_through as *const () as u64,
            "mp_rp_thrower" => mp_rp_thrower as *const () as u64,
            "mp_rp_co_resume" => mp_rp_co_resume as *const () as u64,
            "mp_rp_co_yield" => mp_rp_co_yield as *const () as u64,
            _ => panic!("no in-process target {name}"),
        }
    }

    /// `setjmp`, then two calls down (`mp_rp_jump_via`, `mp_rp_jumper`), whose inner one
    /// `longjmp`s back for `x >= 0`: returns `1000 + x + 1`.
    pub fn setjmp_run(x: i64) -> i64 {
        // SAFETY: plain C code; the jump stays inside it.
        unsafe { mp_rp_setjmp_run(x) }
    }

    /// Two coroutines switching stacks inside calls (`c/coro.h`): coroutine A calls
    /// `mp_rp_co_resume(i)` for `i = 0..=n`, each of which switches to B inside the call;
    /// B calls `mp_rp_co_yield(i)` for `i = 0..n`, each of which switches back to A inside
    /// the call. The two stacks are neighbours; `a_above` puts A's above B's. Returns
    /// `n(n-1) + 3n(n-1)/2 + n`. One caller at a time (the contexts are static).
    pub fn coroutines(n: i64, a_above: bool) -> i64 {
        // SAFETY: plain C code; it ends back on the caller's stack.
        unsafe { mp_rp_co_run(n, c_int::from(a_above)) }
    }

    /// `backtrace(3)` called two calls down (`mp_rp_bt_outer` → `mp_rp_bt_inner`): the
    /// return addresses it found, innermost first.
    #[inline(never)]
    pub fn backtrace(max: usize) -> Vec<u64> {
        let mut buf = vec![std::ptr::null_mut::<c_void>(); max];
        // SAFETY: `buf` holds `max` pointers.
        let n = unsafe { mp_rp_bt_outer(buf.as_mut_ptr(), max as c_int) };
        buf.truncate(n.max(0) as usize);
        buf.into_iter().map(|p| p as u64).collect()
    }

    /// `mp_rp_catch`: `mp_rp_through` → `mp_rp_thrower`, which throws a C++ exception
    /// for odd `x` (through a destructor in `mp_rp_through`), caught in `mp_rp_catch`:
    /// `-1000 - x` then, else `2x + 20 + x % 3`.
    pub fn catch_odd(x: i64) -> i64 {
        // SAFETY: plain C++ code that catches its own exception.
        unsafe { mp_rp_catch(x) }
    }
}
