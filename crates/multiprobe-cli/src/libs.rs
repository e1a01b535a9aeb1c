//! Finding a shared library on disk before the program loads it, so a probe on a library
//! that is not mapped yet can be checked now and kept pending until `dlopen` maps it
//! (as gdb's pending breakpoints are), while a misspelt library name is an error at once.
//!
//! The search follows the dynamic loader's order loosely: `LD_LIBRARY_PATH`, the
//! directories of `/etc/ld.so.conf` (and its `include`s), then the default directories.
//! It is a plausibility check, not the loader's exact algorithm: the probe is armed only
//! once the library really appears in the process's maps. Only x86-64 ELF shared objects
//! count: `libm.so` in a `-dev` package is a linker script (text) naming `libm.so.6`,
//! and `libz.a` is an archive; neither is what the loader maps.

use std::io::Read;
use std::path::{Path, PathBuf};

use multiprobe_symbols::library_matches;

use crate::error::ProbeError;

const DEFAULT_DIRS: [&str; 7] = [
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
    "/usr/local/lib",
];

fn conf_dirs(file: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    let Ok(text) = std::fs::read_to_string(file) else {
        return;
    };
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if let Some(pattern) = line.strip_prefix("include ") {
            if depth > 4 {
                continue;
            }
            // Only the `dir/*.conf` form is used in practice.
            let pattern = pattern.trim();
            let (dir, suffix) = match pattern.rsplit_once("/*") {
                Some((d, s)) => (d, s),
                None => continue,
            };
            if let Ok(entries) = std::fs::read_dir(dir) {
                let mut files: Vec<PathBuf> = entries
                    .flatten()
                    .map(|e| e.path())
                    .filter(|p| p.to_string_lossy().ends_with(suffix))
                    .collect();
                files.sort();
                for f in files {
                    conf_dirs(&f, depth + 1, out);
                }
            }
        } else if line.starts_with('/') {
            out.push(PathBuf::from(line));
        }
    }
}

/// The directories searched, in order.
pub fn search_dirs(ld_library_path: Option<&str>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = ld_library_path
        .unwrap_or("")
        .split(':')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    conf_dirs(Path::new("/etc/ld.so.conf"), 0, &mut dirs);
    dirs.extend(DEFAULT_DIRS.iter().map(PathBuf::from));
    dirs
}

/// Whether `path` is an x86-64 ELF shared object (`ET_DYN`), by its header.
pub fn is_shared_object(path: &Path) -> bool {
    const ET_DYN: u16 = 3;
    const EM_X86_64: u16 = 62;
    let mut h = [0u8; 20];
    let read = std::fs::File::open(path).and_then(|mut f| f.read_exact(&mut h));
    read.is_ok()
        && h[..4] == *b"\x7fELF"
        && h[4] == 2 // 64-bit
        && h[5] == 1 // little-endian
        && u16::from_le_bytes([h[16], h[17]]) == ET_DYN
        && u16::from_le_bytes([h[18], h[19]]) == EM_X86_64
}

/// The file a user means by `library` (a path, a file name, or a prefix of one such as
/// `libc` or `libstdc++`): the first shared object in the search directories, by the
/// shortest matching name (`libc.so.6` over `libc.so.6.bak`).
pub fn find(library: &str, ld_library_path: Option<&str>) -> Result<PathBuf, ProbeError> {
    if library.contains('/') {
        let p = PathBuf::from(library);
        return match (p.is_file(), is_shared_object(&p)) {
            (true, true) => Ok(p),
            (true, false) => Err(ProbeError::NotSharedObject(p)),
            (false, _) => Err(ProbeError::NoLibrary(library.to_string())),
        };
    }
    for dir in search_dirs(ld_library_path) {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        let mut names: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                let name = p.to_string_lossy();
                name.contains(".so") && library_matches(library, &name)
            })
            .collect();
        names.sort_by_key(|p| p.as_os_str().len());
        if let Some(p) = names
            .into_iter()
            .find(|p| p.is_file() && is_shared_object(p))
        {
            return Ok(p);
        }
    }
    Err(ProbeError::NoLibrary(library.to_string()))
}

/// The first shared object `library` names in `dir` or its subdirectories, at most
/// `depth` levels down (breadth first: the shallowest wins; within a directory, the
/// shortest name). For libraries a program loads from its own installation (a JVM's
/// `lib/server/libjvm.so`, Python's `lib-dynload`), outside the loader's search path.
pub fn find_below(dir: &Path, library: &str, depth: u32) -> Option<PathBuf> {
    let mut level = vec![dir.to_path_buf()];
    for _ in 0..=depth {
        let mut next = Vec::new();
        for d in &level {
            let Ok(entries) = std::fs::read_dir(d) else {
                continue;
            };
            let mut found: Vec<PathBuf> = Vec::new();
            for e in entries.flatten() {
                let p = e.path();
                let Ok(kind) = e.file_type() else { continue };
                if kind.is_dir() {
                    next.push(p);
                } else if p.to_string_lossy().contains(".so")
                    && library_matches(library, &p.to_string_lossy())
                    && is_shared_object(&p)
                {
                    found.push(p);
                }
            }
            found.sort_by_key(|p| p.as_os_str().len());
            if let Some(p) = found.into_iter().next() {
                return Some(p);
            }
        }
        next.sort();
        level = next;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_system_libraries_by_prefix_and_path_and_rejects_nonsense() {
        let libc = find("libc", None).expect("libc is on every system");
        assert!(is_shared_object(&libc));
        assert!(
            libc.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("libc.so"),
            "{libc:?}"
        );
        assert_eq!(find(&libc.to_string_lossy(), None).unwrap(), libc);
        assert!(matches!(
            find("libdefinitely-not-a-library-xyz", None),
            Err(ProbeError::NoLibrary(_))
        ));
        assert!(matches!(
            find("/nonexistent/libc.so.6", None),
            Err(ProbeError::NoLibrary(_))
        ));
        // A linker script (as -dev packages install `libm.so`) is not a library.
        let dir = std::env::temp_dir().join(format!("mp-libs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("libmpfake.so");
        std::fs::write(&script, "/* GNU ld script */\nGROUP ( libmpfake.so.1 )\n").unwrap();
        std::fs::copy(&libc, dir.join("libmpfake.so.1")).unwrap();
        let found = find("libmpfake", dir.to_str()).unwrap();
        assert_eq!(found, dir.join("libmpfake.so.1"));
        assert!(matches!(
            find(script.to_str().unwrap(), None),
            Err(ProbeError::NotSharedObject(_))
        ));
        // Below a directory (a program's own lib/ tree), the shallowest first.
        let deep = dir.join("a").join("b");
        std::fs::create_dir_all(&deep).unwrap();
        std::fs::copy(&libc, deep.join("libmpdeep.so")).unwrap();
        assert_eq!(
            find_below(&dir, "libmpdeep", 4),
            Some(deep.join("libmpdeep.so"))
        );
        assert_eq!(find_below(&dir, "libmpdeep", 1), None, "too deep");
        assert_eq!(
            find_below(&dir, "libmpfake", 4),
            Some(dir.join("libmpfake.so.1"))
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let dirs = search_dirs(Some("/opt/a:/opt/b"));
        assert_eq!(dirs[0], PathBuf::from("/opt/a"));
        assert!(dirs.contains(&PathBuf::from("/usr/lib")));
    }
}
