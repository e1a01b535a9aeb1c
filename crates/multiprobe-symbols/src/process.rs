//! A process's functions: its maps plus the symbols of every mapped ELF file, in the
//! process's addresses. Resolves `symbol` and `library:symbol`, locates the function
//! holding an address, and suggests near matches for names that do not exist.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::elf::{ElfSymbols, Func};
use crate::maps::{Maps, Region};

/// Symbols of files, parsed once and shared: by device and inode for mapped files
/// (what was read is what is mapped, whatever path the process gives it), by path for
/// maps that were only parsed.
#[derive(Debug, Default)]
pub struct SymbolCache {
    files: Mutex<HashMap<FileKey, Arc<ElfSymbols>>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum FileKey {
    Id(u64, u64),
    Path(String),
}

impl SymbolCache {
    /// The symbols of the file mapped at `region` of `maps`, read from the mapped file
    /// itself ([`Maps::open_mapped`]): an empty table if it cannot be opened, is not the
    /// mapped file, or does not parse (probing then goes on without symbol checks
    /// there).
    pub fn mapped(&self, maps: &Maps, region: &Region) -> Arc<ElfSymbols> {
        let key = match region.file_id() {
            Some((dev, ino)) => FileKey::Id(dev, ino),
            None => FileKey::Path(region.path.clone()),
        };
        let mut files = self.files.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = files.get(&key) {
            return Arc::clone(s);
        }
        let syms = maps
            .open_mapped(region)
            .and_then(|mut f| {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut data)?;
                ElfSymbols::parse(&data)
                    .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
            })
            .unwrap_or_default();
        let syms = Arc::new(syms);
        files.insert(key, Arc::clone(&syms));
        syms
    }
}

/// What [`ProcessSymbols::branch_into`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BranchInto {
    /// No other function of the file starts in the range or branches into it.
    None,
    /// The branch at `from` targets `to`, in the range (the lowest such target).
    At {
        /// The branch.
        from: u64,
        /// Its target.
        to: u64,
    },
    /// A function (a symbol's or an FDE's) starts at `at`, in the range: any call may
    /// enter there (the lowest such start).
    Entry {
        /// The function's start.
        at: u64,
    },
    /// The range is not in a mapped file, or the file could not be read.
    Unknown,
}

/// A function in a process: its name and extent in the process's addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    /// Display name (demangled when possible).
    pub name: String,
    /// First byte.
    pub start: u64,
    /// Size in bytes.
    pub size: u64,
    /// The file it comes from.
    pub file: String,
}

/// Why a name did not resolve.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ResolveError {
    /// No mapped file matches the library part of `library:symbol`.
    #[error("no loaded library matches {library:?} (loaded: {})", loaded.join(", "))]
    UnknownLibrary {
        /// What was asked.
        library: String,
        /// File names of what is mapped.
        loaded: Vec<String>,
    },
    /// No function has this name.
    #[error("no function named {name:?}{}", suggest(near))]
    UnknownSymbol {
        /// What was asked.
        name: String,
        /// Similar names that exist.
        near: Vec<String>,
    },
    /// The name is a GNU indirect function: its symbol is a resolver that picks the
    /// implementation when the library is loaded.
    #[error("{name:?} in {} is a GNU indirect function (its implementation is chosen when the library is loaded){}", file_name(file), if slot.is_some() { "; its implementation could not be read from the process" } else { "; this library does not say which implementation it chose: probe it by address" })]
    IndirectFunction {
        /// What was asked.
        name: String,
        /// The library that has it.
        file: String,
        /// Where in the process the loader stores the chosen implementation (a GOT
        /// slot), if the library has such a slot: read it to probe the implementation.
        slot: Option<u64>,
    },
    /// Several functions at different addresses have this name.
    #[error("{name:?} is ambiguous: {}; qualify it (library:symbol, the full path, or with its parameters as listed)", candidates.join(", "))]
    Ambiguous {
        /// What was asked.
        name: String,
        /// `file:name@address` of each.
        candidates: Vec<String>,
    },
}

fn suggest(near: &[String]) -> String {
    if near.is_empty() {
        String::new()
    } else {
        format!("; did you mean {}?", near.join(", "))
    }
}

/// The file name of a path (`libc.so.6` of `/usr/lib/x86_64-linux-gnu/libc.so.6`).
pub fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Whether `library` (as a user writes it) names the file at `path`: the full path, its
/// file name, or a prefix of the file name up to a `.` or `-` (`libc` matches
/// `libc.so.6` but not `libcrypt.so.1`; `libstdc++` matches `libstdc++.so.6`).
pub fn library_matches(library: &str, path: &str) -> bool {
    let base = file_name(path);
    path == library
        || base == library
        || (base.starts_with(library)
            && matches!(base.as_bytes().get(library.len()), Some(b'.' | b'-')))
}

/// Split `library:symbol` at the first single `:` (a `::` belongs to Rust and C++
/// paths): `Some(("libc", "malloc"))` for `libc:malloc`, `None` for `std::mem::drop`.
pub fn split_library(t: &str) -> Option<(&str, &str)> {
    let b = t.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b':' {
            if b.get(i + 1) == Some(&b':') {
                i += 2;
                continue;
            }
            return Some((&t[..i], &t[i + 1..]));
        }
        i += 1;
    }
    None
}

/// A process's address space with symbols.
#[derive(Debug)]
pub struct ProcessSymbols {
    maps: Maps,
    cache: Arc<SymbolCache>,
}

impl ProcessSymbols {
    /// Read process `pid`'s maps (0 = this process), sharing `cache` for symbol tables.
    pub fn read(pid: u32, cache: Arc<SymbolCache>) -> std::io::Result<Self> {
        Ok(Self::from_maps(Maps::read(pid)?, cache))
    }

    /// Over maps already read.
    pub fn from_maps(maps: Maps, cache: Arc<SymbolCache>) -> Self {
        ProcessSymbols { maps, cache }
    }

    /// The maps.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// Distinct mapped files, in address order (the main program first, normally).
    pub fn files(&self) -> Vec<&str> {
        let mut seen: Vec<&str> = Vec::new();
        for r in self.maps.regions.iter().filter(|r| r.is_file()) {
            if !seen.contains(&r.path.as_str()) {
                seen.push(&r.path);
            }
        }
        seen
    }

    /// The symbols of the file `path` (one of [`ProcessSymbols::files`]), read from its
    /// first mapping.
    fn symbols_of(&self, path: &str) -> Arc<ElfSymbols> {
        match self.maps.regions.iter().find(|r| r.path == path) {
            Some(r) => self.cache.mapped(&self.maps, r),
            None => Arc::default(),
        }
    }

    fn bias_of(&self, path: &str, syms: &ElfSymbols) -> Option<u64> {
        self.maps
            .regions
            .iter()
            .filter(|r| r.path == path)
            .find_map(|r| syms.bias(r.start, r.offset))
    }

    fn region_bias(&self, region: &Region, syms: &ElfSymbols) -> Option<u64> {
        syms.bias(region.start, region.offset)
    }

    /// The function holding `addr`, if its file has a symbol for it.
    pub fn locate(&self, addr: u64) -> Option<Located> {
        let region = self.maps.find(addr)?;
        if !region.is_file() {
            return None;
        }
        let syms = self.cache.mapped(&self.maps, region);
        let bias = self.region_bias(region, &syms)?;
        let f = syms.containing(addr.wrapping_sub(bias))?;
        Some(Located {
            name: f.display_name().to_string(),
            start: f.addr.wrapping_add(bias),
            size: f.size,
            file: region.path.clone(),
        })
    }

    /// The function holding `addr`: [`ProcessSymbols::locate`]'s, or for code that has
    /// no symbol — a stripped file's local functions, such as the implementations
    /// glibc's string functions resolve to — the code range of the unwind entry (FDE)
    /// holding it, named `FILE+0xADDR` (its address in the file).
    pub fn function_bounds(&self, addr: u64) -> Option<Located> {
        if let Some(f) = self.locate(addr) {
            return Some(f);
        }
        let region = self.maps.find(addr).filter(|r| r.is_file())?;
        let syms = self.cache.mapped(&self.maps, region);
        let bias = self.region_bias(region, &syms)?;
        let (start, end) = syms.unwind_range(addr.wrapping_sub(bias))?;
        Some(Located {
            name: format!("{}+{start:#x}", file_name(&region.path)),
            start: start.wrapping_add(bias),
            size: end - start,
            file: region.path.clone(),
        })
    }

    /// Whether other code of the file mapped at `targets.start` can enter `targets`
    /// (process addresses; see [`crate::branches`]): a function starts there, or a
    /// direct branch of another function targets it. The file's branches are
    /// decoded the first time it is asked about (or [`ProcessSymbols::index_branches`]),
    /// from the mapped file itself, and kept in the cache.
    pub fn branch_into(&self, targets: std::ops::Range<u64>) -> BranchInto {
        let Some((index, bias)) = self.branches_at(targets.start) else {
            return BranchInto::Unknown;
        };
        let file = targets.start.wrapping_sub(bias)..targets.end.wrapping_sub(bias);
        if let Some(at) = index.entry_in(file.clone()) {
            return BranchInto::Entry {
                at: at.wrapping_add(bias),
            };
        }
        match index.targeting(file) {
            Some((from, to)) => BranchInto::At {
                from: from.wrapping_add(bias),
                to: to.wrapping_add(bias),
            },
            None => BranchInto::None,
        }
    }

    /// Decode the branches of the file mapped at `addr` now, if they are not yet: a
    /// later [`ProcessSymbols::branch_into`] there is then a lookup (a tracer does this
    /// while the program runs, not while it holds it). Whether the file has them.
    pub fn index_branches(&self, addr: u64) -> bool {
        self.branches_at(addr).is_some()
    }

    fn branches_at(&self, addr: u64) -> Option<(Arc<crate::BranchIndex>, u64)> {
        let region = self.maps.find(addr).filter(|r| r.is_file())?;
        let syms = self.cache.mapped(&self.maps, region);
        let bias = self.region_bias(region, &syms)?;
        let index = syms.branch_index(|| {
            let mut data = Vec::new();
            let mut f = self.maps.open_mapped(region).ok()?;
            std::io::Read::read_to_end(&mut f, &mut data).ok()?;
            Some(data)
        })?;
        Some((index, bias))
    }

    /// The exception landing pads (process addresses) of the function starting at
    /// `start`, from its file's unwind information; [`crate::LandingPads::Unknown`] for code
    /// that is not in a mapped ELF file, where it cannot be told.
    pub fn landing_pads(&self, start: u64) -> crate::LandingPads {
        use crate::LandingPads;
        let Some(region) = self.maps.find(start).filter(|r| r.is_file()) else {
            return LandingPads::Unknown;
        };
        let syms = self.cache.mapped(&self.maps, region);
        let Some(bias) = self.region_bias(region, &syms) else {
            return LandingPads::Unknown;
        };
        match syms.landing_pads(start.wrapping_sub(bias)) {
            LandingPads::At(v) => {
                LandingPads::At(v.into_iter().map(|a| a.wrapping_add(bias)).collect())
            }
            other => other,
        }
    }

    /// The process address of `library`'s entry point... of the main program when
    /// `library` is `None` (the first mapped file).
    pub fn entry(&self, library: Option<&str>) -> Option<u64> {
        let path = self
            .files()
            .into_iter()
            .find(|p| library.is_none_or(|l| library_matches(l, p)))?;
        let syms = self.symbols_of(path);
        Some(syms.entry().wrapping_add(self.bias_of(path, &syms)?))
    }

    /// The mapped files `library` names (every mapped file without one), in address
    /// order; an error if it names none.
    fn files_of(&self, library: Option<&str>) -> Result<Vec<&str>, ResolveError> {
        let files: Vec<&str> = self
            .files()
            .into_iter()
            .filter(|p| library.is_none_or(|l| library_matches(l, p)))
            .collect();
        match library {
            Some(l) if files.is_empty() => Err(ResolveError::UnknownLibrary {
                library: l.to_string(),
                loaded: self
                    .files()
                    .iter()
                    .map(|p| file_name(p).to_string())
                    .collect(),
            }),
            _ => Ok(files),
        }
    }

    /// Resolve `name` in `library` (or in every mapped file, the main program first) to
    /// the function's extent in the process.
    pub fn resolve(&self, library: Option<&str>, name: &str) -> Result<Located, ResolveError> {
        let files = self.files_of(library)?;
        for path in &files {
            let syms = self.symbols_of(path);
            if syms.is_ifunc(name) {
                // Also a plain function of that name here is an old version kept for
                // compatibility (glibc's `memcpy@GLIBC_2.2.5` beside the indirect
                // `memcpy@@GLIBC_2.14`): what programs call is the indirect one.
                return Err(self.indirect(path, &syms, name));
            }
            let found = syms.by_name(name);
            let Some(first) = found.first() else {
                continue;
            };
            let Some(bias) = self.bias_of(path, &syms) else {
                continue;
            };
            let distinct: Vec<&&Func> = {
                let mut v: Vec<&&Func> = found.iter().collect();
                v.dedup_by_key(|f| f.addr);
                v
            };
            if distinct.len() > 1 {
                return Err(ResolveError::Ambiguous {
                    name: name.to_string(),
                    candidates: distinct
                        .iter()
                        .map(|f| {
                            format!(
                                "{}:{}@{:#x}",
                                file_name(path),
                                f.display_name(),
                                f.addr.wrapping_add(bias)
                            )
                        })
                        .collect(),
                });
            }
            return Ok(Located {
                name: first.display_name().to_string(),
                start: first.addr.wrapping_add(bias),
                size: first.size,
                file: path.to_string(),
            });
        }
        Err(ResolveError::UnknownSymbol {
            name: name.to_string(),
            near: self.near(&files, name),
        })
    }

    /// The process address of the data object `name` in the first mapped file
    /// `library` names that defines it (every file without a library).
    pub fn object(&self, library: Option<&str>, name: &str) -> Option<u64> {
        let files = self.files_of(library).ok()?;
        files.iter().find_map(|path| {
            let syms = self.symbols_of(path);
            let at = syms.object(name)?;
            Some(at.wrapping_add(self.bias_of(path, &syms)?))
        })
    }

    /// The mapped file `library` names (the first), with its symbols and the bias that
    /// turns their addresses into the process's.
    pub fn file_symbols(&self, path: &str) -> Option<(Arc<ElfSymbols>, u64)> {
        let syms = self.symbols_of(path);
        let bias = self.bias_of(path, &syms)?;
        Some((syms, bias))
    }

    /// The indirect functions matching the wildcard `pattern` in `library` (or in every
    /// mapped file), each as the [`ResolveError::IndirectFunction`] that says where its
    /// implementation is to be read.
    pub fn indirect_matching(&self, library: Option<&str>, pattern: &str) -> Vec<ResolveError> {
        let files = self.files_of(library).unwrap_or_default();
        let mut out = Vec::new();
        for path in files {
            let syms = self.symbols_of(path);
            for name in syms.ifuncs_matching(pattern) {
                out.push(self.indirect(path, &syms, name));
            }
        }
        out
    }

    fn indirect(&self, path: &str, syms: &ElfSymbols, name: &str) -> ResolveError {
        let slot = syms
            .ifunc_slot(name)
            .zip(self.bias_of(path, syms))
            .map(|(s, bias)| s.wrapping_add(bias));
        ResolveError::IndirectFunction {
            name: name.to_string(),
            file: path.to_string(),
            slot,
        }
    }

    /// Every function matching the wildcard `pattern` ([`crate::glob`]) in `library` (or
    /// in every mapped file), one per address, in file order then address order. Empty if
    /// nothing matches.
    pub fn resolve_pattern(
        &self,
        library: Option<&str>,
        pattern: &str,
    ) -> Result<Vec<Located>, ResolveError> {
        let files = self.files_of(library)?;
        let mut out = Vec::new();
        for path in files {
            let syms = self.symbols_of(path);
            let Some(bias) = self.bias_of(path, &syms) else {
                continue;
            };
            out.extend(syms.matching(pattern).into_iter().map(|f| Located {
                name: f.display_name().to_string(),
                start: f.addr.wrapping_add(bias),
                size: f.size,
                file: path.to_string(),
            }));
        }
        Ok(out)
    }

    /// Up to five names in `files` close to `name`.
    fn near(&self, files: &[&str], name: &str) -> Vec<String> {
        let tables: Vec<Arc<ElfSymbols>> = files.iter().map(|p| self.symbols_of(p)).collect();
        near_names(tables.iter().flat_map(|t| t.funcs()), name)
    }
}

/// Up to five function names close to `name`: containing it, or within a small edit
/// distance of it (of their last path component, for Rust names).
pub fn near_names<'a>(funcs: impl IntoIterator<Item = &'a Func>, name: &str) -> Vec<String> {
    let max = (name.len() / 4).clamp(1, 3);
    let mut scored: Vec<(usize, String)> = Vec::new();
    for f in funcs {
        let shown = f.display_name();
        // The last path component, without C++ parameters (which may hold `::` too).
        let path = shown.split('(').next().unwrap_or(&shown);
        let short = path.rsplit("::").next().unwrap_or(path);
        let d = if short.contains(name) && short != name {
            0
        } else {
            edit_distance(short, name)
        };
        if d <= max {
            scored.push((d * 1000 + shown.len(), shown.to_string()));
        }
    }
    scored.sort();
    scored.dedup_by(|a, b| a.1 == b.1);
    scored.into_iter().take(5).map(|(_, n)| n).collect()
}

/// Edit distance counting a transposition of two neighbouring characters as one edit
/// (optimal string alignment: `mallco` is one edit from `malloc`, as a typist sees it),
/// with an early exit once both strings differ too much in length.
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len().abs_diff(b.len()) > 3 {
        return usize::MAX / 2;
    }
    // Three rows: the one before the previous is needed for transpositions.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        cur[0] = i;
        for j in 1..=b.len() {
            let sub = prev[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            let mut d = sub.min(prev[j] + 1).min(cur[j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                d = d.min(before[j - 2] + 1);
            }
            cur[j] = d;
        }
        std::mem::swap(&mut before, &mut prev);
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_library_is_split_off_at_a_single_colon_only() {
        assert_eq!(split_library("libc:malloc"), Some(("libc", "malloc")));
        assert_eq!(split_library("libfoo:ns::f"), Some(("libfoo", "ns::f")));
        assert_eq!(split_library("std::mem::drop"), None);
        assert_eq!(split_library("a::b:c"), Some(("a::b", "c")));
        assert_eq!(split_library(":f"), Some(("", "f")));
    }

    #[inline(never)]
    #[no_mangle]
    extern "C" fn mp_symbols_test_marker(x: u64) -> u64 {
        std::hint::black_box(x) + 1
    }

    #[inline(never)]
    fn rust_marker_function(x: u64) -> u64 {
        std::hint::black_box(x) * 3
    }

    fn own() -> ProcessSymbols {
        ProcessSymbols::read(0, Arc::default()).unwrap()
    }

    #[test]
    fn resolves_c_and_rust_names_and_locates_addresses() {
        let f = mp_symbols_test_marker as *const () as u64;
        assert_eq!(mp_symbols_test_marker(1), 2);
        assert_eq!(rust_marker_function(2), 6);
        let p = own();
        let r = p.resolve(None, "mp_symbols_test_marker").unwrap();
        assert_eq!(r.start, f);
        assert!(r.size > 1);
        let l = p.locate(f + 1).unwrap();
        assert_eq!((l.start, l.name.as_str()), (f, "mp_symbols_test_marker"));
        // A Rust function by its demangled path, and by its last component.
        let g = rust_marker_function as *const () as u64;
        let by_path = p
            .resolve(
                None,
                "multiprobe_symbols::process::tests::rust_marker_function",
            )
            .unwrap();
        assert_eq!(by_path.start, g);
        assert_eq!(p.resolve(None, "rust_marker_function").unwrap().start, g);
        assert_eq!(p.locate(g).unwrap().name, by_path.name);
    }

    #[test]
    fn library_qualified_names_and_clear_errors() {
        let p = own();
        let w = p.resolve(Some("libc"), "write").unwrap();
        assert_eq!(w.start, libc_write());
        assert!(library_matches(
            "libc",
            "/usr/lib/x86_64-linux-gnu/libc.so.6"
        ));
        assert!(!library_matches("libc", "/usr/lib/libcrypt.so.1"));
        assert!(library_matches("libc.so.6", "/lib/libc.so.6"));
        match p.resolve(Some("libnothere"), "write") {
            Err(ResolveError::UnknownLibrary { loaded, .. }) => {
                assert!(
                    loaded.iter().any(|l| l.starts_with("libc.so")),
                    "{loaded:?}"
                )
            }
            other => panic!("{other:?}"),
        }
        // libc's `strcmp` is an IFUNC on x86-64 (chosen by CPU features at load time).
        assert!(matches!(
            p.resolve(Some("libc"), "strcmp"),
            Err(ResolveError::IndirectFunction { .. })
        ));
        match p.resolve(Some("libc"), "mallok") {
            Err(e @ ResolveError::UnknownSymbol { .. }) => {
                let msg = e.to_string();
                assert!(
                    msg.contains("did you mean") && msg.contains("malloc"),
                    "{msg}"
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(p.entry(None).is_some());
        assert_eq!(edit_distance("malloc", "mallok"), 1);
        // A transposition is one edit, as a typist sees it.
        assert_eq!(edit_distance("mallco", "malloc"), 1);
        assert_eq!(edit_distance("fere", "free"), 1);
        assert_eq!(edit_distance("abc", "cba"), 2);
        match p.resolve(Some("libc"), "mallco") {
            Err(e @ ResolveError::UnknownSymbol { .. }) => {
                assert!(e.to_string().contains("did you mean malloc"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn aliases_are_shown_by_their_canonical_name() {
        let p = own();
        let malloc = p.resolve(Some("libc"), "malloc").unwrap().start;
        assert_eq!(
            p.resolve(Some("libc"), "__libc_malloc").unwrap().start,
            malloc
        );
        assert_eq!(p.locate(malloc).unwrap().name, "malloc");
        let all = p.resolve_pattern(Some("libc"), "*").unwrap();
        let at: Vec<&str> = all
            .iter()
            .filter(|l| l.start == malloc)
            .map(|l| l.name.as_str())
            .collect();
        assert_eq!(at, ["malloc"], "one site, by its canonical name");
    }

    fn libc_write() -> u64 {
        extern "C" {
            fn write(fd: i32, buf: *const u8, n: usize) -> isize;
        }
        write as *const () as u64
    }
}
