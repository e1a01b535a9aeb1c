//! `--interval`: when the live table is due.
//!
//! Printing the table takes time (thousands of rows with `-p 'libc:*'`), and while it
//! prints no hit is served. If a tick could fall behind and catch up, an interval
//! shorter than the printing would leave no time to serve the program at all. So a
//! tick that is late is not made up: the next one comes a whole interval after the
//! late one was handled (as tokio's `MissedTickBehavior::Delay`). Skipping alone still
//! starves the program when one table takes many intervals to print (6,500 rows, 250
//! ms, at a 10 ms interval left it 4% of the time: 20,000 iterations of a test
//! program ran for minutes), so between two ticks the program is also served at least
//! as long as the last tick took: it always gets half the time or more. Intervals under
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

    /// The tick was handled, which took `took`; it is now `now`. The next one is an
    /// interval after the one just handled, or, if that is past already, an interval
    /// from now — and never sooner than `took` from now.
    pub fn advance(&mut self, now: Instant, took: Duration) {
        self.next += self.every;
        if self.next <= now {
            self.next = now + self.every;
        }
        self.next = self.next.max(now + took);
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
        t.advance(t0 + Duration::from_millis(130), Duration::from_millis(30));
        assert!(!t.due(t0 + Duration::from_millis(199)));
        assert!(t.due(t0 + Duration::from_millis(200)));
        // Printing took 3.5 intervals: the next tick is a whole interval away, not due
        // at once three more times.
        let late = t0 + Duration::from_millis(550);
        t.advance(late, Duration::from_millis(20));
        assert!(!t.due(late));
        assert!(!t.due(late + Duration::from_millis(99)));
        assert!(t.due(late + i));
    }

    #[test]
    fn a_slow_table_gets_the_program_as_long_to_run_before_the_next() {
        let t0 = Instant::now();
        let i = Duration::from_millis(10);
        let mut t = Ticker::new(i, t0);
        // The table took 250 ms to print: 250 ms of serving before the next, not 10.
        let now = t0 + Duration::from_millis(260);
        t.advance(now, Duration::from_millis(250));
        assert!(!t.due(now + Duration::from_millis(249)));
        assert!(t.due(now + Duration::from_millis(250)));
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
