//! Finding a shared library on disk before the program loads it, so a probe on a library
//! that is not mapped yet can be checked now and kept pending until `dlopen` maps it
//! (as gdb's pending breakpoints are), while a misspelt library name is an error at once.
//!
//! The search follows the dynamic loader's order loosely: `LD_LIBRARY_PATH`, the
//! directories of `/etc/ld.so.conf` (and its `include`s), then the default directories.
//! It is a plausibility check, not the loader's exact algorithm: the probe is armed only
//! once the library really appears in the process's maps.

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

/// The file a user means by `library` (a path, a file name, or a prefix of one such as
/// `libc` or `libstdc++`): the first match in the search directories, by the
/// shortest matching name (`libc.so.6` over `libc.so.6.bak`).
pub fn find(library: &str, ld_library_path: Option<&str>) -> Result<PathBuf, ProbeError> {
    if library.contains('/') {
        let p = PathBuf::from(library);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(ProbeError::NoLibrary(library.to_string()))
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
                // Shared objects only: `libz` must not find the static `libz.a`.
                p.is_file() && name.contains(".so") && library_matches(library, &name)
            })
            .collect();
        names.sort_by_key(|p| p.as_os_str().len());
        if let Some(p) = names.into_iter().next() {
            return Ok(p);
        }
    }
    Err(ProbeError::NoLibrary(library.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_system_libraries_by_prefix_and_path_and_rejects_nonsense() {
        let libc = find("libc", None).expect("libc is on every system");
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
        let dirs = search_dirs(Some("/opt/a:/opt/b"));
        assert_eq!(dirs[0], PathBuf::from("/opt/a"));
        assert!(dirs.contains(&PathBuf::from("/usr/lib")));
    }
}
