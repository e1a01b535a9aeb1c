//! Three independent handlers on the entry of one Rust function, one breakpoint
//! underneath: a counter, an argument tracer that hands records to a normal thread
//! through a lock-free ring (handlers run in signal context: no printing there), and a
//! post-handler that sees the result.
//!
//! Run: `cargo run -p multiprobe-backend-sigtrap --example trace`

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use multiprobe_backend_sigtrap::{fn_addr, HitRecord, HitRing};
use multiprobe_core::{FnHandler, PreAction};

#[inline(never)]
fn checksum(data: &[u8], seed: u64) -> u64 {
    data.iter()
        .fold(seed, |h, &b| h.rotate_left(5) ^ u64::from(b))
}

fn main() {
    let reg = multiprobe_backend_sigtrap::registry();
    let addr = fn_addr(checksum as fn(&'static [u8], u64) -> u64);

    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    let counter = reg
        .register(addr, move |_h| {
            c.fetch_add(1, Relaxed);
        })
        .expect("probe checksum");

    let ring = Arc::new(HitRing::<HitRecord>::new(1024));
    let r = Arc::clone(&ring);
    let tracer = reg
        .register(addr, move |h| {
            r.push(HitRecord::of(h));
        })
        .expect("second handler, same address");

    let results = Arc::new(HitRing::<u64>::new(1024));
    let out = Arc::clone(&results);
    let post = reg
        .register_handler(
            addr,
            FnHandler::new()
                .pre(|_h| PreAction::Continue)
                .post(move |h| {
                    // After the first instruction only: the function has not returned
                    // yet. Record where the thread is.
                    out.push(h.regs().rip);
                }),
        )
        .expect("third handler");

    let reader = {
        let ring = Arc::clone(&ring);
        std::thread::spawn(move || {
            let mut seen = 0;
            while seen < 5 {
                while let Some(rec) = ring.pop() {
                    println!(
                        "hit {:#x} on thread {}: data={:#x} len={} seed={}",
                        rec.addr, rec.tid, rec.args[0], rec.args[1], rec.args[2]
                    );
                    seen += 1;
                }
                std::thread::yield_now();
            }
        })
    };

    let data = b"multiprobe";
    for seed in 0..5 {
        println!("checksum(seed {seed}) = {:#x}", checksum(data, seed));
    }
    reader.join().unwrap();
    println!(
        "post-handler saw the thread continue at {:#x} (probe at {addr:#x})",
        results.pop().unwrap_or(0)
    );
    println!("counter: {}", calls.load(Relaxed));
    for (name, g) in [("counter", counter), ("tracer", tracer), ("post", post)] {
        println!("{name}: {:?}", g.unregister().unwrap());
    }
    println!(
        "site removed, original bytes back: {:02x?}",
        first_bytes(addr)
    );
}

fn first_bytes(addr: u64) -> [u8; 4] {
    let mut b = [0u8; 4];
    // SAFETY: code of this program is mapped readable.
    unsafe { std::ptr::copy_nonoverlapping(addr as *const u8, b.as_mut_ptr(), 4) };
    b
}
