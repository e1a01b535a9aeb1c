//! The every-thread check before a region is replaced by a jump: no thread may stand
//! in the region's interior, or be about to return there from a signal handler, when
//! the jump's bytes are written. A thread found there is moved to the same point of
//! the relocated copy in the trampoline.
//!
//! How (thread context, one check at a time):
//! 1. Every other thread of the process (`/proc/self/task`) gets a SIGSEGV queued with
//!    `rt_tgsigqueueinfo`, `si_code == SI_QUEUE` and a value carrying [`MAGIC`] and the
//!    check's generation: our fault handler recognises it ([`on_check`]), so no new
//!    signal number is taken. The handler records its `ucontext` and waits (a futex)
//!    until the promoter releases it; a stale request (a check that gave up on this
//!    thread) is recognised by its generation and ignored.
//!
//!    Why SIGSEGV and not SIGTRAP: a classic signal is pending at most once, and the
//!    kernel drops a second one sent meanwhile. A thread that executes a probe's `int3`
//!    while our request is pending would lose its breakpoint trap (SIGTRAP) and resume
//!    after the `int3`, in the middle of the instruction. A real fault dropped the same
//!    way costs nothing: a fault's `rip` is the faulting instruction itself, which
//!    faults again when the thread resumes.
//! 2. The promoter waits a bounded time for every thread to arrive. A thread that does
//!    not (it blocks SIGSEGV, or is stopped) means: not promoted, and why.
//! 3. For each parked thread, the interrupted `rip` of its context, and those of every
//!    signal frame further up its stack: a thread held in a signal handler has its
//!    interrupted context in an `rt_sigframe` on its stack, not in the context our
//!    signal sees. Frames are found by their return address — glibc's `__restore_rt`,
//!    the `sa_restorer` of handlers installed through libc (ours included) — and
//!    validated (user code segment 0x33, `uc_link` null, the FP state pointer just
//!    above the frame, where the kernel puts it) before their saved `rip` is changed.
//!    A frame whose saved `rsp` lies on another stack (a handler on the alternate
//!    stack) is followed there. The promoter's own stack is walked too.
//! 4. An interior `rip` at an instruction boundary moves to the relocated copy; one that
//!    is the `int3` trap of this very site in progress (`rip` = address + 1, SIGTRAP
//!    from the kernel, trap number 3) is left alone: its handler sets `rip` itself. Any
//!    other interior `rip` refuses the promotion.
//!
//! After the release no thread can enter the interior: the `int3` on the first byte
//! stops every new arrival, and the region checks exclude branches into it.
//!
//! Known limit: frames of handlers installed with another restorer (a runtime that
//! calls `rt_sigaction` itself) are not recognised.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use libc::{c_int, siginfo_t, ucontext_t};
use multiprobe_core::Memory;
use multiprobe_symbols::Maps;
use multiprobe_x86::{Region, Trampoline};

use crate::memory::LocalMemory;
use crate::thread;

/// Tag of our check requests in `si_value` (the generation is or'ed into the low 24
/// bits).
pub(crate) const MAGIC: u64 = 0x6d70_6368_6b00_0000; // "mpchk"
const GEN_MASK: u64 = 0xff_ffff;
/// How long the promoter waits for every thread to arrive.
const ARRIVAL: Duration = Duration::from_millis(500);
/// How long a parked thread waits before it gives up on a vanished promoter.
const PARK_MAX_NS: i64 = 2_000_000_000;
const MAX_THREADS: usize = 1024;
const SI_QUEUE: c_int = -1;

struct Parked {
    tid: AtomicU32,
    /// The generation the thread answered (a late answer to an abandoned check can land
    /// in the next check's slots: it is told apart by this).
    gen: AtomicU64,
    uc: AtomicPtr<ucontext_t>,
}

struct Check {
    /// The current generation (low 24 bits), 0 when no check is running.
    gen: AtomicU64,
    arrived: AtomicU32,
    /// Futex word: the generation whose threads may go.
    release: AtomicU32,
    parked: [Parked; MAX_THREADS],
    overflow: AtomicBool,
}

static CHECK: Check = Check {
    gen: AtomicU64::new(0),
    arrived: AtomicU32::new(0),
    release: AtomicU32::new(0),
    parked: [const {
        Parked {
            tid: AtomicU32::new(0),
            gen: AtomicU64::new(0),
            uc: AtomicPtr::new(std::ptr::null_mut()),
        }
    }; MAX_THREADS],
    overflow: AtomicBool::new(false),
};

static ONE_AT_A_TIME: Mutex<u64> = Mutex::new(0);

/// Why a promotion cannot go ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CheckFailure {
    /// A thread did not answer the check signal in time (SIGSEGV blocked, stopped).
    NoAnswer { tid: u32 },
    /// A thread's context stands inside the region where it cannot be moved.
    Stuck { tid: u32, rip: u64 },
    /// The check itself failed (listing threads, sending the signal).
    Io(String),
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckFailure::NoAnswer { tid } => write!(
                f,
                "thread {tid} did not answer the check signal (SIGSEGV blocked or the thread stopped)"
            ),
            CheckFailure::Stuck { tid, rip } => write!(
                f,
                "thread {tid} has a saved context at {rip:#x}, inside the region, that cannot be moved"
            ),
            CheckFailure::Io(e) => write!(f, "the thread check failed: {e}"),
        }
    }
}

fn futex(word: &AtomicU32, op: c_int, val: u32, timeout: *const libc::timespec) -> i64 {
    // SAFETY: a futex operation on a valid, 4-byte aligned atomic of ours; the timeout
    // is null or points to a valid timespec.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op | libc::FUTEX_PRIVATE_FLAG,
            val,
            timeout,
        ) as i64
    }
}

/// Our SIGSEGV handler's hook: if `si` is a check request, park this thread until the
/// promoter is done with its context and return true. Async-signal-safe: atomics and the
/// futex system call.
pub(crate) fn on_check(si: &siginfo_t, uc: *mut ucontext_t) -> bool {
    if si.si_code != SI_QUEUE {
        return false;
    }
    // SAFETY: `si_pid` and `si_value` are valid for SI_QUEUE signals.
    let (pid, value) = unsafe { (si.si_pid(), si.si_value().sival_ptr as u64) };
    // SAFETY: getpid has no preconditions.
    if pid != unsafe { libc::getpid() } || value & !GEN_MASK != MAGIC {
        return false;
    }
    let gen = value & GEN_MASK;
    if CHECK.gen.load(Ordering::Acquire) != gen {
        return true; // a check that gave up on us: nothing to do
    }
    let slot = CHECK.arrived.fetch_add(1, Ordering::AcqRel) as usize;
    if slot >= MAX_THREADS {
        CHECK.overflow.store(true, Ordering::Release);
        return true;
    }
    CHECK.parked[slot].uc.store(uc, Ordering::Relaxed);
    CHECK.parked[slot].gen.store(gen, Ordering::Relaxed);
    CHECK.parked[slot]
        .tid
        .store(thread::tid(), Ordering::Release);
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 100_000_000,
    };
    let mut waited = 0i64;
    while CHECK.release.load(Ordering::Acquire) != gen as u32 && waited < PARK_MAX_NS {
        futex(
            &CHECK.release,
            libc::FUTEX_WAIT,
            CHECK.release.load(Ordering::Relaxed),
            &ts,
        );
        waited += ts.tv_nsec;
    }
    true
}

fn tids() -> io::Result<Vec<u32>> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc/self/task")? {
        if let Some(t) = e?.file_name().to_str().and_then(|s| s.parse().ok()) {
            v.push(t);
        }
    }
    Ok(v)
}

fn alive(tid: u32) -> bool {
    // SAFETY: signal 0 only checks that the thread exists.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, 0) == 0 }
}

fn send(tid: u32, value: u64) -> io::Result<()> {
    // SAFETY: a zeroed siginfo filled as the kernel expects for SI_QUEUE.
    let mut si: siginfo_t = unsafe { std::mem::zeroed() };
    si.si_signo = libc::SIGSEGV;
    si.si_code = SI_QUEUE;
    // SAFETY: the `_rt` member of the union: pid, uid, value, after the three ints.
    unsafe {
        let p = (&mut si as *mut siginfo_t).cast::<u8>().add(16);
        p.cast::<i32>().write_unaligned(libc::getpid());
        p.add(4).cast::<u32>().write_unaligned(libc::getuid());
        p.add(8).cast::<u64>().write_unaligned(value);
    }
    // SAFETY: a valid siginfo for our own process.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_tgsigqueueinfo,
            libc::getpid(),
            tid,
            libc::SIGSEGV,
            &si as *const siginfo_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The `sa_restorer` glibc gives handlers (`__restore_rt`): the return address at the
/// bottom of every `rt_sigframe` of a handler installed through libc.
fn restorer() -> u64 {
    // SAFETY: querying the current SIGTRAP action into a zeroed struct.
    unsafe {
        let mut a: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGTRAP, std::ptr::null(), &mut a);
        a.sa_restorer.map_or(0, |f| f as usize as u64)
    }
}

/// Offsets in an `rt_sigframe` (from its `pretcode`): the kernel's `struct ucontext`
/// follows, then the `siginfo`. glibc's `ucontext_t` starts with the same fields.
const UC: u64 = 8;
const GREGS: u64 = UC + std::mem::offset_of!(ucontext_t, uc_mcontext) as u64;
const FPSTATE: u64 = GREGS + 23 * 8;
const UC_LINK: u64 = UC + 8;
/// The kernel's `struct ucontext` is 304 bytes (its signal mask is 8 bytes).
const SIGINFO: u64 = UC + 304;

fn greg(i: c_int) -> u64 {
    GREGS + 8 * i as u64
}

/// What to do with a saved `rip`.
enum Verdict {
    Keep,
    Move(u64),
    Stuck,
}

struct Fixer<'a> {
    region: &'a Region,
    map: &'a Trampoline,
    mem: LocalMemory,
}

impl Fixer<'_> {
    /// The verdict on a context that was interrupted at `rip`; `int3_trap`: it is the
    /// kernel's SIGTRAP of an `int3` (trap number 3).
    fn verdict(&self, rip: u64, int3_trap: bool) -> Verdict {
        if !self.region.in_interior(rip) {
            return Verdict::Keep;
        }
        if int3_trap && rip == self.region.addr() + 1 {
            return Verdict::Keep; // this site's trap in progress
        }
        match self.region.boundary_index(rip) {
            Some(i) => Verdict::Move(self.map.copy_of(i)),
            None => Verdict::Stuck,
        }
    }

    /// Walk the stack from `rsp` up to the end of its mapping for signal frames, fixing
    /// their saved `rip`s, following frames onto other stacks.
    fn walk(&self, rsp: u64, maps: &Maps, restorer: u64, tid: u32) -> Result<(), CheckFailure> {
        let mut todo = vec![rsp];
        let mut seen: Vec<u64> = Vec::new();
        while let Some(sp) = todo.pop() {
            let Some(m) = maps.find(sp) else { continue };
            if seen.contains(&m.start) {
                continue;
            }
            seen.push(m.start);
            let mut p = sp & !7;
            let mut buf = vec![0u8; 4096];
            while p + SIGINFO + 128 <= m.end {
                let n = ((m.end - p) as usize).min(buf.len()) & !7;
                if self.mem.read(p, &mut buf[..n]).is_err() {
                    break;
                }
                for (k, w) in buf[..n].chunks_exact(8).enumerate() {
                    if u64::from_le_bytes(w.try_into().unwrap()) == restorer && restorer != 0 {
                        let frame = p + 8 * k as u64;
                        if let Some(next) = self.frame(frame, m.end, tid)? {
                            todo.push(next);
                        }
                    }
                }
                p += n as u64;
            }
        }
        Ok(())
    }

    /// A candidate frame at `f`: validate, fix, and return its saved `rsp`.
    fn frame(&self, f: u64, end: u64, tid: u32) -> Result<Option<u64>, CheckFailure> {
        let m: &dyn Memory = &self.mem;
        let rd = |o: u64| m.read_u64(f + o).ok();
        if f + SIGINFO + 16 > end {
            return Ok(None);
        }
        let (Some(link), Some(csgsfs), Some(fp), Some(rip), Some(rsp), Some(trapno)) = (
            rd(UC_LINK),
            rd(greg(libc::REG_CSGSFS)),
            rd(FPSTATE),
            rd(greg(libc::REG_RIP)),
            rd(greg(libc::REG_RSP)),
            rd(greg(libc::REG_TRAPNO)),
        ) else {
            return Ok(None);
        };
        let fp_ok = fp == 0 || (fp > f + SIGINFO && fp < f + SIGINFO + 256 && fp % 64 == 0);
        if link != 0 || csgsfs & 0xffff != 0x33 || !fp_ok {
            return Ok(None);
        }
        let signo = m.read_u64(f + SIGINFO).unwrap_or(0) as u32 as c_int;
        let code = (m.read_u64(f + SIGINFO + 8).unwrap_or(0) & 0xffff_ffff) as u32 as c_int;
        let int3 = signo == libc::SIGTRAP && code == libc::SI_KERNEL && trapno == 3;
        match self.verdict(rip, int3) {
            Verdict::Keep => {}
            Verdict::Move(to) => {
                m.write_u64(f + greg(libc::REG_RIP), to)
                    .map_err(|e| CheckFailure::Io(e.to_string()))?;
            }
            Verdict::Stuck => return Err(CheckFailure::Stuck { tid, rip }),
        }
        Ok(Some(rsp))
    }
}

/// Run the check for `region` with its trampoline `map` (module docs). On error no
/// context was changed in a way that matters: moved threads run the relocated copy,
/// which is equivalent whether the jump is written or not.
pub(crate) fn check_all(region: &Region, map: &Trampoline) -> Result<(), CheckFailure> {
    let mut last = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let gen = (*last % GEN_MASK) + 1;
    *last = gen;
    let me = thread::tid();
    let others: Vec<u32> = tids()
        .map_err(|e| CheckFailure::Io(e.to_string()))?
        .into_iter()
        .filter(|&t| t != me)
        .collect();
    let maps = Maps::read(0).map_err(|e| CheckFailure::Io(e.to_string()))?;
    let fixer = Fixer {
        region,
        map,
        mem: LocalMemory::installed(),
    };
    CHECK.arrived.store(0, Ordering::Relaxed);
    CHECK.overflow.store(false, Ordering::Relaxed);
    for p in &CHECK.parked {
        p.tid.store(0, Ordering::Relaxed);
        p.gen.store(0, Ordering::Relaxed);
    }
    CHECK.gen.store(gen, Ordering::Release);
    let mut expected = Vec::new();
    for &t in &others {
        match send(t, MAGIC | gen) {
            Ok(()) => expected.push(t),
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => {} // exited
            Err(e) => {
                finish(gen);
                return Err(CheckFailure::Io(e.to_string()));
            }
        }
    }
    let result = wait_and_fix(&fixer, &maps, &expected, gen);
    finish(gen);
    result
}

fn parked_tids(gen: u64) -> Vec<(u32, *mut ucontext_t)> {
    let n = (CHECK.arrived.load(Ordering::Acquire) as usize).min(MAX_THREADS);
    (0..n)
        .filter_map(|i| {
            let p = &CHECK.parked[i];
            let t = p.tid.load(Ordering::Acquire);
            (t != 0 && p.gen.load(Ordering::Relaxed) == gen)
                .then(|| (t, p.uc.load(Ordering::Relaxed)))
        })
        .collect()
}

fn wait_and_fix(
    fixer: &Fixer<'_>,
    maps: &Maps,
    expected: &[u32],
    gen: u64,
) -> Result<(), CheckFailure> {
    let start = Instant::now();
    let missing = loop {
        let parked = parked_tids(gen);
        let missing: Vec<u32> = expected
            .iter()
            .copied()
            .filter(|t| !parked.iter().any(|(p, _)| p == t) && alive(*t))
            .collect();
        if missing.is_empty() || start.elapsed() > ARRIVAL {
            break missing;
        }
        std::thread::sleep(Duration::from_micros(20));
    };
    if let Some(&tid) = missing.first() {
        return Err(CheckFailure::NoAnswer { tid });
    }
    if CHECK.overflow.load(Ordering::Acquire) {
        return Err(CheckFailure::Io(
            "more threads than the check can park".into(),
        ));
    }
    let restorer = restorer();
    for (tid, uc) in parked_tids(gen) {
        // SAFETY: the thread is parked in our handler, which keeps its ucontext alive
        // and does not touch it until released.
        let uc = unsafe { &mut *uc };
        let g = &mut uc.uc_mcontext.gregs;
        let rip = g[libc::REG_RIP as usize] as u64;
        match fixer.verdict(rip, false) {
            Verdict::Keep => {}
            Verdict::Move(to) => g[libc::REG_RIP as usize] = to as i64,
            Verdict::Stuck => return Err(CheckFailure::Stuck { tid, rip }),
        }
        let rsp = g[libc::REG_RSP as usize] as u64;
        fixer.walk(rsp, maps, restorer, tid)?;
    }
    // This thread's own interrupted contexts, if it runs inside a signal handler.
    let here = 0u64;
    fixer.walk(&here as *const u64 as u64, maps, restorer, thread::tid())
}

fn finish(gen: u64) {
    CHECK.gen.store(0, Ordering::Release);
    CHECK.release.store(gen as u32, Ordering::Release);
    futex(
        &CHECK.release,
        libc::FUTEX_WAKE,
        i32::MAX as u32,
        std::ptr::null(),
    );
}
