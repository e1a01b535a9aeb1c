//! The summary's rows and where each stands: one row per (spec, action) — for a
//! wildcard pattern, per (spec, action, matching function) — with the statistics of
//! registrations that ended carried over.
//!
//! A row's [`Status`] is its state machine: `Pending` → `Armed` when its handler is
//! registered, `Armed` → `Pending` when its code goes away (an `exec` replaced the
//! image, `dlclose` unmapped its library; the handler's counts are carried), `Pending`
//! → `Failed` when a later placement cannot probe it (said once). The rows of one spec
//! (or of one pattern match) are registered all together or not at all, so they share
//! their status.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use multiprobe_backend_ptrace::collect::SitePath;
use multiprobe_backend_ptrace::PtraceBackend;
use multiprobe_core::{HandlerId, HandlerInfo, HandlerStats, Registry};
use multiprobe_symbols::{MappedAt, Maps};

use crate::actions::RowState;
use crate::report::{self, Outcome, Path, State};
use crate::spec::{Action, Key, ProbeSpec};

/// A row's index in [`Rows`].
pub(super) type RowId = usize;

/// Where a registered row's handler is.
#[derive(Clone, Debug)]
pub(super) struct Placed {
    pub(super) site: u64,
    /// What was mapped at `site` when it was placed (to notice it going away).
    pub(super) mapped: Option<MappedAt>,
    pub(super) id: HandlerId,
}

/// Why a row will not be placed again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Failure {
    /// Its function does not resolve (in the program an `exec` brought).
    NoSuchFunction,
    /// Its function is there but where it is cannot be told (an indirect function whose
    /// implementation is unknown, ...): said once, with the reason; tried again, as
    /// `NoSuchFunction`, in the program the next `exec` brings.
    Unresolved,
    /// The site cannot be probed.
    CannotProbe,
}

#[derive(Clone, Debug)]
pub(super) enum Status {
    Pending,
    Armed(Placed),
    Failed(Failure),
}

#[derive(Debug)]
struct Row {
    spec: usize,
    action: Action,
    /// The site as resolved (`libc.so.6:malloc`), or the spec's target until then.
    label: String,
    /// The file it was resolved in, once it was.
    file: Option<String>,
    status: Status,
    /// Statistics of the registrations that ended.
    carried: HandlerStats,
    /// What every registration of the row shares.
    state: Arc<RowState>,
}

/// Every row, indexed by spec and by pattern match.
#[derive(Debug)]
pub(super) struct Rows {
    rows: Vec<Row>,
    /// The rows of each spec, in creation order.
    by_spec: Vec<Vec<RowId>>,
    /// A pattern spec's rows for one function, by (spec, label).
    by_match: HashMap<(usize, String), Vec<RowId>>,
    /// Specs that are patterns (their rows appear as they match).
    pattern: Vec<bool>,
    /// The actions of each spec.
    actions: Vec<Vec<Action>>,
    /// The targets of each spec, for the rows of patterns that matched nothing yet.
    targets: Vec<String>,
}

impl Rows {
    /// One row per action of every plain spec; patterns get theirs as they match.
    pub(super) fn new(specs: &[ProbeSpec]) -> Rows {
        let mut rows = Rows {
            rows: Vec::new(),
            by_spec: vec![Vec::new(); specs.len()],
            by_match: HashMap::new(),
            pattern: specs.iter().map(ProbeSpec::per_match).collect(),
            actions: specs.iter().map(|s| s.actions.clone()).collect(),
            targets: specs.iter().map(|s| s.target.to_string()).collect(),
        };
        for (i, s) in specs.iter().enumerate() {
            if !rows.pattern[i] {
                for &action in &s.actions {
                    rows.push(i, action, s.target.to_string());
                }
            }
        }
        rows
    }

    fn push(&mut self, spec: usize, action: Action, label: String) -> RowId {
        self.rows.push(Row {
            spec,
            action,
            label,
            file: None,
            status: Status::Pending,
            carried: HandlerStats::default(),
            state: Arc::default(),
        });
        let id = self.rows.len() - 1;
        self.by_spec[spec].push(id);
        id
    }

    /// The rows of plain spec `spec`.
    pub(super) fn of_spec(&self, spec: usize) -> &[RowId] {
        &self.by_spec[spec]
    }

    /// The status the rows of plain spec `spec` share.
    pub(super) fn spec_status(&self, spec: usize) -> &Status {
        &self.rows[self.by_spec[spec][0]].status
    }

    /// The rows of pattern spec `spec` for the function `label`, one per action: those
    /// an earlier placement made (an `exec` or `dlclose` made them pending), else new.
    pub(super) fn of_match(&mut self, spec: usize, label: &str) -> Vec<RowId> {
        if let Some(r) = self.by_match.get(&(spec, label.to_string())) {
            return r.clone();
        }
        let ids: Vec<RowId> = self.actions[spec]
            .clone()
            .into_iter()
            .map(|a| self.push(spec, a, label.to_string()))
            .collect();
        self.by_match.insert((spec, label.to_string()), ids.clone());
        ids
    }

    /// The status of pattern spec `spec`'s rows for `label`, if it has any.
    pub(super) fn match_status(&self, spec: usize, label: &str) -> Option<&Status> {
        let rows = self.by_match.get(&(spec, label.to_string()))?;
        rows.first().map(|&r| &self.rows[r].status)
    }

    pub(super) fn action(&self, row: RowId) -> Action {
        self.rows[row].action
    }

    /// The state every registration of `row` shares.
    pub(super) fn state(&self, row: RowId) -> Arc<RowState> {
        Arc::clone(&self.rows[row].state)
    }

    /// The rows were registered: `ids[i]` is the handler of `rows[i]`.
    pub(super) fn armed(
        &mut self,
        rows: &[RowId],
        ids: impl IntoIterator<Item = HandlerId>,
        site: u64,
        mapped: Option<MappedAt>,
        label: &str,
        file: Option<&str>,
    ) {
        for (&r, id) in rows.iter().zip(ids) {
            let row = &mut self.rows[r];
            row.label = label.to_string();
            row.file = file.map(str::to_string);
            row.status = Status::Armed(Placed {
                site,
                mapped: mapped.clone(),
                id,
            });
        }
    }

    /// These rows will not be placed.
    pub(super) fn failed(&mut self, rows: &[RowId], why: Failure) {
        for &r in rows {
            self.rows[r].status = Status::Failed(why);
        }
    }

    /// Armed rows whose code is no longer mapped where it was (`dlclose`): their
    /// handler ids, after making them pending with `stats` (each handler's final
    /// statistics, asked from the caller) carried. Returns the handler ids and the
    /// specs concerned.
    pub(super) fn unmapped(
        &mut self,
        maps: &Maps,
        mut stats: impl FnMut(HandlerId) -> Option<HandlerStats>,
    ) -> (Vec<HandlerId>, Vec<usize>) {
        let mut ids = Vec::new();
        let mut specs = Vec::new();
        for row in &mut self.rows {
            let Status::Armed(p) = &row.status else {
                continue;
            };
            if p.mapped.is_none() || maps.mapped_at(p.site) == p.mapped {
                continue;
            }
            if let Some(s) = stats(p.id) {
                add(&mut row.carried, &s);
            }
            ids.push(p.id);
            row.status = Status::Pending;
            if !specs.contains(&row.spec) {
                specs.push(row.spec);
            }
        }
        (ids, specs)
    }

    /// An `exec` unregistered every handler (`unregistered` has their last statistics):
    /// carry them, and make every row pending again that may be placed in the new
    /// program (armed ones, and those its old program did not have: a new program may).
    pub(super) fn exec(&mut self, unregistered: &[HandlerInfo]) {
        let last: HashMap<HandlerId, HandlerStats> =
            unregistered.iter().map(|i| (i.id, i.stats)).collect();
        for row in &mut self.rows {
            match &row.status {
                Status::Armed(p) => {
                    if let Some(s) = last.get(&p.id) {
                        add(&mut row.carried, s);
                    }
                    row.status = Status::Pending;
                }
                Status::Failed(Failure::NoSuchFunction | Failure::Unresolved) => {
                    row.status = Status::Pending
                }
                _ => {}
            }
        }
    }

    /// The sites of armed rows.
    pub(super) fn sites(&self) -> impl Iterator<Item = u64> + '_ {
        self.rows.iter().filter_map(|r| match &r.status {
            Status::Armed(p) => Some(p.site),
            _ => None,
        })
    }

    /// How many handlers are registered.
    pub(super) fn armed_count(&self) -> usize {
        self.sites().count()
    }

    /// The summary rows of process `pid`, with live statistics from `registry`, in
    /// site order. `over`: how the process (or the session) ended, if it did: armed rows
    /// show `detached` after a detach (and `armed` — until the end — otherwise).
    pub(super) fn summary(
        &self,
        registry: &Registry<PtraceBackend>,
        pid: i32,
        over: Option<&Outcome>,
        specs: &[ProbeSpec],
        stop: bool,
    ) -> Vec<report::Row> {
        // Per site, once: the first armed row there whose action needs the tracer.
        let mut needs_tracer: HashMap<u64, Option<RowId>> = HashMap::new();
        for (i, r) in self.rows.iter().enumerate() {
            if let Status::Armed(p) = &r.status {
                let first = needs_tracer.entry(p.site).or_insert(None);
                if first.is_none() && r.state.collect_stats().is_none() {
                    *first = Some(i);
                }
            }
        }
        let mut paths: HashMap<u64, Path> = HashMap::new();
        let mut path_of = |site: u64| {
            paths
                .entry(site)
                .or_insert_with(|| {
                    let first = needs_tracer.get(&site).copied().flatten();
                    self.path(registry, site, stop, specs, first)
                })
                .clone()
        };
        let filter_of = |spec: usize| -> Option<String> {
            let f = &specs[spec].filters;
            (!f.is_empty()).then(|| {
                f.iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" && ")
            })
        };
        let mut out: Vec<report::Row> = self
            .rows
            .iter()
            .map(|r| {
                let (site, live) = match &r.status {
                    Status::Armed(p) => (Some(p.site), registry.handler(p.id).ok()),
                    _ => (None, None),
                };
                let mut stats = r.carried;
                if let Some(i) = &live {
                    add(&mut stats, &i.stats);
                }
                // A collector's own counters hold its hits on either path (the
                // registry sees only those of the one-stop path).
                let collected = r.state.collect_stats();
                if let Some(c) = collected {
                    stats.hits = c.hits;
                    // A `ret` collector counts the returns of both paths; the lost
                    // ones are the core's (one-stop) plus the tracee's.
                    stats.returns = c.returns;
                    stats.returns_lost += c.returns_lost;
                }
                let filtered = r.state.filtered.load(Ordering::Relaxed);
                let state = match (&r.status, &live, over) {
                    (Status::Armed(_), _, Some(Outcome::Detached)) => State::Detached,
                    (Status::Armed(_), Some(i), _) if !i.enabled => State::Disabled,
                    (Status::Armed(_), ..) => State::Armed,
                    (Status::Pending, ..) => State::Pending,
                    (Status::Failed(Failure::CannotProbe | Failure::Unresolved), ..) => {
                        State::Failed
                    }
                    (Status::Failed(Failure::NoSuchFunction), ..) => State::NoSuchFunction,
                };
                report::Row {
                    pid,
                    site,
                    symbol: r.label.clone(),
                    file: r.file.clone(),
                    action: r.action.to_string(),
                    filter: filter_of(r.spec),
                    hits: stats.hits.saturating_sub(filtered),
                    missed: stats.missed,
                    filtered,
                    state,
                    keys: match r.action {
                        Action::CountBy(k) if k != Key::Ustack => Some(r.state.top_keys(k)),
                        _ => None,
                    },
                    stacks: match r.action {
                        Action::CountBy(Key::Ustack) | Action::Ustack { .. } => {
                            Some(r.state.top_stacks())
                        }
                        _ => None,
                    },
                    interval_hits: None,
                    returns: r
                        .action
                        .at_return()
                        .then_some((stats.returns, stats.returns_lost)),
                    latency: (r.action == Action::Latency).then(|| r.state.latency()),
                    path: site.filter(|_| live.is_some()).map(&mut path_of),
                    collected: collected.map(|c| (c.dropped, c.faulted)),
                }
            })
            .collect();
        // A pattern that matched nothing yet shows its target, pending.
        for (s, rows) in self.by_spec.iter().enumerate() {
            if self.pattern[s] && rows.is_empty() {
                out.extend(self.actions[s].iter().map(|a| report::Row {
                    filter: filter_of(s),
                    ..report::Row::unhit(
                        pid,
                        self.targets[s].clone(),
                        a.to_string(),
                        State::Pending,
                    )
                }));
            }
        }
        out.sort_by_key(|r| r.site.unwrap_or(u64::MAX));
        out
    }
}

impl Rows {
    /// How the site at `site` is served: in the tracee, or with a stop and why (the
    /// first of its actions that needs the tracer, row `needs_tracer`, else the
    /// backend's reason).
    fn path(
        &self,
        registry: &Registry<PtraceBackend>,
        site: u64,
        stop: bool,
        specs: &[ProbeSpec],
        needs_tracer: Option<RowId>,
    ) -> Path {
        if stop {
            return Path::Stop(report::STOP_ASKED.into());
        }
        let needs_tracer = needs_tracer.map(|i| &self.rows[i]);
        if let Some(r) = needs_tracer {
            let spec = &specs[r.spec];
            return Path::Stop(if spec.filters.is_empty() {
                format!("`{}` runs in multiprobe", r.action)
            } else {
                format!(
                    "the condition of {:?} is evaluated in multiprobe",
                    spec.text
                )
            });
        }
        match registry.backend().collect_path(site) {
            Some(SitePath::InTracee) => Path::Tracee,
            Some(SitePath::Stop(why)) => Path::Stop(why),
            None => Path::Stop("no collector at the site".into()),
        }
    }
}

fn add(to: &mut HandlerStats, s: &HandlerStats) {
    to.hits += s.hits;
    to.missed += s.missed;
    to.panics += s.panics;
    to.returns += s.returns;
    to.returns_lost += s.returns_lost;
}
