//! Coverage report: how much real code multiprobe-x86 can probe.
//!
//! ```text
//! cargo run --release -p multiprobe-x86 --example coverage [ELF files...]
//! ```
//!
//! Without arguments it reads `libc.so.6`, `libstdc++.so.6` (where present) and the
//! workspace's release binaries (every x86-64 ELF executable directly in
//! `target/release`, this report's own binary included). For every function symbol
//! (ELF `.symtab` and `.dynsym`, deduplicated by address, in executable sections), and
//! every function known only by its unwind entry (FDE: a stripped file's local
//! functions), it
//! analyzes the function entry with the function bounds (the boundary check decodes
//! from the start), and every instruction boundary found by decoding each function
//! from its start. A plan counts as probeable only if its slots build too, at an
//! address just past the object's highest section (where a backend would map its
//! slot page), so out-of-reach RIP-relative operands show up as refusals.
//!
//! Prints a Markdown table per file and in total; with `--mnemonics` first, also the
//! instruction boundaries of all files by outcome and mnemonic.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use iced_x86::{Decoder, DecoderOptions};
use multiprobe_symbols::{BranchIndex, ElfSymbols, LandingPads};
use multiprobe_x86::AnalyzeError;
use multiprobe_x86::{
    analyze, analyze_region, build_trampoline, Class, Code, Plan, RegionRefusal, SlotError,
    SlotKind, TrampolineSpec, Unwind,
};
use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

/// What happened to one analyzed address, as a report row.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outcome {
    Ok(Class),
    Refused(String),
}

#[derive(Debug, Default)]
pub struct Tally {
    pub entries: BTreeMap<Outcome, u64>,
    pub boundaries: BTreeMap<Outcome, u64>,
    /// Function entries by whether the site can be promoted to a jump (`promoted`) or
    /// why it stays an int3 site.
    pub promotion: BTreeMap<String, u64>,
    pub functions: u64,
    pub undecodable_functions: u64,
    /// Instruction boundaries by (outcome, mnemonic), for `--mnemonics`.
    mnemonics: BTreeMap<(String, String), u64>,
}

impl Tally {
    /// Probeable shares (entries, boundaries), in percent.
    pub fn probeable(&self) -> (f64, f64) {
        let share = |m: &BTreeMap<Outcome, u64>| {
            let ok: u64 = m
                .iter()
                .filter(|(k, _)| matches!(k, Outcome::Ok(_)))
                .map(|(_, v)| v)
                .sum();
            let n: u64 = m.values().sum();
            if n == 0 {
                0.0
            } else {
                100.0 * ok as f64 / n as f64
            }
        };
        (share(&self.entries), share(&self.boundaries))
    }

    /// Function entries that can be promoted to a jump, in percent.
    pub fn promotable(&self) -> f64 {
        let n: u64 = self.promotion.values().sum();
        let ok = self.promotion.get(PROMOTED).copied().unwrap_or(0);
        if n == 0 {
            0.0
        } else {
            100.0 * ok as f64 / n as f64
        }
    }

    fn add(&mut self, other: &Tally) {
        for (k, v) in &other.entries {
            *self.entries.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.boundaries {
            *self.boundaries.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.promotion {
            *self.promotion.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.mnemonics {
            *self.mnemonics.entry(k.clone()).or_default() += v;
        }
        self.functions += other.functions;
        self.undecodable_functions += other.undecodable_functions;
    }
}

fn outcome(r: Result<Plan, AnalyzeError>, slot_addr: u64) -> Outcome {
    let plan = match r {
        Ok(p) => p,
        Err(AnalyzeError::Refused { reason, .. }) => {
            return Outcome::Refused(format!("refused: {reason}"))
        }
        Err(e) => {
            let kind = format!("{e:?}");
            let kind = kind.split([' ', '{']).next().unwrap_or("?").to_string();
            return Outcome::Refused(format!("error: {kind}"));
        }
    };
    let mut kinds = vec![SlotKind::JumpBack];
    if plan.has_trap_after_slot() {
        kinds.push(SlotKind::TrapAfter);
    }
    for k in kinds {
        match plan.build_slot(k, slot_addr) {
            Ok(s) => assert!(s.bytes().len() <= multiprobe_x86::MAX_SLOT_LEN),
            Err(SlotError::OutOfReach { .. }) => {
                return Outcome::Refused("slot out of reach".into())
            }
            Err(e) => return Outcome::Refused(format!("slot: {e}")),
        }
    }
    Outcome::Ok(plan.class())
}

const PROMOTED: &str = "promoted to a jump";

/// The refusal's kind, without its addresses.
fn refusal_kind(r: &RegionRefusal) -> String {
    let d = format!("{r:?}");
    let kind = d.split([' ', '{', '(']).next().unwrap_or("?").to_string();
    match r {
        RegionRefusal::NotRelocatable { reason, .. } => format!("{kind}: {reason}"),
        RegionRefusal::ControlFlowInside { mnemonic, .. } => format!("{kind}: {mnemonic}"),
        _ => kind,
    }
}

/// Whether the entry at `start` can be promoted: the region checks, no branch of the
/// file's other code into the region (`branches`), then a trampoline built where a
/// backend would map it (just past the object).
fn promotion(
    plan: bool,
    start: u64,
    code: Code<'_>,
    func: std::ops::Range<u64>,
    pads: &LandingPads,
    branches: &BranchIndex,
    tramp_addr: u64,
) -> String {
    if !plan {
        return "not probeable at all".into();
    }
    let unwind = match pads {
        LandingPads::None => Unwind::NoLandingPads,
        LandingPads::At(v) => Unwind::LandingPads(v),
        LandingPads::Unknown => Unwind::Unknown,
    };
    let region = match analyze_region(start, code, Some(func), unwind) {
        Ok(r) => r,
        Err(e) => return refusal_kind(&e),
    };
    if region.count() > 1 {
        if branches.entry_in(start + 1..region.end()).is_some() {
            return "OtherEntry".into();
        }
        if branches.targeting(start + 1..region.end()).is_some() {
            return "BranchInto (from another function)".into();
        }
    }
    let spec = TrampolineSpec {
        region: &region,
        ctx: 0,
        pre: 0x1000,
        post: 0x2000,
        common: 0x3000,
    };
    match build_trampoline(&spec, tramp_addr) {
        Ok(_) => PROMOTED.into(),
        Err(e) => format!("trampoline: {e}"),
    }
}

/// Analyze every function entry and instruction boundary of the ELF file at `path`.
pub fn analyze_file(path: &Path) -> Result<Tally, String> {
    let data = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let file = object::File::parse(&*data).map_err(|e| format!("{}: {e}", path.display()))?;
    if file.architecture() != object::Architecture::X86_64 {
        return Err(format!("{}: not x86-64", path.display()));
    }
    let mut sections = HashMap::new();
    let mut top = 0;
    for s in file.sections() {
        top = top.max(s.address() + s.size());
        if s.kind() == SectionKind::Text {
            if let Ok(d) = s.data() {
                sections.insert(s.index(), (s.address(), d));
            }
        }
    }
    let slot_addr = (top + 0xfff) & !0xfff;
    let syms = ElfSymbols::parse(&data).unwrap_or_default();
    let mut funcs: BTreeMap<u64, (u64, object::SectionIndex)> = BTreeMap::new();
    for sym in file.symbols().chain(file.dynamic_symbols()) {
        if sym.kind() != SymbolKind::Text || sym.size() == 0 {
            continue;
        }
        let Some(idx) = sym.section_index() else {
            continue;
        };
        if sections.contains_key(&idx) {
            let e = funcs.entry(sym.address()).or_insert((0, idx));
            e.0 = e.0.max(sym.size());
        }
    }
    // Functions without a symbol (a stripped file's local ones: libc's string function
    // implementations behind their IFUNCs) by their unwind entry, as the backends know
    // them.
    for &(start, end) in syms.unwind_ranges() {
        if funcs.contains_key(&start) {
            continue;
        }
        let sec = sections
            .iter()
            .find(|(_, (a, d))| *a <= start && end <= *a + d.len() as u64);
        if let Some((&idx, _)) = sec {
            funcs.insert(start, (end - start, idx));
        }
    }
    let branches = syms.branch_index(|| Some(data.clone())).unwrap_or_default();
    let mut t = Tally::default();
    for (&start, &(size, idx)) in &funcs {
        let (sec_addr, sec) = sections[&idx];
        let Some(off) = start.checked_sub(sec_addr).map(|o| o as usize) else {
            continue;
        };
        if off >= sec.len() {
            continue;
        }
        let end = start + size;
        let bytes = &sec[off..sec.len().min(off + size as usize + 15)];
        let code = Code { addr: start, bytes };
        t.functions += 1;
        let entry = outcome(analyze(start, code, Some(start..end)), slot_addr);
        let ok = matches!(entry, Outcome::Ok(_));
        let pads = syms.landing_pads(start);
        let p = promotion(
            ok,
            start,
            code,
            start..end,
            &pads,
            &branches,
            slot_addr + 0x1000,
        );
        *t.promotion.entry(p).or_default() += 1;
        *t.entries.entry(entry).or_default() += 1;
        let body = &bytes[..bytes.len().min(size as usize)];
        let mut dec = Decoder::with_ip(64, body, start, DecoderOptions::NONE);
        while dec.can_decode() {
            let ip = dec.ip();
            let insn = dec.decode();
            if insn.is_invalid() {
                // Boundaries after undecodable bytes are unknown: stop this function.
                t.undecodable_functions += 1;
                break;
            }
            let o = outcome(analyze(ip, code, None), slot_addr);
            let m = format!("{:?}", insn.mnemonic()).to_lowercase();
            *t.mnemonics.entry((label(&o), m)).or_default() += 1;
            *t.boundaries.entry(o).or_default() += 1;
        }
    }
    Ok(t)
}

fn label(o: &Outcome) -> String {
    match o {
        Outcome::Ok(Class::Emulated(k)) => format!("emulated: {k:?}"),
        Outcome::Ok(Class::Relocated(k)) => format!("relocated: {k:?}"),
        Outcome::Refused(r) => r.clone(),
    }
}

fn print_table(title: &str, t: &Tally) {
    let ne: u64 = t.entries.values().sum();
    let nb: u64 = t.boundaries.values().sum();
    let (pe, pb) = t.probeable();
    let pct = |a: u64, n: u64| {
        if n == 0 {
            0.0
        } else {
            100.0 * a as f64 / n as f64
        }
    };
    println!("### {title}\n");
    println!(
        "{} functions; probeable: **{:.3}%** of function entries, **{:.3}%** of instruction boundaries ({} boundaries){}\n",
        t.functions,
        pe,
        pb,
        nb,
        if t.undecodable_functions > 0 {
            format!("; {} functions contain undecodable bytes (decoding stopped there)", t.undecodable_functions)
        } else {
            String::new()
        }
    );
    let np: u64 = t.promotion.values().sum();
    println!(
        "Function entries that can be promoted to a jump (trap-free): **{:.3}%**\n",
        t.promotable()
    );
    println!("| promotion of function entries | entries | % |\n|---|---:|---:|");
    for (k, v) in &t.promotion {
        println!("| {k} | {v} | {:.3} |", pct(*v, np));
    }
    println!();
    println!("| outcome | function entries | % | instruction boundaries | % |");
    println!("|---|---:|---:|---:|---:|");
    let mut keys: Vec<&Outcome> = t.entries.keys().chain(t.boundaries.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        let e = t.entries.get(k).copied().unwrap_or(0);
        let b = t.boundaries.get(k).copied().unwrap_or(0);
        println!(
            "| {} | {e} | {:.3} | {b} | {:.3} |",
            label(k),
            pct(e, ne),
            pct(b, nb)
        );
    }
    println!();
}

/// libc.so.6, libstdc++.so.6 where present, and the workspace's release binaries.
pub fn default_files() -> Vec<PathBuf> {
    let mut v = Vec::new();
    for dir in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib64",
        "/lib64",
    ] {
        let p = Path::new(dir).join("libc.so.6");
        if p.exists() {
            v.push(p);
            break;
        }
    }
    for dir in ["/usr/lib/x86_64-linux-gnu", "/usr/lib64", "/lib64"] {
        let p = Path::new(dir).join("libstdc++.so.6");
        if p.exists() {
            v.push(p);
            break;
        }
    }
    // This binary is target/release/examples/coverage; the project's release binaries
    // sit in target/release.
    if let Ok(me) = std::env::current_exe() {
        if let Some(release) = me.parent().and_then(Path::parent) {
            if let Ok(rd) = std::fs::read_dir(release) {
                let mut bins: Vec<PathBuf> = rd
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.is_file() && is_elf(p))
                    .collect();
                bins.sort();
                v.extend(bins);
            }
        }
        v.push(me);
    }
    v
}

fn is_elf(p: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(p)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && magic == *b"\x7fELF"
}

fn main() {
    let mut args: Vec<PathBuf> = std::env::args_os().skip(1).map(PathBuf::from).collect();
    let mnemonics = args.first().is_some_and(|a| a == Path::new("--mnemonics"));
    if mnemonics {
        args.remove(0);
    }
    let files = if args.is_empty() {
        default_files()
    } else {
        args
    };
    let mut total = Tally::default();
    for f in &files {
        match analyze_file(f) {
            Ok(t) => {
                print_table(&f.display().to_string(), &t);
                total.add(&t);
            }
            Err(e) => eprintln!("skipped {e}"),
        }
    }
    print_table("all files", &total);
    if mnemonics {
        println!("| outcome | mnemonic | instruction boundaries |\n|---|---|---:|");
        for ((o, m), n) in &total.mnemonics {
            println!("| {o} | {m} | {n} |");
        }
    }
}
