//! `multiprobe`: probe a real program by symbol, with several independent actions on one
//! site — one breakpoint, many handlers.
//!
//! ```text
//! multiprobe run    [OPTIONS] -p SPEC [-p SPEC]... -- CMD [ARGS]...
//! multiprobe attach [OPTIONS] PID -p SPEC [-p SPEC]...
//! ```
//!
//! Exit status: for `run`, the program's own (a program killed by a signal kills
//! multiprobe with the same signal, as a shell would see it unprobed); for `attach`, 0
//! after a clean detach; 2 for bad input (nothing is left probed or stopped).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand};
use multiprobe_backend_ptrace::{ExitStatus, Stop, Tracer};
use multiprobe_cli::actions::Sink;
use multiprobe_cli::affinity;
use multiprobe_cli::output::{json, table, Outcome, Summary};
use multiprobe_cli::session::{self, State};
use multiprobe_cli::signals;
use multiprobe_cli::spec::ProbeSpec;

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
    /// Print the live count table every SECS seconds.
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

fn parse_interval(s: &str) -> Result<Duration, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{s:?} is not a positive number of seconds")),
    }
}

/// clap's message without its `error:` prefix, usage block and hint, on one line.
fn one_line(msg: &str) -> String {
    let body = msg.split("\n\n").next().unwrap_or(msg);
    let body = body.strip_prefix("error: ").unwrap_or(body);
    body.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A one-line error and exit status 2.
fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("multiprobe: error: {msg}");
    ExitCode::from(2)
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version are not errors.
        Err(e) if !e.use_stderr() => e.exit(),
        Err(e) => return fail(one_line(&e.to_string())),
    };
    match cli.command {
        Command::Run { common, cmd } => run(common, cmd),
        Command::Attach { pid, common } => attach(pid, common),
    }
}

fn sink_for(common: &Common) -> Result<Arc<Sink>, String> {
    let out: Box<dyn Write + Send> = match &common.output {
        Some(p) => Box::new(
            std::fs::File::create(p).map_err(|e| format!("cannot create {}: {e}", p.display()))?,
        ),
        None => Box::new(std::io::stderr()),
    };
    Ok(Arc::new(Sink::new(out, common.max_lines, common.json)))
}

fn run(common: Common, cmd: Vec<String>) -> ExitCode {
    let sink = match sink_for(&common) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let mut command = std::process::Command::new(&cmd[0]);
    command.args(&cmd[1..]);
    let started = Instant::now();
    let mut tracer = match Tracer::spawn(&mut command) {
        Ok(t) => t,
        Err(e) => return fail(format!("cannot run {:?}: {e}", cmd[0])),
    };
    let state = State::new(
        common.probes.clone(),
        tracer.registry().clone(),
        tracer.pid(),
        Arc::clone(&sink),
        std::env::var("LD_LIBRARY_PATH").ok(),
    );
    // Run the loader to the program's entry point and place the probes there, before any
    // of the program's own code runs. A probe that cannot be placed ends the program
    // there: it never runs half-probed.
    match tracer.run_to_entry() {
        Ok(None) => {
            session::place_now(&state, true);
            if let Some(e) = lock(&state).fatal().map(str::to_string) {
                kill(tracer.pid());
                drop(tracer);
                return fail(e);
            }
        }
        // The program ended (or was taken away) before reaching its entry point.
        Ok(Some(stop)) => {
            let outcome = Ok(outcome_of(stop));
            return finish(outcome, &state, &sink, &common, tracer.pid(), started);
        }
        Err(e) => {
            kill(tracer.pid());
            drop(tracer);
            return fail(format!("cannot run {:?} to its entry point: {e}", cmd[0]));
        }
    }
    signals::install(&mut tracer, false);
    let _pinned = pin(&common, tracer.pid());
    let outcome = serve(&mut tracer, &state, &common, &sink, started);
    finish(outcome, &state, &sink, &common, tracer.pid(), started)
}

fn attach(pid: i32, common: Common) -> ExitCode {
    let sink = match sink_for(&common) {
        Ok(s) => s,
        Err(e) => return fail(e),
    };
    let started = Instant::now();
    let mut tracer = match Tracer::attach(pid) {
        Ok(t) => t,
        Err(multiprobe_core::Error::ProcessGone) => return fail(format!("no process {pid}")),
        Err(e) => return fail(format!("cannot attach to process {pid}: {e}")),
    };
    let state = State::new(
        common.probes.clone(),
        tracer.registry().clone(),
        pid,
        Arc::clone(&sink),
        None,
    );
    session::place_now(&state, true);
    if let Some(e) = lock(&state).fatal().map(str::to_string) {
        // Nothing of ours stays in the process: detaching removes what was placed.
        let _ = tracer.detach();
        return fail(e);
    }
    signals::install(&mut tracer, true);
    let pinned = pin(&common, pid);
    let placed = lock(&state)
        .rows()
        .iter()
        .filter(|r| r.site.is_some())
        .count();
    sink.write(&format!(
        "multiprobe: attached to process {pid}; {placed} handler(s) placed; Ctrl-C detaches"
    ));
    let outcome = serve(&mut tracer, &state, &common, &sink, started);
    if let Some(p) = pinned {
        p.restore(pid);
    }
    finish(outcome, &state, &sink, &common, pid, started)
}

/// `--pin`, if asked; a failure only costs speed, so it is reported and ignored.
fn pin(common: &Common, pid: i32) -> Option<affinity::Pinned> {
    if !common.pin {
        return None;
    }
    match affinity::pin_together(pid) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("multiprobe: --pin: {e}; going on unpinned");
            None
        }
    }
}

fn lock(s: &session::Shared) -> std::sync::MutexGuard<'_, State> {
    s.lock().unwrap_or_else(|p| p.into_inner())
}

fn kill(pid: i32) {
    // SAFETY: sending a signal to our traced child; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Serve hits until the program ends or we detach; print the live table on the way.
fn serve(
    tracer: &mut Tracer,
    state: &session::Shared,
    common: &Common,
    sink: &Sink,
    started: Instant,
) -> Result<Outcome, String> {
    let mut next_tick = common.interval.map(|i| Instant::now() + i);
    loop {
        let stop = tracer
            .run_until(|| next_tick.is_some_and(|t| Instant::now() >= t))
            .map_err(|e| format!("tracing process {}: {e}", tracer.pid()))?;
        match stop {
            None => {
                if let (Some(t), Some(i)) = (&mut next_tick, common.interval) {
                    *t += i;
                    let rows = lock(state).rows();
                    if common.json {
                        sink.write(&serde_json::json!({ "live": rows }).to_string());
                    } else {
                        let secs = started.elapsed().as_secs_f64();
                        sink.write(&format!("--- {secs:.1} s ---\n{}", table(&rows).trim_end()));
                    }
                }
            }
            Some(Stop::Exec { unregistered }) => {
                lock(state).exec(&unregistered);
                // The new program's probes go in at its entry point, as at the start.
                loop {
                    match tracer
                        .run_to_entry()
                        .map_err(|e| format!("tracing process {}: {e}", tracer.pid()))?
                    {
                        None => break session::place_now(state, false),
                        Some(Stop::Exec { unregistered }) => lock(state).exec(&unregistered),
                        Some(stop) => return Ok(outcome_of(stop)),
                    }
                }
            }
            Some(stop) => return Ok(outcome_of(stop)),
        }
    }
}

/// The outcome of a stop that ends the session. (An exec does not end it; the callers
/// handle it before asking.)
fn outcome_of(stop: Stop) -> Outcome {
    match stop {
        Stop::Exited(ExitStatus::Code(c)) => Outcome::Exited(c),
        Stop::Exited(ExitStatus::Signal(s)) => Outcome::Killed(s.as_raw()),
        // As before the backend named this case: reaped by someone else.
        Stop::Exited(ExitStatus::Unknown) => Outcome::Killed(0),
        Stop::Detached | Stop::Exec { .. } => Outcome::Detached,
    }
}

fn finish(
    outcome: Result<Outcome, String>,
    state: &session::Shared,
    sink: &Sink,
    common: &Common,
    pid: i32,
    started: Instant,
) -> ExitCode {
    let outcome = match outcome {
        Ok(o) => o,
        Err(e) => return fail(e),
    };
    if let Some(e) = lock(state).fatal().map(str::to_string) {
        return fail(e);
    }
    let dropped = sink.finish();
    let rows = lock(state).rows();
    if common.json {
        sink.write(&json(&Summary {
            pid: pid as u32,
            outcome: &outcome,
            duration_ms: started.elapsed().as_millis() as u64,
            dropped_lines: dropped,
            probes: &rows,
        }));
    } else {
        sink.write(table(&rows).trim_end());
    }
    match outcome {
        Outcome::Exited(c) => ExitCode::from(c as u8),
        Outcome::Detached => ExitCode::SUCCESS,
        Outcome::Killed(sig) => signals::die_like(sig),
    }
}
