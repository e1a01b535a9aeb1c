//! One placement: resolve every spec that is not placed yet, then register the handlers
//! of each site in one batch.
//!
//! Resolving everything first means a name that does not resolve fails the first
//! placement before anything is armed. Registering per site (all the specs and actions
//! that landed on one address, in command-line order) costs time linear in the number
//! of handlers, however many share a site ([`multiprobe_core::Registry::register_batch`]
//! publishes each site's list once); a site that cannot be probed fails every spec on
//! it, with the backend's reason. A detach requested meanwhile (a signal) stops the
//! placement between two sites.

use std::collections::HashMap;
use std::sync::Arc;

use multiprobe_core::Error as CoreError;
use multiprobe_symbols::{file_name, MappedAt, ProcessSymbols, ResolveError};

use super::resolve::{check_on_disk, Resolved, Resolver};
use super::rows::{Failure, RowId, Status};
use super::Session;
use crate::actions;
use crate::error::{Error, ProbeError};
use crate::spec::Target;

/// The rows of one spec (or one pattern match) to register at `addr`.
struct Want {
    spec: usize,
    rows: Vec<RowId>,
    addr: u64,
    mapped: Option<MappedAt>,
    label: String,
    pattern: bool,
}

/// A pattern's matches in this placement: how many are probed, which could not be.
#[derive(Default)]
struct Matches {
    placed: usize,
    failed: Vec<(String, Vec<RowId>, ProbeError)>,
}

impl Session {
    /// Place every spec that is not placed yet. With `first`, anything that cannot be
    /// placed now and never could be is fatal (`self.fatal`); later, such specs are
    /// reported once and left out.
    pub(super) fn place(&mut self, first: bool, syms: &ProcessSymbols) {
        let resolver = Resolver {
            syms,
            pid: self.pid,
        };
        let mut wants = Vec::new();
        let mut patterns: Vec<Option<Matches>> = (0..self.specs.len()).map(|_| None).collect();
        for (i, matches) in patterns.iter_mut().enumerate() {
            if self.cancelled() {
                return;
            }
            let fatal = if self.specs[i].is_pattern() {
                let m = matches.insert(Matches::default());
                self.plan_pattern(&resolver, i, first, &mut wants, m)
            } else {
                self.plan(&resolver, i, first, &mut wants)
            };
            if fatal {
                return;
            }
        }
        if self.register(wants, first, &mut patterns) {
            return;
        }
        for (i, m) in patterns.into_iter().enumerate() {
            let Some(m) = m else { continue };
            if self.report_matches(i, m, first) {
                return;
            }
        }
    }

    /// Plan plain spec `i`. Returns true if that was fatal.
    fn plan(&mut self, r: &Resolver<'_>, i: usize, first: bool, wants: &mut Vec<Want>) -> bool {
        if !matches!(self.rows.spec_status(i), Status::Pending) {
            return false;
        }
        match r.resolve(&self.specs[i]) {
            Ok(Resolved::NotLoaded(library)) => {
                if first {
                    let ld = self.ld_library_path.as_deref();
                    if let Err(e) = check_on_disk(&self.specs[i], &library, ld) {
                        return self.fatal(i, e);
                    }
                }
                false
            }
            Ok(Resolved::At { addr, label }) => {
                wants.push(Want {
                    spec: i,
                    rows: self.rows.of_spec(i).to_vec(),
                    addr,
                    mapped: r.syms.maps().mapped_at(addr),
                    label,
                    pattern: false,
                });
                false
            }
            Err(e) => self.give_up(i, first, e, Failure::NoSuchFunction),
        }
    }

    /// Plan the matches of pattern spec `i` that are not probed yet. Returns true if
    /// that was fatal.
    fn plan_pattern(
        &mut self,
        r: &Resolver<'_>,
        i: usize,
        first: bool,
        wants: &mut Vec<Want>,
        m: &mut Matches,
    ) -> bool {
        let Target::Symbol { library, name, .. } = &self.specs[i].target else {
            unreachable!("a pattern is a symbol");
        };
        let found = match r.resolve_pattern(library.as_deref(), name) {
            Ok(f) => f,
            // The library is not loaded (yet): pending, if it exists and has a match.
            Err(ResolveError::UnknownLibrary { library: l, .. }) => {
                if first {
                    let ld = self.ld_library_path.as_deref();
                    if let Err(e) = check_on_disk(&self.specs[i], &l, ld) {
                        return self.fatal(i, e);
                    }
                }
                return false;
            }
            Err(e) => return first && self.fatal(i, e.into()),
        };
        if found.is_empty() {
            return first && self.fatal(i, ProbeError::NoMatch(name.clone()));
        }
        for loc in found {
            let label = format!("{}:{}", file_name(&loc.file), loc.name);
            match self.rows.match_status(i, &label) {
                Some(Status::Armed(p)) if p.site == loc.start => {
                    m.placed += 1;
                    continue;
                }
                Some(Status::Failed(_)) => continue,
                _ => {}
            }
            wants.push(Want {
                spec: i,
                rows: self.rows.of_match(i, &label),
                addr: loc.start,
                mapped: r.syms.maps().mapped_at(loc.start),
                label,
                pattern: true,
            });
        }
        false
    }

    /// Register what was planned, one batch per site. Returns true if that was fatal.
    fn register(
        &mut self,
        wants: Vec<Want>,
        first: bool,
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
        for addr in order {
            if self.cancelled() {
                return false;
            }
            let group = sites.remove(&addr).unwrap_or_default();
            let mut requests = Vec::new();
            for w in &group {
                let label: Arc<str> = Arc::from(w.label.as_str());
                requests.extend(
                    w.rows
                        .iter()
                        .map(|&r| actions::request(addr, self.rows.action(r), &label, &self.sink)),
                );
            }
            let why = match self.registry.register_batch(requests) {
                Ok(guards) => {
                    let mut ids = guards.into_iter().map(|g| g.into_id());
                    for w in group {
                        let n = w.rows.len();
                        self.rows
                            .armed(&w.rows, ids.by_ref().take(n), addr, w.mapped, &w.label);
                        if w.pattern {
                            matches_of(patterns, w.spec).placed += 1;
                        }
                    }
                    continue;
                }
                Err(CoreError::Batch { source, .. }) => Arc::new(*source),
                Err(e) => Arc::new(e),
            };
            for w in group {
                let e = ProbeError::Register(Arc::clone(&why));
                if w.pattern {
                    matches_of(patterns, w.spec)
                        .failed
                        .push((w.label, w.rows, e));
                } else if self.give_up(w.spec, first, e, Failure::CannotProbe) {
                    return true;
                }
            }
        }
        false
    }

    /// Say how many of pattern spec `i`'s matches could not be probed, if any: fatal at
    /// the first placement when none could (returns true).
    fn report_matches(&mut self, i: usize, m: Matches, first: bool) -> bool {
        let total = m.placed + m.failed.len();
        let failed = m.failed.len();
        let mut failures = m.failed.into_iter();
        let Some((label, rows, first_error)) = failures.next() else {
            return false;
        };
        self.rows.failed(&rows, Failure::CannotProbe);
        for (_, rows, _) in failures {
            self.rows.failed(&rows, Failure::CannotProbe);
        }
        let why = ProbeError::SomeUnprobeable {
            failed,
            total,
            label,
            first: Box::new(first_error),
        };
        if first && m.placed == 0 {
            return self.fatal(i, why);
        }
        let text = &self.specs[i].text;
        self.sink.note(&format!("probe {text:?}: {why}"));
        false
    }

    /// Spec `spec` cannot be placed: at the first placement that is fatal (returns true:
    /// stop placing); later it is said once and its rows marked failed.
    fn give_up(&mut self, spec: usize, first: bool, why: ProbeError, failure: Failure) -> bool {
        if first {
            return self.fatal(spec, why);
        }
        let text = &self.specs[spec].text;
        self.sink.note(&format!("probe {text:?}: {why}"));
        let rows = self.rows.of_spec(spec).to_vec();
        self.rows.failed(&rows, failure);
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

fn matches_of(patterns: &mut [Option<Matches>], spec: usize) -> &mut Matches {
    patterns[spec]
        .as_mut()
        .expect("every pattern spec planned has its tally")
}
