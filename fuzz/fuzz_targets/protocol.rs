//! Several simulated threads stepped in fuzzer-chosen order, one to four micro-steps
//! at a time (trap, pre, out-of-line step, post or fault), with the registry changing
//! between any two of them; same checks as `ops`. See
//! `multiprobe_backend_sim::scenario`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use multiprobe_backend_sim::handlers::quiet_injected_panics;
use multiprobe_backend_sim::scenario::{run_protocol, ProtocolCase};

fuzz_target!(|case: ProtocolCase| {
    quiet_injected_panics();
    if let Err(divergence) = run_protocol(&case) {
        panic!("divergence from the model: {divergence}");
    }
});
