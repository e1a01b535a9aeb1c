//! A deterministic simulated machine for multiprobe: the core's dispatch protocol
//! driven exactly as a trap-based backend drives it, a reference model of the
//! contract, and a transparency oracle — what the fuzz targets and the replay tests
//! are built from.
//!
//! * [`isa`]: a small variable-length instruction set with a one-byte breakpoint.
//! * [`memory`]: code (execute-only for the program), data and stacks.
//! * [`program`]: programs, and a generator that makes any fuzzer input a valid one.
//! * [`backend`]: [`SimBackend`], the core's `Backend` (arm writes `BRK`, disarm
//!   restores the byte, each can be made to fail).
//! * [`cpu`]: one simulated thread stepping through the protocol micro-step by
//!   micro-step (trap, `pre`, out-of-line step, `post` or `fault`).
//! * [`machine`]: [`Sim`], the interleaved machine with a seeded scheduler, and the
//!   unprobed replay the oracle compares with.
//! * [`concurrent`]: the same CPUs, each on its own OS thread, against one registry
//!   that another thread keeps changing.
//! * [`handlers`] and [`ctx`]: a recording handler and what it can reach.
//! * [`model`]: the reference model. [`scenario`]: fuzz inputs and the lockstep driver.
//!
//! Handlers run in ordinary thread context here (the simulator is not a signal
//! handler), so they may allocate and lock; the core's hot path is the real one.

pub mod backend;
pub mod concurrent;
pub mod cpu;
pub mod ctx;
pub mod handlers;
pub mod isa;
pub mod machine;
pub mod memory;
pub mod model;
pub mod program;
pub mod scenario;

pub use backend::{Injection, SimBackend, SimSite, Slot};
pub use cpu::{Cpu, Dispatched, Event, Status};
pub use machine::{replay_unprobed, MachineState, Sim};
pub use program::Program;

/// This crate's README example, run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
