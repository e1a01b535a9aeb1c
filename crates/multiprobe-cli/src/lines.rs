//! The per-hit lines of the `args`, `regs` and `mem` actions, as text.

use std::fmt::Write as _;

use multiprobe_core::{Gpr, Regs};

/// The `args:N` line of one hit.
pub fn args_line(tid: u32, symbol: &str, args: &[Result<u64, ()>]) -> String {
    let mut s = format!("[{tid}] {symbol}(");
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            s.push_str(", ");
        }
        match a {
            Ok(v) => {
                let _ = write!(s, "{v:#x}");
            }
            Err(()) => s.push('?'),
        }
    }
    s.push(')');
    s
}

/// The `regs` line of one hit.
pub fn regs_line(tid: u32, symbol: &str, r: &Regs) -> String {
    let mut s = format!("[{tid}] {symbol} rip={:#x} rflags={:#x}", r.rip, r.rflags);
    for g in Gpr::ALL {
        let _ = write!(s, " {}={:#x}", g.name(), r.gpr(g));
    }
    s
}

/// The `mem:ARG:LEN` lines of one hit: a header and a classic hex dump.
pub fn mem_lines(
    tid: u32,
    symbol: &str,
    arg: u8,
    addr: u64,
    bytes: Result<&[u8], String>,
) -> String {
    let mut s = format!("[{tid}] {symbol} arg{arg}={addr:#x}");
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hit_lines() {
        assert_eq!(
            args_line(7, "malloc", &[Ok(0x20), Err(())]),
            "[7] malloc(0x20, ?)"
        );
        let r = Regs {
            rdi: 5,
            ..Regs::default()
        };
        let l = regs_line(1, "f", &r);
        assert!(l.contains(" rdi=0x5") && l.contains(" r15=0x0"), "{l}");
        let m = mem_lines(1, "f", 0, 0x1000, Ok(b"hello, world\0\x01xyz!"));
        assert!(m.contains("0000000000001000  68 65 6c 6c 6f"), "{m}");
        assert!(m.contains("hello, world..xy\n"), "{m}");
        assert!(m.contains("\n  0000000000001010  7a 21 "), "{m}");
        assert!(mem_lines(1, "f", 1, 0, Err("unmapped".into())).ends_with(": unmapped"));
    }
}
