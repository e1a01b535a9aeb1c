//! The summary: one row per handler (per process, with `-f`), printed as a table (live
//! with `--interval`, and at the end) with the top values of aggregating actions, or as
//! the last record of the `--json` stream; and how the traced program ended.
//!
//! Everything goes to the command's own output (stderr unless `-o FILE`), never to the
//! traced program's stdout, which passes through untouched.
//!
//! # The `--json` stream
//!
//! With `--json` every line multiprobe writes is one JSON object, and every object has
//! a `type`: `note` (a message about the session), `hit` (a per-hit line of an action
//! that prints), `interval` (the live table of `--interval`), `process` (a process
//! followed with `-f` started, executed a program or ended), and `summary`, always the
//! last line. Each field has one type wherever it appears: addresses and argument
//! values are hexadecimal strings (`"0x7f3a2c1b0930"`: JSON numbers lose precision past
//! 2^53), counts and ids are numbers, `outcome` is always an object with a `kind`. The
//! schema, with every field, is `schema/output.schema.json` in this crate; the README
//! shows it as a table, and a test validates every line the command prints against it.

use serde::ser::SerializeStruct;
use serde::{Serialize, Serializer};

use crate::signals::{self, Signal};

/// The most values (and stacks) an aggregating row shows.
pub const TOP: usize = 10;

/// One value of a `count:KEY` row, or one stack of a `ustack` row, with its count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Counted<T> {
    /// The value (`"0x20"`, `"1234"`) or the stack's frames, innermost first.
    #[serde(rename = "key")]
    pub what: T,
    /// Hits with it.
    pub count: u64,
}

/// A stack frame of a `ustack` action, symbolised.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Frame {
    /// The instruction address (for a caller, its return address).
    pub addr: u64,
    /// `libc.so.6:malloc+0x10`, or `None` where no symbol covers it.
    pub symbol: Option<String>,
}

impl Serialize for Frame {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Frame", 2)?;
        st.serialize_field("addr", &hex(self.addr))?;
        st.serialize_field("symbol", &self.symbol)?;
        st.end()
    }
}

/// The most frequent values of an aggregating row, and how many distinct ones it saw.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Top<T> {
    /// Distinct values seen.
    pub distinct: u64,
    /// The [`TOP`] most frequent, most frequent first.
    pub top: Vec<Counted<T>>,
}

/// One handler's line in the summary.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Row {
    /// The process it belongs to.
    pub pid: i32,
    /// The probed address, `None` while pending (library not loaded yet).
    pub site: Option<u64>,
    /// Where, as resolved: `libc.so.6:malloc`, `prog:main+0x4`, or the target as given.
    pub symbol: String,
    /// The file the probe was resolved in (its path), once it was.
    pub file: Option<String>,
    /// The action.
    pub action: String,
    /// The spec's conditions (`arg0>4096`, joined by ` && `), if it has any.
    pub filter: Option<String>,
    /// Hits that ran this handler's action.
    pub hits: u64,
    /// Hits it missed (reentrancy; hits that arrived while detaching).
    pub missed: u64,
    /// Hits its spec's conditions filtered out.
    pub filtered: u64,
    /// Where the handler stands.
    pub state: State,
    /// For `count:KEY`: the most frequent values.
    pub keys: Option<Top<String>>,
    /// For `ustack` and `count:ustack`: the most frequent stacks.
    pub stacks: Option<Top<Vec<Frame>>>,
    /// Hits since the last tick (the live table only).
    pub interval_hits: Option<u64>,
    /// For return actions: calls seen returning, and returns lost.
    pub returns: Option<(u64, u64)>,
    /// For `latency`: the histogram.
    pub latency: Option<crate::returning::Hist>,
    /// How its site is served, once armed.
    pub path: Option<Path>,
    /// For an action that collects: records lost (the ring or the queue was full) and
    /// memory reads that faulted (the program went on unharmed).
    pub collected: Option<(u64, u64)>,
}

impl Row {
    /// The row of `action` on `symbol` in process `pid`, in `state`, before any hit: no
    /// site, file or filter, no counts, nothing aggregated.
    pub fn unhit(pid: i32, symbol: String, action: String, state: State) -> Self {
        Row {
            pid,
            site: None,
            symbol,
            file: None,
            action,
            filter: None,
            hits: 0,
            missed: 0,
            filtered: 0,
            state,
            keys: None,
            stacks: None,
            interval_hits: None,
            returns: None,
            latency: None,
            path: None,
            collected: None,
        }
    }
}

/// The reason of every stop site under `--stop`.
pub const STOP_ASKED: &str = "--stop";

/// How a site is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Path {
    /// Promoted to a jump: its actions collect inside the program, with no stop.
    Tracee,
    /// One ptrace stop per hit, the actions run in multiprobe: why.
    Stop(String),
}

impl Path {
    fn name(&self) -> &'static str {
        match self {
            Path::Tracee => "tracee",
            Path::Stop(_) => "stop",
        }
    }
}

fn hex(v: u64) -> String {
    format!("{v:#x}")
}

impl Serialize for Row {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Row", 21)?;
        st.serialize_field("pid", &self.pid)?;
        st.serialize_field("site", &self.site.map(hex))?;
        st.serialize_field("symbol", &self.symbol)?;
        st.serialize_field("file", &self.file)?;
        st.serialize_field("action", &self.action)?;
        st.serialize_field("filter", &self.filter)?;
        st.serialize_field("hits", &self.hits)?;
        st.serialize_field("missed", &self.missed)?;
        st.serialize_field("filtered", &self.filtered)?;
        st.serialize_field("state", &self.state)?;
        if let Some(k) = &self.keys {
            st.serialize_field("keys", k)?;
        }
        if let Some(k) = &self.stacks {
            st.serialize_field("stacks", k)?;
        }
        if let Some(i) = self.interval_hits {
            st.serialize_field("interval_hits", &i)?;
        }
        if let Some((returns, lost)) = self.returns {
            st.serialize_field("returns", &returns)?;
            st.serialize_field("returns_lost", &lost)?;
        }
        if let Some(h) = &self.latency {
            st.serialize_field("latency", h)?;
        }
        if let Some(p) = &self.path {
            st.serialize_field("path", p.name())?;
            if let Path::Stop(why) = p {
                st.serialize_field("why", why)?;
            }
        }
        if let Some((dropped, faulted)) = self.collected {
            st.serialize_field("dropped", &dropped)?;
            st.serialize_field("faulted", &faulted)?;
        }
        st.end()
    }
}

/// Where a handler stands, as the summary shows it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Its library is not loaded (yet), or an `exec` or `dlclose` took its code away.
    Pending,
    /// Registered, its breakpoint in place.
    Armed,
    /// Registered but disabled.
    Disabled,
    /// The site could not be probed (said once, when it was tried).
    Failed,
    /// Its function does not exist in the program an `exec` brought.
    NoSuchFunction,
    /// Was armed until multiprobe detached; the process runs on unprobed.
    Detached,
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Pending => "pending",
            State::Armed => "armed",
            State::Disabled => "disabled",
            State::Failed => "failed",
            State::NoSuchFunction => "failed: no such function",
            State::Detached => "detached",
        })
    }
}

/// As its text.
impl Serialize for State {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The summary table, bpftrace-style: one row per handler, sites in address order; a
/// PID column when several processes were traced, FILTERED when a spec has conditions,
/// INTERVAL (hits since the last tick) in the live table; then the top values of
/// aggregating rows.
pub fn table(rows: &[Row]) -> String {
    let pids = rows.iter().any(|r| r.pid != rows[0].pid);
    let filtered = rows.iter().any(|r| r.filter.is_some());
    let interval = rows.iter().any(|r| r.interval_hits.is_some());
    // (header, right-aligned, cell)
    type Col = (&'static str, bool, fn(&Row) -> String);
    let mut cols: Vec<Col> = Vec::new();
    if pids {
        cols.push(("PID", true, |r| r.pid.to_string()));
    }
    cols.push(("SITE", false, |r| {
        r.site.map_or_else(|| "-".into(), |a| format!("{a:#x}"))
    }));
    cols.push(("SYMBOL", false, |r| r.symbol.clone()));
    cols.push(("ACTION", false, |r| r.action.clone()));
    cols.push(("HITS", true, |r| r.hits.to_string()));
    if interval {
        cols.push(("INTERVAL", true, |r| {
            r.interval_hits
                .map_or_else(|| "-".into(), |i| i.to_string())
        }));
    }
    cols.push(("MISSED", true, |r| r.missed.to_string()));
    if filtered {
        cols.push(("FILTERED", true, |r| match &r.filter {
            Some(f) => format!("{} ({f})", r.filtered),
            None => "-".into(),
        }));
    }
    if rows.iter().any(|r| r.collected.is_some_and(|(d, _)| d > 0)) {
        cols.push(("DROPPED", true, |r| {
            r.collected
                .map_or_else(|| "-".into(), |(d, _)| d.to_string())
        }));
    }
    if rows.iter().any(|r| r.collected.is_some_and(|(_, f)| f > 0)) {
        cols.push(("FAULTED", true, |r| {
            r.collected
                .map_or_else(|| "-".into(), |(_, f)| f.to_string())
        }));
    }
    let paths = rows.iter().any(|r| r.path.is_some());
    if paths {
        cols.push(("PATH", false, |r| {
            r.path.as_ref().map_or("-", Path::name).to_string()
        }));
    }
    cols.push(("STATE", false, |r| r.state.to_string()));
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| cols.iter().map(|(_, _, f)| f(r)).collect())
        .collect();
    let mut width: Vec<usize> = cols.iter().map(|(h, _, _)| h.len()).collect();
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |fields: Vec<&str>| {
        let n = fields.len();
        for (i, (f, w)) in fields.iter().zip(&width).enumerate() {
            // Numbers right-aligned, text left-aligned; no trailing blanks.
            let last = i == n - 1;
            let s = if cols[i].1 {
                format!("{f:>w$}")
            } else if last {
                f.to_string()
            } else {
                format!("{f:<w$}")
            };
            out.push_str(&s);
            if !last {
                out.push_str("  ");
            }
        }
        out.push('\n');
    };
    line(cols.iter().map(|(h, _, _)| *h).collect());
    for c in &cells {
        line(c.iter().map(String::as_str).collect());
    }
    // Why each stop site was not promoted, once per site, the most hit first (those
    // are what the stops cost; `--json` has every one), unless it was asked for
    // (`--stop`).
    let mut stops: Vec<((i32, u64), &str, &str, u64)> = Vec::new();
    let mut at: std::collections::HashMap<(i32, u64), usize> = Default::default();
    for r in rows {
        if let (Some(site), Some(Path::Stop(why))) = (r.site, &r.path) {
            if why == STOP_ASKED {
                continue;
            }
            let i = *at.entry((r.pid, site)).or_insert_with(|| {
                stops.push(((r.pid, site), r.symbol.as_str(), why.as_str(), 0));
                stops.len() - 1
            });
            stops[i].3 = stops[i].3.max(r.hits);
        }
    }
    // Stable: sites hit as often stay in address order.
    stops.sort_by_key(|s| std::cmp::Reverse(s.3));
    for ((_, site), symbol, why, _) in stops.iter().take(TOP) {
        out.push_str(&format!("stop at {site:#x} {symbol}: {why}\n"));
    }
    if stops.len() > TOP {
        out.push_str(&format!(
            "(and {} more sites with a stop per hit: --json gives each one's reason)\n",
            stops.len() - TOP
        ));
    }
    // Records the program could not hand over: the counts are exact, the lines not.
    for r in rows {
        if let Some((dropped, _)) = r.collected.filter(|&(d, _)| d > 0) {
            out.push_str(&format!(
                "dropped {dropped} records of {} {}: the ring in the program was full (its \
                 hits are counted; `latency` and `count` never drop)\n",
                r.symbol, r.action
            ));
        }
    }
    for r in rows {
        let pid = if pids {
            format!(" [{}]", r.pid)
        } else {
            String::new()
        };
        if let Some(k) = &r.keys {
            out.push_str(&format!(
                "\n{}{pid} {}: {} distinct, top {}\n",
                r.symbol,
                r.action,
                k.distinct,
                k.top.len()
            ));
            let w = k.top.iter().map(|c| c.what.len()).max().unwrap_or(0);
            for c in &k.top {
                out.push_str(&format!("  {:<w$}  {:>8}\n", c.what, c.count));
            }
        }
        if let Some((returns, lost)) = r.returns {
            out.push_str(&format!(
                "\n{}{pid} {}: {returns} returned, {lost} lost\n",
                r.symbol, r.action
            ));
            if let Some(h) = &r.latency {
                out.push_str(&crate::returning::hist_text(h));
            }
        }
        if let Some(k) = &r.stacks {
            out.push_str(&format!(
                "\n{}{pid} {}: {} distinct stacks, top {}\n",
                r.symbol,
                r.action,
                k.distinct,
                k.top.len()
            ));
            for c in &k.top {
                out.push_str(&format!("  {:>8}  ", c.count));
                for (i, f) in c.what.iter().enumerate() {
                    if i > 0 {
                        out.push_str("            ");
                    }
                    out.push_str(&frame_text(f));
                    out.push('\n');
                }
                if c.what.is_empty() {
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// A frame as text: `libc.so.6:malloc+0x10 (0x7f...)`, or the address alone.
pub fn frame_text(f: &Frame) -> String {
    match &f.symbol {
        Some(s) => format!("{s} ({:#x})", f.addr),
        None => format!("{:#x}", f.addr),
    }
}

/// How the traced program ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it (0: it went without a report; how is unknown).
    Killed(i32),
    /// We detached and it runs on.
    Detached,
}

/// Always an object with a `kind`: `{"kind":"exited","code":0}`,
/// `{"kind":"killed","signal":9,"name":"SIGKILL"}` (signal 0 and name null: how it
/// ended is unknown), `{"kind":"detached"}`.
impl Serialize for Outcome {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Outcome::Exited(c) => {
                let mut st = s.serialize_struct("Outcome", 2)?;
                st.serialize_field("kind", "exited")?;
                st.serialize_field("code", c)?;
                st.end()
            }
            Outcome::Killed(n) => {
                let mut st = s.serialize_struct("Outcome", 3)?;
                st.serialize_field("kind", "killed")?;
                st.serialize_field("signal", n)?;
                st.serialize_field("name", &Signal::from_raw(*n).map(signals::name))?;
                st.end()
            }
            Outcome::Detached => {
                let mut st = s.serialize_struct("Outcome", 1)?;
                st.serialize_field("kind", "detached")?;
                st.end()
            }
        }
    }
}

/// A process of the session, in the summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Process {
    /// Its id.
    pub pid: i32,
    /// The process it was forked from, if it was followed from one (`-f`).
    pub parent: Option<i32>,
    /// The program it ran last (its executable's path).
    pub program: Option<String>,
    /// How it ended (detached, for one still running at the end).
    pub outcome: Outcome,
}

/// The `--json` summary, the last record of the stream.
#[derive(Clone, Debug)]
pub struct Summary<'a> {
    /// The traced process (the first one, with `-f`).
    pub pid: i32,
    /// How it ended.
    pub outcome: &'a Outcome,
    /// Wall time from start (or attach) to the end.
    pub duration_ms: u64,
    /// Per-hit lines the rate limit dropped.
    pub dropped_lines: u64,
    /// Every process traced.
    pub processes: &'a [Process],
    /// Every handler.
    pub probes: &'a [Row],
}

impl Serialize for Summary<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut st = s.serialize_struct("Summary", 7)?;
        st.serialize_field("type", "summary")?;
        st.serialize_field("pid", &self.pid)?;
        st.serialize_field("outcome", self.outcome)?;
        st.serialize_field("duration_ms", &self.duration_ms)?;
        st.serialize_field("dropped_lines", &self.dropped_lines)?;
        st.serialize_field("processes", self.processes)?;
        st.serialize_field("probes", self.probes)?;
        st.end()
    }
}

/// The JSON record of a summary, one line.
pub fn json(summary: &Summary<'_>) -> String {
    serde_json::to_string(summary).expect("the summary serializes")
}

/// The JSON record of the live table: `{"type":"interval","elapsed_s":..,"probes":[..]}`.
pub fn json_interval(elapsed_s: f64, rows: &[Row]) -> String {
    serde_json::json!({ "type": "interval", "elapsed_s": elapsed_s, "probes": rows }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(site: Option<u64>, symbol: &str, action: &str, hits: u64) -> Row {
        Row {
            site,
            hits,
            ..Row::unhit(1, symbol.into(), action.into(), State::Armed)
        }
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&[
            row(Some(0x7f00_1000), "libc.so.6:malloc", "count", 1234),
            row(Some(0x7f00_1000), "libc.so.6:malloc", "args:1", 7),
            row(None, "libfoo:bar", "count", 0),
        ]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 4);
        assert!(lines[0].starts_with("SITE"));
        assert!(lines[1].starts_with("0x7f001000  libc.so.6:malloc  count"));
        // Right-aligned hit counts end in the same column.
        let col = |l: &str, s: &str| l.find(s).unwrap() + s.len();
        assert_eq!(col(lines[1], "1234"), col(lines[2], " 7"));
        assert!(lines[3].starts_with("-  "));
        assert!(lines.iter().all(|l| !l.ends_with(' ')));
    }

    #[test]
    fn optional_columns_and_top_values() {
        let mut a = row(Some(16), "p:f", "count:arg0", 3);
        a.filter = Some("arg0>1".into());
        a.filtered = 2;
        a.keys = Some(Top {
            distinct: 2,
            top: vec![
                Counted {
                    what: "0x5".into(),
                    count: 2,
                },
                Counted {
                    what: "0x7".into(),
                    count: 1,
                },
            ],
        });
        let mut b = row(Some(32), "p:g", "ustack", 1);
        b.pid = 2;
        b.stacks = Some(Top {
            distinct: 1,
            top: vec![Counted {
                what: vec![
                    Frame {
                        addr: 32,
                        symbol: Some("p:g".into()),
                    },
                    Frame {
                        addr: 99,
                        symbol: None,
                    },
                ],
                count: 1,
            }],
        });
        let t = table(&[a, b]);
        assert!(t.starts_with("PID  SITE"), "{t}");
        assert!(t.contains("FILTERED") && t.contains("2 (arg0>1)"), "{t}");
        assert!(t.contains("p:f [1] count:arg0: 2 distinct, top 2"), "{t}");
        assert!(t.contains("  0x5         2\n"), "{t}");
        assert!(
            t.contains("p:g [2] ustack: 1 distinct stacks, top 1"),
            "{t}"
        );
        assert!(t.contains("p:g (0x20)\n            0x63\n"), "{t}");
    }

    #[test]
    fn json_has_one_type_per_field() {
        let rows = [
            row(Some(16), "p:main", "count", 3),
            row(None, "q:f", "count", 0),
        ];
        let procs = [Process {
            pid: 42,
            parent: None,
            program: Some("/bin/p".into()),
            outcome: Outcome::Killed(9),
        }];
        let j = json(&Summary {
            pid: 42,
            outcome: &Outcome::Exited(0),
            duration_ms: 5,
            dropped_lines: 0,
            processes: &procs,
            probes: &rows,
        });
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["type"], "summary");
        assert_eq!(v["pid"], 42);
        assert_eq!(v["outcome"]["kind"], "exited");
        assert_eq!(v["outcome"]["code"], 0);
        assert_eq!(v["processes"][0]["outcome"]["kind"], "killed");
        assert_eq!(v["processes"][0]["outcome"]["name"], "SIGKILL");
        assert_eq!(v["probes"][0]["site"], "0x10");
        assert!(v["probes"][1]["site"].is_null());
        assert_eq!(v["probes"][0]["hits"], 3);
        assert_eq!(v["probes"][0]["symbol"], "p:main");
        assert_eq!(v["probes"][0]["state"], "armed");
        let d: serde_json::Value = serde_json::to_value(Outcome::Detached).expect("serializes");
        assert_eq!(d, serde_json::json!({ "kind": "detached" }));
    }
}
