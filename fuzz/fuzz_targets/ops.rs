//! Random registry operations (register shared/exclusive, unregister, enable,
//! disable, batches, guard drops, injected backend failures) interleaved with runs of
//! the seeded scheduler, checked against the reference model after every operation and
//! micro-step, then the transparency oracle and the final restore. See
//! `multiprobe_backend_sim::scenario`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiprobe_backend_sim::handlers::quiet_injected_panics;
use multiprobe_backend_sim::scenario::{run_ops, OpsCase};

fuzz_target!(|case: OpsCase| {
    quiet_injected_panics();
    if let Err(divergence) = run_ops(&case) {
        panic!("divergence from the model: {divergence}");
    }
});
