//! Divergences of the core from its contract that the simulator's reference model
//! (crates/backend-sim)
//! found, each reduced to a minimal test on the core's own `TestBackend`.

use multiprobe_core::testing::TestBackend;
use multiprobe_core::{Hit, Registry, Regs, ThreadState};

/// Found by the `ops` model (generated case: disable while `disarm` is made to fail).
///
/// `disable` publishes the disabled view before asking the backend to disarm; when
/// the disarm fails the breakpoint (and the view) stay, so hits no longer run the
/// handler — but the registry's enabled flag was left `true`, so `is_enabled` and
/// `handlers()` said the handler was enabled while it ran nothing.
#[test]
fn is_enabled_agrees_with_dispatch_after_a_failed_disarm() {
    let r = Registry::new(TestBackend::new());
    let id = r.register(0x1000, |_: &mut Hit<'_>| {}).unwrap().into_id();
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
