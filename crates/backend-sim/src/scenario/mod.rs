//! Fuzzer-driven scenarios: a program, registry operations and scheduling, applied to
//! a [`Sim`](crate::Sim) and to the reference [`Model`](crate::model::Model) in lockstep, and checked after every
//! operation and every micro-step; at the end, the transparency oracle.
//!
//! Two shapes of input share the operations and the checks:
//! * [`OpsCase`] (fuzz target `ops`): registry operations interleaved with
//!   `Run(n)` — n ticks of the seeded scheduler — and single steps;
//! * [`ProtocolCase`] (fuzz target `protocol`): at least two threads, a script that
//!   steps a chosen thread one to four micro-steps at a time and changes the registry
//!   in between, so traps, out-of-line steps and pending posts interleave with
//!   registration, removal, enabling and failures at every point.
//!
//! After every operation: results and errors as the model predicts, every code byte
//! (`BRK` exactly where armed, the original elsewhere), `Registry::handlers` (ids,
//! addresses, enabled, exclusive, stats) and `Registry::sites` (hits, counts, armed).
//! After every micro-step: exactly the handler calls the model predicts, in order.
//! At the end: every CPU is run out of its pending steps, the oracle compares the
//! machine with an unprobed run that retires instructions in the same order (unless a
//! handler deliberately changed the program), everything is unregistered (which must
//! now wait and succeed), and after the registry is dropped memory holds exactly the
//! program again and every site the backend prepared has been released.

mod driver;
mod input;

pub use driver::{run_ops, run_protocol};
pub use input::*;
