//! The summary: one row per handler, printed as a table (live with `--interval`, and
//! at the end) or as one JSON document, and how the traced program ended.
//!
//! Everything goes to the command's own output (stderr unless `-o FILE`), never to the
//! traced program's stdout, which passes through untouched.

use serde::Serialize;

/// One handler's line in the summary.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Row {
    /// The probed address, `None` while pending (library not loaded yet).
    pub site: Option<u64>,
    /// Where, as resolved: `libc.so.6:malloc`, `prog:main+0x4`, or the address.
    pub symbol: String,
    /// The action.
    pub action: String,
    /// Hits that ran this handler.
    pub hits: u64,
    /// Hits it missed (reentrancy, post-handler capacity).
    pub missed: u64,
    /// Where the handler stands.
    pub state: State,
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
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            State::Pending => "pending",
            State::Armed => "armed",
            State::Disabled => "disabled",
            State::Failed => "failed",
            State::NoSuchFunction => "failed: no such function",
        })
    }
}

/// As its text, which is what `--json` has always shown.
impl Serialize for State {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The summary table, bpftrace-style: one row per handler, sites in address order.
pub fn table(rows: &[Row]) -> String {
    let headers = ["SITE", "SYMBOL", "ACTION", "HITS", "MISSED", "STATE"];
    let cells: Vec<[String; 6]> = rows
        .iter()
        .map(|r| {
            [
                r.site.map_or_else(|| "-".into(), |a| format!("{a:#x}")),
                r.symbol.clone(),
                r.action.clone(),
                r.hits.to_string(),
                r.missed.to_string(),
                r.state.to_string(),
            ]
        })
        .collect();
    let mut width = headers.map(str::len);
    for c in &cells {
        for (w, s) in width.iter_mut().zip(c) {
            *w = (*w).max(s.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |fields: [&str; 6]| {
        for (i, (f, w)) in fields.iter().zip(width).enumerate() {
            // Numbers right-aligned, text left-aligned; no trailing blanks.
            let last = i == fields.len() - 1;
            let s = if i == 3 || i == 4 {
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
    line(headers);
    for c in &cells {
        line([&c[0], &c[1], &c[2], &c[3], &c[4], &c[5]]);
    }
    out
}

/// How the traced program ended.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It exited with this code.
    Exited(i32),
    /// A signal killed it.
    Killed(i32),
    /// We detached and it runs on.
    Detached,
}

/// The `--json` summary.
#[derive(Clone, Debug, Serialize)]
pub struct Summary<'a> {
    /// The traced process.
    pub pid: u32,
    /// How it ended.
    pub outcome: &'a Outcome,
    /// Wall time from start (or attach) to the end.
    pub duration_ms: u64,
    /// Per-hit lines the rate limit dropped.
    pub dropped_lines: u64,
    /// Every handler.
    pub probes: &'a [Row],
}

/// The JSON document of a summary, one line.
pub fn json(summary: &Summary<'_>) -> String {
    serde_json::to_string(summary).expect("the summary serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(site: Option<u64>, symbol: &str, action: &str, hits: u64) -> Row {
        Row {
            site,
            symbol: symbol.into(),
            action: action.into(),
            hits,
            missed: 0,
            state: State::Armed,
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
    fn json_has_every_field() {
        let rows = [row(Some(16), "p:main", "count", 3)];
        let j = json(&Summary {
            pid: 42,
            outcome: &Outcome::Exited(0),
            duration_ms: 5,
            dropped_lines: 0,
            probes: &rows,
        });
        let v: serde_json::Value = serde_json::from_str(&j).unwrap();
        assert_eq!(v["pid"], 42);
        assert_eq!(v["outcome"]["exited"], 0);
        assert_eq!(v["probes"][0]["site"], 16);
        assert_eq!(v["probes"][0]["hits"], 3);
        assert_eq!(v["probes"][0]["symbol"], "p:main");
        assert_eq!(v["probes"][0]["state"], "armed");
    }
}
