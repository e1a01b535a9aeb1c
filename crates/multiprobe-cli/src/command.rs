//! The two commands, `run` and `attach`, step by step.
//!
//! The order is what keeps the promises: signals are handled before anything is
//! written into the program ([`crate::signals`]); `-o FILE` is opened (checked, not
//! truncated) before the program is started or attached to ([`crate::outfile`]); every
//! probe is resolved and placed before the program runs its own code (`run`: held at
//! its entry point) and the output file is taken only then; a failure up to there
//! kills the spawned program or detaches from the attached one, and is one line with
//! exit status 2; from there on the tracer loop serves hits until the program ends or a
//! signal asks to detach; the summary comes last, and the exit status is decided by
//! [`crate::exit::decide`].

use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use multiprobe_backend_ptrace::{DetachHandle, ExitStatus, Stop, Tracer};

use crate::error::Error;
use crate::exit::{self, Exit};
use crate::outfile::OutputFile;
use crate::report::{json, table, Outcome, Summary};
use crate::session::{self, lock, Session, Shared};
use crate::signals::{self, Signal};
use crate::sink::{Dest, Sink};
use crate::spec::ProbeSpec;
use crate::ticker::Ticker;
use crate::{affinity, Mode};

/// What `run` and `attach` share.
#[derive(Clone, Debug)]
pub struct Options {
    /// The probes (at least one).
    pub probes: Vec<ProbeSpec>,
    /// Summary and per-hit lines as JSON.
    pub json: bool,
    /// The live table's interval.
    pub interval: Option<Duration>,
    /// `-o FILE`.
    pub output: Option<PathBuf>,
    /// Per-hit lines a second (0: no limit).
    pub max_lines: u64,
    /// `--pin`.
    pub pin: bool,
}

/// `run`: start `cmd` under the probes.
pub fn run(opts: &Options, cmd: &[String]) -> Result<Exit, Error> {
    signals::install(Mode::Run);
    let sink = open_sink(opts)?;
    if let Some(e) = signals::ending() {
        return Ok(exit::decide(Mode::Run, &Outcome::Detached, Some(e), false));
    }
    let program = cmd.first().cloned().unwrap_or_default();
    let mut command = Command::new(&program);
    command.args(cmd.iter().skip(1));
    let started = Instant::now();
    let mut tracer = Tracer::spawn(&mut command).map_err(|source| Error::Spawn {
        program: program.clone(),
        source,
    })?;
    let pid = tracer.pid();
    let handle = detach_handle(&mut tracer, Some(pid));
    let session = Session::new(
        opts.probes.clone(),
        tracer.registry().clone(),
        pid,
        Arc::clone(&sink),
        std::env::var("LD_LIBRARY_PATH").ok(),
        handle,
    );
    // Run the loader to the program's entry point and place the probes there, before any
    // of the program's own code runs. A probe that cannot be placed ends the program
    // there: it never runs half-probed.
    let outcome = match tracer.run_to_entry() {
        Ok(None) => {
            if let Err(e) = place_first(&session, &sink, pid) {
                kill(pid);
                drop(tracer);
                return Err(e);
            }
            let _pinned = pin(opts, pid);
            serve(&mut tracer, &session, opts, &sink, started)?
        }
        // The program ended (or a signal had us detach) before its entry point.
        Ok(Some(stop)) => {
            sink.claim(pid)?;
            outcome_of(stop)
        }
        Err(source) => {
            kill(pid);
            drop(tracer);
            return Err(Error::Entry { program, source });
        }
    };
    Ok(finish(
        Mode::Run,
        &outcome,
        &session,
        &sink,
        opts,
        pid,
        started,
    ))
}

/// `attach`: probe the running process `pid`.
pub fn attach(pid: i32, opts: &Options) -> Result<Exit, Error> {
    signals::install(Mode::Attach);
    let sink = open_sink(opts)?;
    if let Some(e) = signals::ending() {
        return Ok(exit::decide(
            Mode::Attach,
            &Outcome::Detached,
            Some(e),
            false,
        ));
    }
    let started = Instant::now();
    let mut tracer = Tracer::attach(pid).map_err(|e| match e {
        multiprobe_core::Error::ProcessGone => Error::NoProcess(pid),
        source => Error::Attach { pid, source },
    })?;
    let handle = detach_handle(&mut tracer, None);
    let session = Session::new(
        opts.probes.clone(),
        tracer.registry().clone(),
        pid,
        Arc::clone(&sink),
        None,
        handle,
    );
    if let Err(e) = place_first(&session, &sink, pid) {
        // Nothing of ours stays in the process: detaching removes what was placed.
        let _ = tracer.detach();
        return Err(e);
    }
    let pinned = pin(opts, pid);
    let placed = lock(&session).armed();
    sink.note(&format!(
        "attached to process {pid}; {placed} handler(s) placed; Ctrl-C detaches"
    ));
    let outcome = serve(&mut tracer, &session, opts, &sink, started);
    if let Some(p) = pinned {
        p.restore(pid);
    }
    Ok(finish(
        Mode::Attach,
        &outcome?,
        &session,
        &sink,
        opts,
        pid,
        started,
    ))
}

fn open_sink(opts: &Options) -> Result<Arc<Sink>, Error> {
    let dest = match &opts.output {
        Some(p) => Dest::File(OutputFile::open(p)?),
        None => Dest::Stderr,
    };
    Ok(Arc::new(Sink::new(dest, opts.max_lines, opts.json)))
}

/// The handle signals detach through, armed for them.
fn detach_handle(tracer: &mut Tracer, program: Option<i32>) -> Option<DetachHandle> {
    match tracer.detach_handle() {
        Ok(h) => {
            signals::arm(h.clone(), program);
            Some(h)
        }
        Err(e) => {
            eprintln!("multiprobe: signals will not detach cleanly: {e}");
            None
        }
    }
}

/// The first placement, then the output file is ours.
fn place_first(session: &Shared, sink: &Sink, pid: i32) -> Result<(), Error> {
    session::place_now(session, true);
    if let Some(e) = lock(session).take_fatal() {
        return Err(e);
    }
    Ok(sink.claim(pid)?)
}

/// `--pin`, if asked; a failure only costs speed, so it is reported and ignored.
fn pin(opts: &Options, pid: i32) -> Option<affinity::Pinned> {
    if !opts.pin {
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

fn kill(pid: i32) {
    // SAFETY: sending a signal to our traced child; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Serve hits until the program ends or we detach; print the live table on the way.
fn serve(
    tracer: &mut Tracer,
    session: &Shared,
    opts: &Options,
    sink: &Sink,
    started: Instant,
) -> Result<Outcome, Error> {
    let pid = tracer.pid();
    let trace = |source| Error::Trace { pid, source };
    let mut ticker = opts.interval.map(|i| Ticker::new(i, Instant::now()));
    loop {
        let stop = tracer
            .run_until(|| ticker.is_some_and(|t| t.due(Instant::now())))
            .map_err(trace)?;
        match stop {
            None => {
                if let Some(t) = &mut ticker {
                    let rows = lock(session).rows();
                    if opts.json {
                        sink.write(&serde_json::json!({ "live": rows }).to_string());
                    } else {
                        let secs = started.elapsed().as_secs_f64();
                        sink.write(&format!("--- {secs:.1} s ---\n{}", table(&rows).trim_end()));
                    }
                    t.advance(Instant::now());
                }
            }
            Some(Stop::Exec { unregistered }) => {
                lock(session).exec(&unregistered);
                // The new program's probes go in at its entry point, as at the start.
                loop {
                    match tracer.run_to_entry().map_err(trace)? {
                        None => break session::place_now(session, false),
                        Some(Stop::Exec { unregistered }) => lock(session).exec(&unregistered),
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
        // Reaped by someone else: how it ended is unknown.
        Stop::Exited(ExitStatus::Unknown) => Outcome::Killed(0),
        Stop::Detached | Stop::Exec { .. } => Outcome::Detached,
    }
}

/// The end: pass a signal on (`run`), say how an attached process ended, print the
/// summary, and decide the exit status. If the output could not be written, the error
/// goes to stderr — with the summary, when the output was a file.
fn finish(
    mode: Mode,
    outcome: &Outcome,
    session: &Shared,
    sink: &Sink,
    opts: &Options,
    pid: i32,
    started: Instant,
) -> Exit {
    let ending = signals::ending();
    if let (Mode::Run, Outcome::Detached, Some(e)) = (mode, outcome, ending) {
        signals::pass_on(pid, e);
    }
    if mode == Mode::Attach {
        match outcome {
            Outcome::Exited(c) => sink.note(&format!("process {pid} exited with status {c}")),
            Outcome::Killed(s) => match Signal::from_raw(*s) {
                Some(s) => sink.note(&format!("process {pid} was killed by {}", signals::name(s))),
                None => sink.note(&format!("process {pid} is gone (how it ended is unknown)")),
            },
            Outcome::Detached => {}
        }
    }
    let dropped = sink.finish_lines();
    let rows = lock(session).rows();
    let summary = if opts.json {
        json(&Summary {
            pid: pid as u32,
            outcome,
            duration_ms: started.elapsed().as_millis() as u64,
            dropped_lines: dropped,
            probes: &rows,
        })
    } else {
        table(&rows).trim_end().to_string()
    };
    sink.write(&summary);
    let closed = sink.close();
    if let Err(e) = &closed {
        if sink.is_file() {
            eprintln!("{summary}");
        }
        eprintln!("multiprobe: error: {e}");
    }
    exit::decide(mode, outcome, ending, closed.is_err())
}
