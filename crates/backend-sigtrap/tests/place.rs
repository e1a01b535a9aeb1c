//! Probes placed the way a program names its code (a function pointer, a symbol,
//! `library:symbol`) and `Hit::return_now` ending the probed call with a value.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use multiprobe_backend_sigtrap::{fn_addr, resolve, ResolveError};
use multiprobe_symbols::ResolveError as Why;

#[inline(never)]
fn answer(x: u64) -> u64 {
    std::hint::black_box(x) + 1
}

#[no_mangle]
#[inline(never)]
pub extern "C" fn mp_sigtrap_place_c(x: u64) -> u64 {
    std::hint::black_box(x) * 3
}

#[test]
fn a_rust_function_pointer_places_a_probe_at_its_entry() {
    let reg = multiprobe_backend_sigtrap::registry();
    let f = answer as fn(u64) -> u64;
    assert_eq!(fn_addr(f), answer as *const () as u64);
    let seen = Arc::new(AtomicU64::new(0));
    let s = Arc::clone(&seen);
    let probe = reg
        .register(fn_addr(f), move |h| s.store(h.arg(0).unwrap(), Relaxed))
        .unwrap();
    assert_eq!(answer(std::hint::black_box(41)), 42);
    assert_eq!(seen.load(Relaxed), 41);
    assert_eq!(probe.unregister().unwrap().hits, 1);
}

#[test]
fn return_now_at_a_function_entry_ends_the_call_with_the_value() {
    let reg = multiprobe_backend_sigtrap::registry();
    let f = mp_sigtrap_place_c as extern "C" fn(u64) -> u64;
    let probe = reg
        .register(fn_addr(f), |h| {
            let _ = h.return_now(h.arg(0).unwrap() + 1000);
        })
        .unwrap();
    // Called through the pointer and black-boxed: the optimizer may not fold it.
    let call = std::hint::black_box(f);
    assert_eq!(call(7), 1007, "the handler's value, not 7 * 3");
    assert_eq!(call(8), 1008);
    let stats = probe.unregister().unwrap();
    assert_eq!(stats.hits, 2);
    assert_eq!(call(7), 21, "unprobed again");
}

#[test]
fn a_symbol_of_the_program_and_a_library_symbol_resolve_to_their_entries() {
    let f = mp_sigtrap_place_c as extern "C" fn(u64) -> u64;
    assert_eq!(resolve("mp_sigtrap_place_c").unwrap(), fn_addr(f));
    // Rust functions by their demangled path.
    assert_eq!(
        resolve("place::answer").unwrap(),
        fn_addr(answer as fn(u64) -> u64)
    );

    // libc's getppid, probed by name, answers what the handler says.
    let reg = multiprobe_backend_sigtrap::registry();
    // SAFETY: getppid has no preconditions.
    let ppid = || unsafe { libc::getppid() };
    let before = ppid();
    let probe = reg
        .register(resolve("libc:getppid").unwrap(), |h| {
            let _ = h.return_now(4242);
        })
        .unwrap();
    assert_eq!(ppid(), 4242);
    assert_eq!(probe.unregister().unwrap().hits, 1);
    assert_eq!(ppid(), before);
}

#[test]
fn an_indirect_libc_function_resolves_to_the_implementation_calls_reach() {
    // `strchrnul` is a GNU indirect function in glibc on x86-64; calls through the GOT
    // (which is what a function pointer to it holds) reach the chosen implementation.
    let direct = libc::strchrnul
        as unsafe extern "C" fn(*const libc::c_char, libc::c_int) -> *mut libc::c_char;
    assert_eq!(resolve("libc:strchrnul").unwrap(), fn_addr(direct));
}

#[test]
fn names_that_do_not_resolve_say_why() {
    match resolve("libc:mp_no_such_function") {
        Err(ResolveError::Symbol(Why::UnknownSymbol { name, .. })) => {
            assert_eq!(name, "mp_no_such_function")
        }
        other => panic!("{other:?}"),
    }
    match resolve("libmp_not_loaded:f") {
        Err(ResolveError::Symbol(Why::UnknownLibrary { library, .. })) => {
            assert_eq!(library, "libmp_not_loaded")
        }
        other => panic!("{other:?}"),
    }
}
