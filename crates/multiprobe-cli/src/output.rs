//! What the command prints: the per-hit lines of `args`/`regs`/`mem` actions (rate
//! limited), the live count table, and the summary at exit as a table or as JSON.
//!
//! Everything goes to the command's own output (stderr unless `-o FILE`), never to the
//! traced program's stdout, which passes through untouched.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use multiprobe_core::{Gpr, Regs};
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
    /// `armed`, `pending`, `disabled` or a failure note.
    pub state: String,
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
                r.state.clone(),
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

/// The `args:N` line of one hit.
pub fn args_line(tid: u32, symbol: &str, args: &[Result<u64, ()>]) -> String {
    let mut s = format!("[{tid}] {symbol}(");
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        match a {
            Ok(v) => {
                let _ = write!(s, "{v:#x}");
            }
            Err(()) => s.push('?'),
        }
    }
    s.push(')');
    s
}

/// The `regs` line of one hit.
pub fn regs_line(tid: u32, symbol: &str, r: &Regs) -> String {
    let mut s = format!("[{tid}] {symbol} rip={:#x} rflags={:#x}", r.rip, r.rflags);
    for g in Gpr::ALL {
        let _ = write!(s, " {}={:#x}", g.name(), r.gpr(g));
    }
    s
}

/// The `mem:ARG:LEN` lines of one hit: a header and a classic hex dump.
pub fn mem_lines(
    tid: u32,
    symbol: &str,
    arg: u8,
    addr: u64,
    bytes: Result<&[u8], String>,
) -> String {
    let mut s = format!("[{tid}] {symbol} arg{arg}={addr:#x}");
    match bytes {
        Err(e) => {
            let _ = write!(s, ": {e}");
        }
        Ok(b) => {
            for (i, chunk) in b.chunks(16).enumerate() {
                let _ = write!(s, "\n  {:016x}  ", addr + 16 * i as u64);
                for j in 0..16 {
                    match chunk.get(j) {
                        Some(x) => {
                            let _ = write!(s, "{x:02x} ");
                        }
                        None => s.push_str("   "),
                    }
                }
                s.push(' ');
                s.extend(chunk.iter().map(|&c| {
                    if c.is_ascii_graphic() || c == b' ' {
                        c as char
                    } else {
                        '.'
                    }
                }));
            }
        }
    }
    s
}

/// Per-hit output at most `per_second` lines a second; the rest are counted and
/// reported in one note per second, so a hot probe cannot flood the terminal or slow
/// the traced program down to the speed of the terminal.
#[derive(Debug)]
pub struct RateLimit {
    per_second: u64,
    window: Instant,
    in_window: u64,
    dropped_in_window: u64,
    dropped_total: u64,
}

impl RateLimit {
    /// A limit of `per_second` lines (0 = unlimited).
    pub fn new(per_second: u64) -> Self {
        RateLimit {
            per_second,
            window: Instant::now(),
            in_window: 0,
            dropped_in_window: 0,
            dropped_total: 0,
        }
    }

    /// Whether a line may be printed at `now`. When a new second starts after lines were
    /// dropped, `note` receives the note to print first.
    pub fn allow(&mut self, now: Instant, note: &mut Option<String>) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            *note = self.flush();
            self.window = now;
            self.in_window = 0;
        }
        if self.per_second == 0 || self.in_window < self.per_second {
            self.in_window += 1;
            true
        } else {
            self.dropped_in_window += 1;
            self.dropped_total += 1;
            false
        }
    }

    /// The note for lines dropped and not yet reported, if any.
    pub fn flush(&mut self) -> Option<String> {
        let n = std::mem::take(&mut self.dropped_in_window);
        (n > 0).then(|| {
            format!(
                "multiprobe: {n} hit lines dropped (limit {} per second; --max-lines to change)",
                self.per_second
            )
        })
    }

    /// Lines dropped since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped_total
    }
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
            state: "armed".into(),
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
    }

    #[test]
    fn hit_lines() {
        assert_eq!(
            args_line(7, "malloc", &[Ok(0x20), Err(())]),
            "[7] malloc(0x20, ?)"
        );
        let r = Regs {
            rdi: 5,
            ..Regs::default()
        };
        let l = regs_line(1, "f", &r);
        assert!(l.contains(" rdi=0x5") && l.contains(" r15=0x0"), "{l}");
        let m = mem_lines(1, "f", 0, 0x1000, Ok(b"hello, world\0\x01xyz!"));
        assert!(m.contains("0000000000001000  68 65 6c 6c 6f"), "{m}");
        assert!(m.contains("hello, world..xy\n"), "{m}");
        assert!(m.contains("\n  0000000000001010  7a 21 "), "{m}");
        assert!(mem_lines(1, "f", 1, 0, Err("unmapped".into())).ends_with(": unmapped"));
    }

    #[test]
    fn rate_limit_drops_and_reports_once_per_second() {
        let mut rl = RateLimit::new(3);
        let t0 = Instant::now();
        let mut note = None;
        let allowed = (0..10).filter(|_| rl.allow(t0, &mut note)).count();
        assert_eq!(allowed, 3);
        assert!(note.is_none());
        assert!(rl.allow(t0 + Duration::from_millis(1100), &mut note));
        assert!(note.unwrap().contains("7 hit lines dropped"));
        assert_eq!(rl.dropped(), 7);
        assert!(rl.flush().is_none());
        let mut unlimited = RateLimit::new(0);
        assert!((0..1000).all(|_| unlimited.allow(t0, &mut None)));
    }
}
