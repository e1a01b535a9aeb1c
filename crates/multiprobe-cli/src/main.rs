//! `multiprobe`: probe a real program by symbol, with several independent actions on one
//! site — one breakpoint, many handlers.
//!
//! ```text
//! multiprobe run    [OPTIONS] -p SPEC [-p SPEC]... -- CMD [ARGS]...
//! multiprobe attach [OPTIONS] PID -p SPEC [-p SPEC]...
//! multiprobe list   [PATTERN] [-- CMD [ARGS]... | -p PID | PROGRAM]
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
use multiprobe_cli::list;
use multiprobe_cli::spec::ProbeSpec;
use multiprobe_cli::ticker::parse_interval;

/// The SPEC grammar, shown by `--help` of every command that takes specs.
const SPEC_HELP: &str = "\
SPEC:
  [uprobe:][FILE:]SYMBOL[+OFFSET][=ITEM,...]   a function (C, C++ or Rust name, or a
                                               wildcard pattern: 'libc:str*')
  uretprobe:[FILE:]SYMBOL[=ITEM,...]           the same, with ret unless a return action
                                               is given
  FILE:0xOFFSET[=ITEM,...]                     a file offset, for code without symbols
  0xADDRESS[=ITEM,...]                         an address in the process
  usdt:[FILE:][PROVIDER:]NAME[=ITEM,...]       a USDT probe ('usdt:python:function__entry')
  FILE is a library or program: a file name, a prefix of one (libc, python3) or a path.

ITEM (one handler per action on the probe's one breakpoint; default: count):
  count            count hits
  count:KEY        count per KEY: tid, pid, argN (top values), ustack (top stacks)
  args:N           print the first N arguments (a USDT probe's own arguments)
  regs             print the registers
  mem:ARG:LEN      hex-dump LEN bytes at the address in argument ARG
  str:ARG[:MAX]    print the C string argument ARG points to (at most MAX bytes, 256)
  ustack[:DEPTH]   print the user-space stack and count hits per stack
  ret              print each call's return value (and time) when it returns
  latency          histogram of each call's time from entry to return (summary)
  args:N,ret       one line per call at its return: f(0x1, 0x2) = 0x3 (N at most 7)
  if:argN OP NUM   run the spec's actions only when it holds (OP: == != < <= > >=);
                   hits where it does not are counted as FILTERED

Examples:
  multiprobe run -p libc:malloc -p libc:malloc=args:1 -- ls /usr
  multiprobe run -p 'libc:malloc=if:arg0>4096,count:arg0,ustack' -- python3 -c 'x=[0]*9999'
  multiprobe run -f -p libc:execve=str:0 -- sh -c 'ls | wc -l'
  multiprobe run -p 'libc:open*=latency' -p 'libc:read=args:3,ret' -- cat /etc/hostname
  multiprobe attach 1234 -p 'usdt:python:function__entry=str:1'";

#[derive(Parser, Debug)]
#[command(
    name = "multiprobe",
    version,
    about = "Probe a running program by symbol: many handlers on one breakpoint",
    after_help = SPEC_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start CMD under probes; exit with its exit status.
    #[command(after_help = SPEC_HELP)]
    Run {
        #[command(flatten)]
        common: Common,
        /// The program and its arguments, after `--`.
        #[arg(last = true, required = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
    /// Probe a running process; Ctrl-C detaches and it runs on.
    #[command(after_help = SPEC_HELP)]
    Attach {
        /// The process id.
        pid: i32,
        #[command(flatten)]
        common: Common,
    },
    /// List the functions and USDT probes a spec could name, with their library,
    /// address and whether each can be probed (like `bpftrace -l`, `perf probe -F`).
    #[command(after_help = list::HELP)]
    List {
        /// `[PATTERN] [PROGRAM]`: which (a spec's target with wildcards: `libc:mall*`,
        /// `*alloc*`, `usdt:*`; all if omitted), and the program or library file to list
        /// (its own functions) when neither -p nor -- CMD is given.
        #[arg(num_args = 0..=2, value_name = "PATTERN|PROGRAM")]
        words: Vec<String>,
        /// List what the running process PID maps.
        #[arg(short = 'p', long = "pid", value_name = "PID")]
        pid: Option<i32>,
        /// Start CMD, list what it maps once its libraries are loaded, and end it.
        #[arg(last = true, value_name = "CMD")]
        cmd: Vec<String>,
    },
}

#[derive(Args, Debug)]
struct Common {
    /// A probe: where, and what to do there (see SPEC below). Repeat for more.
    #[arg(short = 'p', long = "probe", value_name = "SPEC", required = true)]
    probes: Vec<ProbeSpec>,
    /// Follow fork children (as strace -f): probes in every descendant, counted per
    /// process.
    #[arg(short = 'f', long = "follow-forks")]
    follow: bool,
    /// Per-hit lines start with the wall-clock time, with microseconds.
    #[arg(short = 'T', long = "time")]
    time: bool,
    /// Print the summary (and per-hit lines and notes) as JSON, one object a line.
    #[arg(long)]
    json: bool,
    /// Print the live count table every SECS seconds, with the hits of each interval
    /// beside the totals (at least 0.01; a tick that comes late is skipped).
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
    /// Run every action in multiprobe, one ptrace stop per hit, instead of collecting
    /// `count`, `args`, `regs` and `mem` inside the program without a stop (the
    /// default where a site can be promoted to a jump).
    #[arg(long)]
    stop: bool,
}

/// clap's message without its `error:` prefix, usage block and hint, on one line.
fn one_line(msg: &str) -> String {
    let body = msg.split("\n\n").next().unwrap_or(msg);
    let body = body.strip_prefix("error: ").unwrap_or(body);
    body.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A hint for the mistakes people make most: a program after the specs without `--`.
fn hint(args: &[String], msg: &str) -> String {
    let run = args.get(1).is_some_and(|a| a == "run");
    if run && !args.iter().any(|a| a == "--") {
        return format!(
            "{msg}; put the program after --, as in: multiprobe run -p SPEC -- PROGRAM [ARGS]"
        );
    }
    msg.to_string()
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let result = match Cli::try_parse() {
        Ok(cli) => match cli.command {
            Command::Run { common, cmd } => command::run(&common.into(), &cmd),
            Command::Attach { pid, common } => command::attach(pid, &common.into()),
            Command::List { words, pid, cmd } => list::run(&words, pid, &cmd),
        },
        // --help and --version are not errors.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => Err(Error::Usage(hint(&args, &one_line(&e.to_string())))),
    };
    match result {
        Ok(exit) => exit.apply(),
        Err(e) => {
            multiprobe_cli::say(&format!("multiprobe: error: {e}"));
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
            follow: c.follow,
            time: c.time,
            stop: c.stop,
        }
    }
}
