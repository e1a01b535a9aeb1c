//! Watching the dynamic loader: an internal probe on `_dl_debug_state`, the function
//! the loader calls for debuggers whenever it is about to change, or has changed, the
//! list of loaded objects (glibc and musl both have it; gdb's shared-library
//! breakpoint is the same). Its `r_debug` (`_r_debug`) says which: `RT_ADD` or
//! `RT_DELETE` before a change, `RT_CONSISTENT` after it. Only the consistent calls
//! matter:
//!
//! * the first one after an exec comes when the startup libraries are mapped and
//!   relocated and before any constructor ran: the image's full placement;
//! * later ones follow a `dlopen` (mapped, before its constructors) or a `dlclose`
//!   (unmapped): the probes of a library that is no longer mapped are unregistered
//!   (their counts carried) and pending again, then pending probes are placed — as
//!   gdb's pending breakpoints are.
//!
//! Where `r_debug` cannot be found, every call places (which is what it was before).

use std::sync::{Arc, Mutex, Weak};

use multiprobe_core::{Hit, PreAction};
use multiprobe_symbols::{Maps, ProcessSymbols};

use super::{lock, place_now, startup_done, Scope, Session, Shared, Stage};

/// The loader's hook for debuggers, and its state.
const LOADER_HOOK: &str = "_dl_debug_state";
const R_DEBUG: &str = "_r_debug";
/// `struct r_debug { int r_version; struct link_map *r_map; ElfW(Addr) r_brk; enum
/// r_state; ... }`: where `r_state` is, and its consistent value.
const R_STATE_OFFSET: u64 = 24;
const RT_CONSISTENT: u32 = 0;

/// The internal probe on the loader's hook of one process. It holds the session
/// weakly: the session holds the registry that holds the hook.
struct PlaceHook {
    shared: Weak<Mutex<Session>>,
    pid: i32,
    r_debug: Option<u64>,
}

impl multiprobe_core::Handler for PlaceHook {
    fn pre(&self, hit: &mut Hit<'_>) -> PreAction {
        if let Some(r) = self.r_debug {
            let mut state = [0u8; 4];
            if hit.mem().read(r + R_STATE_OFFSET, &mut state).is_ok()
                && u32::from_le_bytes(state) != RT_CONSISTENT
            {
                return PreAction::Continue; // a change is about to begin: nothing yet
            }
        }
        let Some(shared) = self.shared.upgrade() else {
            return PreAction::Continue;
        };
        let (stage, first) = {
            let s = lock(&shared);
            match s.procs.iter().find(|p| p.pid == self.pid) {
                Some(p) => {
                    // Return probes placed at exec need the unwinders of the libraries
                    // loaded since (C++ exceptions, `backtrace`).
                    p.registry.backend().libraries_changed();
                    (p.stage, p.first)
                }
                None => return PreAction::Continue,
            }
        };
        if stage == Stage::Loading {
            place_now(&shared, self.pid, Scope::All, first);
            startup_done(&shared, self.pid, first);
            if lock(&shared).has_fatal() {
                // Bad input: the program never runs its own code (no constructor ran
                // yet). Killed here, with the thread still stopped in the loader.
                // SAFETY: sending a signal to our traced child; no memory involved.
                unsafe { libc::kill(self.pid, libc::SIGKILL) };
            }
        } else {
            place_now(&shared, self.pid, Scope::All, false);
        }
        PreAction::Continue
    }
}

/// Put the internal probe on the loader's hook of process `pid` (not shown in the
/// summary). `startup`: the program was just executed and its libraries are to come
/// (the image is loading from now on). Returns whether the hook is in place.
pub(super) fn watch(shared: &Shared, pid: i32, startup: bool) -> bool {
    let (registry, cache, sink, main) = {
        let mut s = lock(shared);
        let Some(p) = s.proc_mut(pid) else {
            return false;
        };
        if p.loader_watched {
            return true;
        }
        let main = p.program.clone();
        (
            p.registry.clone(),
            Arc::clone(&s.cache),
            Arc::clone(&s.sink),
            main,
        )
    };
    let Ok(syms) = ProcessSymbols::read(pid as u32, cache) else {
        return false;
    };
    // The loader: the file that defines the hook — not the program itself, unless it
    // is static (glibc's static programs have their own, for `dlopen`).
    let files = syms.files();
    let loader = files
        .iter()
        .filter(|f| !startup || main.as_deref() != Some(**f))
        .find(|f| syms.resolve(Some(f), LOADER_HOOK).is_ok())
        .map(|f| f.to_string());
    let Some(loader) = loader else {
        if startup {
            sink.note_for(
                Some(pid),
                "no dynamic loader hook found: libraries are probed once the program runs",
            );
        }
        return false;
    };
    let Ok(hook_at) = syms.resolve(Some(&loader), LOADER_HOOK).map(|l| l.start) else {
        return false;
    };
    let r_debug = syms.object(Some(&loader), R_DEBUG);
    let hook = PlaceHook {
        shared: Arc::downgrade(shared),
        pid,
        r_debug,
    };
    match registry.register_handler(hook_at, hook) {
        Ok(g) => {
            let mut s = lock(shared);
            if let Some(p) = s.proc_mut(pid) {
                p.hooks.push(g.into_id());
                p.loader_watched = true;
                p.r_debug = r_debug;
                if startup {
                    p.stage = Stage::Loading;
                }
            }
            true
        }
        Err(e) => {
            sink.note_for(
                Some(pid),
                &format!("cannot watch the dynamic loader ({e}); pending probes stay pending"),
            );
            false
        }
    }
}

impl Session {
    /// Unregister the probes of process `i` whose code is no longer mapped where it
    /// was (`dlclose`), carrying their counts, and make them pending again. Called from
    /// the loader hook, inside dispatch: the handlers are unlinked at once (the grace
    /// period is not waited for, and nothing else runs them: hits are served on this
    /// thread).
    pub(super) fn forget_unloaded(&mut self, i: usize, maps: &Maps) {
        let p = &mut self.procs[i];
        let registry = p.registry.clone();
        let (ids, specs) = p
            .rows
            .unmapped(maps, |id| registry.handler(id).ok().map(|i| i.stats));
        if ids.is_empty() {
            return;
        }
        // `InsideDispatch` means unlinked, not waited for; the breakpoints went with the
        // code (the backend writes nothing there).
        let _ = registry.unregister_batch(&ids);
        let pid = p.pid;
        for spec in specs {
            let text = self.specs[spec].text.clone();
            self.note_once(
                pid,
                spec,
                "unloaded",
                &format!("probe {text:?}: its code was unloaded; pending until it is loaded again"),
            );
        }
    }
}
