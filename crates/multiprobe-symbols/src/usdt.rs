//! USDT probes (statically defined tracing points, `<sys/sdt.h>`): the notes of an ELF
//! file's `.note.stapsdt` section, as systemtap, bpftrace, perf and gdb read them.
//!
//! Each note (type 3, owner `stapsdt`) describes one probe point: its address (a
//! `nop` the compiler placed in the code), the address of the `.stapsdt.base` section
//! at link time (to correct the addresses of a file prelinked or otherwise moved since),
//! the address of its *semaphore* (a 16-bit counter the program tests before it
//! computes the arguments; 0 when the probe has none), the provider and probe names,
//! and the arguments as the assembler spelt their operands: `-4@%edi`, `8@-24(%rbp)`,
//! `8@8(%rax,%rdx,8)`, `4@$42`. Addresses here are the file's virtual addresses, as for
//! function symbols ([`crate::ElfSymbols::bias`] turns them into a process's).
//!
//! A tracer that probes a point with a semaphore increments the semaphore while it
//! probes (the program then computes the arguments) and decrements it after, as the
//! kernel's uprobes do with `ref_ctr_offset`.

use object::{Object, ObjectSection};

/// The note type of a USDT probe descriptor.
const NT_STAPSDT: u32 = 3;

/// One USDT probe point of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtProbe {
    /// The provider (`python`, `libc`, `rtld`).
    pub provider: String,
    /// The probe's name (`function__entry`).
    pub name: String,
    /// The file virtual address of the probe point.
    pub addr: u64,
    /// The file virtual address of its semaphore, if it has one.
    pub semaphore: Option<u64>,
    /// The arguments, as parsed from `args_text` (an argument that does not parse is
    /// an error of its own: the others are still usable).
    pub args: Vec<Result<UsdtArg, String>>,
    /// The arguments as the note spells them.
    pub args_text: String,
}

/// Where one USDT argument is, and how wide it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsdtArg {
    /// Its size in bytes: 1, 2, 4 or 8.
    pub size: u8,
    /// Whether it is signed (a negative size in the note).
    pub signed: bool,
    /// Where its value is.
    pub loc: UsdtLoc,
}

/// The location of a USDT argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum UsdtLoc {
    /// In a register: its 64-bit name (`rdi` for `%edi`), and a right shift (8 for
    /// `%ah`, ...; otherwise 0).
    Reg {
        /// `rax` ... `r15`, `rbp`, `rsp`, `rip`.
        reg: &'static str,
        /// Bits to shift right first.
        shift: u8,
    },
    /// A constant.
    Imm(i64),
    /// In memory at `disp + base + index * scale`.
    Mem {
        /// Base register (64-bit name), if any.
        base: Option<&'static str>,
        /// Index register (64-bit name), if any.
        index: Option<&'static str>,
        /// 1, 2, 4 or 8.
        scale: u8,
        /// The displacement.
        disp: i64,
    },
    /// In memory at a symbol's address (`sym+8(%rip)`): the symbol must be looked up.
    Symbol {
        /// The symbol.
        name: String,
        /// Added to its address.
        disp: i64,
    },
}

/// Every USDT probe of an ELF image (empty if it has none).
pub fn probes(file: &object::File<'_>) -> Vec<UsdtProbe> {
    let Some(notes) = file.section_by_name(".note.stapsdt") else {
        return Vec::new();
    };
    let Ok(data) = notes.data() else {
        return Vec::new();
    };
    let base_now = file.section_by_name(".stapsdt.base").map(|s| s.address());
    let mut out = Vec::new();
    let mut at = 0usize;
    let word = |d: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_le_bytes(d.get(i..i + 4)?.try_into().ok()?))
    };
    let align4 = |n: usize| (n + 3) & !3;
    while let (Some(namesz), Some(descsz), Some(kind)) =
        (word(data, at), word(data, at + 4), word(data, at + 8))
    {
        let name_at = at + 12;
        let desc_at = name_at + align4(namesz as usize);
        let next = desc_at + align4(descsz as usize);
        let owner = data.get(name_at..name_at + namesz as usize);
        let desc = data.get(desc_at..desc_at + descsz as usize);
        if let (Some(owner), Some(desc)) = (owner, desc) {
            if kind == NT_STAPSDT && owner.strip_suffix(b"\0") == Some(b"stapsdt") {
                if let Some(p) = parse_desc(desc, base_now) {
                    out.push(p);
                }
            }
        }
        if next <= at {
            break;
        }
        at = next;
    }
    out
}

fn parse_desc(desc: &[u8], base_now: Option<u64>) -> Option<UsdtProbe> {
    let addr_at = |i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(desc.get(i..i + 8)?.try_into().ok()?))
    };
    let (pc, base, sem) = (addr_at(0)?, addr_at(8)?, addr_at(16)?);
    let mut strings = desc.get(24..)?.split(|&b| b == 0);
    let mut text = || {
        strings
            .next()
            .map(|s| String::from_utf8_lossy(s).into_owned())
    };
    let (provider, name, args_text) = (text()?, text()?, text().unwrap_or_default());
    // A file moved since it was linked (prelink): its base section moved with it.
    let delta = base_now.map_or(0, |b| b.wrapping_sub(base));
    Some(UsdtProbe {
        provider,
        name,
        addr: pc.wrapping_add(delta),
        semaphore: (sem != 0).then(|| sem.wrapping_add(delta)),
        args: args_text.split_whitespace().map(parse_arg).collect(),
        args_text,
    })
}

/// The 64-bit register and right shift of an x86-64 register name (without `%`).
fn register(name: &str) -> Option<(&'static str, u8)> {
    const LEGACY: [(&str, [&str; 4], Option<&str>); 8] = [
        ("rax", ["rax", "eax", "ax", "al"], Some("ah")),
        ("rbx", ["rbx", "ebx", "bx", "bl"], Some("bh")),
        ("rcx", ["rcx", "ecx", "cx", "cl"], Some("ch")),
        ("rdx", ["rdx", "edx", "dx", "dl"], Some("dh")),
        ("rsi", ["rsi", "esi", "si", "sil"], None),
        ("rdi", ["rdi", "edi", "di", "dil"], None),
        ("rbp", ["rbp", "ebp", "bp", "bpl"], None),
        ("rsp", ["rsp", "esp", "sp", "spl"], None),
    ];
    for (full, names, high) in LEGACY {
        if names.contains(&name) {
            return Some((full, 0));
        }
        if high == Some(name) {
            return Some((full, 8));
        }
    }
    const NUMBERED: [&str; 8] = ["r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"];
    for full in NUMBERED {
        let rest = name.strip_prefix(full);
        if matches!(rest, Some("" | "d" | "w" | "b")) {
            return Some((full, 0));
        }
    }
    (name == "rip").then_some(("rip", 0))
}

fn number(s: &str) -> Option<i64> {
    let (neg, digits) = match s.strip_prefix('-') {
        Some(d) => (true, d),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let v = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(h) => i64::from_str_radix(h, 16).ok()?,
        None => digits.parse::<i64>().ok()?,
    };
    Some(if neg { -v } else { v })
}

/// One argument as the note spells it: `[-]SIZE@OPERAND` (or a bare operand, 8 bytes).
pub fn parse_arg(text: &str) -> Result<UsdtArg, String> {
    let bad = || format!("unsupported USDT argument {text:?}");
    let (size, signed, operand) = match text.split_once('@') {
        Some((s, op)) => {
            let n: i64 = s.parse().map_err(|_| bad())?;
            let size = u8::try_from(n.unsigned_abs()).map_err(|_| bad())?;
            (size, n < 0, op)
        }
        None => (8, false, text),
    };
    if ![1, 2, 4, 8].contains(&size) {
        return Err(bad());
    }
    let reg = |r: &str| -> Result<(&'static str, u8), String> {
        r.strip_prefix('%').and_then(register).ok_or_else(bad)
    };
    let loc = if let Some(imm) = operand.strip_prefix('$') {
        UsdtLoc::Imm(number(imm).ok_or_else(bad)?)
    } else if operand.starts_with('%') {
        let (reg, shift) = reg(operand)?;
        UsdtLoc::Reg { reg, shift }
    } else if let Some((disp, inner)) = operand.split_once('(') {
        let inner = inner.strip_suffix(')').ok_or_else(bad)?;
        let parts: Vec<&str> = inner.split(',').map(str::trim).collect();
        if parts.first() == Some(&"%rip") && parts.len() == 1 {
            // `sym(%rip)`, `sym+8(%rip)`, or a plain number.
            match number(disp) {
                Some(_) => return Err(bad()), // an offset from rip at the probe: never emitted
                None => {
                    let (name, off) = match disp.rsplit_once(['+', '-']) {
                        Some((n, o)) if number(o).is_some() && !n.is_empty() => {
                            let sign = if disp[n.len()..].starts_with('-') {
                                -1
                            } else {
                                1
                            };
                            (n, sign * number(o).unwrap_or(0))
                        }
                        _ => (disp, 0),
                    };
                    UsdtLoc::Symbol {
                        name: name.to_string(),
                        disp: off,
                    }
                }
            }
        } else {
            let disp = if disp.is_empty() {
                0
            } else {
                number(disp).ok_or_else(bad)?
            };
            let base = match parts.first() {
                Some(&"") | None => None,
                Some(b) => Some(reg(b)?.0),
            };
            let index = match parts.get(1) {
                Some(i) if !i.is_empty() => Some(reg(i)?.0),
                _ => None,
            };
            let scale = match parts.get(2) {
                Some(s) => s.parse::<u8>().map_err(|_| bad())?,
                None => 1,
            };
            if ![1, 2, 4, 8].contains(&scale) || parts.len() > 3 {
                return Err(bad());
            }
            UsdtLoc::Mem {
                base,
                index,
                scale,
                disp,
            }
        }
    } else {
        return Err(bad());
    };
    Ok(UsdtArg { size, signed, loc })
}

impl UsdtArg {
    /// The argument's value from its raw bits: `raw` truncated to the argument's size,
    /// then sign- or zero-extended to 64 bits.
    pub fn extend(&self, raw: u64) -> u64 {
        let bits = u32::from(self.size) * 8;
        if bits >= 64 {
            return raw;
        }
        let v = raw & ((1u64 << bits) - 1);
        if self.signed && v >> (bits - 1) & 1 == 1 {
            v | !((1u64 << bits) - 1)
        } else {
            v
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argument_specs_as_compilers_write_them() {
        let a = |t| parse_arg(t).unwrap();
        assert_eq!(
            a("-4@%edi"),
            UsdtArg {
                size: 4,
                signed: true,
                loc: UsdtLoc::Reg {
                    reg: "rdi",
                    shift: 0
                }
            }
        );
        assert_eq!(
            a("8@%r12").loc,
            UsdtLoc::Reg {
                reg: "r12",
                shift: 0
            }
        );
        assert_eq!(
            a("1@%ah").loc,
            UsdtLoc::Reg {
                reg: "rax",
                shift: 8
            }
        );
        assert_eq!(
            a("4@%r9d").loc,
            UsdtLoc::Reg {
                reg: "r9",
                shift: 0
            }
        );
        assert_eq!(
            a("-4@112(%rsp)").loc,
            UsdtLoc::Mem {
                base: Some("rsp"),
                index: None,
                scale: 1,
                disp: 112
            }
        );
        assert_eq!(
            a("8@-0x18(%rbp,%rax,8)").loc,
            UsdtLoc::Mem {
                base: Some("rbp"),
                index: Some("rax"),
                scale: 8,
                disp: -0x18
            }
        );
        assert_eq!(a("4@$42").loc, UsdtLoc::Imm(42));
        assert_eq!(a("-8@$-1").loc, UsdtLoc::Imm(-1));
        assert_eq!(
            a("8@counter+8(%rip)").loc,
            UsdtLoc::Symbol {
                name: "counter".into(),
                disp: 8
            }
        );
        assert_eq!(a("%rsi").size, 8);
        for bad in ["3@%eax", "8@%xmm0", "8@(%rax,%rbx,3)", "x@%eax", "8@junk"] {
            assert!(parse_arg(bad).is_err(), "{bad}");
        }
        let s = a("-4@%eax");
        assert_eq!(s.extend(0xffff_ffff), u64::MAX);
        assert_eq!(s.extend(0x1_0000_0005), 5);
        assert_eq!(a("2@%ax").extend(0xffff_ffff), 0xffff);
    }

    #[test]
    fn notes_of_debians_python_if_installed() {
        let Ok(data) = std::fs::read("/usr/bin/python3.11") else {
            eprintln!("SKIPPED: /usr/bin/python3.11 is not installed");
            return;
        };
        let file = object::File::parse(&*data).unwrap();
        let found = probes(&file);
        if found.is_empty() {
            eprintln!("SKIPPED: this python3.11 was built without USDT probes");
            return;
        }
        let entry = found
            .iter()
            .find(|p| p.provider == "python" && p.name == "function__entry")
            .expect("python's function__entry");
        assert!(entry.semaphore.is_some(), "python's probes have semaphores");
        assert_eq!(entry.args.len(), 3, "{}", entry.args_text);
        assert!(entry.args.iter().all(Result::is_ok), "{}", entry.args_text);
    }
}
