//! Watching the dynamic loader: an internal probe on `_dl_debug_state`, which `dlopen`
//! and `dlclose` call after changing the maps. At each hit: the probes of a library that
//! is no longer mapped are unregistered (their counts carried) and pending again, then
//! pending probes are placed — as gdb's pending breakpoints are.

use std::sync::Arc;

use multiprobe_core::{Hit, PreAction};
use multiprobe_symbols::{Maps, ProcessSymbols};

use super::{lock, place_now, Session, Shared};

/// The dynamic loader, and its hook that `dlopen` and `dlclose` call.
const LOADER: &str = "ld-linux-x86-64.so.2";
const LOADER_HOOK: &str = "_dl_debug_state";

/// The internal probe on the loader's hook.
struct PlaceHook {
    shared: Shared,
}

impl multiprobe_core::Handler for PlaceHook {
    fn pre(&self, _hit: &mut Hit<'_>) -> PreAction {
        place_now(&self.shared, false);
        PreAction::Continue
    }
}

/// Put the internal probe on the loader's hook (not shown in the summary).
pub(super) fn watch(shared: &Shared) {
    let (registry, pid, cache, sink) = {
        let s = lock(shared);
        (
            s.registry.clone(),
            s.pid,
            Arc::clone(&s.cache),
            Arc::clone(&s.sink),
        )
    };
    let addr = ProcessSymbols::read(pid as u32, cache)
        .ok()
        .and_then(|syms| syms.resolve(Some(LOADER), LOADER_HOOK).ok())
        .map(|l| l.start);
    let Some(addr) = addr else {
        sink.note("no dynamic loader hook found; pending probes stay pending");
        return;
    };
    let hook = PlaceHook {
        shared: Arc::clone(shared),
    };
    match registry.register_handler(addr, hook) {
        Ok(g) => lock(shared).hooks.push(g.into_id()),
        Err(e) => sink.note(&format!(
            "cannot watch the dynamic loader ({e}); pending probes stay pending"
        )),
    }
}

impl Session {
    /// Unregister the probes whose code is no longer mapped where it was (`dlclose`),
    /// carrying their counts, and make them pending again. Called from the loader hook,
    /// inside dispatch: the handlers are unlinked at once (the grace period is not
    /// waited for, and nothing else runs them: hits are served on this thread).
    pub(super) fn forget_unloaded(&mut self, maps: &Maps) {
        let registry = self.registry.clone();
        let (ids, specs) = self
            .rows
            .unmapped(maps, |id| registry.handler(id).ok().map(|i| i.stats));
        if ids.is_empty() {
            return;
        }
        // `InsideDispatch` means unlinked, not waited for; the breakpoints went with the
        // code (the backend writes nothing there).
        let _ = registry.unregister_batch(&ids);
        for spec in specs {
            if self.unload_noted.insert(spec) {
                let text = &self.specs[spec].text;
                self.sink.note(&format!(
                    "probe {text:?}: its code was unloaded; pending until it is loaded again"
                ));
            }
        }
    }

    /// Whether some probe sits in a shared library (which `dlclose` could unload).
    pub(super) fn any_in_library(&self, maps: &Maps) -> bool {
        let exe = std::fs::read_link(format!("/proc/{}/exe", self.pid)).ok();
        let main = exe.as_ref().map(|p| p.to_string_lossy());
        let sites: std::collections::BTreeSet<u64> = self.rows.sites().collect();
        sites.into_iter().any(|a| {
            maps.find(a).is_some_and(|reg| {
                reg.is_file() && main.as_deref().is_none_or(|m| m != reg.path.as_str())
            })
        })
    }
}
