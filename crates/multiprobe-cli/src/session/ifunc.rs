//! The implementation an indirect function (GNU IFUNC) resolves to in a traced program
//! when its library keeps no GOT slot of its own for it — glibc's `strstr`, `strncat`,
//! `__memcpy_chk`: the choice multiprobe's own loader made for the same file.
//!
//! Why that is the program's choice too: an x86-64 glibc resolver picks by the CPU's
//! features and the `GLIBC_TUNABLES` environment variable, nothing else, so the same
//! file on the same machine with the same tunables picks the same implementation. It is
//! used only when all of that holds: the file multiprobe maps is the program's (same
//! device and inode), the implementation `dlsym` gives lies in that file's own code (a
//! resolver returning the vDSO's function, as `time`'s does, is not taken), and the
//! program's `GLIBC_TUNABLES` is multiprobe's. Otherwise the caller says it cannot tell.

use std::sync::{Arc, OnceLock};

use multiprobe_symbols::{Maps, ProcessSymbols, SymbolCache};

/// This process's files and symbols, read once: the libraries whose choices are asked
/// for were mapped at its start, and a pattern asks for dozens of them.
fn ours() -> Option<&'static ProcessSymbols> {
    static OURS: OnceLock<Option<ProcessSymbols>> = OnceLock::new();
    OURS.get_or_init(|| {
        let maps = Maps::read(0).ok()?;
        Some(ProcessSymbols::from_maps(
            maps,
            Arc::new(SymbolCache::default()),
        ))
    })
    .as_ref()
}

/// The file address (in the file's own virtual addresses) of the implementation that
/// `name`, an indirect function of the file with device and inode `file`, resolves to
/// in this process; `None` if this process does not map that file or its choice cannot
/// be taken for another process's (module docs).
pub(crate) fn own_choice(file: (u64, u64), name: &str) -> Option<u64> {
    let syms = ours()?;
    let region = syms
        .maps()
        .regions
        .iter()
        .find(|r| r.exec && r.file_id() == Some(file))?;
    let (_, bias) = syms.file_symbols(&region.path)?;
    let c_name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; RTLD_DEFAULT searches the global scope. Looking a
    // symbol up runs an IFUNC's resolver, which only reads CPU features.
    let addr = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c_name.as_ptr()) } as u64;
    let at = syms.maps().find(addr)?;
    (addr != 0 && at.exec && at.file_id() == Some(file)).then(|| addr.wrapping_sub(bias))
}

/// Where indirect function `name` of `file` (a path `syms` maps) is implemented in
/// process `pid`, whose files `syms` holds, by multiprobe's own choice: `None` unless
/// that choice is the program's too (module docs).
pub(crate) fn in_process(syms: &ProcessSymbols, pid: i32, file: &str, name: &str) -> Option<u64> {
    let id = syms
        .maps()
        .regions
        .iter()
        .find(|r| r.path == file)?
        .file_id()?;
    let (_, bias) = syms.file_symbols(file)?;
    let vaddr = own_choice(id, name)?;
    same_tunables(pid).then(|| vaddr.wrapping_add(bias))
}

/// Whether process `pid` runs with multiprobe's `GLIBC_TUNABLES` (both unset counts).
fn same_tunables(pid: i32) -> bool {
    let Ok(env) = std::fs::read(format!("/proc/{pid}/environ")) else {
        return false;
    };
    let theirs = env
        .split(|&b| b == 0)
        .find_map(|kv| kv.strip_prefix(b"GLIBC_TUNABLES="));
    let ours = std::env::var_os("GLIBC_TUNABLES");
    theirs
        == ours
            .as_ref()
            .map(|v| std::os::unix::ffi::OsStrExt::as_bytes(v.as_os_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strstr_resolves_to_the_implementation_this_process_calls() {
        let maps = Maps::read(0).unwrap();
        let libc = maps
            .regions
            .iter()
            .find(|r| r.exec && r.path.ends_with("/libc.so.6"))
            .expect("libc is mapped");
        let id = libc.file_id().unwrap();
        let vaddr = own_choice(id, "strstr").expect("strstr's implementation");
        let syms = ProcessSymbols::from_maps(maps.clone(), Arc::new(SymbolCache::default()));
        let (_, bias) = syms.file_symbols(&libc.path).unwrap();
        // What a call through the GOT reaches here.
        let called = libc::strstr as *const () as u64;
        assert_eq!(vaddr + bias, called);
        // SAFETY: getpid has no preconditions.
        let me = unsafe { libc::getpid() };
        assert_eq!(in_process(&syms, me, &libc.path, "strstr"), Some(called));
        // Not an indirect function of that file, or not a function: nothing.
        assert_eq!(own_choice(id, "no_such_function_here"), None);
        assert_eq!(own_choice((0, 1), "strstr"), None);
        // This process has its own tunables.
        assert!(same_tunables(me));
    }
}
