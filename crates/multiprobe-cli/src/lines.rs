//! The per-hit lines of the actions that print, as text: who (`[PID]` for a process's
//! main thread, `[PID/TID]` for another thread), when (`-T`: the wall-clock time with
//! microseconds, as `ltrace -tt`), where and what.

use std::fmt::Write as _;
use std::time::SystemTime;

use multiprobe_core::{Gpr, Regs};

use crate::report::{frame_text, Frame};

/// When and by whom a hit happened.
#[derive(Clone, Copy, Debug)]
pub struct Who {
    /// The process.
    pub pid: i32,
    /// The thread.
    pub tid: u32,
    /// When, if the line shows it (`-T`).
    pub time: Option<SystemTime>,
}

impl Who {
    /// `HH:MM:SS.uuuuuu [PID/TID] ` (the time only with `-T`, the tid only for a thread
    /// other than the main one).
    pub fn prefix(&self) -> String {
        let mut s = String::new();
        if let Some(t) = self.time {
            s.push_str(&clock(t));
            s.push(' ');
        }
        if self.tid as i32 == self.pid {
            let _ = write!(s, "[{}] ", self.pid);
        } else {
            let _ = write!(s, "[{}/{}] ", self.pid, self.tid);
        }
        s
    }
}

/// Seconds since the epoch, with microseconds (for JSON records).
pub fn epoch_seconds(t: SystemTime) -> f64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| (d.as_micros() as f64) / 1e6)
}

/// Local wall-clock time of day with microseconds, `HH:MM:SS.uuuuuu`.
pub fn clock(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as libc::time_t;
    // SAFETY: an all-zero `tm` is a valid value of the plain C struct.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: `localtime_r` reads `secs` and writes only into `tm`, both valid for the
    // call; it is the reentrant variant (no shared static buffer).
    let ok = !unsafe { libc::localtime_r(&secs, &mut tm) }.is_null();
    let (h, m, s) = if ok {
        (tm.tm_hour, tm.tm_min, tm.tm_sec)
    } else {
        let day = d.as_secs() % 86_400;
        (
            (day / 3600) as i32,
            (day / 60 % 60) as i32,
            (day % 60) as i32,
        )
    };
    format!("{h:02}:{m:02}:{s:02}.{:06}", d.subsec_micros())
}

/// The `args:N` line of one hit.
pub fn args_line(who: &Who, symbol: &str, args: &[Result<u64, String>]) -> String {
    let mut s = format!("{}{symbol}(", who.prefix());
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        match a {
            Ok(v) => {
                let _ = write!(s, "{v:#x}");
            }
            Err(_) => s.push('?'),
        }
    }
    s.push(')');
    s
}

/// The `regs` line of one hit.
pub fn regs_line(who: &Who, symbol: &str, r: &Regs) -> String {
    let mut s = format!(
        "{}{symbol} rip={:#x} rflags={:#x}",
        who.prefix(),
        r.rip,
        r.rflags
    );
    for g in Gpr::ALL {
        let _ = write!(s, " {}={:#x}", g.name(), r.gpr(g));
    }
    s
}

/// The `mem:ARG:LEN` lines of one hit: a header and a classic hex dump.
pub fn mem_lines(
    who: &Who,
    symbol: &str,
    arg: u8,
    addr: u64,
    bytes: Result<&[u8], String>,
) -> String {
    let mut s = format!("{}{symbol} arg{arg}={addr:#x}", who.prefix());
    match bytes {
        Err(e) => {
            let _ = write!(s, ": {e}");
        }
        Ok(b) => {
            for (i, chunk) in b.chunks(16).enumerate() {
                let _ = write!(s, "\n  {:016x}  ", addr + 16 * i as u64);
                for j in 0..16 {
                    match chunk.get(j) {
                        Some(x) => {
                            let _ = write!(s, "{x:02x} ");
                        }
                        None => s.push_str("   "),
                    }
                }
                s.push(' ');
                s.extend(chunk.iter().map(|&c| {
                    if c.is_ascii_graphic() || c == b' ' {
                        c as char
                    } else {
                        '.'
                    }
                }));
            }
        }
    }
    s
}

/// A C string as a quoted, escaped literal (`"a\tb\x01"`), `...` after the quote when
/// it was cut at the length limit.
pub fn quoted(bytes: &[u8], truncated: bool) -> String {
    let mut s = String::with_capacity(bytes.len() + 2);
    s.push('"');
    for chunk in bytes.utf8_chunks() {
        for c in chunk.valid().chars() {
            match c {
                '"' => s.push_str("\\\""),
                '\\' => s.push_str("\\\\"),
                '\n' => s.push_str("\\n"),
                '\t' => s.push_str("\\t"),
                '\r' => s.push_str("\\r"),
                c if c.is_control() => {
                    let _ = write!(s, "\\x{:02x}", c as u32);
                }
                c => s.push(c),
            }
        }
        for b in chunk.invalid() {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    s.push('"');
    if truncated {
        s.push_str("...");
    }
    s
}

/// The `str:ARG` line of one hit.
pub fn str_line(
    who: &Who,
    symbol: &str,
    arg: u8,
    addr: u64,
    value: Result<(&[u8], bool), String>,
) -> String {
    match value {
        Ok((b, cut)) => format!("{}{symbol} arg{arg}={}", who.prefix(), quoted(b, cut)),
        Err(e) => format!("{}{symbol} arg{arg}={addr:#x}: {e}", who.prefix()),
    }
}

/// The `ustack` lines of one hit: a header, then a frame a line.
pub fn stack_lines(who: &Who, symbol: &str, frames: &[Frame], note: Option<&str>) -> String {
    let mut s = format!("{}{symbol} stack:", who.prefix());
    for f in frames {
        let _ = write!(s, "\n  {}", frame_text(f));
    }
    if let Some(n) = note {
        let _ = write!(s, "\n  ({n})");
    }
    s
}

/// The `regs` object of a `--json` hit: every register as a hex string.
pub fn regs_json(r: &Regs) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    m.insert("rip".into(), format!("{:#x}", r.rip).into());
    m.insert("rflags".into(), format!("{:#x}", r.rflags).into());
    for g in Gpr::ALL {
        m.insert(g.name().into(), format!("{:#x}", r.gpr(g)).into());
    }
    serde_json::Value::Object(m)
}

/// The `mem` object of a `--json` hit: where, how much, and the bytes as hex or the
/// error of the read.
pub fn mem_json(addr: u64, len: u16, read: Result<&[u8], &str>) -> serde_json::Value {
    let mut m = serde_json::json!({ "addr": format!("{addr:#x}"), "len": len });
    match read {
        Ok(bs) => {
            m["bytes"] = bs
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect::<String>()
                .into()
        }
        Err(e) => m["error"] = e.into(),
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_lines() {
        let main = Who {
            pid: 7,
            tid: 7,
            time: None,
        };
        let thread = Who { tid: 9, ..main };
        assert_eq!(
            args_line(&main, "malloc", &[Ok(0x20), Err("x".into())]),
            "[7] malloc(0x20, ?)"
        );
        assert_eq!(args_line(&thread, "f", &[]), "[7/9] f()");
        let r = Regs {
            rdi: 5,
            ..Regs::default()
        };
        let l = regs_line(&main, "f", &r);
        assert!(l.contains(" rdi=0x5") && l.contains(" r15=0x0"), "{l}");
        let m = mem_lines(&main, "f", 0, 0x1000, Ok(b"hello, world\0\x01xyz!"));
        assert!(m.contains("0000000000001000  68 65 6c 6c 6f"), "{m}");
        assert!(m.contains("hello, world..xy\n"), "{m}");
        assert!(m.contains("\n  0000000000001010  7a 21 "), "{m}");
        assert!(mem_lines(&main, "f", 1, 0, Err("unmapped".into())).ends_with(": unmapped"));
        assert_eq!(
            str_line(&main, "open", 0, 1, Ok((b"/etc/\"x\"\n\xff", true))),
            "[7] open arg0=\"/etc/\\\"x\\\"\\n\\xff\"..."
        );
        let timed = Who {
            time: Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_micros(1_000_001)),
            ..main
        };
        let p = timed.prefix();
        assert!(p.ends_with(":01.000001 [7] "), "{p}");
        assert_eq!(p.len(), "00:00:01.000001 [7] ".len(), "{p}");
    }
}
