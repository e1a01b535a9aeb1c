//! The core's [`Backend`] for a traced process: validating, arming and disarming
//! probes, and the state the tracer loop shares with it.
//!
//! `prepare`, `arm` and `disarm` make no ptrace request, so the registry may call
//! them from any thread, also while the tracer loop runs: they read `/proc/PID/maps`
//! and the mapped ELF files and patch code through `/proc/PID/mem` (see
//! [`crate::mem`]). Everything that needs ptrace — placing the out-of-line slots,
//! which may map a page into the tracee — happens on the tracer thread, at a site's
//! first hit.
//!
//! Invariants (under [`Shared::state`]):
//! * `armed` holds exactly the addresses where this image has our `int3`, with the
//!   original byte and what was mapped there ([`Armed`]); `history` every address
//!   armed in this image since it was loaded (a forked child may still carry any of
//!   them).
//! * A byte is restored only where the same mapping still is: code unloaded by
//!   `dlclose` (and maybe replaced by another library at the same address) takes its
//!   breakpoint with it, and disarm reports [`Error::CodeGone`] without writing.
//! * After an exec the generation moves on: sites of the old image are stale, their
//!   disarm reports [`Error::ProcessGone`] and writes nothing.
//! * Once detached or gone, nothing is written to the tracee any more.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use multiprobe_core::backend::{Backend, Dispatcher};
use multiprobe_core::{Error, Result};
use multiprobe_x86::{analyze, Code, Plan, Slot, MAX_INSN_LEN};

use crate::launch::Image;
use crate::mem::CodeMemory;
use crate::sys::Tid;
use crate::xol::Xol;
use multiprobe_symbols::{MappedAt, Maps, ProcessSymbols, SymbolCache};

pub(crate) use multiprobe_x86::INT3;

/// Where the tracee stands, as far as patching its code goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Status {
    Attached,
    Detached,
    Gone,
}

#[derive(Debug)]
pub(crate) struct State {
    pub(crate) status: Status,
    /// `/proc/PID/mem` of the current image; `None` unless attached.
    pub(crate) code: Option<CodeMemory>,
    pub(crate) armed: HashMap<u64, Armed>,
    pub(crate) history: HashMap<u64, Armed>,
    pub(crate) xol: Xol,
    /// What kind of program the current image is: probes go only into x86-64 code.
    pub(crate) image: Image,
    /// USDT semaphores we raised (`refctr.rs`).
    pub(crate) semaphores: crate::refctr::Semaphores,
    /// Collecting handlers and the area (`collect/`).
    pub(crate) collect: crate::collect::Procs,
}

/// One of our breakpoints: the byte it replaced, in which mapping.
#[derive(Clone, Debug)]
pub(crate) struct Armed {
    pub(crate) orig: u8,
    pub(crate) at: MappedAt,
}

impl Armed {
    /// Whether `maps` (of the process holding the breakpoint) still have the same
    /// mapping at `addr`, so the byte there is still ours to restore.
    pub(crate) fn still_mapped(&self, maps: &Maps, addr: u64) -> bool {
        maps.mapped_at(addr).as_ref() == Some(&self.at)
    }
}

/// What the backend and the tracer loop share.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) pid: Tid,
    /// Image generation: moves on at every exec.
    pub(crate) gen: AtomicU64,
    pub(crate) state: Mutex<State>,
    pub(crate) symbols: Arc<SymbolCache>,
    pub(crate) dispatcher: OnceLock<Dispatcher<Site>>,
    /// A return probe was registered: the tracer places its return trampoline at the
    /// next hit (`returns.rs`).
    pub(crate) returns_wanted: std::sync::atomic::AtomicBool,
    /// Some site's collectors changed: the tracer reworks its jumps (`collect/`).
    pub(crate) collect_dirty: std::sync::atomic::AtomicBool,
    /// Libraries were loaded: the tracer hooks the unwinders it could not find before
    /// (`returns.rs`).
    pub(crate) libraries_changed: std::sync::atomic::AtomicBool,
    /// Wakes the tracer loop for that (set once the process has an area).
    pub(crate) waker: OnceLock<crate::doorbell::DetachHandle>,
    /// Rule 3 for the collectors jumped sites run in the tracee (`collect/quiet.rs`).
    pub(crate) quiet: crate::collect::Quiet,
}

impl Shared {
    pub(crate) fn new(pid: Tid, code: CodeMemory, image: Image) -> Arc<Shared> {
        Arc::new(Shared {
            pid,
            gen: AtomicU64::new(1),
            state: Mutex::new(State {
                status: Status::Attached,
                code: Some(code),
                armed: HashMap::new(),
                history: HashMap::new(),
                xol: Xol::default(),
                image,
                semaphores: Default::default(),
                collect: Default::default(),
            }),
            symbols: Arc::default(),
            dispatcher: OnceLock::new(),
            returns_wanted: Default::default(),
            collect_dirty: Default::default(),
            libraries_changed: Default::default(),
            waker: OnceLock::new(),
            quiet: crate::collect::Quiet::new(),
        })
    }

    /// Ask the tracer loop to rework the collecting sites soon: flag it and wake the
    /// loop (a promoted program may make no event). Called without the state lock.
    pub(crate) fn ask_rework(&self) {
        self.collect_dirty.store(true, Ordering::Release);
        if let Some(w) = self.waker.get() {
            w.wake();
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent; a panic in one (a bug)
        // must not stop detach from restoring the tracee.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn gen(&self) -> u64 {
        self.gen.load(Ordering::Acquire)
    }
}

impl State {
    pub(crate) fn usable(&self) -> Result<&CodeMemory> {
        match (self.status, &self.code) {
            (Status::Attached, Some(c)) => Ok(c),
            (Status::Detached, _) => Err(Error::Backend("the tracer has detached".into())),
            _ => Err(Error::ProcessGone),
        }
    }

    /// Write a slot's bytes into an XOL page, remembering them with the page.
    pub(crate) fn write_slot(&mut self, addr: u64, data: &[u8]) -> Result<()> {
        self.usable()?.write(addr, data)?;
        self.xol.record(addr, data);
        Ok(())
    }

    /// Copy `buf.len()` bytes of code at `addr` with our breakpoints and jumps taken
    /// out.
    pub(crate) fn read_original(&self, addr: u64, buf: &mut [u8]) -> Result<()> {
        self.usable()?.read(addr, buf)?;
        self.unjump(addr, buf);
        for (&a, armed) in &self.armed {
            if let Some(i) = a.checked_sub(addr).filter(|&i| i < buf.len() as u64) {
                buf[i as usize] = armed.orig;
            }
        }
        Ok(())
    }
}

/// The two out-of-line slots of a site, placed in an XOL page of the tracee.
#[derive(Debug)]
pub(crate) struct Slots {
    /// Start of the allocation (both slots) in the XOL area.
    pub(crate) base: u64,
    pub(crate) jump_back: Slot,
    /// `None` for plans that have no trap-after variant (always emulated).
    pub(crate) trap_after: Option<Slot>,
}

impl Slots {
    pub(crate) fn contains(&self, ip: u64) -> bool {
        self.jump_back.contains(ip) || self.trap_after.is_some_and(|s| s.contains(ip))
    }

    /// The slot holding `ip`, if any.
    pub(crate) fn slot_of(&self, ip: u64) -> Option<&Slot> {
        if self.jump_back.contains(ip) {
            Some(&self.jump_back)
        } else {
            self.trap_after.as_ref().filter(|s| s.contains(ip))
        }
    }
}

/// The backend's data for one probed address.
#[derive(Debug)]
pub(crate) struct SiteInner {
    pub(crate) addr: u64,
    pub(crate) gen: u64,
    pub(crate) plan: Plan,
    /// What was mapped at `addr` when it was prepared.
    pub(crate) mapped: MappedAt,
    /// Placed at the first hit that needs them (on the tracer thread, the only writer).
    pub(crate) slots: OnceLock<Slots>,
    /// What its handlers ask of the collecting machinery (`collect/`).
    pub(crate) collect: Mutex<crate::collect::SiteCollect>,
    owner: Weak<Shared>,
}

impl SiteInner {
    /// Whether some enabled handler here is a collector.
    pub(crate) fn has_collectors(&self) -> bool {
        self.collect
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .has_collectors()
    }

    /// Whether it runs a `ret` or `latency` collector in the tracee.
    pub(crate) fn has_ret_collectors(&self) -> bool {
        self.collect
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .has_ret_collectors()
    }
}

impl Drop for SiteInner {
    fn drop(&mut self) {
        // Reached only when no thread can be inside the slots: every thread sent
        // through them holds a reference until it is seen stopped outside.
        if let (Some(slots), Some(owner)) = (self.slots.get(), self.owner.upgrade()) {
            let mut st = owner.lock();
            if owner.gen() == self.gen {
                st.xol.free(slots.base);
            }
        }
    }
}

/// Per-site data of [`PtraceBackend`] (the core's `Backend::Site`). Cheap to clone:
/// the tracer keeps a clone for every thread that is inside one of its slots.
#[derive(Clone, Debug)]
pub struct Site(pub(crate) Arc<SiteInner>);

impl Site {
    /// The analysis of the probed instruction.
    pub fn plan(&self) -> &Plan {
        &self.0.plan
    }
}

/// The [`Backend`] of a traced process. Created by [`crate::Tracer`]; reach it through
/// the tracer's registry.
#[derive(Debug)]
pub struct PtraceBackend {
    pub(crate) shared: Arc<Shared>,
}

impl PtraceBackend {
    /// The traced process.
    pub fn pid(&self) -> i32 {
        self.shared.pid.as_raw_pid()
    }

    /// Tell the tracer that the process loaded libraries (its loader's list changed:
    /// a user watching `_dl_debug_state` knows when). Return probes need hooks on the
    /// unwinders (C++ exceptions, `backtrace`), which live in libraries: ones that
    /// were not loaded when the first return probe was placed — a program's own
    /// functions are probed at its exec, before its libraries — are hooked at the
    /// tracer's next turn. Callable from a handler.
    pub fn libraries_changed(&self) {
        self.shared
            .libraries_changed
            .store(true, std::sync::atomic::Ordering::Release);
        if let Some(w) = self.shared.waker.get() {
            w.wake();
        }
    }
}

impl Backend for PtraceBackend {
    type Site = Site;

    fn attach(&self, dispatcher: Dispatcher<Site>) {
        let _ = self.shared.dispatcher.set(dispatcher);
    }

    fn prepare(&self, addr: u64) -> Result<Site> {
        let sh = &self.shared;
        let gen = sh.gen();
        let maps = crate::error::maps(sh.pid.as_raw_pid())?;
        let region = maps.find(addr).ok_or(Error::Unmapped { addr })?.clone();
        let mut st = sh.lock();
        st.usable()?;
        st.image.check(sh.pid)?;
        if st.xol.contains(addr) {
            return Err(Error::Reserved {
                addr,
                what: "out-of-line slot page",
            });
        }
        if !region.exec {
            return Err(Error::NotExecutable { addr });
        }
        // Decode from the function start when the symbols say where it is (the boundary
        // check), else just the instruction.
        let syms = ProcessSymbols::from_maps(maps, Arc::clone(&sh.symbols));
        let func = syms
            .function_bounds(addr)
            .filter(|f| f.start >= region.start);
        let start = func.as_ref().map_or(addr, |f| f.start);
        let end = (addr + MAX_INSN_LEN as u64).min(region.end);
        let mut bytes = vec![0; (end - start) as usize];
        // A jump of code unloaded since (and maybe loaded again here) has no original
        // bytes to give: forgotten first.
        st.forget_gone_jumps(syms.maps(), start..end);
        st.read_original(start, &mut bytes)?;
        drop(st);
        let range = func.as_ref().map(|f| f.start..f.start + f.size);
        let plan = analyze(
            addr,
            Code {
                addr: start,
                bytes: &bytes,
            },
            range,
        )
        .map_err(|e| {
            let mut err = e.into_core(addr);
            if let (Error::NotInstructionBoundary { context, .. }, Some(f)) = (&mut err, &func) {
                context.push_str(&format!(" in {}+{:#x}", f.name, addr - f.start));
            }
            err
        })?;
        Ok(Site(Arc::new(SiteInner {
            addr,
            gen,
            plan,
            mapped: region.mapped_at(addr),
            slots: OnceLock::new(),
            collect: Default::default(),
            owner: Arc::downgrade(sh),
        })))
    }

    fn arm(&self, addr: u64, site: &Site) -> Result<()> {
        let sh = &self.shared;
        let mut st = sh.lock();
        st.usable()?;
        if site.0.gen != sh.gen() {
            return Err(Error::Backend(format!(
                "{addr:#x} was prepared for a program image that has since been replaced (exec)"
            )));
        }
        let orig = site.0.plan.bytes()[0];
        if st.trap_jump(addr, sh.pid.as_raw_pid()) {
            // Our jump, its demotion pending: its `int3` is there already. (A jump
            // whose code went since is forgotten there: then this is new code.)
            let armed = Armed {
                orig,
                at: site.0.mapped.clone(),
            };
            st.armed.insert(addr, armed.clone());
            st.history.insert(addr, armed);
            return Ok(());
        }
        let code = st.usable()?;
        let mut now = [0u8];
        code.read(addr, &mut now)?;
        if now[0] != orig {
            return Err(Error::Backend(format!(
                "the code at {addr:#x} changed since it was analyzed ({:#04x}, expected {orig:#04x})",
                now[0]
            )));
        }
        code.write(addr, &[INT3])?;
        let armed = Armed {
            orig,
            at: site.0.mapped.clone(),
        };
        st.armed.insert(addr, armed.clone());
        st.history.insert(addr, armed);
        Ok(())
    }

    fn handlers_changed(
        &self,
        addr: u64,
        site: &Site,
        enabled: &[(multiprobe_core::HandlerId, &dyn multiprobe_core::Handler)],
    ) {
        let sh = &self.shared;
        let mut sc = site.0.collect.lock().unwrap_or_else(|p| p.into_inner());
        let mut st = sh.lock();
        if site.0.gen != sh.gen() {
            return;
        }
        let rets_before = sc.ret_collectors();
        sc.wanted = crate::collect::classify(sh.pid.as_raw_pid(), &mut st.collect, enabled);
        crate::collect::retire_rets(&mut st.collect, &rets_before, &sc);
        // A jumped site traps from now on (its trampoline runs the old list); one that
        // may be promoted is looked at by the tracer.
        let jumped = st.trap_jump(addr, sh.pid.as_raw_pid());
        if jumped {
            // Threads already past the jump run the old list: unregister waits for
            // the tracer to see them out of it. Hits stop until it is repointed.
            sh.quiet.changed();
        }
        if jumped || sc.has_collectors() {
            // The tracer decides its path afresh: "not promoted yet" until then.
            sc.path = None;
            st.collect.dirty.insert(addr);
            drop(st);
            sh.ask_rework();
        }
    }

    fn handler_removed(&self, _addr: u64, _site: &Site, id: multiprobe_core::HandlerId) {
        crate::collect::removed_ret(&mut self.shared.lock().collect, id);
    }

    fn quiesce(&self) -> Result<()> {
        let sh = &self.shared;
        if crate::collect::quiesce_rets(&mut sh.lock().collect) {
            // Threads past a live check must leave the return code: one more pause.
            sh.quiet.changed();
        }
        sh.quiet.wait(|| sh.ask_rework());
        Ok(())
    }

    fn check_return(&self, addr: u64, _site: &Site) -> Result<()> {
        crate::returns::check_entry(&self.shared, addr)
    }

    fn disarm(&self, addr: u64, site: &Site) -> Result<()> {
        let sh = &self.shared;
        let mut st = sh.lock();
        if site.0.gen != sh.gen() {
            // That image is gone, and the breakpoint with it.
            return Err(Error::ProcessGone);
        }
        if st.trap_jump(addr, sh.pid.as_raw_pid()) {
            // Our jump: its `int3` stays until the tracer, with every thread stopped,
            // puts the region back (traps meanwhile continue in the trampoline's copy).
            st.armed.remove(&addr);
            sh.quiet.changed();
            drop(st);
            sh.ask_rework();
            return Ok(());
        }
        let code = match st.usable() {
            Ok(c) => c,
            // Detached: every breakpoint was removed then.
            Err(Error::Backend(_)) => return Err(Error::ProcessGone),
            Err(e) => return Err(e),
        };
        let orig = site.0.plan.bytes()[0];
        // Only where the code it was put in still is (not unloaded, not replaced by other
        // code), and still holds our `int3`.
        let maps = match crate::error::maps(sh.pid.as_raw_pid()) {
            Ok(m) => m,
            Err(Error::ProcessGone) => {
                st.status = Status::Gone;
                return Err(Error::ProcessGone);
            }
            Err(e) => return Err(e),
        };
        let mut now = [0u8];
        let same_mapping = maps.mapped_at(addr).as_ref() == Some(&site.0.mapped);
        let gone = !same_mapping
            || match code.read(addr, &mut now) {
                Ok(()) => now[0] != INT3 && now[0] != orig,
                Err(Error::ProcessGone) => {
                    st.status = Status::Gone;
                    return Err(Error::ProcessGone);
                }
                Err(_) => true, // unmapped since the maps were read
            };
        if gone {
            st.armed.remove(&addr);
            return Err(Error::CodeGone { addr });
        }
        if now[0] == orig {
            // Already restored (the thread stepping over it in place put it back).
            st.armed.remove(&addr);
            return Ok(());
        }
        match code.write(addr, &[orig]) {
            Ok(()) => {
                st.armed.remove(&addr);
                Ok(())
            }
            Err(Error::ProcessGone) => {
                st.status = Status::Gone;
                Err(Error::ProcessGone)
            }
            Err(e) => Err(e),
        }
    }
}
