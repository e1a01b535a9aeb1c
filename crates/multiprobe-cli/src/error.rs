//! What can go wrong, each as one line.
//!
//! An [`Error`] ends the command: `main` prints `multiprobe: error: {error}` on stderr
//! and exits with status 2. Every one of them is raised before the traced program ran
//! any probed code or after everything was taken out of it (see `command`): bad input
//! never leaves a program probed or stopped. A [`ProbeError`] is why one probe cannot
//! be placed: fatal at the first placement, a note (and a `failed` row) later.

use std::path::PathBuf;

use multiprobe_symbols::ResolveError;

use crate::outfile::OutputError;

/// Why one probe spec cannot be placed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The process's symbols say no (unknown, ambiguous, ...).
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// `+OFFSET` on an indirect function, whose implementation is another function.
    #[error(
        "{0:?} is a GNU indirect function: an offset into it is not supported (probe its \
         implementation by address)"
    )]
    IndirectOffset(String),
    /// `+OFFSET` beyond the function.
    #[error("offset {offset:#x} is past the end of {name} ({size} bytes)")]
    PastEnd {
        /// The offset asked for.
        offset: u64,
        /// The function.
        name: String,
        /// Its size.
        size: u64,
    },
    /// The library is neither mapped nor installed.
    #[error(
        "no library {0:?} is loaded or installed, and no program has that name (searched \
         LD_LIBRARY_PATH, /etc/ld.so.conf, the default directories, PATH and the library \
         directories of the programs the command names): name it by its path"
    )]
    NoLibrary(String),
    /// A library named by path that is not an ELF shared object (a `-dev` linker script).
    #[error("{} is not an ELF shared object (a linker script?): name the library it loads", .0.display())]
    NotSharedObject(PathBuf),
    /// A library on disk whose symbols cannot be read.
    #[error("cannot read {}: {why}", path.display())]
    Unreadable {
        /// The file.
        path: PathBuf,
        /// What failed.
        why: String,
    },
    /// A pattern that matches nothing in a library on disk.
    #[error("no function in {} matches {pattern:?}", path.display())]
    NoMatchIn {
        /// The library.
        path: PathBuf,
        /// The pattern.
        pattern: String,
    },
    /// A pattern that matches nothing in the process.
    #[error("no function matches {0:?}")]
    NoMatch(String),
    /// An indirect function in a library on disk that does not say which
    /// implementation its loader will choose.
    #[error(
        "{name:?} in {} is a GNU indirect function (its implementation is chosen when the \
         library is loaded) and the library does not say which it chose: probe it by address",
        path.display()
    )]
    IndirectUnknown {
        /// The function.
        name: String,
        /// The library.
        path: PathBuf,
    },
    /// A name that a library on disk does not have.
    #[error("no function named {name:?} in {}{}", path.display(), did_you_mean(near))]
    NoFunction {
        /// The name.
        name: String,
        /// The library.
        path: PathBuf,
        /// Names close to it.
        near: Vec<String>,
    },
    /// A name that a file without a symbol table does not export.
    #[error(
        "no function named {name:?} in {}: it is stripped (no symbol table; only the {exported} \
         functions it exports have names); probe code without a name by its file offset, \
         {}:0xOFFSET",
        file.display(), file_name(file)
    )]
    Stripped {
        /// The name.
        name: String,
        /// The file.
        file: PathBuf,
        /// How many functions it exports.
        exported: usize,
    },
    /// `FILE:0xOFFSET` beyond what the process maps of the file.
    #[error("offset {offset:#x} of {} is not mapped in the process", file.display())]
    OffsetNotMapped {
        /// The offset.
        offset: u64,
        /// The file.
        file: PathBuf,
    },
    /// `FILE:0xOFFSET` outside the file's code.
    #[error("offset {offset:#x} of {} is not in its code (an executable segment)", file.display())]
    OffsetNotCode {
        /// The offset.
        offset: u64,
        /// The file.
        file: PathBuf,
    },
    /// A USDT probe that a file on disk does not have.
    #[error("{} has no USDT probe {probe} (multiprobe list 'usdt:*' -- PROGRAM shows them)", path.display())]
    NoUsdt {
        /// The file.
        path: PathBuf,
        /// The spec's target.
        probe: String,
    },
    /// A USDT probe that no mapped file has.
    #[error("no USDT probe {0} in the process (multiprobe list 'usdt:*' shows them)")]
    NoUsdtHere(String),
    /// The registry (the backend) refused the site (shared by every spec there).
    #[error(transparent)]
    Register(std::sync::Arc<multiprobe_core::Error>),
    /// Some of a pattern's matches cannot be probed.
    #[error(
        "{failed} of {total} matching functions could not be probed (first: {label}: {first})"
    )]
    SomeUnprobeable {
        /// How many could not.
        failed: usize,
        /// How many matched.
        total: usize,
        /// The first that could not.
        label: String,
        /// Why.
        first: Box<ProbeError>,
    },
}

fn file_name(p: &std::path::Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn did_you_mean(near: &[String]) -> String {
    if near.is_empty() {
        String::new()
    } else {
        format!("; did you mean {}?", near.join(", "))
    }
}

/// An error that ends the command (exit status 2).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The command line (clap's message, on one line).
    #[error("{0}")]
    Usage(String),
    /// A probe that cannot be placed at the first placement.
    #[error("probe {spec:?}: {why}")]
    Probe {
        /// The spec as given.
        spec: String,
        /// Why.
        why: ProbeError,
    },
    /// The program cannot be started.
    #[error("cannot run {program:?}: {source}")]
    Spawn {
        /// `CMD`'s first word.
        program: String,
        /// Why.
        source: multiprobe_core::Error,
    },
    /// The program did not get to its entry point under trace.
    #[error("cannot run {program:?} to its entry point: {source}")]
    Entry {
        /// `CMD`'s first word.
        program: String,
        /// Why.
        source: multiprobe_core::Error,
    },
    /// `attach` to a pid that does not exist.
    #[error("no process {0}")]
    NoProcess(i32),
    /// `attach` refused.
    #[error("cannot attach to process {pid}: {source}")]
    Attach {
        /// The pid.
        pid: i32,
        /// Why.
        source: multiprobe_core::Error,
    },
    /// The process's maps cannot be read at the first placement.
    #[error("cannot read the maps of process {pid}: {source}")]
    Maps {
        /// The pid.
        pid: i32,
        /// Why.
        source: std::io::Error,
    },
    /// The tracer failed while the program ran.
    #[error("tracing process {pid}: {source}")]
    Trace {
        /// The pid.
        pid: i32,
        /// Why.
        source: multiprobe_core::Error,
    },
    /// `-o FILE`: refused, or cannot be opened or written.
    #[error(transparent)]
    Output(#[from] OutputError),
}
