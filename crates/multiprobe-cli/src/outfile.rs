//! `-o FILE`: where multiprobe's output goes, opened so that it never destroys a file
//! the user did not mean, and so that a failure to write is never silent.
//!
//! The rules, in the order they apply:
//! * The file is opened before anything else happens (a name that cannot be written is
//!   bad input: exit 2 before the program is started or attached to), but **not
//!   truncated**: an existing file keeps its contents until the probes are placed
//!   ([`OutputFile::claim`]), so any bad input leaves it as it was; a file multiprobe
//!   created for a run that then failed is removed again.
//! * A symbolic link is refused (`O_NOFOLLOW`): run as root, following one planted in
//!   a shared directory would write wherever it points. Name the file itself.
//! * An existing executable (any `x` bit) or ELF file (a program, a library, an
//!   object) is refused: multiprobe writes text, and `-o` naming the traced program by
//!   mistake must not destroy it. At [`OutputFile::claim`], any file the traced process
//!   has mapped (its program, its libraries, its data files) is refused too.
//! * A new file is created with mode 0600 (before the umask): per-hit lines hold
//!   arguments, registers and memory of the traced process, and the summary its
//!   address layout. An existing file keeps its mode.
//! * It is opened with `O_CREAT` (no `O_EXCL` after the first try), so the kernel's
//!   `fs.protected_regular` still forbids writing into another user's file in a sticky
//!   shared directory such as `/tmp`.
//! * Regular files are synced at the end ([`OutputFile::sync`]), so a full disk shows up
//!   as an error even when the writes themselves were accepted into the page cache.
//!
//! Writing to the file directly (rather than to a temporary renamed at the end) keeps
//! `tail -f FILE` working for `--interval` and per-hit lines, and keeps devices and
//! FIFOs (`-o /dev/null`, a pipe to another program) usable.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use multiprobe_symbols::Maps;

/// Why `-o FILE` cannot be used, or stopped working.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// The name is a symbolic link.
    #[error("-o {}: refusing to write through a symbolic link (name the file itself)", .0.display())]
    Symlink(PathBuf),
    /// An existing executable or ELF file.
    #[error("-o {}: refusing to write over {what}", path.display())]
    Precious {
        /// The file.
        path: PathBuf,
        /// What it is.
        what: &'static str,
    },
    /// A file the traced process has mapped.
    #[error(
        "-o {}: refusing to write over a file that process {pid} has mapped (its program or \
         one of its libraries or data files)",
        path.display()
    )]
    Mapped {
        /// The file.
        path: PathBuf,
        /// The process.
        pid: i32,
    },
    /// Opening failed.
    #[error("-o {}: {source}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// Writing failed; what was written after the failure is lost.
    #[error("writing {what} failed: {source} ({lost} lines lost)")]
    Write {
        /// `FILE`, or `stderr`.
        what: String,
        /// Why.
        source: io::Error,
        /// Lines that were not written.
        lost: u64,
    },
}

/// The open `-o` file.
#[derive(Debug)]
pub struct OutputFile {
    file: File,
    path: PathBuf,
    /// multiprobe created it (removed again if never claimed).
    created: bool,
    /// The probes are placed and the file is ours to write.
    claimed: bool,
    regular: bool,
}

fn open_error(path: &Path, e: io::Error) -> OutputError {
    if e.raw_os_error() == Some(libc::ELOOP) {
        OutputError::Symlink(path.to_path_buf())
    } else {
        OutputError::Open {
            path: path.to_path_buf(),
            source: e,
        }
    }
}

impl OutputFile {
    /// Open (or create) `path` for writing under the module's rules; nothing is
    /// truncated or written yet.
    pub fn open(path: &Path) -> Result<OutputFile, OutputError> {
        let mut o = OpenOptions::new();
        o.write(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o600);
        let (file, created) = match o.clone().create_new(true).open(path) {
            Ok(f) => (f, true),
            // Exists (a symbolic link too: O_EXCL never follows one; O_NOFOLLOW then
            // refuses it).
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => (
                o.create(true).open(path).map_err(|e| open_error(path, e))?,
                false,
            ),
            Err(e) => return Err(open_error(path, e)),
        };
        let meta = file.metadata().map_err(|e| open_error(path, e))?;
        let out = OutputFile {
            regular: meta.is_file(),
            file,
            path: path.to_path_buf(),
            created,
            claimed: false,
        };
        if out.regular && !created {
            if meta.mode() & 0o111 != 0 {
                return Err(out.precious("an executable file"));
            }
            if out.is_elf() {
                return Err(out.precious("an ELF file (a program, library or object)"));
            }
        }
        Ok(out)
    }

    fn precious(&self, what: &'static str) -> OutputError {
        OutputError::Precious {
            path: self.path.clone(),
            what,
        }
    }

    /// Whether the open file starts with the ELF magic. Read through a second open of
    /// the same file (`/proc/self/fd`), as ours is write-only; unreadable means no.
    fn is_elf(&self) -> bool {
        let mut magic = [0u8; 4];
        File::open(format!("/proc/self/fd/{}", self.file.as_raw_fd()))
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok_and(|()| magic == *b"\x7fELF")
    }

    /// The probes are placed in process `pid`: refuse a file it has mapped, then
    /// truncate and take the file.
    pub fn claim(&mut self, pid: i32) -> Result<(), OutputError> {
        if self.regular {
            let meta = self
                .file
                .metadata()
                .map_err(|e| open_error(&self.path, e))?;
            let maps = Maps::read(pid as u32).unwrap_or_default();
            let mapped = maps.regions.iter().any(|r| {
                r.inode == meta.ino() && parse_dev(&r.dev) == Some(dev_numbers(meta.dev()))
            });
            if mapped {
                return Err(OutputError::Mapped {
                    path: self.path.clone(),
                    pid,
                });
            }
            if !self.created {
                self.file
                    .set_len(0)
                    .map_err(|e| open_error(&self.path, e))?;
            }
        }
        self.claimed = true;
        Ok(())
    }

    /// Push what was written to the disk, so a full disk is reported (regular files
    /// only: devices and pipes have nothing to sync).
    pub fn sync(&self) -> io::Result<()> {
        if self.regular {
            self.file.sync_all()?;
        }
        Ok(())
    }

    /// The name, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Write for OutputFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Drop for OutputFile {
    /// A file created for a run that never got as far as placing its probes is removed
    /// (if it is still the file we created).
    fn drop(&mut self) {
        if self.created && !self.claimed {
            let ours = self.file.metadata().ok();
            let there = std::fs::symlink_metadata(&self.path).ok();
            if let (Some(a), Some(b)) = (ours, there) {
                if a.dev() == b.dev() && a.ino() == b.ino() {
                    let _ = std::fs::remove_file(&self.path);
                }
            }
        }
    }
}

/// `major:minor` of a device number, as `/proc/PID/maps` prints them (hex).
fn dev_numbers(dev: u64) -> (u64, u64) {
    (u64::from(libc::major(dev)), u64::from(libc::minor(dev)))
}

fn parse_dev(s: &str) -> Option<(u64, u64)> {
    let (maj, min) = s.split_once(':')?;
    Some((
        u64::from_str_radix(maj, 16).ok()?,
        u64::from_str_radix(min, 16).ok()?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mp-outfile-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn new_files_are_private_and_removed_unless_claimed() {
        let d = dir("new");
        let p = d.join("out");
        let f = OutputFile::open(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{mode:o}");
        drop(f);
        assert!(!p.exists(), "an unclaimed new file is removed");
        let mut f = OutputFile::open(&p).unwrap();
        f.claim(std::process::id() as i32).unwrap();
        f.write_all(b"x\n").unwrap();
        f.sync().unwrap();
        drop(f);
        assert_eq!(std::fs::read(&p).unwrap(), b"x\n");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn existing_files_are_kept_until_claimed_and_precious_ones_refused() {
        let d = dir("old");
        let p = d.join("log");
        std::fs::write(&p, "before\n").unwrap();
        let mut f = OutputFile::open(&p).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"before\n");
        drop(f);
        assert_eq!(
            std::fs::read(&p).unwrap(),
            b"before\n",
            "not ours to remove"
        );
        f = OutputFile::open(&p).unwrap();
        f.claim(std::process::id() as i32).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"", "truncated once claimed");
        drop(f);

        let exe = d.join("script");
        std::fs::write(&exe, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = OutputFile::open(&exe).unwrap_err();
        assert!(e.to_string().contains("executable"), "{e}");
        let elf = d.join("lib.so");
        std::fs::copy("/proc/self/exe", &elf).unwrap();
        std::fs::set_permissions(&elf, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = OutputFile::open(&elf).unwrap_err();
        assert!(e.to_string().contains("ELF"), "{e}");

        let link = d.join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        let e = OutputFile::open(&link).unwrap_err();
        assert!(matches!(e, OutputError::Symlink(_)), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_file_the_process_maps_is_refused_at_claim() {
        // This test's own executable is mapped by this process; a copy without its
        // `x` bits and ELF magic is not, so map one: any mapped file will do.
        let d = dir("mapped");
        let p = d.join("data");
        std::fs::write(&p, vec![b'a'; 4096]).unwrap();
        let data = File::open(&p).unwrap();
        // SAFETY: a private read-only mapping of a file we just wrote; unmapped below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4096,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                data.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let mut f = OutputFile::open(&p).unwrap();
        let e = f.claim(std::process::id() as i32).unwrap_err();
        assert!(matches!(e, OutputError::Mapped { .. }), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096, "left alone");
        // SAFETY: the mapping made above, not used after.
        unsafe { libc::munmap(addr, 4096) };
        std::fs::remove_dir_all(&d).unwrap();
    }
}
