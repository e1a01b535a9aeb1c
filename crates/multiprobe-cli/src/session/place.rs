//! One placement in one process: resolve every spec that is not placed yet, then
//! register the handlers of each site in one batch.
//!
//! Resolving everything first means a name that does not resolve fails the first
//! placement before anything is armed. Registering per site (all the specs and actions
//! that landed on one address, in command-line order) costs time linear in the number
//! of handlers, however many share a site ([`multiprobe_core::Registry::register_batch`]
//! publishes each site's list once); a site that cannot be probed fails every spec on
//! it, with the backend's reason. A detach requested meanwhile (a signal) stops the
//! placement between two sites. A USDT site's semaphore is raised once its handlers are
//! in (the backend lowers it again at detach).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use multiprobe_core::Error as CoreError;
use multiprobe_symbols::{file_name, MappedAt, ProcessSymbols, ResolveError};

use super::programs;
use super::resolve::{check_on_disk, Resolved, Resolver};
use super::rows::{Failure, RowId, Status};
use super::{Scope, Session};
use crate::actions::{self, Args, Binding, SiteCtx};
use crate::error::{Error, ProbeError};
use crate::spec::{is_wildcard, Target};

/// The rows of one spec (or one match) to register at `addr`.
struct Want {
    spec: usize,
    rows: Vec<RowId>,
    addr: u64,
    mapped: Option<MappedAt>,
    label: String,
    file: Option<String>,
    per_match: bool,
    args: Args,
    semaphore: Option<u64>,
}

/// A pattern's matches in this placement: how many are probed, which could not be.
#[derive(Default)]
struct Matches {
    placed: usize,
    failed: Vec<(String, Vec<RowId>, ProbeError)>,
}

/// What one placement does, shared by its steps.
struct Placement<'a> {
    proc: usize,
    scope: Scope,
    first: bool,
    r: Resolver<'a>,
}

impl Session {
    /// Place every spec of process `proc` that is not placed yet. With `first`,
    /// anything that cannot be placed now and never could be is fatal (`self.fatal`);
    /// later, such specs are reported once and left out.
    pub(super) fn place(&mut self, proc: usize, scope: Scope, first: bool, syms: &ProcessSymbols) {
        let program = self.procs[proc].program.clone();
        let pl = Placement {
            proc,
            scope,
            first,
            r: Resolver {
                syms,
                pid: self.procs[proc].pid,
                scope,
                main: program.as_deref(),
            },
        };
        let mut wants = Vec::new();
        let mut patterns: Vec<Option<Matches>> = (0..self.specs.len()).map(|_| None).collect();
        for (i, matches) in patterns.iter_mut().enumerate() {
            if self.cancelled() {
                return;
            }
            let fatal = if self.specs[i].per_match() {
                let m = matches.insert(Matches::default());
                self.plan_matches(&pl, i, &mut wants, m)
            } else {
                self.plan(&pl, i, &mut wants)
            };
            if fatal {
                return;
            }
        }
        if self.register(&pl, wants, &mut patterns) {
            return;
        }
        for (i, m) in patterns.into_iter().enumerate() {
            let Some(m) = m else { continue };
            if self.report_matches(&pl, i, m) {
                return;
            }
        }
    }

    /// The programs the session may run that could have what a spec names: the first
    /// program and the ones its command line names.
    fn programs(&self, proc: usize) -> Vec<PathBuf> {
        let mut p: Vec<PathBuf> = self.procs[proc].program.iter().map(PathBuf::from).collect();
        p.extend(self.cmd_programs.iter().cloned());
        p
    }

    /// A spec whose file is not mapped: pending if the file is on disk and has it (at
    /// the first placement; later it was checked already). Returns true if fatal.
    fn pending_on_disk(&mut self, pl: &Placement<'_>, i: usize, file: &str) -> bool {
        if !pl.first {
            return false;
        }
        let programs = self.programs(pl.proc);
        let ld = self.ld_library_path.as_deref();
        match check_on_disk(&self.specs[i], file, ld, &programs) {
            Ok(path) => {
                // Said once, as gdb's "breakpoint pending on future shared library load".
                let pid = self.procs[pl.proc].pid;
                let msg = format!(
                    "probe {:?}: {} is not loaded; pending until the program loads it",
                    self.specs[i].text,
                    path.display()
                );
                self.note_once(pid, i, "not loaded", &msg);
                false
            }
            Err(e) => self.fatal(i, e),
        }
    }

    /// A bare name that no mapped file has at the first placement: pending if a
    /// program the command line names has it (an `exec` will bring it), else fatal.
    /// Returns true if fatal.
    fn not_here(&mut self, pl: &Placement<'_>, i: usize, why: ProbeError) -> bool {
        let name = match &self.specs[i].target {
            Target::Symbol {
                library: None,
                name,
                ..
            } => name.clone(),
            _ => return self.give_up(pl, i, why, Failure::NoSuchFunction),
        };
        if pl.first {
            if let Some(p) = programs::having(&self.cmd_programs, &name, is_wildcard(&name)) {
                let pid = self.procs[pl.proc].pid;
                let text = &self.specs[i].text;
                let here = self.procs[pl.proc].program.as_deref().map_or("", file_name);
                let msg = format!(
                    "probe {text:?}: not in {here} or its libraries; pending until {} \
                     (named in the command line) is executed",
                    p.display()
                );
                self.note_once(pid, i, "elsewhere", &msg);
                return false;
            }
        }
        self.give_up(pl, i, why, Failure::NoSuchFunction)
    }

    /// Plan plain spec `i`. Returns true if that was fatal.
    fn plan(&mut self, pl: &Placement<'_>, i: usize, wants: &mut Vec<Want>) -> bool {
        let proc = pl.proc;
        if !matches!(self.procs[proc].rows.spec_status(i), Status::Pending) {
            return false;
        }
        match pl.r.resolve(&self.specs[i]) {
            Ok(Resolved::Later) => false,
            Ok(Resolved::NotLoaded(file)) => self.pending_on_disk(pl, i, &file),
            Ok(Resolved::At { addr, label, file }) => {
                wants.push(Want {
                    spec: i,
                    rows: self.procs[proc].rows.of_spec(i).to_vec(),
                    addr,
                    mapped: pl.r.syms.maps().mapped_at(addr),
                    label,
                    file,
                    per_match: false,
                    args: Args::Abi,
                    semaphore: None,
                });
                false
            }
            Err(e @ ProbeError::Resolve(ResolveError::UnknownSymbol { .. }))
            | Err(e @ ProbeError::Stripped { .. }) => self.not_here(pl, i, e),
            Err(e) => self.give_up(pl, i, e, Failure::Unresolved),
        }
    }

    /// Plan the matches of pattern or USDT spec `i` that are not probed yet. Returns
    /// true if that was fatal.
    fn plan_matches(
        &mut self,
        pl: &Placement<'_>,
        i: usize,
        wants: &mut Vec<Want>,
        m: &mut Matches,
    ) -> bool {
        let found: Vec<Found> = match &self.specs[i].target {
            Target::Symbol { library, name, .. } => {
                match pl.r.resolve_pattern(library.as_deref(), name) {
                    Ok(f) => f
                        .into_iter()
                        .map(|loc| Found {
                            label: format!("{}:{}", file_name(&loc.file), loc.name),
                            addr: loc.start,
                            file: loc.file,
                            args: Args::Abi,
                            semaphore: None,
                        })
                        .collect(),
                    // The library is not loaded (yet): pending, if it exists and has a
                    // match.
                    Err(ResolveError::UnknownLibrary { library: l, .. }) => {
                        return self.pending_on_disk(pl, i, &l);
                    }
                    Err(e) => return pl.first && self.fatal(i, e.into()),
                }
            }
            Target::Usdt { scope, name } => match pl.r.usdt(scope, name) {
                Ok(f) => f
                    .into_iter()
                    .map(|u| Found {
                        label: u.label,
                        addr: u.addr,
                        file: u.file,
                        args: Args::Usdt(u.args.into()),
                        semaphore: u.semaphore,
                    })
                    .collect(),
                Err(file) if pl.scope == Scope::Exec => {
                    let _ = file;
                    return false;
                }
                Err(file) => return self.pending_on_disk(pl, i, &file),
            },
            _ => unreachable!("only patterns and USDT specs have matches"),
        };
        let proc = pl.proc;
        if found.is_empty() {
            // Only the first placement says so: later ones (a `dlopen`, a new program)
            // may simply not have it.
            if !pl.first || pl.scope == Scope::Exec || !self.procs[proc].rows.of_spec(i).is_empty()
            {
                return false;
            }
            let why = match &self.specs[i].target {
                Target::Usdt { .. } => ProbeError::NoUsdtHere(self.specs[i].target.to_string()),
                Target::Symbol { name, .. } => ProbeError::NoMatch(name.clone()),
                _ => unreachable!(),
            };
            if let Target::Symbol { library: None, .. } = &self.specs[i].target {
                return self.not_here(pl, i, why);
            }
            return pl.first && self.fatal(i, why);
        }
        for f in found {
            let rows = &mut self.procs[proc].rows;
            match rows.match_status(i, &f.label) {
                Some(Status::Armed(p)) if p.site == f.addr => {
                    m.placed += 1;
                    continue;
                }
                Some(Status::Failed(_)) => continue,
                _ => {}
            }
            wants.push(Want {
                spec: i,
                rows: rows.of_match(i, &f.label),
                addr: f.addr,
                mapped: pl.r.syms.maps().mapped_at(f.addr),
                label: f.label,
                file: Some(f.file),
                per_match: true,
                args: f.args,
                semaphore: f.semaphore,
            });
        }
        false
    }

    /// Register what was planned, one batch per site. Returns true if that was fatal.
    fn register(
        &mut self,
        pl: &Placement<'_>,
        wants: Vec<Want>,
        patterns: &mut [Option<Matches>],
    ) -> bool {
        let mut order: Vec<u64> = Vec::new();
        let mut sites: HashMap<u64, Vec<Want>> = HashMap::new();
        for w in wants {
            sites
                .entry(w.addr)
                .or_insert_with(|| {
                    order.push(w.addr);
                    Vec::new()
                })
                .push(w);
        }
        let proc = pl.proc;
        for addr in order {
            if self.cancelled() {
                return false;
            }
            let group = sites.remove(&addr).unwrap_or_default();
            let mut requests = Vec::new();
            let p = &self.procs[proc];
            for w in &group {
                let label: Arc<str> = Arc::from(w.label.as_str());
                let ctx = Arc::new(SiteCtx {
                    filters: self.specs[w.spec].filters.clone(),
                    args: w.args.clone(),
                });
                requests.extend(w.rows.iter().map(|&r| {
                    actions::request(
                        addr,
                        Binding {
                            action: p.rows.action(r),
                            label: Arc::clone(&label),
                            pid: p.pid,
                            ctx: Arc::clone(&ctx),
                            state: p.rows.state(r),
                            stacks: Arc::clone(&p.stacks),
                            sink: Arc::clone(&self.sink),
                            time: self.time,
                            collected: self.collected.clone(),
                        },
                    )
                }));
            }
            let why = match p.registry.register_batch(requests) {
                Ok(guards) => {
                    let mut ids = guards.into_iter().map(|g| g.into_id());
                    let registry = p.registry.clone();
                    for w in group {
                        let n = w.rows.len();
                        let rows = &mut self.procs[proc].rows;
                        let file = w.file.as_deref();
                        rows.armed(
                            &w.rows,
                            ids.by_ref().take(n),
                            addr,
                            w.mapped,
                            &w.label,
                            file,
                        );
                        if w.per_match {
                            matches_of(patterns, w.spec).placed += 1;
                        }
                        if let Some(sem) = w.semaphore {
                            if let Err(e) = registry.backend().raise_semaphore(sem) {
                                let text = &self.specs[w.spec].text;
                                let pid = self.procs[proc].pid;
                                self.sink.note_for(
                                    Some(pid),
                                    &format!(
                                        "probe {text:?}: its semaphore at {sem:#x} could not be \
                                         set ({e}): the program may skip the probe"
                                    ),
                                );
                            }
                        }
                    }
                    continue;
                }
                Err(CoreError::Batch { source, .. }) => Arc::new(*source),
                Err(e) => Arc::new(e),
            };
            for w in group {
                let e = ProbeError::Register(Arc::clone(&why));
                if w.per_match {
                    matches_of(patterns, w.spec)
                        .failed
                        .push((w.label, w.rows, e));
                } else if self.give_up(pl, w.spec, e, Failure::CannotProbe) {
                    return true;
                }
            }
        }
        false
    }

    /// Say how many of pattern spec `i`'s matches could not be probed, if any: fatal at
    /// the first placement when none could (returns true).
    fn report_matches(&mut self, pl: &Placement<'_>, i: usize, m: Matches) -> bool {
        let total = m.placed + m.failed.len();
        let failed = m.failed.len();
        let mut failures = m.failed.into_iter();
        let Some((label, rows, first_error)) = failures.next() else {
            return false;
        };
        let proc = pl.proc;
        self.procs[proc].rows.failed(&rows, Failure::CannotProbe);
        for (_, rows, _) in failures {
            self.procs[proc].rows.failed(&rows, Failure::CannotProbe);
        }
        let why = ProbeError::SomeUnprobeable {
            failed,
            total,
            label,
            first: Box::new(first_error),
        };
        if pl.first && m.placed == 0 {
            return self.fatal(i, why);
        }
        let text = &self.specs[i].text;
        let pid = self.procs[proc].pid;
        self.sink
            .note_for(Some(pid), &format!("probe {text:?}: {why}"));
        false
    }

    /// Spec `spec` cannot be placed: at the first placement that is fatal (returns true:
    /// stop placing); later it is said once and its rows marked failed.
    fn give_up(
        &mut self,
        pl: &Placement<'_>,
        spec: usize,
        why: ProbeError,
        failure: Failure,
    ) -> bool {
        if pl.first {
            return self.fatal(spec, why);
        }
        let text = self.specs[spec].text.clone();
        let pid = self.procs[pl.proc].pid;
        self.note_once(pid, spec, "failed", &format!("probe {text:?}: {why}"));
        let rows = self.procs[pl.proc].rows.of_spec(spec).to_vec();
        self.procs[pl.proc].rows.failed(&rows, failure);
        false
    }

    /// The first placement fails with spec `spec`'s `why`. Returns true.
    fn fatal(&mut self, spec: usize, why: ProbeError) -> bool {
        self.fatal = Some(Error::Probe {
            spec: self.specs[spec].text.clone(),
            why,
        });
        true
    }
}

/// One match of a pattern or USDT spec.
struct Found {
    label: String,
    addr: u64,
    file: String,
    args: Args,
    semaphore: Option<u64>,
}

fn matches_of(patterns: &mut [Option<Matches>], spec: usize) -> &mut Matches {
    patterns[spec]
        .as_mut()
        .expect("every pattern spec planned has its tally")
}
