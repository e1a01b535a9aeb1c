//! `/proc/self/maps`: which mapping holds an address, with its permissions and file.
//! Thread context only (reads a file, allocates).

use std::io;

/// One line of `/proc/self/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Mapping {
    pub(crate) start: u64,
    pub(crate) end: u64,
    pub(crate) read: bool,
    pub(crate) write: bool,
    pub(crate) exec: bool,
    /// File offset of `start`.
    pub(crate) offset: u64,
    /// The mapped file, or a pseudo-name like `[vdso]`, or empty.
    pub(crate) path: String,
}

impl Mapping {
    /// `PROT_*` bits of this mapping.
    pub(crate) fn prot(&self) -> libc::c_int {
        let mut p = 0;
        if self.read {
            p |= libc::PROT_READ;
        }
        if self.write {
            p |= libc::PROT_WRITE;
        }
        if self.exec {
            p |= libc::PROT_EXEC;
        }
        p
    }
}

fn hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s, 16).ok()
}

/// Parse one line; `None` for a malformed one.
pub(crate) fn parse_line(line: &str) -> Option<Mapping> {
    let mut it = line.splitn(6, ' ');
    let (range, perms, off) = (it.next()?, it.next()?, it.next()?);
    let _dev = it.next()?;
    let _inode = it.next()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    let p = perms.as_bytes();
    if p.len() < 4 {
        return None;
    }
    Some(Mapping {
        start: hex(s)?,
        end: hex(e)?,
        read: p[0] == b'r',
        write: p[1] == b'w',
        exec: p[2] == b'x',
        offset: hex(off)?,
        path,
    })
}

/// Every mapping of this process, in address order.
pub(crate) fn all() -> io::Result<Vec<Mapping>> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    Ok(text.lines().filter_map(parse_line).collect())
}

/// The mapping containing `addr`, if any.
pub(crate) fn find(addr: u64) -> io::Result<Option<Mapping>> {
    Ok(all()?.into_iter().find(|m| m.start <= addr && addr < m.end))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_lines_and_finds_this_function_in_executable_memory() {
        let m = parse_line(
            "7f0000001000-7f0000003000 r-xp 00002000 08:01 1234      /usr/lib/libc.so.6",
        )
        .unwrap();
        assert_eq!(
            (m.start, m.end, m.offset),
            (0x7f00_0000_1000, 0x7f00_0000_3000, 0x2000)
        );
        assert!(m.read && !m.write && m.exec);
        assert_eq!(m.path, "/usr/lib/libc.so.6");
        assert_eq!(m.prot(), libc::PROT_READ | libc::PROT_EXEC);
        let anon = parse_line("7f0000001000-7f0000003000 rw-p 00000000 00:00 0").unwrap();
        assert_eq!(anon.path, "");
        assert!(parse_line("garbage").is_none());

        let here = parses_lines_and_finds_this_function_in_executable_memory as *const () as u64;
        let m = find(here).unwrap().expect("own code is mapped");
        assert!(m.exec && !m.write);
        let x = 5u64;
        let data = find(&x as *const u64 as u64).unwrap().unwrap();
        assert!(!data.exec && data.write);
        assert_eq!(find(8).unwrap(), None);
    }
}
