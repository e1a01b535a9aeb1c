//! Where a spec is in the process: a name, a file offset or an address resolved with
//! the process's maps and symbols, or USDT probes from the mapped files' notes; a file
//! that is not mapped yet checked on disk instead, so that a typo fails at once while a
//! library `dlopen` will load (or a program an `exec` will bring) is pending.
//!
//! GNU indirect functions (libc's `strlen`, `memcpy`) are probed at the implementation
//! the loader chose, read from the GOT slot it filled, never on their resolver.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use multiprobe_symbols::{
    file_name, glob_match, library_matches, near_names, ElfSymbols, Located, ProcessSymbols,
    ResolveError, UsdtArg, UsdtProbe,
};

use super::programs;
use super::Scope;
use crate::error::ProbeError;
use crate::spec::{is_wildcard, ProbeSpec, Target};

/// Where a plain spec is.
pub(super) enum Resolved {
    /// At `addr`, shown as `label`, in `file`.
    At {
        /// The address.
        addr: u64,
        /// `libc.so.6:malloc`, `prog:main+0x4`, or the address.
        label: String,
        /// The file it is in, if any.
        file: Option<String>,
    },
    /// Its library (or program) is not mapped (yet).
    NotLoaded(String),
    /// Not in this placement's scope (at exec: not the program's own): the next one.
    Later,
}

/// One USDT probe point found for a spec.
pub(super) struct UsdtSite {
    pub(super) addr: u64,
    pub(super) label: String,
    pub(super) file: String,
    /// The semaphore's address in the process.
    pub(super) semaphore: Option<u64>,
    pub(super) args: Vec<Result<UsdtArg, String>>,
}

/// A process's symbols, as one placement sees them.
pub(super) struct Resolver<'a> {
    pub(super) syms: &'a ProcessSymbols,
    pub(super) pid: i32,
    pub(super) scope: Scope,
    /// The program the process runs.
    pub(super) main: Option<&'a str>,
}

impl Resolver<'_> {
    fn mapped(&self, file: &str) -> Option<String> {
        self.syms
            .files()
            .into_iter()
            .find(|p| library_matches(file, p))
            .map(str::to_string)
    }

    /// `file:function+0xoff` for `addr`, or `fallback`.
    fn label_of(&self, addr: u64, fallback: String) -> (String, Option<String>) {
        match self.syms.locate(addr) {
            Some(l) if l.start == addr => {
                (format!("{}:{}", file_name(&l.file), l.name), Some(l.file))
            }
            Some(l) => (
                format!("{}:{}+{:#x}", file_name(&l.file), l.name, addr - l.start),
                Some(l.file),
            ),
            None => {
                let file = self.syms.maps().find(addr).filter(|r| r.is_file());
                (fallback, file.map(|r| r.path.clone()))
            }
        }
    }

    /// Resolve a plain (not pattern, not USDT) spec.
    pub(super) fn resolve(&self, spec: &ProbeSpec) -> Result<Resolved, ProbeError> {
        let (library, name, offset) = match &spec.target {
            Target::Address(a) => {
                if self.scope == Scope::Exec && self.syms.maps().find(*a).is_none() {
                    return Ok(Resolved::Later);
                }
                let (label, file) = self.label_of(*a, format!("{a:#x}"));
                return Ok(Resolved::At {
                    addr: *a,
                    label,
                    file,
                });
            }
            Target::FileOffset { file, offset } => return self.file_offset(file, *offset),
            Target::Usdt { .. } => unreachable!("USDT specs are resolved by usdt()"),
            Target::Symbol {
                library,
                name,
                offset,
            } => (library, name, *offset),
        };
        let library = match (library, self.scope) {
            (Some(l), _) => match self.mapped(l) {
                Some(_) => Some(l.clone()),
                None if self.scope == Scope::Exec => return Ok(Resolved::Later),
                None => return Ok(Resolved::NotLoaded(l.clone())),
            },
            // At exec a bare name is looked for in the program alone (the loader's
            // functions would shadow the libraries' that come next).
            (None, Scope::Exec) => match self.main {
                Some(m) => Some(m.to_string()),
                None => return Ok(Resolved::Later),
            },
            (None, Scope::All) => None,
        };
        let loc = match self.syms.resolve(library.as_deref(), name) {
            Ok(loc) => loc,
            Err(_) if self.scope == Scope::Exec && spec_library(spec).is_none() => {
                return Ok(Resolved::Later)
            }
            Err(ResolveError::IndirectFunction { name: n, .. }) if offset != 0 => {
                return Err(ProbeError::IndirectOffset(n));
            }
            Err(e @ ResolveError::IndirectFunction { .. }) => {
                self.chosen_implementation(&e).ok_or(e)?
            }
            Err(e @ ResolveError::UnknownSymbol { .. }) => return Err(self.stripped(spec, e)),
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
            file: Some(loc.file),
        })
    }

    /// An unknown name in a file without a symbol table says so, and how to probe it
    /// anyway.
    fn stripped(&self, spec: &ProbeSpec, e: ResolveError) -> ProbeError {
        let file = match spec_library(spec) {
            Some(l) => self.mapped(l),
            None => self.main.map(str::to_string),
        };
        let Some(file) = file else { return e.into() };
        let Some((elf, _)) = self.syms.file_symbols(&file) else {
            return e.into();
        };
        if elf.has_symtab() {
            return e.into();
        }
        // A typo of a name it has is a typo, whatever the file.
        let ResolveError::UnknownSymbol { name, near } = &e else {
            return e.into();
        };
        if !near.is_empty() {
            return e.into();
        }
        ProbeError::Stripped {
            name: name.clone(),
            file: PathBuf::from(file),
            exported: elf.funcs().len(),
        }
    }

    /// `FILE:0xOFFSET`: the address where the process maps that offset of the file.
    fn file_offset(&self, file: &str, offset: u64) -> Result<Resolved, ProbeError> {
        let Some(path) = self.mapped(file) else {
            return Ok(if self.scope == Scope::Exec {
                Resolved::Later
            } else {
                Resolved::NotLoaded(file.to_string())
            });
        };
        let region = self
            .syms
            .maps()
            .regions
            .iter()
            .filter(|r| r.path == path)
            .find(|r| r.offset <= offset && offset < r.offset + (r.end - r.start));
        let Some(region) = region else {
            return Err(ProbeError::OffsetNotMapped {
                offset,
                file: PathBuf::from(&path),
            });
        };
        if !region.exec {
            return Err(ProbeError::OffsetNotCode {
                offset,
                file: PathBuf::from(&path),
            });
        }
        let addr = region.start + (offset - region.offset);
        let (label, _) = self.label_of(addr, format!("{}:{offset:#x}", file_name(&path)));
        Ok(Resolved::At {
            addr,
            label,
            file: Some(path),
        })
    }

    /// Every function matching `pattern` (in `library`, or everywhere), indirect ones at
    /// their chosen implementation. `Err(UnknownLibrary)`: the library is not mapped.
    /// At exec, only the program's own (or the named file's, if mapped).
    pub(super) fn resolve_pattern(
        &self,
        library: Option<&str>,
        pattern: &str,
    ) -> Result<Vec<Located>, ResolveError> {
        let library = match (library, self.scope) {
            (Some(l), Scope::Exec) if self.mapped(l).is_none() => return Ok(Vec::new()),
            (None, Scope::Exec) => match self.main {
                Some(m) => Some(m),
                None => return Ok(Vec::new()),
            },
            (l, _) => l,
        };
        let mut found = self.syms.resolve_pattern(library, pattern)?;
        let indirect = self.syms.indirect_matching(library, pattern);
        found.extend(
            indirect
                .iter()
                .filter_map(|e| self.chosen_implementation(e)),
        );
        Ok(found)
    }

    /// The USDT probes of `scope:name` in the mapped files. `Err(file)`: the spec names
    /// a file that is not mapped.
    pub(super) fn usdt(&self, scope: &[String], name: &str) -> Result<Vec<UsdtSite>, String> {
        let files = self.syms.files();
        let (file, provider) = match scope {
            [] => (None, None),
            [one] => {
                // A provider if a mapped file has one of that name, else a file.
                let is_provider = files.iter().any(|f| {
                    self.syms
                        .file_symbols(f)
                        .is_some_and(|(e, _)| e.usdt().iter().any(|p| p.provider == *one))
                });
                if is_provider {
                    (None, Some(one.as_str()))
                } else {
                    (Some(one.as_str()), None)
                }
            }
            [f, p] => (Some(f.as_str()), Some(p.as_str())),
            _ => unreachable!("the parser allows two parts before the name"),
        };
        if let Some(f) = file {
            if self.mapped(f).is_none() {
                return Err(f.to_string());
            }
        }
        let mut out = Vec::new();
        for path in files {
            if file.is_some_and(|f| !library_matches(f, path)) {
                continue;
            }
            let Some((elf, bias)) = self.syms.file_symbols(path) else {
                continue;
            };
            let mut seen: Vec<String> = Vec::new();
            for p in usdt_matching(elf.usdt(), provider, name) {
                let mut label = format!("{}:{}:{}", file_name(path), p.provider, p.name);
                let twins = seen.iter().filter(|s| **s == label).count();
                seen.push(label.clone());
                if twins > 0 {
                    label.push_str(&format!("#{}", twins + 1));
                }
                out.push(UsdtSite {
                    addr: p.addr.wrapping_add(bias),
                    label,
                    file: path.to_string(),
                    semaphore: p.semaphore.map(|s| s.wrapping_add(bias)),
                    args: p.args.clone(),
                });
            }
        }
        Ok(out)
    }

    /// Where the indirect function of `indirect` ([`ResolveError::IndirectFunction`])
    /// is implemented in the process: read from the GOT slot the loader filled, or,
    /// without one, the choice multiprobe's own loader made for the same file
    /// (`super::ifunc`). `None` when neither tells (the slot does not hold code of the
    /// same file yet, and the file or the tunables are not multiprobe's).
    fn chosen_implementation(&self, indirect: &ResolveError) -> Option<Located> {
        let ResolveError::IndirectFunction { name, file, slot } = indirect else {
            return None;
        };
        let from_slot = || {
            let mem = std::fs::File::open(format!("/proc/{}/mem", self.pid)).ok()?;
            let mut buf = [0u8; 8];
            mem.read_exact_at(&mut buf, (*slot)?).ok()?;
            Some(u64::from_le_bytes(buf))
        };
        let from_ours = || super::ifunc::in_process(self.syms, self.pid, file, name);
        let in_file = |start: u64| {
            self.syms
                .maps()
                .find(start)
                .is_some_and(|r| r.exec && r.path == *file)
        };
        let start = from_slot()
            .filter(|&a| in_file(a))
            .or_else(|| from_ours().filter(|&a| in_file(a)))?;
        Some(Located {
            name: name.clone(),
            start,
            size: 0,
            file: file.clone(),
        })
    }
}

fn spec_library(spec: &ProbeSpec) -> Option<&str> {
    match &spec.target {
        Target::Symbol { library, .. } => library.as_deref(),
        _ => None,
    }
}

/// The probes of `probes` that `provider` (any, if `None`) and the name (a pattern)
/// select.
fn usdt_matching<'a>(
    probes: &'a [UsdtProbe],
    provider: Option<&'a str>,
    name: &'a str,
) -> impl Iterator<Item = &'a UsdtProbe> {
    probes
        .iter()
        .filter(move |p| provider.is_none_or(|pr| pr == p.provider))
        .filter(move |p| glob_match(name, &p.name))
}

/// Where on disk the file a spec names (a library or a program) is: the loader's
/// search path, a program on `PATH`, the programs the command line names, and last the
/// library directories below the installation prefix of the program (`/usr/lib/jvm/...`
/// for java, Python's `lib-dynload`).
fn find_file(
    file: &str,
    ld_library_path: Option<&str>,
    programs: &[PathBuf],
) -> Result<PathBuf, ProbeError> {
    let as_library = crate::libs::find(file, ld_library_path);
    match as_library {
        Ok(p) => return Ok(p),
        Err(e @ ProbeError::NotSharedObject(_)) => return Err(e),
        Err(_) => {}
    }
    if let Some(p) = programs::on_path(file).into_iter().next() {
        return Ok(p);
    }
    if let Some(p) = programs
        .iter()
        .find(|p| library_matches(file, &p.to_string_lossy()))
    {
        return Ok(p.clone());
    }
    for prefix in programs.iter().filter_map(|p| install_prefix(p)) {
        if let Some(p) = crate::libs::find_below(&prefix.join("lib"), file, 4) {
            return Ok(p);
        }
    }
    Err(ProbeError::NoLibrary(file.to_string()))
}

/// `/usr` for `/usr/bin/python3.11`, `/usr/lib/jvm/java-17` for `.../java-17/bin/java`.
fn install_prefix(program: &Path) -> Option<PathBuf> {
    let real = std::fs::canonicalize(program).ok()?;
    Some(real.parent()?.parent()?.to_path_buf())
}

/// A spec whose file is not mapped: check that the file exists on disk (see
/// [`find_file`]) and has the function (or, for a pattern, some function that matches;
/// for USDT, a matching probe), so that a typo fails now. `programs`: the programs the
/// session may run (the first one and those its command line names).
pub(super) fn check_on_disk(
    spec: &ProbeSpec,
    file: &str,
    ld_library_path: Option<&str>,
    programs: &[PathBuf],
) -> Result<PathBuf, ProbeError> {
    let path = find_file(file, ld_library_path, programs)?;
    let elf = ElfSymbols::load(&path.to_string_lossy()).map_err(|e| ProbeError::Unreadable {
        path: path.clone(),
        why: e.to_string(),
    })?;
    let name = match &spec.target {
        Target::Symbol { name, .. } => name,
        Target::Usdt { scope, name } => {
            let provider = (scope.len() == 2).then(|| scope[1].as_str());
            if usdt_matching(elf.usdt(), provider, name).next().is_none() {
                return Err(ProbeError::NoUsdt {
                    path,
                    probe: spec.target.to_string(),
                });
            }
            return Ok(path);
        }
        _ => return Ok(path),
    };
    if is_wildcard(name) {
        if elf.matching(name).is_empty() {
            return Err(ProbeError::NoMatchIn {
                path,
                pattern: name.clone(),
            });
        }
    } else if elf.is_ifunc(name) {
        // As `ProcessSymbols::resolve`: the indirect function wins over a plain one.
        let ours = || {
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(&path).ok()?;
            super::ifunc::own_choice((m.dev(), m.ino()), name)
        };
        if elf.ifunc_slot(name).is_none() && ours().is_none() {
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
    Ok(path)
}
