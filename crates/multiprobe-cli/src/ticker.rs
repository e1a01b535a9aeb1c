//! `--interval`: when the live table is due.
//!
//! Printing the table takes time (thousands of rows with `-p 'libc:*'`), and while it
//! prints no hit is served. If a tick could fall behind and catch up, an interval
//! shorter than the printing would leave no time to serve the program at all. So a
//! tick that is late is not made up: the next one comes a whole interval after the
//! late one was handled (as tokio's `MissedTickBehavior::Delay`), and between two
//! ticks there is always at least an interval of serving. Intervals under
//! [`Ticker::MIN`] are refused: a table every few milliseconds is nothing a person can
//! read.

use std::time::{Duration, Instant};

/// The schedule of the live table.
#[derive(Clone, Copy, Debug)]
pub struct Ticker {
    every: Duration,
    next: Instant,
}

impl Ticker {
    /// The shortest interval accepted.
    pub const MIN: Duration = Duration::from_millis(10);

    /// A tick every `every`, the first one an interval after `now`.
    pub fn new(every: Duration, now: Instant) -> Ticker {
        Ticker {
            every,
            next: now + every,
        }
    }

    /// Whether a tick is due at `now`.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next
    }

    /// The tick was handled; it is now `now`. The next one is an interval after the
    /// one just handled, or, if that is past already, an interval from now.
    pub fn advance(&mut self, now: Instant) {
        self.next += self.every;
        if self.next <= now {
            self.next = now + self.every;
        }
    }
}

/// `--interval SECS`: at least [`Ticker::MIN`], finite.
pub fn parse_interval(s: &str) -> Result<Duration, String> {
    let d = s
        .parse::<f64>()
        .ok()
        .and_then(|v| Duration::try_from_secs_f64(v).ok())
        .filter(|d| !d.is_zero())
        .ok_or_else(|| format!("{s:?} is not a positive number of seconds"))?;
    if d < Ticker::MIN {
        return Err(format!(
            "{s:?} is too short: the live table is printed at most every {} seconds",
            Ticker::MIN.as_secs_f64()
        ));
    }
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn late_ticks_are_skipped_not_queued() {
        let t0 = Instant::now();
        let i = Duration::from_millis(100);
        let mut t = Ticker::new(i, t0);
        assert!(!t.due(t0 + Duration::from_millis(99)));
        assert!(t.due(t0 + i));
        // On time: the next is one interval after this one.
        t.advance(t0 + Duration::from_millis(130));
        assert!(!t.due(t0 + Duration::from_millis(199)));
        assert!(t.due(t0 + Duration::from_millis(200)));
        // Printing took 3.5 intervals: the next tick is a whole interval away, not due
        // at once three more times.
        let late = t0 + Duration::from_millis(550);
        t.advance(late);
        assert!(!t.due(late));
        assert!(!t.due(late + Duration::from_millis(99)));
        assert!(t.due(late + i));
    }

    #[test]
    fn intervals_are_checked() {
        assert_eq!(parse_interval("0.5"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_interval("0.01"), Ok(Ticker::MIN));
        for bad in ["0", "-1", "nan", "inf", "1e300", "x", ""] {
            assert!(
                parse_interval(bad)
                    .unwrap_err()
                    .contains("not a positive number"),
                "{bad}"
            );
        }
        for short in ["0.001", "1e-9", "0.0099"] {
            assert!(
                parse_interval(short).unwrap_err().contains("too short"),
                "{short}"
            );
        }
    }
}
