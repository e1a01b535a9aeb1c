//! Where multiprobe's own output goes (stderr, or `-o FILE`), with the rate limit on
//! per-hit lines. Lines are written whole (one `write` each), so concurrent writers
//! never interleave within one. Notes ([`Sink::note`]) are multiprobe's messages about
//! the session, as opposed to per-hit lines and tables; they all go through one place.

use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// multiprobe's output, shared by the handlers and the command.
pub struct Sink {
    out: Mutex<Box<dyn Write + Send>>,
    limit: Mutex<RateLimit>,
    json: bool,
}

impl std::fmt::Debug for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sink")
            .field("json", &self.json)
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// A sink writing to `out`, at most `max_lines` per-hit lines a second (0: no limit).
    pub fn new(out: Box<dyn Write + Send>, max_lines: u64, json: bool) -> Self {
        Sink {
            out: Mutex::new(out),
            limit: Mutex::new(RateLimit::new(max_lines)),
            json,
        }
    }

    /// Whether output is JSON lines.
    pub fn json(&self) -> bool {
        self.json
    }

    /// Write `text` (one or more whole lines; the newline is added).
    pub fn write(&self, text: &str) {
        let mut line = String::with_capacity(text.len() + 1);
        line.push_str(text);
        line.push('\n');
        let mut out = self.out.lock().unwrap_or_else(|p| p.into_inner());
        // Output errors (a closed pipe) must not disturb the traced program.
        let _ = out.write_all(line.as_bytes());
    }

    /// A note about the session (`multiprobe: ...`).
    pub fn note(&self, text: &str) {
        self.write(&format!("multiprobe: {text}"));
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
}
