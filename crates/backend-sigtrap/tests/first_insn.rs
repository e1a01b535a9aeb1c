//! Probes on functions whose first instruction is each kind the backend treats
//! differently: emulated (`endbr64`, `push`, `call`, `jmp`, RIP-relative `lea`) and
//! relocated into a slot (RIP-relative load, plain `imul`), each with pre-handlers only
//! (one trap, boosted) and with a post-handler (the trap-after slot or post-emulation).

mod asm;

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use asm::*;
use multiprobe_core::{FnHandler, PreAction};

/// These tests probe the same functions; one at a time (a second registry probing an
/// armed address gets `AlreadyBreakpoint`, by design).
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

struct Case {
    name: &'static str,
    f: unsafe extern "C" fn(u64) -> u64,
    expect: fn(u64) -> u64,
    emulated: bool,
}

fn cases() -> Vec<Case> {
    type Row = (
        &'static str,
        unsafe extern "C" fn(u64) -> u64,
        fn(u64) -> u64,
        bool,
    );
    let table: [Row; 6] = [
        ("endbr64", mp_t_endbr, |x| x + 1, true),
        ("push", mp_t_push, |x| x + 2, true),
        ("call", mp_t_call, |x| x + 3, true),
        ("jmp", mp_t_jmp, |x| x + 4, true),
        ("rip-relative load", mp_t_riprel, |x| x + 5, false),
        ("imul", mp_t_imul, |x| x * 7, false),
    ];
    table
        .into_iter()
        .map(|(name, f, expect, emulated)| Case {
            name,
            f,
            expect,
            emulated,
        })
        .collect()
}

#[test]
fn every_first_instruction_kind_runs_once_with_pre_and_post_handlers() {
    let _s = serial();
    let reg = multiprobe_backend_sigtrap::registry();
    for c in cases() {
        let a = c.f as *const () as u64;
        let before = bytes(a, 16);
        let pre = Arc::new(AtomicU64::new(0));
        let post = Arc::new(AtomicU64::new(0));
        let rdi_seen = Arc::new(AtomicU64::new(0));
        let (p1, s1) = (Arc::clone(&pre), Arc::clone(&rdi_seen));
        // Pre-handlers only: the boosted (one-trap) path.
        let g1 = reg
            .register(a, move |h| {
                p1.fetch_add(1, Relaxed);
                s1.store(h.regs().rdi, Relaxed);
            })
            .unwrap_or_else(|e| panic!("{}: {e}", c.name));
        let armed = match reg.backend().mode_at(a) {
            Some(multiprobe_backend_sigtrap::Mode::Jump) => 0xe9,
            _ => 0xcc,
        };
        assert_eq!(bytes(a, 1), [armed], "{}: armed", c.name);
        let class = reg.backend().class_at(a).unwrap();
        assert_eq!(
            class == multiprobe_backend_sigtrap::Class::Emulated,
            c.emulated,
            "{}: {class:?}",
            c.name
        );
        let traps = multiprobe_backend_sigtrap::traps_on_this_thread();
        for x in 0..5u64 {
            // SAFETY: the test functions take and return integers.
            assert_eq!(unsafe { (c.f)(x) }, (c.expect)(x), "{} boosted", c.name);
        }
        // One trap per hit without post-handlers, emulated or out of line; none on a
        // site promoted to a jump.
        let jump = armed == 0xe9;
        assert_eq!(
            multiprobe_backend_sigtrap::traps_on_this_thread() - traps,
            if jump { 0 } else { 5 },
            "{}",
            c.name
        );
        assert_eq!(pre.load(Relaxed), 5, "{}", c.name);
        assert_eq!(rdi_seen.load(Relaxed), 4, "{}", c.name);
        // Now a post-handler joins the same site: every hit must run it, and it sees the
        // state after the instruction (rip at the next instruction or the branch target).
        let p2 = Arc::clone(&post);
        let g2 = reg
            .register_handler(
                a,
                FnHandler::new()
                    .pre(|_h| PreAction::Continue)
                    .post(move |h| {
                        assert_ne!(h.regs().rip, h.addr());
                        p2.fetch_add(1, Relaxed);
                    }),
            )
            .unwrap();
        let traps = multiprobe_backend_sigtrap::traps_on_this_thread();
        for x in 10..15u64 {
            // SAFETY: as above.
            assert_eq!(unsafe { (c.f)(x) }, (c.expect)(x), "{} with post", c.name);
        }
        // With a post-handler: emulation still needs one trap, a slot two; a jump none
        // (the post stub runs them), except a first `call`: emulated in the trampoline's
        // entry, it moves the stack down, and the thread leaves through the trap exit.
        let per_hit = if jump {
            u64::from(c.name == "call")
        } else if c.emulated {
            1
        } else {
            2
        };
        assert_eq!(
            multiprobe_backend_sigtrap::traps_on_this_thread() - traps,
            5 * per_hit,
            "{}",
            c.name
        );
        assert_eq!(pre.load(Relaxed), 10, "{}", c.name);
        assert_eq!(
            post.load(Relaxed),
            5,
            "{}: post-handler ran per hit",
            c.name
        );
        let s1 = g1.unregister().unwrap();
        let s2 = g2.unregister().unwrap();
        assert_eq!((s1.hits, s1.missed, s1.panics), (10, 0, 0), "{}", c.name);
        assert_eq!(s2.hits, 5, "{}", c.name);
        assert_eq!(bytes(a, 16), before, "{}: restored", c.name);
    }
}

#[test]
fn post_handlers_see_the_instructions_effect() {
    let _s = serial();
    let reg = multiprobe_backend_sigtrap::registry();
    // imul (relocated, trap-after slot): rax = 7 * rdi after the instruction.
    let a = mp_t_imul as *const () as u64;
    let seen = Arc::new(AtomicU64::new(0));
    let s = Arc::clone(&seen);
    let g = reg
        .register_handler(
            a,
            FnHandler::new()
                .pre(|_h| PreAction::Continue)
                .post(move |h| {
                    s.store(h.regs().rax, Relaxed);
                    assert_eq!(h.regs().rip, h.addr() + 4, "imul is 4 bytes");
                }),
        )
        .unwrap();
    // SAFETY: integer in, integer out.
    assert_eq!(unsafe { mp_t_imul(6) }, 42);
    assert_eq!(seen.load(Relaxed), 42);
    g.unregister().unwrap();

    // push (emulated): rsp went down by 8 and holds rbx.
    let a = mp_t_push as *const () as u64;
    let delta = Arc::new(AtomicU64::new(0));
    let (d1, d2) = (Arc::clone(&delta), Arc::clone(&delta));
    let g = reg
        .register_handler(
            a,
            FnHandler::new()
                .pre(move |h| {
                    d1.store(h.regs().rsp, Relaxed);
                    PreAction::Continue
                })
                .post(move |h| {
                    let top = h.mem().read_u64(h.regs().rsp).unwrap();
                    assert_eq!(top, h.regs().rbx);
                    d2.store(d2.load(Relaxed) - h.regs().rsp, Relaxed);
                }),
        )
        .unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { mp_t_push(1) }, 3);
    assert_eq!(delta.load(Relaxed), 8);
    g.unregister().unwrap();
}

#[test]
fn rip_relative_lea_is_computed_for_the_original_address() {
    let _s = serial();
    let reg = multiprobe_backend_sigtrap::registry();
    let a = mp_t_lea as *const () as u64;
    let g = reg.register(a, |_h| {}).unwrap();
    // SAFETY: returns an address; reading the static is fine.
    unsafe {
        assert_eq!(mp_t_lea(), std::ptr::addr_of!(mp_t_data) as u64);
    }
    assert_eq!(g.unregister().unwrap().hits, 1);
}
