//! `/proc/PID/maps`: which address ranges exist, with what permissions and file.
//! Parsing is lenient: a line that does not parse is skipped, never an error.
//!
//! The path in a line is the file as the *target* named it, in its own mount
//! namespace; in a container, or after a bind mount or a replaced file, the same path
//! may be another file for the reader. [`Maps::open_mapped`] opens the file that is
//! really mapped (through `/proc/PID/map_files` or `/proc/PID/root`) and checks that it
//! is (same device and inode as the line).

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// First address.
    pub start: u64,
    /// One past the last address.
    pub end: u64,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// File offset of `start`.
    pub offset: u64,
    /// Device of the mapped file (`major:minor` as the kernel prints it); `00:00` for
    /// anonymous memory.
    pub dev: String,
    /// Inode of the mapped file; 0 for anonymous memory.
    pub inode: u64,
    /// The mapped file, or a pseudo name (`[vdso]`, `[stack]`), or empty.
    pub path: String,
}

impl Region {
    /// Whether `addr` is inside.
    pub fn contains(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }

    /// The device and inode of the mapped file (`None` for anonymous memory or a dev
    /// that does not parse), as `stat` would give them.
    pub fn file_id(&self) -> Option<(u64, u64)> {
        let (major, minor) = self.dev.split_once(':')?;
        let (major, minor) = (
            u32::from_str_radix(major, 16).ok()?,
            u32::from_str_radix(minor, 16).ok()?,
        );
        (self.inode != 0).then(|| (libc_makedev(major, minor), self.inode))
    }

    /// Whether a real file is mapped here (not anonymous, not `[vdso]`, not deleted).
    pub fn is_file(&self) -> bool {
        self.path.starts_with('/') && !self.path.ends_with(" (deleted)")
    }

    /// What is mapped at `addr` (inside this region), in terms that survive a re-read of
    /// the maps but not an unmapping: see [`MappedAt`].
    pub fn mapped_at(&self, addr: u64) -> MappedAt {
        if self.inode != 0 {
            MappedAt::File {
                dev: self.dev.clone(),
                inode: self.inode,
                offset: self.offset + (addr - self.start),
            }
        } else {
            MappedAt::Anonymous { start: self.start }
        }
    }
}

/// The identity of the memory at one address, to tell later whether it is still the
/// same code: a library unloaded by `dlclose` and another loaded at the same address,
/// or an anonymous region unmapped and mapped again, compare unequal. (An anonymous
/// region is known only by where it starts; code rewritten in place is not detected
/// here.)
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MappedAt {
    /// A file mapping: the device and inode of the file and the file offset of the address.
    File {
        /// `major:minor`.
        dev: String,
        /// Inode number.
        inode: u64,
        /// File offset of the address.
        offset: u64,
    },
    /// Anonymous memory (or a pseudo file such as `[vdso]`), by the start of its region.
    Anonymous {
        /// Start of the region.
        start: u64,
    },
}

/// Linux's `makedev`: the `st_dev` of a file on device `major:minor`.
fn libc_makedev(major: u32, minor: u32) -> u64 {
    let (major, minor) = (u64::from(major), u64::from(minor));
    ((major & 0xffff_f000) << 32)
        | ((major & 0xfff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0xff)
}

/// The address space of a process, in address order.
#[derive(Clone, Debug, Default)]
pub struct Maps {
    /// The regions, in address order.
    pub regions: Vec<Region>,
    /// Whose maps these are (`Some(0)`: this process), when read from `/proc`.
    pid: Option<u32>,
}

impl Maps {
    /// Read `/proc/PID/maps` (`pid` 0 means this process, `/proc/self/maps`).
    pub fn read(pid: u32) -> std::io::Result<Maps> {
        let path = if pid == 0 {
            "/proc/self/maps".to_string()
        } else {
            format!("/proc/{pid}/maps")
        };
        let mut maps = Self::parse(&std::fs::read_to_string(path)?);
        maps.pid = Some(pid);
        Ok(maps)
    }

    /// Open the file mapped at `region` (one of these maps' regions) as the process
    /// sees it: `/proc/PID/map_files/START-END` (the mapping itself), else
    /// `/proc/PID/root/PATH` (the path in the process's root), and for maps that were
    /// only parsed, the path. Whatever is opened must be the mapped file (same device
    /// and inode as the region): a different file at that path is an error, never
    /// silently read.
    pub fn open_mapped(&self, region: &Region) -> std::io::Result<std::fs::File> {
        use std::os::unix::fs::MetadataExt;
        let want = region.file_id();
        let mut candidates = Vec::new();
        match self.pid {
            Some(pid) => {
                let proc = if pid == 0 {
                    "/proc/self".to_string()
                } else {
                    format!("/proc/{pid}")
                };
                candidates.push(format!(
                    "{proc}/map_files/{:x}-{:x}",
                    region.start, region.end
                ));
                candidates.push(format!("{proc}/root{}", region.path));
            }
            None => candidates.push(region.path.clone()),
        }
        let mut last = std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} is not mapped from a file", region.path),
        );
        for c in candidates {
            match std::fs::File::open(&c) {
                Ok(f) => {
                    let meta = f.metadata()?;
                    if want.is_none_or(|(dev, ino)| meta.dev() == dev && meta.ino() == ino) {
                        return Ok(f);
                    }
                    last = std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!(
                            "{c} is not the file mapped at {:#x} (another file has its path)",
                            region.start
                        ),
                    );
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Parse the text of a maps file.
    pub fn parse(text: &str) -> Maps {
        let regions = text.lines().filter_map(parse_line).collect();
        Maps { regions, pid: None }
    }

    /// The region holding `addr`.
    pub fn find(&self, addr: u64) -> Option<&Region> {
        self.regions.iter().find(|r| r.contains(addr))
    }

    /// What is mapped at `addr` ([`Region::mapped_at`]), if anything. Compare it with
    /// what was there before to tell whether the same code still is.
    pub fn mapped_at(&self, addr: u64) -> Option<MappedAt> {
        self.find(addr).map(|r| r.mapped_at(addr))
    }

    /// A free, page-aligned range of `len` bytes whose every byte is within `reach` of
    /// every byte of `[lo, hi)`, as close to it as possible; `None` if there is none.
    /// Used to place out-of-line pages where a rel32 jump reaches the probed code.
    pub fn free_near(&self, lo: u64, hi: u64, len: u64, reach: u64) -> Option<u64> {
        const PAGE: u64 = 4096;
        const MIN: u64 = 0x10000; // stay clear of mmap_min_addr
        const TOP: u64 = 0x7fff_ffff_f000; // user space ends here on x86-64 (4 levels)
        let want_lo = hi.saturating_sub(reach).max(MIN);
        let want_hi = lo.saturating_add(reach).min(TOP);
        let mut best: Option<(u64, u64)> = None; // (distance, address)
        let mut gap_lo = MIN;
        let bounds = self.regions.iter().map(|r| (r.start, r.end));
        for (gap_hi, next_lo) in bounds.chain(std::iter::once((TOP, TOP))) {
            let a = gap_lo.max(want_lo).next_multiple_of(PAGE);
            let b = gap_hi.min(want_hi) & !(PAGE - 1);
            gap_lo = gap_lo.max(next_lo);
            if b < a || b - a < len {
                continue;
            }
            // The closest place in this gap: its top if it lies below the code, else its
            // bottom.
            let cand = if b <= lo { b - len } else { a };
            let dist = if cand + len <= lo {
                lo - (cand + len)
            } else {
                cand.saturating_sub(hi)
            };
            if best.is_none_or(|(d, _)| dist < d) {
                best = Some((dist, cand));
            }
        }
        best.map(|(_, a)| a)
    }
}

fn parse_line(line: &str) -> Option<Region> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    if perms.len() < 4 {
        return None;
    }
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let dev = it.next()?.to_string();
    let inode = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    Some(Region {
        start: u64::from_str_radix(s, 16).ok()?,
        end: u64::from_str_radix(e, 16).ok()?,
        read: perms.first() == Some(&b'r'),
        write: perms.get(1) == Some(&b'w'),
        exec: perms.get(2) == Some(&b'x'),
        offset,
        dev,
        inode,
        path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
555555554000-555555556000 r--p 00000000 fd:01 1234 /usr/bin/prog
555555556000-55555555a000 r-xp 00002000 fd:01 1234 /usr/bin/prog
7ffff7dd0000-7ffff7df0000 r-xp 00000000 00:00 0 [vdso]
7ffffffde000-7ffffffff000 rw-p 00000000 00:00 0                          [stack]
";

    #[test]
    fn parses_lines() {
        let m = Maps::parse(SAMPLE);
        assert_eq!(m.regions.len(), 4);
        let r = m.find(0x555555557000).unwrap();
        assert!(r.exec && r.read && !r.write);
        assert_eq!(r.offset, 0x2000);
        assert_eq!(r.path, "/usr/bin/prog");
        assert!(r.is_file());
        assert_eq!(m.regions[3].path, "[stack]");
        assert!(!m.regions[2].is_file());
        assert!(m.find(0x1000).is_none());
        assert!(Maps::parse("garbage\n").regions.is_empty());
        assert_eq!((r.dev.as_str(), r.inode), ("fd:01", 1234));
        let own = Maps::read(0).unwrap();
        let here = parses_lines as *const () as u64;
        assert!(own.find(here).is_some_and(|r| r.exec && !r.write));
    }

    #[test]
    fn mapped_at_tells_a_replaced_mapping_apart() {
        let m = Maps::parse(SAMPLE);
        let code = m.find(0x555555557000).unwrap();
        let here = code.mapped_at(0x555555557010);
        assert_eq!(
            here,
            MappedAt::File {
                dev: "fd:01".into(),
                inode: 1234,
                offset: 0x3010
            }
        );
        // Another library at the same address, or the same file mapped elsewhere.
        let other = SAMPLE.replace(" 1234 /usr/bin/prog", " 99 /usr/lib/other.so");
        let moved = SAMPLE.replace("00002000 fd:01", "00003000 fd:01");
        for text in [other, moved] {
            let r = Maps::parse(&text);
            assert_ne!(
                r.find(0x555555557010).unwrap().mapped_at(0x555555557010),
                here
            );
        }
        let vdso = m.find(0x7ffff7dd0010).unwrap();
        assert_eq!(
            vdso.mapped_at(0x7ffff7dd0010),
            MappedAt::Anonymous {
                start: 0x7ffff7dd0000
            }
        );
    }

    #[test]
    fn the_mapped_file_is_opened_and_checked_by_device_and_inode() {
        use std::os::unix::fs::MetadataExt;
        let own = Maps::read(0).unwrap();
        let here = the_mapped_file_is_opened_and_checked_by_device_and_inode as *const () as u64;
        let r = own.find(here).unwrap().clone();
        let f = own.open_mapped(&r).unwrap();
        let exe = std::fs::metadata(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(
            (f.metadata().unwrap().ino(), exe.ino()),
            (exe.ino(), r.inode)
        );
        assert_eq!(r.file_id().unwrap().0, exe.dev());
        // Another file at the mapped path (as in another mount namespace) is refused.
        let mut wrong = r.clone();
        wrong.inode += 1;
        let parsed = Maps::parse(&format!(
            "{:x}-{:x} r-xp 0 {} {} {}\n",
            r.start, r.end, r.dev, wrong.inode, r.path
        ));
        let e = parsed.open_mapped(&parsed.regions[0]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::InvalidData, "{e}");
    }

    #[test]
    fn free_near_stays_in_reach_and_avoids_mappings() {
        let m = Maps::parse(SAMPLE);
        let reach = 0x7fff_0000;
        let a = m
            .free_near(0x555555556000, 0x55555555a000, 4096, reach)
            .unwrap();
        assert_eq!(a % 4096, 0);
        assert!(m.regions.iter().all(|r| a + 4096 <= r.start || a >= r.end));
        assert!(0x55555555a000 - a <= reach && a + 4096 - 0x555555556000 <= reach);
        // The closest free page is right above the code (below it, the read-only part
        // of the program is in the way).
        assert_eq!(a, 0x55555555a000);
        let below = m.free_near(0x555555554000, 0x555555556000, 4096, reach);
        assert_eq!(below, Some(0x555555553000));
        // Nothing fits when the reach is smaller than any gap's distance.
        let full = Maps::parse("10000-7ffffffff000 r-xp 00000000 00:00 0\n");
        assert_eq!(full.free_near(0x20000, 0x30000, 4096, reach), None);
    }
}
