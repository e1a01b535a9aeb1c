//! The fuzz inputs: what the fuzzer's bytes decode to, and what a run reached.

use arbitrary::Arbitrary;

use crate::backend::Injection;
use crate::program::ProgramSpec;

/// Most operations a case applies.
pub const MAX_OPS: usize = 48;
/// Most items in a batch.
pub const MAX_BATCH: usize = 6;

/// A probe address: mostly instruction starts of the program, sometimes a bad one.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct SiteSel(pub u8);

/// A handler id: one the registry issued (maybe since unregistered), or one it never did.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct HandleSel(pub u8);

/// How a handler behaves, in fuzzer bytes (each field says how it decodes).
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct HandlerSpec {
    /// Bit 0: has a post hook. Bits 1-3 all set: handles faults (changes the program).
    /// Bit 4: has a return hook (then registered at a function entry unless the site
    /// selector is 200 or more); bit 5: asks for no return on every other call.
    pub flags: u8,
    /// Pre mode: observe mostly, emulate sometimes, ask to be removed or skip rarely.
    pub pre: u8,
    /// Panic every `1 + n % 4` calls when `>= 200`.
    pub panic: u8,
    /// Hit `SiteSel(nested)` from inside every hook when `site >= 216`.
    pub nested: (u8, SiteSel),
    /// Unregister a handler from inside the first pre when `>= 232`: itself if the
    /// selector is even, another one otherwise.
    pub unregister: (u8, HandleSel),
}

/// One registration.
#[derive(Arbitrary, Clone, Copy, Debug)]
pub struct Reg {
    /// Where.
    pub site: SiteSel,
    /// What.
    pub handler: HandlerSpec,
    /// `Options::exclusive`.
    pub exclusive: bool,
    /// `Options::disabled`.
    pub disabled: bool,
}

/// One operation.
#[derive(Arbitrary, Clone, Debug)]
pub enum Op {
    /// `register_with`.
    Register(Reg),
    /// `register_batch`.
    RegisterBatch(Vec<Reg>),
    /// `unregister`.
    Unregister(HandleSel),
    /// `unregister_batch`.
    UnregisterBatch(Vec<HandleSel>),
    /// `enable`.
    Enable(HandleSel),
    /// `disable`.
    Disable(HandleSel),
    /// `n` ticks of the seeded scheduler.
    Run(u8),
    /// One micro-step of thread `n % threads`.
    Step(u8),
    /// Make a backend operation fail at a site, or succeed again.
    Inject(SiteSel, Injection, bool),
    /// Drop a guard (unregisters without waiting, rule 3's destructor).
    DropGuard(HandleSel),
}

/// Input of the `ops` fuzz target. Its `Arbitrary` reads the program, the seed, then
/// operations until the bytes run out (so a longer input is more operations).
#[derive(Clone, Debug)]
pub struct OpsCase {
    /// The program.
    pub program: ProgramSpec,
    /// The scheduler's seed.
    pub seed: u64,
    /// What to do.
    pub ops: Vec<Op>,
}

/// One slice of a protocol script.
#[derive(Arbitrary, Clone, Debug)]
pub struct Slice {
    /// Which thread (`n % threads`).
    pub cpu: u8,
    /// How many micro-steps: `1 + n % 4`.
    pub steps: u8,
    /// What to change afterwards.
    pub op: Option<Op>,
}

/// Input of the `protocol` fuzz target; like [`OpsCase`], the script takes the rest.
#[derive(Clone, Debug)]
pub struct ProtocolCase {
    /// The program (at least two threads are used).
    pub program: ProgramSpec,
    /// The script.
    pub script: Vec<Slice>,
}

/// Elements until the data runs out, at most `max`.
fn rest<'a, T: Arbitrary<'a>>(
    u: &mut arbitrary::Unstructured<'a>,
    max: usize,
) -> arbitrary::Result<Vec<T>> {
    let mut v = Vec::new();
    while !u.is_empty() && v.len() < max {
        v.push(T::arbitrary(u)?);
    }
    Ok(v)
}

impl<'a> Arbitrary<'a> for OpsCase {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(OpsCase {
            program: ProgramSpec::arbitrary(u)?,
            seed: u64::arbitrary(u)?,
            ops: rest(u, MAX_OPS)?,
        })
    }
}

impl<'a> Arbitrary<'a> for ProtocolCase {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(ProtocolCase {
            program: ProgramSpec::arbitrary(u)?,
            script: rest(u, 4 * MAX_OPS)?,
        })
    }
}

/// What a case exercised (for corpus selection and for tests that must not be vacuous).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Coverage {
    /// Operations that succeeded / failed.
    pub ops_ok: u32,
    /// Failed operations.
    pub ops_err: u32,
    /// Dispatches that found a site.
    pub dispatches: u32,
    /// Traps at a just-removed breakpoint that re-executed.
    pub reexecuted: u32,
    /// Posts run.
    pub posts: u32,
    /// Faults in a slot.
    pub slot_faults: u32,
    /// Redirects.
    pub redirects: u32,
    /// `InsideDispatch` answers (driver or handler).
    pub inside_dispatch: u32,
    /// Handlers enabled or disabled from inside a dispatch.
    pub set_enabled_inside: u32,
    /// Handlers that asked to be removed (`PreAction::Remove`).
    pub removals: u32,
    /// Ticks where some CPU held a deferred step across a registry change.
    pub changed_while_pending: u32,
    /// Return hooks called.
    pub returns: u32,
    /// Returns lost (full return stack, redirects, escapes, threads that ended).
    pub returns_lost: u32,
    /// Whether the transparency oracle compared states.
    pub oracle: bool,
    /// Retired instructions.
    pub retired: u32,
}

impl Coverage {
    /// A rough score of how much of the protocol a case touched.
    pub fn score(&self) -> u32 {
        [
            self.dispatches,
            self.reexecuted,
            self.posts,
            self.slot_faults,
            self.redirects,
            self.inside_dispatch,
            self.set_enabled_inside,
            self.removals,
            self.changed_while_pending,
            self.returns,
            self.returns_lost,
        ]
        .iter()
        .map(|&n| u32::from(n > 0) * 4 + n.min(8))
        .sum()
    }
}
