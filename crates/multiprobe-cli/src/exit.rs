//! The exit status, decided in one place.
//!
//! | how the session ended | `run` | `attach` |
//! |---|---|---|
//! | the program exited with code N | N | N |
//! | the program was killed by signal S | multiprobe dies of S (as a shell would see the program die unprobed) | 1, with `multiprobe: process PID was killed by S`: never 128+S, which would look as if multiprobe itself had been killed |
//! | SIGINT or SIGTERM to multiprobe: detached | see [`crate::signals`] | 0 (the process runs on) |
//! | another signal S to multiprobe: detached | dies of S | dies of S |
//! | bad input (nothing was left probed or stopped) | 2 | 2 |
//! | the output could not be written (`-o` to a full disk, `/dev/full`, `ulimit -f`, a closed pipe) | 2, unless a signal ended the session | same |
//!
//! A signal that ended the session wins over the rest: multiprobe was asked to end by
//! it, and its caller (a shell, a supervisor) should see that.

use std::process::ExitCode;

use crate::report::Outcome;
use crate::signals::{self, Ending, Signal};
use crate::Mode;

/// How multiprobe ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// With this exit status.
    Code(u8),
    /// Killed by this signal (raised on itself).
    Signal(Signal),
}

/// Multiprobe's own errors: bad input, or output that could not be written.
pub const ERROR: u8 = 2;

impl Exit {
    /// Do it (returns only for [`Exit::Code`], or if raising the signal did not end us).
    pub fn apply(self) -> ExitCode {
        match self {
            Exit::Code(c) => ExitCode::from(c),
            Exit::Signal(s) => signals::die_of(s),
        }
    }
}

/// The exit of a session of `mode` that ended with `outcome`; `ending` is the signal
/// that asked it to end, if one did; `output_failed`: something could not be written.
pub fn decide(mode: Mode, outcome: &Outcome, ending: Option<Ending>, output_failed: bool) -> Exit {
    let polite = |e: &Ending| e.signal == Signal::INT || e.signal == Signal::TERM;
    match (mode, ending) {
        (Mode::Attach, Some(e)) if polite(&e) => {}
        (_, Some(e)) => return Exit::Signal(e.signal),
        (_, None) => {}
    }
    if output_failed {
        return Exit::Code(ERROR);
    }
    match (mode, outcome) {
        (_, Outcome::Exited(c)) => Exit::Code(*c as u8),
        (Mode::Run, Outcome::Killed(s)) => match Signal::from_raw(*s) {
            Some(s) => Exit::Signal(s),
            None => Exit::Code(1),
        },
        (Mode::Attach, Outcome::Killed(_)) => Exit::Code(1),
        (_, Outcome::Detached) => Exit::Code(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ending(n: i32) -> Option<Ending> {
        Some(Ending {
            signal: Signal::from_raw(n).unwrap(),
            from_terminal: false,
        })
    }

    #[test]
    fn every_row_of_the_table() {
        use Mode::{Attach, Run};
        use Outcome::{Detached, Exited, Killed};
        let sig = |n| Exit::Signal(Signal::from_raw(n).unwrap());
        assert_eq!(decide(Run, &Exited(7), None, false), Exit::Code(7));
        assert_eq!(decide(Attach, &Exited(7), None, false), Exit::Code(7));
        assert_eq!(decide(Run, &Killed(9), None, false), sig(9));
        assert_eq!(decide(Attach, &Killed(9), None, false), Exit::Code(1));
        assert_eq!(
            decide(Attach, &Detached, ending(libc::SIGINT), false),
            Exit::Code(0)
        );
        assert_eq!(
            decide(Attach, &Detached, ending(libc::SIGTERM), false),
            Exit::Code(0)
        );
        assert_eq!(
            decide(Run, &Detached, ending(libc::SIGINT), false),
            sig(libc::SIGINT)
        );
        assert_eq!(
            decide(Run, &Detached, ending(libc::SIGTERM), false),
            sig(libc::SIGTERM)
        );
        for s in [libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGALRM] {
            assert_eq!(decide(Attach, &Detached, ending(s), false), sig(s));
            assert_eq!(decide(Run, &Detached, ending(s), true), sig(s));
        }
        assert_eq!(decide(Run, &Exited(0), None, true), Exit::Code(ERROR));
        assert_eq!(
            decide(Attach, &Detached, ending(libc::SIGINT), true),
            Exit::Code(ERROR)
        );
    }
}
