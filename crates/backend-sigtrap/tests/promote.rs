//! Trap-free (jump-optimized) sites: promotion and demotion under load with exact
//! counts, the region checks' refusals reported per site, the program's vector and x87
//! state across handlers that clobber it, failed promotions, and every byte restored
//! when the registry goes.

mod regions;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::{Arc, Mutex};

use multiprobe_backend_sigtrap::{Mode, SigtrapBackend, TrapReason};
use multiprobe_core::{Hit, Registry};
use multiprobe_x86::{RegionRefusal, JMP_LEN};
use regions::*;

/// Tests that toggle promotion or block signals run one at a time.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

fn counter(c: &Arc<AtomicU64>) -> impl Fn(&mut Hit<'_>) + Send + Sync + 'static {
    let c = Arc::clone(c);
    move |_h: &mut Hit<'_>| {
        c.fetch_add(1, Relaxed);
    }
}

#[test]
fn promotion_and_demotion_ten_thousand_times_under_two_calling_threads_keep_exact_counts() {
    let _s = serial();
    let reg = Registry::new(SigtrapBackend::with_promotion(true));
    let a = addr(mp_r_plain as *const ());
    let orig = bytes(a, 16);
    let hits = Arc::new(AtomicU64::new(0));
    let g = reg.register(a, counter(&hits)).unwrap();
    assert_eq!(reg.backend().mode_at(a), Some(Mode::Jump));
    assert_eq!(
        bytes(a, 1)[0],
        0xe9,
        "a promoted site starts with jmp rel32"
    );
    let stop = Arc::new(AtomicBool::new(false));
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(Relaxed) {
                    // SAFETY: an assembly function taking and returning integers.
                    assert_eq!(unsafe { mp_r_plain(n) }, n + 1);
                    n += 1;
                }
                n
            })
        })
        .collect();
    for i in 0..10_000 {
        reg.backend().demote(a).unwrap();
        let now = bytes(a, 16);
        assert_eq!(now[0], 0xcc, "round {i}: an int3 site after demotion");
        assert_eq!(
            &now[1..],
            &orig[1..],
            "round {i}: original bytes after the int3"
        );
        assert!(matches!(
            reg.backend().mode_at(a),
            Some(Mode::Trap(TrapReason::Kept))
        ));
        assert_eq!(reg.backend().promote(a).unwrap(), Mode::Jump, "round {i}");
    }
    stop.store(true, Relaxed);
    let made: u64 = calls.into_iter().map(|t| t.join().unwrap()).sum();
    let stats = g.unregister().unwrap();
    assert_eq!(stats.hits, made, "every call counted exactly once");
    assert_eq!(hits.load(Relaxed), made);
    assert_eq!(bytes(a, 16), orig, "all bytes back");
}

#[test]
fn functions_the_checks_refuse_stay_int3_sites_with_the_reason() {
    let _s = serial();
    let reg = Registry::new(SigtrapBackend::with_promotion(true));
    let hits = Arc::new(AtomicU64::new(0));
    type Want = fn(RegionRefusal) -> bool;
    let entered = addr(mp_r_entered as *const ());
    let cases: [(u64, Want); 5] = [
        (addr(mp_r_loop as *const ()), |r| {
            matches!(r, RegionRefusal::BranchInto { .. })
        }),
        // The branch is another function's: promoted, its jump would take it into the
        // middle of the jump (before, this crashed at the call of `mp_r_enters` below).
        (entered, |r| {
            let enters = addr(mp_r_enters as *const ());
            matches!(r, RegionRefusal::BranchInto { from, to }
                if (enters..enters + 16).contains(&from) && to == addr(mp_r_entered as *const ()) + 3)
        }),
        (addr(mp_r_outer as *const ()), |r| {
            r == RegionRefusal::OtherEntry {
                at: addr(mp_r_inner as *const ()),
            }
        }),
        (addr(mp_r_table as *const ()), |r| {
            matches!(r, RegionRefusal::IndirectJump { .. })
        }),
        (addr(mp_r_call as *const ()), |r| {
            matches!(r, RegionRefusal::ControlFlowInside { .. })
        }),
    ];
    let mut guards = Vec::new();
    for (a, want) in cases {
        guards.push(reg.register(a, counter(&hits)).unwrap());
        match reg.backend().mode_at(a) {
            Some(Mode::Trap(TrapReason::Region(r))) => {
                assert!(want(r), "{a:#x}: {r}");
                assert!(!r.to_string().is_empty());
            }
            other => panic!("{a:#x}: {other:?}"),
        }
        assert_eq!(bytes(a, 1)[0], 0xcc);
    }
    extern "C" fn seven() -> u64 {
        7
    }
    // SAFETY: assembly functions taking and returning integers (and a C callback).
    unsafe {
        assert_eq!(mp_r_loop(5), 5);
        assert_eq!(mp_r_table(2), 10);
        assert_eq!(mp_r_table(3), 20);
        assert_eq!(mp_r_call(0, seven), 8);
        assert_eq!(mp_r_entered(5), 6);
        assert_eq!(mp_r_enters(5), 16);
        assert_eq!(mp_r_outer(5), 6);
        mp_r_inner();
    }
    assert_eq!(hits.load(Relaxed), 6, "trap sites still count every hit");
    // A site kept as int3 on request.
    let backend = SigtrapBackend::with_promotion(true);
    let a = addr(mp_r_plain as *const ());
    backend.keep_as_trap(a);
    let reg2 = Registry::new(backend);
    let g = reg2.register(a, counter(&hits)).unwrap();
    assert_eq!(
        reg2.backend().mode_at(a),
        Some(Mode::Trap(TrapReason::Kept))
    );
    // SAFETY: as above.
    assert_eq!(unsafe { mp_r_plain(1) }, 2);
    assert_eq!(g.unregister().unwrap().hits, 1);
}

/// The vector test's input: random zmm bytes and opmasks, three x87 doubles, MXCSR with
/// round-down and a sticky flag.
fn vector_input() -> Vec<u8> {
    let mut x = 0x1234_5678_9abc_def1u64;
    let mut v: Vec<u8> = (0..VEC_LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for (i, d) in [1.5f64, -2.25, 1e10].iter().enumerate() {
        v[2112 + 8 * i..2120 + 8 * i].copy_from_slice(&d.to_le_bytes());
    }
    v[2136..2140].copy_from_slice(&0x3f81u32.to_le_bytes());
    v
}

fn run_vec(input: &[u8]) -> Vec<u8> {
    let mut out = vec![0u8; VEC_LEN];
    // SAFETY: both buffers have VEC_LEN bytes.
    unsafe { mp_r_vec(input.as_ptr(), out.as_mut_ptr()) };
    out
}

#[test]
fn vector_and_x87_values_live_across_the_probe_survive_a_clobbering_handler() {
    let cpu = multiprobe_x86::CpuState::get();
    if !cpu.avx512 || !cpu.avx512bw {
        eprintln!("this CPU has no AVX-512BW: mp_r_vec cannot run; skipped");
        return;
    }
    let _s = serial();
    let input = vector_input();
    let want = run_vec(&input);
    let reg = Registry::new(SigtrapBackend::with_promotion(true));
    let a = addr(mp_r_vec_probe as *const ());
    let big = Arc::new(Mutex::new((vec![1u8; 1 << 20], vec![0u8; 1 << 20])));
    let b = Arc::clone(&big);
    let calls = Arc::new(AtomicU64::new(0));
    let c = Arc::clone(&calls);
    let g = reg
        .register(a, move |_h: &mut Hit<'_>| {
            // A large memcpy (libc's uses the widest vectors there are), then every
            // vector and opmask register and the x87 stack on purpose.
            let mut g = b.lock().unwrap();
            let (src, dst) = &mut *g;
            dst.copy_from_slice(src);
            // SAFETY: clobbers only registers declared as such, and balances the x87
            // stack it uses (leaving a divide-by-zero flag set).
            unsafe {
                core::arch::asm!(
                    "vpternlogd zmm0, zmm0, zmm0, 0xff",
                    "vpternlogd zmm15, zmm15, zmm15, 0xff",
                    "vpternlogd zmm16, zmm16, zmm16, 0xff",
                    "vpternlogd zmm31, zmm31, zmm31, 0xff",
                    "kxnorq k1, k1, k1",
                    "kxnorq k7, k7, k7",
                    "fld1", "fldz", "fdivp st(1), st", "fstp st(0)",
                    out("zmm0") _, out("zmm15") _, out("zmm16") _, out("zmm31") _,
                    out("k1") _, out("k7") _,
                );
            }
            c.fetch_add(1, SeqCst);
        })
        .unwrap();
    assert_eq!(reg.backend().mode_at(a), Some(Mode::Jump));
    for _ in 0..3 {
        let got = run_vec(&input);
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(
                w, g,
                "byte {i} of the vector/x87 state changed across the probe"
            );
        }
    }
    assert_eq!(calls.load(SeqCst), 3);
    // And on a trap site the same holds (the kernel saves the state there).
    reg.backend().demote(a).unwrap();
    assert_eq!(run_vec(&input), want);
    drop(g);
}

#[test]
fn a_thread_that_does_not_answer_the_check_leaves_a_working_int3_site() {
    let _s = serial();
    let reg = Registry::new(SigtrapBackend::with_promotion(true));
    let a = addr(mp_r_plain as *const ());
    let orig = bytes(a, 16);
    // A thread with SIGFPE blocked (the check signal), asleep.
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let s2 = Arc::clone(&stop);
    let t = std::thread::spawn(move || {
        // SAFETY: blocking SIGFPE on this thread with a valid set.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGFPE);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        tx.send(()).unwrap();
        while !s2.load(Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    });
    rx.recv().unwrap();
    let hits = Arc::new(AtomicU64::new(0));
    let g = reg.register(a, counter(&hits)).unwrap();
    match reg.backend().mode_at(a) {
        Some(Mode::Trap(TrapReason::Threads(why))) => {
            assert!(why.contains("did not answer"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    let now = bytes(a, 16);
    assert_eq!((now[0], &now[1..]), (0xcc, &orig[1..]));
    // SAFETY: as above.
    assert_eq!(unsafe { mp_r_plain(4) }, 5);
    assert_eq!(hits.load(Relaxed), 1);
    stop.store(true, Relaxed);
    t.join().unwrap();
    // With the thread gone, promotion goes through.
    assert_eq!(reg.backend().promote(a).unwrap(), Mode::Jump);
    // SAFETY: as above.
    assert_eq!(unsafe { mp_r_plain(4) }, 5);
    assert_eq!(g.unregister().unwrap().hits, 2);
    assert_eq!(bytes(a, 16), orig);
}

#[test]
fn dropping_the_registry_with_promoted_sites_restores_every_byte() {
    let _s = serial();
    let sites = [
        addr(mp_r_plain as *const ()),
        addr(mp_r_load as *const ()),
        addr(mp_r_vec_probe as *const ()),
    ];
    let before: Vec<Vec<u8>> = sites.iter().map(|&a| bytes(a, 32)).collect();
    {
        let reg = Registry::new(SigtrapBackend::with_promotion(true));
        let hits = Arc::new(AtomicU64::new(0));
        let guards: Vec<_> = sites
            .iter()
            .map(|&a| reg.register(a, counter(&hits)).unwrap())
            .collect();
        for (i, &a) in sites.iter().enumerate() {
            assert_eq!(reg.backend().mode_at(a), Some(Mode::Jump), "{a:#x}");
            assert_ne!(bytes(a, JMP_LEN), before[i][..JMP_LEN].to_vec());
        }
        // Handlers left registered: the registry's own drop takes the probes out.
        for g in guards {
            g.into_id();
        }
    }
    for (a, b) in sites.iter().zip(&before) {
        assert_eq!(&bytes(*a, 32), b, "{a:#x}");
    }
}
