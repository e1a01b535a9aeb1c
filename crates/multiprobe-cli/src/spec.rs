//! Probe specifications as users write them on the command line.
//!
//! ```text
//! SPEC    := TARGET [ "=" ACTION { "," ACTION } ]
//! TARGET  := [ LIBRARY ":" ] SYMBOL [ "+" OFFSET ]  |  ADDRESS
//! ACTION  := "count" | "args:" N | "regs" | "mem:" ARG ":" LEN
//! ```
//!
//! `ADDRESS` and `OFFSET` are hexadecimal with `0x` or decimal. Each action becomes its
//! own handler on the probed site, so `-p malloc -p malloc=args:1` puts two handlers on
//! one breakpoint — the point of the project.
//!
//! `SYMBOL` is a C name, a mangled name, a Rust path (`crate::module::function`) or a
//! C++ name, with or without its parameters as the demangler prints them
//! (`ns::Shape::area`, `'operator new(unsigned long)'`); an `=` or `+` that belongs to
//! a C++ operator's name (`operator==`, `operator+`) is not taken as a separator. It may
//! be a wildcard pattern (`str*cmp`, `mall?c`): every function that matches gets the
//! actions (no `+OFFSET` then).

use std::fmt;

use multiprobe_symbols::split_library;

/// Where to probe.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// A function by name, optionally in one library, plus an offset into it.
    Symbol {
        /// `libc` in `libc:malloc` (a file name, a prefix of one, or a path).
        library: Option<String>,
        /// The function's name (C, mangled, or demangled Rust path).
        name: String,
        /// Bytes past the function's start.
        offset: u64,
    },
    /// An absolute address in the target.
    Address(u64),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Symbol {
                library,
                name,
                offset,
            } => {
                if let Some(l) = library {
                    write!(f, "{l}:")?;
                }
                write!(f, "{name}")?;
                if *offset != 0 {
                    write!(f, "+{offset:#x}")?;
                }
                Ok(())
            }
            Target::Address(a) => write!(f, "{a:#x}"),
        }
    }
}

/// What a handler does at each hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Count hits (every handler counts; this one only counts).
    Count,
    /// Print the first N integer arguments (System V: rdi, rsi, rdx, rcx, r8, r9, stack).
    Args(u8),
    /// Print every general-purpose register.
    Regs,
    /// Hex-dump `len` bytes at the address held by argument `arg`.
    Mem {
        /// Which argument (0-based) holds the address.
        arg: u8,
        /// How many bytes.
        len: u16,
    },
}

/// Limits that keep one hit's output line bounded.
pub const MAX_ARGS: u8 = 16;
/// Largest `mem` dump.
pub const MAX_MEM: u16 = 4096;

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Count => write!(f, "count"),
            Action::Args(n) => write!(f, "args:{n}"),
            Action::Regs => write!(f, "regs"),
            Action::Mem { arg, len } => write!(f, "mem:{arg}:{len}"),
        }
    }
}

/// One `-p` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Where.
    pub target: Target,
    /// What, one handler each (at least one).
    pub actions: Vec<Action>,
    /// The text as given, for messages.
    pub text: String,
}

/// A malformed SPEC, with what is wrong and what was expected.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("bad probe spec {spec:?}: {why}")]
pub struct SpecError {
    spec: String,
    why: String,
}

fn err(spec: &str, why: impl Into<String>) -> SpecError {
    SpecError {
        spec: spec.to_string(),
        why: why.into(),
    }
}

/// A number in hex (`0x...`) or decimal.
pub fn parse_number(s: &str) -> Option<u64> {
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

fn is_symbol_char(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || matches!(
            c,
            '_' | '.'
                | '$'
                | '@'
                | '<'
                | '>'
                | ','
                | ' '
                | '('
                | ')'
                | '*'
                | '&'
                | '~'
                | '['
                | ']'
                | '?'
        )
}

/// Whether a symbol name is a wildcard pattern: it has `*` or `?` and is not a C++ name
/// with parameters (`f(char const*)`) or an operator (`operator*`), where they are
/// literal.
pub fn is_wildcard(name: &str) -> bool {
    multiprobe_symbols::is_pattern(name) && !name.contains('(') && !name.contains("operator")
}

/// Characters that may spell a C++ operator (`operator+=`, `operator!`, ...).
fn is_operator_char(c: char) -> bool {
    matches!(c, '=' | '!' | '+' | '-' | '/' | '%' | '^' | '|')
}

/// The `=` that starts the actions: the last one that is not part of a C++ operator's
/// name (`operator=`, `operator==`, `operator<=`, ...).
fn actions_split(text: &str) -> Option<usize> {
    text.char_indices().rev().find_map(|(i, c)| {
        let before = &text[..i];
        let in_operator = before.ends_with("operator")
            || before
                .ends_with(|p: char| is_operator_char(p) || matches!(p, '<' | '>' | '*' | '&'))
                && before.contains("operator");
        (c == '=' && !in_operator).then_some(i)
    })
}

impl ProbeSpec {
    /// Whether the target is a wildcard pattern (one site per matching function).
    pub fn is_pattern(&self) -> bool {
        matches!(&self.target, Target::Symbol { name, .. } if is_wildcard(name))
    }
}

impl std::str::FromStr for ProbeSpec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, SpecError> {
        let (target_text, actions_text) = match actions_split(text) {
            Some(i) => (&text[..i], Some(&text[i + 1..])),
            None => (text, None),
        };
        let target = parse_target(text, target_text.trim())?;
        let actions = match actions_text {
            None => vec![Action::Count],
            Some(a) => a
                .split(',')
                .map(|a| parse_action(text, a.trim()))
                .collect::<Result<Vec<_>, _>>()?,
        };
        Ok(ProbeSpec {
            target,
            actions,
            text: text.to_string(),
        })
    }
}

fn parse_target(spec: &str, t: &str) -> Result<Target, SpecError> {
    if t.is_empty() {
        return Err(err(
            spec,
            "no target: expected symbol, library:symbol or 0xADDRESS",
        ));
    }
    if t.starts_with(|c: char| c.is_ascii_digit()) {
        return match parse_number(t) {
            Some(0) => Err(err(spec, "address 0 cannot be probed")),
            Some(a) => Ok(Target::Address(a)),
            None => Err(err(
                spec,
                format!("{t:?} is not an address (use 0x... or decimal)"),
            )),
        };
    }
    // `::` belongs to Rust paths; a single `:` separates the library.
    let (library, rest) = match split_library(t) {
        Some(("", _)) => return Err(err(spec, "empty library name before ':'")),
        Some((l, r)) => (Some(l.to_string()), r),
        None => (None, t),
    };
    let operator = rest.contains("operator");
    let (name, offset) = match rest.rsplit_once('+') {
        // `operator+`, `operator++`, `operator+=(...)`: the `+` is the name's.
        Some((_, o)) if operator && parse_number(o).is_none() => (rest, 0),
        Some((n, o)) => {
            let off = parse_number(o)
                .ok_or_else(|| err(spec, format!("{o:?} is not an offset (use +0x10 or +16)")))?;
            (n, off)
        }
        None => (rest, 0),
    };
    if name.is_empty() {
        return Err(err(spec, "empty symbol name"));
    }
    let allowed = |c: char| is_symbol_char(c) || c == ':' || (operator && is_operator_char(c));
    if let Some(c) = name.chars().find(|&c| !allowed(c)) {
        return Err(err(
            spec,
            format!("unexpected character {c:?} in symbol name"),
        ));
    }
    if offset != 0 && is_wildcard(name) {
        return Err(err(spec, "an offset needs one function, not a pattern"));
    }
    Ok(Target::Symbol {
        library,
        name: name.to_string(),
        offset,
    })
}

fn parse_action(spec: &str, a: &str) -> Result<Action, SpecError> {
    let mut parts = a.split(':');
    let kind = parts.next().unwrap_or("");
    let mut num = |what: &str, max: u64| -> Result<u64, SpecError> {
        let p = parts
            .next()
            .ok_or_else(|| err(spec, format!("{kind} needs {what}")))?;
        match parse_number(p) {
            Some(n) if n <= max => Ok(n),
            Some(_) => Err(err(spec, format!("{what} of {kind} is at most {max}"))),
            None => Err(err(
                spec,
                format!("{p:?} is not a number ({what} of {kind})"),
            )),
        }
    };
    let action = match kind {
        "count" => Action::Count,
        "regs" => Action::Regs,
        "args" => Action::Args(num("a count, as in args:2", u64::from(MAX_ARGS))? as u8),
        "mem" => {
            let arg = num("an argument index, as in mem:0:16", u64::from(MAX_ARGS) - 1)? as u8;
            let len = num("a length, as in mem:0:16", u64::from(MAX_MEM))? as u16;
            Action::Mem { arg, len }
        }
        "" => return Err(err(spec, "empty action after '=' or ','")),
        other => {
            return Err(err(
                spec,
                format!("unknown action {other:?}: expected count, args:N, regs or mem:ARG:LEN"),
            ))
        }
    };
    if parts.next().is_some() {
        return Err(err(spec, format!("too many ':' fields in action {a:?}")));
    }
    Ok(action)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<ProbeSpec, SpecError> {
        s.parse()
    }

    fn sym(library: Option<&str>, name: &str, offset: u64) -> Target {
        Target::Symbol {
            library: library.map(String::from),
            name: name.into(),
            offset,
        }
    }

    #[test]
    fn targets() {
        assert_eq!(p("malloc").unwrap().target, sym(None, "malloc", 0));
        assert_eq!(
            p("libc:malloc").unwrap().target,
            sym(Some("libc"), "malloc", 0)
        );
        assert_eq!(p("main+0x10").unwrap().target, sym(None, "main", 16));
        assert_eq!(p("main+16").unwrap().target, sym(None, "main", 16));
        assert_eq!(
            p("/lib/x/libc.so.6:free").unwrap().target,
            sym(Some("/lib/x/libc.so.6"), "free", 0)
        );
        assert_eq!(p("0x401000").unwrap().target, Target::Address(0x401000));
        assert_eq!(p("4198400").unwrap().target, Target::Address(0x401000));
        assert_eq!(
            p("my_crate::module::work").unwrap().target,
            sym(None, "my_crate::module::work", 0)
        );
        assert_eq!(
            p("single:single::work+0x4").unwrap().target,
            sym(Some("single"), "single::work", 4)
        );
        assert_eq!(p("libc:malloc").unwrap().actions, vec![Action::Count]);
        // C++ names, with parameters and operators.
        let s = p("libstdc++:operator new(unsigned long)=args:1").unwrap();
        assert_eq!(
            s.target,
            sym(Some("libstdc++"), "operator new(unsigned long)", 0)
        );
        assert_eq!(s.actions, vec![Action::Args(1)]);
        for (text, name, actions) in [
            ("ns::A::operator=", "ns::A::operator=", 1),
            (
                "ns::A::operator==(ns::A const&)=count,regs",
                "ns::A::operator==(ns::A const&)",
                2,
            ),
            ("ns::A::operator<=>", "ns::A::operator<=>", 1),
            ("ns::A::operator+=", "ns::A::operator+=", 1),
            ("ns::A::operator+", "ns::A::operator+", 1),
            (
                "ns::A::operator!=(ns::A const&) const=regs",
                "ns::A::operator!=(ns::A const&) const",
                1,
            ),
            ("ns::Shape::~Shape()", "ns::Shape::~Shape()", 1),
        ] {
            let s = p(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(s.target, sym(None, name, 0), "{text}");
            assert_eq!(s.actions.len(), actions, "{text}");
        }
        assert_eq!(
            p("libc:str*cmp=args:2").unwrap().target,
            sym(Some("libc"), "str*cmp", 0)
        );
        assert_eq!(p("mall?c").unwrap().target, sym(None, "mall?c", 0));
        assert!(is_wildcard("str*") && is_wildcard("mall?c"));
        assert!(!is_wildcard("ns::draw(char const*)") && !is_wildcard("ns::A::operator*"));
        assert!(!is_wildcard("malloc"));
        assert_eq!(
            p("ns::A::operator+=+0x8").unwrap().target,
            sym(None, "ns::A::operator+=", 8)
        );
        assert_eq!(
            p("libc:malloc+0x4").unwrap().target.to_string(),
            "libc:malloc+0x4"
        );
    }

    #[test]
    fn actions() {
        assert_eq!(p("f=args:2").unwrap().actions, vec![Action::Args(2)]);
        assert_eq!(
            p("f=count,regs,mem:1:32").unwrap().actions,
            vec![Action::Count, Action::Regs, Action::Mem { arg: 1, len: 32 }]
        );
        assert_eq!(
            p("f=mem:0:0x10").unwrap().actions[0].to_string(),
            "mem:0:16"
        );
    }

    #[test]
    fn malformed_specs_are_clear_errors() {
        for (s, why) in [
            ("", "no target"),
            ("=count", "no target"),
            ("0", "address 0"),
            ("0xzz", "not an address"),
            (":malloc", "empty library"),
            ("libc:", "empty symbol"),
            ("main+", "not an offset"),
            ("main+zz", "not an offset"),
            ("ma in!", "unexpected character"),
            ("f=", "empty action"),
            ("f=bogus", "unknown action"),
            ("f=args", "needs"),
            ("f=args:x", "not a number"),
            ("f=args:99", "at most 16"),
            ("f=mem:0", "needs a length"),
            ("f=mem:0:99999", "at most 4096"),
            ("f=regs:1", "too many"),
            ("str*+0x4", "not a pattern"),
        ] {
            let e = p(s).expect_err(s).to_string();
            assert!(e.contains(why), "{s:?} gave {e:?}, expected {why:?}");
            assert!(e.starts_with("bad probe spec"), "{e}");
        }
    }
}
