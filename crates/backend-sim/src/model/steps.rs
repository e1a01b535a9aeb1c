//! The model's micro-step predictions (see the parent module's docs): which hooks
//! run, in which order, with what effect on stats, pending snapshots and the view.

use multiprobe_core::{FaultAction, HandlerId, HandlerStats};

use super::returns::data_of;
use super::{ErrKind, Model, Snapshot};
use crate::cpu::{Dispatched, Event};
use crate::ctx::{Call, Ended, Hook, Nested};
use crate::isa::{Effect, BRK};
use crate::memory::SimMemory;

impl Model {
    /// CPU `cpu` took the micro-step `event`, during which handlers left `calls` in
    /// the trace, with `mem` as the step left it. Checks both and advances the model.
    pub fn on_event(
        &mut self,
        cpu: usize,
        event: &Event,
        calls: &[Call],
        mem: &SimMemory,
    ) -> Result<(), String> {
        let mut cur = Cursor { calls, pos: 0 };
        match *event {
            Event::Exec { .. } | Event::RaiseTrap { .. } => {}
            Event::Return { rsp, outcome } => self.on_return(&mut cur, cpu, rsp, outcome, mem)?,
            Event::Dispatch { addr, sp, outcome } => {
                let expected = self.dispatch(&mut cur, cpu, addr, sp, mem)?;
                if expected != outcome {
                    return Err(format!("dispatch at {addr:#x} on cpu {cpu}: core said {outcome:?}, model {expected:?}"));
                }
                // CPU 0 collects the removals handlers asked for (`crate::cpu`).
                if cpu == 0 {
                    self.collect();
                }
            }
            Event::SlotExec { addr, result } => {
                let pending = self.pending[cpu].take();
                if let Some(p) = &pending {
                    if p.addr != addr {
                        return Err(format!(
                            "cpu {cpu} executed the slot of {addr:#x} owing a post at {:#x}",
                            p.addr
                        ));
                    }
                }
                match result {
                    Ok(Effect::Halt) => {}
                    Ok(Effect::Continue) => self.pending[cpu] = pending,
                    Err((_, action)) => {
                        let handlers = match pending {
                            Some(s) => s.handlers,
                            None => self
                                .sites
                                .get(&addr)
                                .map(|s| s.handlers.clone())
                                .unwrap_or_default(),
                        };
                        let mut expected = FaultAction::NotHandled;
                        let asked: Vec<_> = handlers
                            .iter()
                            .filter(|e| e.enabled && self.live(e.id))
                            .copied()
                            .collect();
                        for e in asked {
                            match self.hook(&mut cur, cpu, e.id, Hook::Fault, addr)?.0 {
                                Ended::Panic => self.count(e.id, |s| s.panics += 1),
                                Ended::Handled => {
                                    expected = FaultAction::Handled;
                                    break;
                                }
                                Ended::Normal => {}
                                Ended::Redirect | Ended::Skip | Ended::Remove => {
                                    return Err("a fault hook redirected".into())
                                }
                            }
                        }
                        if expected != action {
                            return Err(format!("fault at {addr:#x} on cpu {cpu}: core said {action:?}, model {expected:?}"));
                        }
                        if action == FaultAction::Handled {
                            self.program_changed = true;
                        }
                    }
                }
            }
            Event::PostTrap { addr, ran } => {
                let Some(snap) = self.pending[cpu].take().filter(|s| s.addr == addr) else {
                    return Err(format!(
                        "cpu {cpu} trapped back at {addr:#x} without a deferred step in the model"
                    ));
                };
                if !ran {
                    return Err(format!(
                        "post at {addr:#x} on cpu {cpu} did not find its deferred step"
                    ));
                }
                let posts: Vec<HandlerId> = snap
                    .handlers
                    .iter()
                    .filter(|e| e.enabled && self.has_post[&e.id] && self.live(e.id))
                    .map(|e| e.id)
                    .collect();
                for id in posts {
                    if self.hook(&mut cur, cpu, id, Hook::Post, addr)?.0 == Ended::Panic {
                        self.count(id, |s| s.panics += 1);
                    }
                }
            }
        }
        match cur.calls.get(cur.pos) {
            None => Ok(()),
            Some(extra) => Err(format!(
                "cpu {cpu}, {event:?}: unexpected handler call {extra:?}"
            )),
        }
    }

    pub(super) fn count(&mut self, id: HandlerId, f: impl FnOnce(&mut HandlerStats)) {
        f(self.stats.get_mut(&id).expect("stats of a known handler"));
    }

    fn dispatch(
        &mut self,
        cur: &mut Cursor<'_>,
        cpu: usize,
        addr: u64,
        sp: u64,
        mem: &SimMemory,
    ) -> Result<Dispatched, String> {
        let Some(site) = self.sites.get_mut(&addr) else {
            return Ok(Dispatched::NotOurs {
                reexecute: self.byte(addr) != BRK,
            });
        };
        site.hits += 1;
        let snap = Snapshot {
            addr,
            handlers: site.handlers.clone(),
        };
        // Return handlers enabled in the view (removal asked or not: what the core
        // reserves room for).
        let rets = snap
            .handlers
            .iter()
            .filter(|e| e.enabled && self.has_ret[&e.id])
            .count();
        let room = rets > 0 && self.begin_arming(cpu, sp, rets, mem);
        let mut kept = Vec::new();
        let mut redirected = false;
        for e in snap.handlers.iter().filter(|e| e.enabled) {
            if !self.live(e.id) {
                // Asked to be removed earlier: skipped, not counted.
                continue;
            }
            self.count(e.id, |s| s.hits += 1);
            let (ended, data) = self.hook(cur, cpu, e.id, Hook::Pre, addr)?;
            let keep = self.has_ret[&e.id]
                && !matches!(ended, Ended::Panic | Ended::Remove)
                && data.is_some_and(|(_, skipped)| !skipped);
            if self.has_ret[&e.id] && ended != Ended::Panic && data.is_none() {
                return Err(format!("pre of return handler {} left no call data", e.id));
            }
            if keep {
                let token = data.expect("checked").0;
                if room {
                    kept.push((e.id, token));
                } else {
                    self.lose_one(e.id);
                }
            }
            match ended {
                Ended::Panic => self.count(e.id, |s| s.panics += 1),
                Ended::Remove => self.request_removal(e.id),
                Ended::Redirect => redirected = true,
                Ended::Skip => {
                    self.program_changed = true;
                    redirected = true;
                }
                Ended::Normal => {}
                Ended::Handled => return Err("a pre hook handled a fault".into()),
            }
            if redirected {
                break;
            }
        }
        if rets > 0 {
            self.finish_arming(cpu, sp, addr, kept, redirected, mem);
        }
        if redirected {
            return Ok(Dispatched::Redirect);
        }
        let post = snap
            .handlers
            .iter()
            .any(|e| e.enabled && self.has_post[&e.id]);
        if post {
            self.pending[cpu] = Some(snap);
        }
        Ok(Dispatched::Step { post })
    }

    /// Expect `hook` of `id` next in the trace; check what it did inside; return how
    /// it ended, and the call data it left or got (a return handler's pre and ret).
    pub(super) fn hook(
        &mut self,
        cur: &mut Cursor<'_>,
        cpu: usize,
        id: HandlerId,
        hook: Hook,
        addr: u64,
    ) -> Result<(Ended, Option<(u64, bool)>), String> {
        match cur.next() {
            Some(Call::Enter {
                id: i,
                hook: h,
                tid,
                addr: a,
                post,
            }) if *i == id
                && *h == hook
                && *tid as usize == cpu
                && *a == addr
                && *post == self.has_post[&id] => {}
            other => {
                return Err(format!(
                    "expected {hook:?} of {id} at {addr:#x} on cpu {cpu}, trace has {other:?}"
                ))
            }
        }
        let mut data = None;
        loop {
            match cur.next() {
                Some(c @ Call::Data { id: i, .. }) if *i == id && data.is_none() => {
                    data = data_of(c);
                }
                Some(Call::Nested { addr: b, outcome }) => {
                    let expected = match self.sites.get(b).cloned() {
                        None => Nested::NotOurs,
                        Some(s) => {
                            for e in s.handlers.iter().filter(|e| e.enabled) {
                                if self.live(e.id) {
                                    self.count(e.id, |s| s.missed += 1);
                                }
                            }
                            Nested::Stepped { post: false }
                        }
                    };
                    if expected != *outcome {
                        return Err(format!("nested hit at {b:#x} from {id}: core said {outcome:?}, model {expected:?}"));
                    }
                }
                Some(Call::Unregistered { target, result }) => {
                    // A registry operation from inside collects first, as any does.
                    self.collect();
                    let expected = match self.remove(*target) {
                        Err(e) => Err(e),
                        Ok(_) => Err(ErrKind::InsideDispatch(*target)),
                    };
                    if expected != *result {
                        return Err(format!("unregister({target}) inside {id}: core said {result:?}, model {expected:?}"));
                    }
                }
                Some(Call::SetEnabled { target, on, result }) => {
                    self.collect();
                    let expected = self.set_enabled(*target, *on);
                    if expected != *result {
                        return Err(format!("set_enabled({target}, {on}) inside {id}: core said {result:?}, model {expected:?}"));
                    }
                }
                Some(Call::Exit {
                    id: i,
                    hook: h,
                    ended,
                }) if *i == id && *h == hook => return Ok((*ended, data)),
                other => return Err(format!("inside {hook:?} of {id}: unexpected {other:?}")),
            }
        }
    }
}

pub(super) struct Cursor<'a> {
    calls: &'a [Call],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn next(&mut self) -> Option<&'a Call> {
        let c = self.calls.get(self.pos);
        self.pos += 1;
        c
    }
}
