//! This process's code as the shared prepare pipeline reads it
//! ([`multiprobe_x86::CodeSource`]): the maps, the symbol tables, the code through
//! `/proc/self/mem` with our own breakpoints put back, the landing pads from the
//! unwind tables, and the branches of each file's code. Thread context only.

use std::collections::BTreeMap;
use std::ops::Range;

use multiprobe_core::Error;
use multiprobe_symbols::{BranchInto, LandingPads, Located, Maps};
use multiprobe_x86::{CodeSource, Function, Mapping, OutsideBranch};

use crate::backend::Armed;
use crate::{patch, symbols};

/// The process as seen under the backend's arm lock (`armed`: every address where a
/// backend of this process has its `int3` or its jump, with the original bytes).
pub(crate) struct Local<'a> {
    pub(crate) maps: &'a Maps,
    pub(crate) armed: &'a BTreeMap<u64, Armed>,
    /// The enclosing function, looked up once by the caller.
    pub(crate) sym: Option<&'a Located>,
}

impl CodeSource for Local<'_> {
    fn mapping(&self, addr: u64) -> Result<Option<Mapping>, Error> {
        Ok(self.maps.find(addr).map(|r| Mapping {
            start: r.start,
            end: r.end,
            exec: r.exec,
        }))
    }

    fn function(&self, _addr: u64) -> Option<Function> {
        self.sym.map(|s| Function {
            name: s.name.clone(),
            start: s.start,
            end: s.start + s.size,
        })
    }

    fn read_original(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        patch::read(addr, buf).map_err(|e| Error::io("reading code", e))?;
        let end = addr + buf.len() as u64;
        // A jump's region may start before `addr` and reach into the buffer.
        let from = addr.saturating_sub(multiprobe_x86::MAX_REGION_LEN as u64);
        for (&a, arm) in self.armed.range(from..end) {
            let original: &[u8] = match &arm.jump {
                Some(r) => r.bytes(),
                None => std::slice::from_ref(&arm.orig),
            };
            for (i, &b) in original.iter().enumerate() {
                let at = a + i as u64;
                if (addr..end).contains(&at) {
                    buf[(at - addr) as usize] = b;
                }
            }
        }
        Ok(())
    }

    fn landing_pads(&self, f: &Function) -> Option<Vec<u64>> {
        match symbols::landing_pads(f.start, self.maps) {
            LandingPads::None => Some(Vec::new()),
            LandingPads::At(v) => Some(v),
            LandingPads::Unknown => None,
        }
    }

    fn probe_in(&self, range: Range<u64>) -> Option<u64> {
        self.armed.range(range).next().map(|(&a, _)| a)
    }

    fn branch_into(&self, range: Range<u64>) -> OutsideBranch {
        match symbols::branch_into(range, self.maps) {
            BranchInto::None => OutsideBranch::None,
            BranchInto::At { from, to } => OutsideBranch::At { from, to },
            BranchInto::Entry { at } => OutsideBranch::Entry { at },
            BranchInto::Unknown => OutsideBranch::Unknown,
        }
    }
}
