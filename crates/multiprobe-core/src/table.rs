//! The published probe table: address → site view, read by dispatch without locks.
//!
//! Shape: a directory (power-of-two array of bucket pointers) → immutable buckets →
//! site views. A writer changing one site builds a new bucket (copying the few other
//! sites that hash there), publishes it with one pointer store and retires the old one,
//! so an update costs O(sites per bucket), not O(sites). The directory doubles when the
//! table holds more sites than buckets (amortized O(1) per update) and never shrinks.
//!
//! Invariants:
//! * Only the holder of the writer lock (proved by `&mut TableWriter`) stores pointers
//!   or retires objects; retired objects are freed only after the read domain's grace
//!   period (see [`crate::srcu`]), and only under the writer lock, so a writer's own
//!   borrows of current objects are never freed under it.
//! * A published bucket is never mutated; it holds at most one view per address.
//! * Readers must be inside a read section of `domain` while they use anything reached
//!   through `dir`.

use smallvec::SmallVec;

use crate::handler::Handler;
use crate::removal::{Collector, Mark, Removals};
use crate::srcu::Domain;
use crate::stats::{HandlerCounters, HandlerStats, SiteCounter};
use crate::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use crate::sync::{unmodelled, Arc, Poison};
use crate::tally::{Tally, Walks};
use crate::HandlerId;

/// One registered handler, shared by every view that lists it.
pub(crate) struct HandlerEntry {
    pub(crate) id: HandlerId,
    pub(crate) addr: u64,
    pub(crate) handler: Box<dyn Handler>,
    pub(crate) has_post: bool,
    /// It has a return hook ([`Handler::has_ret`]).
    pub(crate) has_ret: bool,
    pub(crate) exclusive: bool,
    /// Mirror of the enabled flag in the current view, for thread-context queries.
    pub(crate) enabled: unmodelled::AtomicBool,
    pub(crate) counters: HandlerCounters,
    /// The walks of the views that listed it enabled ([`crate::tally`]).
    pub(crate) tally: Arc<Tally>,
    /// Its removal request, if one was made ([`crate::removal`]).
    pub(crate) mark: Mark,
}

impl HandlerEntry {
    /// Its statistics so far (exact once no hit is in progress).
    pub(crate) fn stats(&self) -> HandlerStats {
        self.counters.read(|| self.tally.read())
    }
}

impl std::fmt::Debug for HandlerEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandlerEntry")
            .field("id", &self.id)
            .field("addr", &format_args!("{:#x}", self.addr))
            .finish_non_exhaustive()
    }
}

/// What outlives every copy of a site's view: the backend's data and the hit tally.
#[derive(Debug)]
pub(crate) struct SiteShared<S> {
    pub(crate) addr: u64,
    pub(crate) data: S,
    /// The walks of all its views.
    pub(crate) hits: Arc<Tally>,
    /// Whether the backend's breakpoint is in place. Writer-only.
    pub(crate) armed: AtomicBool,
}

/// A handler's place in a site, with its enabled flag as of this snapshot.
#[derive(Clone, Debug)]
pub(crate) struct Slot {
    pub(crate) entry: Arc<HandlerEntry>,
    pub(crate) enabled: bool,
}

/// What dispatch needs of one enabled handler, copied out of its entry so a hit does
/// not chase the entry pointer first.
///
/// Invariant: a `Hot` lives only inside the `SiteView` whose `handlers` hold an `Arc` of
/// the same entry, so its pointers are valid for as long as the view is.
pub(crate) struct Hot {
    handler: *const dyn Handler,
    /// The entry (an `Arc`'s data): its counters, its removal mark.
    entry: *const HandlerEntry,
    pub(crate) id: HandlerId,
    pub(crate) has_post: bool,
    pub(crate) has_ret: bool,
}

impl Hot {
    fn new(e: &Arc<HandlerEntry>) -> Self {
        Hot {
            handler: &*e.handler,
            entry: Arc::as_ptr(e),
            id: e.id,
            has_post: e.has_post,
            has_ret: e.has_ret,
        }
    }

    /// The entry, as the `Arc` data pointer [`crate::removal::Removals::request`] takes.
    #[inline]
    pub(crate) fn entry(&self) -> *const HandlerEntry {
        self.entry
    }

    /// Whether its removal was requested ([`crate::removal`]); ask only while the
    /// table's gate is open.
    #[inline]
    pub(crate) fn removal_requested(&self) -> bool {
        // SAFETY: as for `handler`.
        unsafe { &*self.entry }.mark.requested()
    }

    #[inline]
    pub(crate) fn handler(&self) -> &dyn Handler {
        // SAFETY: module invariant — the enclosing view keeps the entry alive, and the
        // caller reaches `self` only through that view.
        unsafe { &*self.handler }
    }

    #[inline]
    pub(crate) fn counters(&self) -> &HandlerCounters {
        // SAFETY: as for `handler`.
        unsafe { &(*self.entry).counters }
    }
}

// SAFETY: `Hot` points at a `dyn Handler` (which is `Send + Sync`) and at its entry
// (atomics and immutable fields), both owned by an `Arc<HandlerEntry>` that outlives it
// (module invariant).
unsafe impl Send for Hot {}
// SAFETY: as above; shared access only reads through the pointers.
unsafe impl Sync for Hot {}

impl std::fmt::Debug for Hot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hot")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

/// An immutable snapshot of one probed address: its handlers in registration order.
#[derive(Debug)]
pub(crate) struct SiteView<S> {
    /// Copy of `shared.addr`, so a bucket scan touches no other cache line.
    addr: u64,
    pub(crate) shared: Arc<SiteShared<S>>,
    /// Every handler, enabled or not (the writer's view).
    pub(crate) handlers: SmallVec<[Slot; 4]>,
    /// The enabled ones, in order (the hot path's view).
    pub(crate) hot: Box<[Hot]>,
    /// Some enabled handler has a post hook (the backend must come back after the step).
    pub(crate) any_post: bool,
    /// How many enabled handlers have a return hook (a hit arms returns for them).
    pub(crate) rets: usize,
    /// Bumped once per hit dispatched through this view (`walks.counter()`, kept here
    /// too to save a pointer hop).
    pub(crate) walk_counter: Arc<SiteCounter>,
    walks: Arc<Walks>,
}

impl<S> Clone for SiteView<S> {
    /// The same view in another bucket: same handlers, same walk counter.
    fn clone(&self) -> Self {
        let handlers = self.handlers.clone();
        SiteView {
            addr: self.addr,
            shared: Arc::clone(&self.shared),
            hot: hot_of(&handlers),
            handlers,
            any_post: self.any_post,
            rets: self.rets,
            walk_counter: Arc::clone(&self.walk_counter),
            walks: Arc::clone(&self.walks),
        }
    }
}

fn hot_of(handlers: &[Slot]) -> Box<[Hot]> {
    handlers
        .iter()
        .filter(|s| s.enabled)
        .map(|s| Hot::new(&s.entry))
        .collect()
}

impl<S> SiteView<S> {
    /// A new view of `handlers`, with a fresh walk counter crediting the site and the
    /// enabled handlers.
    pub(crate) fn new(shared: Arc<SiteShared<S>>, handlers: SmallVec<[Slot; 4]>) -> Self {
        let hot = hot_of(&handlers);
        let any_post = hot.iter().any(|h| h.has_post);
        let rets = hot.iter().filter(|h| h.has_ret).count();
        let credits = std::iter::once(Arc::clone(&shared.hits))
            .chain(
                handlers
                    .iter()
                    .filter(|s| s.enabled)
                    .map(|s| Arc::clone(&s.entry.tally)),
            )
            .collect();
        let walks = Walks::new(credits);
        SiteView {
            addr: shared.addr,
            shared,
            handlers,
            hot,
            any_post,
            rets,
            walk_counter: Arc::clone(walks.counter()),
            walks,
        }
    }

    #[inline]
    pub(crate) fn addr(&self) -> u64 {
        self.addr
    }

    /// Some handler is enabled (the breakpoint should be armed).
    pub(crate) fn any_enabled(&self) -> bool {
        !self.hot.is_empty()
    }
}

struct Bucket<S> {
    /// Most buckets hold one site: keep it inline, one pointer hop fewer per lookup.
    first: SiteView<S>,
    rest: Box<[SiteView<S>]>,
    /// Set when the bucket is retired and its grace period passed. Under loom retired
    /// objects are poisoned and leaked instead of freed, so a reader that touches one
    /// too late fails the model instead of reading freed memory (zero-sized otherwise).
    poison: Poison,
}

impl<S> Bucket<S> {
    fn sites(&self) -> impl Iterator<Item = &SiteView<S>> {
        std::iter::once(&self.first).chain(self.rest.iter())
    }

    /// A bucket of `sites`, or null if there are none.
    fn boxed(mut sites: Vec<SiteView<S>>) -> *mut Bucket<S> {
        if sites.is_empty() {
            return std::ptr::null_mut();
        }
        let first = sites.remove(0);
        Box::into_raw(Box::new(Bucket {
            first,
            rest: sites.into_boxed_slice(),
            poison: Poison::new(),
        }))
    }
}

struct Directory<S> {
    shift: u32,
    buckets: Box<[AtomicPtr<Bucket<S>>]>,
}

const INITIAL_BUCKETS: usize = 64;
/// Retired objects that trigger a non-blocking reclaim on the next update.
const RECLAIM_BATCH: usize = 64;
const FIB: u64 = 0x9E37_79B9_7F4A_7C15;

impl<S> Directory<S> {
    fn with_len(len: usize) -> Self {
        debug_assert!(len.is_power_of_two());
        Directory {
            shift: 64 - len.trailing_zeros(),
            buckets: (0..len)
                .map(|_| AtomicPtr::new(std::ptr::null_mut()))
                .collect(),
        }
    }

    #[inline]
    fn index(&self, addr: u64) -> usize {
        (addr.wrapping_mul(FIB) >> self.shift) as usize
    }
}

impl<S> Drop for Directory<S> {
    fn drop(&mut self) {
        for b in self.buckets.iter() {
            let p = b.load(Ordering::Relaxed);
            if !p.is_null() {
                // SAFETY: a directory owns the buckets it points to (module invariant: a
                // replaced bucket is retired separately and no longer pointed to), and a
                // directory is dropped only after its grace period.
                drop(unsafe { Box::from_raw(p) });
            }
        }
    }
}

/// Something unlinked from the table, waiting for its grace period. Held only to be
/// freed (or, under loom, poisoned and leaked).
enum Retired<S> {
    Bucket(Box<Bucket<S>>),
    Directory(Box<Directory<S>>),
}

impl<S> Retired<S> {
    /// Free it (or, under loom, poison and leak it: see [`Poison`]).
    fn reclaim(self) {
        match self {
            Retired::Bucket(b) => {
                b.poison.set();
                crate::sync::free(b);
            }
            Retired::Directory(d) => {
                for p in d.buckets.iter() {
                    let p = p.load(Ordering::Relaxed);
                    if !p.is_null() {
                        // SAFETY: owned by the retired directory, past its grace period.
                        unsafe { (*p).poison.set() };
                    }
                }
                crate::sync::free(d);
            }
        }
    }
}

/// A table's [`Table::uid`]. Outside the model: no part of the protocol.
fn next_uid() -> u64 {
    static NEXT: unmodelled::AtomicU64 = unmodelled::AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The table readers see.
pub(crate) struct Table<S> {
    pub(crate) domain: Domain,
    dir: AtomicPtr<Directory<S>>,
    /// Next to `dir`, on the line every lookup reads anyway: the gate a walk loads.
    pub(crate) removals: Removals,
    /// How a dispatcher reaches the registry to collect removals.
    pub(crate) collector: Collector,
    /// Unique in the process (never reused, unlike an address): what a return-stack
    /// frame records as its owner ([`crate::returns`]).
    pub(crate) uid: u64,
}

// SAFETY: the table hands out shared references to `SiteView<S>` across threads and
// drops them on whichever thread reclaims; that needs `S: Send + Sync`, which the
// bounds require. The raw pointers are owned (module invariants).
unsafe impl<S: Send + Sync> Send for Table<S> {}
// SAFETY: as above.
unsafe impl<S: Send + Sync> Sync for Table<S> {}

impl<S> std::fmt::Debug for Table<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Table").finish_non_exhaustive()
    }
}

impl<S> Table<S> {
    pub(crate) fn new() -> Self {
        Table {
            domain: Domain::new(),
            dir: AtomicPtr::new(Box::into_raw(Box::new(Directory::with_len(
                INITIAL_BUCKETS,
            )))),
            removals: Removals::new(),
            collector: Collector::new(),
            uid: next_uid(),
        }
    }

    /// Find the entry of handler `id` in the current table (at `addr` if known, else
    /// anywhere) and call `f` with it. Async-signal-safe: a read section and a scan, no
    /// lock, no allocation; O(sites) without `addr`.
    pub(crate) fn with_entry<R>(
        &self,
        id: HandlerId,
        addr: Option<u64>,
        f: impl FnOnce(&Arc<HandlerEntry>) -> R,
    ) -> Option<R> {
        fn find<S>(v: &SiteView<S>, id: HandlerId) -> Option<&Slot> {
            v.handlers.iter().find(|s| s.entry.id == id)
        }
        // Everything below is used inside this read section, left after the last use.
        let token = self.domain.enter(crate::shard::shared());
        let slot = match addr {
            // SAFETY: inside the read section.
            Some(a) => unsafe { self.lookup(a) }.and_then(|v| find(v, id)),
            None => {
                // SAFETY: inside the read section, the directory it loads is not freed.
                let dir = unsafe { &*self.dir.load(Ordering::Acquire) };
                dir.buckets.iter().find_map(|b| {
                    // SAFETY: as above: published buckets live while the section is open.
                    let b = unsafe { b.load(Ordering::Acquire).as_ref() }?;
                    b.sites().find_map(|v| find(v, id))
                })
            }
        };
        let r = slot.map(|s| f(&s.entry));
        drop(token);
        r
    }

    /// Find the view of `addr`.
    ///
    /// # Safety
    /// The caller must hold a read section of `self.domain` (or the writer lock) for as
    /// long as it uses the returned reference.
    #[inline]
    pub(crate) unsafe fn lookup(&self, addr: u64) -> Option<&SiteView<S>> {
        // SAFETY: the directory is published (release) after it is built, and freed only
        // after a grace period that the caller's read section holds back.
        let dir = unsafe { &*self.dir.load(Ordering::Acquire) };
        let bucket = dir.buckets[dir.index(addr)].load(Ordering::Acquire);
        if bucket.is_null() {
            return None;
        }
        // SAFETY: as for the directory.
        let bucket = unsafe { &*bucket };
        bucket.poison.check();
        if bucket.first.addr() == addr {
            return Some(&bucket.first);
        }
        bucket.rest.iter().find(|s| s.addr() == addr)
    }
}

impl<S> Drop for Table<S> {
    fn drop(&mut self) {
        // No reader may still be inside when the directory goes.
        self.domain.close();
        // SAFETY: `&mut self` and no read section is open: nobody can reach the directory.
        drop(unsafe { Box::from_raw(self.dir.load(Ordering::Relaxed)) });
    }
}

/// Writer-side state of a table. Lives inside the registry's writer mutex, so holding
/// `&mut TableWriter` proves exclusive write access.
pub(crate) struct TableWriter<S> {
    table: Arc<Table<S>>,
    sites: usize,
    retired: Vec<(u64, Retired<S>)>,
    /// Removal requests collected and unlinked, by the stamp after which the gate may
    /// be lowered for them ([`crate::removal`]).
    gate_releases: Vec<(u64, usize)>,
}

impl<S> std::fmt::Debug for TableWriter<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TableWriter")
            .field("sites", &self.sites)
            .field("retired", &self.retired.len())
            .finish()
    }
}

impl<S> Drop for TableWriter<S> {
    fn drop(&mut self) {
        self.reclaim();
        // What is left may still be read by a straggling reader: leaking it is safe,
        // freeing it is not.
        for r in self.retired.drain(..) {
            std::mem::forget(r);
        }
    }
}

impl<S> TableWriter<S> {
    pub(crate) fn new(table: Arc<Table<S>>) -> Self {
        TableWriter {
            table,
            sites: 0,
            retired: Vec::new(),
            gate_releases: Vec::new(),
        }
    }

    fn dir(&self) -> &Directory<S> {
        // SAFETY: the writer lock is held (`&self` of the writer); only writers replace
        // the directory and only reclaim frees it, both under that lock.
        unsafe { &*self.table.dir.load(Ordering::Relaxed) }
    }

    /// The current view of `addr`.
    pub(crate) fn get(&self, addr: u64) -> Option<&SiteView<S>> {
        // SAFETY: holding the writer lock keeps current objects alive (module invariant).
        unsafe { self.table.lookup(addr) }
    }

    /// Every current view, in no particular order.
    pub(crate) fn views(&self) -> impl Iterator<Item = &SiteView<S>> {
        self.dir()
            .buckets
            .iter()
            .filter_map(|b| self.current(b.load(Ordering::Relaxed)))
            .flat_map(Bucket::sites)
    }

    /// The bucket behind a pointer read from the current directory.
    fn current(&self, bucket: *mut Bucket<S>) -> Option<&Bucket<S>> {
        // SAFETY: `bucket` is null or published in the current directory, and with the
        // writer lock held (`&self`) nothing current is freed.
        unsafe { bucket.as_ref() }
    }

    /// Publish `view` as the view of `addr` (`None` removes it).
    pub(crate) fn set(&mut self, addr: u64, view: Option<SiteView<S>>) {
        let dir = self.dir();
        let slot = &dir.buckets[dir.index(addr)];
        let old = slot.load(Ordering::Relaxed);
        let old_sites: Vec<&SiteView<S>> = self
            .current(old)
            .into_iter()
            .flat_map(Bucket::sites)
            .collect();
        let had = old_sites.iter().any(|s| s.addr() == addr);
        let has = view.is_some();
        let mut sites: Vec<SiteView<S>> = old_sites
            .into_iter()
            .filter(|s| s.addr() != addr)
            .cloned()
            .collect();
        sites.extend(view);
        let new = Bucket::boxed(sites);
        slot.store(new, Ordering::Release);
        if !old.is_null() {
            // SAFETY: `old` was the published bucket and is now unreachable for new
            // readers; it is freed only after the grace period.
            let old = unsafe { Box::from_raw(old) };
            self.retire(Retired::Bucket(old));
        }
        self.sites = self.sites + usize::from(has) - usize::from(had);
        if self.sites > self.dir().buckets.len() {
            self.grow();
        }
    }

    /// Queue an unlinked object for freeing, stamped after the unlink (see
    /// [`crate::srcu`] for why that makes the stamp safe).
    fn retire(&mut self, r: Retired<S>) {
        let stamp = self.table.domain.stamp();
        self.retired.push((stamp, r));
    }

    fn grow(&mut self) {
        let old = self.dir();
        let new = Directory::with_len(old.buckets.len() * 2);
        let mut groups: Vec<Vec<SiteView<S>>> =
            (0..new.buckets.len()).map(|_| Vec::new()).collect();
        for v in self.views() {
            groups[new.index(v.addr())].push(v.clone());
        }
        for (slot, g) in new.buckets.iter().zip(groups) {
            slot.store(Bucket::boxed(g), Ordering::Relaxed);
        }
        let old = self
            .table
            .dir
            .swap(Box::into_raw(Box::new(new)), Ordering::AcqRel);
        // SAFETY: `old` was the published directory; it is unreachable for new readers
        // and freed (with the buckets it owns) only after the grace period.
        let old = unsafe { Box::from_raw(old) };
        self.retire(Retired::Directory(old));
    }

    /// The stamp a waiter must pass to [`Domain::wait`] to outlive everything retired so far.
    pub(crate) fn stamp(&self) -> u64 {
        self.table.domain.stamp()
    }

    /// `n` collected removal requests were unlinked: lower the gate for them once no
    /// reader can reach a view listing them ([`TableWriter::reclaim`]).
    pub(crate) fn release_gate_after_grace(&mut self, n: usize) {
        let stamp = self.stamp();
        self.gate_releases.push((stamp, n));
    }

    /// [`TableWriter::reclaim`] once enough has piled up: polling costs a heavy barrier
    /// (a system call), which single registrations should not pay every time. Gate
    /// releases do not wait for a pile: while the gate is open every hit looks at flags.
    pub(crate) fn maybe_reclaim(&mut self) {
        if self.retired.len() >= RECLAIM_BATCH || !self.gate_releases.is_empty() {
            self.reclaim();
        }
    }

    /// Free what has passed its grace period, without waiting, and lower the removal
    /// gate for what has. Returns how many retired objects remain.
    pub(crate) fn reclaim(&mut self) -> usize {
        if self.retired.is_empty() && self.gate_releases.is_empty() {
            return 0;
        }
        let domain = &self.table.domain;
        let flips = domain.poll();
        let removals = &self.table.removals;
        self.gate_releases.retain(|&(stamp, n)| {
            let done = domain.completed(stamp, flips);
            if done {
                removals.release(n);
            }
            !done
        });
        let (done, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.retired)
            .into_iter()
            .partition(|(stamp, _)| domain.completed(*stamp, flips));
        self.retired = keep;
        for (_, r) in done {
            r.reclaim();
        }
        self.retired.len()
    }
}
