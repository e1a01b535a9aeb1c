#![cfg(not(loom))]

//! The registration API as a user writes it: closures whose argument type is inferred
//! in every path that takes one, any `Handler` through the `_handler` paths, and
//! `Hit::return_now`'s failure path (its success path needs a stack: see
//! backend-sim's tests/return_now.rs and the process backends' tests).

use std::sync::{Arc, Mutex};

use multiprobe_core::backend::ThreadState;
use multiprobe_core::testing::{HitResult, TestBackend};
use multiprobe_core::{
    FnHandler, Handler, Hit, MemoryError, Options, PreAction, Registry, Regs, Request,
};

const A: u64 = 0x40_1000;

type Log = Arc<Mutex<Vec<&'static str>>>;

struct Custom(Log);
impl Handler for Custom {
    fn pre(&self, _: &mut Hit<'_>) -> PreAction {
        self.0.lock().unwrap().push("custom");
        PreAction::Continue
    }
}

#[test]
fn closures_infer_their_argument_type_and_any_handler_registers() {
    let r = Registry::new(TestBackend::new());
    let log: Log = Arc::default();
    let l = |name| {
        let l = Arc::clone(&log);
        move |h: &Hit<'_>| {
            assert_eq!(h.addr(), A);
            l.lock().unwrap().push(name)
        }
    };
    let (a, b, c, d) = (l("register"), l("register_with"), l("batch"), l("fn pre"));
    let _g1 = r.register(A, move |h| a(h)).unwrap();
    let _g2 = r
        .register_with(A, move |h| b(h), Options::default())
        .unwrap();
    let _g3 = r
        .register_batch([
            Request::new(A, move |h| c(h)),
            Request::handler(A, Custom(Arc::clone(&log))),
        ])
        .unwrap();
    let _g4 = r
        .register_handler(
            A,
            FnHandler::new().pre(move |h| {
                d(h);
                PreAction::Continue
            }),
        )
        .unwrap();
    let _g5 = r
        .register_handler_with(A, Custom(Arc::clone(&log)), Options::default())
        .unwrap();
    let mut regs = Regs::default();
    let result = r.backend().hit(&ThreadState::new(), 1, A, &mut regs);
    assert_eq!(result, HitResult::Stepped { post: false });
    assert_eq!(
        *log.lock().unwrap(),
        [
            "register",
            "register_with",
            "batch",
            "custom",
            "fn pre",
            "custom"
        ]
    );
}

#[test]
fn return_now_with_an_unreadable_stack_changes_nothing_and_says_why() {
    // The test backend has no memory: reading the return address fails.
    let r = Registry::new(TestBackend::new());
    let seen = Arc::new(Mutex::new(None));
    let s = Arc::clone(&seen);
    let _g = r
        .register(A, move |h| *s.lock().unwrap() = Some(h.return_now(7)))
        .unwrap();
    let mut regs = Regs {
        rax: 1,
        rsp: 0x7000,
        ..Regs::default()
    };
    let result = r.backend().hit(&ThreadState::new(), 1, A, &mut regs);
    assert_eq!(result, HitResult::Stepped { post: false }, "not redirected");
    assert_eq!(
        *seen.lock().unwrap(),
        Some(Err(MemoryError::Unmapped(0x7000)))
    );
    assert_eq!((regs.rax, regs.rsp, regs.rip), (1, 0x7000, A + 1));
}
