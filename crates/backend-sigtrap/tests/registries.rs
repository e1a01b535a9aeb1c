//! Dropping a registry gives every byte it armed back to the program before the drop
//! returns: with several registries at once, on several threads, over code other threads
//! keep running — they prepare sites concurrently (the process-wide tables every backend
//! shares: the known addresses, the armed bytes, slot memory), arm and disarm under hits
//! — and for code in anonymous memory whose mapping the kernel split or merged meanwhile.

mod asm;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Barrier};

use asm::*;
use multiprobe_core::{FnHandler, Hit, PreAction};

const REGISTRIES: usize = 4;

/// Threads calling the sled until told to stop; each checks every result.
fn hitters(n: usize, stop: &Arc<AtomicBool>) -> Vec<std::thread::JoinHandle<u64>> {
    (0..n as u64)
        .map(|t| {
            let stop = Arc::clone(stop);
            std::thread::spawn(move || {
                let mut calls = 0;
                while !stop.load(Relaxed) {
                    // SAFETY: integer in, integer out.
                    assert_eq!(unsafe { mp_t_sled(t) }, t + SLED_LEN as u64);
                    calls += 1;
                }
                calls
            })
        })
        .collect()
}

/// One round of one registry's life on its own thread: its share of the sites, every
/// kind of registration, some churn while the others do the same, then its drop, after
/// which its bytes must be back.
fn one_registry(
    mine: &[u64],
    original: &[(u64, u8)],
    round: usize,
    start: &Barrier,
    hits: &AtomicU64,
) {
    start.wait();
    let reg = multiprobe_backend_sigtrap::registry();
    let mut guards = Vec::new();
    for (k, &a) in mine.iter().enumerate() {
        let h = FnHandler::new()
            .pre(|_h: &mut Hit<'_>| PreAction::Continue)
            .post(|_h: &mut Hit<'_>| {});
        let g = if k % 2 == 0 {
            reg.register_handler(a, h)
        } else {
            reg.register(a, |_h: &mut Hit<'_>| {})
        }
        .unwrap_or_else(|e| panic!("round {round}: {a:#x}: {e}"));
        match (k + round) % 3 {
            // Kept by id only: the registry's drop must disarm it.
            0 => {
                let _ = g.into_id();
            }
            // Unregistered and registered again while the code runs: disarm, re-arm.
            1 => {
                hits.fetch_add(g.unregister().unwrap().hits, Relaxed);
                let g = reg.register(a, |_h: &mut Hit<'_>| {}).unwrap();
                guards.push(g);
            }
            _ => guards.push(g),
        }
        std::thread::yield_now();
    }
    // A guard holds its registry, so all of them go first: half by drop (no wait), half
    // by unregister.
    for (k, g) in guards.into_iter().enumerate() {
        if k % 2 == 0 {
            drop(g);
        } else {
            hits.fetch_add(g.unregister().unwrap().hits, Relaxed);
        }
    }
    drop(reg);
    for &(a, b) in original.iter().filter(|(a, _)| mine.contains(a)) {
        // Restored — unless a site of another registry was promoted meanwhile and its
        // jump covers this byte now (sites sit on every instruction of the sled). That
        // one may be demoted again while we look: look again.
        let ok = (0..1000).any(|_| {
            let now = bytes(a, 1)[0];
            let ok = now == b || multiprobe_backend_sigtrap::jump_covering(a).is_some();
            if !ok {
                std::thread::yield_now();
            }
            ok
        });
        assert!(
            ok,
            "round {round}: byte at {a:#x} not restored when its registry was dropped"
        );
    }
}

#[test]
fn registries_on_several_threads_restore_every_byte_when_dropped() {
    let sites = sled_sites();
    let original: Vec<(u64, u8)> = sites.iter().map(|&a| (a, bytes(a, 1)[0])).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let running = hitters(2, &stop);
    let hits = AtomicU64::new(0);
    for round in 0..12 {
        let start = Barrier::new(REGISTRIES);
        std::thread::scope(|s| {
            for r in 0..REGISTRIES {
                // A different share each round, so every site changes hands.
                let mine: Vec<u64> = sites
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (i + round) % REGISTRIES == r)
                    .map(|(_, &a)| a)
                    .collect();
                let (original, start, hits) = (&original, &start, &hits);
                s.spawn(move || one_registry(&mine, original, round, start, hits));
            }
        });
        for &(a, b) in &original {
            assert_eq!(bytes(a, 1)[0], b, "round {round}: {a:#x}");
        }
    }
    stop.store(true, SeqCst);
    let calls: u64 = running.into_iter().map(|h| h.join().unwrap()).sum();
    eprintln!(
        "{calls} calls, {} hits counted at unregister, {} traps re-executed",
        hits.load(Relaxed),
        multiprobe_backend_sigtrap::reexecuted_traps()
    );
    assert!(calls > 0);
}

/// Code in anonymous memory (JIT-style: written, then made read+exec) whose mapping is
/// split or merged after it was probed: a JIT changing the protection of other pages of
/// its code region, or the kernel merging adjacent anonymous mappings that have the same
/// flags (the backend's own `mprotect` fallback for patching does both, briefly). The
/// code is still there: dropping the registry must restore its byte.
#[test]
fn code_in_anonymous_memory_is_restored_after_its_mapping_was_split_or_merged() {
    const PAGE: usize = 4096;
    // `lea rax, [rdi + 9]; ret`, then int3 padding.
    let func = [0x48, 0x8d, 0x47, 0x09, 0xc3];
    for split in [true, false] {
        // SAFETY: a fresh anonymous mapping of our own.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                3 * PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        } as usize;
        assert_ne!(base as *mut libc::c_void, libc::MAP_FAILED);
        let code = base + PAGE;
        let protect = |at: usize, pages: usize, prot: libc::c_int| {
            // SAFETY: pages of our own mapping; none of them is running code.
            let r = unsafe { libc::mprotect(at as *mut _, pages * PAGE, prot) };
            assert_eq!(r, 0);
        };
        // SAFETY: our mapping, writable.
        unsafe {
            std::ptr::write_bytes(code as *mut u8, 0xcc, PAGE);
            std::ptr::copy_nonoverlapping(func.as_ptr(), code as *mut u8, func.len());
        }
        let rx = libc::PROT_READ | libc::PROT_EXEC;
        if split {
            // One mapping of three pages; later its first page changes protection.
            protect(base, 3, rx);
        } else {
            // Three mappings; later they become one.
            protect(base, 1, libc::PROT_READ);
            protect(code, 1, rx);
        }
        // SAFETY: the function just written: integer in, integer out.
        let f: extern "C" fn(u64) -> u64 = unsafe { std::mem::transmute(code) };
        let reg = multiprobe_backend_sigtrap::registry();
        let _ = reg
            .register(code as u64, |_h: &mut Hit<'_>| {})
            .unwrap()
            .into_id();
        assert_eq!(f(1), 10);
        assert_eq!(bytes(code as u64, 1), [0xcc]);
        if split {
            protect(base, 1, libc::PROT_READ);
        } else {
            protect(base, 1, rx);
            protect(code + PAGE, 1, rx);
        }
        assert_eq!(f(2), 11);
        drop(reg);
        assert_eq!(
            bytes(code as u64, func.len()),
            func,
            "the probed byte was left behind (split: {split})"
        );
        assert_eq!(f(3), 12);
        // SAFETY: the three pages are ours.
        unsafe { libc::munmap(base as *mut libc::c_void, 3 * PAGE) };
    }
}
