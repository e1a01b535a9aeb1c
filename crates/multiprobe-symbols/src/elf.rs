//! Function symbols of one ELF file (`.symtab` and `.dynsym`) and its loadable segments.
//!
//! Addresses here are the file's own virtual addresses; [`ElfSymbols::bias`] of a mapping
//! turns them into a process's. Functions are sorted by address with zero-sized symbols
//! dropped; a function known under several names (an alias, or the same name in both
//! tables) keeps every distinct name.

use object::{Object, ObjectSegment, ObjectSymbol, SymbolKind};

/// A function symbol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Func {
    /// The symbol's name as in the file (mangled, for Rust and C++).
    pub name: String,
    /// The demangled name without the Rust hash (`crate::module::function`), when the
    /// name is a mangled Rust name; otherwise `None`.
    pub demangled: Option<String>,
    /// File virtual address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

impl Func {
    /// The name to show a person: demangled if there is one.
    pub fn display_name(&self) -> &str {
        self.demangled.as_deref().unwrap_or(&self.name)
    }
}

/// The function symbols and loadable segments of one ELF file.
#[derive(Debug, Default)]
pub struct ElfSymbols {
    funcs: Vec<Func>,
    /// `(vaddr, file offset, file size)` of every `PT_LOAD`.
    segments: Vec<(u64, u64, u64)>,
    entry: u64,
}

fn demangle(name: &str) -> Option<String> {
    let d = rustc_demangle::try_demangle(name).ok()?;
    Some(format!("{d:#}"))
}

impl ElfSymbols {
    /// Parse an ELF image.
    pub fn parse(data: &[u8]) -> Result<ElfSymbols, object::Error> {
        let file = object::File::parse(data)?;
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
        funcs.sort_by(|a, b| (a.addr, &a.name).cmp(&(b.addr, &b.name)));
        funcs.dedup();
        let segments = file
            .segments()
            .map(|s| {
                let (off, size) = s.file_range();
                (s.address(), off, size)
            })
            .collect();
        Ok(ElfSymbols {
            funcs,
            segments,
            entry: file.entry(),
        })
    }

    /// Read and parse the file at `path`.
    pub fn load(path: &str) -> std::io::Result<ElfSymbols> {
        let data = std::fs::read(path)?;
        Self::parse(&data).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// Every function, by address.
    pub fn funcs(&self) -> &[Func] {
        &self.funcs
    }

    /// The entry point (file address).
    pub fn entry(&self) -> u64 {
        self.entry
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
            .min_by_key(|f| f.size)
    }

    /// Functions named `name`: by exact symbol name if any matches; else by demangled
    /// name (`crate::module::function`); else by a demangled path ending in `::name`.
    /// Several results with distinct addresses mean the name is ambiguous.
    pub fn by_name(&self, name: &str) -> Vec<&Func> {
        let exact: Vec<&Func> = self.funcs.iter().filter(|f| f.name == name).collect();
        if !exact.is_empty() {
            return exact;
        }
        let demangled: Vec<&Func> = self
            .funcs
            .iter()
            .filter(|f| f.demangled.as_deref() == Some(name))
            .collect();
        if !demangled.is_empty() {
            return demangled;
        }
        let suffix = format!("::{name}");
        self.funcs
            .iter()
            .filter(|f| f.demangled.as_deref().is_some_and(|d| d.ends_with(&suffix)))
            .collect()
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
