//! Where an in-process probe goes, named the way a program names its code: a function
//! pointer ([`fn_addr`]) or a symbol, `name` or `library:name` ([`resolve`]). Thread
//! context only (resolving reads `/proc/self/maps` and symbol tables).

use std::ffi::CString;

use multiprobe_symbols::{split_library, ProcessSymbols};

/// A function pointer type whose value is the address of code in this process: `fn`,
/// `unsafe fn`, `extern "C" fn` and `unsafe extern "C" fn` of up to eight arguments.
///
/// A function item has a type of its own; cast it to its pointer type first
/// (`work as fn(u64) -> u64`). For borrowed arguments, write the lifetime out as
/// `'static` (`parse as fn(&'static str) -> u64`): a pointer type with an elided
/// lifetime is higher-ranked (`for<'a> fn(&'a str)`), which this trait does not cover,
/// and the cast changes nothing but the type.
pub trait FnPtr: Copy + sealed::Sealed {
    /// The address of the function's first instruction.
    fn addr(self) -> u64;
}

mod sealed {
    pub trait Sealed {}
}

macro_rules! fn_ptr {
    ($($arg:ident),*) => {
        fn_ptr!(@one fn($($arg),*) -> R; $($arg),*);
        fn_ptr!(@one unsafe fn($($arg),*) -> R; $($arg),*);
        fn_ptr!(@one extern "C" fn($($arg),*) -> R; $($arg),*);
        fn_ptr!(@one unsafe extern "C" fn($($arg),*) -> R; $($arg),*);
    };
    (@one $ty:ty; $($arg:ident),*) => {
        impl<R, $($arg),*> sealed::Sealed for $ty {}
        impl<R, $($arg),*> FnPtr for $ty {
            #[inline]
            fn addr(self) -> u64 {
                self as *const () as u64
            }
        }
    };
}

fn_ptr!();
fn_ptr!(A);
fn_ptr!(A, B);
fn_ptr!(A, B, C);
fn_ptr!(A, B, C, D);
fn_ptr!(A, B, C, D, E);
fn_ptr!(A, B, C, D, E, F);
fn_ptr!(A, B, C, D, E, F, G);
fn_ptr!(A, B, C, D, E, F, G, H);

/// The address of the function `f` points to: what to register a probe at its entry.
///
/// ```
/// use multiprobe_backend_sigtrap::fn_addr;
/// fn work(x: u64) -> u64 { x + 1 }
/// assert_eq!(fn_addr(work as fn(u64) -> u64), work as *const () as u64);
/// ```
pub fn fn_addr(f: impl FnPtr) -> u64 {
    f.addr()
}

/// Why [`resolve`] found no address (the same shape as the ptrace backend's
/// `Tracer::resolve` error).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ResolveError {
    /// The name does not resolve in this process (the reason, with what exists: no
    /// such library or function, ambiguous, ...).
    #[error("{0}")]
    Symbol(#[from] multiprobe_symbols::ResolveError),
    /// This process's maps could not be read.
    #[error("reading /proc/self/maps: {0}")]
    Maps(#[source] std::io::Error),
}

/// For `?` in code that reports the core's errors; the structured reason is in the
/// message.
impl From<ResolveError> for multiprobe_core::Error {
    fn from(e: ResolveError) -> Self {
        match e {
            ResolveError::Maps(e) => multiprobe_core::Error::io("reading /proc/self/maps", e),
            ResolveError::Symbol(e) => multiprobe_core::Error::Backend(e.to_string()),
        }
    }
}

/// The entry address of the function `spec` names in this process: `name` (searched in
/// the program, then in every loaded library) or `library:name` (`"libc:getppid"`;
/// a library is named by its file name, a prefix of it up to a `.` or `-`, or its
/// path), as `multiprobe-symbols` resolves names for the other backends. Rust
/// functions go by their demangled path (`mycrate::module::function`).
///
/// A GNU indirect function (`libc:strlen`) resolves to the implementation the dynamic
/// loader chose for this process.
pub fn resolve(spec: &str) -> Result<u64, ResolveError> {
    let syms = ProcessSymbols::from_maps(
        multiprobe_symbols::Maps::read(0).map_err(ResolveError::Maps)?,
        crate::symbols::cache(),
    );
    let (library, name) = match split_library(spec) {
        Some((l, n)) => (Some(l), n),
        None => (None, spec),
    };
    match syms.resolve(library, name) {
        Ok(found) => Ok(found.start),
        Err(e @ multiprobe_symbols::ResolveError::IndirectFunction { .. }) => {
            chosen(&e).ok_or(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// The implementation the loader chose for the indirect function `e` names: `dlsym` in
/// that library runs the same selection (and returns what calls reach).
fn chosen(e: &multiprobe_symbols::ResolveError) -> Option<u64> {
    let multiprobe_symbols::ResolveError::IndirectFunction { name, file, .. } = e else {
        return None;
    };
    let (path, symbol) = (
        CString::new(file.as_str()).ok()?,
        CString::new(name.as_str()).ok()?,
    );
    // SAFETY: NUL-terminated strings; RTLD_NOLOAD only looks up a library that is
    // already loaded (it loads nothing, so runs no initializer).
    let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_LAZY | libc::RTLD_NOLOAD) };
    if handle.is_null() {
        return None;
    }
    // SAFETY: a handle dlopen returned, a NUL-terminated name.
    let p = unsafe { libc::dlsym(handle, symbol.as_ptr()) };
    // SAFETY: drops the reference RTLD_NOLOAD took; the library stays loaded.
    unsafe { libc::dlclose(handle) };
    (!p.is_null()).then_some(p as u64)
}
