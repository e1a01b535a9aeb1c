//! Which function an address is in, from the symbol tables of the loaded ELF objects.
//!
//! `dladdr` only knows exported dynamic symbols, and most Rust functions are not
//! exported, so the object's file is read with the `object` crate (`.symtab`, else
//! `.dynsym`), once per file, and cached. The object containing an address and its load
//! bias come from `dl_iterate_phdr`. Thread context only (reads files, allocates).
//!
//! Used for two checks at arm time: the instruction-boundary check (decode from the
//! function's start) and refusing the probe machinery's own code (see [`reserved`]).

use std::collections::HashMap;
use std::ffi::CStr;
use std::sync::{Arc, Mutex, OnceLock};

use object::{Object, ObjectSymbol, SymbolKind};

/// A function symbol at run-time addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Symbol {
    pub(crate) name: Arc<str>,
    pub(crate) start: u64,
    pub(crate) size: u64,
}

#[derive(Debug)]
struct FileSyms {
    /// Sorted by start (file virtual addresses).
    syms: Vec<(u64, u64, Arc<str>)>,
}

impl FileSyms {
    fn load(path: &str) -> Option<FileSyms> {
        let data = std::fs::read(path).ok()?;
        let file = object::File::parse(&*data).ok()?;
        let mut syms: Vec<(u64, u64, Arc<str>)> = Vec::new();
        let mut add = |s: object::Symbol<'_, '_>| {
            if s.kind() == SymbolKind::Text && s.size() > 0 && s.is_definition() {
                if let Ok(n) = s.name() {
                    syms.push((s.address(), s.size(), Arc::from(n)));
                }
            }
        };
        file.symbols().for_each(&mut add);
        file.dynamic_symbols().for_each(&mut add);
        syms.sort_by_key(|s| (s.0, std::cmp::Reverse(s.1)));
        syms.dedup_by_key(|s| s.0);
        Some(FileSyms { syms })
    }

    fn find(&self, vaddr: u64) -> Option<&(u64, u64, Arc<str>)> {
        let i = self.syms.partition_point(|s| s.0 <= vaddr);
        let s = self.syms.get(i.checked_sub(1)?)?;
        (vaddr < s.0 + s.1).then_some(s)
    }
}

fn cache() -> &'static Mutex<HashMap<String, Option<Arc<FileSyms>>>> {
    static C: OnceLock<Mutex<HashMap<String, Option<Arc<FileSyms>>>>> = OnceLock::new();
    C.get_or_init(Default::default)
}

/// The loaded object containing `addr`: (file path, load bias).
fn object_of(addr: u64) -> Option<(String, u64)> {
    struct Q {
        addr: u64,
        found: Option<(String, u64)>,
    }
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid `info` for the duration of the call, and
        // `data` is the `Q` passed to `dl_iterate_phdr` below.
        let (info, q) = unsafe { (&*info, &mut *data.cast::<Q>()) };
        let bias = info.dlpi_addr;
        for i in 0..usize::from(info.dlpi_phnum) {
            // SAFETY: `dlpi_phdr` points to `dlpi_phnum` program headers.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            let start = bias.wrapping_add(ph.p_vaddr);
            if ph.p_type == libc::PT_LOAD && start <= q.addr && q.addr < start + ph.p_memsz {
                let name = if info.dlpi_name.is_null() {
                    ""
                } else {
                    // SAFETY: a NUL-terminated string owned by the loader.
                    unsafe { CStr::from_ptr(info.dlpi_name) }
                        .to_str()
                        .unwrap_or("")
                };
                let path = if name.is_empty() {
                    "/proc/self/exe"
                } else {
                    name
                };
                q.found = Some((path.to_string(), bias));
                return 1;
            }
        }
        0
    }
    let mut q = Q { addr, found: None };
    // SAFETY: `cb` matches the callback type and only uses `q` during the call.
    unsafe { libc::dl_iterate_phdr(Some(cb), (&mut q as *mut Q).cast()) };
    q.found
}

/// The function symbol containing `addr`, if its object has a symbol table that says.
pub(crate) fn enclosing(addr: u64) -> Option<Symbol> {
    let (path, bias) = object_of(addr)?;
    let syms = {
        let mut c = cache().lock().unwrap_or_else(|p| p.into_inner());
        c.entry(path.clone())
            .or_insert_with(|| FileSyms::load(&path).map(Arc::new))
            .clone()?
    };
    let (start, size, name) = syms.find(addr.wrapping_sub(bias))?;
    Some(Symbol {
        name: Arc::clone(name),
        start: start.wrapping_add(bias),
        size: *size,
    })
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
pub(crate) fn reserved(sym: &Symbol) -> Option<&'static str> {
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
        let named = |n: &str| Symbol {
            name: Arc::from(n),
            start: 0,
            size: 1,
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
