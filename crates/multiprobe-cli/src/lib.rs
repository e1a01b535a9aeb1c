//! The `multiprobe` command: probe specs, the handlers behind their actions, placing
//! them in a traced process (pending libraries included), and output. The binary
//! (`src/main.rs`) runs them on the ptrace backend.

#![warn(missing_docs)]

pub mod actions;
pub mod affinity;
pub mod libs;
pub mod output;
pub mod session;
pub mod signals;
pub mod spec;
