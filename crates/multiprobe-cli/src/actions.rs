//! The handlers behind each action of a probe spec.
//!
//! With the ptrace backend handlers run on the tracer thread, in ordinary thread
//! context, so they may format and write. They must be quick all the same: the traced
//! thread waits while they run. That is why output is rate limited ([`Sink`]).
//!
//! [`request`] is the one place an action becomes a registration: an action that needs
//! something else than a closure-like handler (one that collects in the tracee, a
//! return probe) is decided there.

use std::sync::Arc;

use multiprobe_core::{Handler, Hit, PreAction, Request};

use crate::lines::{args_line, mem_lines, regs_line};
use crate::sink::Sink;
use crate::spec::Action;

/// The registration of `action` at `addr`, shown as `label` in its lines.
pub fn request(addr: u64, action: Action, label: &Arc<str>, sink: &Arc<Sink>) -> Request {
    Request::handler(
        addr,
        ActionHandler::new(action, Arc::clone(label), Arc::clone(sink)),
    )
}

/// One action of one probe: a handler.
#[derive(Debug)]
pub struct ActionHandler {
    action: Action,
    /// How the site is shown in lines (`libc.so.6:malloc`).
    label: Arc<str>,
    sink: Arc<Sink>,
}

impl ActionHandler {
    /// The handler for `action` at the site shown as `label`.
    pub fn new(action: Action, label: Arc<str>, sink: Arc<Sink>) -> Self {
        ActionHandler {
            action,
            label,
            sink,
        }
    }

    fn json_line(&self, hit: &Hit<'_>, fields: serde_json::Value) -> String {
        let mut v = serde_json::json!({
            "tid": hit.tid(),
            "site": format!("{:#x}", hit.addr()),
            "symbol": &*self.label,
            "action": self.action.to_string(),
        });
        if let (Some(obj), serde_json::Value::Object(extra)) = (v.as_object_mut(), fields) {
            obj.extend(extra);
        }
        v.to_string()
    }
}

impl Handler for ActionHandler {
    fn pre(&self, hit: &mut Hit<'_>) -> PreAction {
        match self.action {
            // Every handler is counted by the registry; counting needs nothing more.
            Action::Count => {}
            Action::Args(n) => self.sink.hit_line(|| {
                let args: Vec<Result<u64, ()>> =
                    (0..usize::from(n)).map(|i| hit.arg(i).map_err(|_| ())).collect();
                if self.sink.json() {
                    let vals: Vec<serde_json::Value> = args
                        .iter()
                        .map(|a| match a {
                            Ok(v) => serde_json::Value::String(format!("{v:#x}")),
                            Err(()) => serde_json::Value::Null,
                        })
                        .collect();
                    self.json_line(hit, serde_json::json!({ "args": vals }))
                } else {
                    args_line(hit.tid(), &self.label, &args)
                }
            }),
            Action::Regs => self.sink.hit_line(|| {
                if self.sink.json() {
                    let r = hit.regs();
                    let mut m = serde_json::Map::new();
                    m.insert("rip".into(), format!("{:#x}", r.rip).into());
                    m.insert("rflags".into(), format!("{:#x}", r.rflags).into());
                    for g in multiprobe_core::Gpr::ALL {
                        m.insert(g.name().into(), format!("{:#x}", r.gpr(g)).into());
                    }
                    self.json_line(hit, serde_json::json!({ "regs": m }))
                } else {
                    regs_line(hit.tid(), &self.label, hit.regs())
                }
            }),
            Action::Mem { arg, len } => self.sink.hit_line(|| {
                let addr = hit.arg(usize::from(arg));
                let (addr, bytes) = match addr {
                    Ok(a) => {
                        let mut buf = vec![0u8; usize::from(len)];
                        let r = hit.mem().read(a, &mut buf).map(|()| buf).map_err(|e| e.to_string());
                        (a, r)
                    }
                    Err(e) => (0, Err(e.to_string())),
                };
                if self.sink.json() {
                    let data = match &bytes {
                        Ok(b) => serde_json::Value::String(b.iter().map(|x| format!("{x:02x}")).collect()),
                        Err(e) => serde_json::json!({ "error": e }),
                    };
                    self.json_line(
                        hit,
                        serde_json::json!({ "arg": arg, "addr": format!("{addr:#x}"), "bytes": data }),
                    )
                } else {
                    mem_lines(hit.tid(), &self.label, arg, addr, bytes.as_deref().map_err(Clone::clone))
                }
            }),
        }
        PreAction::Continue
    }
}
