//! Adding handlers in time linear in their number, however many share an address.
//!
//! A site's view is an immutable snapshot, so publishing one more handler copies the
//! site's list (and its walk counter credits every handler of the view): adding k
//! handlers at one address one view at a time costs O(k²) — 47 s for the command's
//! 10,000 probes on one function. Here each site's new list is *staged* and published
//! once, at the end.
//!
//! The result is exactly that of adding the requests one by one, in order: the same
//! errors for the same request, the backend called for the same requests in the same
//! order (the first request of a new site prepares it; a request that changes whether
//! the site's breakpoint is wanted publishes everything staged there so far with itself
//! and arms — or, on a site a failed disarm left armed, disarms again — as
//! `Inner::transition` does), the same handler order at each site. Only the views
//! in between are never published: a hit during the batch sees a site as it was before
//! or as of its last arm, and every hit after the batch returns sees all of it.
//!
//! While the writer lock is held the index may list staged handlers that are not
//! published yet; the registry's invariants hold again when the lock is released.

use std::collections::HashMap;

use smallvec::SmallVec;

use super::{Inner, Request};
use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::removal::Mark;
use crate::stats::HandlerCounters;
use crate::sync::atomic::{AtomicBool, Ordering::Relaxed};
use crate::sync::unmodelled;
use crate::sync::Arc;
use crate::table::{HandlerEntry, SiteShared, SiteView, Slot, TableWriter};
use crate::HandlerId;

/// One site's list as the batch has it so far.
struct Staged<S> {
    addr: u64,
    /// What was published before the batch, taken when the batch first publishes here
    /// (`None` until then): put back if the batch fails.
    before: Option<Option<SiteView<S>>>,
    shared: Arc<SiteShared<S>>,
    handlers: SmallVec<[Slot; 4]>,
    /// The exclusive handler there, if any.
    exclusive: Option<HandlerId>,
    /// Some handler in `handlers` is enabled.
    any_enabled: bool,
    /// `handlers` has more than the published view.
    dirty: bool,
}

impl<B: Backend> Inner<B> {
    /// Add every request, in order, or none: on a failure everything added is removed
    /// again, and the index of the failing request comes with its error.
    pub(super) fn add_all(
        &self,
        w: &mut TableWriter<B::Site>,
        requests: impl IntoIterator<Item = Request>,
    ) -> std::result::Result<Vec<Arc<HandlerEntry>>, (usize, Error)> {
        let mut sites: Vec<Staged<B::Site>> = Vec::new();
        let mut by_addr: HashMap<u64, usize> = HashMap::new();
        let mut added = Vec::new();
        for (index, req) in requests.into_iter().enumerate() {
            match self.stage(w, &mut sites, &mut by_addr, req) {
                Ok(entry) => added.push(entry),
                Err(e) => {
                    self.undo(w, sites, &added);
                    return Err((index, e));
                }
            }
        }
        for s in sites.iter_mut().filter(|s| s.dirty) {
            let handlers = std::mem::take(&mut s.handlers);
            let view = SiteView::new(Arc::clone(&s.shared), handlers);
            let enabled = super::enabled_of(Some(&view));
            w.set(s.addr, Some(view));
            if s.shared.armed.load(Relaxed) {
                self.tell(s.addr, &s.shared.data, &enabled);
            }
        }
        Ok(added)
    }

    /// Stage one request (see the module docs for when it reaches the backend).
    fn stage(
        &self,
        w: &mut TableWriter<B::Site>,
        sites: &mut Vec<Staged<B::Site>>,
        by_addr: &mut HashMap<u64, usize>,
        req: Request,
    ) -> Result<Arc<HandlerEntry>> {
        let addr = req.addr;
        if addr == 0 {
            return Err(Error::InvalidAddress {
                addr,
                reason: "null address",
            });
        }
        let i = match by_addr.get(&addr) {
            Some(&i) => i,
            None => {
                let (shared, handlers) = match w.get(addr) {
                    Some(v) => (Arc::clone(&v.shared), v.handlers.clone()),
                    None => (
                        Arc::new(SiteShared {
                            addr,
                            data: self.backend.prepare(addr)?,
                            hits: Arc::default(),
                            armed: AtomicBool::new(false),
                        }),
                        SmallVec::new(),
                    ),
                };
                sites.push(Staged {
                    addr,
                    exclusive: handlers
                        .iter()
                        .find(|s| s.entry.exclusive)
                        .map(|s| s.entry.id),
                    any_enabled: handlers.iter().any(|s| s.enabled),
                    before: None,
                    shared,
                    handlers,
                    dirty: false,
                });
                by_addr.insert(addr, sites.len() - 1);
                sites.len() - 1
            }
        };
        let s = &mut sites[i];
        if let Some(holder) = s.exclusive {
            return Err(Error::ExclusiveConflict {
                addr,
                holder,
                holder_exclusive: true,
            });
        }
        if let (true, Some(first)) = (req.options.exclusive, s.handlers.first()) {
            return Err(Error::ExclusiveConflict {
                addr,
                holder: first.entry.id,
                holder_exclusive: false,
            });
        }
        let has_ret = req.handler.has_ret();
        if has_ret {
            // A return probe pairs a call's entry with its return: only at a function's
            // first instruction (rule 10), which only the backend can tell.
            self.backend.check_return(addr, &s.shared.data)?;
        }
        let enabled = !req.options.disabled;
        let has_post = req.handler.has_post();
        let entry = Arc::new(HandlerEntry {
            id: HandlerId(self.next_id.fetch_add(1, Relaxed)),
            addr,
            handler: req.handler,
            has_post,
            has_ret,
            exclusive: req.options.exclusive,
            enabled: unmodelled::AtomicBool::new(enabled),
            counters: HandlerCounters::new(),
            tally: Arc::default(),
            mark: Mark::new(&self.table.removals),
        });
        s.handlers.push(Slot {
            entry: Arc::clone(&entry),
            enabled,
        });
        let was_enabled = s.any_enabled;
        s.any_enabled |= enabled;
        if s.any_enabled != s.shared.armed.load(Relaxed) {
            // Where one-by-one adding calls the backend. A failed arm changed nothing
            // (the last published view is back); a disarm retried on a site an earlier
            // failure kept armed may fail again: the handler is added all the same.
            let old = w.get(addr).cloned();
            let new = SiteView::new(Arc::clone(&s.shared), s.handlers.clone());
            if let Err(e) = self.transition(w, addr, old.as_ref(), Some(new)) {
                s.handlers.pop();
                s.any_enabled = was_enabled;
                return Err(e);
            }
            s.before.get_or_insert(old);
            s.dirty = false;
        } else {
            s.dirty = true;
        }
        if entry.exclusive {
            s.exclusive = Some(entry.id);
        }
        self.index.insert(entry.id, Arc::clone(&entry));
        Ok(entry)
    }

    /// Take back a failed batch: forget its handlers and put back each site it
    /// published, newest first (disarming what it armed; a disarm that fails leaves a
    /// transparent site, as the module invariants allow).
    fn undo(
        &self,
        w: &mut TableWriter<B::Site>,
        sites: Vec<Staged<B::Site>>,
        added: &[Arc<HandlerEntry>],
    ) {
        for e in added {
            self.index.remove(&e.id);
        }
        for s in sites.into_iter().rev() {
            let Some(before) = s.before else {
                continue;
            };
            let now = w.get(s.addr).cloned();
            let before = before.map(|v| SiteView::new(Arc::clone(&v.shared), v.handlers.clone()));
            let _ = self.transition(w, s.addr, now.as_ref(), before);
        }
    }
}
