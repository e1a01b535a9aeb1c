use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[inline(never)]
#[no_mangle]
pub extern "C" fn smoke_target(x: u64) -> u64 {
    std::hint::black_box(x).wrapping_mul(3).wrapping_add(1)
}

#[test]
fn one_probe_counts() {
    let reg = multiprobe_backend_sigtrap::registry();
    let n = Arc::new(AtomicU64::new(0));
    let n2 = Arc::clone(&n);
    let a = smoke_target as *const () as u64;
    let g = reg
        .register(a, move |_h: &mut multiprobe_core::Hit<'_>| {
            n2.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap();
    for i in 0..10 {
        assert_eq!(smoke_target(i), i * 3 + 1);
    }
    assert_eq!(n.load(Ordering::Relaxed), 10);
    g.unregister().unwrap();
    smoke_target(1);
    assert_eq!(n.load(Ordering::Relaxed), 10);
}
