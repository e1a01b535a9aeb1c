//! Probe specifications as users write them on the command line.
//!
//! ```text
//! SPEC    := [ "uprobe:" ] TARGET [ "=" ITEM { "," ITEM } ]
//!          | "usdt:" [ FILE ":" ] [ PROVIDER ":" ] NAME [ "=" ITEM { "," ITEM } ]
//! TARGET  := [ FILE ":" ] SYMBOL [ "+" OFFSET ]  |  FILE ":" 0xOFFSET  |  ADDRESS
//! ITEM    := ACTION | "if:" COND
//! ACTION  := "count" [ ":" KEY ] | "args:" N | "regs" | "mem:" ARG ":" LEN
//!          | "str:" ARG [ ":" MAX ] | "ustack" [ ":" DEPTH ] | "ret" | "latency"
//! KEY     := "tid" | "pid" | "arg" N | "str" N | "ustack"
//! COND    := "arg" N OP NUMBER          OP := "==" | "!=" | "<" | "<=" | ">" | ">="
//! ```
//!
//! `ADDRESS`, `OFFSET` and numbers are hexadecimal with `0x` or decimal. Each action
//! becomes its own handler on the probed site, so `-p malloc -p malloc=args:1` puts two
//! handlers on one breakpoint — the point of the project. Conditions (`if:`) apply to
//! every action of their spec: a hit where one does not hold runs none of them and is
//! counted as filtered out.
//!
//! `FILE` is a library or program: a file name, a prefix of one (`libc`, `libstdc++`,
//! `python3`) or a path. `FILE:0xOFFSET` is a file offset in that file (as the kernel's
//! `uprobe_events` take them), for code without symbols.
//!
//! `SYMBOL` is a C name, a mangled name, a Rust path (`crate::module::function`) or a
//! C++ name, with or without its parameters as the demangler prints them
//! (`ns::Shape::area`, `'operator new(unsigned long)'`); an `=` or `+` that belongs to
//! a C++ operator's name (`operator==`, `operator+`) is not taken as a separator. It may
//! be a wildcard pattern (`str*cmp`, `mall?c`): every function that matches gets the
//! actions (no `+OFFSET` then). A USDT `NAME` may be a pattern too.
//!
//! Return actions (the target must be a function's first instruction): `ret` prints
//! each call's return value when it returns, `latency` makes a histogram of the time
//! from entry to return; `args:N` and `ret` in one spec become one action, one line per
//! call at its return, ltrace-style (`f(0x1, 0x2) = 0x3`; N at most 7).
//!
//! bpftrace's `uprobe:` prefix is accepted, and so is `uretprobe:`: the same target, its
//! actions taken at the return — `ret` when none is given (a spec's actions that are not
//! return actions stay entry actions; `args:N` joins `ret` as above).

use std::fmt;

use multiprobe_symbols::split_library;

/// Where to probe.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// A function by name, optionally in one library or program, plus an offset into it.
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
    /// A file offset in a library or program (`/path/prog:0x1234`), for code without
    /// symbols.
    FileOffset {
        /// The file (as for [`Target::Symbol`]'s library).
        file: String,
        /// The offset in the file.
        offset: u64,
    },
    /// A USDT probe (`usdt:[FILE:][PROVIDER:]NAME`): the parts before the name as given
    /// (one part may be a file or a provider: decided where the probe is looked up).
    Usdt {
        /// The parts before the name, 0 to 2 of them.
        scope: Vec<String>,
        /// The probe's name (a pattern if it has `*` or `?`).
        name: String,
    },
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
            Target::FileOffset { file, offset } => write!(f, "{file}:{offset:#x}"),
            Target::Usdt { scope, name } => {
                write!(f, "usdt:")?;
                for s in scope {
                    write!(f, "{s}:")?;
                }
                write!(f, "{name}")
            }
        }
    }
}

/// What an aggregating `count` is keyed by.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Key {
    /// The thread id.
    Tid,
    /// The process id.
    Pid,
    /// The value of an argument (0-based).
    Arg(u8),
    /// The C string an argument points to (its first 64 bytes).
    Str(u8),
    /// The user-space stack.
    Ustack,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Tid => write!(f, "tid"),
            Key::Pid => write!(f, "pid"),
            Key::Arg(n) => write!(f, "arg{n}"),
            Key::Str(n) => write!(f, "str{n}"),
            Key::Ustack => write!(f, "ustack"),
        }
    }
}

/// What a handler does at each hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Count hits (every handler counts; this one only counts).
    Count,
    /// Count hits per value of a key (bpftrace's `@[tid] = count()`): the summary
    /// shows the most frequent values.
    CountBy(Key),
    /// Print the first N integer arguments (System V: rdi, rsi, rdx, rcx, r8, r9, stack;
    /// for a USDT probe, its own arguments).
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
    /// Print the C string argument `arg` points to, at most `max` bytes.
    Str {
        /// Which argument (0-based) holds the address.
        arg: u8,
        /// The most bytes read.
        max: u16,
    },
    /// Print the user-space stack of each hit (at most `depth` frames) and count hits
    /// per stack.
    Ustack {
        /// The most frames.
        depth: u8,
    },
    /// Print each call's return value (`rax`) when it returns.
    Ret,
    /// A histogram of each call's time from entry to return.
    Latency,
    /// `args:N` and `ret` together: one line per call at its return, with the first N
    /// arguments as they were at the entry.
    Call(u8),
}

/// The most arguments `args:N,ret` keeps from a call's entry to its return.
pub const MAX_CALL_ARGS: u8 = 7;

/// Limits that keep one hit's output line bounded.
pub const MAX_ARGS: u8 = 16;
/// Largest `mem` dump.
pub const MAX_MEM: u16 = 4096;
/// Default and largest `str` length.
pub const DEFAULT_STR: u16 = 256;
/// Largest `str` length.
pub const MAX_STR: u16 = 4096;
/// Default `ustack` depth.
pub const DEFAULT_DEPTH: u8 = 32;
/// Largest `ustack` depth.
pub const MAX_DEPTH: u8 = 127;

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Count => write!(f, "count"),
            Action::CountBy(k) => write!(f, "count:{k}"),
            Action::Args(n) => write!(f, "args:{n}"),
            Action::Regs => write!(f, "regs"),
            Action::Mem { arg, len } => write!(f, "mem:{arg}:{len}"),
            Action::Str { arg, max } if *max == DEFAULT_STR => write!(f, "str:{arg}"),
            Action::Str { arg, max } => write!(f, "str:{arg}:{max}"),
            Action::Ustack { depth } if *depth == DEFAULT_DEPTH => write!(f, "ustack"),
            Action::Ustack { depth } => write!(f, "ustack:{depth}"),
            Action::Ret => write!(f, "ret"),
            Action::Latency => write!(f, "latency"),
            Action::Call(n) => write!(f, "args:{n},ret"),
        }
    }
}

impl Action {
    /// Whether the action prints a line per hit (subject to the rate limit).
    pub fn prints(&self) -> bool {
        !matches!(self, Action::Count | Action::CountBy(_) | Action::Latency)
    }

    /// Whether the action is taken at the call's return (a return probe).
    pub fn at_return(&self) -> bool {
        matches!(self, Action::Ret | Action::Latency | Action::Call(_))
    }
}

/// A comparison of a filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `==`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

/// A filter (`if:arg1>4096`): the spec's actions run only at hits where it holds.
/// Numbers compare unsigned, or signed when the constant is negative (`if:arg0<-1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Cond {
    /// The argument compared (0-based).
    pub arg: u8,
    /// How.
    pub op: Op,
    /// With what.
    pub value: i128,
}

impl Cond {
    /// Whether the condition holds for the argument's value `v`.
    pub fn holds(&self, v: u64) -> bool {
        // A negative constant compares the argument as signed.
        let lhs = if self.value < 0 {
            i128::from(v as i64)
        } else {
            i128::from(v)
        };
        let rhs = self.value;
        match self.op {
            Op::Eq => lhs == rhs,
            Op::Ne => lhs != rhs,
            Op::Lt => lhs < rhs,
            Op::Le => lhs <= rhs,
            Op::Gt => lhs > rhs,
            Op::Ge => lhs >= rhs,
        }
    }
}

impl fmt::Display for Cond {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let op = match self.op {
            Op::Eq => "==",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        };
        write!(f, "arg{}{op}{}", self.arg, self.value)
    }
}

/// One `-p` argument.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Where.
    pub target: Target,
    /// What, one handler each (at least one).
    pub actions: Vec<Action>,
    /// When (all must hold; none: always).
    pub filters: Vec<Cond>,
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

/// The `=` that starts the actions: the first one that is not part of a C++ operator's
/// name (`operator=`, `operator==`, `operator<=`, ...). (The first, not the last: a
/// filter has `=` of its own, `if:arg0==5`.)
fn actions_split(text: &str) -> Option<usize> {
    text.char_indices().find_map(|(i, c)| {
        let before = &text[..i];
        let in_operator = before.ends_with("operator")
            || before
                .ends_with(|p: char| is_operator_char(p) || matches!(p, '<' | '>' | '*' | '&'))
                && before.contains("operator");
        (c == '=' && !in_operator).then_some(i)
    })
}

impl ProbeSpec {
    /// Whether the spec has one site per match (a wildcard pattern, or USDT probes,
    /// which one name may put at several places) rather than one site.
    pub fn per_match(&self) -> bool {
        self.is_pattern() || matches!(self.target, Target::Usdt { .. })
    }

    /// Whether the target is a wildcard pattern (one site per matching function).
    pub fn is_pattern(&self) -> bool {
        match &self.target {
            Target::Symbol { name, .. } => is_wildcard(name),
            Target::Usdt { name, .. } => multiprobe_symbols::is_pattern(name),
            _ => false,
        }
    }
}

impl std::str::FromStr for ProbeSpec {
    type Err = SpecError;

    fn from_str(text: &str) -> Result<Self, SpecError> {
        let (target_text, items) = match actions_split(text) {
            Some(i) => (&text[..i], Some(&text[i + 1..])),
            None => (text, None),
        };
        let target_text = target_text.trim();
        let (uret, target_text) = match target_text.strip_prefix("uretprobe:") {
            Some(rest) => (true, rest),
            None => (false, target_text),
        };
        let target = parse_target(text, target_text)?;
        let mut actions = Vec::new();
        let mut filters = Vec::new();
        for item in items.map(|a| a.split(',')).into_iter().flatten() {
            let item = item.trim();
            match item.strip_prefix("if:") {
                Some(c) => filters.push(parse_cond(text, c)?),
                None => actions.push(parse_action(text, item)?),
            }
        }
        if uret && !actions.iter().any(Action::at_return) {
            actions.push(Action::Ret);
        }
        if actions.is_empty() {
            actions.push(Action::Count);
        }
        merge_call(text, &mut actions)?;
        Ok(ProbeSpec {
            target,
            actions,
            filters,
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
    if t.starts_with("uretprobe:") {
        return Err(err(spec, "uretprobe: given twice"));
    }
    if let Some(rest) = t.strip_prefix("usdt:") {
        return parse_usdt(spec, rest);
    }
    let t = t.strip_prefix("uprobe:").unwrap_or(t);
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
    if let (Some(file), true) = (&library, rest.starts_with(|c: char| c.is_ascii_digit())) {
        // `git:0x1000`, `/path/prog:0x4f20`: a file offset, not a name.
        return match parse_number(rest) {
            Some(offset) => Ok(Target::FileOffset {
                file: file.clone(),
                offset,
            }),
            None => Err(err(
                spec,
                format!("{rest:?} is not a file offset (use 0x... or decimal)"),
            )),
        };
    }
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

/// `usdt:[FILE:][PROVIDER:]NAME` after the `usdt:`. A file that is a path may hold
/// `:` only as its separator, so the parts are split at every `:`.
fn parse_usdt(spec: &str, t: &str) -> Result<Target, SpecError> {
    let parts: Vec<&str> = t.split(':').collect();
    if parts.len() > 3 {
        return Err(err(
            spec,
            "too many ':' in a USDT probe: usdt:[FILE:][PROVIDER:]NAME",
        ));
    }
    if parts.iter().any(|p| p.is_empty()) {
        return Err(err(
            spec,
            "empty part in a USDT probe: usdt:[FILE:][PROVIDER:]NAME",
        ));
    }
    let (name, scope) = parts.split_last().expect("split gives one part at least");
    if let Some(c) = name
        .chars()
        .find(|&c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '*' | '?')))
    {
        return Err(err(
            spec,
            format!("unexpected character {c:?} in a USDT probe name"),
        ));
    }
    Ok(Target::Usdt {
        scope: scope.iter().map(|s| s.to_string()).collect(),
        name: name.to_string(),
    })
}

fn parse_arg_index(spec: &str, what: &str, s: &str) -> Result<u8, SpecError> {
    match s.strip_prefix("arg").and_then(parse_number) {
        Some(n) if n < u64::from(MAX_ARGS) => Ok(n as u8),
        Some(_) => Err(err(
            spec,
            format!("{what}: arguments are arg0 to arg{}", MAX_ARGS - 1),
        )),
        None => Err(err(
            spec,
            format!("{what}: expected an argument such as arg0, not {s:?}"),
        )),
    }
}

fn parse_cond(spec: &str, c: &str) -> Result<Cond, SpecError> {
    const OPS: [(&str, Op); 6] = [
        ("==", Op::Eq),
        ("!=", Op::Ne),
        ("<=", Op::Le),
        (">=", Op::Ge),
        ("<", Op::Lt),
        (">", Op::Gt),
    ];
    let usage = "a condition is argN OP NUMBER, OP one of == != < <= > >= (if:arg1>4096)";
    let (lhs, op, rhs) = OPS
        .iter()
        .find_map(|&(s, op)| c.split_once(s).map(|(l, r)| (l, op, r)))
        .ok_or_else(|| err(spec, usage))?;
    let arg = parse_arg_index(spec, "if", lhs.trim())?;
    let rhs = rhs.trim();
    let value = match rhs.strip_prefix('-') {
        Some(n) => parse_number(n).map(|v| -i128::from(v)),
        None => parse_number(rhs).map(i128::from),
    }
    .filter(|v| *v >= -i128::from(i64::MAX) - 1)
    .ok_or_else(|| err(spec, format!("{rhs:?} is not a number ({usage})")))?;
    Ok(Cond { arg, op, value })
}

/// `args:N` and `ret` in one spec become one [`Action::Call`] (at the place of the
/// first `args`); each is taken once.
fn merge_call(spec: &str, actions: &mut Vec<Action>) -> Result<(), SpecError> {
    let args = actions.iter().position(|a| matches!(a, Action::Args(_)));
    let ret = actions.iter().position(|a| *a == Action::Ret);
    let (Some(i), Some(r)) = (args, ret) else {
        return Ok(());
    };
    let Action::Args(n) = actions[i] else {
        unreachable!("found above")
    };
    if n > MAX_CALL_ARGS {
        return Err(err(
            spec,
            format!(
                "args:{n} with ret: a call keeps at most {MAX_CALL_ARGS} arguments to its return"
            ),
        ));
    }
    actions[i] = Action::Call(n);
    actions.remove(r);
    Ok(())
}

fn parse_action(spec: &str, a: &str) -> Result<Action, SpecError> {
    let fields: Vec<&str> = a.split(':').collect();
    let kind = fields[0];
    let field = |i: usize| fields.get(i).copied();
    let num = |i: usize, what: &str, max: u64| -> Result<u64, SpecError> {
        let p = field(i).ok_or_else(|| err(spec, format!("{kind} needs {what}")))?;
        match parse_number(p) {
            Some(n) if n <= max => Ok(n),
            Some(_) => Err(err(spec, format!("{what} of {kind} is at most {max}"))),
            None => Err(err(
                spec,
                format!("{p:?} is not a number ({what} of {kind})"),
            )),
        }
    };
    let (action, used) = match kind {
        "count" => match field(1) {
            None => (Action::Count, 1),
            Some("tid") => (Action::CountBy(Key::Tid), 2),
            Some("pid") => (Action::CountBy(Key::Pid), 2),
            Some("ustack") => (Action::CountBy(Key::Ustack), 2),
            Some(k) if k.starts_with("arg") => (
                Action::CountBy(Key::Arg(parse_arg_index(spec, "count", k)?)),
                2,
            ),
            Some(k) if k.starts_with("str") => {
                let n = parse_arg_index(spec, "count", &format!("arg{}", &k[3..]))?;
                (Action::CountBy(Key::Str(n)), 2)
            }
            Some(k) => {
                return Err(err(
                    spec,
                    format!("count:{k}: a count is keyed by tid, pid, argN, strN or ustack"),
                ))
            }
        },
        "regs" => (Action::Regs, 1),
        "args" => (
            Action::Args(num(1, "a count, as in args:2", u64::from(MAX_ARGS))? as u8),
            2,
        ),
        "mem" => {
            let arg = num(
                1,
                "an argument index, as in mem:0:16",
                u64::from(MAX_ARGS) - 1,
            )?;
            let len = num(2, "a length, as in mem:0:16", u64::from(MAX_MEM))?;
            if len == 0 {
                return Err(err(spec, "a length of mem is at least 1"));
            }
            (
                Action::Mem {
                    arg: arg as u8,
                    len: len as u16,
                },
                3,
            )
        }
        "str" => {
            let arg = num(1, "an argument index, as in str:0", u64::from(MAX_ARGS) - 1)? as u8;
            let (max, used) = match field(2) {
                Some(_) => (
                    num(2, "a length, as in str:0:64", u64::from(MAX_STR))? as u16,
                    3,
                ),
                None => (DEFAULT_STR, 2),
            };
            if max == 0 {
                return Err(err(spec, "a length of str is at least 1"));
            }
            (Action::Str { arg, max }, used)
        }
        "ustack" => {
            let (depth, used) = match field(1) {
                Some(_) => (
                    num(1, "a depth, as in ustack:16", u64::from(MAX_DEPTH))? as u8,
                    2,
                ),
                None => (DEFAULT_DEPTH, 1),
            };
            if depth == 0 {
                return Err(err(spec, "a depth of ustack is at least 1"));
            }
            (Action::Ustack { depth }, used)
        }
        "" => return Err(err(spec, "empty action after '=' or ','")),
        "ret" => (Action::Ret, 1),
        "latency" => (Action::Latency, 1),
        "retval" => return Err(err(spec, "retval: the return action is spelled ret")),
        other => {
            return Err(err(
                spec,
                format!(
                    "unknown action {other:?}: expected count[:KEY], args:N, regs, mem:ARG:LEN, \
                     str:ARG, ustack, ret, latency or if:COND"
                ),
            ))
        }
    };
    if fields.len() > used {
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
        // A dump or string of no bytes is a mistake, not an action.
        for bad in ["f=mem:0:0", "f=str:1:0"] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains("at least 1"), "{bad}: {e}");
        }
    }

    #[test]
    fn return_actions() {
        assert_eq!(
            p("f=ret,latency").unwrap().actions,
            vec![Action::Ret, Action::Latency]
        );
        // args and ret make one call line, at the place of the args.
        let s = p("f=count,args:2,latency,ret").unwrap();
        assert_eq!(
            s.actions,
            vec![Action::Count, Action::Call(2), Action::Latency]
        );
        assert_eq!(s.actions[1].to_string(), "args:2,ret");
        assert!(s.actions[1].at_return() && !s.actions[0].at_return());
        // uretprobe: is the same target, `ret` unless a return action is given.
        let u = p("uretprobe:libc:malloc").unwrap();
        assert_eq!(u.target, sym(Some("libc"), "malloc", 0));
        assert_eq!(u.actions, vec![Action::Ret]);
        assert_eq!(
            p("uretprobe:f=latency").unwrap().actions,
            vec![Action::Latency]
        );
        assert_eq!(
            p("uretprobe:f=args:3").unwrap().actions,
            vec![Action::Call(3)]
        );
        assert!(!Action::Latency.prints() && Action::Ret.prints());
    }

    #[test]
    fn new_forms() {
        assert_eq!(
            p("git:0x1000").unwrap().target,
            Target::FileOffset {
                file: "git".into(),
                offset: 0x1000
            }
        );
        assert_eq!(
            p("/usr/bin/prog:4096=args:1").unwrap().target.to_string(),
            "/usr/bin/prog:0x1000"
        );
        assert_eq!(
            p("uprobe:libc:malloc").unwrap().target,
            sym(Some("libc"), "malloc", 0)
        );
        let u = p("usdt:python3.11:python:function__entry=args:3").unwrap();
        assert_eq!(
            u.target,
            Target::Usdt {
                scope: vec!["python3.11".into(), "python".into()],
                name: "function__entry".into()
            }
        );
        assert_eq!(u.actions, vec![Action::Args(3)]);
        assert!(p("usdt:python:*").unwrap().is_pattern());
        let f = p("libc:malloc=if:arg0>4096,count,args:1,if:arg0!=0x10000").unwrap();
        assert_eq!(f.actions, vec![Action::Count, Action::Args(1)]);
        assert_eq!(f.filters.len(), 2);
        assert_eq!(f.filters[0].to_string(), "arg0>4096");
        assert!(f.filters[0].holds(4097) && !f.filters[0].holds(4096));
        assert!(!f.filters[1].holds(0x10000) && f.filters[1].holds(1));
        let only = p("f=if:arg1==5").unwrap();
        assert_eq!(only.actions, vec![Action::Count], "a filter alone counts");
        let neg = p("f=if:arg0<-1").unwrap().filters[0];
        assert!(
            neg.holds((-2i64) as u64) && !neg.holds(5),
            "negative: signed"
        );
        assert_eq!(
            p("f=count:tid,count:pid,count:arg2,count:ustack,count:str1,ustack,ustack:8,str:0,str:1:64")
                .unwrap()
                .actions,
            vec![
                Action::CountBy(Key::Tid),
                Action::CountBy(Key::Pid),
                Action::CountBy(Key::Arg(2)),
                Action::CountBy(Key::Ustack),
                Action::CountBy(Key::Str(1)),
                Action::Ustack { depth: 32 },
                Action::Ustack { depth: 8 },
                Action::Str { arg: 0, max: 256 },
                Action::Str { arg: 1, max: 64 },
            ]
        );
        // C++ operators keep their `=` before a filter's.
        let op = p("ns::A::operator==(ns::A const&)=if:arg1==2").unwrap();
        assert_eq!(op.target, sym(None, "ns::A::operator==(ns::A const&)", 0));
        assert_eq!(op.filters[0].value, 2);
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
            ("uretprobe:uretprobe:f", "given twice"),
            ("f=retval", "spelled ret"),
            ("f=args:8,ret", "at most 7 arguments"),
            ("f=count:rip", "keyed by tid, pid, argN, strN or ustack"),
            ("f=count:strx", "expected an argument"),
            ("f=count:arg99", "arg0 to arg15"),
            ("f=if:arg0", "a condition is argN OP NUMBER"),
            ("f=if:rdi==1", "expected an argument"),
            ("f=if:arg0==x", "not a number"),
            ("f=str", "needs an argument index"),
            ("f=str:0:0", "at least 1"),
            ("f=ustack:0", "at least 1"),
            ("f=ustack:200", "at most 127"),
            ("git:0xzz", "not a file offset"),
            ("usdt:a:b:c:d", "too many"),
            ("usdt:py::x", "empty part"),
            ("usdt:x-y", "unexpected character"),
        ] {
            let e = p(s).expect_err(s).to_string();
            assert!(e.contains(why), "{s:?} gave {e:?}, expected {why:?}");
            assert!(e.starts_with("bad probe spec"), "{e}");
        }
    }
}
