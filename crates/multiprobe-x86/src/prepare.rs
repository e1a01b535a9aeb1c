//! The shared prepare pipeline: from a probed address to its [`Plan`] and its
//! [`Region`] (or why it must stay an `int3` site), the same way for every backend.
//!
//! A backend supplies the target's code and what it knows about it through
//! [`CodeSource`] (in-process: `/proc/self/maps`, `/proc/self/mem`, the symbol tables;
//! another process: the same files for its pid), and keeps only its own checks (memory
//! that belongs to the probe machinery, addresses already armed). The order:
//! 1. a user-space address ([`Error::InvalidAddress`]), mapped ([`Error::Unmapped`]) and
//!    executable ([`Error::NotExecutable`]);
//! 2. the original bytes from the enclosing function's start (when the symbols know
//!    it, and it starts inside the same mapping) to its end, or at least the longest
//!    region;
//! 3. [`crate::analyze`] with the function's bounds (the boundary check), its errors
//!    converted to the core's, naming the function for an address inside an
//!    instruction;
//! 4. [`crate::analyze_region`], with the function's landing pads asked only when the
//!    region needs more than one instruction, and refused when another probe of the
//!    backend lies in its interior, or when a branch of any other code of the file
//!    targets its interior ([`CodeSource::branch_into`]; asked only for a region of
//!    more than one instruction) or the file's code cannot be read to tell.
//!
//! An unpromotable region is not an error: the site works as an `int3` site.

use std::ops::Range;

use multiprobe_core::Error;

use crate::analyze::{analyze, Code};
use crate::error::AnalyzeError;
use crate::plan::{Plan, MAX_INSN_LEN};
use crate::region::{analyze_region, Region, RegionRefusal, Unwind, JMP_LEN, MAX_REGION_LEN};

/// The first address above user space on x86-64 Linux (47-bit).
pub const USER_END: u64 = 0x0000_8000_0000_0000;

/// A mapping of the target's address space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Mapped executable.
    pub exec: bool,
}

/// A function, as the symbols tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    /// Its name, for messages.
    pub name: String,
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

/// What the pipeline needs from a backend. Thread context.
pub trait CodeSource {
    /// The mapping holding `addr`, if any.
    fn mapping(&self, addr: u64) -> Result<Option<Mapping>, Error>;
    /// The function holding `addr`, if the symbols know one.
    fn function(&self, addr: u64) -> Option<Function>;
    /// The *original* bytes at `addr`: the backend's own breakpoints and jumps (of any
    /// of its probes) put back.
    fn read_original(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error>;
    /// The landing pads of `f` (empty: none), `None` if the unwind information cannot
    /// tell.
    fn landing_pads(&self, f: &Function) -> Option<Vec<u64>>;
    /// The first address in `range` where the backend has another probe.
    fn probe_in(&self, range: Range<u64>) -> Option<u64> {
        let _ = range;
        None
    }
    /// Whether other code of the file holding `range` can enter it: another function
    /// starts there, or a direct branch of another function (which the region analysis
    /// does not decode: a `foo.cold` part, glibc's `mempcpy` jumping into `memcpy`)
    /// targets it.
    fn branch_into(&self, range: Range<u64>) -> OutsideBranch;
}

/// What [`CodeSource::branch_into`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutsideBranch {
    /// No other function of the file starts in the range or branches into it.
    None,
    /// The branch at `from` targets `to`, inside the range.
    At {
        /// The branch.
        from: u64,
        /// Its target.
        to: u64,
    },
    /// Another function starts at `at`, inside the range.
    Entry {
        /// Its start.
        at: u64,
    },
    /// The file's code could not be read (or the range is not in a file): any branch
    /// may target it.
    Unknown,
}

/// What [`prepare`] found.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The displaced instruction.
    pub plan: Plan,
    /// The enclosing function, if known.
    pub function: Option<Function>,
    /// The region a jump may replace, or why the site stays an `int3` site.
    pub region: Result<Region, RegionRefusal>,
}

fn analyze_error(e: AnalyzeError, addr: u64, f: Option<&Function>) -> Error {
    let mut err = e.into_core(addr);
    if let (Error::NotInstructionBoundary { context, .. }, Some(f)) = (&mut err, f) {
        context.push_str(&format!(" in {}+{:#x}", f.name, addr - f.start));
    }
    err
}

/// Run the pipeline for `addr` (module docs).
pub fn prepare(addr: u64, src: &dyn CodeSource) -> Result<Prepared, Error> {
    if addr >= USER_END {
        return Err(Error::InvalidAddress {
            addr,
            reason: "not a user-space address",
        });
    }
    let map = src.mapping(addr)?.ok_or(Error::Unmapped { addr })?;
    if !map.exec {
        return Err(Error::NotExecutable { addr });
    }
    let function = src
        .function(addr)
        .filter(|f| f.start >= map.start && f.start <= addr && addr < f.end);
    let start = function.as_ref().map_or(addr, |f| f.start);
    let end = (addr + MAX_REGION_LEN.max(MAX_INSN_LEN) as u64)
        .max(function.as_ref().map_or(0, |f| f.end))
        .min(map.end);
    let mut bytes = vec![0u8; (end - start) as usize];
    src.read_original(start, &mut bytes)?;
    let code = Code {
        addr: start,
        bytes: &bytes,
    };
    let bounds = function.as_ref().map(|f| f.start..f.end);
    let plan = analyze(addr, code, bounds.clone())
        .map_err(|e| analyze_error(e, addr, function.as_ref()))?;
    let pads = match &function {
        Some(f) if plan.len() < JMP_LEN => src.landing_pads(f),
        _ => Some(Vec::new()),
    };
    let unwind = match &pads {
        Some(v) if v.is_empty() => Unwind::NoLandingPads,
        Some(v) => Unwind::LandingPads(v),
        None => Unwind::Unknown,
    };
    let region = analyze_region(addr, code, bounds, unwind).and_then(|r| {
        let interior = r.addr() + 1..r.end();
        if let Some(at) = src.probe_in(interior.clone()) {
            return Err(RegionRefusal::ProbeInside { at });
        }
        if r.count() == 1 {
            // One instruction: nothing can branch into its middle.
            return Ok(r);
        }
        match src.branch_into(interior) {
            OutsideBranch::None => Ok(r),
            OutsideBranch::At { from, to } => Err(RegionRefusal::BranchInto { from, to }),
            OutsideBranch::Entry { at } => Err(RegionRefusal::OtherEntry { at }),
            OutsideBranch::Unknown => Err(RegionRefusal::OutsideUnknown),
        }
    });
    Ok(Prepared {
        plan,
        function,
        region,
    })
}
