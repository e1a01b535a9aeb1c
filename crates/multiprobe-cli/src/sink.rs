//! Where multiprobe's own output goes (stderr, or `-o FILE`): whole lines, a rate limit
//! on per-hit lines, and write failures remembered instead of ignored.
//!
//! * Lines are written whole (one `write` each, or several whole lines in one `write`
//!   inside [`Sink::batch`]), so concurrent writers never interleave within one.
//! * Into a file, nothing is written until [`Sink::claim`] (the probes are placed): lines
//!   before that are held, so a run that fails on bad input leaves the file as it was.
//! * The first failed write (a full disk, `/dev/full`, `ulimit -f`, a closed pipe) is
//!   kept and nothing more is written; the traced program never notices. Lines after it
//!   are counted as lost, and [`Sink::close`] returns the failure, which the command
//!   reports and exits non-zero for.
//! * When the failed destination is stderr (a closed pipe: `multiprobe ... 2>&1 | head`),
//!   nothing multiprobe says can reach anyone any more, the summary included: the sink
//!   calls [`Sink::on_dead_end`]'s hook once, which ends the session (the command
//!   detaches, as bpftrace ends on a closed pipe) instead of tracing on for nobody while
//!   the program pays for its probes. Into a file, the session goes on: the summary then
//!   comes on stderr with every count.
//! * Notes ([`Sink::note`]) are multiprobe's messages about the session, as opposed to
//!   per-hit lines and tables; they all go through one place, which writes them as
//!   `multiprobe: ...` lines, or with `--json` as `{"type":"note",...}` records (the
//!   stream stays pure JSON: see [`crate::report`]). Events of processes followed with
//!   `-f` go through [`Sink::process`] the same way.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::outfile::{OutputError, OutputFile};

/// What [`Sink::process`] reports.
#[derive(Clone, Copy, Debug)]
pub struct ProcessEvent<'a> {
    /// The process.
    pub pid: i32,
    /// `fork`, `exec` or `exit`.
    pub kind: &'static str,
    /// For `fork`: the parent.
    pub parent: Option<i32>,
    /// For `exec`: the program.
    pub program: Option<&'a str>,
    /// For `exit`: how it ended.
    pub outcome: Option<&'a crate::report::Outcome>,
}

/// The destination of a [`Sink`].
#[derive(Debug)]
pub enum Dest {
    /// multiprobe's stderr.
    Stderr,
    /// `-o FILE`.
    File(OutputFile),
}

struct Out {
    dest: Dest,
    /// Lines held until the file is claimed (`None` once it is, or for stderr).
    held: Option<Vec<String>>,
    /// Inside [`Sink::batch`]: whole lines waiting for one `write`.
    batch: Option<String>,
    failed: Option<std::io::Error>,
    lost: u64,
    /// Called once, when a write to stderr fails ([`Sink::on_dead_end`]).
    dead_end: Option<DeadEnd>,
}

/// What the sink calls when its output can reach no one.
type DeadEnd = Box<dyn FnOnce() + Send>;

impl std::fmt::Debug for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Out")
            .field("dest", &self.dest)
            .field("failed", &self.failed)
            .field("lost", &self.lost)
            .finish_non_exhaustive()
    }
}

/// A batch is written out when it holds this much.
const BATCH_MAX: usize = 64 << 10;

impl Out {
    fn put(&mut self, line: &str) {
        if let Some(held) = &mut self.held {
            held.push(line.to_string());
            return;
        }
        if let Some(b) = &mut self.batch {
            b.push_str(line);
            if b.len() >= BATCH_MAX {
                self.flush_batch();
            }
            return;
        }
        self.write_out(line);
    }

    /// Write `lines` (whole lines) in one `write`, or count them lost.
    fn write_out(&mut self, lines: &str) {
        if self.failed.is_some() {
            self.lost += lines.matches('\n').count() as u64;
            return;
        }
        let r = match &mut self.dest {
            Dest::Stderr => std::io::stderr().lock().write_all(lines.as_bytes()),
            Dest::File(f) => f.write_all(lines.as_bytes()),
        };
        if let Err(e) = r {
            self.failed = Some(e);
            self.lost += lines.matches('\n').count() as u64;
            if matches!(self.dest, Dest::Stderr) {
                if let Some(end) = self.dead_end.take() {
                    end();
                }
            }
        }
    }

    fn flush_batch(&mut self) {
        let Some(mut lines) = self.batch.take() else {
            return;
        };
        if !lines.is_empty() {
            self.write_out(&lines);
            lines.clear(); // the allocation is kept for the rest of the batch
        }
        self.batch = Some(lines);
    }
}

/// Ends a [`Sink::batch`] (also when its closure panics): what it holds is written.
struct BatchEnd<'a>(&'a Sink);

impl Drop for BatchEnd<'_> {
    fn drop(&mut self) {
        let mut out = self.0.out();
        out.flush_batch();
        out.batch = None;
    }
}

/// multiprobe's output, shared by the handlers and the command.
#[derive(Debug)]
pub struct Sink {
    out: Mutex<Out>,
    limit: Mutex<RateLimit>,
    json: bool,
}

impl Sink {
    /// A sink writing to `dest`, at most `max_lines` per-hit lines a second (0: no
    /// limit); a file is held until [`Sink::claim`].
    pub fn new(dest: Dest, max_lines: u64, json: bool) -> Self {
        let held = matches!(dest, Dest::File(_)).then(Vec::new);
        Sink {
            out: Mutex::new(Out {
                dest,
                held,
                batch: None,
                failed: None,
                lost: 0,
                dead_end: None,
            }),
            limit: Mutex::new(RateLimit::new(max_lines)),
            json,
        }
    }

    fn out(&self) -> std::sync::MutexGuard<'_, Out> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Call `end` (once) when a write to stderr fails: the session's output can reach
    /// no one. It runs under the sink's lock, so it must not write to the sink.
    /// A write that failed before this call counts: `end` is called at once.
    pub fn on_dead_end(&self, end: impl FnOnce() + Send + 'static) {
        let mut out = self.out();
        if out.failed.is_some() && matches!(out.dest, Dest::Stderr) {
            drop(out);
            return end();
        }
        out.dead_end = Some(Box::new(end));
    }

    /// Whether output is JSON lines.
    pub fn json(&self) -> bool {
        self.json
    }

    /// The probes are placed in process `pid`: take the file (see
    /// [`OutputFile::claim`]) and write what was held.
    pub fn claim(&self, pid: i32) -> Result<(), OutputError> {
        let mut out = self.out();
        if out.held.is_none() {
            return Ok(()); // claimed already (or stderr, never held)
        }
        if let Dest::File(f) = &mut out.dest {
            f.claim(pid)?;
        }
        for line in out.held.take().unwrap_or_default() {
            out.put(&line);
        }
        Ok(())
    }

    /// Run `f` with the lines written meanwhile (by any thread) gathered and written
    /// together, 64 KiB at a time and at the end: one `write` for many lines, where a
    /// drain of collected records prints thousands at once. A batch inside a batch
    /// joins it.
    pub fn batch<R>(&self, f: impl FnOnce() -> R) -> R {
        let outer = {
            let mut out = self.out();
            let outer = out.batch.is_none();
            if outer {
                out.batch = Some(String::new());
            }
            outer
        };
        let _end = outer.then(|| BatchEnd(self));
        f()
    }

    /// Write `text` (one or more whole lines; the newline is added).
    pub fn write(&self, text: &str) {
        let mut line = String::with_capacity(text.len() + 1);
        line.push_str(text);
        line.push('\n');
        self.out().put(&line);
    }

    /// A note about the session (`multiprobe: ...`, or a `note` record).
    pub fn note(&self, text: &str) {
        self.note_for(None, text);
    }

    /// A note about process `pid` (or the session).
    pub fn note_for(&self, pid: Option<i32>, text: &str) {
        if self.json {
            let mut v = serde_json::json!({ "type": "note", "message": text });
            if let Some(p) = pid {
                v["pid"] = p.into();
            }
            self.write(&v.to_string());
        } else {
            self.write(&format!("multiprobe: {text}"));
        }
    }

    /// An event of a process of the session (`-f`): `event` is `fork` (from
    /// `parent`), `exec` (of `program`) or `exit` (with `outcome`); `text` says it to a
    /// person.
    pub fn process(&self, event: ProcessEvent<'_>, text: &str) {
        if !self.json {
            return self.write(&format!("multiprobe: {text}"));
        }
        let mut v = serde_json::json!({ "type": "process", "pid": event.pid, "event": event.kind });
        if let Some(p) = event.parent {
            v["parent"] = p.into();
        }
        if let Some(p) = event.program {
            v["program"] = p.into();
        }
        if let Some(o) = event.outcome {
            v["outcome"] = serde_json::to_value(o).expect("an outcome serializes");
        }
        self.write(&v.to_string());
    }

    /// A per-hit line, subject to the rate limit; `make` runs only if it is printed.
    pub fn hit_line(&self, make: impl FnOnce() -> String) {
        let mut note = None;
        let allowed = self
            .limit
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .allow(Instant::now(), &mut note);
        if let Some(n) = note {
            self.note(&n);
        }
        if allowed {
            self.write(&make());
        }
    }

    /// Report per-hit lines dropped and not yet reported; returns the total dropped.
    pub fn finish_lines(&self) -> u64 {
        let (note, dropped) = {
            let mut l = self.limit.lock().unwrap_or_else(|p| p.into_inner());
            (l.flush(), l.dropped())
        };
        if let Some(n) = note {
            self.note(&n);
        }
        dropped
    }

    /// The end: sync a file, and return the first write failure, if any. (Lines held
    /// for a file that was never claimed are dropped with it.)
    pub fn close(&self) -> Result<(), OutputError> {
        let mut out = self.out();
        if out.held.is_none() && out.failed.is_none() {
            if let Dest::File(f) = &out.dest {
                if let Err(e) = f.sync() {
                    out.failed = Some(e);
                }
            }
        }
        match out.failed.take() {
            None => Ok(()),
            Some(source) => Err(OutputError::Write {
                what: match &out.dest {
                    Dest::Stderr => "to stderr".to_string(),
                    Dest::File(f) => f.path().display().to_string(),
                },
                source,
                lost: out.lost,
            }),
        }
    }

    /// Whether the output is a file (so stderr is still there to report on).
    pub fn is_file(&self) -> bool {
        matches!(self.out().dest, Dest::File(_))
    }
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
                "{n} hit lines dropped (limit {} per second; --max-lines to change)",
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

    #[test]
    fn json_notes_are_records() {
        let path = std::env::temp_dir().join(format!("mp-sink-{}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let sink = Sink::new(Dest::File(OutputFile::open(&path).unwrap()), 0, true);
        sink.claim(std::process::id() as i32).unwrap();
        sink.note("hello \"there\"");
        sink.note_for(Some(7), "seven");
        sink.close().unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines[0]["type"], "note");
        assert_eq!(lines[0]["message"], "hello \"there\"");
        assert_eq!(lines[1]["pid"], 7);
    }

    #[test]
    fn a_failed_write_is_kept_and_counts_what_is_lost() {
        let full = OutputFile::open(std::path::Path::new("/dev/full")).unwrap();
        let sink = Sink::new(Dest::File(full), 0, false);
        sink.write("held until claimed");
        sink.claim(std::process::id() as i32).unwrap();
        sink.write("a");
        sink.note("b");
        let e = sink.close().unwrap_err();
        match &e {
            OutputError::Write { lost, source, .. } => {
                assert_eq!(*lost, 3, "{e}");
                assert_eq!(source.raw_os_error(), Some(libc::ENOSPC));
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().starts_with("writing /dev/full failed"), "{e}");
    }
}
