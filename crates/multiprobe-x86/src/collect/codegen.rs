//! Code generation of the collecting trampoline (see the `collect` module docs).

use super::map::BuiltCollect;
use super::CollectSpec;
use crate::trampoline::TrampolineError;

/// Build the collecting trampoline of `spec` for placement at `at` (within a
/// `jmp rel32` of the region). See the `collect` module docs for the code and its
/// invariants.
pub fn build_collect_trampoline(
    spec: &CollectSpec<'_>,
    at: u64,
) -> Result<BuiltCollect, TrampolineError> {
    let _ = (spec, at);
    todo!("collect-gen: code generation")
}
