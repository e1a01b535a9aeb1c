//! Where a spec is in the process: a name (or an address) resolved with the process's
//! maps and symbols; a library that is not mapped yet checked on disk instead, so that a
//! typo fails at once while a library `dlopen` will load later is pending.
//!
//! GNU indirect functions (libc's `strlen`, `memcpy`) are probed at the implementation
//! the loader chose, read from the GOT slot it filled, never on their resolver.

use std::os::unix::fs::FileExt;

use multiprobe_symbols::{
    file_name, library_matches, near_names, ElfSymbols, Located, ProcessSymbols, ResolveError,
};

use crate::error::ProbeError;
use crate::spec::{is_wildcard, ProbeSpec, Target};

/// Where a plain spec is.
pub(super) enum Resolved {
    /// At `addr`, shown as `label`.
    At {
        /// The address.
        addr: u64,
        /// `libc.so.6:malloc`, `prog:main+0x4`, or the address.
        label: String,
    },
    /// Its library is not mapped (yet).
    NotLoaded(String),
}

/// A process's symbols, as one placement sees them.
pub(super) struct Resolver<'a> {
    pub(super) syms: &'a ProcessSymbols,
    pub(super) pid: i32,
}

impl Resolver<'_> {
    /// Resolve a plain (not pattern) spec.
    pub(super) fn resolve(&self, spec: &ProbeSpec) -> Result<Resolved, ProbeError> {
        let (library, name, offset) = match &spec.target {
            Target::Address(a) => {
                let label = match self.syms.locate(*a) {
                    Some(l) if l.start == *a => format!("{}:{}", file_name(&l.file), l.name),
                    Some(l) => format!("{}:{}+{:#x}", file_name(&l.file), l.name, a - l.start),
                    None => format!("{a:#x}"),
                };
                return Ok(Resolved::At { addr: *a, label });
            }
            Target::Symbol {
                library,
                name,
                offset,
            } => (library, name, *offset),
        };
        if let Some(l) = library {
            if !self.syms.files().iter().any(|p| library_matches(l, p)) {
                return Ok(Resolved::NotLoaded(l.clone()));
            }
        }
        let loc = match self.syms.resolve(library.as_deref(), name) {
            Ok(loc) => loc,
            Err(ResolveError::IndirectFunction { name: n, .. }) if offset != 0 => {
                return Err(ProbeError::IndirectOffset(n));
            }
            Err(e @ ResolveError::IndirectFunction { .. }) => {
                self.chosen_implementation(&e).ok_or(e)?
            }
            Err(e) => return Err(e.into()),
        };
        if offset != 0 && loc.size != 0 && offset >= loc.size {
            return Err(ProbeError::PastEnd {
                offset,
                name: loc.name,
                size: loc.size,
            });
        }
        let mut label = format!("{}:{}", file_name(&loc.file), loc.name);
        if offset != 0 {
            label.push_str(&format!("+{offset:#x}"));
        }
        Ok(Resolved::At {
            addr: loc.start + offset,
            label,
        })
    }

    /// Every function matching `pattern` (in `library`, or everywhere), indirect ones at
    /// their chosen implementation. `Err(UnknownLibrary)`: the library is not mapped.
    pub(super) fn resolve_pattern(
        &self,
        library: Option<&str>,
        pattern: &str,
    ) -> Result<Vec<Located>, ResolveError> {
        let mut found = self.syms.resolve_pattern(library, pattern)?;
        let indirect = self.syms.indirect_matching(library, pattern);
        found.extend(
            indirect
                .iter()
                .filter_map(|e| self.chosen_implementation(e)),
        );
        Ok(found)
    }

    /// Where the indirect function of `indirect` ([`ResolveError::IndirectFunction`])
    /// is implemented in the process, read from the GOT slot the loader filled: `None`
    /// without a slot, or unless the slot holds code of the same file (not relocated
    /// yet, or something else).
    fn chosen_implementation(&self, indirect: &ResolveError) -> Option<Located> {
        let ResolveError::IndirectFunction {
            name,
            file,
            slot: Some(slot),
        } = indirect
        else {
            return None;
        };
        let mem = std::fs::File::open(format!("/proc/{}/mem", self.pid)).ok()?;
        let mut buf = [0u8; 8];
        mem.read_exact_at(&mut buf, *slot).ok()?;
        let start = u64::from_le_bytes(buf);
        let region = self.syms.maps().find(start)?;
        (region.exec && region.path == *file).then(|| Located {
            name: name.clone(),
            start,
            size: 0,
            file: file.clone(),
        })
    }
}

/// A spec whose library is not mapped: check that the library exists on disk and has
/// the function (or, for a pattern, some function that matches), so that a typo fails
/// now.
pub(super) fn check_on_disk(
    spec: &ProbeSpec,
    library: &str,
    ld_library_path: Option<&str>,
) -> Result<(), ProbeError> {
    let path = crate::libs::find(library, ld_library_path)?;
    let Target::Symbol { name, .. } = &spec.target else {
        return Ok(());
    };
    let elf = ElfSymbols::load(&path.to_string_lossy()).map_err(|e| ProbeError::Unreadable {
        path: path.clone(),
        why: e.to_string(),
    })?;
    if is_wildcard(name) {
        if elf.matching(name).is_empty() {
            return Err(ProbeError::NoMatchIn {
                path,
                pattern: name.clone(),
            });
        }
    } else if elf.is_ifunc(name) {
        // As `ProcessSymbols::resolve`: the indirect function wins over a plain one.
        if elf.ifunc_slot(name).is_none() {
            return Err(ProbeError::IndirectUnknown {
                name: name.clone(),
                path,
            });
        }
    } else if elf.by_name(name).is_empty() {
        return Err(ProbeError::NoFunction {
            near: near_names(elf.funcs(), name),
            name: name.clone(),
            path,
        });
    }
    Ok(())
}
