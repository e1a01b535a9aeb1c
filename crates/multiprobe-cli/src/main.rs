//! `multiprobe`: probe a real program by symbol, with several independent actions on one
//! site — one breakpoint, many handlers.
//!
//! ```text
//! multiprobe run    [OPTIONS] -p SPEC [-p SPEC]... -- CMD [ARGS]...
//! multiprobe attach [OPTIONS] PID -p SPEC [-p SPEC]...
//! ```
//!
//! Exit status (details in the `exit` module): for `run`, the program's own (a program
//! killed by a signal kills multiprobe with the same signal, as a shell would see it
//! unprobed); for `attach`, 0 after a clean detach, the process's exit code if it exited
//! while attached, 1 if it was killed by a signal (named on the output); 2 for bad input
//! (nothing is left probed or stopped) and for output that could not be written; and a
//! signal that ended multiprobe (after detaching) ends it as it would have — except
//! SIGINT and SIGTERM for `attach`, which exit 0.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use multiprobe_cli::command::{self, Options};
use multiprobe_cli::error::Error;
use multiprobe_cli::exit;
use multiprobe_cli::spec::ProbeSpec;
use multiprobe_cli::ticker::parse_interval;

#[derive(Parser, Debug)]
#[command(
    name = "multiprobe",
    version,
    about = "Probe a running program by symbol: many handlers on one breakpoint",
    after_help = "SPEC: symbol | symbol+0xOFF | library:symbol | 0xADDRESS, then optionally\n\
                  =ACTION[,ACTION...] with ACTION: count (default) | args:N | regs | mem:ARG:LEN.\n\
                  Each action is its own handler on the probe's one breakpoint:\n\
                  -p libc:malloc -p libc:malloc=args:1 puts two handlers on malloc."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start CMD under probes; exit with its exit status.
    Run {
        #[command(flatten)]
        common: Common,
        /// The program and its arguments.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Probe a running process; Ctrl-C detaches and it runs on.
    Attach {
        /// The process id.
        pid: i32,
        #[command(flatten)]
        common: Common,
    },
}

#[derive(Args, Debug)]
struct Common {
    /// A probe: where, and what to do there (see SPEC below). Repeat for more.
    #[arg(short = 'p', long = "probe", value_name = "SPEC", required = true)]
    probes: Vec<ProbeSpec>,
    /// Print the summary (and per-hit lines) as JSON.
    #[arg(long)]
    json: bool,
    /// Print the live count table every SECS seconds (at least 0.01; a tick that
    /// comes late is skipped, not made up).
    #[arg(long, value_name = "SECS", value_parser = parse_interval)]
    interval: Option<Duration>,
    /// Write multiprobe's output to FILE instead of stderr.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
    /// At most N per-hit lines a second; the rest are counted (0: no limit).
    #[arg(long, value_name = "N", default_value_t = 1000)]
    max_lines: u64,
    /// Run the program and multiprobe on one CPU: each hit is then a context switch
    /// rather than two cross-CPU wake-ups (much cheaper on virtual machines), but the
    /// program's threads share that CPU. `attach` restores the masks on detach.
    #[arg(long)]
    pin: bool,
}

/// clap's message without its `error:` prefix, usage block and hint, on one line.
fn one_line(msg: &str) -> String {
    let body = msg.split("\n\n").next().unwrap_or(msg);
    let body = body.strip_prefix("error: ").unwrap_or(body);
    body.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn main() -> ExitCode {
    let result = match Cli::try_parse() {
        Ok(cli) => match cli.command {
            Command::Run { common, cmd } => command::run(&common.into(), &cmd),
            Command::Attach { pid, common } => command::attach(pid, &common.into()),
        },
        // --help and --version are not errors.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => Err(Error::Usage(one_line(&e.to_string()))),
    };
    match result {
        Ok(exit) => exit.apply(),
        Err(e) => {
            eprintln!("multiprobe: error: {e}");
            ExitCode::from(exit::ERROR)
        }
    }
}

impl From<Common> for Options {
    fn from(c: Common) -> Options {
        Options {
            probes: c.probes,
            json: c.json,
            interval: c.interval,
            output: c.output,
            max_lines: c.max_lines,
            pin: c.pin,
        }
    }
}
