//! Function symbols of one ELF file (`.symtab` and `.dynsym`) and its loadable segments.
//!
//! Addresses here are the file's own virtual addresses; [`ElfSymbols::bias`] of a mapping
//! turns them into a process's. Functions are sorted by address with zero-sized symbols
//! dropped; a function known under several names (an alias, or the same name in both
//! tables) keeps every distinct name.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};

use object::{Object, ObjectSection, ObjectSegment, ObjectSymbol, SymbolKind};

use crate::branches::BranchIndex;
use crate::unwind::{LandingPads, Section, UnwindSections};

/// A function symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Func {
    /// The symbol's name as in the file (mangled, for Rust and C++).
    pub name: String,
    /// The demangled name without the Rust hash (`crate::module::function`), when the
    /// name is a mangled Rust name; otherwise `None`. (C++ names are demangled when
    /// needed: see [`Func::display_name`] and [`ElfSymbols::by_name`].)
    pub demangled: Option<String>,
    /// File virtual address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

impl Func {
    /// The name to show a person: the demangled Rust path, the demangled C++ name with
    /// its parameters (`ns::Shape::area() const`), or the name as it is.
    pub fn display_name(&self) -> Cow<'_, str> {
        match (&self.demangled, cpp_names(&self.name)) {
            (Some(d), _) => Cow::Borrowed(d),
            (None, Some((full, _))) => Cow::Owned(full),
            (None, None) => Cow::Borrowed(&self.name),
        }
    }
}

/// The function symbols and loadable segments of one ELF file.
#[derive(Debug, Default)]
pub struct ElfSymbols {
    funcs: Vec<Func>,
    /// GNU indirect functions (`STT_GNU_IFUNC`: `strcmp`, `memcpy`, ... in libc), sorted
    /// by name, with their resolver's address. The symbol is the resolver that picks an
    /// implementation at load time, not the function, so they are not in `funcs`.
    ifuncs: Vec<(String, u64)>,
    /// `(resolver, GOT slot)` of each `R_X86_64_IRELATIVE` relocation: once the loader
    /// has relocated the file, the slot holds the implementation the resolver chose.
    irelative: Vec<(u64, u64)>,
    /// The C++ names of `funcs` (same order), demangled with and without parameters;
    /// filled the first time a name lookup needs them (a C++ library has thousands,
    /// and most lookups are of C names found at once).
    cpp: OnceLock<Vec<Option<(String, String)>>>,
    /// `(vaddr, file offset, file size)` of every `PT_LOAD`.
    segments: Vec<(u64, u64, u64)>,
    entry: u64,
    /// The file has a `.symtab` (it is not stripped).
    symtab: bool,
    /// Its USDT probes (`.note.stapsdt`).
    usdt: Vec<crate::usdt::UsdtProbe>,
    /// Data objects (`STT_OBJECT`) by name, with their address: the loader's
    /// `_r_debug`, a USDT argument's symbol.
    objects: Vec<(String, u64)>,
    /// `.eh_frame`, `.eh_frame_hdr`, `.gcc_except_table`, for landing pads.
    unwind: UnwindSections,
    /// `[start, end)` of every unwind entry (FDE), sorted: the extent of functions a
    /// stripped file has no symbol for (glibc's string functions behind their IFUNCs).
    fdes: Vec<(u64, u64)>,
    /// Where other code of the file can enter a function (its branch index), decoded
    /// the first time a probe needs it ([`ElfSymbols::branch_index`]); `None` inside if
    /// the file could not be read.
    branches: OnceLock<Option<Arc<BranchIndex>>>,
    /// Addresses of functions exported only under a hidden (non-default) version, by
    /// address: `pthread_cond_timedwait@GLIBC_2.2.5` beside `@@GLIBC_2.3.2`. A name
    /// that finds both means the default one, as the linker and bpftrace take it.
    old_versions: Vec<u64>,
}

/// How canonical a name is among the aliases of one function, lower first: libc's
/// `malloc` before `__libc_malloc`, `puts` before `_IO_puts`, `free` before `cfree` —
/// fewer leading underscores, then the shorter name.
fn alias_rank(name: &str) -> (usize, usize) {
    (name.len() - name.trim_start_matches('_').len(), name.len())
}

/// A Rust name demangled, without its hash.
fn demangle(name: &str) -> Option<String> {
    let d = rustc_demangle::try_demangle(name).ok()?;
    Some(format!("{d:#}"))
}

/// A C++ name demangled: with its parameters, and without (what people type).
fn cpp_names(name: &str) -> Option<(String, String)> {
    if !name.starts_with("_Z") || rustc_demangle::try_demangle(name).is_ok() {
        return None;
    }
    let sym = cpp_demangle::Symbol::new(name).ok()?;
    let full = sym.demangle().ok()?;
    let opts = cpp_demangle::DemangleOptions::new()
        .no_params()
        .no_return_type();
    let base = sym.demangle_with_options(&opts).ok()?;
    Some((full, base))
}

impl ElfSymbols {
    /// Parse an ELF image.
    pub fn parse(data: &[u8]) -> Result<ElfSymbols, object::Error> {
        let file = object::File::parse(data)?;
        let mut ifuncs: Vec<(String, u64)> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| {
                matches!(s.flags(), object::SymbolFlags::Elf { st_info, .. }
                    if st_info.st_type() == object::elf::STT_GNU_IFUNC)
            })
            .filter_map(|s| Some((s.name().ok()?.to_string(), s.address())))
            .collect();
        // By name, once each (`.symtab` and `.dynsym` may both list one).
        ifuncs.sort_unstable();
        ifuncs.dedup();
        let irelative = file
            .dynamic_relocations()
            .into_iter()
            .flatten()
            .filter(|(_, r)| {
                matches!(r.flags(), object::RelocationFlags::Elf { r_type }
                    if r_type == object::elf::R_X86_64_IRELATIVE)
            })
            .map(|(slot, r)| (r.addend() as u64, slot))
            .collect();
        let mut funcs: Vec<Func> = file
            .symbols()
            .chain(file.dynamic_symbols())
            .filter(|s| s.kind() == SymbolKind::Text && s.size() > 0 && s.is_definition())
            .filter_map(|s| {
                let name = s.name().ok()?.to_string();
                Some(Func {
                    demangled: demangle(&name),
                    name,
                    addr: s.address(),
                    size: s.size(),
                })
            })
            .collect();
        // At one address, the name a person would call the function first (see
        // `alias_rank`): it is what a pattern's match and `containing` report.
        funcs.sort_by(|a, b| {
            (a.addr, alias_rank(&a.name), &a.name).cmp(&(b.addr, alias_rank(&b.name), &b.name))
        });
        funcs.dedup();
        // `.gnu.version`: one u16 per dynamic symbol, bit 15 set for a hidden version.
        let versym = file
            .section_by_name(".gnu.version")
            .and_then(|s| s.data().ok());
        let hidden = |i: usize| {
            versym
                .and_then(|d| d.get(2 * i..2 * i + 2))
                .is_some_and(|b| u16::from_le_bytes([b[0], b[1]]) & 0x8000 != 0)
        };
        let mut old_versions: Vec<u64> = file
            .dynamic_symbols()
            .filter(|s| s.kind() == SymbolKind::Text && s.is_definition())
            .filter(|s| hidden(s.index().0))
            .map(|s| s.address())
            .collect();
        old_versions.sort_unstable();
        old_versions.dedup();
        let segments = file
            .segments()
            .map(|s| {
                let (off, size) = s.file_range();
                (s.address(), off, size)
            })
            .collect();
        let section = |name: &str| {
            let s = file.section_by_name(name)?;
            Some(Section {
                addr: s.address(),
                data: s.data().ok()?.to_vec(),
            })
        };
        let unwind = UnwindSections {
            eh_frame: section(".eh_frame"),
            eh_frame_hdr: section(".eh_frame_hdr"),
            except_table: section(".gcc_except_table"),
        };
        let fdes = unwind.fde_ranges();
        Ok(ElfSymbols {
            fdes,
            branches: OnceLock::new(),
            funcs,
            ifuncs,
            irelative,
            cpp: OnceLock::new(),
            segments,
            entry: file.entry(),
            symtab: file.symbol_table().is_some(),
            objects: {
                let mut o: Vec<(String, u64)> = file
                    .symbols()
                    .chain(file.dynamic_symbols())
                    .filter(|s| s.kind() == SymbolKind::Data && s.is_definition())
                    .filter_map(|s| Some((s.name().ok()?.to_string(), s.address())))
                    .collect();
                o.sort_unstable();
                o.dedup();
                o
            },
            usdt: crate::usdt::probes(&file),
            unwind,
            old_versions,
        })
    }

    /// Read and parse the file at `path`.
    pub fn load(path: &str) -> std::io::Result<ElfSymbols> {
        let data = std::fs::read(path)?;
        Self::parse(&data).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// The C++ names of `funcs`, demangled the first time they are needed.
    fn cpp(&self) -> &[Option<(String, String)>] {
        self.cpp
            .get_or_init(|| self.funcs.iter().map(|f| cpp_names(&f.name)).collect())
    }

    /// Names of the indirect functions matching the wildcard `pattern`.
    pub fn ifuncs_matching(&self, pattern: &str) -> Vec<&str> {
        self.ifuncs
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| crate::glob::glob_match(pattern, n))
            .collect()
    }

    /// The indirect function `name` and its resolver's address, if it is one here.
    fn ifunc(&self, name: &str) -> Option<&(String, u64)> {
        let i = self
            .ifuncs
            .binary_search_by(|(n, _)| n.as_str().cmp(name))
            .ok()?;
        self.ifuncs.get(i)
    }

    /// Whether `name` is a GNU indirect function here (see the field's docs).
    pub fn is_ifunc(&self, name: &str) -> bool {
        self.ifunc(name).is_some()
    }

    /// For the indirect function `name`: the file address of the GOT slot where the
    /// loader stores the implementation it chose, if the file has one (an
    /// `R_X86_64_IRELATIVE` relocation of its resolver).
    pub fn ifunc_slot(&self, name: &str) -> Option<u64> {
        let resolver = self.ifunc(name)?.1;
        self.irelative
            .iter()
            .find(|&&(r, _)| r == resolver)
            .map(|&(_, slot)| slot)
    }

    /// Every function, by address.
    pub fn funcs(&self) -> &[Func] {
        &self.funcs
    }

    /// The exception landing pads of the function starting at file address `start`
    /// (see [`crate::unwind`]).
    pub fn landing_pads(&self, start: u64) -> LandingPads {
        self.unwind.landing_pads(start)
    }

    /// The entry point (file address).
    pub fn entry(&self) -> u64 {
        self.entry
    }

    /// Whether the file has a full symbol table (`.symtab`): a stripped file has only
    /// the dynamic symbols it exports, a stripped static program none at all.
    pub fn has_symtab(&self) -> bool {
        self.symtab
    }

    /// The file address of the data object `name` (`_r_debug`), if the file defines it.
    pub fn object(&self, name: &str) -> Option<u64> {
        let i = self.objects.partition_point(|(n, _)| n.as_str() < name);
        self.objects
            .get(i)
            .filter(|(n, _)| n == name)
            .map(|&(_, a)| a)
    }

    /// The file's USDT probes (`.note.stapsdt`), in note order.
    pub fn usdt(&self) -> &[crate::usdt::UsdtProbe] {
        &self.usdt
    }

    /// The file offset of file virtual address `vaddr`, if a loadable segment's file
    /// bytes hold it.
    pub fn offset_of_vaddr(&self, vaddr: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|&&(va, _, size)| va <= vaddr && vaddr < va + size)
            .map(|&(va, off, _)| off + (vaddr - va))
    }

    /// The file virtual address of file offset `offset`, if a loadable segment holds it.
    pub fn vaddr_of_offset(&self, offset: u64) -> Option<u64> {
        self.segments
            .iter()
            .find(|&&(_, off, size)| off <= offset && offset < off + size)
            .map(|&(vaddr, off, _)| vaddr + (offset - off))
    }

    /// The unwind entry (FDE) whose code range `[start, end)` holds the file address
    /// `vaddr`: the extent of the function there, symbol or not (the innermost, if
    /// entries nest).
    pub fn unwind_range(&self, vaddr: u64) -> Option<(u64, u64)> {
        let i = self.fdes.partition_point(|&(s, _)| s <= vaddr);
        self.fdes[..i]
            .iter()
            .rev()
            .take(16)
            .filter(|&&(_, e)| vaddr < e)
            .min_by_key(|&&(s, e)| e - s)
            .copied()
    }

    /// `[start, end)` of every unwind entry (FDE), sorted by start.
    pub fn unwind_ranges(&self) -> &[(u64, u64)] {
        &self.fdes
    }

    /// The file's branch index — its functions' starts and its branches from one
    /// function into the middle of another (see [`crate::branches`]) — decoded from
    /// `data`, the file's bytes, asked for only the first time, and kept. `None` if
    /// `data` could not give them.
    pub fn branch_index(&self, data: impl FnOnce() -> Option<Vec<u8>>) -> Option<Arc<BranchIndex>> {
        self.branches
            .get_or_init(|| {
                let data = data()?;
                // Bytes within one segment's file bytes.
                let code = |start: u64, end: u64| {
                    let &(va, off, _) = self
                        .segments
                        .iter()
                        .find(|&&(va, _, size)| va <= start && end <= va + size)?;
                    let from = usize::try_from(off + (start - va)).ok()?;
                    data.get(from..from.checked_add(usize::try_from(end - start).ok()?)?)
                };
                let ranges = self
                    .funcs
                    .iter()
                    .map(|f| (f.addr, f.addr + f.size))
                    .chain(self.fdes.iter().copied());
                let function_of = |v: u64| {
                    self.containing(v)
                        .map(|f| f.addr)
                        .or_else(|| self.unwind_range(v).map(|r| r.0))
                };
                Some(Arc::new(BranchIndex::build(ranges, code, function_of)))
            })
            .clone()
    }

    /// The function whose `[addr, addr + size)` holds the file address `vaddr`; the
    /// innermost (smallest) one if symbols nest.
    pub fn containing(&self, vaddr: u64) -> Option<&Func> {
        let i = self.funcs.partition_point(|f| f.addr <= vaddr);
        // Functions do not overlap, except aliases and the odd nested symbol: a few
        // candidates below `vaddr` are enough.
        self.funcs[..i]
            .iter()
            .rev()
            .take(16)
            .filter(|f| vaddr < f.addr + f.size)
            .min_by_key(|f| (f.size, alias_rank(&f.name)))
    }

    /// Functions named `name`, trying in turn: the exact symbol name; the demangled
    /// name (`crate::module::function`, or a C++ name with its parameters as the
    /// demangler prints them, `ns::f(int)`); a C++ name without parameters (`ns::f`,
    /// every overload); and last a path ending in `::name`. Several results with
    /// distinct addresses mean the name is ambiguous.
    ///
    /// Among several, the ones a person means win when there are any: the default
    /// version of a versioned symbol over its old ones, and a function over the
    /// compiler's `.cold` (or other `[clone ...]`) parts of functions of that name.
    pub fn by_name(&self, name: &str) -> Vec<&Func> {
        let matching = |test: &dyn Fn(usize, &Func) -> bool| -> Vec<&Func> {
            let found = self.funcs.iter().enumerate().filter(|(i, f)| test(*i, f));
            self.preferred(found.map(|(_, f)| f).collect())
        };
        let found = matching(&|_, f| f.name == name);
        if !found.is_empty() {
            return found;
        }
        let found = matching(&|_, f| f.demangled.as_deref() == Some(name));
        if !found.is_empty() {
            return found;
        }
        let cpp = self.cpp();
        let full = |i: usize| cpp[i].as_ref().map(|(f, _)| f.as_str());
        let base = |i: usize| cpp[i].as_ref().map(|(_, b)| b.as_str());
        let found = matching(&|i, _| full(i) == Some(name));
        if !found.is_empty() {
            return found;
        }
        let found = matching(&|i, _| base(i) == Some(name));
        if !found.is_empty() {
            return found;
        }
        let suffix = format!("::{name}");
        matching(&|i, f| {
            base(i)
                .or(f.demangled.as_deref())
                .is_some_and(|d| d.ends_with(&suffix))
        })
    }

    /// [`ElfSymbols::by_name`]'s preference among several functions.
    fn preferred<'a>(&self, found: Vec<&'a Func>) -> Vec<&'a Func> {
        if found.iter().all(|f| f.addr == found[0].addr) {
            return found;
        }
        let old = |f: &Func| self.old_versions.binary_search(&f.addr).is_ok();
        let clone = |f: &Func| f.name.contains('.') && f.display_name().contains("[clone ");
        let keep: Vec<&Func> = found
            .iter()
            .copied()
            .filter(|f| !old(f) && !clone(f))
            .collect();
        if keep.is_empty() {
            found
        } else {
            keep
        }
    }

    /// Functions any of whose names — as in the file, demangled Rust path, or C++ name
    /// without parameters — match the wildcard `pattern` ([`crate::glob`]), one per
    /// address, by address. A plain function that shares its name with an indirect one
    /// (a compatibility version) is left out, as [`ElfSymbols::by_name`]'s callers do;
    /// the indirect functions that match are [`ElfSymbols::ifuncs_matching`].
    pub fn matching(&self, pattern: &str) -> Vec<&Func> {
        let cpp = self.cpp();
        let mut found: Vec<&Func> = self
            .funcs
            .iter()
            .enumerate()
            .filter(|(i, f)| {
                if self.is_ifunc(&f.name) {
                    return false;
                }
                let base = cpp[*i].as_ref().map(|(_, b)| b.as_str());
                [Some(f.name.as_str()), f.demangled.as_deref(), base]
                    .into_iter()
                    .flatten()
                    .any(|n| crate::glob::glob_match(pattern, n))
            })
            .map(|(_, f)| f)
            .collect();
        found.dedup_by_key(|f| f.addr);
        found
    }

    /// What to add to a file address to get the process's address, for the file mapped
    /// at a region starting at `start` with file offset `offset`.
    pub fn bias(&self, start: u64, offset: u64) -> Option<u64> {
        const PAGE: u64 = 4096;
        // A segment is mapped from its page-rounded offset at its page-rounded address.
        // Two segments may share a file page (the exec one starts right after the
        // read-only one), so prefer the segment that starts this mapping; a mapping
        // split later (RELRO) starts inside its segment.
        let exact = self
            .segments
            .iter()
            .find(|&&(_, off, _)| off & !(PAGE - 1) == offset)
            .map(|&(vaddr, _, _)| start.wrapping_sub(vaddr & !(PAGE - 1)));
        exact.or_else(|| {
            let &(vaddr, off, _) = self
                .segments
                .iter()
                .find(|&&(_, off, size)| off <= offset && offset < off + size)?;
            Some(
                start
                    .wrapping_sub(offset)
                    .wrapping_add(off)
                    .wrapping_sub(vaddr),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn func(name: &str, addr: u64) -> Func {
        Func {
            name: name.into(),
            demangled: demangle(name),
            addr,
            size: 16,
        }
    }

    #[test]
    fn rust_and_cpp_names_demangle() {
        let r = func("_ZN9mp_single4work17h0123456789abcdefE", 0);
        assert_eq!(r.display_name(), "mp_single::work");
        assert_eq!(cpp_names(&r.name), None, "a Rust name is not C++");
        let c = func("_ZNK2ns5Shape4areaEv", 0);
        assert_eq!(c.display_name(), "ns::Shape::area() const");
        assert_eq!(
            cpp_names(&c.name).unwrap().1,
            "ns::Shape::area",
            "without parameters"
        );
        assert_eq!(cpp_names("_Znwm").unwrap().1, "operator new");
        assert_eq!(func("malloc", 0).display_name(), "malloc");
        assert_eq!(func("_Zgarbage", 0).display_name(), "_Zgarbage");
    }

    #[test]
    fn names_resolve_mangled_demangled_or_without_parameters() {
        let syms = ElfSymbols {
            funcs: vec![
                func("_ZN2ns4drawEi", 0x100),   // ns::draw(int)
                func("_ZN2ns4drawEPKc", 0x200), // ns::draw(char const*)
                func("_ZNK2ns5Shape4areaEv", 0x300),
                func("_ZN9mp_single4work17h0123456789abcdefE", 0x400),
                func("area", 0x500),
            ],
            ..ElfSymbols::default()
        };
        let at = |n: &str| -> Vec<u64> { syms.by_name(n).iter().map(|f| f.addr).collect() };
        assert_eq!(at("_ZN2ns4drawEi"), [0x100]);
        assert_eq!(at("ns::draw(int)"), [0x100]);
        assert_eq!(at("ns::draw"), [0x100, 0x200], "every overload: ambiguous");
        assert_eq!(at("draw"), [0x100, 0x200]);
        assert_eq!(at("ns::Shape::area"), [0x300]);
        assert_eq!(at("Shape::area"), [0x300]);
        assert_eq!(at("area"), [0x500], "an exact symbol name wins");
        assert_eq!(at("work"), [0x400]);
        assert!(at("ns::paint").is_empty());

        let like = |p: &str| -> Vec<u64> { syms.matching(p).iter().map(|f| f.addr).collect() };
        assert_eq!(
            like("ns::dr*"),
            [0x100, 0x200],
            "C++ names without parameters"
        );
        assert_eq!(like("*area"), [0x300, 0x500]);
        assert_eq!(like("mp_single::w?rk"), [0x400], "Rust paths");
        assert_eq!(like("_ZN2ns4draw*"), [0x100, 0x200], "names as in the file");
        assert!(like("nothing*").is_empty());
    }
}
