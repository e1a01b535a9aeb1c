//! Hit counts derived from one counter per walk instead of one per handler.
//!
//! A hit bumps one counter: the walk counter of the [`crate::table::SiteView`] it
//! dispatched through. Every enabled handler of that view is reached by the walk unless
//! an earlier handler ends it (redirect), which is rare and counted per handler as
//! *skipped*. So a handler's hits are the walks of every view that listed it enabled,
//! minus its skips, and a site's hits are the walks of all its views. That keeps the
//! cost of each extra handler down to calling it (`benches/core_dispatch`).
//!
//! A [`Tally`] (one per handler, one per site) adds up those walks: the counters of the
//! views still alive that credit it, plus what retired views folded in when they were
//! freed. A view is freed only after its grace period, so its counter is final by then.
//!
//! Invariant: a walk counter is either listed live in each tally it credits or folded
//! into it, never both and never neither, as seen under that tally's lock: a [`Walks`]
//! registers its counter with every tally on creation and, when dropped, folds and
//! unlists it under the same lock. Readers take the lock, so a read is exact once hits
//! stop, and a lower bound while they run (the counters are read with relaxed loads).

use smallvec::SmallVec;

use crate::stats::SiteCounter;
use crate::sync::{Arc, Mutex, MutexGuard};

/// Where the walks credited to one handler or one site add up.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    inner: Mutex<TallyInner>,
}

#[derive(Debug, Default)]
struct TallyInner {
    /// Walks of views already freed.
    folded: u64,
    /// Counters of the views alive now that credit this tally.
    live: SmallVec<[Arc<SiteCounter>; 2]>,
}

impl Tally {
    fn lock(&self) -> MutexGuard<'_, TallyInner> {
        // Every critical section below leaves the tally consistent.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every walk credited so far.
    pub(crate) fn read(&self) -> u64 {
        let t = self.lock();
        t.folded + t.live.iter().map(|c| c.read()).sum::<u64>()
    }
}

/// The walk counter of one view, and the tallies it credits. Shared by every copy of
/// the view (a bucket copied for another site keeps it); dropped with the last copy,
/// which happens after the view's grace period.
#[derive(Debug)]
pub(crate) struct Walks {
    counter: Arc<SiteCounter>,
    credits: SmallVec<[Arc<Tally>; 4]>,
}

impl Walks {
    /// A fresh counter crediting `credits` (the site's tally and those of the view's
    /// enabled handlers).
    pub(crate) fn new(credits: SmallVec<[Arc<Tally>; 4]>) -> Arc<Walks> {
        let counter = Arc::new(SiteCounter::new());
        for t in &credits {
            t.lock().live.push(Arc::clone(&counter));
        }
        Arc::new(Walks { counter, credits })
    }

    /// The counter a hit bumps.
    pub(crate) fn counter(&self) -> &Arc<SiteCounter> {
        &self.counter
    }
}

impl Drop for Walks {
    fn drop(&mut self) {
        // No reader can reach the view any more (module docs): the count is final.
        let n = self.counter.read();
        for t in &self.credits {
            let mut t = t.lock();
            t.folded += n;
            t.live.retain(|c| !Arc::ptr_eq(c, &self.counter));
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::shard::Shard;

    const SHARD: Shard = Shard {
        index: 0,
        exclusive: false,
    };

    #[test]
    fn walks_count_live_then_folded_once() {
        let site = Arc::new(Tally::default());
        let a = Arc::new(Tally::default());
        let b = Arc::new(Tally::default());
        let v1 = Walks::new([Arc::clone(&site), Arc::clone(&a)].into_iter().collect());
        v1.counter().hit(SHARD);
        v1.counter().hit(SHARD);
        let v2 = Walks::new(
            [Arc::clone(&site), Arc::clone(&a), Arc::clone(&b)]
                .into_iter()
                .collect(),
        );
        v2.counter().hit(SHARD);
        assert_eq!((site.read(), a.read(), b.read()), (3, 3, 1));
        let copy = Arc::clone(&v1);
        drop(v1);
        assert_eq!(a.read(), 3, "a copy keeps it live");
        drop(copy);
        drop(v2);
        assert_eq!((site.read(), a.read(), b.read()), (3, 3, 1));
        assert!(site.lock().live.is_empty(), "folded, not listed");
    }
}
