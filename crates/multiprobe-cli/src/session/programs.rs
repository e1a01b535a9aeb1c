//! Programs on disk that a session may come to run: those its command line names
//! (`sh -c 'exec python3 -c ...'` names `python3`; `env`, `timeout` and `xargs` name the
//! programs they start) and programs found on `PATH` by name. A spec that the first
//! program does not have, but one of these does, is pending until an `exec` brings it —
//! instead of a typo's error.

use std::path::{Path, PathBuf};

use multiprobe_symbols::ElfSymbols;

/// Whether `path` is an ELF file (a program or library; not a script).
pub fn is_elf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok_and(|()| magic == *b"\x7fELF")
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Every executable ELF file named `name` in the directories of `PATH`, in order (all
/// of them: the first may be a wrapper script that runs another).
pub fn on_path(name: &str) -> Vec<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return if is_executable(&p) && is_elf(&p) {
            vec![p]
        } else {
            Vec::new()
        };
    }
    let path = std::env::var("PATH").unwrap_or_else(|_| "/usr/local/bin:/usr/bin:/bin".into());
    let mut out: Vec<PathBuf> = Vec::new();
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let p = Path::new(dir).join(name);
        if is_executable(&p) && is_elf(&p) {
            let real = std::fs::canonicalize(&p).unwrap_or(p);
            if !out.contains(&real) {
                out.push(real);
            }
        }
    }
    out
}

/// The words of a command line that could be programs: every word of every argument,
/// split as a shell would split `sh -c` text (blanks and `;|&()<>` and quotes), that is
/// not an option, an assignment or a number.
fn words(cmd: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    for arg in cmd {
        for w in arg.split(|c: char| c.is_whitespace() || ";|&()<>`'\"".contains(c)) {
            let ok = !w.is_empty()
                && !w.starts_with('-')
                && !w.contains('=')
                && !w.starts_with(|c: char| c.is_ascii_digit())
                && w.chars().all(|c| c.is_ascii_graphic());
            if ok && !out.iter().any(|o| o == w) {
                out.push(w.to_string());
            }
        }
    }
    out
}

/// The ELF programs a command line names, besides its first word's.
pub fn named(cmd: &[String]) -> Vec<PathBuf> {
    let first: Vec<PathBuf> = cmd.first().map(|c| on_path(c)).unwrap_or_default();
    let mut out: Vec<PathBuf> = Vec::new();
    for w in words(cmd.get(1..).unwrap_or_default()) {
        for p in on_path(&w) {
            if !first.contains(&p) && !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The first of `programs` whose symbols have a function `name` (or, for a pattern,
/// one that matches), with its symbols.
pub fn having(programs: &[PathBuf], name: &str, pattern: bool) -> Option<PathBuf> {
    programs.iter().find_map(|p| {
        let syms = ElfSymbols::load(&p.to_string_lossy()).ok()?;
        let found = if pattern {
            !syms.matching(name).is_empty()
        } else {
            !syms.by_name(name).is_empty() || syms.is_ifunc(name)
        };
        found.then(|| p.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn programs_named_in_shell_text() {
        let cmd: Vec<String> = ["sh", "-c", "FOO=1 exec ls -l /tmp; true | cat 2>/dev/null"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let w = words(&cmd[1..]);
        assert!(
            w.contains(&"ls".to_string()) && w.contains(&"cat".to_string()),
            "{w:?}"
        );
        assert!(
            !w.iter().any(|x| x.starts_with('-') || x.contains('=')),
            "{w:?}"
        );
        let named = named(&cmd);
        assert!(
            named
                .iter()
                .any(|p| p.file_name().is_some_and(|n| n == "ls")),
            "{named:?}"
        );
        assert!(
            !named
                .iter()
                .any(|p| p.file_name().is_some_and(|n| n == "sh" || n == "dash")),
            "the first program is not named again: {named:?}"
        );
        assert!(on_path("definitely-not-a-program-xyz").is_empty());
    }
}
