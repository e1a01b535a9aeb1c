//! The handlers behind each action of a probe spec.
//!
//! With the ptrace backend handlers run on the tracer thread, in ordinary thread
//! context, so they may format and write. They must be quick all the same: the traced
//! thread waits while they run. That is why output is rate limited ([`Sink`]). A plain
//! `count` does nothing at all (the registry counts every handler's hits): it reads no
//! register and takes no lock, so none of the other actions costs it anything.
//!
//! [`request`] is the one place an action becomes a registration: an action that needs
//! something else than a closure-like handler (one that collects in the tracee, a
//! return probe) is decided there.
//!
//! What a row keeps across registrations (an `exec` or `dlclose` ends one, the next
//! placement makes another) is its [`RowState`]: hits its conditions filtered out, and
//! the values and stacks it counted.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use multiprobe_backend_ptrace::collect::{Collect, CollectStats};
use multiprobe_core::{Gpr, Handler, Hit, PreAction, Request};
use multiprobe_symbols::{UsdtArg, UsdtLoc};

use crate::collected::Collected;
use crate::lines::{self, args_line, mem_lines, regs_line, stack_lines, str_line, Who};
use crate::report::{Counted, Frame, Top, TOP};
use crate::sink::Sink;
use crate::spec::{Action, Cond, Key};
use crate::ustack::Stacks;

/// At most this many distinct values (or stacks) are kept per row; the rest are
/// counted under one `(other)` entry.
pub const MAX_DISTINCT: usize = 65_536;
/// The key `(other)` is counted under.
const OTHER: &str = "(other)";

/// Stacks counted: by their return addresses, the count and the frames symbolised
/// when the stack was first seen.
type StackCounts = HashMap<Vec<u64>, (u64, Vec<Frame>)>;

/// What a row keeps across its registrations.
#[derive(Debug, Default)]
pub struct RowState {
    /// Hits where the spec's conditions did not hold.
    pub filtered: AtomicU64,
    keys: Mutex<HashMap<u64, u64>>,
    strs: Mutex<HashMap<String, u64>>,
    other: AtomicU64,
    stacks: Mutex<StackCounts>,
    /// The `latency` histogram (`crate::returning`).
    pub latency: crate::returning::Latency,
    /// The collectors of every registration of the row (`crate::collected`): its hits
    /// are theirs, whichever path their site took.
    collects: Mutex<Vec<Collect>>,
}

impl RowState {
    fn add_collect(&self, c: &Collect) {
        self.collects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(c.clone());
    }

    /// The counters of the row's collectors, summed; `None` if it has none (its
    /// handlers are closures, counted by the registry).
    pub fn collect_stats(&self) -> Option<CollectStats> {
        let c = self.collects.lock().unwrap_or_else(|p| p.into_inner());
        (!c.is_empty()).then(|| {
            c.iter()
                .map(Collect::stats)
                .fold(CollectStats::default(), |a, b| a + b)
        })
    }

    /// The `latency` histogram: the return hooks' (one-stop path, `--stop`) and the
    /// row's collectors' (counted in the tracee), together.
    pub fn latency(&self) -> crate::returning::Hist {
        let c = self.collects.lock().unwrap_or_else(|p| p.into_inner());
        let hists: Vec<_> = c.iter().map(Collect::histogram).collect();
        self.latency.snapshot_with(&hists)
    }

    fn count_key(&self, k: u64) {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let n = keys.len();
        match keys.get_mut(&k) {
            Some(c) => *c += 1,
            None if n < MAX_DISTINCT => {
                keys.insert(k, 1);
            }
            None => {
                self.other.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn count_str(&self, k: String) {
        let mut strs = self.strs.lock().unwrap_or_else(|p| p.into_inner());
        let n = strs.len();
        match strs.get_mut(&k) {
            Some(c) => *c += 1,
            None if n < MAX_DISTINCT => {
                strs.insert(k, 1);
            }
            None => {
                self.other.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Count one hit with the stack `addrs`; `frames` symbolises it the first time.
    fn count_stack(&self, addrs: Vec<u64>, frames: impl FnOnce(&[u64]) -> Vec<Frame>) {
        let mut stacks = self.stacks.lock().unwrap_or_else(|p| p.into_inner());
        let n = stacks.len();
        match stacks.get_mut(&addrs) {
            Some(c) => c.0 += 1,
            None if n < MAX_DISTINCT / 8 => {
                let f = frames(&addrs);
                stacks.insert(addrs, (1, f));
            }
            None => {
                self.other.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// The most frequent values of a `count:KEY` row, shown as `key` shows them.
    pub fn top_keys(&self, key: Key) -> Top<String> {
        let mut all: Vec<(String, u64)> = if let Key::Str(_) = key {
            let strs = self.strs.lock().unwrap_or_else(|p| p.into_inner());
            strs.iter().map(|(k, &c)| (k.clone(), c)).collect()
        } else {
            let keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            let show = |k: u64| match key {
                Key::Arg(_) => format!("{k:#x}"),
                _ => k.to_string(),
            };
            keys.iter().map(|(&k, &c)| (show(k), c)).collect()
        };
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        let mut top: Vec<Counted<String>> = all
            .iter()
            .take(TOP)
            .map(|(k, count)| Counted {
                what: k.clone(),
                count: *count,
            })
            .collect();
        let other = self.other.load(Ordering::Relaxed);
        if other > 0 {
            top.push(Counted {
                what: OTHER.into(),
                count: other,
            });
        }
        Top {
            distinct: all.len() as u64 + u64::from(other > 0),
            top,
        }
    }

    /// The most frequent stacks of a `ustack` or `count:ustack` row.
    pub fn top_stacks(&self) -> Top<Vec<Frame>> {
        let stacks = self.stacks.lock().unwrap_or_else(|p| p.into_inner());
        let mut all: Vec<&(u64, Vec<Frame>)> = stacks.values().collect();
        all.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        let other = self.other.load(Ordering::Relaxed);
        let mut top: Vec<Counted<Vec<Frame>>> = all
            .iter()
            .take(TOP)
            .map(|(count, frames)| Counted {
                what: frames.clone(),
                count: *count,
            })
            .collect();
        if other > 0 {
            top.push(Counted {
                what: vec![Frame {
                    addr: 0,
                    symbol: Some(OTHER.into()),
                }],
                count: other,
            });
        }
        Top {
            distinct: all.len() as u64 + u64::from(other > 0),
            top,
        }
    }
}

/// Where a probe's arguments are: the System V calling convention at a function's
/// entry, or a USDT probe's own argument specs.
#[derive(Clone, Debug)]
pub enum Args {
    /// `rdi`, `rsi`, `rdx`, `rcx`, `r8`, `r9`, then the stack.
    Abi,
    /// The note's arguments (one may not parse: its error).
    Usdt(Arc<[Result<UsdtArg, String>]>),
}

impl Args {
    /// Argument `n` at `hit`.
    pub fn get(&self, hit: &Hit<'_>, n: usize) -> Result<u64, String> {
        match self {
            Args::Abi => hit.arg(n).map_err(|e| e.to_string()),
            Args::Usdt(specs) => match specs.get(n) {
                None => Err(format!("the probe has {} argument(s)", specs.len())),
                Some(Err(e)) => Err(e.clone()),
                Some(Ok(a)) => usdt_arg(hit, a),
            },
        }
    }
}

fn reg(hit: &Hit<'_>, name: &str) -> u64 {
    let r = hit.regs();
    if name == "rip" {
        return hit.addr();
    }
    Gpr::ALL
        .into_iter()
        .find(|g| g.name() == name)
        .map_or(0, |g| r.gpr(g))
}

fn usdt_arg(hit: &Hit<'_>, a: &UsdtArg) -> Result<u64, String> {
    let raw = match &a.loc {
        UsdtLoc::Reg { reg: r, shift } => reg(hit, r) >> shift,
        UsdtLoc::Imm(v) => *v as u64,
        UsdtLoc::Mem {
            base,
            index,
            scale,
            disp,
        } => {
            let addr = (*disp as u64)
                .wrapping_add(base.map_or(0, |b| reg(hit, b)))
                .wrapping_add(
                    index
                        .map_or(0, |i| reg(hit, i))
                        .wrapping_mul(u64::from(*scale)),
                );
            let mut b = [0u8; 8];
            hit.mem()
                .read(addr, &mut b[..usize::from(a.size)])
                .map_err(|e| e.to_string())?;
            u64::from_le_bytes(b)
        }
        UsdtLoc::Symbol { name, .. } => {
            return Err(format!(
                "an argument at a symbol's address ({name}) is not supported"
            ))
        }
    };
    Ok(a.extend(raw))
}

/// What the handlers of one spec at one site share: its conditions and where its
/// arguments are.
#[derive(Debug)]
pub struct SiteCtx {
    /// The spec's conditions.
    pub filters: Vec<Cond>,
    /// Its arguments.
    pub args: Args,
}

impl SiteCtx {
    /// Whether every condition holds at `hit` (an argument that cannot be read fails
    /// its condition).
    pub(crate) fn passes(&self, hit: &Hit<'_>) -> bool {
        self.filters.iter().all(|c| {
            self.args
                .get(hit, usize::from(c.arg))
                .is_ok_and(|v| c.holds(v))
        })
    }
}

/// Everything one action's handler needs.
#[derive(Clone, Debug)]
pub struct Binding {
    /// The action.
    pub action: Action,
    /// How the site is shown in lines (`libc.so.6:malloc`).
    pub label: Arc<str>,
    /// The process (for lines: the registry is one process's).
    pub pid: i32,
    /// The spec's conditions and arguments here.
    pub ctx: Arc<SiteCtx>,
    /// The row's state.
    pub state: Arc<RowState>,
    /// The process's stacks (for `ustack` and `count:ustack`).
    pub stacks: Arc<Stacks>,
    /// Output.
    pub sink: Arc<Sink>,
    /// Per-hit lines show the time (`-T`).
    pub time: bool,
    /// Where collecting actions print their records; `None` with `--stop` (every
    /// action is then a closure on the one-stop path).
    pub collected: Option<Arc<Collected>>,
}

/// The registration of one action at `addr`.
pub fn request(addr: u64, binding: Binding) -> Request {
    if let Some(collected) = &binding.collected {
        if let Some(c) = crate::collected::collector(binding.action, &binding.ctx) {
            collected.add(&c, &binding);
            binding.state.add_collect(&c);
            return Request::handler(addr, c);
        }
    }
    if binding.action.at_return() {
        return crate::returning::request(addr, binding);
    }
    Request::handler(addr, ActionHandler { b: binding })
}

/// A `hit` record of `--json`: the fields every hit has, then the action's.
pub(crate) fn hit_json(
    pid: i32,
    tid: u32,
    site: u64,
    label: &str,
    action: Action,
    now: SystemTime,
    fields: serde_json::Value,
) -> String {
    let mut v = serde_json::json!({
        "type": "hit",
        "time": lines::epoch_seconds(now),
        "pid": pid,
        "tid": tid,
        "site": format!("{site:#x}"),
        "symbol": label,
        "action": action.to_string(),
    });
    if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), fields) {
        obj.extend(extra);
    }
    v.to_string()
}

/// One action of one probe: a handler.
#[derive(Debug)]
pub struct ActionHandler {
    b: Binding,
}

impl ActionHandler {
    fn who(&self, hit: &Hit<'_>, now: SystemTime) -> Who {
        Who {
            pid: self.b.pid,
            tid: hit.tid(),
            time: self.b.time.then_some(now),
        }
    }

    /// A `hit` record: the fields every hit has, then the action's.
    fn json_line(&self, hit: &Hit<'_>, now: SystemTime, fields: serde_json::Value) -> String {
        let b = &self.b;
        hit_json(
            b.pid,
            hit.tid(),
            hit.addr(),
            &b.label,
            b.action,
            now,
            fields,
        )
    }

    fn arg(&self, hit: &Hit<'_>, n: u8) -> Result<u64, String> {
        self.b.ctx.args.get(hit, usize::from(n))
    }

    fn stack(&self, hit: &Hit<'_>, depth: u8) -> Result<Vec<Frame>, String> {
        let addrs = self.b.stacks.addresses(hit, usize::from(depth))?;
        let mut frames = None;
        self.b.state.count_stack(addrs.clone(), |a| {
            let f = self.b.stacks.symbolise(a);
            frames = Some(f.clone());
            f
        });
        Ok(frames.unwrap_or_else(|| self.b.stacks.symbolise(&addrs)))
    }

    /// Read the NUL-terminated string at `addr`, at most `max` bytes, page by page (a
    /// string that ends just before an unmapped page is read whole). `Ok((bytes,
    /// cut))`: `cut` when `max` bytes came and the string goes on.
    fn read_str(hit: &Hit<'_>, addr: u64, max: u16) -> Result<(Vec<u8>, bool), String> {
        // One byte past `max`, to tell a string of exactly `max` bytes from a longer one.
        let limit = usize::from(max) + 1;
        let mut out = Vec::new();
        let mut at = addr;
        while out.len() < limit {
            let to_page_end = (4096 - (at % 4096)) as usize;
            let n = to_page_end.min(limit - out.len());
            let mut buf = vec![0u8; n];
            if let Err(e) = hit.mem().read(at, &mut buf) {
                if out.is_empty() {
                    return Err(e.to_string());
                }
                if out.len() == limit - 1 {
                    return Ok((out, true)); // `max` bytes, then unreadable: cut there
                }
                return Err(format!("unreadable after {} bytes ({e})", out.len()));
            }
            if let Some(end) = buf.iter().position(|&b| b == 0) {
                out.extend_from_slice(&buf[..end]);
                return Ok((out, false));
            }
            out.extend_from_slice(&buf);
            at += n as u64;
        }
        out.truncate(limit - 1);
        Ok((out, true))
    }
}

impl Handler for ActionHandler {
    fn pre(&self, hit: &mut Hit<'_>) -> PreAction {
        let b = &self.b;
        if !b.ctx.filters.is_empty() && !b.ctx.passes(hit) {
            b.state.filtered.fetch_add(1, Ordering::Relaxed);
            return PreAction::Continue;
        }
        let label = &*b.label;
        match b.action {
            // Every handler is counted by the registry; counting needs nothing more.
            Action::Count => {}
            Action::CountBy(key) => match key {
                Key::Tid => b.state.count_key(u64::from(hit.tid())),
                Key::Pid => b.state.count_key(b.pid as u64),
                Key::Arg(n) => {
                    if let Ok(v) = self.arg(hit, n) {
                        b.state.count_key(v);
                    }
                }
                Key::Str(n) => {
                    let key = match self.arg(hit, n) {
                        Ok(0) => "(null)".to_string(),
                        Ok(a) => match Self::read_str(hit, a, 64) {
                            Ok((bytes, cut)) => lines::quoted(&bytes, cut),
                            Err(_) => format!("(unreadable {a:#x})"),
                        },
                        Err(_) => "(no argument)".to_string(),
                    };
                    b.state.count_str(key);
                }
                Key::Ustack => {
                    if let Ok(addrs) = b
                        .stacks
                        .addresses(hit, usize::from(crate::spec::DEFAULT_DEPTH))
                    {
                        b.state.count_stack(addrs, |a| b.stacks.symbolise(a));
                    }
                }
            },
            Action::Args(n) => b.sink.hit_line(|| {
                let now = SystemTime::now();
                let args: Vec<Result<u64, String>> = (0..n).map(|i| self.arg(hit, i)).collect();
                if b.sink.json() {
                    let vals: Vec<serde_json::Value> = args
                        .iter()
                        .map(|a| match a {
                            Ok(v) => serde_json::Value::String(format!("{v:#x}")),
                            Err(_) => serde_json::Value::Null,
                        })
                        .collect();
                    self.json_line(hit, now, serde_json::json!({ "args": vals }))
                } else {
                    args_line(&self.who(hit, now), label, &args)
                }
            }),
            Action::Regs => b.sink.hit_line(|| {
                let now = SystemTime::now();
                if b.sink.json() {
                    let m = lines::regs_json(hit.regs());
                    self.json_line(hit, now, serde_json::json!({ "regs": m }))
                } else {
                    regs_line(&self.who(hit, now), label, hit.regs())
                }
            }),
            Action::Mem { arg, len } => b.sink.hit_line(|| {
                let now = SystemTime::now();
                let (addr, bytes) = match self.arg(hit, arg) {
                    Ok(a) => {
                        let mut buf = vec![0u8; usize::from(len)];
                        let r = hit
                            .mem()
                            .read(a, &mut buf)
                            .map(|()| buf)
                            .map_err(|e| e.to_string());
                        (a, r)
                    }
                    Err(e) => (0, Err(e)),
                };
                if b.sink.json() {
                    let m = lines::mem_json(addr, len, bytes.as_deref().map_err(String::as_str));
                    self.json_line(hit, now, serde_json::json!({ "mem": m }))
                } else {
                    mem_lines(
                        &self.who(hit, now),
                        label,
                        arg,
                        addr,
                        bytes.as_deref().map_err(Clone::clone),
                    )
                }
            }),
            Action::Str { arg, max } => b.sink.hit_line(|| {
                let now = SystemTime::now();
                let (addr, value) = match self.arg(hit, arg) {
                    Ok(0) => (0, Err("null pointer".to_string())),
                    Ok(a) => (a, Self::read_str(hit, a, max)),
                    Err(e) => (0, Err(e)),
                };
                if b.sink.json() {
                    let mut m = serde_json::json!({ "addr": format!("{addr:#x}") });
                    match &value {
                        Ok((bs, cut)) => {
                            m["value"] = String::from_utf8_lossy(bs).into_owned().into();
                            m["truncated"] = (*cut).into();
                        }
                        Err(e) => m["error"] = e.clone().into(),
                    }
                    self.json_line(hit, now, serde_json::json!({ "str": m }))
                } else {
                    let v = value
                        .as_ref()
                        .map(|(bs, cut)| (bs.as_slice(), *cut))
                        .map_err(Clone::clone);
                    str_line(&self.who(hit, now), label, arg, addr, v)
                }
            }),
            // Registered as `crate::returning::RetHandler` (`request`).
            Action::Ret | Action::Latency | Action::Call(_) => {}
            Action::Ustack { depth } => {
                // Counted for the summary even when the line is dropped by the limit.
                let stack = self.stack(hit, depth);
                b.sink.hit_line(|| {
                    let now = SystemTime::now();
                    if b.sink.json() {
                        let v = match &stack {
                            Ok(f) => serde_json::json!({ "ustack": f }),
                            Err(e) => serde_json::json!({ "ustack": [], "error": e }),
                        };
                        self.json_line(hit, now, v)
                    } else {
                        let (frames, note) = match &stack {
                            Ok(f) => (f.as_slice(), None),
                            Err(e) => (&[][..], Some(e.as_str())),
                        };
                        stack_lines(&self.who(hit, now), label, frames, note)
                    }
                })
            }
        }
        PreAction::Continue
    }
}
