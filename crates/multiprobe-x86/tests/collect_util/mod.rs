//! Set-up shared by the collecting-trampoline tests: an RWX code page holding generated
//! test functions and the trampolines, an area mapped either right after it (reached
//! RIP-relative) or far away (reached through a base register), and the reader over it.
//! All unsafe code of those tests lives here.

use std::sync::atomic::AtomicU64;

use iced_x86::code_asm::*;
use multiprobe_x86::collect::{
    build_collect_trampoline, AreaLayout, AreaReader, BuiltCollect, CollectSpec, Collector,
    ThreadId,
};
use multiprobe_x86::{analyze_region, Code, Region, Unwind};

pub const CODE_LEN: usize = 1 << 16;
/// Where the test function goes in the code page.
pub const FUNC: usize = 0;
/// Where the trampoline goes.
pub const TRAMP: usize = 0x1000;
/// Data a RIP-relative instruction of the function reads.
pub const DATA: usize = 0x8000;
pub const DATA_VALUE: u64 = 0x1234_5678_9abc;

/// Six integer arguments, one result: the C ABI of the generated functions.
pub type Func = extern "C" fn(u64, u64, u64, u64, u64, u64) -> u64;

/// What the generated function computes (its region: `mov rax, [rip+DATA]`, then
/// `add rax, rdi` — two instructions, a RIP-relative load relocated).
pub fn expected(a: [u64; 6]) -> u64 {
    DATA_VALUE
        .wrapping_add(a[0])
        .wrapping_add(a[1].wrapping_mul(3))
        .wrapping_add(a[2] ^ a[3])
        .wrapping_add(a[4].wrapping_sub(a[5]))
}

/// A mapped area, its header written.
pub struct Area {
    ptr: *mut u8,
    pub layout: AreaLayout,
}

// SAFETY: a process-wide mapping, never unmapped, accessed only atomically.
unsafe impl Send for Area {}
// SAFETY: as above.
unsafe impl Sync for Area {}

impl Area {
    /// An area of `cells` cells and 8 counter slots: within a 32-bit displacement of
    /// `near` when given, else at least 64 GiB from `far`.
    pub fn new(cells: u32, near: Option<u64>, far: u64) -> Area {
        let layout = AreaLayout::new(cells, 8);
        let len = layout.size();
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let ptr = match near {
            Some(at) => (1..512u64)
                .flat_map(|k| [at + (k << 20), at.wrapping_sub(k << 20)])
                .map(|h| map(h as usize & !0xfff, len, rw))
                .find(|p| !p.is_null())
                .expect("no mapping near the code"),
            None => (1..16u64)
                .flat_map(|k| [far.wrapping_sub(k << 36), far.wrapping_add(k << 36)])
                .map(|h| map(h as usize & !0xfff, len, rw))
                .find(|p| !p.is_null())
                .expect("no mapping far from the code"),
        };
        assert!(!ptr.is_null());
        write_raw(ptr, 0, &layout.header(), len);
        Area { ptr, layout }
    }

    pub fn addr(&self) -> u64 {
        self.ptr as u64
    }

    /// The area as atomics.
    pub fn words(&self) -> &[AtomicU64] {
        // SAFETY: the area is page-aligned, mapped for the process's life, and every
        // access to it (generated code, the reader) is atomic.
        unsafe { std::slice::from_raw_parts(self.ptr.cast::<AtomicU64>(), self.layout.size() / 8) }
    }

    pub fn reader(&self) -> AreaReader<'_> {
        AreaReader::new(self.words(), &self.layout).unwrap()
    }
}

pub struct Setup {
    code: *mut u8,
    pub area: Area,
    pub built: BuiltCollect,
    /// The shadow stacks of `ret` collectors.
    pub shadow: u64,
}

// SAFETY: the mappings are process-wide and never unmapped while a `Setup` lives; the
// code is written before any thread runs it.
unsafe impl Send for Setup {}
// SAFETY: as above; the area is only accessed atomically (generated code, the reader).
unsafe impl Sync for Setup {}

fn map(hint: usize, len: usize, prot: i32) -> *mut u8 {
    let flags = libc::MAP_PRIVATE
        | libc::MAP_ANONYMOUS
        | if hint != 0 {
            libc::MAP_FIXED_NOREPLACE
        } else {
            0
        };
    // SAFETY: an anonymous mapping; with MAP_FIXED_NOREPLACE it never replaces one.
    let p = unsafe { libc::mmap(hint as *mut libc::c_void, len, prot, flags, -1, 0) };
    if p == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    p.cast()
}

/// The ways of reading the thread this machine has (`rdfsbase` only where enabled).
pub fn thread_ids() -> Vec<ThreadId> {
    let mut v = vec![ThreadId::FsZero];
    if fsgsbase() {
        v.push(ThreadId::RdFsBase);
    }
    v
}

/// Threads `0..threads` each call the probed function `n` times with `args_of(t, i)`,
/// checking every result (and yielding every `yield_every` calls); returns their fs
/// bases.
pub fn call_from_threads(
    s: &std::sync::Arc<Setup>,
    threads: u64,
    n: u64,
    args_of: fn(u64, u64) -> [u64; 6],
    yield_every: Option<u64>,
) -> Vec<u64> {
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let s = s.clone();
            std::thread::spawn(move || {
                let f = s.probed();
                for i in 0..n {
                    let a = args_of(t, i);
                    assert_eq!(f(a[0], a[1], a[2], a[3], a[4], a[5]), expected(a));
                    if yield_every.is_some_and(|k| i % k == 0) {
                        std::thread::yield_now();
                    }
                }
                fs_base()
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

/// Whether `rdfsbase` may be used here (Linux sets HWCAP2_FSGSBASE when it enables it).
pub fn fsgsbase() -> bool {
    const AT_HWCAP2: libc::c_ulong = 26;
    const HWCAP2_FSGSBASE: libc::c_ulong = 1 << 1;
    // SAFETY: getauxval has no preconditions.
    unsafe { libc::getauxval(AT_HWCAP2) & HWCAP2_FSGSBASE != 0 }
}

/// This thread's fs base, as the trampoline records it.
pub fn fs_base() -> u64 {
    let v: u64;
    // SAFETY: reads the TCB's self pointer, which glibc keeps at fs:[0].
    unsafe { core::arch::asm!("mov {}, fs:[0]", out(reg) v) };
    v
}

/// The generated test function, at `base`, reading its constant at `data`.
fn function(base: u64, data: u64) -> Vec<u8> {
    use iced_x86::{Code as C, Instruction, MemoryOperand, Register};
    let mut a = CodeAssembler::new(64).unwrap();
    a.add_instruction(
        Instruction::with2(
            C::Mov_r64_rm64,
            Register::RAX,
            MemoryOperand::with_base_displ(Register::RIP, data as i64),
        )
        .unwrap(),
    )
    .unwrap();
    a.add(rax, rdi).unwrap();
    a.imul_3(rsi, rsi, 3).unwrap();
    a.add(rax, rsi).unwrap();
    a.xor(rdx, rcx).unwrap();
    a.add(rax, rdx).unwrap();
    a.sub(r8, r9).unwrap();
    a.add(rax, r8).unwrap();
    a.ret().unwrap();
    a.assemble(base).unwrap()
}

/// Nanoseconds per TSC tick in 32.32 fixed point, measured over 20 ms.
pub fn tsc_ns_q32() -> u64 {
    static RATE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *RATE.get_or_init(|| {
        let t0 = std::time::Instant::now();
        // SAFETY: rdtsc has no preconditions.
        let c0 = unsafe { core::arch::x86_64::_rdtsc() };
        std::thread::sleep(std::time::Duration::from_millis(20));
        // SAFETY: as above.
        let c1 = unsafe { core::arch::x86_64::_rdtsc() };
        let ns = t0.elapsed().as_nanos() as f64;
        (ns / (c1 - c0) as f64 * (1u64 << 32) as f64) as u64
    })
}

/// A zeroed mapping for the shadow stacks, as the tracer makes one in a tracee.
fn shadow_stacks() -> u64 {
    let len = multiprobe_x86::collect::shadow::SHADOW_LEN;
    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE;
    let rw = libc::PROT_READ | libc::PROT_WRITE;
    // SAFETY: a fresh anonymous mapping, replacing nothing.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, rw, flags, -1, 0) };
    assert_ne!(p, libc::MAP_FAILED);
    p as u64
}

/// The word at `addr` of a mapping this set-up made (the shadow stacks).
#[allow(dead_code, reason = "used by collect_ret only")]
pub fn peek(addr: u64) -> u64 {
    // SAFETY: tests pass addresses inside the shadow mapping, which is never unmapped;
    // the generated code is not running on this thread meanwhile.
    unsafe { std::ptr::read_volatile(addr as *const u64) }
}

fn write_raw(to: *mut u8, off: usize, bytes: &[u8], len: usize) {
    assert!(off + bytes.len() <= len);
    // SAFETY: in bounds of a mapping of `len` bytes at `to` (checked above); nothing
    // executes or reads the bytes while set-up writes them.
    unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), to.add(off), bytes.len()) };
}

/// The region at the start of the function `f` placed at `base` (its bounds known, no
/// landing pads).
pub fn whole_function_region(base: u64, f: &[u8]) -> Region {
    let func = Code {
        addr: base,
        bytes: f,
    };
    analyze_region(base, func, Some(func.range()), Unwind::NoLandingPads).unwrap()
}

/// Function copy `k` at `FUNC + 0x100 k`, its trampoline at `TRAMP + 0x1000 k`.
#[allow(clippy::too_many_arguments)]
fn site(
    code: *mut u8,
    area: &Area,
    shadow: u64,
    k: usize,
    site_no: u32,
    collectors: &[Collector],
    thread_id: ThreadId,
) -> BuiltCollect {
    let base = code as u64;
    let at = base + (FUNC + 0x100 * k) as u64;
    let f = function(at, base + DATA as u64);
    write_raw(code, FUNC + 0x100 * k, &f, CODE_LEN);
    let region = whole_function_region(at, &f);
    let spec = CollectSpec {
        region: &region,
        site: site_no,
        collectors,
        area: area.addr(),
        layout: &area.layout,
        thread_id,
        shadow,
        tsc_ns_q32: tsc_ns_q32(),
    };
    let t = TRAMP + 0x1000 * k;
    let built = build_collect_trampoline(&spec, base + t as u64).unwrap();
    write_raw(code, t, &built.bytes, CODE_LEN);
    built
}

impl Setup {
    /// The function, its region and a trampoline for `collectors` in an area of `cells`
    /// cells and 8 counter slots, placed after the code page when `near`, else 64 GiB
    /// away.
    pub fn new(collectors: &[Collector], cells: u32, near: bool, thread_id: ThreadId) -> Setup {
        let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
        let code = map(0, CODE_LEN, rwx);
        assert!(!code.is_null());
        let base = code as u64;
        let area = Area::new(cells, near.then_some(base), base);
        write_raw(code, DATA, &DATA_VALUE.to_le_bytes(), CODE_LEN);
        let shadow = shadow_stacks();
        let built = site(code, &area, shadow, 0, 7, collectors, thread_id);
        let s = Setup {
            code,
            area,
            built,
            shadow,
        };
        for c in collectors {
            if c.action.at_return() {
                s.reader().set_live(c.slot, true);
            }
        }
        s
    }

    /// Another copy of the function (number `k`, 1..8) probed as site `site_no` with
    /// `collectors`, writing into this set-up's area; the probed copy's entry.
    pub fn add_site(&self, k: usize, site_no: u32, collectors: &[Collector]) -> Func {
        assert!((1..8).contains(&k));
        let built = site(
            self.code,
            &self.area,
            self.shadow,
            k,
            site_no,
            collectors,
            ThreadId::FsZero,
        );
        // SAFETY: as in `probed`.
        unsafe { std::mem::transmute::<u64, Func>(built.map.addr()) }
    }

    /// The trampoline, called as if it were the function (its region's first
    /// instruction is where a promoted site's jump would land).
    pub fn probed(&self) -> Func {
        // SAFETY: the trampoline runs the actions, then the function's region relocated
        // and jumps into the rest of the function: the same C ABI.
        unsafe { std::mem::transmute::<u64, Func>(self.built.map.addr()) }
    }

    pub fn reader(&self) -> AreaReader<'_> {
        self.area.reader()
    }
}

/// An address whose page is mapped without access, and the readable page before it:
/// `(start of the readable page, start of the inaccessible one)`.
pub fn guard_pages() -> (u64, u64) {
    let p = map(0, 2 * 4096, libc::PROT_READ | libc::PROT_WRITE);
    assert!(!p.is_null());
    // SAFETY: the second page of the mapping just made.
    let r = unsafe { libc::mprotect(p.add(4096).cast(), 4096, libc::PROT_NONE) };
    assert_eq!(r, 0);
    for i in 0..4096 {
        // SAFETY: the first, readable page of the mapping.
        unsafe { *p.add(i) = (i % 251) as u8 };
    }
    (p as u64, p as u64 + 4096)
}

static FAULT_MAP: std::sync::atomic::AtomicPtr<multiprobe_x86::collect::CollectMap> =
    std::sync::atomic::AtomicPtr::new(std::ptr::null_mut());
static FAULTS_SEEN: AtomicU64 = AtomicU64::new(0);

/// What a tracer does at a SIGSEGV with `rip` in the fault table: resume there, the
/// program never sees the signal. Anything else is not ours: abort loudly.
extern "C" fn on_segv(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let rip = uc.uc_mcontext.gregs[libc::REG_RIP as usize] as u64;
    let m = FAULT_MAP.load(std::sync::atomic::Ordering::SeqCst);
    // SAFETY: the test stores a map that outlives the calls (`serve_faults`).
    match (!m.is_null()).then(|| unsafe { (*m).fault(rip) }).flatten() {
        Some(f) => {
            FAULTS_SEEN.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            uc.uc_mcontext.gregs[libc::REG_RIP as usize] = f.resume as i64;
        }
        // SAFETY: abort is async-signal-safe.
        None => unsafe { libc::abort() },
    }
}

/// Serve faults in `map`'s actions from now on (the map must outlive the process's
/// calls into it: tests leak it). Returns a counter of faults served.
pub fn serve_faults(map: &'static multiprobe_x86::collect::CollectMap) -> &'static AtomicU64 {
    FAULT_MAP.store(
        map as *const _ as *mut _,
        std::sync::atomic::Ordering::SeqCst,
    );
    // SAFETY: a zeroed sigaction is a valid start; the handler has the SA_SIGINFO
    // signature and only reads the map and writes the ucontext.
    unsafe { multiprobe_test_targets::install_siginfo_handler(libc::SIGSEGV, on_segv, 0) };
    &FAULTS_SEEN
}
