//! Placing the probes of a command line in a traced process, and keeping account of them.
//!
//! A spec becomes one handler per action on its site. Placement happens when the
//! program's own code is about to run: for `run`, with the program held at its entry
//! point (the dynamic loader has mapped every startup library by then); for `attach`, at
//! once. A spec on a library that is not mapped then, but exists on
//! disk, is *pending*: an internal probe on the loader's `_dl_debug_state` (which
//! `dlopen` calls after mapping) tries again. At the first placement any spec that does
//! not resolve is fatal — the caller kills a spawned program before it ran its code, or
//! detaches from an attached one — so a typo never leaves a half-probed program behind.
//! The same hook sees `dlclose`: the probes of a library that is no longer mapped are
//! unregistered (their counts carried) and pending again, so they come back if the
//! library is loaded again, as gdb's breakpoints do.
//!
//! A spec whose symbol is a wildcard pattern (`libc:str*`) becomes one site per matching
//! function, each with the spec's actions; every placement (start, `dlopen`, `exec`)
//! probes the matches that are not probed yet. At the first placement a pattern that
//! matches nothing is fatal; functions that cannot be probed are left out with one line
//! saying how many and why (unless none could be).
//!
//! Invariants (under the `State` mutex): every row belongs to one (spec, action) — for a
//! pattern, to one (spec, action, function) once the pattern matched something; a row
//! with a handler id is registered in the registry, at `site`, where `mapped` was mapped
//! when it was placed; `carried` holds the statistics of registrations that ended (an
//! exec replaced the image, or the library was unloaded).

use std::sync::{Arc, Mutex, MutexGuard};

use multiprobe_backend_ptrace::PtraceBackend;
use multiprobe_core::{HandlerId, HandlerInfo, Hit, PreAction, Registry};
use multiprobe_symbols::{
    file_name, library_matches, near_names, ElfSymbols, Located, MappedAt, Maps, ProcessSymbols,
    ResolveError, SymbolCache,
};

use crate::actions::{ActionHandler, Sink};
use crate::output::Row;
use crate::spec::{is_wildcard, Action, ProbeSpec, Target};

/// The dynamic loader's hook that `dlopen` and `dlclose` call after changing the maps.
const LOADER: &str = "ld-linux-x86-64.so.2";
const LOADER_HOOK: &str = "_dl_debug_state";

#[derive(Debug)]
struct RowState {
    spec: usize,
    action: Action,
    site: Option<u64>,
    mapped: Option<MappedAt>,
    symbol: String,
    id: Option<HandlerId>,
    carried_hits: u64,
    carried_missed: u64,
    state: String,
}

/// Everything the placement hooks and the command share.
#[derive(Debug)]
pub struct State {
    specs: Vec<ProbeSpec>,
    rows: Vec<RowState>,
    registry: Registry<PtraceBackend>,
    pid: i32,
    cache: Arc<SymbolCache>,
    sink: Arc<Sink>,
    ld_library_path: Option<String>,
    /// The first error of the first placement: the run must end.
    fatal: Option<String>,
    /// Internal handlers (the loader hook), not shown in the summary.
    hooks: Vec<HandlerId>,
    loader_hooked: bool,
    /// Specs whose library was unloaded once (said once, not at every `dlclose`).
    unload_noted: Vec<usize>,
}

/// Shared handle on the [`State`].
pub type Shared = Arc<Mutex<State>>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

/// How a spec resolved (or why not yet).
enum Resolved {
    At {
        addr: u64,
        label: String,
    },
    /// Its library is not mapped (yet).
    NotLoaded(String),
}

impl State {
    /// A placement plan for `specs` in process `pid`.
    pub fn new(
        specs: Vec<ProbeSpec>,
        registry: Registry<PtraceBackend>,
        pid: i32,
        sink: Arc<Sink>,
        ld_library_path: Option<String>,
    ) -> Shared {
        let rows = specs
            .iter()
            .enumerate()
            .flat_map(|(i, s)| {
                s.actions.iter().map(move |&action| RowState {
                    spec: i,
                    action,
                    site: None,
                    mapped: None,
                    symbol: s.target.to_string(),
                    id: None,
                    carried_hits: 0,
                    carried_missed: 0,
                    state: "pending".into(),
                })
            })
            .collect();
        Arc::new(Mutex::new(State {
            specs,
            rows,
            registry,
            pid,
            cache: Arc::new(SymbolCache::default()),
            sink,
            ld_library_path,
            fatal: None,
            hooks: Vec::new(),
            loader_hooked: false,
            unload_noted: Vec::new(),
        }))
    }

    fn resolve(&self, syms: &ProcessSymbols, spec: &ProbeSpec) -> Result<Resolved, String> {
        match &spec.target {
            Target::Address(a) => {
                let label = match syms.locate(*a) {
                    Some(l) if l.start == *a => format!("{}:{}", file_name(&l.file), l.name),
                    Some(l) => format!("{}:{}+{:#x}", file_name(&l.file), l.name, a - l.start),
                    None => format!("{a:#x}"),
                };
                Ok(Resolved::At { addr: *a, label })
            }
            Target::Symbol {
                library,
                name,
                offset,
            } => {
                if let Some(l) = library {
                    if !syms.files().iter().any(|p| library_matches(l, p)) {
                        return Ok(Resolved::NotLoaded(l.clone()));
                    }
                }
                let loc = match syms.resolve(library.as_deref(), name) {
                    Ok(loc) => loc,
                    Err(ResolveError::IndirectFunction { name: n, .. }) if *offset != 0 => {
                        return Err(format!(
                            "{n:?} is a GNU indirect function: an offset into it is not \
                             supported (probe its implementation by address)"
                        ));
                    }
                    Err(e @ ResolveError::IndirectFunction { .. }) => self
                        .chosen_implementation(syms, &e)
                        .ok_or_else(|| e.to_string())?,
                    Err(e) => return Err(e.to_string()),
                };
                if *offset != 0 && loc.size != 0 && *offset >= loc.size {
                    return Err(format!(
                        "offset {offset:#x} is past the end of {} ({} bytes)",
                        loc.name, loc.size
                    ));
                }
                let mut label = format!("{}:{}", file_name(&loc.file), loc.name);
                if *offset != 0 {
                    label.push_str(&format!("+{offset:#x}"));
                }
                Ok(Resolved::At {
                    addr: loc.start + offset,
                    label,
                })
            }
        }
    }

    /// Where the indirect function of `indirect` ([`ResolveError::IndirectFunction`])
    /// is implemented in the process, read from the GOT slot the loader filled: `None`
    /// without a slot, or unless the slot holds code of the same file (not relocated
    /// yet, or something else).
    fn chosen_implementation(
        &self,
        syms: &ProcessSymbols,
        indirect: &ResolveError,
    ) -> Option<Located> {
        use std::os::unix::fs::FileExt;
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
        let region = syms.maps().find(start)?;
        (region.exec && region.path == *file).then(|| Located {
            name: name.clone(),
            start,
            size: 0,
            file: file.clone(),
        })
    }

    /// A spec whose library is not mapped: at the first placement, check that the
    /// library exists on disk and has the function (or, for a pattern, some function
    /// that matches), so that a typo fails now.
    fn check_pending(&self, spec: &ProbeSpec, library: &str) -> Result<(), String> {
        let Some(path) = crate::libs::find(library, self.ld_library_path.as_deref()) else {
            return Err(format!(
                "no library {library:?} is loaded or installed (searched LD_LIBRARY_PATH, \
                 /etc/ld.so.conf and the default directories)"
            ));
        };
        let Target::Symbol { name, .. } = &spec.target else {
            return Ok(());
        };
        let elf = ElfSymbols::load(&path.to_string_lossy())
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if is_wildcard(name) {
            if elf.matching(name).is_empty() {
                return Err(format!(
                    "no function in {} matches {name:?}",
                    path.display()
                ));
            }
        } else if elf.is_ifunc(name) {
            // As `ProcessSymbols::resolve`: the indirect function wins over a plain one.
            if elf.ifunc_slot(name).is_none() {
                return Err(format!(
                    "{name:?} in {} is a GNU indirect function (its implementation is \
                     chosen when the library is loaded) and the library does not say which \
                     it chose: probe it by address",
                    path.display()
                ));
            }
        } else if elf.by_name(name).is_empty() {
            let near = near_names(elf.funcs(), name);
            let hint = if near.is_empty() {
                String::new()
            } else {
                format!("; did you mean {}?", near.join(", "))
            };
            return Err(format!(
                "no function named {name:?} in {}{hint}",
                path.display()
            ));
        }
        Ok(())
    }

    /// Place every spec that is not placed yet. With `first`, anything that cannot be
    /// placed now and never could be is fatal; later, such specs are reported once and
    /// left out.
    fn place(&mut self, first: bool, syms: &ProcessSymbols) {
        for i in 0..self.specs.len() {
            let spec = self.specs[i].clone();
            if let Target::Symbol { library, name, .. } = &spec.target {
                if is_wildcard(name) {
                    let library = library.clone();
                    self.place_pattern(i, syms, library.as_deref(), name, first);
                    if self.fatal.is_some() {
                        return;
                    }
                    continue;
                }
            }
            if self
                .rows
                .iter()
                .any(|r| r.spec == i && (r.id.is_some() || r.state.starts_with("failed")))
            {
                continue;
            }
            let fail = |why: String| format!("probe {:?}: {why}", spec.text);
            match self.resolve(syms, &spec) {
                Ok(Resolved::NotLoaded(library)) => {
                    if first {
                        if let Err(e) = self.check_pending(&spec, &library) {
                            self.fatal = Some(fail(e));
                            return;
                        }
                    }
                }
                Ok(Resolved::At { addr, label }) => {
                    let mapped = syms.maps().mapped_at(addr);
                    if let Err(e) = self.register(i, addr, mapped, &label) {
                        if self.give_up(i, first, fail(e), "failed") {
                            return;
                        }
                    }
                }
                Err(e) => {
                    if self.give_up(i, first, fail(e), "failed: no such function") {
                        return;
                    }
                }
            }
        }
    }

    /// Probe every function matching `pattern` that is not probed yet (see the module
    /// docs).
    fn place_pattern(
        &mut self,
        i: usize,
        syms: &ProcessSymbols,
        library: Option<&str>,
        pattern: &str,
        first: bool,
    ) {
        let text = self.specs[i].text.clone();
        let fail = |why: String| format!("probe {text:?}: {why}");
        let mut found = match syms.resolve_pattern(library, pattern) {
            Ok(f) => f,
            // The library is not loaded (yet): pending, if it exists and has a match.
            Err(ResolveError::UnknownLibrary { library: l, .. }) => {
                if first {
                    let spec = self.specs[i].clone();
                    if let Err(e) = self.check_pending(&spec, &l) {
                        self.fatal = Some(fail(e));
                    }
                }
                return;
            }
            Err(e) => {
                if first {
                    self.fatal = Some(fail(e.to_string()));
                }
                return;
            }
        };
        // Indirect functions, at the implementation the loader chose (if it did yet).
        let indirect = syms.indirect_matching(library, pattern);
        found.extend(
            indirect
                .iter()
                .filter_map(|e| self.chosen_implementation(syms, e)),
        );
        if found.is_empty() {
            if first {
                self.fatal = Some(fail(format!("no function matches {pattern:?}")));
            }
            return;
        }
        let mut placed = 0;
        let mut failed: Vec<(String, String)> = Vec::new();
        for loc in found {
            let here = |r: &RowState| r.spec == i && r.id.is_some() && r.site == Some(loc.start);
            if self.rows.iter().any(here) {
                placed += 1;
                continue;
            }
            let label = format!("{}:{}", file_name(&loc.file), loc.name);
            let rows = self.pattern_rows(i, &label);
            let mapped = syms.maps().mapped_at(loc.start);
            match self.register_rows(&rows, loc.start, mapped, &label) {
                Ok(()) => placed += 1,
                Err(e) => failed.push((label, e)),
            }
        }
        // The placeholders of a pattern that now has sites, if they counted nothing.
        let spec_text = self.specs[i].target.to_string();
        self.rows.retain(|r| {
            !(placed > 0
                && r.spec == i
                && r.id.is_none()
                && r.site.is_none()
                && r.symbol == spec_text
                && r.carried_hits == 0
                && r.carried_missed == 0)
        });
        if let Some((label, e)) = failed.first() {
            let msg = fail(format!(
                "{} of {} matching functions could not be probed (first: {label}: {e})",
                failed.len(),
                failed.len() + placed
            ));
            if first && placed == 0 {
                self.fatal = Some(msg);
            } else {
                self.sink.write(&format!("multiprobe: {msg}"));
            }
        }
    }

    /// The rows of pattern spec `i` for the function `label`, one per action: those left
    /// from an earlier placement (an `exec` or `dlclose` made them pending), else new.
    fn pattern_rows(&mut self, i: usize, label: &str) -> Vec<usize> {
        let old: Vec<usize> = (0..self.rows.len())
            .filter(|&r| {
                let row = &self.rows[r];
                row.spec == i && row.id.is_none() && row.symbol == label
            })
            .collect();
        if !old.is_empty() {
            return old;
        }
        let actions = self.specs[i].actions.clone();
        actions
            .into_iter()
            .map(|action| {
                self.rows.push(RowState {
                    spec: i,
                    action,
                    site: None,
                    mapped: None,
                    symbol: label.to_string(),
                    id: None,
                    carried_hits: 0,
                    carried_missed: 0,
                    state: "pending".into(),
                });
                self.rows.len() - 1
            })
            .collect()
    }

    /// Spec `spec` cannot be placed: at the first placement that is fatal (returns true:
    /// stop placing); later it is said once and its rows marked with `state`.
    fn give_up(&mut self, spec: usize, first: bool, msg: String, state: &str) -> bool {
        if first {
            self.fatal = Some(msg);
            return true;
        }
        self.sink.write(&format!("multiprobe: {msg}"));
        for r in self.rows.iter_mut().filter(|r| r.spec == spec) {
            r.state = state.into();
        }
        false
    }

    fn register(
        &mut self,
        spec: usize,
        addr: u64,
        mapped: Option<MappedAt>,
        label: &str,
    ) -> Result<(), String> {
        let rows: Vec<usize> = (0..self.rows.len())
            .filter(|&r| self.rows[r].spec == spec)
            .collect();
        self.register_rows(&rows, addr, mapped, label)
    }

    /// One handler per row (its action) at `addr`: all of them or none.
    fn register_rows(
        &mut self,
        rows: &[usize],
        addr: u64,
        mapped: Option<MappedAt>,
        label: &str,
    ) -> Result<(), String> {
        let label: Arc<str> = Arc::from(label);
        let mut ids = Vec::new();
        for &r in rows {
            let h = ActionHandler::new(
                self.rows[r].action,
                Arc::clone(&label),
                Arc::clone(&self.sink),
            );
            match self.registry.register_handler(addr, h) {
                Ok(g) => ids.push(g.into_id()),
                Err(e) => {
                    // All of a spec's actions or none.
                    let _ = self.registry.unregister_batch(&ids);
                    return Err(e.to_string());
                }
            }
        }
        for (&r, id) in rows.iter().zip(ids) {
            let row = &mut self.rows[r];
            row.site = Some(addr);
            row.mapped = mapped.clone();
            row.symbol = label.to_string();
            row.id = Some(id);
            row.state = "armed".into();
        }
        Ok(())
    }

    /// Unregister the probes whose code is no longer mapped where it was (`dlclose`),
    /// carrying their counts, and make them pending again. Called from the loader hook,
    /// inside dispatch: the handlers are unlinked at once (the grace period is not waited
    /// for, and nothing else runs them: hits are served on this thread).
    fn forget_unloaded(&mut self, maps: &Maps) {
        let mut gone = Vec::new();
        for row in &mut self.rows {
            let (Some(id), Some(site)) = (row.id, row.site) else {
                continue;
            };
            let now = maps.mapped_at(site);
            if row.mapped.is_none() || now == row.mapped {
                continue;
            }
            if let Ok(info) = self.registry.handler(id) {
                row.carried_hits += info.stats.hits;
                row.carried_missed += info.stats.missed;
            }
            // `InsideDispatch` means unlinked, not waited for; the breakpoint went with
            // the code (the backend writes nothing there).
            let _ = self.registry.unregister(id);
            row.id = None;
            row.site = None;
            row.mapped = None;
            row.state = "pending".into();
            if !gone.contains(&row.spec) {
                gone.push(row.spec);
            }
        }
        for spec in gone {
            if self.unload_noted.contains(&spec) {
                continue;
            }
            self.unload_noted.push(spec);
            let text = &self.specs[spec].text;
            self.sink.write(&format!(
                "multiprobe: probe {text:?}: its code was unloaded; pending until it is loaded again"
            ));
        }
    }

    /// Whether some probe sits in a shared library (which `dlclose` could unload).
    fn any_in_library(&self, maps: &Maps) -> bool {
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.pid)).ok();
        let main = exe.as_ref().map(|p| p.to_string_lossy());
        self.rows.iter().any(|r| {
            r.site.and_then(|a| maps.find(a)).is_some_and(|reg| {
                reg.is_file() && main.as_deref().is_none_or(|m| m != reg.path.as_str())
            })
        })
    }

    fn any_pending(&self) -> bool {
        self.rows
            .iter()
            .any(|r| r.id.is_none() && r.state == "pending")
    }

    /// The first error of the first placement, if any.
    pub fn fatal(&self) -> Option<&str> {
        self.fatal.as_deref()
    }

    /// The process executed a new program: the old image's probes are gone. Carry their
    /// statistics and place them again in the new image.
    pub fn exec(&mut self, unregistered: &[HandlerInfo]) {
        for info in unregistered {
            if let Some(row) = self.rows.iter_mut().find(|r| r.id == Some(info.id)) {
                row.carried_hits += info.stats.hits;
                row.carried_missed += info.stats.missed;
            }
        }
        for row in &mut self.rows {
            row.id = None;
            row.site = None;
            row.mapped = None;
            if !row.state.starts_with("failed") {
                row.state = "pending".into();
            }
        }
        self.hooks.clear();
        self.loader_hooked = false;
    }

    /// The summary rows, with live statistics.
    pub fn rows(&self) -> Vec<Row> {
        let mut rows: Vec<Row> = self
            .rows
            .iter()
            .map(|r| {
                let live = r.id.and_then(|id| self.registry.handler(id).ok());
                let (hits, missed) = live.map_or((0, 0), |i| (i.stats.hits, i.stats.missed));
                let state = match live {
                    Some(i) if !i.enabled => "disabled".into(),
                    _ => r.state.clone(),
                };
                Row {
                    site: r.site,
                    symbol: r.symbol.clone(),
                    action: r.action.to_string(),
                    hits: r.carried_hits + hits,
                    missed: r.carried_missed + missed,
                    state,
                }
            })
            .collect();
        rows.sort_by_key(|r| r.site.unwrap_or(u64::MAX));
        rows
    }
}

/// Place everything now (for `attach`, or the hook's own use); then watch the loader
/// for pending libraries, and for libraries with probes being unloaded.
pub fn place_now(shared: &Shared, first: bool) {
    let mut s = lock(shared);
    // One read of the maps serves the whole placement: what went, what came, and where
    // the probes are.
    let syms = match ProcessSymbols::read(s.pid as u32, Arc::clone(&s.cache)) {
        Ok(syms) => syms,
        Err(e) => {
            if first {
                s.fatal = Some(format!("cannot read the maps of process {}: {e}", s.pid));
            }
            return; // later: gone, its exit comes next
        }
    };
    if !first {
        s.forget_unloaded(syms.maps());
    }
    s.place(first, &syms);
    if s.fatal.is_some() || s.loader_hooked {
        return;
    }
    if s.any_pending() || s.any_in_library(syms.maps()) {
        s.loader_hooked = true;
        drop(s);
        hook_loader(shared);
    }
}

/// An internal probe on the dynamic loader's hook (`dlopen` and `dlclose` call it): places
/// pending probes when a library appears, and sets aside those of a library that went.
struct PlaceHook {
    shared: Shared,
}

impl multiprobe_core::Handler for PlaceHook {
    fn pre(&self, _hit: &mut Hit<'_>) -> PreAction {
        place_now(&self.shared, false);
        PreAction::Continue
    }
}

fn hook_loader(shared: &Shared) {
    let (registry, pid, cache, sink) = {
        let s = lock(shared);
        (
            s.registry.clone(),
            s.pid,
            Arc::clone(&s.cache),
            Arc::clone(&s.sink),
        )
    };
    let addr = ProcessSymbols::read(pid as u32, cache)
        .ok()
        .and_then(|syms| syms.resolve(Some(LOADER), LOADER_HOOK).ok())
        .map(|l| l.start);
    let Some(addr) = addr else {
        sink.write("multiprobe: no dynamic loader hook found; pending probes stay pending");
        return;
    };
    let hook = PlaceHook {
        shared: Arc::clone(shared),
    };
    match registry.register_handler(addr, hook) {
        Ok(g) => lock(shared).hooks.push(g.into_id()),
        Err(e) => sink.write(&format!(
            "multiprobe: cannot watch the dynamic loader ({e}); pending probes stay pending"
        )),
    }
}
