//! User-space stacks of a traced process (`ustack`, `count:ustack`): unwound with
//! framehop from the registers at the hit and the process's memory, by the unwind
//! tables (`.eh_frame`, found through `.eh_frame_hdr`) of each mapped file, and by frame
//! pointers where a function has no unwind information; then symbolised with the
//! files' symbols.
//!
//! The modules (one per mapped ELF file) are rebuilt when the process's maps changed
//! since the last stack (the session says so: [`Stacks::maps_changed`] at every
//! placement, which follows every `dlopen`, `dlclose` and `exec`). A file's unwind
//! sections are read once (by device and inode) and shared between rebuilds.
//!
//! Stack memory is read a page at a time (`process_vm_readv`), each page once per
//! hit; an unreadable address ends the stack there.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use framehop::x86_64::{CacheX86_64, UnwindRegsX86_64, UnwinderX86_64};
use framehop::{ExplicitModuleSectionInfo, Module, Unwinder};
use multiprobe_core::Hit;
use multiprobe_symbols::{file_name, Maps, ProcessSymbols, SymbolCache};
use object::{Object, ObjectSection};

use crate::report::Frame;

/// The unwind sections of one file, in its own (file) addresses.
#[derive(Debug, Default)]
struct Sections {
    text: Option<Range<u64>>,
    eh_frame: Option<(Range<u64>, Arc<[u8]>)>,
    eh_frame_hdr: Option<(Range<u64>, Arc<[u8]>)>,
}

fn read_sections(data: &[u8]) -> Option<Sections> {
    let file = object::File::parse(data).ok()?;
    let section = |name: &str| -> Option<(Range<u64>, Arc<[u8]>)> {
        let s = file.section_by_name(name)?;
        let bytes = s.data().ok()?;
        Some((s.address()..s.address() + s.size(), Arc::from(bytes)))
    };
    Some(Sections {
        text: file
            .section_by_name(".text")
            .map(|s| s.address()..s.address() + s.size()),
        eh_frame: section(".eh_frame"),
        eh_frame_hdr: section(".eh_frame_hdr"),
    })
}

struct Built {
    /// The maps generation these modules were built for.
    generation: u64,
    unwinder: UnwinderX86_64<Arc<[u8]>>,
    cache: CacheX86_64,
    syms: ProcessSymbols,
}

/// The stacks of one process.
pub struct Stacks {
    pid: i32,
    symbols: Arc<SymbolCache>,
    /// Bumped when the maps change.
    generation: AtomicU64,
    built: Mutex<Option<Built>>,
    /// Unwind sections by file (device, inode).
    sections: Mutex<HashMap<(u64, u64), Arc<Sections>>>,
}

impl std::fmt::Debug for Stacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stacks").field("pid", &self.pid).finish()
    }
}

impl Stacks {
    /// Stacks of process `pid`, symbolised with `symbols`.
    pub fn new(pid: i32, symbols: Arc<SymbolCache>) -> Stacks {
        Stacks {
            pid,
            symbols,
            generation: AtomicU64::new(1),
            built: Mutex::new(None),
            sections: Mutex::new(HashMap::new()),
        }
    }

    /// The process's maps changed (a library was loaded or unloaded, a program
    /// executed): the next stack rebuilds the modules.
    pub fn maps_changed(&self) {
        self.generation.fetch_add(1, Ordering::Relaxed);
    }

    fn sections_of(&self, maps: &Maps, region: &multiprobe_symbols::Region) -> Arc<Sections> {
        let key = region.file_id().unwrap_or((0, region.inode));
        let mut all = self.sections.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = all.get(&key) {
            return Arc::clone(s);
        }
        let s = maps
            .open_mapped(region)
            .ok()
            .and_then(|mut f| {
                let mut data = Vec::new();
                std::io::Read::read_to_end(&mut f, &mut data).ok()?;
                read_sections(&data)
            })
            .unwrap_or_default();
        let s = Arc::new(s);
        all.insert(key, Arc::clone(&s));
        s
    }

    fn build(&self, generation: u64) -> Option<Built> {
        let maps = Maps::read(self.pid as u32).ok()?;
        let syms = ProcessSymbols::from_maps(maps.clone(), Arc::clone(&self.symbols));
        let mut unwinder = UnwinderX86_64::new();
        let mut seen: Vec<&str> = Vec::new();
        for region in maps.regions.iter().filter(|r| r.is_file() && r.exec) {
            if seen.contains(&region.path.as_str()) {
                continue;
            }
            seen.push(&region.path);
            let file_regions = maps.regions.iter().filter(|r| r.path == region.path);
            let (lo, hi) = file_regions.fold((u64::MAX, 0), |(lo, hi), r| {
                (lo.min(r.start), hi.max(r.end))
            });
            let elf = self.symbols.mapped(&maps, region);
            let Some(bias) = elf.bias(region.start, region.offset) else {
                continue;
            };
            let s = self.sections_of(&maps, region);
            let info = ExplicitModuleSectionInfo {
                base_svma: 0,
                text_svma: s.text.clone(),
                eh_frame_svma: s.eh_frame.as_ref().map(|(r, _)| r.clone()),
                eh_frame: s.eh_frame.as_ref().map(|(_, d)| Arc::clone(d)),
                eh_frame_hdr_svma: s.eh_frame_hdr.as_ref().map(|(r, _)| r.clone()),
                eh_frame_hdr: s.eh_frame_hdr.as_ref().map(|(_, d)| Arc::clone(d)),
                ..Default::default()
            };
            unwinder.add_module(Module::new(
                file_name(&region.path).to_string(),
                lo..hi,
                bias,
                info,
            ));
        }
        Some(Built {
            generation,
            unwinder,
            cache: CacheX86_64::new(),
            syms,
        })
    }

    /// The stack of the thread stopped at `hit`: at most `depth` frames, innermost
    /// (the probed instruction) first, each symbolised. `Err` says why there is none.
    pub fn unwind(&self, hit: &Hit<'_>, depth: usize) -> Result<Vec<Frame>, String> {
        let addrs = self.addresses(hit, depth)?;
        let built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        let syms = &built.as_ref().expect("built by addresses").syms;
        Ok(symbolise(syms, &addrs))
    }

    /// The return addresses of the stack at `hit` (the probed address first).
    pub fn addresses(&self, hit: &Hit<'_>, depth: usize) -> Result<Vec<u64>, String> {
        let generation = self.generation.load(Ordering::Relaxed);
        let mut guard = self.built.lock().unwrap_or_else(|p| p.into_inner());
        if guard.as_ref().is_none_or(|b| b.generation != generation) {
            *guard = self.build(generation);
        }
        let built = guard
            .as_mut()
            .ok_or_else(|| "the process's maps cannot be read".to_string())?;
        let regs = *hit.regs();
        let pc = hit.addr();
        let mem = hit.mem();
        let mut pages: HashMap<u64, Option<Box<[u8; 4096]>>> = HashMap::new();
        let mut read_stack = |addr: u64| -> Result<u64, ()> {
            if !addr.is_multiple_of(8) {
                // framehop reads aligned words; anything else is not a stack slot.
                let mut b = [0u8; 8];
                return mem
                    .read(addr, &mut b)
                    .map(|()| u64::from_le_bytes(b))
                    .map_err(drop);
            }
            let page = addr & !4095;
            let data = pages.entry(page).or_insert_with(|| {
                let mut buf = Box::new([0u8; 4096]);
                mem.read(page, &mut buf[..]).ok().map(|()| buf)
            });
            let data = data.as_ref().ok_or(())?;
            let at = (addr - page) as usize;
            Ok(u64::from_le_bytes(
                data[at..at + 8].try_into().expect("8 bytes"),
            ))
        };
        let mut iter = built.unwinder.iter_frames(
            pc,
            UnwindRegsX86_64::new(pc, regs.rsp, regs.rbp),
            &mut built.cache,
            &mut read_stack,
        );
        let mut out = Vec::new();
        while out.len() < depth {
            match iter.next() {
                Ok(Some(f)) => out.push(f.address()),
                Ok(None) | Err(_) => break,
            }
        }
        Ok(out)
    }

    /// Symbolise return addresses from [`Stacks::addresses`] with the symbols of the
    /// last build (for a stack seen before: its symbols were taken then).
    pub fn symbolise(&self, addrs: &[u64]) -> Vec<Frame> {
        let built = self.built.lock().unwrap_or_else(|p| p.into_inner());
        match built.as_ref() {
            Some(b) => symbolise(&b.syms, addrs),
            None => addrs
                .iter()
                .map(|&addr| Frame { addr, symbol: None })
                .collect(),
        }
    }
}

/// `file:function+0xOFF` for each address; a caller's frame (after the first) is
/// looked up at its return address minus one, which is inside the call.
fn symbolise(syms: &ProcessSymbols, addrs: &[u64]) -> Vec<Frame> {
    addrs
        .iter()
        .enumerate()
        .map(|(i, &addr)| {
            let inside = if i == 0 { addr } else { addr.wrapping_sub(1) };
            let symbol = syms.locate(inside).map(|l| {
                let off = addr - l.start;
                if off == 0 {
                    format!("{}:{}", file_name(&l.file), l.name)
                } else {
                    format!("{}:{}+{off:#x}", file_name(&l.file), l.name)
                }
            });
            let symbol = symbol.or_else(|| {
                syms.maps()
                    .find(inside)
                    .filter(|r| r.is_file())
                    .map(|r| format!("{}+{:#x}", file_name(&r.path), addr - r.start + r.offset))
            });
            Frame { addr, symbol }
        })
        .collect()
}
