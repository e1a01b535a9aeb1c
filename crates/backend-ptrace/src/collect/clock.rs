//! The tracee's timestamps: `rdtsc` in the generated code, converted by the tracer to
//! `CLOCK_MONOTONIC` nanoseconds from (TSC, clock) pairs it samples itself — one when
//! the area is made, one at each drain. The conversion is linear between the first
//! pair and the latest (the TSC is invariant on every CPU this backend runs on: one
//! rate, synchronised across cores); before the second pair it uses a rate measured
//! over a short busy wait at the first.
//!
//! `unsafe` here: only `rdtsc`, which has no preconditions.

/// The time stamp counter now.
pub(crate) fn rdtsc() -> u64 {
    // SAFETY: `rdtsc` reads a counter; it touches no memory and every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// (TSC, monotonic ns) pairs.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Clock {
    first: (u64, u64),
    last: (u64, u64),
}

/// A pair sampled now: the TSC between two clock reads, against their midpoint. Of a
/// few tries, the one with the two reads closest together: a thread preempted between
/// them gets a midpoint off by up to half the preemption, and a calibration pair off by
/// 60 µs over its 1 ms made every later conversion 6% wrong (seen under a loaded CI).
fn sample() -> (u64, u64) {
    (0..8)
        .map(|_| {
            let a = super::handler::monotonic_ns();
            let t = rdtsc();
            let b = super::handler::monotonic_ns();
            (b - a, (t, a + (b - a) / 2))
        })
        .min_by_key(|&(window, _)| window)
        .map(|(_, pair)| pair)
        .expect("eight tries")
}

impl Clock {
    /// Calibrated now (takes about a millisecond).
    pub(crate) fn new() -> Clock {
        let first = sample();
        let mut last = first;
        while last.1 - first.1 < 1_000_000 {
            std::hint::spin_loop();
            last = sample();
        }
        Clock { first, last }
    }

    /// Take a new pair (at a drain): the rate gets better the longer the run.
    pub(crate) fn resample(&mut self) {
        let s = sample();
        if s.0 > self.last.0 {
            self.last = s;
        }
    }

    /// Nanoseconds per tick, fixed point with 32 fraction bits (at least 1), for code
    /// that converts durations itself (`latency` in the tracee).
    pub(crate) fn ns_per_tick_q32(&self) -> u64 {
        ((self.ns_per_tick() * (1u64 << 32) as f64) as u64).max(1)
    }

    /// The rate between the first pair and the latest.
    fn ns_per_tick(&self) -> f64 {
        let (t0, n0) = self.first;
        let (t1, n1) = self.last;
        (n1 - n0) as f64 / (t1 - t0).max(1) as f64
    }

    /// `tsc` on `CLOCK_MONOTONIC`, in nanoseconds.
    pub(crate) fn ns(&self, tsc: u64) -> u64 {
        let (t0, n0) = self.first;
        let d = (tsc as f64 - t0 as f64) * self.ns_per_tick();
        (n0 as f64 + d).max(0.0) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smallest error of `c` over a few samples: a sample taken while the thread
    /// was preempted between its two reads is off by the preemption, not the clock.
    fn error(c: &Clock) -> u64 {
        (0..5)
            .map(|_| {
                let (t, n) = sample();
                c.ns(t).abs_diff(n)
            })
            .min()
            .unwrap()
    }

    #[test]
    fn tsc_converts_to_the_monotonic_clock_within_a_few_microseconds() {
        let c = Clock::new();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let e = error(&c);
        assert!(e < 200_000, "{e} ns off");
        let mut c = c;
        c.resample();
        let e = error(&c);
        assert!(e < 20_000, "{e} ns off after a resample");
    }
}
