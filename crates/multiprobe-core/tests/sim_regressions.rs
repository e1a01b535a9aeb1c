//! Divergences of the core from its contract that the simulator's reference model
//! (crates/backend-sim)
//! found, each reduced to a minimal test on the core's own `TestBackend`.

use multiprobe_core::backend::ThreadState;
use multiprobe_core::testing::TestBackend;
use multiprobe_core::{Registry, Regs};

/// Found by the `ops` model (generated case: disable while `disarm` is made to fail).
///
/// `disable` publishes the disabled view before asking the backend to disarm; when
/// the disarm fails the breakpoint (and the view) stay, so hits no longer run the
/// handler — but the registry's enabled flag was left `true`, so `is_enabled` and
/// `handlers()` said the handler was enabled while it ran nothing.
#[test]
fn is_enabled_agrees_with_dispatch_after_a_failed_disarm() {
    let r = Registry::new(TestBackend::new());
    let id = r.register(0x1000, |_| {}).unwrap().into_id();
    r.backend().set_fail_disarm_at(0x1000, true);
    assert!(
        r.disable(id).is_err(),
        "the injected disarm failure is reported"
    );

    let ts = ThreadState::new();
    let mut regs = Regs::default();
    r.backend().hit(&ts, 1, 0x1000, &mut regs);
    let ran = r.stats(id).unwrap().hits == 1;
    assert_eq!(
        r.is_enabled(id).unwrap(),
        ran,
        "is_enabled must say whether hits run the handler"
    );
    assert_eq!(r.handler(id).unwrap().enabled, ran);
}

/// Found by the `ops` model (a generated case registering a disabled handler at a site
/// that an earlier failed disarm had kept armed, with the disarm still failing).
///
/// Adding a handler re-runs the site's arm/disarm step; with nothing enabled it retried
/// the disarm, which failed, so `register` returned the backend's error — but the view
/// with the new handler had already been published and the handler was never put in
/// the index: a zombie that `sites()` counted and nothing could unregister, while the
/// caller was told the registration failed.
#[test]
fn a_registration_is_not_half_applied_when_a_retried_disarm_fails() {
    use multiprobe_core::Options;
    let r = Registry::new(TestBackend::new());
    let first = r.register(0x1000, |_| {}).unwrap().into_id();
    r.backend().set_fail_disarm_at(0x1000, true);
    assert!(
        r.unregister(first).is_err(),
        "the injected disarm failure is reported"
    );
    assert_eq!(
        r.site(0x1000).map(|s| (s.handlers, s.armed)),
        Some((0, true))
    );

    let second = r.register_with(0x1000, |_| {}, Options::default().disabled());
    let listed = r.handlers().len();
    let in_view = r.site(0x1000).map_or(0, |s| s.handlers);
    assert_eq!(
        listed, in_view,
        "the registry lists {listed} handlers but the published view holds {in_view} ({second:?})"
    );
    if let Ok(g) = second {
        assert!(r.unregister(g.into_id()).is_err(), "the disarm still fails");
    }
    assert_eq!(r.site(0x1000).map(|s| s.handlers), Some(0));
}
