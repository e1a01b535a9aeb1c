//! The exit status, decided in one place.
//!
//! | how the session ended | status |
//! |---|---|
//! | the program exited with code N | N |
//! | the program was killed by signal S | multiprobe dies of S (as a shell would see the program die unprobed) |
//! | detached (Ctrl-C) | 0 |
//! | bad input (nothing was left probed or stopped) | 2 |

use std::process::ExitCode;

use crate::report::Outcome;
use crate::signals::{self, Signal};

/// How multiprobe ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// With this exit status.
    Code(u8),
    /// Killed by this signal (raised on itself).
    Signal(Signal),
}

/// Multiprobe's own errors: bad input.
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

/// The exit of a session that ended with `outcome`.
pub fn decide(outcome: &Outcome) -> Exit {
    match outcome {
        Outcome::Exited(c) => Exit::Code(*c as u8),
        Outcome::Killed(s) => match Signal::new(*s) {
            Some(s) => Exit::Signal(s),
            None => Exit::Code(1),
        },
        Outcome::Detached => Exit::Code(0),
    }
}
