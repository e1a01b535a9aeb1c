//! The `multiprobe` command's pieces that do not need a traced process: probe specs and
//! output. The binary (`src/main.rs`) wires them to the ptrace backend.

#![warn(missing_docs)]

pub mod output;
pub mod spec;
