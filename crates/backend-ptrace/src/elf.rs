//! Function symbols of mapped ELF files (`.symtab` and `.dynsym`), to validate probe
//! addresses (which function, where it starts, so the instruction boundary can be
//! checked) and to resolve names.
//!
//! Addresses in a [`Symbols`] are the file's own virtual addresses; a mapping's
//! [`Symbols::bias`] turns them into the tracee's.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::maps::{Maps, Region};

/// A function symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Func {
    pub name: String,
    /// File virtual address.
    pub addr: u64,
    pub size: u64,
}

/// The function symbols and loadable segments of one ELF file.
#[derive(Debug, Default)]
pub struct Symbols {
    /// Sorted by address; zero-sized symbols dropped; duplicates (a name in both
    /// tables) kept once.
    funcs: Vec<Func>,
    /// `(vaddr, file offset, file size)` of every `PT_LOAD`.
    segments: Vec<(u64, u64, u64)>,
}

impl Symbols {
    pub fn parse(data: &[u8]) -> Result<Symbols, String> {
        let file = object::File::parse(data).map_err(|e| e.to_string())?;
        let mut funcs: Vec<Func> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0 && s.is_definition())
            .filter_map(|s| {
                Some(Func {
                    name: s.name().ok()?.to_string(),
                    addr: s.address(),
                    size: s.size(),
                })
            })
            .collect();
        funcs.sort_by(|a, b| (a.addr, &a.name).cmp(&(b.addr, &b.name)));
        funcs.dedup();
        let segments = file
            .segments()
            .map(|s| {
                let (off, size) = s.file_range();
                (s.address(), off, size)
            })
            .collect();
        Ok(Symbols { funcs, segments })
    }

    /// The function whose `[addr, addr + size)` holds the file address `vaddr`.
    pub fn containing(&self, vaddr: u64) -> Option<&Func> {
        let i = self.funcs.partition_point(|f| f.addr <= vaddr);
        // Functions do not overlap, except aliases and the odd nested symbol: a few
        // candidates below `vaddr` are enough.
        self.funcs[..i]
            .iter()
            .rev()
            .take(8)
            .find(|f| vaddr < f.addr + f.size)
    }

    /// The function called `name` (the first, if several).
    pub fn by_name(&self, name: &str) -> Option<&Func> {
        self.funcs.iter().find(|f| f.name == name)
    }

    /// What to add to a file address to get the tracee's address, for the file mapped
    /// at `region`.
    pub fn bias(&self, region: &Region) -> Option<u64> {
        const PAGE: u64 = 4096;
        // A segment is mapped from its page-rounded offset at its page-rounded address.
        // Two segments may share a file page (the exec one starts right after the
        // read-only one), so prefer the segment that starts this mapping; a mapping
        // split later (RELRO) starts inside its segment.
        let exact = self
            .segments
            .iter()
            .find(|&&(_, off, _)| off & !(PAGE - 1) == region.offset)
            .map(|&(vaddr, _, _)| region.start.wrapping_sub(vaddr & !(PAGE - 1)));
        exact.or_else(|| {
            let &(vaddr, off, _) = self
                .segments
                .iter()
                .find(|&&(_, off, size)| off <= region.offset && region.offset < off + size)?;
            Some(
                region
                    .start
                    .wrapping_sub(region.offset)
                    .wrapping_add(off)
                    .wrapping_sub(vaddr),
            )
        })
    }
}

/// Symbols of files by path, parsed once.
#[derive(Debug, Default)]
pub struct SymbolCache {
    files: Mutex<HashMap<String, Arc<Symbols>>>,
}

impl SymbolCache {
    /// The symbols of `path` (an empty table if it cannot be read or parsed: probing
    /// then goes on without symbol checks).
    pub fn get(&self, path: &str) -> Arc<Symbols> {
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = files.get(path) {
            return Arc::clone(s);
        }
        let syms = std::fs::read(path)
            .ok()
            .and_then(|d| Symbols::parse(&d).ok())
            .unwrap_or_default();
        let syms = Arc::new(syms);
        files.insert(path.to_string(), Arc::clone(&syms));
        syms
    }
}

/// A function in the tracee: its name and start in the tracee's addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub name: String,
    pub start: u64,
    pub size: u64,
    pub file: String,
}

/// The function of a mapped file that holds `addr`, if its file has symbols for it.
pub fn locate(cache: &SymbolCache, maps: &Maps, addr: u64) -> Option<Located> {
    let region = maps.find(addr)?;
    if !region.is_file() {
        return None;
    }
    let syms = cache.get(&region.path);
    let bias = syms.bias(region)?;
    let f = syms.containing(addr.wrapping_sub(bias))?;
    Some(Located {
        name: f.name.clone(),
        start: f.addr.wrapping_add(bias),
        size: f.size,
        file: region.path.clone(),
    })
}

/// Resolve `name` in the tracee: `symbol` (searched in every mapped file, the main
/// program first) or `file:symbol`, where `file` matches a mapped path's file name or
/// a prefix of it (`libc` finds `libc.so.6`). Returns the tracee address.
pub fn resolve(cache: &SymbolCache, maps: &Maps, spec: &str) -> Option<u64> {
    let (file, name) = match spec.rsplit_once(':') {
        Some((f, n)) => (Some(f), n),
        None => (None, spec),
    };
    let mut seen = Vec::new();
    for region in maps.regions.iter().filter(|r| r.is_file()) {
        if seen.contains(&&region.path) {
            continue;
        }
        seen.push(&region.path);
        if let Some(f) = file {
            let base = region.path.rsplit('/').next().unwrap_or("");
            if !(base == f || base.starts_with(f) || region.path == f) {
                continue;
            }
        }
        let syms = cache.get(&region.path);
        let Some(func) = syms.by_name(name) else {
            continue;
        };
        // Any mapping of the file gives the bias; take the one holding the function.
        let bias = maps
            .regions
            .iter()
            .filter(|r| r.path == region.path)
            .filter_map(|r| syms.bias(r))
            .next()?;
        return Some(func.addr.wrapping_add(bias));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_symbols_resolve_to_own_functions() {
        #[inline(never)]
        #[no_mangle]
        extern "C" fn mp_elf_test_marker(x: u64) -> u64 {
            std::hint::black_box(x) + 1
        }
        let f = mp_elf_test_marker as *const () as u64;
        assert_eq!(mp_elf_test_marker(1), 2);
        let pid = std::process::id() as i32;
        let maps = Maps::read(pid).unwrap();
        let cache = SymbolCache::default();
        assert_eq!(resolve(&cache, &maps, "mp_elf_test_marker"), Some(f));
        let l = locate(&cache, &maps, f + 1).unwrap();
        assert_eq!(l.name, "mp_elf_test_marker");
        assert_eq!(l.start, f);
        assert!(l.size > 1);
        assert_eq!(resolve(&cache, &maps, "no_such_symbol_anywhere_xyz"), None);
        // A library-qualified name finds libc's function.
        assert!(resolve(&cache, &maps, "libc:write").is_some());
    }
}
