//! Exception landing pads of a function, from the file's unwind information: its FDE in
//! `.eh_frame` (found through `.eh_frame_hdr`'s search table, read with gimli) and the
//! call-site table of its LSDA in `.gcc_except_table` (the Itanium C++ ABI format,
//! read here: gimli does not parse LSDAs).
//!
//! Jump-optimized probes need this: the unwinder resumes a thread at a landing pad, so
//! a landing pad inside a replaced region would land in the middle of the jump.
//! Anything that cannot be read is reported as [`LandingPads::Unknown`], never as "none".

use gimli::{BaseAddresses, EhFrame, EhFrameHdr, LittleEndian, Pointer, UnwindSection};

/// What the unwind information says about one function's landing pads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LandingPads {
    /// None: no unwind entry, or an entry without an LSDA, or an LSDA without pads.
    None,
    /// These addresses (file virtual addresses, or the process's for
    /// [`crate::ProcessSymbols::landing_pads`]).
    At(Vec<u64>),
    /// The information exists but could not be read.
    Unknown,
}

/// A section's bytes and its virtual address.
#[derive(Clone, Debug, Default)]
pub(crate) struct Section {
    pub(crate) addr: u64,
    pub(crate) data: Vec<u8>,
}

/// The sections the lookup needs (copied out of the file when it is parsed).
#[derive(Clone, Debug, Default)]
pub(crate) struct UnwindSections {
    pub(crate) eh_frame: Option<Section>,
    pub(crate) eh_frame_hdr: Option<Section>,
    pub(crate) except_table: Option<Section>,
}

type R<'a> = gimli::EndianSlice<'a, LittleEndian>;

impl UnwindSections {
    /// The landing pads of the function starting at `start` (file address).
    pub(crate) fn landing_pads(&self, start: u64) -> LandingPads {
        let Some(eh) = &self.eh_frame else {
            return LandingPads::None;
        };
        let frame = EhFrame::new(&eh.data, LittleEndian);
        let mut bases = BaseAddresses::default().set_eh_frame(eh.addr);
        let fde = match &self.eh_frame_hdr {
            Some(h) => {
                bases = bases.set_eh_frame_hdr(h.addr);
                let hdr = match EhFrameHdr::new(&h.data, LittleEndian).parse(&bases, 8) {
                    Ok(hdr) => hdr,
                    Err(_) => return LandingPads::Unknown,
                };
                let Some(table) = hdr.table() else {
                    return self.scan(&frame, &bases, start);
                };
                match table.fde_for_address(&frame, &bases, start, EhFrame::cie_from_offset) {
                    Ok(f) => f,
                    Err(gimli::Error::NoUnwindInfoForAddress) => return LandingPads::None,
                    Err(_) => return LandingPads::Unknown,
                }
            }
            None => return self.scan(&frame, &bases, start),
        };
        self.pads_of(&fde)
    }

    /// The code ranges `[start, end)` (file addresses) of every FDE, sorted by start;
    /// empty without `.eh_frame`. An entry that does not parse ends the walk (what was
    /// read before it is kept: fewer ranges only means fewer functions known).
    pub(crate) fn fde_ranges(&self) -> Vec<(u64, u64)> {
        let Some(eh) = &self.eh_frame else {
            return Vec::new();
        };
        let frame = EhFrame::new(&eh.data, LittleEndian);
        let mut bases = BaseAddresses::default().set_eh_frame(eh.addr);
        if let Some(h) = &self.eh_frame_hdr {
            bases = bases.set_eh_frame_hdr(h.addr);
        }
        let mut out = Vec::new();
        let mut entries = frame.entries(&bases);
        while let Ok(Some(entry)) = entries.next() {
            if let gimli::CieOrFde::Fde(partial) = entry {
                let Ok(fde) = partial.parse(EhFrame::cie_from_offset) else {
                    break;
                };
                let start = fde.initial_address();
                if fde.len() > 0 {
                    out.push((start, start.wrapping_add(fde.len())));
                }
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }

    /// Without a search table: walk every entry.
    fn scan(&self, frame: &EhFrame<R<'_>>, bases: &BaseAddresses, start: u64) -> LandingPads {
        let mut entries = frame.entries(bases);
        loop {
            match entries.next() {
                Ok(None) => return LandingPads::None,
                Ok(Some(gimli::CieOrFde::Cie(_))) => {}
                Ok(Some(gimli::CieOrFde::Fde(partial))) => {
                    let Ok(fde) = partial.parse(EhFrame::cie_from_offset) else {
                        return LandingPads::Unknown;
                    };
                    if fde.contains(start) {
                        return self.pads_of(&fde);
                    }
                }
                Err(_) => return LandingPads::Unknown,
            }
        }
    }

    fn pads_of(&self, fde: &gimli::FrameDescriptionEntry<R<'_>>) -> LandingPads {
        let lsda = match fde.lsda() {
            None => return LandingPads::None,
            Some(Pointer::Direct(a)) => a,
            Some(Pointer::Indirect(_)) => return LandingPads::Unknown,
        };
        let Some(t) = &self.except_table else {
            return LandingPads::Unknown;
        };
        let Some(off) = lsda
            .checked_sub(t.addr)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o < t.data.len())
        else {
            return LandingPads::Unknown;
        };
        match parse_lsda(&t.data[off..], t.addr + off as u64, fde.initial_address()) {
            Some(v) if v.is_empty() => LandingPads::None,
            Some(v) => LandingPads::At(v),
            None => LandingPads::Unknown,
        }
    }
}

const DW_EH_PE_OMIT: u8 = 0xff;

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
    /// Virtual address of `data[0]`, for pc-relative values.
    addr: u64,
}

impl Reader<'_> {
    fn u8(&mut self) -> Option<u8> {
        let b = *self.data.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }

    fn bytes<const N: usize>(&mut self) -> Option<[u8; N]> {
        let b = self.data.get(self.pos..self.pos + N)?.try_into().ok()?;
        self.pos += N;
        Some(b)
    }

    fn uleb(&mut self) -> Option<u64> {
        let (mut v, mut shift) = (0u64, 0);
        loop {
            let b = self.u8()?;
            if shift < 64 {
                v |= u64::from(b & 0x7f) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
    }

    fn sleb(&mut self) -> Option<i64> {
        let (mut v, mut shift) = (0i64, 0);
        loop {
            let b = self.u8()?;
            if shift < 64 {
                v |= i64::from(b & 0x7f) << shift;
            }
            shift += 7;
            if b & 0x80 == 0 {
                if shift < 64 && b & 0x40 != 0 {
                    v |= -1 << shift;
                }
                return Some(v);
            }
        }
    }

    /// A `DW_EH_PE_*`-encoded value (absolute or pc-relative; no indirection).
    fn encoded(&mut self, enc: u8) -> Option<u64> {
        let at = self.addr + self.pos as u64;
        let v = match enc & 0x0f {
            0x00 => u64::from_le_bytes(self.bytes::<8>()?),
            0x01 => self.uleb()?,
            0x02 => u64::from(u16::from_le_bytes(self.bytes::<2>()?)),
            0x03 => u64::from(u32::from_le_bytes(self.bytes::<4>()?)),
            0x04 => u64::from_le_bytes(self.bytes::<8>()?),
            0x09 => self.sleb()? as u64,
            0x0a => i16::from_le_bytes(self.bytes::<2>()?) as i64 as u64,
            0x0b => i32::from_le_bytes(self.bytes::<4>()?) as i64 as u64,
            0x0c => i64::from_le_bytes(self.bytes::<8>()?) as u64,
            _ => return None,
        };
        match enc & 0x70 {
            0x00 => Some(v),
            0x10 => Some(at.wrapping_add(v)),
            _ => None,
        }
    }
}

/// The landing pads of an LSDA at `addr` (its bytes start `data`) of a function whose
/// code starts at `func`. `None` if it cannot be parsed.
fn parse_lsda(data: &[u8], addr: u64, func: u64) -> Option<Vec<u64>> {
    let mut r = Reader { data, pos: 0, addr };
    let lp_enc = r.u8()?;
    let lp_start = if lp_enc == DW_EH_PE_OMIT {
        func
    } else {
        r.encoded(lp_enc)?
    };
    if r.u8()? != DW_EH_PE_OMIT {
        r.uleb()?; // type table offset
    }
    let cs_enc = r.u8()?;
    let cs_len = usize::try_from(r.uleb()?).ok()?;
    let end = r.pos.checked_add(cs_len)?;
    if end > data.len() {
        return None;
    }
    let mut pads = Vec::new();
    while r.pos < end {
        let _start = r.encoded(cs_enc)?;
        let _len = r.encoded(cs_enc)?;
        let lp = r.encoded(cs_enc)?;
        r.uleb()?; // action
        if lp != 0 {
            pads.push(lp_start.wrapping_add(lp));
        }
    }
    (r.pos == end).then_some(pads)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn call_site_tables_give_landing_pads_relative_to_the_function() {
        // lpstart omitted, no type table, call sites in uleb128: two sites, one with a
        // landing pad at +0x40, one without.
        let lsda = [
            0xff, 0xff, 0x01, 8, 0x04, 0x10, 0x40, 0x00, 0x20, 0x08, 0x00, 0x00,
        ];
        assert_eq!(parse_lsda(&lsda, 0x9000, 0x1000), Some(vec![0x1040]));
        // udata4 call sites, a type table offset.
        let mut l = vec![0xff, 0x9b, 0x05, 0x03, 13];
        for v in [4u32, 8, 0x30] {
            l.extend(v.to_le_bytes());
        }
        l.push(1);
        assert_eq!(parse_lsda(&l, 0x9000, 0x2000), Some(vec![0x2030]));
        // Truncated: unknown.
        assert_eq!(parse_lsda(&l[..10], 0x9000, 0x2000), None);
    }
}
