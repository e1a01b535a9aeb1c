//! The `multiprobe` command: probe specs, the handlers behind their actions, placing
//! them in a traced process (pending libraries included), and output. The binary
//! (`src/main.rs`) runs them on the ptrace backend.

#![warn(missing_docs)]

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
compile_error!("multiprobe-cli supports x86-64 Linux only");

pub mod actions;
pub mod affinity;
pub mod libs;
pub mod output;
pub mod session;
pub mod signals;
pub mod spec;
