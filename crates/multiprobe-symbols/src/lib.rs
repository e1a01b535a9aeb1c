//! Where functions are in a process: `/proc/PID/maps` plus the ELF symbol tables of the
//! mapped files, shared by the backends (validating a probe address: which function,
//! where it starts, so the instruction boundary can be checked; where free address
//! space lies near code, for out-of-line pages) and by the `multiprobe` command
//! (resolving `symbol`, `library:symbol` and wildcard patterns, suggesting near matches).
//!
//! Thread context only: everything here reads files and allocates.

#![warn(missing_docs)]

pub mod branches;
pub mod elf;
pub mod glob;
pub mod maps;
pub mod process;
pub mod unwind;
pub mod usdt;

pub use branches::BranchIndex;
pub use elf::{ElfSymbols, Func};
pub use glob::{glob_match, is_pattern};
pub use maps::{MappedAt, Maps, Region};
pub use process::{
    file_name, library_matches, near_names, split_library, BranchInto, Located, ProcessSymbols,
    ResolveError, SymbolCache,
};
pub use unwind::LandingPads;
pub use usdt::{UsdtArg, UsdtLoc, UsdtProbe};

/// This crate's README example, run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
