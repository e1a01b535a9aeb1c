//! Reference counters in the tracee: USDT semaphores (the kernel's uprobes call them
//! `ref_ctr_offset`). A program tests a probe's 16-bit semaphore before it computes
//! the probe's arguments; a tracer that probes the point raises it, and must lower it
//! again when it stops probing, or the program goes on paying for arguments nobody
//! reads.
//!
//! The backend keeps what it raised ([`Semaphores`], under the shared state) and
//! undoes it everywhere it would otherwise be left behind: at detach, in the copy of a
//! fork child (freed, or cleaned before it is followed), never after the code that
//! holds it was unmapped (a `dlclose`: checked by mapping identity, as breakpoints
//! are); an exec forgets it with the old image.

use std::collections::HashMap;

use multiprobe_core::{Error, Result};
use multiprobe_symbols::{MappedAt, Maps};

use crate::mem::CodeMemory;
use crate::PtraceBackend;

/// One counter raised by us: by how much, and what was mapped there.
#[derive(Clone, Debug)]
pub(crate) struct Raised {
    pub(crate) at: MappedAt,
    pub(crate) by: u16,
}

/// The counters we raised in the current image, by address.
#[derive(Debug, Default)]
pub(crate) struct Semaphores {
    raised: HashMap<u64, Raised>,
}

impl Semaphores {
    /// What was raised (to undo in a fork child's copy).
    pub(crate) fn raised(&self) -> Vec<(u64, Raised)> {
        self.raised.iter().map(|(&a, r)| (a, r.clone())).collect()
    }

    /// The image is gone (exec, exit, detach done).
    pub(crate) fn clear(&mut self) {
        self.raised.clear();
    }
}

fn add(code: &CodeMemory, addr: u64, delta: i32) -> Result<()> {
    let mut b = [0u8; 2];
    code.read(addr, &mut b)?;
    let v = i32::from(u16::from_le_bytes(b)) + delta;
    let v = v.clamp(0, i32::from(u16::MAX)) as u16;
    code.write(addr, &v.to_le_bytes())
}

/// Lower, in the process `code` writes to (with maps `maps`), every counter of
/// `raised` that is still where it was. Best effort.
pub(crate) fn lower_all(code: &CodeMemory, maps: &Maps, raised: &[(u64, Raised)]) {
    for (addr, r) in raised {
        if maps.mapped_at(*addr).as_ref() == Some(&r.at) {
            let _ = add(code, *addr, -i32::from(r.by));
        }
    }
}

impl PtraceBackend {
    /// Raise the USDT semaphore (a 16-bit counter) at `addr` in the tracee, for as long
    /// as the tracer is attached: it is lowered again at detach and in fork children,
    /// and forgotten at exec or when its code is unloaded. Call it once per probe that
    /// wants the semaphore set.
    pub fn raise_semaphore(&self, addr: u64) -> Result<()> {
        let maps = crate::error::maps(self.pid())?;
        let at = maps.mapped_at(addr).ok_or(Error::Unmapped { addr })?;
        let mut st = self.shared.lock();
        let code = st.usable()?;
        add(code, addr, 1)?;
        let e = st.semaphores.raised.entry(addr).or_insert(Raised {
            at: at.clone(),
            by: 0,
        });
        if e.at != at {
            *e = Raised { at, by: 0 };
        }
        e.by = e.by.saturating_add(1);
        Ok(())
    }
}

impl crate::tracer::Tracer {
    /// Detaching: lower every semaphore we raised that is still mapped where it was.
    pub(crate) fn lower_semaphores(&mut self) {
        let st = self.shared.lock();
        let raised = st.semaphores.raised();
        let Ok(code) = st.usable() else { return };
        if raised.is_empty() {
            return;
        }
        if let Ok(maps) = crate::error::maps(self.pid()) {
            lower_all(code, &maps, &raised);
        }
    }
}
