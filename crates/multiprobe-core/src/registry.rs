//! The registry: who is registered where, and keeping the backend's breakpoints in step.
//!
//! Invariants (all under the writer mutex):
//! * The published table and `index` agree: a handler id is in `index` iff its entry is
//!   in the current view of its address.
//! * A site is armed iff some handler there is enabled — except a site whose `disarm`
//!   failed, which stays published (maybe with no handler) and armed, so that traps there
//!   remain transparent, until a later disarm succeeds.
//! * A site is published before its breakpoint is armed and unpublished only after it
//!   is disarmed, so every trap at one of our breakpoints finds its site.
//! * Nothing the table unlinked is freed before its grace period (see [`crate::srcu`]).
//! * Every operation that changes the table first finishes the removals handlers
//!   requested from inside a dispatch ([`crate::removal`]), so each sees them done.
//!
//! From inside a handler of a backend that dispatches in signal handlers
//! ([`Backend::dispatches_in_signal_handlers`]) nothing here may lock or allocate: the
//! interrupted code may hold the writer lock, or be inside `malloc`. There `unregister`,
//! `unregister_batch` and dropping a [`Registration`] request the removal lock-free
//! (finished at the next collection), and every other operation that returns a
//! `Result` refuses with [`Error::SignalContext`]; `len`, `handlers`, `site` and `sites`
//! must not be called there at all.

use std::collections::HashSet;

use smallvec::SmallVec;

use crate::backend::Backend;
use crate::dispatch::Dispatcher;
use crate::error::{Error, Result};
use crate::handler::{Handler, Hit};
use crate::removal::Hooks;
use crate::stats::{HandlerStats, SiteStats};
use crate::sync::atomic::Ordering::Relaxed;
use crate::sync::index::Index;
use crate::sync::unmodelled::AtomicU64;
use crate::sync::{held, Arc, Mutex, MutexGuard};
use crate::table::{HandlerEntry, SiteView, Slot, Table, TableWriter};
use crate::HandlerId;

mod batch;

/// How to register a handler.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Options {
    /// No other handler may share the address (conflicts are errors both ways).
    pub exclusive: bool,
    /// Register it disabled: it runs nothing until enabled.
    pub disabled: bool,
}

impl Options {
    /// Ask for exclusivity.
    pub fn exclusive(mut self) -> Self {
        self.exclusive = true;
        self
    }
    /// Register disabled.
    pub fn disabled(mut self) -> Self {
        self.disabled = true;
        self
    }
}

/// One item of [`Registry::register_batch`].
pub struct Request {
    addr: u64,
    handler: Box<dyn Handler>,
    options: Options,
}

impl Request {
    /// A pre-handler closure for `addr` with default options (as
    /// [`Registry::register`]).
    pub fn new<F>(addr: u64, pre: F) -> Self
    where
        F: Fn(&mut Hit<'_>) + Send + Sync + 'static,
    {
        Self::handler(addr, pre)
    }

    /// Any [`Handler`] for `addr` with default options (as
    /// [`Registry::register_handler`]).
    pub fn handler(addr: u64, handler: impl Handler) -> Self {
        Request {
            addr,
            handler: Box::new(handler),
            options: Options::default(),
        }
    }
    /// Set the options.
    pub fn options(mut self, options: Options) -> Self {
        self.options = options;
        self
    }
}

impl std::fmt::Debug for Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Request")
            .field("addr", &format_args!("{:#x}", self.addr))
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

/// What the registry knows of one handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandlerInfo {
    /// Its id.
    pub id: HandlerId,
    /// Its address.
    pub addr: u64,
    /// Whether it is enabled.
    pub enabled: bool,
    /// Whether it was registered exclusive.
    pub exclusive: bool,
    /// Its statistics.
    pub stats: HandlerStats,
}

/// Many handlers on each address, over one backend. Cheap to clone (shared).
pub struct Registry<B: Backend> {
    inner: Arc<Inner<B>>,
}

impl<B: Backend> Clone for Registry<B> {
    fn clone(&self) -> Self {
        Registry {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<B: Backend + std::fmt::Debug> std::fmt::Debug for Registry<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("backend", &self.inner.backend)
            .field("handlers", &self.inner.index.len())
            .finish_non_exhaustive()
    }
}

struct Inner<B: Backend> {
    table: Arc<Table<B::Site>>,
    writer: Mutex<TableWriter<B::Site>>,
    index: Index<HandlerId, Arc<HandlerEntry>>,
    next_id: AtomicU64,
    backend: B,
}

impl<B: Backend> Registry<B> {
    /// A registry over `backend`; calls [`Backend::attach`].
    pub fn new(backend: B) -> Self {
        let table = Arc::new(Table::new());
        backend.attach(Dispatcher::new(Arc::clone(&table)));
        let inner = Arc::new(Inner {
            writer: Mutex::new(TableWriter::new(Arc::clone(&table))),
            table,
            index: Index::new(),
            next_id: AtomicU64::new(1),
            backend,
        });
        // Cleared first thing in `Inner`'s drop, which waits for a collection running.
        inner.table.collector.set(Hooks {
            target: Arc::as_ptr(&inner).cast(),
            collect: collect_hook::<B>,
            reclaim: reclaim_hook::<B>,
        });
        Registry { inner }
    }

    /// Whether this call comes from inside a handler that runs in a signal handler, where
    /// nothing may lock or allocate (module docs).
    fn in_signal_handler(&self) -> bool {
        held::any() && self.inner.backend.dispatches_in_signal_handlers()
    }

    fn refuse_in_signal_handler(&self, op: &'static str) -> Result<()> {
        if self.in_signal_handler() {
            return Err(Error::SignalContext(op));
        }
        Ok(())
    }

    /// Finish the bookkeeping of the handlers that asked to be removed from inside a
    /// dispatch ([`crate::PreAction::Remove`], or `unregister` from a handler that runs in
    /// a signal handler): forget them, and disarm the sites left without an enabled
    /// handler. Every operation that changes the registry does this first anyway; call it
    /// when none comes. Then, unless called from inside a dispatch, waits for the grace
    /// period of what it unlinked. Returns how many handlers it removed.
    pub fn collect(&self) -> Result<usize> {
        self.refuse_in_signal_handler("collect")?;
        let mut w = self.inner.lock();
        let n = self.inner.collect(&mut w);
        let stamp = w.stamp();
        drop(w);
        if n > 0 && !held::any() {
            self.inner.table.domain.wait(stamp);
            self.inner.lock().reclaim();
        }
        Ok(n)
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.inner.backend
    }

    /// A dispatch handle on this registry's table (what [`Backend::attach`] received).
    pub fn dispatcher(&self) -> Dispatcher<B::Site> {
        Dispatcher::new(Arc::clone(&self.inner.table))
    }

    /// Register the closure `pre` as a pre-handler at `addr`: it runs before the
    /// instruction at `addr` on every hit, and redirects the thread if it moves `rip`
    /// (as [`Hit::return_now`] does). The first handler at an address arms the
    /// backend's breakpoint; a hit that begins after this returns runs the handler.
    ///
    /// For post- and fault handlers, or a type of your own, use
    /// [`Registry::register_handler`] with an [`FnHandler`](crate::FnHandler) or a
    /// [`Handler`] impl.
    pub fn register<F>(&self, addr: u64, pre: F) -> Result<Registration<B>>
    where
        F: Fn(&mut Hit<'_>) + Send + Sync + 'static,
    {
        self.register_handler_with(addr, pre, Options::default())
    }

    /// [`Registry::register`] with options.
    pub fn register_with<F>(&self, addr: u64, pre: F, options: Options) -> Result<Registration<B>>
    where
        F: Fn(&mut Hit<'_>) + Send + Sync + 'static,
    {
        self.register_handler_with(addr, pre, options)
    }

    /// Register any [`Handler`] at `addr`: an [`FnHandler`](crate::FnHandler) assembled
    /// from closures, or a type of your own. Otherwise as [`Registry::register`].
    pub fn register_handler(&self, addr: u64, handler: impl Handler) -> Result<Registration<B>> {
        self.register_handler_with(addr, handler, Options::default())
    }

    /// [`Registry::register_handler`] with options.
    pub fn register_handler_with(
        &self,
        addr: u64,
        handler: impl Handler,
        options: Options,
    ) -> Result<Registration<B>> {
        // (The handler was built by the caller and is dropped here: from a signal handler
        // that may free. Don't register from there.)
        self.refuse_in_signal_handler("register")?;
        let req = Request::handler(addr, handler).options(options);
        let mut w = self.inner.write();
        let added = self.inner.add_all(&mut w, [req]).map_err(|(_, e)| e)?;
        w.maybe_reclaim();
        Ok(self.guard(&added[0]))
    }

    /// Register many handlers at once, all or nothing: on the first failure every one
    /// already added is removed again and [`Error::Batch`] says which item failed.
    /// Costs no grace period, and time linear in the number of requests even when many
    /// share an address (each site's new view is published once).
    pub fn register_batch(
        &self,
        requests: impl IntoIterator<Item = Request>,
    ) -> Result<Vec<Registration<B>>> {
        self.refuse_in_signal_handler("register_batch")?;
        let mut w = self.inner.write();
        let added = self.inner.add_all(&mut w, requests);
        w.maybe_reclaim();
        match added {
            Ok(added) => Ok(added.iter().map(|e| self.guard(e)).collect()),
            Err((index, source)) => Err(Error::Batch {
                index,
                source: Box::new(source),
            }),
        }
    }

    fn guard(&self, entry: &HandlerEntry) -> Registration<B> {
        Registration {
            registry: self.clone(),
            id: entry.id,
            addr: entry.addr,
            owned: true,
        }
    }

    /// Unregister handler `id` and wait until no hit can still be running it (rule 3);
    /// returns its final statistics. The last handler at an address disarms the
    /// breakpoint, restoring the original bytes.
    ///
    /// Called from inside a handler it unlinks without waiting and returns
    /// [`Error::InsideDispatch`]. With a backend that dispatches in signal handlers it
    /// does so without a lock or an allocation — async-signal-safe, and safe even if the
    /// interrupted code holds the registry's lock: the removal is requested as
    /// [`crate::PreAction::Remove`] requests it (hits that begin afterwards do not run the
    /// handler) and the bookkeeping is finished in thread context; finding `id` scans the
    /// table. If the backend could not remove the breakpoint the handler is still gone
    /// and the backend's error is returned.
    pub fn unregister(&self, id: HandlerId) -> Result<HandlerStats> {
        if self.in_signal_handler() {
            return Err(if self.inner.request_removal(id, None) {
                Error::InsideDispatch(id)
            } else {
                Error::UnknownHandler(id)
            });
        }
        let mut w = self.inner.write();
        let (entry, disarmed) = self.inner.remove(&mut w, id)?;
        let stamp = w.stamp();
        drop(w);
        self.inner.quiesce(stamp, id)?;
        disarmed?;
        Ok(entry.stats())
    }

    /// Unregister many handlers with one grace period. All ids are checked first: if one
    /// is unknown (or repeated) nothing is removed.
    pub fn unregister_batch(&self, ids: &[HandlerId]) -> Result<Vec<HandlerStats>> {
        if self.in_signal_handler() {
            // As `unregister`, for each: checked first, without allocating.
            for (k, &id) in ids.iter().enumerate() {
                if ids[..k].contains(&id) || !self.inner.holds(id) {
                    return Err(Error::UnknownHandler(id));
                }
            }
            for &id in ids {
                self.inner.request_removal(id, None);
            }
            return match ids.first() {
                Some(&id) => Err(Error::InsideDispatch(id)),
                None => Ok(Vec::new()),
            };
        }
        let mut w = self.inner.write();
        let mut seen = HashSet::with_capacity(ids.len());
        for &id in ids {
            if !seen.insert(id) || !self.inner.index.contains(&id) {
                return Err(Error::UnknownHandler(id));
            }
        }
        let mut entries = Vec::with_capacity(ids.len());
        let mut first_err = None;
        for &id in ids {
            let (entry, disarmed) = self.inner.remove(&mut w, id)?;
            if let (Err(e), None) = (disarmed, &first_err) {
                first_err = Some(e);
            }
            entries.push(entry);
        }
        let stamp = w.stamp();
        drop(w);
        if let Some(&id) = ids.first() {
            self.inner.quiesce(stamp, id)?;
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        Ok(entries.iter().map(|e| e.stats()).collect())
    }

    /// Unregister the handlers behind these guards with one grace period.
    ///
    /// Not from inside a handler that runs in a signal handler: it locks or allocates
    /// (module docs).
    pub fn unregister_all(&self, regs: Vec<Registration<B>>) -> Result<Vec<HandlerStats>> {
        let ids: Vec<HandlerId> = regs.into_iter().map(Registration::into_id).collect();
        self.unregister_batch(&ids)
    }

    /// Enable handler `id`. Arms the breakpoint if it is the only enabled one there.
    pub fn enable(&self, id: HandlerId) -> Result<()> {
        self.refuse_in_signal_handler("enable")?;
        self.inner.set_enabled(id, true)
    }

    /// Disable handler `id`: hits that begin after this returns do not run it. Disarms
    /// the breakpoint if no enabled handler is left there (a disabled probe costs nothing).
    pub fn disable(&self, id: HandlerId) -> Result<()> {
        self.refuse_in_signal_handler("disable")?;
        self.inner.set_enabled(id, false)
    }

    /// Whether handler `id` is enabled.
    pub fn is_enabled(&self, id: HandlerId) -> Result<bool> {
        self.refuse_in_signal_handler("is_enabled")?;
        Ok(self.inner.entry(id)?.enabled.load(Relaxed))
    }

    /// Statistics of handler `id`, read without stopping anyone.
    pub fn stats(&self, id: HandlerId) -> Result<HandlerStats> {
        self.refuse_in_signal_handler("stats")?;
        Ok(self.inner.entry(id)?.stats())
    }

    /// Everything about handler `id`.
    pub fn handler(&self, id: HandlerId) -> Result<HandlerInfo> {
        self.refuse_in_signal_handler("handler")?;
        Ok(info(&*self.inner.entry(id)?))
    }

    /// Every registered handler, by id.
    ///
    /// Not from inside a handler that runs in a signal handler: it locks or allocates
    /// (module docs).
    pub fn handlers(&self) -> Vec<HandlerInfo> {
        let mut v: Vec<HandlerInfo> = self.inner.index.values().iter().map(|e| info(e)).collect();
        v.sort_by_key(|i| i.id);
        v
    }

    /// Number of registered handlers.
    ///
    /// Not from inside a handler that runs in a signal handler: it locks or allocates
    /// (module docs).
    pub fn len(&self) -> usize {
        self.inner.index.len()
    }

    /// Whether no handler is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Statistics of the site at `addr`, if one is registered.
    ///
    /// Not from inside a handler that runs in a signal handler: it locks or allocates
    /// (module docs).
    pub fn site(&self, addr: u64) -> Option<SiteStats> {
        self.inner.lock().get(addr).map(site_stats)
    }

    /// Every site, by address.
    ///
    /// Not from inside a handler that runs in a signal handler: it locks or allocates
    /// (module docs).
    pub fn sites(&self) -> Vec<SiteStats> {
        let w = self.inner.lock();
        let mut v: Vec<SiteStats> = w.views().map(site_stats).collect();
        v.sort_by_key(|s| s.addr);
        v
    }

    /// Free what earlier removals unlinked, as far as possible without waiting (from
    /// inside a handler that runs in a signal handler: nothing).
    pub fn reclaim(&self) {
        if self.in_signal_handler() {
            return;
        }
        self.inner.write().reclaim();
    }

    /// Wait for the grace period of everything removed so far, then free it.
    pub fn synchronize(&self) -> Result<()> {
        self.refuse_in_signal_handler("synchronize")?;
        let stamp = self.inner.write().stamp();
        self.inner.quiesce(stamp, HandlerId(0))
    }
}

fn info(e: &HandlerEntry) -> HandlerInfo {
    HandlerInfo {
        id: e.id,
        addr: e.addr,
        enabled: e.enabled.load(Relaxed),
        exclusive: e.exclusive,
        stats: e.stats(),
    }
}

fn site_stats<S>(v: &SiteView<S>) -> SiteStats {
    SiteStats {
        addr: v.addr(),
        hits: v.shared.hits.read(),
        handlers: v.handlers.len(),
        enabled: v.handlers.iter().filter(|s| s.enabled).count(),
        armed: v.shared.armed.load(Relaxed),
    }
}

/// [`crate::removal::Hooks::collect`] for a registry over `B`.
///
/// # Safety
/// `target` is `Arc::as_ptr` of a live `Inner<B>`.
unsafe fn collect_hook<B: Backend>(target: *const ()) -> u64 {
    // SAFETY: caller contract.
    let inner = unsafe { &*target.cast::<Inner<B>>() };
    let mut w = inner.lock();
    inner.collect(&mut w);
    w.stamp()
}

/// [`crate::removal::Hooks::reclaim`] for a registry over `B`.
///
/// # Safety
/// As for [`collect_hook`].
unsafe fn reclaim_hook<B: Backend>(target: *const ()) {
    // SAFETY: caller contract.
    let inner = unsafe { &*target.cast::<Inner<B>>() };
    inner.lock().reclaim();
}

impl<B: Backend> Inner<B> {
    fn lock(&self) -> MutexGuard<'_, TableWriter<B::Site>> {
        // A panic under the lock (in a backend) leaves the table consistent: every
        // published state is complete. Keep going.
        self.writer.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The writer lock, for an operation that changes the table: pending removals are
    /// finished first (module invariants).
    fn write(&self) -> MutexGuard<'_, TableWriter<B::Site>> {
        let mut w = self.lock();
        self.collect(&mut w);
        w
    }

    /// Finish the removals requested so far ([`crate::removal`]). Returns how many
    /// handlers it unregistered (a request for one unregistered meanwhile only closes
    /// its part of the gate).
    fn collect(&self, w: &mut TableWriter<B::Site>) -> usize {
        let mut taken = 0;
        let mut removed = 0;
        for entry in self.table.removals.take() {
            taken += 1;
            if self
                .index
                .get(&entry.id)
                .is_some_and(|e| Arc::ptr_eq(&e, &entry))
            {
                // As a guard's drop: a failed disarm keeps the site transparent (module
                // invariants), and there is nobody to report it to.
                let _ = self.remove(w, entry.id);
                removed += 1;
            }
        }
        if taken > 0 {
            w.release_gate_after_grace(taken);
        }
        removed
    }

    /// Request the removal of handler `id` (at `addr`, if known) without a lock or an
    /// allocation. Whether `id` is registered (then the removal is, or was, requested).
    fn request_removal(&self, id: HandlerId, addr: Option<u64>) -> bool {
        let table = &self.table;
        table
            .with_entry(id, addr, |e| {
                // SAFETY: `with_entry` runs this inside a read section, with an entry a
                // reachable view holds.
                unsafe { table.removals.request(Arc::as_ptr(e)) };
            })
            .is_some()
    }

    /// Whether handler `id` is in the table, without a lock or an allocation.
    fn holds(&self, id: HandlerId) -> bool {
        self.table.with_entry(id, None, |_| ()).is_some()
    }

    fn entry(&self, id: HandlerId) -> Result<Arc<HandlerEntry>> {
        self.index.get(&id).ok_or(Error::UnknownHandler(id))
    }

    /// Remove handler `id` from the table and the index. The removal itself cannot fail
    /// once the id is known; the second value reports a failed disarm.
    fn remove(
        &self,
        w: &mut TableWriter<B::Site>,
        id: HandlerId,
    ) -> Result<(Arc<HandlerEntry>, Result<()>)> {
        let entry = self.entry(id)?;
        let old = w
            .get(entry.addr)
            .cloned()
            .expect("registry invariant: an indexed handler has a published site");
        let handlers: SmallVec<[Slot; 4]> = old
            .handlers
            .iter()
            .filter(|s| s.entry.id != id)
            .cloned()
            .collect();
        let new = (!handlers.is_empty()).then(|| SiteView::new(Arc::clone(&old.shared), handlers));
        self.index.remove(&id);
        let disarmed = match self.transition(w, entry.addr, Some(&old), new) {
            Ok(None) => Ok(()),
            Ok(Some(e)) | Err(e) => Err(e),
        };
        self.backend
            .handler_removed(entry.addr, &old.shared.data, id);
        Ok((entry, disarmed))
    }

    fn set_enabled(&self, id: HandlerId, on: bool) -> Result<()> {
        let mut w = self.write();
        let entry = self.entry(id)?;
        let old = w
            .get(entry.addr)
            .cloned()
            .expect("registry invariant: an indexed handler has a published site");
        if old
            .handlers
            .iter()
            .any(|s| s.entry.id == id && s.enabled == on)
        {
            return Ok(());
        }
        let handlers = old
            .handlers
            .iter()
            .map(|s| Slot {
                entry: Arc::clone(&s.entry),
                enabled: if s.entry.id == id { on } else { s.enabled },
            })
            .collect();
        let new = SiteView::new(Arc::clone(&old.shared), handlers);
        // An arm failure changed nothing; a disarm failure published the change (hits no
        // longer run a disabled handler), so the mirror follows and the error is reported.
        let stuck = self.transition(&mut w, entry.addr, Some(&old), Some(new))?;
        entry.enabled.store(on, Relaxed);
        w.maybe_reclaim();
        stuck.map_or(Ok(()), Err)
    }

    /// Replace the view of `addr` (`old` → `new`) and bring the breakpoint in step:
    /// publish-then-arm, disarm-then-unpublish.
    ///
    /// `Err`: the arm failed and `old` was published again — nothing changed.
    /// `Ok(None)`: `new` is published and the breakpoint is in step.
    /// `Ok(Some(e))`: `new` is published (the change took effect: hits run exactly its
    /// handlers) but the backend could not remove the breakpoint, which stays, keeping the
    /// site published even if it has no handler left (module invariants).
    fn transition(
        &self,
        w: &mut TableWriter<B::Site>,
        addr: u64,
        old: Option<&SiteView<B::Site>>,
        new: Option<SiteView<B::Site>>,
    ) -> Result<Option<Error>> {
        let shared = match (&new, old) {
            (Some(v), _) | (None, Some(v)) => Arc::clone(&v.shared),
            (None, None) => return Ok(None),
        };
        let armed = shared.armed.load(Relaxed);
        let want = new.as_ref().is_some_and(|v| v.any_enabled());
        let enabled = enabled_of(new.as_ref());
        let tell = || self.tell(addr, &shared.data, &enabled);
        if want && !armed {
            w.set(addr, new);
            if let Err(e) = self.backend.arm(addr, &shared.data) {
                w.set(addr, old.cloned());
                return Err(e);
            }
            shared.armed.store(true, Relaxed);
            tell();
        } else if !want && armed {
            tell();
            match self.backend.disarm(addr, &shared.data) {
                Ok(()) | Err(Error::ProcessGone | Error::CodeGone { .. }) => {
                    shared.armed.store(false, Relaxed);
                    w.set(addr, new);
                }
                Err(e) => {
                    let keep = new.unwrap_or_else(|| SiteView::new(shared, SmallVec::new()));
                    w.set(addr, Some(keep));
                    return Ok(Some(e));
                }
            }
        } else {
            w.set(addr, new);
            if want {
                tell();
            }
        }
        Ok(None)
    }

    /// Tell the backend the enabled handlers now published at `addr`
    /// ([`Backend::handlers_changed`]).
    pub(crate) fn tell(&self, addr: u64, site: &B::Site, enabled: &[Arc<HandlerEntry>]) {
        let list: SmallVec<[(HandlerId, &dyn Handler); 4]> =
            enabled.iter().map(|e| (e.id, &*e.handler)).collect();
        self.backend.handlers_changed(addr, site, &list);
    }

    /// Wait for the grace period of what was unlinked up to `stamp`, then free it —
    /// unless this thread is inside a dispatch, where waiting would wait for itself.
    fn quiesce(&self, stamp: u64, id: HandlerId) -> Result<()> {
        if held::any() {
            return Err(Error::InsideDispatch(id));
        }
        self.table.domain.wait(stamp);
        self.lock().reclaim();
        self.backend.quiesce()
    }
}

/// The enabled handlers of `view`, in order (what [`Inner::tell`] passes on).
pub(crate) fn enabled_of<S>(view: Option<&SiteView<S>>) -> SmallVec<[Arc<HandlerEntry>; 4]> {
    view.iter()
        .flat_map(|v| v.handlers.iter())
        .filter(|s| s.enabled)
        .map(|s| Arc::clone(&s.entry))
        .collect()
}

impl<B: Backend> Drop for Inner<B> {
    fn drop(&mut self) {
        // No dispatcher may reach us from now on; wait for one that is collecting.
        self.table.collector.clear();
        // Requests nobody will collect: every site is disarmed below anyway.
        drop(self.table.removals.take());
        let w = self.writer.get_mut().unwrap_or_else(|p| p.into_inner());
        let addrs: Vec<(u64, bool)> = w
            .views()
            .map(|v| (v.addr(), v.shared.armed.load(Relaxed)))
            .collect();
        for (addr, armed) in addrs {
            if armed {
                if let Some(v) = w.get(addr) {
                    // Best effort: nothing is left to report an error to.
                    let _ = self.backend.disarm(addr, &v.shared.data);
                }
            }
            w.set(addr, None);
        }
        if !held::any() {
            self.table.domain.wait(w.stamp());
        }
        // Whatever is still within its grace period is leaked by the writer's drop, never
        // freed early.
        w.reclaim();
    }
}

/// A registered handler. Dropping it unregisters without waiting (destructors must not
/// block); [`Registration::unregister`] waits and returns the final statistics.
#[must_use = "dropping a Registration unregisters its handler"]
pub struct Registration<B: Backend> {
    registry: Registry<B>,
    id: HandlerId,
    addr: u64,
    owned: bool,
}

impl<B: Backend> std::fmt::Debug for Registration<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("id", &self.id)
            .field("addr", &format_args!("{:#x}", self.addr))
            .finish()
    }
}

impl<B: Backend> Registration<B> {
    /// The handler's id.
    pub fn id(&self) -> HandlerId {
        self.id
    }
    /// The probed address.
    pub fn addr(&self) -> u64 {
        self.addr
    }
    /// The handler's statistics.
    pub fn stats(&self) -> Result<HandlerStats> {
        self.registry.stats(self.id)
    }
    /// Enable the handler.
    pub fn enable(&self) -> Result<()> {
        self.registry.enable(self.id)
    }
    /// Disable the handler.
    pub fn disable(&self) -> Result<()> {
        self.registry.disable(self.id)
    }
    /// Whether the handler is enabled.
    pub fn is_enabled(&self) -> Result<bool> {
        self.registry.is_enabled(self.id)
    }
    /// Unregister and wait; see [`Registry::unregister`].
    pub fn unregister(mut self) -> Result<HandlerStats> {
        self.owned = false;
        self.registry.unregister(self.id)
    }
    /// Give up the guard and keep the handler registered; manage it by id from now on.
    pub fn into_id(mut self) -> HandlerId {
        self.owned = false;
        self.id
    }
}

impl<B: Backend> Drop for Registration<B> {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        let inner = &self.registry.inner;
        if self.registry.in_signal_handler() {
            // Lock-free, as `unregister` from there. (Dropping the registry handle this
            // guard holds is not: if it is the last, the registry is dropped here.)
            inner.request_removal(self.id, Some(self.addr));
            return;
        }
        let mut w = inner.write();
        // Already unregistered by id: nothing to do. A failed disarm keeps the site
        // transparent (module invariants); there is no one to report it to.
        let _ = inner.remove(&mut w, self.id);
        w.maybe_reclaim();
    }
}
