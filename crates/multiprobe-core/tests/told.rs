//! `Backend::handlers_changed`: a backend is told the enabled handlers of a site, in
//! order, after every change, and can recognise handler values through
//! `Handler::as_any`.

mod common;

use std::sync::{Arc, Mutex};

use multiprobe_core::testing::TestBackend;
use multiprobe_core::{Handler, HandlerId, Registry, Request};

/// A handler value a backend recognises: its tag.
struct Tagged(u32);
impl Handler for Tagged {
    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// One call: (addr, [(id, tag if a `Tagged`)]).
type Told = (u64, Vec<(HandlerId, Option<u32>)>);
/// What the backend was told.
type Log = Arc<Mutex<Vec<Told>>>;

/// A test backend that logs what it is told.
fn telling(log: &Log) -> common::Shared {
    let log = Arc::clone(log);
    common::Shared::telling(Arc::new(TestBackend::new()), move |addr, enabled| {
        let list = enabled
            .iter()
            .map(|&(id, h)| {
                (
                    id,
                    h.as_any()
                        .and_then(|a| a.downcast_ref::<Tagged>())
                        .map(|t| t.0),
                )
            })
            .collect();
        log.lock().unwrap().push((addr, list));
    })
}

fn take(log: &Log) -> Vec<Told> {
    std::mem::take(&mut *log.lock().unwrap())
}

#[test]
fn the_backend_is_told_every_change_of_the_enabled_list_in_order() {
    let log: Log = Arc::default();
    let r = Registry::new(telling(&log));
    let a = r.register_handler(0x1000, Tagged(7)).unwrap();
    let b = r.register(0x1000, |_| {}).unwrap();
    let c = r.register_handler(0x1000, Tagged(9)).unwrap();
    let (ia, ib, ic) = (a.id(), b.id(), c.id());
    assert_eq!(
        take(&log),
        vec![
            (0x1000, vec![(ia, Some(7))]),
            (0x1000, vec![(ia, Some(7)), (ib, None)]),
            (0x1000, vec![(ia, Some(7)), (ib, None), (ic, Some(9))]),
        ]
    );
    b.disable().unwrap();
    assert_eq!(
        take(&log),
        vec![(0x1000, vec![(ia, Some(7)), (ic, Some(9))])]
    );
    b.enable().unwrap();
    assert_eq!(
        take(&log),
        vec![(0x1000, vec![(ia, Some(7)), (ib, None), (ic, Some(9))])]
    );
    a.unregister().unwrap();
    assert_eq!(take(&log), vec![(0x1000, vec![(ib, None), (ic, Some(9))])]);
    b.disable().unwrap();
    c.disable().unwrap();
    // The last enabled one going: told the empty list (before the disarm).
    assert_eq!(
        take(&log),
        vec![(0x1000, vec![(ic, Some(9))]), (0x1000, vec![])]
    );
    // Nothing enabled, nothing armed: a change there is not news to the backend.
    drop(b);
    assert_eq!(take(&log), vec![]);
    c.enable().unwrap();
    assert_eq!(take(&log), vec![(0x1000, vec![(ic, Some(9))])]);
    drop(c);
    assert_eq!(take(&log), vec![(0x1000, vec![])]);
}

#[test]
fn a_batch_tells_each_site_once_with_its_whole_list() {
    let log: Log = Arc::default();
    let r = Registry::new(telling(&log));
    let regs = r
        .register_batch([
            Request::handler(0x2000, Tagged(1)),
            Request::handler(0x2000, Tagged(2)),
            Request::handler(0x3000, Tagged(3)),
        ])
        .unwrap();
    let mut got = take(&log);
    got.sort_by_key(|e| (e.0, e.1.len()));
    let last_of = |addr| got.iter().rfind(|e| e.0 == addr).cloned();
    assert_eq!(
        last_of(0x2000),
        Some((
            0x2000,
            vec![(regs[0].id(), Some(1)), (regs[1].id(), Some(2))]
        ))
    );
    assert_eq!(
        last_of(0x3000),
        Some((0x3000, vec![(regs[2].id(), Some(3))]))
    );
}
