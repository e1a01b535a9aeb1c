//! The every-thread check before a region is replaced by a jump: no thread may stand
//! in the region's interior, or be about to return there from a signal handler, when
//! the jump's bytes are written. A thread found there is moved to the same point of
//! the relocated copy in the trampoline.
//!
//! How (thread context, one check at a time):
//! 1. Every other thread of the process (`/proc/self/task`) gets a SIGFPE queued with
//!    `rt_tgsigqueueinfo`, `si_code == SI_QUEUE` and a value carrying [`MAGIC`] and the
//!    check's generation: our fault handler recognises it ([`on_check`]), so no new
//!    signal number is taken. The handler records its `ucontext` and waits (a futex)
//!    until the promoter releases it; a stale request (a check that gave up on this
//!    thread) is recognised by its generation and ignored.
//!
//!    Why SIGFPE and not SIGTRAP: a classic signal is pending at most once, and the
//!    kernel drops a second one sent meanwhile. A thread that executes a probe's `int3`
//!    while our request is pending would lose its breakpoint trap (SIGTRAP) and resume
//!    after the `int3`, in the middle of the instruction. A real fault dropped the same
//!    way costs nothing: a fault's `rip` is the faulting instruction itself, which
//!    faults again when the thread resumes. And not SIGSEGV: its handler runs on the
//!    alternate signal stack (for stack overflows), a few KiB where a parked handler
//!    interrupted by the next check's signal would overflow; ours for SIGFPE runs on
//!    the thread's own stack.
//! 2. The promoter waits a bounded time for every thread to arrive. A thread that does
//!    not (it blocks SIGFPE, or is stopped) means: not promoted, and why.
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
use multiprobe_core::{Memory, Regs};
use multiprobe_symbols::Maps;
use multiprobe_x86::{Region, Trampoline};

use crate::memory::LocalMemory;
use crate::site::BlockInfo;
use crate::{context, slots, thread};

/// Tag of our check requests in `si_value` (the generation is or'ed into the low 24
/// bits).
pub(crate) const MAGIC: u64 = 0x6d70_6368_6b00_0000; // "mpchk"
const GEN_MASK: u64 = 0xff_ffff;
/// How long the promoter waits for every thread to arrive (a loaded machine may not
/// run a woken thread for a while).
const ARRIVAL: Duration = Duration::from_secs(2);
/// How long a parked thread waits before it gives up on a vanished promoter.
const PARK_MAX_NS: i64 = 2_000_000_000;
const MAX_THREADS: usize = 1024;
const SI_QUEUE: c_int = -1;

struct Parked {
    tid: AtomicU32,
    /// The generation the thread answered (a late answer to an abandoned check can land
    /// in the next check's slots: it is told apart by this).
    gen: AtomicU64,
    /// `thread::oldest_trap()` of the thread: whether a trap handler it runs may have
    /// chosen a continuation without the trampoline in view.
    oldest_trap: AtomicU64,
    uc: AtomicPtr<ucontext_t>,
}

struct Check {
    /// The current generation (low 24 bits), 0 when no check is running.
    gen: AtomicU64,
    arrived: AtomicU32,
    /// Futex word: the generation whose threads may go.
    release: AtomicU32,
    /// Threads of the current generation that left their park (a futex word).
    left: AtomicU32,
    /// Bumped by every thread that parks (a futex word the promoter waits on).
    answered: AtomicU32,
    parked: [Parked; MAX_THREADS],
    overflow: AtomicBool,
}

static CHECK: Check = Check {
    gen: AtomicU64::new(0),
    arrived: AtomicU32::new(0),
    release: AtomicU32::new(0),
    left: AtomicU32::new(0),
    answered: AtomicU32::new(0),
    parked: [const {
        Parked {
            tid: AtomicU32::new(0),
            gen: AtomicU64::new(0),
            oldest_trap: AtomicU64::new(0),
            uc: AtomicPtr::new(std::ptr::null_mut()),
        }
    }; MAX_THREADS],
    overflow: AtomicBool::new(false),
};

static ONE_AT_A_TIME: Mutex<u64> = Mutex::new(0);

/// Why a promotion cannot go ahead.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum CheckFailure {
    /// A thread did not answer the check signal in time (SIGFPE blocked, stopped);
    /// `what` is its name and state from `/proc`.
    NoAnswer { tid: u32, what: String },
    /// A thread's context stands inside the region where it cannot be moved.
    Stuck { tid: u32, rip: u64 },
    /// A trap of the site stayed half-handled for the whole wait.
    Busy,
    /// The check itself failed (listing threads, sending the signal).
    Io(String),
}

impl std::fmt::Display for CheckFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CheckFailure::NoAnswer { tid, what } => write!(
                f,
                "thread {tid} did not answer the check signal (SIGFPE blocked or the thread stopped; {what})"
            ),
            CheckFailure::Stuck { tid, rip } => write!(
                f,
                "thread {tid} has a saved context at {rip:#x}, inside the region, that cannot be moved"
            ),
            CheckFailure::Busy => write!(
                f,
                "a trap of this site stayed in its handler on some thread for the whole check"
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

/// The signal the check queues (see the module docs).
pub(crate) const SIGNAL: c_int = libc::SIGFPE;

/// Our fault handler's hook for [`SIGNAL`]: if `si` is a check request, park this thread until the
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
        .oldest_trap
        .store(thread::oldest_trap(), Ordering::Relaxed);
    CHECK.parked[slot]
        .tid
        .store(thread::tid(), Ordering::Release);
    CHECK.answered.fetch_add(1, Ordering::Release);
    futex(&CHECK.answered, libc::FUTEX_WAKE, 1, std::ptr::null());
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
    // The promoter waits for this before the next check, so check signals never nest
    // deeply on a thread's (small, alternate) signal stack.
    CHECK.left.fetch_add(1, Ordering::Release);
    futex(&CHECK.left, libc::FUTEX_WAKE, 1, std::ptr::null());
    true
}

/// Wait (up to 1 ms) for `word` to move on from `seen`.
fn wait_change(word: &AtomicU32, seen: u32) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 1_000_000,
    };
    futex(word, libc::FUTEX_WAIT, seen, &ts);
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

/// A thread's name, state and signal masks, for a message.
fn describe(tid: u32) -> String {
    let status =
        std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap_or_default();
    status
        .lines()
        .filter(|l| {
            ["Name:", "State:", "SigPnd:", "SigBlk:"]
                .iter()
                .any(|k| l.starts_with(k))
        })
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

fn alive(tid: u32) -> bool {
    // SAFETY: signal 0 only checks that the thread exists.
    unsafe { libc::syscall(libc::SYS_tgkill, libc::getpid(), tid, 0) == 0 }
}

fn send(tid: u32, value: u64) -> io::Result<()> {
    // SAFETY: a zeroed siginfo filled as the kernel expects for SI_QUEUE.
    let mut si: siginfo_t = unsafe { std::mem::zeroed() };
    si.si_signo = SIGNAL;
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
            SIGNAL,
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

/// What to do with a saved context.
enum Verdict {
    /// Nothing: it is not in the way.
    Keep,
    /// Its registers changed (moved into the trampoline).
    Moved,
    /// Inside the region where it cannot be moved.
    Stuck,
    /// A trap of this site is being handled: wait until it is.
    Busy,
}

struct Fixer<'a> {
    region: &'a Region,
    map: &'a Trampoline,
    block: &'a BlockInfo,
    mem: LocalMemory,
    /// `site::PUBLISHED` after this site's trampoline was published.
    published: u64,
    /// Other sites promoted now.
    promoted: &'a [u64],
}

impl Fixer<'_> {
    /// Move a context interrupted at `regs` out of the way of the jump: from the
    /// region's interior to the same point of the relocated copy, from the site's slots
    /// (which jump back into the interior) to the trampoline's equivalent. `int3_trap`:
    /// the context is the kernel's SIGTRAP of an `int3` (trap number 3).
    fn fix(&self, regs: &mut Regs, int3_trap: bool, traps_safe: bool) -> Verdict {
        let rip = regs.rip;
        let addr = self.region.addr();
        if int3_trap {
            let trap_at = rip.wrapping_sub(1);
            if trap_at == addr || self.block.slot_at(trap_at).is_some() {
                // Its handler picks the continuation: with the trampoline in view (then
                // it never lands in the interior) or not (wait until it is done).
                return if traps_safe {
                    Verdict::Keep
                } else {
                    Verdict::Busy
                };
            }
            // A trap of another site close enough that its continuation — its slot's
            // jump back, its trampoline's copy (a demoted site's copies run on past
            // its end) — may land in this region's interior, or of such a site's
            // trap-after slot: wait until its handler is done.
            let near = |a: u64| {
                a.saturating_add(multiprobe_x86::MAX_REGION_LEN as u64) > addr
                    && a < self.region.end()
            };
            let other_slot = slots::lookup(trap_at).is_some_and(|b| near(b.addr));
            if near(trap_at) || other_slot {
                return Verdict::Busy;
            }
        }
        if let Some(other) = crate::tramps::lookup(rip).filter(|t| t.addr != addr) {
            // Inside another site's trampoline. If that site is promoted its exits
            // cannot reach into this region (regions of promoted sites never overlap);
            // if it was demoted, its copies may run into this region's interior: back
            // to the original code (equivalent, and its bytes are the originals again).
            if self.promoted.contains(&other.addr) {
                return Verdict::Keep;
            }
            let mut r = *regs;
            return match other.map().fixup(&mut r) {
                Some(_) => {
                    r.rip = self.map.resume_target(r.rip);
                    *regs = r;
                    Verdict::Moved
                }
                // In its save, dispatch or restore code: wait until it leaves.
                None => Verdict::Busy,
            };
        }
        if let Some(b) = slots::lookup(rip) {
            let Some(slot) = b.slot_at(rip) else {
                return Verdict::Keep;
            };
            let own = std::ptr::eq(b, self.block);
            let mut r = *regs;
            if slot.fixup_trap(rip + 1, &mut r) {
                // About to take a trap-after slot's int3, the posts still owed.
                if !self.region.in_interior(r.rip) {
                    return Verdict::Keep;
                }
                if !own || !self.map.has_post() {
                    return Verdict::Stuck;
                }
                regs.rip = self.map.post_stub();
                return Verdict::Moved;
            }
            if !slot.fixup_ip(&mut r) {
                return Verdict::Stuck;
            }
            let owes_post = b.post.as_ref().is_some_and(|p| p.contains(rip));
            if !own {
                // Another site's slot (that site inside this region, just removed):
                // only where it goes on matters.
                if !self.region.in_interior(r.rip) {
                    return Verdict::Keep;
                }
                if owes_post {
                    return Verdict::Stuck; // its posts would be lost
                }
                return match self.region.boundary_index(r.rip) {
                    Some(i) => {
                        r.rip = self.map.copy_of(i);
                        *regs = r;
                        Verdict::Moved
                    }
                    None => Verdict::Stuck,
                };
            }
            r.rip = if r.rip == addr {
                // The relocated instruction has not run yet.
                if owes_post {
                    if !self.map.has_post() {
                        return Verdict::Stuck;
                    }
                    self.map.post_copy()
                } else {
                    self.map.copy_of(0)
                }
            } else {
                self.map.resume_target(r.rip)
            };
            *regs = r;
            return Verdict::Moved;
        }
        if !self.region.in_interior(rip) {
            return Verdict::Keep;
        }
        match self.region.boundary_index(rip) {
            Some(i) => {
                regs.rip = self.map.copy_of(i);
                Verdict::Moved
            }
            None => Verdict::Stuck,
        }
    }

    /// Whether `w`, a word on a thread's stack, is an address inside the trampoline of a
    /// site other than this one that is not promoted now.
    fn returns_into_demoted(&self, w: u64) -> bool {
        if !crate::tramps::contains(w) {
            return false;
        }
        crate::tramps::lookup(w)
            .is_some_and(|t| t.addr != self.region.addr() && !self.promoted.contains(&t.addr))
    }

    /// Walk the stack from `rsp` up to the end of its mapping for signal frames, fixing
    /// their saved contexts, following frames onto other stacks.
    fn walk(
        &self,
        rsp: u64,
        maps: &Maps,
        restorer: u64,
        tid: u32,
        traps_safe: bool,
    ) -> Result<(), Problem> {
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
                    let w = u64::from_le_bytes(w.try_into().unwrap());
                    if restorer != 0 && w == restorer {
                        let frame = p + 8 * k as u64;
                        if let Some(next) = self.frame(frame, m.end, tid, traps_safe)? {
                            todo.push(next);
                        }
                    } else if self.returns_into_demoted(w) {
                        // A return address into a demoted site's trampoline: the thread
                        // runs that trampoline's entry (a handler, say) and will come
                        // back to its copies, which may run into this region.
                        return Err(Problem::Busy);
                    }
                }
                p += n as u64;
            }
        }
        Ok(())
    }

    /// A candidate frame at `f`: validate, fix, and return its saved `rsp`.
    fn frame(&self, f: u64, end: u64, tid: u32, traps_safe: bool) -> Result<Option<u64>, Problem> {
        let m: &dyn Memory = &self.mem;
        if f + SIGINFO + 16 > end {
            return Ok(None);
        }
        let mut g = [0u8; 23 * 8];
        let (Ok(link), Ok(fp), Ok(())) = (
            m.read_u64(f + UC_LINK),
            m.read_u64(f + FPSTATE),
            m.read(f + GREGS, &mut g),
        ) else {
            return Ok(None);
        };
        let mut gregs = [0i64; 23];
        for (i, c) in g.chunks_exact(8).enumerate() {
            gregs[i] = i64::from_le_bytes(c.try_into().unwrap());
        }
        let csgsfs = gregs[libc::REG_CSGSFS as usize] as u64;
        let trapno = gregs[libc::REG_TRAPNO as usize];
        let fp_ok = fp == 0 || (fp > f + SIGINFO && fp < f + SIGINFO + 256 && fp % 64 == 0);
        if link != 0 || csgsfs & 0xffff != 0x33 || !fp_ok {
            return Ok(None);
        }
        let signo = m.read_u64(f + SIGINFO).unwrap_or(0) as u32 as c_int;
        let code = m.read_u64(f + SIGINFO + 8).unwrap_or(0) as u32 as c_int;
        let int3 = signo == libc::SIGTRAP && code == libc::SI_KERNEL && trapno == 3;
        let mut regs = context::from_gregs(&gregs);
        let rsp = regs.rsp;
        match self.fix(&mut regs, int3, traps_safe) {
            Verdict::Keep => {}
            Verdict::Moved => {
                context::to_gregs(&mut gregs, &regs);
                let mut out = [0u8; 23 * 8];
                for (i, v) in gregs.iter().enumerate() {
                    out[8 * i..8 * i + 8].copy_from_slice(&v.to_le_bytes());
                }
                m.write(f + GREGS, &out)
                    .map_err(|e| Problem::Fail(CheckFailure::Io(e.to_string())))?;
            }
            Verdict::Stuck => {
                return Err(Problem::Fail(CheckFailure::Stuck { tid, rip: regs.rip }))
            }
            Verdict::Busy => return Err(Problem::Busy),
        }
        Ok(Some(rsp))
    }
}

/// What stopped one round of the check.
enum Problem {
    /// A trap of the site is half-handled somewhere: try again shortly.
    Busy,
    Fail(CheckFailure),
}

/// How many rounds the check retries while a trap of the site is half-handled.
const BUSY_ROUNDS: u32 = 200;

/// Run the check for `region` of `block` with its trampoline `map` (module docs). On
/// error no context was changed in a way that matters: moved threads run the relocated
/// copy, which is equivalent whether the jump is written or not.
pub(crate) fn check_all(
    region: &Region,
    map: &Trampoline,
    block: &BlockInfo,
    promoted: &[u64],
) -> Result<(), CheckFailure> {
    for _ in 0..BUSY_ROUNDS {
        match check_round(region, map, block, promoted) {
            Ok(()) => return Ok(()),
            Err(Problem::Fail(e)) => return Err(e),
            Err(Problem::Busy) => std::thread::yield_now(),
        }
    }
    Err(CheckFailure::Busy)
}

fn check_round(
    region: &Region,
    map: &Trampoline,
    block: &BlockInfo,
    promoted: &[u64],
) -> Result<(), Problem> {
    let mut last = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let gen = (*last % GEN_MASK) + 1;
    *last = gen;
    let me = thread::tid();
    let others: Vec<u32> = tids()
        .map_err(|e| Problem::Fail(CheckFailure::Io(e.to_string())))?
        .into_iter()
        .filter(|&t| t != me)
        .collect();
    let maps = Maps::read(0).map_err(|e| Problem::Fail(CheckFailure::Io(e.to_string())))?;
    let fixer = Fixer {
        region,
        map,
        block,
        mem: LocalMemory::installed(),
        published: crate::site::PUBLISHED.load(Ordering::Acquire),
        promoted,
    };
    CHECK.arrived.store(0, Ordering::Relaxed);
    CHECK.left.store(0, Ordering::Relaxed);
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
                return Err(Problem::Fail(CheckFailure::Io(e.to_string())));
            }
        }
    }
    let result = wait_and_fix(&fixer, &maps, &expected, gen);
    let parked = parked_tids(gen).len() as u32;
    finish(gen);
    // Let them leave the handler before anything else asks them to park again.
    let start = Instant::now();
    loop {
        let left = CHECK.left.load(Ordering::Acquire);
        if left >= parked || start.elapsed() > ARRIVAL {
            break;
        }
        wait_change(&CHECK.left, left);
    }
    result
}

/// The threads parked for `gen`: tid, context, and the oldest trap handler's reading.
fn parked_tids(gen: u64) -> Vec<(u32, *mut ucontext_t, u64)> {
    let n = (CHECK.arrived.load(Ordering::Acquire) as usize).min(MAX_THREADS);
    (0..n)
        .filter_map(|i| {
            let p = &CHECK.parked[i];
            let t = p.tid.load(Ordering::Acquire);
            (t != 0 && p.gen.load(Ordering::Relaxed) == gen).then(|| {
                (
                    t,
                    p.uc.load(Ordering::Relaxed),
                    p.oldest_trap.load(Ordering::Relaxed),
                )
            })
        })
        .collect()
}

fn wait_and_fix(fixer: &Fixer<'_>, maps: &Maps, expected: &[u32], gen: u64) -> Result<(), Problem> {
    let start = Instant::now();
    let missing = loop {
        let seen = CHECK.answered.load(Ordering::Acquire);
        let parked = parked_tids(gen);
        let missing: Vec<u32> = expected
            .iter()
            .copied()
            .filter(|t| !parked.iter().any(|(p, _, _)| p == t) && alive(*t))
            .collect();
        if missing.is_empty() || start.elapsed() > ARRIVAL {
            break missing;
        }
        wait_change(&CHECK.answered, seen);
    };
    if let Some(&tid) = missing.first() {
        return Err(Problem::Fail(CheckFailure::NoAnswer {
            tid,
            what: describe(tid),
        }));
    }
    if CHECK.overflow.load(Ordering::Acquire) {
        return Err(Problem::Fail(CheckFailure::Io(
            "more threads than the check can park".into(),
        )));
    }
    let restorer = restorer();
    for (tid, uc, oldest) in parked_tids(gen) {
        // Every trap handler running on the thread started after the trampoline was
        // published: their continuations avoid the interior on their own.
        let traps_safe = oldest == 0 || oldest >= fixer.published;
        // SAFETY: the thread is parked in our handler, which keeps its ucontext alive
        // and does not touch it until released.
        let uc = unsafe { &mut *uc };
        let g = &mut uc.uc_mcontext.gregs;
        let mut regs = context::from_gregs(g);
        let rsp = regs.rsp;
        match fixer.fix(&mut regs, false, traps_safe) {
            Verdict::Keep => {}
            Verdict::Moved => context::to_gregs(g, &regs),
            Verdict::Stuck => {
                return Err(Problem::Fail(CheckFailure::Stuck { tid, rip: regs.rip }))
            }
            Verdict::Busy => return Err(Problem::Busy),
        }
        fixer.walk(rsp, maps, restorer, tid, traps_safe)?;
    }
    // This thread's own interrupted contexts, if it runs inside a signal handler.
    let here = 0u64;
    let own_safe = thread::oldest_trap() == 0 || thread::oldest_trap() >= fixer.published;
    fixer.walk(
        &here as *const u64 as u64,
        maps,
        restorer,
        thread::tid(),
        own_safe,
    )
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
