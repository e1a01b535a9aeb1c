//! A configurable handler that records every call into the trace ([`crate::ctx`]).
//!
//! What a [`SimHandler`] does is fixed by its [`Behavior`] and its own call count, so
//! runs are reproducible. With a return hook, its pre-hook leaves a token (its count of
//! pre calls) in the call's data and logs it, and the return hook logs what it got. Every hook logs `Enter`, then whatever it did inside (nested
//! hits, unregistrations), then `Exit` with how it ended — a panicking hook logs
//! `Exit { Panic }` first, then panics. Only two behaviours change program state:
//! `handle_faults` (the program no longer sees its fault) and [`PreMode::Skip`]; the
//! emulating modes redirect around the instruction after executing it themselves,
//! which leaves the program's state exactly as executing it would.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed, Ordering::SeqCst};
use std::sync::Arc;

use multiprobe_core::{CallData, Fault, FaultAction, Handler, HandlerId, Hit, PreAction};

use crate::ctx::{self, Call, Ended, Hook};
use crate::isa::{execute, Effect, Insn, NoBus};

/// The message of injected panics (a test's panic hook can silence exactly these).
pub const INJECTED_PANIC: &str = "multiprobe-sim: injected handler panic";

/// Install (once) a panic hook that keeps [`INJECTED_PANIC`]s — caught and counted by
/// the core — off stderr, and passes every other panic to the hook installed before
/// (a fuzzer's abort-on-panic hook included).
pub fn quiet_injected_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let p = info.payload();
            let msg = p
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| p.downcast_ref::<&str>().copied());
            if msg != Some(INJECTED_PANIC) {
                prev(info);
            }
        }));
    });
}

/// What a pre-hook does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, arbitrary::Arbitrary)]
pub enum PreMode {
    /// Look only.
    Observe,
    /// Execute the displaced instruction itself (when it touches no memory and cannot
    /// fault) and return `Redirect` past it.
    Emulate,
    /// Like `Emulate`, but move `rip` and return `Continue` (the core must notice).
    EmulateSilently,
    /// Skip the instruction: `rip` past it, `Redirect`. Changes the program.
    Skip,
    /// Look, then ask to be removed (`Remove`): never called again.
    Remove,
}

/// Whom a handler unregisters from inside.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Itself.
    Itself,
    /// Another handler (or an id never issued).
    Other(HandlerId),
}

/// What a handler's first `pre` does to the registry from inside the dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inside {
    /// Unregister a handler (rule 3: `InsideDispatch`, no deadlock).
    Unregister(Target),
    /// Enable (`true`) or disable a handler (or an id never issued): takes effect for
    /// hits that begin afterwards, and may arm or disarm the site being hit.
    SetEnabled(HandlerId, bool),
}

/// A [`SimHandler`]'s configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Behavior {
    /// Has a post hook.
    pub post: bool,
    /// What `pre` does.
    pub pre: PreMode,
    /// `fault` returns `Handled`, moving `rip` past the instruction. Changes the program.
    pub handle_faults: bool,
    /// Every `n`-th call (any hook) panics; 0: never.
    pub panic_every: u8,
    /// Every call hits the probe at this address from inside (rule 6).
    pub nested: Option<u64>,
    /// What the first `pre` does to the registry from inside the dispatch.
    pub inside: Option<Inside>,
    /// Has a return hook (the address must be a function entry).
    pub ret: bool,
    /// With `ret`: every other call's pre-hook (its odd-numbered ones) asks for no return.
    pub skip_odd_returns: bool,
}

impl Behavior {
    /// Observe only, no post.
    pub const OBSERVE: Behavior = Behavior {
        post: false,
        pre: PreMode::Observe,
        handle_faults: false,
        panic_every: 0,
        nested: None,
        inside: None,
        ret: false,
        skip_odd_returns: false,
    };

    /// Whether a handler with this behaviour may change the program's state.
    pub fn changes_program(&self) -> bool {
        self.handle_faults || self.pre == PreMode::Skip
    }
}

/// Rule 3 from the outside: whoever unregisters the handler sets `retired` once
/// `unregister` returned; a hook that starts after that counts a violation.
#[derive(Debug, Default)]
pub struct Watch {
    /// Set (`SeqCst`) after `unregister` returned `Ok`.
    pub retired: AtomicBool,
    /// Hooks that started after `retired` was set.
    pub violations: AtomicU64,
}

/// A recording handler for the instruction `insn` (the original at its address, if
/// known: the emulating modes need it).
#[derive(Debug)]
pub struct SimHandler {
    behavior: Behavior,
    insn: Option<Insn>,
    calls: AtomicU32,
    /// Pre calls that got as far as leaving call data (the token they leave).
    tokens: AtomicU64,
    acted_inside: AtomicBool,
    watch: Option<Arc<Watch>>,
}

impl SimHandler {
    /// A handler behaving as `behavior`, probing `insn`.
    pub fn new(behavior: Behavior, insn: Option<Insn>) -> Self {
        SimHandler {
            behavior,
            insn,
            calls: AtomicU32::new(0),
            tokens: AtomicU64::new(0),
            acted_inside: AtomicBool::new(false),
            watch: None,
        }
    }

    /// The same, reporting hooks that run after it was retired to `watch`.
    pub fn watched(behavior: Behavior, insn: Option<Insn>, watch: Arc<Watch>) -> Self {
        SimHandler {
            watch: Some(watch),
            ..SimHandler::new(behavior, insn)
        }
    }

    fn enter(&self, hit: &Hit<'_>, hook: Hook) {
        ctx::record(Call::Enter {
            id: hit.handler_id(),
            hook,
            tid: hit.tid(),
            addr: hit.addr(),
            post: self.behavior.post,
        });
        if let Some(w) = &self.watch {
            if w.retired.load(SeqCst) {
                w.violations.fetch_add(1, SeqCst);
            }
        }
        if let Some(addr) = self.behavior.nested {
            if let Some(outcome) = ctx::nested_hit(addr) {
                ctx::record(Call::Nested { addr, outcome });
            }
        }
    }

    /// Count the call; if it is one that must panic, log that and panic — before the
    /// hook changed anything, so a panicking hook never redirects or handles.
    fn maybe_panic(&self, hit: &Hit<'_>, hook: Hook) {
        let n = self.calls.fetch_add(1, Relaxed) + 1;
        let every = u32::from(self.behavior.panic_every);
        if every != 0 && n.is_multiple_of(every) {
            ctx::record(Call::Exit {
                id: hit.handler_id(),
                hook,
                ended: Ended::Panic,
            });
            panic!("{INJECTED_PANIC}");
        }
    }

    fn exit(&self, hit: &Hit<'_>, hook: Hook, ended: Ended) {
        ctx::record(Call::Exit {
            id: hit.handler_id(),
            hook,
            ended,
        });
    }

    /// Execute the instruction on the hit's registers if that is exactly what running
    /// it would do; returns whether it did.
    fn emulate(&self, hit: &mut Hit<'_>, silently: bool) -> bool {
        let Some(insn) = self.insn else { return false };
        let addr = hit.addr();
        let mut regs = *hit.regs();
        match execute(insn, addr, &mut regs, &NoBus) {
            // A silent emulation that lands on the same address would be invisible to
            // the core, which would then execute the instruction a second time.
            Ok(Effect::Continue) if !(silently && regs.rip == addr) => {
                *hit.regs_mut() = regs;
                true
            }
            _ => false,
        }
    }
}

impl Handler for SimHandler {
    fn pre(&self, hit: &mut Hit<'_>) -> PreAction {
        self.enter(hit, Hook::Pre);
        match self.behavior.inside {
            Some(_) if self.acted_inside.swap(true, Relaxed) => {}
            Some(Inside::Unregister(target)) => {
                let target = match target {
                    Target::Itself => hit.handler_id(),
                    Target::Other(id) => id,
                };
                if let Some(result) = ctx::unregister(target) {
                    ctx::record(Call::Unregistered {
                        target,
                        result: result.map_err(|e| crate::model::ErrKind::of(&e)),
                    });
                }
            }
            Some(Inside::SetEnabled(target, on)) => {
                if let Some(result) = ctx::set_enabled(target, on) {
                    ctx::record(Call::SetEnabled {
                        target,
                        on,
                        result: result.map_err(|e| crate::model::ErrKind::of(&e)),
                    });
                }
            }
            None => {}
        }
        self.maybe_panic(hit, Hook::Pre);
        let (action, ended) = match self.behavior.pre {
            PreMode::Observe => (PreAction::Continue, Ended::Normal),
            PreMode::Emulate if self.emulate(hit, false) => (PreAction::Redirect, Ended::Redirect),
            PreMode::EmulateSilently if self.emulate(hit, true) => {
                (PreAction::Continue, Ended::Redirect)
            }
            PreMode::Emulate | PreMode::EmulateSilently => (PreAction::Continue, Ended::Normal),
            PreMode::Remove => (PreAction::Remove, Ended::Remove),
            PreMode::Skip => {
                let len = self.insn.map_or(1, |i| i.len());
                let next = hit.addr() + len;
                hit.regs_mut().rip = next;
                (PreAction::Redirect, Ended::Skip)
            }
        };
        if self.behavior.ret {
            let value = self.tokens.fetch_add(1, Relaxed) + 1;
            let skipped = self.behavior.skip_odd_returns && value % 2 == 1;
            if let Some(d) = hit.call_data_mut() {
                d[0] = value;
            }
            if skipped {
                hit.skip_return();
            }
            ctx::record(Call::Data {
                id: hit.handler_id(),
                value,
                skipped,
            });
        }
        self.exit(hit, Hook::Pre, ended);
        action
    }

    fn ret(&self, hit: &mut Hit<'_>, data: &CallData) {
        self.enter(hit, Hook::Ret);
        self.maybe_panic(hit, Hook::Ret);
        ctx::record(Call::Data {
            id: hit.handler_id(),
            value: data[0],
            skipped: false,
        });
        self.exit(hit, Hook::Ret, Ended::Normal);
    }

    fn has_ret(&self) -> bool {
        self.behavior.ret
    }

    fn post(&self, hit: &mut Hit<'_>) {
        self.enter(hit, Hook::Post);
        self.maybe_panic(hit, Hook::Post);
        self.exit(hit, Hook::Post, Ended::Normal);
    }

    fn fault(&self, hit: &mut Hit<'_>, _fault: &Fault) -> FaultAction {
        self.enter(hit, Hook::Fault);
        self.maybe_panic(hit, Hook::Fault);
        if self.behavior.handle_faults {
            let len = self.insn.map_or(1, |i| i.len());
            hit.regs_mut().rip = hit.addr() + len;
            self.exit(hit, Hook::Fault, Ended::Handled);
            FaultAction::Handled
        } else {
            self.exit(hit, Hook::Fault, Ended::Normal);
            FaultAction::NotHandled
        }
    }

    fn has_post(&self) -> bool {
        self.behavior.post
    }
}
