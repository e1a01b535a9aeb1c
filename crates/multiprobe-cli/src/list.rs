//! `multiprobe list [PATTERN] [-- CMD | -p PID | PROGRAM]`: the functions and USDT
//! probes a spec could name — with the file they are in, their address and whether
//! each can be probed — like `bpftrace -l 'uprobe:...'` and `perf probe -F`.
//!
//! * `-- CMD`: the program is started traced and held when its loader has mapped the
//!   startup libraries (before any of its own code runs), listed, and killed.
//! * `-p PID`: what the running process maps, read from `/proc` (nothing is attached).
//! * `PROGRAM` (a path, or a name found on `PATH`): that file alone; addresses are its
//!   own (virtual addresses, as `nm` prints them), file offsets beside them. A pattern
//!   that names a library (`libc:str*`) lists that library's file instead, found as a
//!   probe finds it, and says so.
//!
//! A function can be probed when its first instruction can (the analysis every probe
//! goes through); an indirect function (`strlen`) shows the implementation the loader
//! chose in a process.

use std::fmt::Write as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use multiprobe_symbols::{
    file_name, glob_match, library_matches, ElfSymbols, ProcessSymbols, ResolveError,
};
use multiprobe_x86::{analyze, Code, MAX_INSN_LEN};

use crate::error::Error;
use crate::exit::Exit;
use crate::session::programs;
use crate::spec::{ProbeSpec, Target};

/// The `list` command's help after its options.
pub const HELP: &str = "\
PATTERN is a spec's target with wildcards: 'libc:mall*', '*alloc*', 'usdt:*',
'usdt:python:*'. Columns: FILE, ADDRESS (in the process; for a PROGRAM file, its own
address), KIND (function, indirect, usdt), NAME, PROBE (yes, or why not).

Examples:
  multiprobe list 'libc:str*' -- ls
  multiprobe list 'usdt:*' /usr/bin/python3.11
  multiprobe list '*alloc*' -p 1234
  multiprobe list /usr/bin/ls";

/// One line of the list.
struct Item {
    file: String,
    addr: u64,
    offset: Option<u64>,
    kind: &'static str,
    name: String,
    probe: String,
}

/// What the pattern selects.
struct Select {
    usdt: bool,
    file: Option<String>,
    provider: Option<String>,
    name: String,
}

fn select(pattern: Option<&str>) -> Result<Select, Error> {
    let Some(p) = pattern else {
        return Ok(Select {
            usdt: false,
            file: None,
            provider: None,
            name: "*".into(),
        });
    };
    let spec: ProbeSpec = p
        .parse()
        .map_err(|e: crate::spec::SpecError| Error::Usage(e.to_string()))?;
    Ok(match spec.target {
        Target::Symbol { library, name, .. } => Select {
            usdt: false,
            file: library,
            provider: None,
            name,
        },
        Target::Usdt { scope, name } => {
            let (file, provider) = match scope.as_slice() {
                [] => (None, None),
                [one] => (None, Some(one.clone())),
                [f, p] => (Some(f.clone()), Some(p.clone())),
                _ => (None, None),
            };
            Select {
                usdt: true,
                file,
                provider,
                name,
            }
        }
        _ => return Err(Error::Usage(format!("{p:?} is not a name pattern"))),
    })
}

/// Whether the code at `addr` (`bytes` from there) can be probed, or why not.
fn probeable(addr: u64, bytes: &[u8], size: u64) -> String {
    let range = (size > 0).then(|| addr..addr + size);
    match analyze(addr, Code { addr, bytes }, range) {
        Ok(_) => "yes".into(),
        Err(e) => format!("no: {}", e.into_core(addr)),
    }
}

/// Run `list`: `words` are `[PATTERN] [PROGRAM]` (one word is the program when
/// neither `pid` nor `cmd` says where to look).
pub fn run(words: &[String], pid: Option<i32>, cmd: &[String]) -> Result<Exit, Error> {
    let elsewhere = pid.is_some() || !cmd.is_empty();
    let (pattern, program) = match (words, elsewhere) {
        ([], _) => (None, None),
        ([one], true) => (Some(one.as_str()), None),
        ([one], false) => (None, Some(Path::new(one.as_str()))),
        ([p, f], false) => (Some(p.as_str()), Some(Path::new(f.as_str()))),
        _ => {
            return Err(Error::Usage(
                "list takes a PROGRAM, -p PID or -- CMD, one of them".into(),
            ))
        }
    };
    let sel = select(pattern)?;
    let items = match (pid, program, cmd.is_empty()) {
        (Some(pid), _, _) => in_process(pid, &sel)?,
        (None, Some(p), _) => in_file(p, &sel)?,
        (None, None, false) => in_command(cmd, &sel)?,
        (None, None, true) => {
            return Err(Error::Usage(
                "list what? give a PROGRAM, -p PID or -- CMD".into(),
            ))
        }
    };
    // A closed pipe (`multiprobe list prog | head`) is not an error worth a panic.
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), render(&items).as_bytes());
    Ok(Exit::Code(0))
}

fn render(items: &[Item]) -> String {
    let offsets = items.iter().any(|i| i.offset.is_some());
    let w_file = items.iter().map(|i| i.file.len()).max().unwrap_or(4).max(4);
    let w_name = items
        .iter()
        .map(|i| i.name.chars().count())
        .max()
        .unwrap_or(4)
        .max(4);
    let mut out = String::new();
    let _ = write!(out, "{:<w_file$}  {:<18}  ", "FILE", "ADDRESS");
    if offsets {
        let _ = write!(out, "{:<10}  ", "OFFSET");
    }
    let _ = writeln!(out, "{:<8}  {:<w_name$}  PROBE", "KIND", "NAME");
    for i in items {
        let _ = write!(
            out,
            "{:<w_file$}  {:<18}  ",
            i.file,
            format!("{:#x}", i.addr)
        );
        if offsets {
            let o = i.offset.map_or_else(|| "-".into(), |o| format!("{o:#x}"));
            let _ = write!(out, "{o:<10}  ");
        }
        let _ = writeln!(out, "{:<8}  {:<w_name$}  {}", i.kind, i.name, i.probe);
    }
    let _ = writeln!(out, "{} found", items.len());
    out
}

/// `-- CMD`: start it, hold it at its entry point (its libraries are mapped), list,
/// kill it.
fn in_command(cmd: &[String], sel: &Select) -> Result<Vec<Item>, Error> {
    let program = cmd[0].clone();
    let mut command = std::process::Command::new(&program);
    command
        .args(&cmd[1..])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null());
    let mut tracer =
        multiprobe_backend_ptrace::Tracer::spawn(&mut command).map_err(|source| Error::Spawn {
            program: program.clone(),
            source,
        })?;
    let pid = tracer.pid();
    let reached = tracer
        .run_to_entry()
        .map_err(|source| Error::Entry { program, source })?;
    let items = if reached.is_none() {
        in_process(pid, sel)
    } else {
        Ok(Vec::new())
    };
    // SAFETY: sending a signal to our traced child; no memory is involved.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    drop(tracer);
    items
}

/// `-p PID`: from `/proc/PID`.
fn in_process(pid: i32, sel: &Select) -> Result<Vec<Item>, Error> {
    let syms = ProcessSymbols::read(pid as u32, Arc::default())
        .map_err(|source| Error::Maps { pid, source })?;
    let mem = std::fs::File::open(format!("/proc/{pid}/mem")).ok();
    let read = |addr: u64, n: usize| -> Vec<u8> {
        let mut b = vec![0u8; n];
        match &mem {
            Some(m) if m.read_exact_at(&mut b, addr).is_ok() => b,
            _ => Vec::new(),
        }
    };
    let mut items = Vec::new();
    for path in syms.files() {
        if sel
            .file
            .as_deref()
            .is_some_and(|f| !library_matches(f, path))
        {
            continue;
        }
        let Some((elf, bias)) = syms.file_symbols(path) else {
            continue;
        };
        let file = file_name(path).to_string();
        if sel.usdt {
            items.extend(usdt_items(&elf, bias, &file, sel, None));
            continue;
        }
        for f in elf.matching(&sel.name) {
            let addr = f.addr.wrapping_add(bias);
            let bytes = read(addr, MAX_INSN_LEN);
            let probe = if bytes.is_empty() {
                "no: its code cannot be read".into()
            } else {
                probeable(addr, &bytes, f.size)
            };
            items.push(Item {
                file: file.clone(),
                addr,
                offset: None,
                kind: "function",
                name: f.display_name().into_owned(),
                probe,
            });
        }
        for name in elf.ifuncs_matching(&sel.name) {
            let (addr, probe) = match syms.resolve(Some(path), name) {
                Err(ResolveError::IndirectFunction {
                    slot: Some(slot), ..
                }) => {
                    let b = read(slot, 8);
                    match b.try_into().map(u64::from_le_bytes) {
                        Ok(imp) => {
                            let what = syms
                                .locate(imp)
                                .map_or_else(|| format!("{imp:#x}"), |l| l.name);
                            (imp, format!("yes (the loader chose {what})"))
                        }
                        Err(_) => (0, "no: its implementation cannot be read".into()),
                    }
                }
                _ => match crate::session::ifunc::in_process(&syms, pid, path, name) {
                    Some(imp) => (
                        imp,
                        "yes (the one multiprobe's loader chose for the same file)".into(),
                    ),
                    None => (
                        0,
                        "no: the library does not say which implementation it chose".into(),
                    ),
                },
            };
            items.push(Item {
                file: file.clone(),
                addr,
                offset: None,
                kind: "indirect",
                name: name.to_string(),
                probe,
            });
        }
    }
    Ok(items)
}

fn usdt_items(
    elf: &ElfSymbols,
    bias: u64,
    file: &str,
    sel: &Select,
    data: Option<&[u8]>,
) -> Vec<Item> {
    elf.usdt()
        .iter()
        .filter(|p| sel.provider.as_deref().is_none_or(|pr| pr == p.provider))
        .filter(|p| glob_match(&sel.name, &p.name))
        .map(|p| {
            let sem = if p.semaphore.is_some() {
                ", semaphore"
            } else {
                ""
            };
            let offset = data.and_then(|_| elf.offset_of_vaddr(p.addr));
            Item {
                file: file.to_string(),
                addr: p.addr.wrapping_add(bias),
                offset,
                kind: "usdt",
                name: format!("{}:{}", p.provider, p.name),
                probe: format!("yes (args: {}{sem})", p.args_text),
            }
        })
        .collect()
}

/// `PROGRAM`: one file on disk.
fn in_file(program: &Path, sel: &Select) -> Result<Vec<Item>, Error> {
    let path = if program.exists() {
        program.to_path_buf()
    } else {
        programs::on_path(&program.to_string_lossy())
            .into_iter()
            .next()
            .or_else(|| crate::libs::find(&program.to_string_lossy(), None).ok())
            .ok_or_else(|| Error::Usage(format!("no program or library {}", program.display())))?
    };
    // `list 'libc:str*' /usr/bin/python3`: the pattern names a library, not the file
    // given; its functions are in that library's file, which is listed instead.
    let path = match &sel.file {
        Some(lib) if !library_matches(lib, &path.to_string_lossy()) => {
            let lib_path = crate::libs::find(lib, None).map_err(|_| {
                Error::Usage(format!(
                    "{lib:?} names no library of the loader's search path (and is not {}): \
                     to see what {} maps, `multiprobe list PATTERN -- {}`",
                    path.display(),
                    path.display(),
                    path.display()
                ))
            })?;
            crate::say(&format!(
                "multiprobe: {lib:?} is not {}: listing {} (addresses are the library's own)",
                path.display(),
                lib_path.display()
            ));
            lib_path
        }
        _ => path,
    };
    let data =
        std::fs::read(&path).map_err(|e| Error::Usage(format!("{}: {e}", path.display())))?;
    let elf = ElfSymbols::parse(&data)
        .map_err(|e| Error::Usage(format!("{}: not an ELF file ({e})", path.display())))?;
    let file = file_name(&path.to_string_lossy()).to_string();
    if sel.usdt {
        return Ok(usdt_items(&elf, 0, &file, sel, Some(&data)));
    }
    let mut items = Vec::new();
    for f in elf.matching(&sel.name) {
        let offset = elf.offset_of_vaddr(f.addr);
        let bytes = offset
            .and_then(|o| data.get(o as usize..(o as usize + MAX_INSN_LEN).min(data.len())))
            .unwrap_or_default();
        let probe = if bytes.is_empty() {
            "no: not in the file's loadable segments".into()
        } else {
            probeable(f.addr, bytes, f.size)
        };
        items.push(Item {
            file: file.clone(),
            addr: f.addr,
            offset,
            kind: "function",
            name: f.display_name().into_owned(),
            probe,
        });
    }
    for name in elf.ifuncs_matching(&sel.name) {
        items.push(Item {
            file: file.clone(),
            addr: 0,
            offset: None,
            kind: "indirect",
            name: name.to_string(),
            probe: "yes, in a process (its implementation is chosen when it is loaded)".into(),
        });
    }
    if items.is_empty() && !elf.has_symtab() && elf.funcs().is_empty() {
        crate::say(&format!(
            "multiprobe: {} has no symbols at all (a stripped static program): probe it by \
             file offset, {file}:0xOFFSET",
            path.display()
        ));
    }
    Ok(items)
}
