//! The tracer's side of `ret` collectors in the tracee: the shadow stacks' mapping
//! (`multiprobe_x86::collect::shadow`), and putting original return addresses back
//! where the program or an unwinder must see them.
//!
//! * The mapping is made in the tracee (an injected `mmap`, private and anonymous) the
//!   first time a site with a `ret` collector is promoted; if that fails, the reason is
//!   kept and such sites stay on the one-stop path (whose returns the core pairs).
//! * **Leaving** (detach, a fork child freed of probes): every slot of a call in flight
//!   that holds a return code's address gets its original return address back, so the
//!   program returns where it would have; those calls are unobserved.
//! * **Unwinders** (`returns.rs` hooks them): before one runs on a thread, that
//!   thread's slots get their originals back; where the program goes on (a catch, the
//!   walk's return), the calls still in flight above the stack pointer are armed again.
//!
//! Invariant: a slot is written only when it holds exactly what we put there (the
//! return code's address for a restore, the original for a re-arm), so a slot the
//! program reused since is never touched.

use multiprobe_core::Memory;
use multiprobe_x86::collect::shadow::{
    block_header, block_offset, in_flight, InFlight, FRAMES, FRAME_LEN, SHADOW_LEN, THREADS,
};

use crate::error;
use crate::inject;
use crate::sys::{Tid, UserRegs};
use crate::tracer::Tracer;

/// The shadow stacks of the current image, as far as they got.
#[derive(Debug, Default, Clone)]
pub(crate) enum ShadowState {
    #[default]
    NotTried,
    Failed(String),
    Mapped(u64),
}

/// The calls in flight of every block at `shadow` (those of the thread whose fs base is
/// `only`, if given), read with `read`.
fn calls_in_flight(
    shadow: u64,
    only: Option<u64>,
    read: &dyn Fn(u64, &mut [u8]) -> bool,
) -> Vec<InFlight> {
    let mut all = Vec::new();
    for i in 0..THREADS {
        let at = shadow + block_offset(i) as u64;
        let mut head = [0u8; 16];
        if !read(at, &mut head) {
            continue;
        }
        let (owner, depth) = block_header(&head);
        if owner == 0 || only.is_some_and(|fs| fs != owner) {
            continue;
        }
        let n = (depth as usize).min(FRAMES);
        let mut frames = vec![0u8; n * FRAME_LEN];
        if n > 0 && read(at + FRAME_LEN as u64, &mut frames) {
            all.extend(in_flight(&frames));
        }
    }
    all
}

/// Put the original return address back into every slot of `calls` that holds its
/// return code (`back`), or the return code into every slot above `above` that holds
/// its original (re-arm).
fn rewrite(
    calls: &[InFlight],
    back: bool,
    above: u64,
    read: &dyn Fn(u64, &mut [u8]) -> bool,
    write: &dyn Fn(u64, &[u8]) -> bool,
) {
    for c in calls {
        let (from, to) = if back {
            (c.code, c.ret)
        } else if c.slot > above {
            (c.ret, c.code)
        } else {
            continue;
        };
        let mut now = [0u8; 8];
        if from != 0 && read(c.slot, &mut now) && u64::from_le_bytes(now) == from {
            let _ = write(c.slot, &to.to_le_bytes());
        }
    }
}

impl Tracer {
    /// The shadow stacks' address in the tracee, mapping them on a held thread first if
    /// needed (every thread of the process is held).
    pub(crate) fn ensure_shadow(&mut self) -> std::result::Result<u64, String> {
        if let Some(done) = self.shadow_done() {
            return done;
        }
        let Some((tid, ur)) = self.held_thread() else {
            return Err(String::new()); // no thread can make a call now: later
        };
        self.ensure_shadow_on(tid, &ur)
    }

    fn shadow_done(&self) -> Option<std::result::Result<u64, String>> {
        match &self.shared.lock().collect.shadow {
            ShadowState::Mapped(a) => Some(Ok(*a)),
            ShadowState::Failed(why) => Some(Err(why.clone())),
            ShadowState::NotTried => None,
        }
    }

    /// [`Tracer::ensure_shadow`] on the stopped thread `tid` (registers `ur`).
    pub(crate) fn ensure_shadow_on(
        &mut self,
        tid: Tid,
        ur: &UserRegs,
    ) -> std::result::Result<u64, String> {
        if let Some(done) = self.shadow_done() {
            return done;
        }
        let pid = self.shared.pid;
        let made = (|| -> multiprobe_core::Result<u64> {
            let insn = {
                let st = self.shared.lock();
                let code = st.usable()?;
                self.injector.insn(pid, code)?
            };
            let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
            let rw = (libc::PROT_READ | libc::PROT_WRITE) as u64;
            let args = [0, SHADOW_LEN as u64, rw, flags as u64, u64::MAX, 0];
            inject::syscall(pid, tid, ur, insn, libc::SYS_mmap, args, &mut self.aside)?
                .map_err(|e| error::sys(e, "mmap the shadow stacks in the tracee"))
        })();
        for sig in self.aside.take_signals(tid) {
            self.resend.push((tid, sig));
        }
        let state = match made {
            Ok(a) => ShadowState::Mapped(a),
            Err(e) => ShadowState::Failed(format!("no shadow stacks in the tracee: {e}")),
        };
        self.shared.lock().collect.shadow = state;
        self.shadow_done().expect("just set")
    }

    fn shadow_addr(&self) -> Option<u64> {
        shadow_of(&self.shared)
    }

    /// Leaving the process with every thread held outside our code: the original return
    /// addresses go back into every armed slot of every thread.
    pub(crate) fn restore_shadow_returns(&self) {
        let Some(shadow) = self.shadow_addr() else {
            return;
        };
        let mem = self.mem;
        let read = |a: u64, b: &mut [u8]| mem.read(a, b).is_ok();
        let write = |a: u64, b: &[u8]| mem.write(a, b).is_ok();
        let calls = calls_in_flight(shadow, None, &read);
        rewrite(&calls, true, 0, &read, &write);
    }

    /// A fork child (memory `code`) freed of probes: its copy of the stacks and of the
    /// shadow stacks describe the forker's calls in flight; put their originals back
    /// before its copy of the trampolines goes.
    pub(crate) fn restore_shadow_in_child(&self, code: &crate::mem::CodeMemory) {
        let Some(shadow) = self.shadow_addr() else {
            return;
        };
        let read = |a: u64, b: &mut [u8]| code.read(a, b).is_ok();
        let write = |a: u64, b: &[u8]| code.write(a, b).is_ok();
        let calls = calls_in_flight(shadow, None, &read);
        rewrite(&calls, true, 0, &read, &write);
    }
}

fn shadow_of(shared: &crate::backend::Shared) -> Option<u64> {
    match shared.lock().collect.shadow {
        ShadowState::Mapped(a) => Some(a),
        _ => None,
    }
}

/// What an unwinder hook asked for the thread whose fs base is `fs` (`returns.rs`):
/// `None`, an unwinder is about to run, so its armed slots get their originals back;
/// `Some(sp)`, it goes on at stack pointer `sp`, so its calls still in flight above
/// `sp` are armed again.
pub(crate) fn for_unwinder(
    shared: &crate::backend::Shared,
    mem: &dyn Memory,
    fs: u64,
    asked: Option<u64>,
) {
    let Some(shadow) = shadow_of(shared) else {
        return;
    };
    let read = |a: u64, b: &mut [u8]| mem.read(a, b).is_ok();
    let write = |a: u64, b: &[u8]| mem.write(a, b).is_ok();
    let calls = calls_in_flight(shadow, Some(fs), &read);
    rewrite(&calls, asked.is_none(), asked.unwrap_or(0), &read, &write);
}
