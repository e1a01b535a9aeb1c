//! The reference model: the contract (DESIGN.md rules 1-9) as plain data and loops,
//! with no concurrency, no RCU and no backend — what a registry over the simulator
//! must do, predicted operation by operation and micro-step by micro-step.
//!
//! State: for each address, the *view* (handlers in registration order, each with its
//! enabled flag), whether the breakpoint is armed and the site's hit count; for each
//! handler, its address, exclusivity, whether it has a post hook and its stats; the
//! injected backend failures; and for each CPU the snapshot its deferred step holds.
//!
//! Predictions:
//! * **Operations** (register, batches, unregister, enable, disable): the result (the
//!   error kind included) and the new state. The first enabled handler arms, the last
//!   one to leave or be disabled disarms (rule 1); an arm failure leaves everything as
//!   it was; a disarm failure keeps the site armed, and published with whatever
//!   handlers are left (maybe none), so traps there stay transparent. `unregister`
//!   returns `InsideDispatch` — after unlinking — whenever some CPU of this OS thread
//!   holds a deferred step (rule 3's no-deadlock escape), and when called from a
//!   handler. A handler's enabled state is what hits will do (the view's flag).
//! * **Removal from inside** (`PreAction::Remove`): from the moment a pre-hook asks, the
//!   handler is never called again — not its post or fault hook of that hit, no hook of
//!   a later one — nor counted (hits, misses). The registry forgets it (unregisters it,
//!   disarming a site left without an enabled handler) at the next *collection*: the end
//!   of a dispatch micro-step of CPU 0 (which collects in thread context, through the
//!   dispatcher), or the start of any operation that changes the registry, from a
//!   handler too. Collected most recent request first.
//! * **Micro-steps**: a dispatch at an address with a site counts a site hit and calls
//!   the enabled pre-hooks in registration order, each counting a handler hit, until
//!   one redirects (rule 2); a panicking hook counts a panic and the walk goes on
//!   (rule 8). Post-hooks run later, from the snapshot taken at the dispatch, for the
//!   enabled handlers with a post hook. Fault hooks run in order until one handles the
//!   fault — from the deferred step's snapshot if there is one, else from the current
//!   view (rule 7). A hit from inside a hook runs nothing and counts `missed` for
//!   each enabled handler there (rule 6). A dispatch where no site is published is
//!   not ours; it re-executes iff the byte is no longer a breakpoint.
//! * **Returns** (rule 10, `returns.rs`): per CPU, a return stack of frames — the
//!   entry's stack pointer, the probed address, and per handler whose return is due
//!   its id and the token its pre-hook left — in as many words as the CPU's real one
//!   has. At a dispatch that runs pre-hooks of return handlers: dead frames at the top
//!   dropped (lost), then each such pre that returns normally keeps a record (lost at
//!   once without room, lost at the end on a redirect), and the frame is pushed. At a
//!   return: the frame recorded at its slot, the dead ones above it lost, then the
//!   return hooks of its handlers still registered and not removed, in order, with their
//!   tokens. A CPU that ends loses its frames. Only the handlers still registered count.
//! * **Memory**: every code byte is the program's, except `BRK` where armed (rule 1).
//!
//! Handler *decisions* (redirect, panic, handle a fault, unregister something) are
//! inputs read from the trace; what the core does with them is what is predicted.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use multiprobe_core::{Error, HandlerId, HandlerStats};

use crate::backend::Injection;
use crate::isa::BRK;
use crate::memory::{region, Region};
use crate::program::Program;

mod returns;
mod steps;

/// An [`Error`] reduced to what the model predicts.
#[derive(Clone, Debug, PartialEq, Eq)]
#[allow(missing_docs)]
pub enum ErrKind {
    InvalidAddress,
    Unmapped,
    NotExecutable,
    NotBoundary,
    Unsupported,
    AlreadyBreakpoint,
    Exclusive {
        holder: HandlerId,
        holder_exclusive: bool,
    },
    Unknown(HandlerId),
    InsideDispatch(HandlerId),
    NotFunctionEntry,
    Batch {
        index: usize,
        source: Box<ErrKind>,
    },
    Permission,
    Backend,
    Other(String),
}

impl ErrKind {
    /// Reduce `e`.
    pub fn of(e: &Error) -> ErrKind {
        match e {
            Error::InvalidAddress { .. } => ErrKind::InvalidAddress,
            Error::Unmapped { .. } => ErrKind::Unmapped,
            Error::NotExecutable { .. } => ErrKind::NotExecutable,
            Error::NotInstructionBoundary { .. } => ErrKind::NotBoundary,
            Error::UnsupportedInstruction { .. } => ErrKind::Unsupported,
            Error::AlreadyBreakpoint { .. } => ErrKind::AlreadyBreakpoint,
            Error::ExclusiveConflict {
                holder,
                holder_exclusive,
                ..
            } => ErrKind::Exclusive {
                holder: *holder,
                holder_exclusive: *holder_exclusive,
            },
            Error::UnknownHandler(id) => ErrKind::Unknown(*id),
            Error::InsideDispatch(id) => ErrKind::InsideDispatch(*id),
            Error::NotFunctionEntry { .. } => ErrKind::NotFunctionEntry,
            Error::Batch { index, source } => ErrKind::Batch {
                index: *index,
                source: Box::new(ErrKind::of(source)),
            },
            Error::PermissionDenied(_) => ErrKind::Permission,
            Error::Backend(_) => ErrKind::Backend,
            other => ErrKind::Other(other.to_string()),
        }
    }
}

/// A handler's place in a view.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    id: HandlerId,
    enabled: bool,
}

#[derive(Clone, Debug, Default)]
struct Site {
    handlers: Vec<Entry>,
    armed: bool,
    hits: u64,
}

#[derive(Clone, Copy, Debug)]
struct Info {
    addr: u64,
    exclusive: bool,
}

#[derive(Clone, Debug)]
struct Snapshot {
    addr: u64,
    handlers: Vec<Entry>,
}

/// One handler as the model sees it (for comparing with `Registry::handlers`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelHandler {
    /// Id.
    pub id: HandlerId,
    /// Address.
    pub addr: u64,
    /// Enabled in the current view.
    pub enabled: bool,
    /// Exclusive.
    pub exclusive: bool,
    /// Stats.
    pub stats: HandlerStats,
}

/// One site as the model sees it (for comparing with `Registry::sites`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelSite {
    /// Address.
    pub addr: u64,
    /// Dispatched hits.
    pub hits: u64,
    /// Handlers.
    pub handlers: usize,
    /// Enabled handlers.
    pub enabled: usize,
    /// Breakpoint in place.
    pub armed: bool,
}

/// The reference model. See the module docs.
#[derive(Clone, Debug)]
pub struct Model {
    program: Arc<Program>,
    sites: BTreeMap<u64, Site>,
    index: BTreeMap<HandlerId, Info>,
    has_post: HashMap<HandlerId, bool>,
    has_ret: HashMap<HandlerId, bool>,
    stats: HashMap<HandlerId, HandlerStats>,
    injected: BTreeSet<(Injection, u64)>,
    pending: Vec<Option<Snapshot>>,
    /// Handlers that asked to be removed (for good: never called again).
    removed: BTreeSet<HandlerId>,
    /// Of those, the ones the registry has not collected yet, in request order.
    to_collect: Vec<HandlerId>,
    /// Each CPU's return stack (`returns.rs`).
    stacks: Vec<Vec<returns::MFrame>>,
    /// Each CPU's stack pointer and the word there before its last micro-step
    /// ([`Model::before_step`]): what an entry's return slot held before the core armed
    /// it.
    slot_before: Vec<Option<(u64, u64)>>,
    /// Return hooks called, and returns lost, so far (for coverage).
    pub returns_seen: u32,
    /// See `returns_seen`.
    pub lost_seen: u32,
    /// A handler handled a fault or skipped an instruction (the program's state no
    /// longer matches an unprobed run).
    pub program_changed: bool,
}

/// What a registration asks for, as the model needs it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Kind {
    /// Has a post hook.
    pub post: bool,
    /// Has a return hook.
    pub ret: bool,
    /// `Options::exclusive`.
    pub exclusive: bool,
    /// `Options::disabled`.
    pub disabled: bool,
}

/// The unique id a failed registration would have had (never compared).
const NO_ID: HandlerId = HandlerId(u64::MAX);

impl Model {
    /// An empty registry over `program` with `cpus` CPUs.
    pub fn new(program: Arc<Program>, cpus: usize) -> Self {
        Model {
            program,
            sites: BTreeMap::new(),
            index: BTreeMap::new(),
            has_post: HashMap::new(),
            has_ret: HashMap::new(),
            stats: HashMap::new(),
            injected: BTreeSet::new(),
            pending: vec![None; cpus],
            removed: BTreeSet::new(),
            to_collect: Vec::new(),
            stacks: vec![Vec::new(); cpus],
            slot_before: vec![None; cpus],
            returns_seen: 0,
            lost_seen: 0,
            program_changed: false,
        }
    }

    /// Mirror of `SimBackend::inject`.
    pub fn inject(&mut self, what: Injection, addr: u64, on: bool) {
        if on {
            self.injected.insert((what, addr));
        } else {
            self.injected.remove(&(what, addr));
        }
    }

    /// Mirror of `SimBackend::clear_injections`.
    pub fn clear_injections(&mut self) {
        self.injected.clear();
    }

    /// Handler `id` asked to be removed (its pre-hook returned `Remove`).
    fn request_removal(&mut self, id: HandlerId) {
        if self.removed.insert(id) {
            self.to_collect.push(id);
        }
    }

    /// Whether `id` may still be called and counted: it never asked to be removed.
    fn live(&self, id: HandlerId) -> bool {
        !self.removed.contains(&id)
    }

    /// A collection: the registry forgets the handlers that asked to be removed (as a
    /// guard's drop would: a failed disarm keeps the site, unreported).
    fn collect(&mut self) {
        self.collect_now();
    }

    /// `Registry::collect`: a collection; how many handlers it unregistered.
    pub fn collect_now(&mut self) -> usize {
        let mut n = 0;
        for id in std::mem::take(&mut self.to_collect).into_iter().rev() {
            if self.index.contains_key(&id) {
                let _ = self.remove(id);
                n += 1;
            }
        }
        n
    }

    /// Whether a CPU holds a deferred step (a read section open on this OS thread).
    pub fn held(&self) -> bool {
        self.pending.iter().any(Option::is_some)
    }

    /// Registered handlers, by id.
    pub fn ids(&self) -> Vec<HandlerId> {
        self.index.keys().copied().collect()
    }

    /// The byte at `addr` the model predicts.
    pub fn byte(&self, addr: u64) -> u8 {
        match self.sites.get(&addr) {
            Some(s) if s.armed => BRK,
            _ => self.program.byte(addr),
        }
    }

    /// The program's code bytes as the model predicts them (`BRK` where armed).
    pub fn code(&self) -> Vec<u8> {
        let mut code = self.program.code.clone();
        let base = self.program.code_range().start;
        for (&addr, s) in &self.sites {
            if s.armed {
                code[(addr - base) as usize] = BRK;
            }
        }
        code
    }

    /// Every handler, by id.
    pub fn handlers(&self) -> Vec<ModelHandler> {
        self.index
            .iter()
            .map(|(&id, info)| ModelHandler {
                id,
                addr: info.addr,
                enabled: self.sites[&info.addr]
                    .handlers
                    .iter()
                    .any(|e| e.id == id && e.enabled),
                exclusive: info.exclusive,
                stats: self.stats[&id],
            })
            .collect()
    }

    /// Every site, by address.
    pub fn sites(&self) -> Vec<ModelSite> {
        self.sites
            .iter()
            .map(|(&addr, s)| ModelSite {
                addr,
                hits: s.hits,
                handlers: s.handlers.len(),
                enabled: s.handlers.iter().filter(|e| e.enabled).count(),
                armed: s.armed,
            })
            .collect()
    }

    /// Stats of any handler ever registered.
    pub fn stats(&self, id: HandlerId) -> Option<HandlerStats> {
        self.stats.get(&id).copied()
    }

    // ---- operations -------------------------------------------------------------

    /// What `prepare` refuses, stated on the program.
    fn validate(&self, addr: u64) -> Result<(), ErrKind> {
        match region(addr) {
            Region::Unmapped => return Err(ErrKind::Unmapped),
            Region::Data => return Err(ErrKind::NotExecutable),
            Region::Code => {}
        }
        if !self.program.boundaries.contains(&addr) {
            return Err(ErrKind::NotBoundary);
        }
        if self.program.byte(addr) == BRK {
            return Err(ErrKind::AlreadyBreakpoint);
        }
        if self.injected.contains(&(Injection::Prepare, addr)) {
            return Err(ErrKind::Unsupported);
        }
        Ok(())
    }

    /// Replace the view at `addr` and bring the breakpoint in step (rule 1).
    fn transition(
        &mut self,
        addr: u64,
        old: Option<Site>,
        new: Option<Site>,
    ) -> Result<(), ErrKind> {
        let Some(base) = new.as_ref().or(old.as_ref()) else {
            return Ok(());
        };
        let (armed, hits) = (base.armed, base.hits);
        let want = new
            .as_ref()
            .is_some_and(|s| s.handlers.iter().any(|e| e.enabled));
        let set = |m: &mut Model, s: Option<Site>| match s {
            Some(s) => {
                m.sites.insert(addr, s);
            }
            None => {
                m.sites.remove(&addr);
            }
        };
        if want && !armed {
            if self.injected.contains(&(Injection::Arm, addr)) {
                set(self, old);
                return Err(ErrKind::Permission);
            }
            let mut new = new.expect("want implies a view");
            new.armed = true;
            set(self, Some(new));
        } else if !want && armed {
            if self.injected.contains(&(Injection::Disarm, addr)) {
                let keep = new.unwrap_or(Site {
                    handlers: Vec::new(),
                    armed: true,
                    hits,
                });
                set(self, Some(keep));
                return Err(ErrKind::Backend);
            }
            set(
                self,
                new.map(|mut s| {
                    s.armed = false;
                    s
                }),
            );
        } else {
            set(self, new);
        }
        Ok(())
    }

    fn add(&mut self, addr: u64, id: HandlerId, h: &Kind) -> Result<(), ErrKind> {
        let Kind {
            post,
            ret,
            exclusive,
            disabled,
        } = *h;
        if addr == 0 {
            return Err(ErrKind::InvalidAddress);
        }
        let old = self.sites.get(&addr).cloned();
        match &old {
            Some(s) => {
                if let Some(h) = s.handlers.iter().find(|e| self.index[&e.id].exclusive) {
                    return Err(ErrKind::Exclusive {
                        holder: h.id,
                        holder_exclusive: true,
                    });
                }
                if let (true, Some(first)) = (exclusive, s.handlers.first()) {
                    return Err(ErrKind::Exclusive {
                        holder: first.id,
                        holder_exclusive: false,
                    });
                }
            }
            None => self.validate(addr)?,
        }
        if ret && !self.program.functions.contains(&addr) {
            return Err(ErrKind::NotFunctionEntry);
        }
        let mut new = old.clone().unwrap_or_default();
        new.handlers.push(Entry {
            id,
            enabled: !disabled,
        });
        // Only a failed arm fails a registration: it leaves the old view. A disarm
        // retried on a site an earlier failure kept armed (nothing enabled there, nor
        // by this handler) publishes the new view anyway; the breakpoint stays.
        if let Err(ErrKind::Permission) = self.transition(addr, old, Some(new)) {
            return Err(ErrKind::Permission);
        }
        self.index.insert(id, Info { addr, exclusive });
        self.has_post.insert(id, post);
        self.has_ret.insert(id, ret);
        self.stats.insert(id, HandlerStats::default());
        Ok(())
    }

    /// Unlink `id`; the inner result is the disarm's.
    fn remove(&mut self, id: HandlerId) -> Result<Result<(), ErrKind>, ErrKind> {
        let info = self.index.remove(&id).ok_or(ErrKind::Unknown(id))?;
        let old = self.sites[&info.addr].clone();
        let mut new = old.clone();
        new.handlers.retain(|e| e.id != id);
        let new = (!new.handlers.is_empty()).then_some(new);
        Ok(self.transition(info.addr, Some(old), new))
    }

    fn set_enabled(&mut self, id: HandlerId, on: bool) -> Result<(), ErrKind> {
        let info = *self.index.get(&id).ok_or(ErrKind::Unknown(id))?;
        let old = self.sites[&info.addr].clone();
        if old.handlers.iter().any(|e| e.id == id && e.enabled == on) {
            return Ok(());
        }
        let mut new = old.clone();
        for e in &mut new.handlers {
            if e.id == id {
                e.enabled = on;
            }
        }
        self.transition(info.addr, Some(old), Some(new))
    }

    /// `register_with` of a handler of kind `h`; `real` is what the registry answered.
    /// Returns a divergence.
    pub fn register(
        &mut self,
        addr: u64,
        h: &Kind,
        real: &Result<HandlerId, ErrKind>,
    ) -> Result<(), String> {
        let id = *real.as_ref().unwrap_or(&NO_ID);
        if real.is_ok() && self.stats.contains_key(&id) {
            return Err(format!("register returned {id}, an id already used"));
        }
        self.collect();
        let predicted = self.add(addr, id, h).map(|()| id);
        same("register", &predicted, real)
    }

    /// `register_batch` of `(addr, kind)` items.
    pub fn register_batch(
        &mut self,
        items: &[(u64, Kind)],
        real: &Result<Vec<HandlerId>, ErrKind>,
    ) -> Result<(), String> {
        let ids: Vec<HandlerId> = match real {
            Ok(v) if v.len() == items.len() => v.clone(),
            Ok(v) => {
                return Err(format!(
                    "register_batch: {} ids for {} items",
                    v.len(),
                    items.len()
                ))
            }
            Err(_) => (0..items.len())
                .map(|i| HandlerId(u64::MAX - i as u64))
                .collect(),
        };
        self.collect();
        let fresh: BTreeSet<_> = ids
            .iter()
            .filter(|id| !self.stats.contains_key(id))
            .collect();
        if real.is_ok() && fresh.len() != ids.len() {
            return Err(format!(
                "register_batch returned {ids:?}: not all new and distinct"
            ));
        }
        let mut added = Vec::new();
        let mut predicted = Ok(ids.clone());
        for (index, ((addr, kind), &id)) in items.iter().zip(&ids).enumerate() {
            match self.add(*addr, id, kind) {
                Ok(()) => added.push(id),
                Err(source) => {
                    for &id in added.iter().rev() {
                        // A rollback's disarm failure leaves a transparent site; ignored.
                        let _ = self.remove(id);
                        self.stats.remove(&id);
                        self.has_post.remove(&id);
                        self.has_ret.remove(&id);
                    }
                    predicted = Err(ErrKind::Batch {
                        index,
                        source: Box::new(source),
                    });
                    break;
                }
            }
        }
        // An exclusive conflict with an earlier item of a failed batch names that
        // item's id, which the registry allocated but never returned: accept any id the
        // model has not seen for it.
        if let (
            Err(ErrKind::Batch {
                index: pi,
                source: ps,
            }),
            Err(ErrKind::Batch {
                index: ri,
                source: rs,
            }),
        ) = (&mut predicted, real)
        {
            if let (ErrKind::Exclusive { holder: p, .. }, ErrKind::Exclusive { holder: r, .. }) =
                (&mut **ps, &**rs)
            {
                if pi == ri && ids.contains(p) && !self.stats.contains_key(r) {
                    *p = *r;
                }
            }
        }
        same("register_batch", &predicted, real)
    }

    /// `unregister` from the driver's thread.
    pub fn unregister(
        &mut self,
        id: HandlerId,
        real: &Result<HandlerStats, ErrKind>,
    ) -> Result<(), String> {
        self.collect();
        let held = self.held();
        let predicted = match self.remove(id) {
            Err(e) => Err(e),
            Ok(_) if held => Err(ErrKind::InsideDispatch(id)),
            Ok(Err(e)) => Err(e),
            Ok(Ok(())) => Ok(self.stats[&id]),
        };
        same("unregister", &predicted, real)
    }

    /// `unregister_batch` from the driver's thread.
    pub fn unregister_batch(
        &mut self,
        ids: &[HandlerId],
        real: &Result<Vec<HandlerStats>, ErrKind>,
    ) -> Result<(), String> {
        self.collect();
        let mut seen = BTreeSet::new();
        let predicted = if let Some(&bad) = ids
            .iter()
            .find(|&&id| !seen.insert(id) || !self.index.contains_key(&id))
        {
            Err(ErrKind::Unknown(bad))
        } else {
            let mut first_err = None;
            for &id in ids {
                if let Err(e) = self.remove(id).expect("checked above") {
                    first_err.get_or_insert(e);
                }
            }
            match (ids.first(), first_err) {
                (None, _) => Ok(Vec::new()),
                (Some(&first), _) if self.held() => Err(ErrKind::InsideDispatch(first)),
                (_, Some(e)) => Err(e),
                (_, None) => Ok(ids.iter().map(|id| self.stats[id]).collect()),
            }
        };
        same("unregister_batch", &predicted, real)
    }

    /// A guard's drop: unlink without waiting or answering.
    pub fn unregister_silently(&mut self, id: HandlerId) {
        self.collect();
        let _ = self.remove(id);
    }

    /// `enable` or `disable`.
    pub fn set(
        &mut self,
        id: HandlerId,
        on: bool,
        real: &Result<(), ErrKind>,
    ) -> Result<(), String> {
        self.collect();
        let predicted = self.set_enabled(id, on);
        same(if on { "enable" } else { "disable" }, &predicted, real)
    }
}

fn same<T: PartialEq + std::fmt::Debug>(
    what: &str,
    predicted: &Result<T, ErrKind>,
    real: &Result<T, ErrKind>,
) -> Result<(), String> {
    let equal = match (predicted, real) {
        (Ok(a), Ok(b)) => a == b,
        (Err(a), Err(b)) => a == b,
        _ => false,
    };
    if equal {
        Ok(())
    } else {
        Err(format!(
            "{what}: core returned {real:?}, model predicted {predicted:?}"
        ))
    }
}
