//! Which function an address is in (through `multiprobe-symbols`: `.symtab`/`.dynsym` of
//! the mapped files, since `dladdr` knows only exported symbols and most Rust functions
//! are not, and their unwind entries for code without a symbol), which branches of a
//! file target a range, and which code belongs to the probe machinery itself. Thread
//! context only.
//!
//! Used for two checks at arm time: the instruction-boundary check (decode from the
//! function's start) and refusing the probe machinery's own code (see [`reserved`]).

use std::sync::{Arc, OnceLock};

use multiprobe_symbols::{BranchInto, Located, Maps, ProcessSymbols, SymbolCache};

/// The symbol tables of this process's files, parsed once.
pub(crate) fn cache() -> Arc<SymbolCache> {
    static CACHE: OnceLock<Arc<SymbolCache>> = OnceLock::new();
    Arc::clone(CACHE.get_or_init(Default::default))
}

/// The function containing `addr` in this process, if its file says: its symbol, or
/// the range of its unwind entry (a stripped libc's string functions have no symbol).
pub(crate) fn enclosing(addr: u64, maps: &Maps) -> Option<Located> {
    ProcessSymbols::from_maps(maps.clone(), cache()).function_bounds(addr)
}

/// A direct branch of any code of the file holding `range` into it.
pub(crate) fn branch_into(range: std::ops::Range<u64>, maps: &Maps) -> BranchInto {
    ProcessSymbols::from_maps(maps.clone(), cache()).branch_into(range)
}

/// The landing pads of the function starting at `start`, from its file's unwind tables.
pub(crate) fn landing_pads(start: u64, maps: &Maps) -> multiprobe_symbols::LandingPads {
    ProcessSymbols::from_maps(maps.clone(), cache()).landing_pads(start)
}

/// Crates whose code runs on the trap path: probing it would trap inside dispatch.
const RESERVED_CRATES: [&str; 3] = [
    "multiprobe_core",
    "multiprobe_backend_sigtrap",
    "multiprobe_x86",
];

/// C library functions the trap path may call (directly or as compiler-emitted
/// `memcpy`/`memset`), and the signal-return trampoline.
const RESERVED_C: [&str; 12] = [
    "memcpy",
    "memmove",
    "memset",
    "__errno_location",
    "__restore_rt",
    "syscall",
    "pthread_sigmask",
    "sigprocmask",
    "pthread_setspecific",
    "getpid",
    "sigaction",
    "__sigaction",
];

/// Entry addresses of the C functions in [`RESERVED_C`] as this process resolved them
/// (`dlsym` resolves an ifunc such as `memcpy` to the implementation actually called,
/// whose local symbol a stripped libc does not name).
pub(crate) fn reserved_entry(addr: u64) -> bool {
    static ENTRIES: OnceLock<Vec<u64>> = OnceLock::new();
    ENTRIES
        .get_or_init(|| {
            RESERVED_C
                .iter()
                .filter_map(|n| {
                    let c = std::ffi::CString::new(*n).ok()?;
                    // SAFETY: a NUL-terminated name; RTLD_DEFAULT searches the global scope.
                    let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) };
                    (!p.is_null()).then_some(p as u64)
                })
                .collect()
        })
        .contains(&addr)
}

/// If `sym` is part of the probe machinery, which part.
pub(crate) fn reserved(sym: &Located) -> Option<&'static str> {
    if let Some(c) = RESERVED_CRATES.iter().find(|c| sym.name.contains(*c)) {
        return Some(c);
    }
    let n = sym.name.split('@').next().unwrap_or("");
    // The string functions come in many ifunc variants (`__memmove_avx_unaligned`...).
    if n.starts_with("__mem") || n.starts_with("__libc_mem") {
        return Some("libc string function");
    }
    RESERVED_C
        .iter()
        .find(|c| **c == n)
        .map(|_| "libc function on the trap path")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[inline(never)]
    fn some_function(x: u64) -> u64 {
        std::hint::black_box(x).wrapping_mul(3)
    }

    #[test]
    fn finds_rust_functions_and_flags_our_own_code_as_reserved() {
        let maps = Maps::read(0).unwrap();
        let enclosing = |a| enclosing(a, &maps);
        let a = some_function as *const () as u64;
        let s = enclosing(a).expect("the test binary has a symbol table");
        assert_eq!(s.start, a);
        assert!(s.size > 0);
        assert!(s.name.contains("some_function"), "{}", s.name);
        // Inside the function, the same symbol.
        assert_eq!(enclosing(a + 1).unwrap().start, a);
        // This test module is in our crate: reserved.
        assert_eq!(reserved(&s), Some("multiprobe_backend_sigtrap"));
        // A libc function found through the dynamic symbol table.
        let w = enclosing(libc::write as *const () as u64).expect("libc has .dynsym");
        assert_eq!(reserved(&w), None, "{}", w.name);
        let named = |n: &str| Located {
            name: n.to_string(),
            start: 0,
            size: 1,
            file: String::new(),
        };
        assert!(reserved(&named("__memmove_avx_unaligned_erms")).is_some());
        assert!(reserved(&named("memset@GLIBC_2.2.5")).is_some());
        assert!(reserved(&named("_ZN15multiprobe_core8dispatch3pre17h0E")).is_some());
        assert_eq!(reserved(&named("my_memory_fn")), None);
        assert_eq!(enclosing(8), None);
        // SAFETY: a NUL-terminated name.
        let memcpy = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"memcpy".as_ptr()) } as u64;
        assert!(reserved_entry(memcpy));
        assert!(!reserved_entry(a));
    }
}
