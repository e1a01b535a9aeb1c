//! A tiny harness that runs real machine code in this test process with every
//! general-purpose register and the arithmetic flags set to chosen values, and captures
//! them all afterwards.
//!
//! One RWX mapping of [`PAGE_LEN`] bytes holds everything, at fixed offsets:
//! the entry code, the shared exit code, the harness data (input and output register
//! files), a scratch stack for the exit code, the code under test ([`CODE`]), slots
//! ([`SLOT`]), test data ([`DATA`]) and the test stack ([`STACK`]). Code under test
//! leaves through *exit stubs* written at chosen addresses (the next instruction, a
//! branch target): each records its number and jumps to the shared exit.
//!
//! Invariants: one test at a time uses the machine (`with_machine` holds a mutex);
//! the code under test must reach an exit stub, or trap into the SIGTRAP/SIGSEGV
//! handlers installed here, which apply a slot fix-up and redirect to an exit stub.
//! All unsafe code of the tests lives in this module.

use std::sync::atomic::{AtomicPtr, AtomicU64, Ordering};
use std::sync::{Mutex, Once};

use multiprobe_core::{Memory, MemoryError, Regs};
use multiprobe_x86::{Frame, Slot, Trampoline};

pub const PAGE_LEN: usize = 0x10000;
const EXIT_CODE: usize = 0x200;
const DATA_AREA: usize = 0x800;
const SCRATCH_TOP: usize = 0x2000;
/// Where tests put the instruction under test.
pub const CODE: usize = 0x2000;
/// Where tests build slots.
pub const SLOT: usize = 0x3000;
/// Test data (`DATA..STACK`).
pub const DATA: usize = 0x4000;
/// The test stack: `STACK..PAGE_LEN`; tests start with rsp near the top.
pub const STACK: usize = 0x8000;

// Harness data layout (offsets from DATA_AREA).
const HOST_RSP: usize = 0;
const ENTRY: usize = 8;
const EXIT_ID: usize = 16;
const IN_REGS: usize = 32; // 16 GPRs in hardware order, then rflags
const OUT_REGS: usize = 32 + 17 * 8;

/// Registers in hardware order, as the harness stores them.
fn to_array(r: &Regs) -> [u64; 17] {
    [
        r.rax, r.rcx, r.rdx, r.rbx, r.rsp, r.rbp, r.rsi, r.rdi, r.r8, r.r9, r.r10, r.r11, r.r12,
        r.r13, r.r14, r.r15, r.rflags,
    ]
}

fn from_array(a: [u64; 17]) -> Regs {
    Regs {
        rax: a[0],
        rcx: a[1],
        rdx: a[2],
        rbx: a[3],
        rsp: a[4],
        rbp: a[5],
        rsi: a[6],
        rdi: a[7],
        r8: a[8],
        r9: a[9],
        r10: a[10],
        r11: a[11],
        r12: a[12],
        r13: a[13],
        r14: a[14],
        r15: a[15],
        rflags: a[16],
        ..Regs::default()
    }
}

/// Code emitter with absolute addresses, for RIP-relative references.
struct Emit {
    base: u64,
    code: Vec<u8>,
}

impl Emit {
    fn here(&self) -> u64 {
        self.base + self.code.len() as u64
    }
    fn b(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }
    /// `op` with a `[rip+disp32]` operand referencing `target`; `tail` bytes follow the
    /// displacement (an immediate), so they count for the displacement's base.
    fn rip(&mut self, head: &[u8], target: u64, tail: &[u8]) {
        self.b(head);
        let end = self.here() + 4 + tail.len() as u64;
        let d = i32::try_from(target.wrapping_sub(end) as i64).unwrap();
        self.b(&d.to_le_bytes());
        self.b(tail);
    }
    /// `mov [rip->target], r64` (store) or `mov r64, [rip->target]` (load).
    fn mov_rip(&mut self, reg: u8, target: u64, load: bool) {
        let rex = 0x48 | if reg >= 8 { 4 } else { 0 };
        let op = if load { 0x8b } else { 0x89 };
        self.rip(&[rex, op, 0x05 | ((reg & 7) << 3)], target, &[]);
    }
}

/// The test machine. Obtain it with [`with_machine`].
pub struct Machine {
    base: *mut u8,
}

// SAFETY: the mapping is process-wide memory; access is serialised by MACHINE's mutex.
unsafe impl Send for Machine {}

static MACHINE: Mutex<Option<Machine>> = Mutex::new(None);
/// The slot whose fix-ups the signal handlers apply (null: none).
static SLOT_FOR_SIGNALS: AtomicPtr<Slot> = AtomicPtr::new(std::ptr::null_mut());
/// Where the SIGSEGV handler sends a faulting thread (an exit stub), and what it saw.
static FAULT_EXIT: AtomicU64 = AtomicU64::new(0);
/// Registers (hardware order, then rflags, rip, fault address) the SIGSEGV handler saw;
/// atomics because a handler must not take locks.
static FAULT: [AtomicU64; 19] = [const { AtomicU64::new(0) }; 19];
static FAULT_SEEN: AtomicU64 = AtomicU64::new(0);
/// All of rflags at the last exit (`run` returns the arithmetic flags only).
static LAST_RFLAGS: AtomicU64 = AtomicU64::new(0);
/// The trampoline whose exits by trap and faults the signal handlers serve (null: none).
static TRAMP_FOR_SIGNALS: AtomicPtr<Trampoline> = AtomicPtr::new(std::ptr::null_mut());

/// Run `f` with the (lazily created) machine, one test at a time.
pub fn with_machine<R>(f: impl FnOnce(&mut Machine) -> R) -> R {
    let mut g = MACHINE.lock().unwrap_or_else(|e| e.into_inner());
    let m = g.get_or_insert_with(Machine::new);
    f(m)
}

impl Machine {
    fn new() -> Machine {
        // SAFETY: anonymous private mapping, no address hint; checked for failure.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE_LEN,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED, "mmap of the test page failed");
        let m = Machine { base: p.cast() };
        m.write_harness();
        install_handlers();
        m
    }

    /// Absolute address of page offset `off`.
    pub fn addr(&self, off: usize) -> u64 {
        self.base as u64 + off as u64
    }

    /// Copy `bytes` into the page at `off`.
    pub fn write(&mut self, off: usize, bytes: &[u8]) {
        assert!(off + bytes.len() <= PAGE_LEN);
        // SAFETY: in bounds of our own mapping (checked above); no other thread uses it
        // (the machine mutex is held by the caller through `&mut self`).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.base.add(off), bytes.len()) }
    }

    /// Copy of the page bytes `range`.
    pub fn read(&self, range: std::ops::Range<usize>) -> Vec<u8> {
        assert!(range.end <= PAGE_LEN);
        // SAFETY: in bounds of our mapping, which lives as long as the process.
        unsafe { std::slice::from_raw_parts(self.base.add(range.start), range.len()).to_vec() }
    }

    fn write_harness(&self) {
        let d = |off| self.addr(DATA_AREA + off);
        let mut e = Emit {
            base: self.addr(0),
            code: Vec::new(),
        };
        e.b(&[0x53, 0x55, 0x41, 0x54, 0x41, 0x55, 0x41, 0x56, 0x41, 0x57]);
        e.mov_rip(4, d(HOST_RSP), false);
        e.rip(&[0xff, 0x35], d(IN_REGS + 16 * 8), &[]); // push qword [in rflags]
        e.b(&[0x9d]); // popfq
        for r in (0..16u8).filter(|&r| r != 4) {
            e.mov_rip(r, d(IN_REGS + 8 * usize::from(r)), true);
        }
        e.mov_rip(4, d(IN_REGS + 4 * 8), true);
        e.rip(&[0xff, 0x25], d(ENTRY), &[]); // jmp [entry]
        assert!(e.code.len() < EXIT_CODE);
        let entry = std::mem::take(&mut e.code);

        e.base = self.addr(EXIT_CODE);
        for r in 0..16u8 {
            e.mov_rip(r, d(OUT_REGS + 8 * usize::from(r)), false);
        }
        e.rip(&[0x48, 0x8d, 0x25], self.addr(SCRATCH_TOP), &[]); // lea rsp, [scratch]
        e.b(&[0x9c, 0x58]); // pushfq; pop rax
        e.mov_rip(0, d(OUT_REGS + 16 * 8), false);
        e.mov_rip(4, d(HOST_RSP), true);
        e.b(&[
            0x41, 0x5f, 0x41, 0x5e, 0x41, 0x5d, 0x41, 0x5c, 0x5d, 0x5b, 0xfc, 0xc3,
        ]);
        assert!(EXIT_CODE + e.code.len() < DATA_AREA);
        let exit = e.code;
        // SAFETY: in bounds of the mapping, which nothing executes yet.
        unsafe {
            std::ptr::copy_nonoverlapping(entry.as_ptr(), self.base, entry.len());
            std::ptr::copy_nonoverlapping(exit.as_ptr(), self.base.add(EXIT_CODE), exit.len());
        }
    }

    /// Write an exit stub with number `id` at page offset `off` (14 bytes).
    pub fn exit_stub(&mut self, off: usize, id: u8) {
        let mut e = Emit {
            base: self.addr(off),
            code: Vec::new(),
        };
        e.rip(&[0xc6, 0x05], self.addr(DATA_AREA + EXIT_ID), &[id]); // mov byte [exit], id
        let jmp_end = e.here() + 5;
        e.b(&[0xe9]);
        e.b(&(self.addr(EXIT_CODE).wrapping_sub(jmp_end) as i32).to_le_bytes());
        let code = e.code;
        self.write(off, &code);
    }

    /// Run the code at absolute address `entry` with `regs` (rip ignored; rflags
    /// restricted to the arithmetic flags and DF) until it reaches an exit stub. Returns
    /// the registers there and the stub's number.
    pub fn run(&mut self, entry: u64, regs: &Regs) -> (Regs, u8) {
        let mut input = to_array(regs);
        input[16] = (input[16] & 0xcd5) | 0x202;
        let mut data = Vec::new();
        for v in input {
            data.extend_from_slice(&v.to_le_bytes());
        }
        self.write(DATA_AREA + IN_REGS, &data);
        self.write(DATA_AREA + ENTRY, &entry.to_le_bytes());
        self.write(DATA_AREA + EXIT_ID, &[0xff]);
        // SAFETY: the harness entry at offset 0 follows the C ABI for a function with no
        // arguments: it saves and restores the callee-saved registers and rsp, clears DF
        // and returns. The code under test was written by the caller and ends in an exit
        // stub (module invariant).
        unsafe {
            let f: extern "C" fn() = std::mem::transmute(self.base);
            f();
        }
        let out = self.read(DATA_AREA + OUT_REGS..DATA_AREA + OUT_REGS + 17 * 8);
        let mut a = [0u64; 17];
        for (i, c) in out.chunks(8).enumerate() {
            a[i] = u64::from_le_bytes(c.try_into().unwrap());
        }
        let id = self.read(DATA_AREA + EXIT_ID..DATA_AREA + EXIT_ID + 1)[0];
        SLOT_FOR_SIGNALS.store(std::ptr::null_mut(), Ordering::SeqCst);
        TRAMP_FOR_SIGNALS.store(std::ptr::null_mut(), Ordering::SeqCst);
        FAULT_EXIT.store(0, Ordering::SeqCst);
        let mut r = from_array(a);
        LAST_RFLAGS.store(r.rflags, Ordering::SeqCst);
        r.rflags &= 0x8d5; // compare the arithmetic flags only
        (r, id)
    }

    /// Make the signal handlers apply `slot`'s fix-ups (None: treat faults as the
    /// original code's own), and send faulting threads to the absolute address
    /// `fault_exit` (an exit stub).
    pub fn arm_signals(&mut self, slot: Option<&Slot>, fault_exit: u64) {
        let p = slot.map_or(std::ptr::null_mut(), |s| s as *const Slot as *mut Slot);
        SLOT_FOR_SIGNALS.store(p, Ordering::SeqCst);
        FAULT_EXIT.store(fault_exit, Ordering::SeqCst);
        FAULT_SEEN.store(0, Ordering::SeqCst);
    }

    /// Make the signal handlers serve `t`: its exits by trap (registers loaded from the
    /// frame at `rsp`) and faults in its relocated copies (fixed up to the original
    /// code); faulting threads go to `fault_exit`. Cleared by the next `run`.
    pub fn arm_trampoline(&mut self, t: &Trampoline, fault_exit: u64) {
        TRAMP_FOR_SIGNALS.store(t as *const Trampoline as *mut Trampoline, Ordering::SeqCst);
        FAULT_EXIT.store(fault_exit, Ordering::SeqCst);
        FAULT_SEEN.store(0, Ordering::SeqCst);
    }

    /// Every bit of rflags at the last run's exit (before the exit code's `cld`).
    pub fn last_rflags(&self) -> u64 {
        LAST_RFLAGS.load(Ordering::SeqCst)
    }

    /// After a run that faulted: the registers (after any slot fix-up), the faulting
    /// `rip` and the fault's data address, as the SIGSEGV handler saw them.
    pub fn last_fault(&self) -> Option<(Regs, u64)> {
        if FAULT_SEEN.load(Ordering::SeqCst) == 0 {
            return None;
        }
        let v: Vec<u64> = FAULT.iter().map(|a| a.load(Ordering::SeqCst)).collect();
        let mut regs = from_array(v[..17].try_into().unwrap());
        regs.rip = v[17];
        Some((regs, v[18]))
    }
}

/// A [`Memory`] over the test page only: anything else is "unmapped".
pub struct PageMemory<'a>(pub &'a Machine);

impl PageMemory<'_> {
    fn check(&self, addr: u64, len: usize) -> Result<*mut u8, MemoryError> {
        let base = self.0.addr(0);
        if addr < base || addr - base + len as u64 > PAGE_LEN as u64 {
            return Err(MemoryError::Unmapped(addr));
        }
        // SAFETY: the offset is inside the mapping (checked above).
        Ok(unsafe { self.0.base.add((addr - base) as usize) })
    }
}

impl Memory for PageMemory<'_> {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        let p = self.check(addr, buf.len())?;
        // SAFETY: `check` bounded the range to the mapping.
        unsafe { std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), buf.len()) };
        Ok(())
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), MemoryError> {
        let p = self.check(addr, data.len())?;
        // SAFETY: `check` bounded the range to the mapping; the machine mutex is held.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }
}

const GREGS: [libc::c_int; 17] = [
    libc::REG_RAX,
    libc::REG_RCX,
    libc::REG_RDX,
    libc::REG_RBX,
    libc::REG_RSP,
    libc::REG_RBP,
    libc::REG_RSI,
    libc::REG_RDI,
    libc::REG_R8,
    libc::REG_R9,
    libc::REG_R10,
    libc::REG_R11,
    libc::REG_R12,
    libc::REG_R13,
    libc::REG_R14,
    libc::REG_R15,
    libc::REG_EFL,
];

/// Registers from a signal's ucontext (through a raw pointer to its `gregs`).
fn regs_of(g: &[i64; 23]) -> Regs {
    let mut a = [0u64; 17];
    for (i, &r) in GREGS.iter().enumerate() {
        a[i] = g[r as usize] as u64;
    }
    let mut regs = from_array(a);
    regs.rip = g[libc::REG_RIP as usize] as u64;
    regs
}

fn store_regs(g: &mut [i64; 23], regs: &Regs) {
    for (i, &r) in GREGS.iter().enumerate() {
        g[r as usize] = to_array(regs)[i] as i64;
    }
    g[libc::REG_RIP as usize] = regs.rip as i64;
}

extern "C" fn on_trap(_sig: libc::c_int, _info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid ucontext to an SA_SIGINFO handler.
    let uc = unsafe { &mut *ctx.cast::<libc::ucontext_t>() };
    let g = &mut uc.uc_mcontext.gregs;
    let mut regs = regs_of(g);
    let tramp = TRAMP_FOR_SIGNALS.load(Ordering::SeqCst);
    // SAFETY: a test stores a pointer to a trampoline map that outlives its run
    // (arm_trampoline; `run` clears it).
    if !tramp.is_null() && unsafe { (*tramp).is_trap_exit(regs.rip) } {
        // SAFETY: at an exit by trap, rsp points to the trampoline's frame, on the test
        // stack inside our page.
        let frame = unsafe { *(regs.rsp as *const Frame) };
        store_regs(g, &frame.regs);
        return;
    }
    let slot = SLOT_FOR_SIGNALS.load(Ordering::SeqCst);
    // SAFETY: a test stores a pointer to a slot that outlives its run (arm_signals;
    // `run` clears it).
    let fixed = !slot.is_null() && unsafe { (*slot).fixup_trap(regs.rip, &mut regs) };
    if !fixed {
        // Not a trap of the slot under test: make the failure loud.
        // SAFETY: abort is async-signal-safe.
        unsafe { libc::abort() };
    }
    store_regs(g, &regs);
}

extern "C" fn on_segv(_sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo and ucontext to an SA_SIGINFO handler.
    let (uc, info) = unsafe { (&mut *ctx.cast::<libc::ucontext_t>(), &*info) };
    let g = &mut uc.uc_mcontext.gregs;
    let mut regs = regs_of(g);
    let slot = SLOT_FOR_SIGNALS.load(Ordering::SeqCst);
    // SAFETY: as in on_trap.
    if !slot.is_null() && unsafe { (*slot).contains(regs.rip) } {
        // SAFETY: as above.
        assert!(unsafe { (*slot).fixup_ip(&mut regs) });
    }
    let tramp = TRAMP_FOR_SIGNALS.load(Ordering::SeqCst);
    // SAFETY: as in on_trap.
    if !tramp.is_null() && unsafe { (*tramp).contains(regs.rip) } {
        // SAFETY: as above.
        if unsafe { (*tramp).fixup(&mut regs) }.is_none() {
            // A fault outside the relocated copies is a bug of the trampoline.
            // SAFETY: abort is async-signal-safe.
            unsafe { libc::abort() };
        }
    }
    regs.rflags &= 0x8d5;
    for (a, v) in FAULT.iter().zip(to_array(&regs)) {
        a.store(v, Ordering::SeqCst);
    }
    FAULT[17].store(regs.rip, Ordering::SeqCst);
    // SAFETY: si_addr is valid for SIGSEGV.
    FAULT[18].store(unsafe { info.si_addr() } as u64, Ordering::SeqCst);
    FAULT_SEEN.store(1, Ordering::SeqCst);
    let exit = FAULT_EXIT.load(Ordering::SeqCst);
    if exit == 0 {
        // SAFETY: abort is async-signal-safe.
        unsafe { libc::abort() };
    }
    g[libc::REG_RIP as usize] = exit as i64;
}

fn install_handlers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let handlers: [(i32, multiprobe_test_targets::SigInfoHandler); 2] =
            [(libc::SIGTRAP, on_trap), (libc::SIGSEGV, on_segv)];
        for (sig, h) in handlers {
            // SAFETY: the handlers only read and write the interrupted context and
            // atomics, or abort.
            unsafe { multiprobe_test_targets::install_siginfo_handler(sig, h, libc::SA_NODEFER) };
        }
    });
}

// Inputs and observations shared by the execution tests.

/// Deterministic pseudo-random numbers (xorshift64*), so failures reproduce.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Mostly random values, with the edge cases arithmetic gets wrong.
    pub fn value(&mut self) -> u64 {
        const EDGES: [u64; 8] = [
            0,
            1,
            u64::MAX,
            1 << 63,
            (1 << 63) - 1,
            0xffff_ffff,
            0x8000_0000,
            0x7fff_ffff,
        ];
        let r = self.next();
        if r.is_multiple_of(4) {
            EDGES[(r >> 8) as usize % EDGES.len()]
        } else {
            self.next()
        }
    }
}

/// Random registers with `rsp` on the test stack and random arithmetic flags.
pub fn random_regs(m: &Machine, rng: &mut Rng) -> Regs {
    let mut r = Regs::default();
    for g in multiprobe_core::Gpr::ALL {
        *r.gpr_mut(g) = rng.value();
    }
    r.rsp = m.addr(0xf000);
    r.rflags = rng.next() & 0x8d5;
    r
}

pub fn fill_memory(m: &mut Machine) {
    let pattern: Vec<u8> = (DATA..PAGE_LEN).map(|i| (i * 7 + 3) as u8).collect();
    m.write(DATA, &pattern);
}

/// Memory that must match after a run: the data area and the stack from 128 bytes
/// below the final rsp (a signal frame may land lower: that is the kernel's, not ours).
pub fn observed_memory(m: &Machine, rsp: u64) -> Vec<u8> {
    let lo = (rsp.saturating_sub(128).saturating_sub(m.addr(0)) as usize).clamp(STACK, PAGE_LEN);
    let mut v = m.read(DATA..STACK);
    v.extend(m.read(lo..PAGE_LEN));
    v
}
