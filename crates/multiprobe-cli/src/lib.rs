//! The `multiprobe` command: probe specs, the handlers behind their actions, placing
//! them in a traced process (pending libraries included), signals, output and exit
//! status. The binary (`src/main.rs`) parses the command line and runs [`command`].
//!
//! One job per module: [`spec`] (what users write), [`command`] (the order of a
//! session), [`session`] (resolving, placing and accounting for probes), [`actions`]
//! (the handlers), [`collected`] (the actions that collect in the tracee), [`signals`] (detaching on every signal that would end us),
//! [`sink`] and [`outfile`] (where output goes, failing loudly), [`report`] and
//! [`lines`] (what it says), [`ticker`] (`--interval`), [`exit`] (the exit status),
//! [`libs`] (libraries on disk), [`affinity`] (`--pin`), [`ustack`] (stacks),
//! [`list`] (the `list` command), [`error`].

#![warn(missing_docs)]

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("multiprobe-cli supports x86-64 Linux only");

pub mod actions;
pub mod affinity;
pub mod collected;
pub mod command;
pub mod error;
pub mod exit;
pub mod libs;
pub mod lines;
pub mod list;
pub mod outfile;
pub mod report;
pub mod returning;
pub mod session;
pub mod signals;
pub mod sink;
pub mod spec;
pub mod ticker;
pub mod ustack;

/// Which command runs: what signals and the exit status mean depends on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `run`: multiprobe started the program (and stands in for it).
    Run,
    /// `attach`: the program was running already and runs on after.
    Attach,
}

/// Write `text` and a newline to stderr in one `write`. A failure (a closed pipe) is
/// ignored rather than a panic, as `eprintln!` would: there is nowhere left to report
/// it, and the exit status already says the output failed.
pub fn say(text: &str) {
    use std::io::Write;
    let mut line = String::with_capacity(text.len() + 1);
    line.push_str(text);
    line.push('\n');
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}
