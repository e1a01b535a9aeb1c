//! Collecting in the tracee: handlers that are values ([`Collect`]), not closures,
//! so the backend can run them without a stop.
//!
//! ```no_run
//! # use multiprobe_backend_ptrace::{Tracer, collect::Collect};
//! # fn demo(tracer: &mut Tracer, addr: u64) -> multiprobe_core::Result<()> {
//! let count = Collect::count();
//! let args = Collect::args(2).expect("1..=6");
//! let _c = tracer.registry().register_handler(addr, count.clone())?;
//! let _a = tracer.registry().register_handler(addr, args.clone())?;
//! tracer.run()?;
//! println!("{} hits", count.stats().hits);
//! for r in args.take_records() {
//!     println!("thread {} at {} ns: {:?}", r.tid, r.time_ns, r.data);
//! }
//! # Ok(()) }
//! ```
//!
//! # Paths
//!
//! A `Collect` is a [`multiprobe_core::Handler`]: on the one-stop path (a site that
//! also has a closure, a return hook other than a [`Collect::ret`], or that cannot be
//! promoted) its `pre` collects in the tracer, with the stopped thread's registers and
//! memory, and a [`Collect::ret`]'s return hook runs at the one-stop return. Counters
//! and records are the same whichever path a site takes.
//!
//! # Returns in the tracee
//!
//! A [`Collect::ret`] at a promoted site pairs entries and returns without a stop
//! (`multiprobe_x86::collect`, "Returns"): shadow stacks in the tracee (`shadow.rs`,
//! mapped at the first hit of such a site), the site's return code in its trampoline,
//! a live word per collector, cleared by `unregister` (the backend's `quiesce`) for
//! collectors that left their site (calls in flight then return unobserved, and
//! `unregister` waits for threads inside a return code as for the action code); a
//! disable alone clears nothing, so its calls in flight still return observed. The unwinder hooks of
//! `returns.rs` put the original return addresses back around C++ exceptions and
//! `backtrace`; detach and a fork child freed of probes put them back for good.
//! Calls in flight when the image ends (exit, `exec`, detach) count in `returns_lost`
//! at that final drain; those of a thread that ended inside them, when the tracer sees
//! the thread's exit (its shadow-stack block is freed then). A disabled collector still
//! sees the returns of its calls in flight (rule 10) until it is unregistered. The
//! difference from the one-stop path: at most two `ret` collectors share a site.
//!
//! # How the backend sees collectors
//!
//! The core tells the backend every change of a site's enabled handlers
//! ([`multiprobe_core::backend::Backend::handlers_changed`], under the registry's
//! lock); the backend recognises its `Collect` values through
//! [`multiprobe_core::Handler::as_any`], binds each one to this process (a counter
//! slot of the process's area, its handler id) at its first registration, and notes
//! per site whether every enabled handler is a collector (and none has a return hook
//! but a [`Collect::ret`]) or why not.
//!
//! # The area
//!
//! Memory shared between the tracee and the tracer (a memfd both map, see `area.rs`),
//! made at the first hit of a site with a collector, on the tracer thread. A failure
//! (seccomp, `ENOSYS`) is kept as the reason the process's collectors stay on the
//! one-stop path. Detach unmaps it in the tracee; a fork child freed of our probes has
//! its copy unmapped; an exec takes it with the old image.
//!
//! # Promotion, and registration changes
//!
//! The tracer thread promotes between events ([`Tracer::run_until`]'s loop), with every
//! thread of the process stopped (see `promote.rs` for the protocol and its
//! invariants). A promoted site makes no event: a loop that must notice a condition
//! meanwhile needs a wake-up ([`crate::DetachHandle::wake`], the command's ticker).
//! A registration change at a promoted site (from any thread) writes an `int3` over
//! the jump at once — later hits stop and run the new list in the tracer — and wakes
//! the loop, which points the jump at a new trampoline for the new list (or puts the
//! original bytes back when no collector is left). Rule 3: `unregister` returns once
//! the tracer has stopped every thread after the change and let those in the old
//! trampoline's actions finish them (`quiet.rs`), so no record of the handler comes
//! after it.
//!
//! # Unloaded code
//!
//! A promoted site's jump goes with its code: after a `dlclose` the tracer forgets it
//! without writing anything where it was (also when the same library is loaded again
//! at the same address), and a site placed in the reloaded library is promoted like a
//! new one.
//!
//! # Threads
//!
//! Everything here is `Send + Sync`: [`Collect::stats`], [`Collect::take_records`]
//! and [`Collection::drain`] may be called from any thread while the tracer loop runs
//! on its own. A promoted collector's counters and records reach it at each drain:
//! drain before reading them.
//!
//! # Limits
//!
//! * Records name threads by their fs base, mapped to thread ids as threads are seen
//!   (promotion, clone events); a thread that sets its own fs base later
//!   (`arch_prctl`) is misnamed.
//! * A thread that a signal handler took out of a trampoline and that returns into it
//!   after a detach finds it unmapped.
//! * While a site's change waits for the tracer, post and return hooks registered there
//!   do not run yet.

mod area;
mod clock;
mod handler;
mod promote;
mod quiet;
mod reader;
mod shadow;
mod sweep;

pub use handler::{
    Action, Collect, CollectStats, LatencyHist, Record, RecordData, HIST_BUCKETS, MEM_MAX,
    QUEUE_CAP,
};

pub use reader::Collection;

use handler::Binding;
pub(crate) use promote::{Jumped, TrampolinePages};
pub(crate) use quiet::Quiet;
pub(crate) use shadow::{for_calls, Put, ShadowState};

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use multiprobe_x86::collect::{AreaLayout, CollectMap, ThreadId};

use multiprobe_core::{Handler, HandlerId};

use crate::sys::{Tid, UserRegs};
use crate::tracer::Tracer;

/// Ring cells of a process's area (256 bytes each: 16 MiB). A drain every 50 ms
/// keeps up with a million records a second.
pub(crate) const RING_CELLS: u32 = 1 << 16;
/// Counter slots: collectors bound in one image.
pub(crate) const COUNTER_SLOTS: u32 = 4096;

/// A process's area: where it is in the tracee, the tracer's mapping, and what the
/// reader needs (its layout, its clock).
#[derive(Clone, Debug)]
pub(crate) struct Area {
    pub(crate) tracee: u64,
    pub(crate) map: Arc<area::Mapping>,
    pub(crate) layout: AreaLayout,
    /// The reader's lock (one consumer) and its TSC calibration.
    pub(crate) clock: Arc<Mutex<clock::Clock>>,
}

/// The area of the current image, as far as it got.
#[derive(Debug, Default)]
pub(crate) enum AreaState {
    /// Not needed yet.
    #[default]
    NotTried,
    /// It could not be made: why.
    Failed(String),
    Mapped(Area),
}

/// Per-process collecting state (inside the backend's `State`).
#[derive(Debug, Default)]
pub(crate) struct Procs {
    pub(crate) area: AreaState,
    /// Counter slot → its collector.
    pub(crate) slots: Vec<Weak<handler::Inner>>,
    /// Site index (written into records) → address.
    pub(crate) sites: Vec<u64>,
    /// fs base → thread.
    pub(crate) threads: reader::Threads,
    /// How the generated code reads the thread's fs base, once known.
    pub(crate) thread_id: Option<ThreadId>,
    /// Sites whose text holds our jump (`promote.rs`).
    pub(crate) jumped: HashMap<u64, Jumped>,
    /// Every trampoline built in this image.
    pub(crate) trampolines: Vec<CollectMap>,
    pub(crate) pages: TrampolinePages,
    /// Sites whose handlers changed since the tracer last looked.
    pub(crate) dirty: HashSet<u64>,
    /// After a rework cut short by its time budget, the next one waits until then:
    /// the program runs at least as long as it was held.
    pub(crate) rework_after: Option<std::time::Instant>,
    /// The shadow stacks of `ret` collectors (`shadow.rs`).
    pub(crate) shadow: ShadowState,
    /// `ret` collectors that left their sites and still see the returns of their
    /// calls in flight ([`retire_rets`]).
    pub(crate) retiring: Vec<Retiring>,
}

/// A `ret` collector that left its site (disabled or unregistered): the live word of
/// its counter slot stays set, so calls that entered before see their returns (rule
/// 10), until it is unregistered and a `quiesce` clears it ([`quiesce_rets`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Retiring {
    pub(crate) slot: u32,
    pub(crate) id: HandlerId,
    /// Unregistered (told by `handler_removed`), not only disabled.
    pub(crate) removed: bool,
}

impl Procs {
    /// The index records of `addr` carry.
    pub(crate) fn site_index(&mut self, addr: u64) -> u32 {
        match self.sites.iter().position(|&a| a == addr) {
            Some(i) => i as u32,
            None => {
                self.sites.push(addr);
                self.sites.len() as u32 - 1
            }
        }
    }

    /// A new image (exec) or a freed copy: nothing of the old one is in it. The
    /// collectors' bindings stay (their records of the old image were drained).
    pub(crate) fn forget_image(&mut self) {
        self.area = AreaState::NotTried;
        // The old image's collectors keep the counts of its last drain; left in the
        // table, the new area's (unused, zero) counters at their slots would be
        // copied over them at the next drain.
        self.slots.clear();
        self.sites.clear();
        self.threads = Default::default();
        self.jumped.clear();
        self.trampolines.clear();
        self.pages.clear();
        self.dirty.clear();
        self.shadow = ShadowState::NotTried;
        self.retiring.clear();
    }
}

/// What a site's enabled handlers ask of the collecting machinery.
#[derive(Debug, Default, Clone)]
pub(crate) enum Wanted {
    /// No collector among them.
    #[default]
    None,
    /// Every one is a collector of this process, in order.
    All(Vec<(HandlerId, Collect)>),
    /// Some are collectors, but the site needs the one-stop path: why.
    Mixed(String),
}

/// Per-site collecting state (inside the backend's site).
#[derive(Debug, Default)]
pub(crate) struct SiteCollect {
    pub(crate) wanted: Wanted,
    /// The path the tracer last gave it.
    pub(crate) path: Option<SitePath>,
    /// Whether it waits for its first hit to be promoted (`promote.rs`, EAGER_SITES).
    pub(crate) heat: Heat,
}

/// When a collecting site is promoted: the first EAGER_SITES of an image at once, the
/// others at their first hit (with `-p 'libc:*'` most functions are never called, and
/// the ones that are called are the ones worth a jump).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum Heat {
    /// Not looked at yet, or within the eager budget.
    #[default]
    Unknown,
    /// Beyond the budget and not hit yet: the stop path until its first hit.
    Cold,
    /// Hit since it was found cold: promoted whatever the budget.
    Hit,
}

impl SiteCollect {
    pub(crate) fn has_collectors(&self) -> bool {
        !matches!(self.wanted, Wanted::None)
    }

    /// Whether it runs a `ret` or `latency` collector in the tracee (no allocation:
    /// asked at every stop of the site).
    pub(crate) fn has_ret_collectors(&self) -> bool {
        matches!(&self.wanted, Wanted::All(cols) if cols.iter().any(|(_, c)| c.action().at_return()))
    }

    /// The `ret` collectors it runs in the tracee, with their counter slots.
    pub(crate) fn ret_collectors(&self) -> Vec<(HandlerId, u32)> {
        match &self.wanted {
            Wanted::All(cols) => cols
                .iter()
                .filter(|(_, c)| c.action().at_return())
                .filter_map(|(id, c)| c.0.bound.get().map(|b| (*id, b.slot)))
                .collect(),
            _ => Vec::new(),
        }
    }
}

/// `handlers_changed` at a site: the `ret` collectors that ran there (`before`) and no
/// longer do (disabled or unregistered) are noted; calls in flight still see their
/// returns (rule 10: a disable breaks no pair). One that is back (enabled again) is
/// no longer retiring.
pub(crate) fn retire_rets(procs: &mut Procs, before: &[(HandlerId, u32)], now: &SiteCollect) {
    let still = now.ret_collectors();
    procs.retiring.retain(|r| !still.contains(&(r.id, r.slot)));
    for &(id, slot) in before.iter().filter(|c| !still.contains(c)) {
        if !procs.retiring.iter().any(|r| r.id == id) {
            procs.retiring.push(Retiring {
                slot,
                id,
                removed: false,
            });
        }
    }
}

/// `handler_removed`: collector `id`, if it is retiring, was unregistered: its calls
/// in flight return unobserved after the next `quiesce`.
pub(crate) fn removed_ret(procs: &mut Procs, id: HandlerId) {
    for r in procs.retiring.iter_mut().filter(|r| r.id == id) {
        r.removed = true;
    }
}

/// `unregister`'s wait (the backend's `quiesce`), before it waits for the tracer: the
/// unregistered `ret` collectors stop seeing returns, so calls still in flight
/// return unobserved (rule 10's quiescence). True if any did: the caller must then let
/// the tracer run threads out of the return code once more. Disabled ones keep
/// seeing the returns of their calls in flight.
pub(crate) fn quiesce_rets(procs: &mut Procs) -> bool {
    let AreaState::Mapped(area) = &procs.area else {
        procs.retiring.retain(|r| !r.removed);
        return false;
    };
    let mut any = false;
    for r in procs.retiring.iter().filter(|r| r.removed) {
        reader::set_live(area, r.slot, false);
        any = true;
    }
    procs.retiring.retain(|r| !r.removed);
    any
}

/// The backend's side of `handlers_changed`: bind the collectors among `enabled` to
/// process `pid` (slots from `procs`) and say what the site wants.
pub(crate) fn classify(
    pid: i32,
    procs: &mut Procs,
    enabled: &[(HandlerId, &dyn Handler)],
) -> Wanted {
    let mut cols = Vec::new();
    let mut why = None;
    for &(id, h) in enabled {
        match h.as_any().and_then(|a| a.downcast_ref::<Collect>()) {
            Some(c) => {
                let b = *c.0.bound.get_or_init(|| {
                    procs.slots.push(std::sync::Arc::downgrade(&c.0));
                    Binding {
                        pid,
                        slot: procs.slots.len() as u32 - 1,
                        id,
                    }
                });
                if b.pid != pid || b.id != id {
                    why.get_or_insert_with(|| {
                        format!("handler {id} is a collector registered more than once")
                    });
                }
                if b.slot >= COUNTER_SLOTS {
                    why.get_or_insert_with(|| {
                        format!(
                            "the process has more collectors than its area has counters \
                             ({COUNTER_SLOTS})"
                        )
                    });
                }
                cols.push((id, c.clone()));
            }
            None => {
                why.get_or_insert_with(|| format!("handler {id} runs in the tracer"));
            }
        }
        let own_ret = h
            .as_any()
            .and_then(|a| a.downcast_ref::<Collect>())
            .is_some_and(|c| c.action().at_return());
        if h.has_ret() && !own_ret {
            why.get_or_insert_with(|| format!("handler {id} has a return hook"));
        }
    }
    let rets = cols
        .iter()
        .filter(|(_, c)| c.action() == Action::Ret)
        .count();
    if rets > 2 {
        why.get_or_insert_with(|| "more than two ret collectors at one site".into());
    }
    match (cols.is_empty(), why) {
        (true, _) => Wanted::None,
        (false, Some(w)) => Wanted::Mixed(w),
        (false, None) => Wanted::All(cols),
    }
}

/// Which path a site with collectors takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SitePath {
    /// Its collectors run in the tracee, without a stop.
    InTracee,
    /// One stop per hit; the collectors run in the tracer. Why it is not promoted.
    Stop(String),
}

impl crate::PtraceBackend {
    /// The path the site at `addr` takes, if it has a collector among its enabled
    /// handlers (`None` otherwise, or if nothing is registered there). Any thread.
    pub fn collect_path(&self, addr: u64) -> Option<SitePath> {
        let site = self
            .shared
            .dispatcher
            .get()?
            .with_site(addr, |s| std::sync::Arc::clone(&s.0))?;
        let c = handler::lock(&site.collect);
        match (&c.wanted, &c.path) {
            (Wanted::None, _) => None,
            (Wanted::Mixed(why), _) => Some(SitePath::Stop(why.clone())),
            (Wanted::All(_), Some(p)) => Some(p.clone()),
            (Wanted::All(_), None) => {
                Some(SitePath::Stop(match &self.shared.lock().collect.area {
                    AreaState::Failed(why) => why.clone(),
                    _ => "not promoted yet (the tracer promotes between events)".into(),
                }))
            }
        }
    }

    /// A handle for draining the process's records from any thread.
    pub fn collection(&self) -> Collection {
        Collection {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Tracer {
    /// The path the site at `addr` takes ([`crate::PtraceBackend::collect_path`]).
    pub fn collect_path(&self, addr: u64) -> Option<SitePath> {
        self.registry().backend().collect_path(addr)
    }

    /// A hit on the stop path at `site`: a cold site is promoted now (at the tracer's
    /// next rework, before it waits again).
    pub(crate) fn note_collecting_hit(&self, site: &crate::backend::SiteInner) {
        let mut sc = handler::lock(&site.collect);
        if sc.heat != Heat::Cold {
            return;
        }
        sc.heat = Heat::Hit;
        sc.path = None;
        drop(sc);
        self.shared.lock().collect.dirty.insert(site.addr);
        self.shared
            .collect_dirty
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Make the process's area if it was not tried yet, on the stopped thread `tid`
    /// (registers `ur`).
    pub(crate) fn ensure_area(&mut self, tid: Tid, ur: &UserRegs) {
        if !matches!(self.shared.lock().collect.area, AreaState::NotTried) {
            return;
        }
        let layout = AreaLayout::new(RING_CELLS, COUNTER_SLOTS);
        let state = match self.make_area(tid, ur, layout, None) {
            Ok(a) => AreaState::Mapped(a),
            Err(e) => AreaState::Failed(format!("no collecting area in the tracee: {e}")),
        };
        self.shared.lock().collect.area = state;
    }

    /// The address of the process's collecting area in the tracee, if it has one.
    pub fn collect_area(&self) -> Option<u64> {
        match &self.shared.lock().collect.area {
            AreaState::Mapped(a) => Some(a.tracee),
            _ => None,
        }
    }

    /// Why the process has no collecting area, if making it failed.
    pub fn collect_area_error(&self) -> Option<String> {
        match &self.shared.lock().collect.area {
            AreaState::Failed(why) => Some(why.clone()),
            _ => None,
        }
    }

    /// A handle for draining the process's records from any thread.
    pub fn collection(&self) -> Collection {
        self.registry().backend().collection()
    }

    /// Drain what the tracee wrote, knowing none of its threads is inside the action
    /// code (it is dead, or every thread is held outside trampolines): at exit, exec
    /// and detach.
    pub(crate) fn final_drain(&self) {
        reader::drain(&self.shared, true);
    }

    /// Unmap the area and the shadow stacks in the tracee (detach), by calls injected
    /// on `injector`, a held thread and its registers (none: they stay mapped).
    pub(crate) fn drop_area(&mut self, injector: Option<&(Tid, UserRegs)>) {
        let area = std::mem::take(&mut self.shared.lock().collect.area);
        let AreaState::Mapped(area) = area else {
            return;
        };
        let Some(&(tid, ur)) = injector else {
            return;
        };
        let _ = self.unmap_area(tid, &ur, area.tracee, area.map.len());
        let shadow = std::mem::take(&mut self.shared.lock().collect.shadow);
        if let ShadowState::Mapped(at) = shadow {
            let len = multiprobe_x86::collect::shadow::SHADOW_LEN;
            let _ = self.unmap_area(tid, &ur, at, len);
        }
        for sig in self.aside.take_signals(tid) {
            self.resend.push((tid, sig));
        }
    }
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn f<T: Send + Sync>() {}
    f::<Collect>();
    f::<Collection>();
    f::<Mutex<Procs>>();
}
