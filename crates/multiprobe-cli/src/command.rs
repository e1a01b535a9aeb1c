//! The two commands, `run` and `attach`, step by step.
//!
//! The order is what keeps the promises: signals are handled before anything is
//! written into the program ([`crate::signals`]); `-o FILE` is opened (checked, not
//! truncated) before the program is started or attached to ([`crate::outfile`]); every
//! probe is resolved and placed before the program runs its own code — for `run`, the
//! program's own at exec and the libraries' when the loader has mapped them, before
//! their constructors (see [`crate::session`]) — and the output file is taken only
//! then; a failure up to there kills the spawned program (before it ran any of its own
//! code) or detaches from the attached one, and is one line with exit status 2; from
//! there on the tracer loop serves hits until the program ends or a signal asks to
//! detach, placing probes in each program an `exec` brings and, with `-f`, in each
//! fork child; the summary comes last, and the exit status is decided by
//! [`crate::exit::decide`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use multiprobe_backend_ptrace::{DetachHandle, ExitStatus, Stop, Tracer};

use crate::collected::{Collected, Drainer};
use crate::error::Error;
use crate::exit::{self, Exit};
use crate::outfile::OutputFile;
use crate::report::{json, json_interval, table, Outcome, Row, Summary};
use crate::session::{self, lock, programs, Session, Setup, Shared};
use crate::signals;
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
    /// `-f`: follow fork children.
    pub follow: bool,
    /// `-T`: per-hit lines show the time.
    pub time: bool,
    /// `--stop`: every action runs in the tracer, one stop per hit (no collecting in
    /// the tracee).
    pub stop: bool,
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
    tracer.follow_forks(opts.follow);
    let pid = tracer.pid();
    let handle = detach_handle(&mut tracer, Some(pid));
    detach_at_dead_end(&sink, handle.as_ref());
    let setup = Setup {
        specs: opts.probes.clone(),
        sink: Arc::clone(&sink),
        ld_library_path: std::env::var("LD_LIBRARY_PATH").ok(),
        cmd_programs: programs::named(cmd),
        cancel: handle,
        time: opts.time,
        collected: collected(opts, &tracer),
    };
    let session = Session::new(setup, pid, tracer.registry().clone());
    // The program is held at its first instruction: its own probes go in now, the
    // libraries' when the loader has mapped them (inside the loader hook). A probe that
    // cannot be placed ends the program there: it never runs half-probed.
    session::place_at_exec(&session, pid);
    if let Some(e) = lock(&session).take_fatal() {
        kill(pid);
        drop(tracer);
        return Err(e);
    }
    let _pinned = pin(opts, pid);
    let outcome = serve(&mut tracer, &session, opts, &sink, started)?;
    if let Some(e) = lock(&session).take_fatal() {
        // Killed in the loader hook, before any of its own code ran.
        drop(tracer);
        return Err(e);
    }
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
    tracer.follow_forks(opts.follow);
    let handle = detach_handle(&mut tracer, None);
    detach_at_dead_end(&sink, handle.as_ref());
    let setup = Setup {
        specs: opts.probes.clone(),
        sink: Arc::clone(&sink),
        ld_library_path: None,
        cmd_programs: Vec::new(),
        cancel: handle,
        time: opts.time,
        collected: collected(opts, &tracer),
    };
    let session = Session::new(setup, pid, tracer.registry().clone());
    session::place_attached(&session, pid);
    if let Some(e) = lock(&session).take_fatal() {
        // Nothing of ours stays in the process: detaching removes what was placed.
        let _ = tracer.detach();
        return Err(e);
    }
    let pinned = pin(opts, pid);
    let placed = lock(&session).armed(pid);
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

/// Where the collecting actions print, unless `--stop`.
fn collected(opts: &Options, tracer: &Tracer) -> Option<Arc<Collected>> {
    if opts.stop {
        return None;
    }
    let c = Collected::default();
    c.drain_from(tracer.collection());
    Some(Arc::new(c))
}

fn open_sink(opts: &Options) -> Result<Arc<Sink>, Error> {
    let dest = match &opts.output {
        Some(p) => Dest::File(OutputFile::open(p)?),
        None => Dest::Stderr,
    };
    Ok(Arc::new(Sink::new(dest, opts.max_lines, opts.json)))
}

/// Output to stderr that fails (a closed pipe) ends the session: detach, the program
/// runs on unprobed, exit status 2 (see [`Sink::on_dead_end`]).
fn detach_at_dead_end(sink: &Sink, handle: Option<&DetachHandle>) {
    if let Some(h) = handle {
        let h = h.clone();
        sink.on_dead_end(move || h.request());
    }
}

/// The handle signals detach through, armed for them.
fn detach_handle(tracer: &mut Tracer, program: Option<i32>) -> Option<DetachHandle> {
    match tracer.detach_handle() {
        Ok(h) => {
            signals::arm(h.clone(), program);
            Some(h)
        }
        Err(e) => {
            crate::say(&format!("multiprobe: signals will not detach cleanly: {e}"));
            None
        }
    }
}

/// `--pin`, if asked; a failure only costs speed, so it is reported and ignored.
fn pin(opts: &Options, pid: i32) -> Option<affinity::Pinned> {
    if !opts.pin {
        return None;
    }
    match affinity::pin_together(pid) {
        Ok(p) => Some(p),
        Err(e) => {
            crate::say(&format!("multiprobe: --pin: {e}; going on unpinned"));
            None
        }
    }
}

fn kill(pid: i32) {
    // SAFETY: sending a signal to our traced child; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGKILL) };
}

/// Wakes the tracer loop every interval (it sleeps in `waitpid` while the program
/// makes no hit), until dropped.
struct Alarm {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Alarm {
    fn start(every: Duration, handle: DetachHandle) -> Alarm {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            while !s.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::park_timeout(every);
                handle.wake();
            }
        });
        Alarm {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Alarm {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}

/// The live table: hits since the last tick beside the totals.
#[derive(Default)]
struct Live {
    last: HashMap<(i32, Option<u64>, String, String), u64>,
}

impl Live {
    fn tick(&mut self, mut rows: Vec<Row>) -> Vec<Row> {
        for r in &mut rows {
            let key = (r.pid, r.site, r.symbol.clone(), r.action.clone());
            let before = self.last.insert(key, r.hits).unwrap_or(0);
            r.interval_hits = Some(r.hits.saturating_sub(before));
        }
        rows
    }
}

/// Serve hits until the program ends or we detach; print the live table on the way;
/// place probes in each new program (`exec`) and each followed fork child.
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
    let mut live = Live::default();
    let collected = lock(session).collected();
    // Prints the collected records while the loop sleeps in waitpid, and what is left
    // when the loop returns (dropped there, before the summary).
    let wake = tracer.detach_handle().ok();
    let _drainer = collected.clone().map(|c| Drainer::start(c, wake));
    // The loop sleeps while the program makes no hit: an alarm wakes it for the ticks.
    let _alarm = match (opts.interval, tracer.detach_handle()) {
        (Some(every), Ok(h)) => Some(Alarm::start(every, h)),
        _ => None,
    };
    loop {
        let stop = tracer
            .run_until(|| ticker.is_some_and(|t| t.due(Instant::now())))
            .map_err(trace)?;
        match stop {
            None => {
                if let Some(t) = &mut ticker {
                    let began = Instant::now();
                    if let Some(c) = &collected {
                        c.print();
                    }
                    let rows = live.tick(lock(session).rows(None));
                    let secs = started.elapsed().as_secs_f64();
                    if opts.json {
                        sink.write(&json_interval(secs, &rows));
                    } else {
                        sink.write(&format!("--- {secs:.1} s ---\n{}", table(&rows).trim_end()));
                    }
                    t.advance(Instant::now(), began.elapsed());
                }
            }
            Some(Stop::Exec { unregistered }) => {
                if let Some(c) = &collected {
                    c.print();
                }
                lock(session).exec(pid, &unregistered);
                session::place_at_exec(session, pid);
            }
            Some(Stop::ProcessExec {
                pid: p,
                unregistered,
            }) => {
                if let Some(c) = &collected {
                    c.print();
                }
                lock(session).exec(p, &unregistered);
                session::place_at_exec(session, p);
            }
            Some(Stop::Forked {
                parent,
                child,
                execed,
            }) => {
                if let Some(registry) = tracer.registry_of(child) {
                    if let Some(c) = &collected {
                        c.drain_from(registry.backend().collection());
                    }
                    lock(session).forked(parent, child, registry.clone());
                    if execed {
                        lock(session).exec(child, &[]);
                        session::place_at_exec(session, child);
                    } else {
                        session::place_forked(session, child);
                    }
                }
            }
            Some(Stop::ProcessExited { pid: p, status }) => {
                lock(session).ended(p, outcome_of_status(status), true);
            }
            Some(stop) => return Ok(outcome_of(stop)),
        }
    }
}

fn outcome_of_status(status: ExitStatus) -> Outcome {
    match status {
        ExitStatus::Code(c) => Outcome::Exited(c),
        ExitStatus::Signal(s) => Outcome::Killed(s.as_raw()),
        // Reaped by someone else: how it ended is unknown.
        ExitStatus::Unknown => Outcome::Killed(0),
    }
}

/// The outcome of a stop that ends the session. (Execs, forks and the end of one of
/// several processes do not end it; the callers handle them before asking.)
fn outcome_of(stop: Stop) -> Outcome {
    match stop {
        Stop::Exited(status) => outcome_of_status(status),
        _ => Outcome::Detached,
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
    // A program that ended before its probes were placed (the loader failed) still
    // gets its summary.
    let _ = sink.claim(pid);
    lock(session).ended(pid, outcome.clone(), mode == Mode::Attach);
    let dropped = sink.finish_lines();
    let (rows, processes) = {
        let s = lock(session);
        (s.rows(Some(outcome)), s.processes(outcome))
    };
    if *outcome == Outcome::Detached {
        let missed: u64 = rows.iter().map(|r| r.missed).sum();
        sink.note(&format!(
            "detached: every probe was removed and the program runs on unprobed; MISSED \
             counts hits that ran no handler: {missed} (hits that arrived while the probes \
             were being removed, and hits inside a handler)"
        ));
    }
    let summary = if opts.json {
        json(&Summary {
            pid,
            outcome,
            duration_ms: started.elapsed().as_millis() as u64,
            dropped_lines: dropped,
            processes: &processes,
            probes: &rows,
        })
    } else {
        table(&rows).trim_end().to_string()
    };
    sink.write(&summary);
    let closed = sink.close();
    if let Err(e) = &closed {
        if sink.is_file() {
            crate::say(&summary);
        }
        crate::say(&format!("multiprobe: error: {e}"));
    }
    exit::decide(mode, outcome, ending, closed.is_err())
}
