//! Collecting trampolines: probes whose actions (count, copy arguments, registers or
//! memory, with a timestamp and the thread) run as generated code in the probed thread
//! itself, writing into a shared *area* that a reader (the tracer, in another process)
//! drains while the program runs. No stop, no call, no vector register per hit.
//!
//! The pieces: [`AreaLayout`] and the record format (`layout`), the code generator
//! [`build_collect_trampoline`] (`codegen`), the map of a built trampoline
//! [`CollectMap`] with its fault table (`map`), and the reader [`AreaReader`]
//! (`reader`). A pure library: the caller maps the area, places the code and handles
//! the faults.
//!
//! # The generated code (per site)
//!
//! ```text
//! lea rsp,[rsp-128]            ; the red zone belongs to the probed code
//! save the flags (pushfq, or lahf for `count` and `args`); push the GPRs the actions
//! clobber
//! rdx = the thread's stripe of the counters (a hash of the fs base picks one)
//! per collector: lock inc [rdx + hits(slot)]
//! per collector, in registration order, record actions: reserve a cell (CAS on head, checked against tail + cells);
//!     full: lock inc [dropped(slot)] and go to the next collector
//!     write tsc, thread, site, slot, len, flags = 0, ptr (`mem:`), the data;
//!     commit: store seq last
//! pop; restore the flags; lea rsp,[rsp+128]
//! the region's instructions, relocated (shared with the in-process trampoline)
//! jmp <region end>
//! fault resumes (one per `mem:` collector), literals
//! ```
//!
//! # The ring protocol
//!
//! `head` counts reservations, `tail` counts cells the reader has consumed; reservation
//! number `p` owns cell `p mod cells`. A producer may take `p` only while
//! `p < tail + cells` (the reader is done with `p - cells`): it reads `head`, then `tail`,
//! and claims `p` with `lock cmpxchg head: p -> p + 1`, retrying when another producer
//! won. It never waits for the reader: a full ring is counted in the collector's
//! `dropped` and the record skipped. It then owns the cell exclusively until it stores
//! `seq = p + 1`, the last store of the record. The reader consumes in order: cell
//! `tail` is complete exactly when its `seq == tail + 1` (a cell from the previous lap
//! holds `tail + 1 - cells`, a fresh one 0); it copies the record out, then stores
//! `tail + 1`, handing the cell back.
//!
//! # Memory ordering (x86-TSO)
//!
//! Producer: x86 keeps stores in program order, so a reader that sees `seq` sees every
//! field stored before it; `lock cmpxchg` is a full barrier, so the cell's stores
//! cannot move before the claim. A stale `tail` only makes a producer think the ring
//! fuller than it is (a drop that a later hit would not have had), never overwrite an
//! unread cell. Reader: `seq` is loaded with `Acquire` (a plain x86 load: loads are not
//! reordered with later loads), the record's fields after it; `tail` is stored with
//! `Release` after the copy (x86 does not move a store before earlier loads), so no
//! producer rewrites a cell the reader is still copying.
//!
//! # What the reader may assume about a producer that died mid-record
//!
//! Nothing beyond the protocol: a thread killed, or longjmp'd out of a signal handler,
//! between its claim and its commit leaves a cell whose `seq` never becomes `p + 1`.
//! [`AreaReader::drain`] stops in front of it (it cannot tell a slow producer from a
//! dead one) and the records claimed after it wait. When the caller knows no producer
//! can be between a claim and a commit (the process is dead, or every thread is stopped
//! outside the record code: [`CollectMap::locate`] says [`crate::Location::Inside`]
//! for a thread in the action code), [`AreaReader::drain_stopped`] skips such cells and
//! counts them in [`AreaReader::abandoned`]. The reader trusts no field: lengths are
//! clamped to [`RECORD_DATA_MAX`], indices masked; a corrupt area gives wrong records,
//! never a panic or an out-of-bounds access.
//!
//! # Faults in actions
//!
//! A `mem:` action copies from the program's pointer with `rep movsb`; that instruction
//! is in the map's fault table ([`CollectMap::fault`]). A thread that faults there (a
//! SIGSEGV or SIGBUS with `rip` at it) must not get the signal: the tracer sets `rip` to
//! the entry's `resume` and lets it run. The resume code stores `len` = the bytes copied
//! before the fault and the faulted flag, commits the cell, counts `faulted` itself
//! (`lock inc`: the tracer counts nothing) and goes on with the next collector, so the
//! relocated region still runs and every register is restored.
//!
//! # Returns (`ret`)
//!
//! A site with [`Action::Ret`] collectors is a function entry. After its other
//! collectors, the entry code finds the thread's block of the shadow stacks (a hash of
//! the fs base, claimed once), drops frames of calls whose slot it overwrote, pushes a
//! frame (the return address, its slot, `rdtsc`, the arguments) and writes the address
//! of the site's *return code* into the return slot. The return code, at the end of
//! the same trampoline, is where the function's `ret` lands: it saves what it uses as
//! the entry does, takes the innermost frame if its slot is `rsp - 8`, writes each live
//! collector's record, puts the original return
//! address into the popped slot (`[rsp - 8]`, inside the red zone, which signal
//! delivery never writes) and leaves by `jmp [rsp - 8]` with every register restored.
//! A collector whose live word is 0 (it left the site) writes nothing: calls in flight
//! return unobserved. What the code cannot decide alone — a frame below the entry's
//! slot (a call a `longjmp` skipped, or one in flight on another stack), a return whose
//! frame is not the innermost — it asks the tracer by an `int3` ([`CollectMap::ask`],
//! [`Ask`]; see `shadow`). The return code is inside the trampoline ([`CollectMap::locate`]
//! says `Inside`), so a thread stopped there is let run out of it like the action code;
//! it leaves at the original return address. See `shadow` for the stacks' layout and
//! their invariants. Unwinders that read return addresses (C++ exceptions,
//! `backtrace`) see the return code's address: the tracer puts the originals back
//! around them ([`shadow::in_flight`] lists what to restore).
//!
//! # Known limits
//!
//! * `rdtsc` faults (SIGSEGV) in a process that disabled it with
//!   `prctl(PR_SET_TSC, PR_TSC_SIGSEGV)`, and `rdfsbase` raises #UD (SIGILL) where the
//!   kernel did not enable FSGSBASE: neither is in the fault table, so the tracer must
//!   check both before choosing this path ([`ThreadId`]).
//! * A hit from a signal handler that interrupted the same thread inside the action
//!   code claims its own cell and commits it first; the interrupted record commits
//!   when the handler returns. Records are in claim order, not commit order.
//! * The records' `tsc` is the raw counter of the CPU the thread ran on; converting it
//!   (and mapping the fs base to a tid) is the reader's caller's business.

mod codegen;
mod layout;
mod map;
mod reader;
mod retgen;
pub mod shadow;

pub use codegen::build_collect_trampoline;
pub use layout::{
    AreaLayout, AREA_MAGIC, AREA_VERSION, CELL_LEN, COUNTER_STRIPES, FLAG_FAULTED,
    MAX_COUNTER_SLOTS, MAX_RING_CELLS, RECORD_DATA_MAX, RECORD_HEADER_LEN,
};
pub use map::{ActionFault, Ask, BuiltCollect, CollectMap, COLLECT_LEN, MAX_COLLECTORS};
pub use reader::{AreaError, AreaReader, Counters, LatencyHist, RecordRef, HIST_BUCKETS};

use crate::region::Region;

/// What one collecting handler does at a hit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Its hits counter only.
    Count,
    /// A record of the first N (1..=6) SysV integer arguments, `rdi rsi rdx rcx r8 r9`
    /// as the program had them at the probed address, 8 bytes each.
    Args(u8),
    /// A record of `rax rbx rcx rdx rsi rdi rbp rsp r8..r15 rip rflags` (18 × 8
    /// bytes), as the program had them at the probed address (`rip` = that address).
    Regs,
    /// A record of `len` bytes at the pointer in argument `arg` (1..=6), carrying the
    /// pointer too ([`RecordRef::ptr`]); `1 <= len <= RECORD_DATA_MAX`.
    Mem {
        /// Which argument holds the pointer (1 = `rdi`).
        arg: u8,
        /// How many bytes to copy.
        len: u16,
    },
    /// At the function's entry (the site must be one), the call's return address is
    /// swapped for the site's return code and kept on the thread's shadow stack
    /// (`shadow`); when the call returns, a record of [`RET_LEN`] bytes: the entry's
    /// `rdtsc`, `rax`, `rdx` at the return, and the six integer arguments of the entry
    /// (the record's own `tsc` is the return's). Every return seen is a record or a
    /// drop; calls whose return cannot be seen count in `returns_lost`.
    Ret,
    /// At the entry as [`Action::Ret`]; at the return, no record: the time from the
    /// entry, in nanoseconds, counted in the slot's histogram in the area
    /// ([`AreaReader::histogram`]: power-of-two buckets, sum, min, max), so no call is
    /// ever dropped from it.
    Latency,
}

impl Action {
    /// Whether it runs at the function's return ([`Action::Ret`], [`Action::Latency`]).
    pub fn at_return(self) -> bool {
        matches!(self, Action::Ret | Action::Latency)
    }
}

/// Bytes of an [`Action::Ret`] record: entry tsc, rax, rdx, six arguments.
pub const RET_LEN: usize = 9 * 8;

/// The registers of [`Action::Regs`], in record order.
pub const REGS_ORDER: [multiprobe_core::Gpr; 16] = {
    use multiprobe_core::Gpr::*;
    [
        Rax, Rbx, Rcx, Rdx, Rsi, Rdi, Rbp, Rsp, R8, R9, R10, R11, R12, R13, R14, R15,
    ]
};

/// Bytes of an [`Action::Regs`] record: 16 GPRs, rip, rflags.
pub const REGS_LEN: usize = 18 * 8;

/// One collecting handler of a site.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Collector {
    /// The handler's index in the area's counter table (also written into its records).
    pub slot: u32,
    /// What it does.
    pub action: Action,
}

/// How the generated code reads the thread's identity (its fs base).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadId {
    /// `rdfsbase`: needs the CPU's FSGSBASE and the kernel's permission (Linux 5.9+
    /// sets `HWCAP2_FSGSBASE` in the auxiliary vector); otherwise it raises #UD.
    RdFsBase,
    /// `mov rax, fs:[0]`: the TCB's self pointer, which glibc and musl keep equal to the
    /// fs base. Wrong for a thread whose fs does not point at such a TCB.
    FsZero,
}

/// What a collecting trampoline is built from.
#[derive(Clone, Copy, Debug)]
pub struct CollectSpec<'a> {
    /// The region the jump replaces (from [`crate::analyze_region`]).
    pub region: &'a Region,
    /// The site index written into records.
    pub site: u32,
    /// The site's collectors, in registration order (the contract's rule 2).
    pub collectors: &'a [Collector],
    /// The area's address in the process that runs the code.
    pub area: u64,
    /// The area's layout.
    pub layout: &'a AreaLayout,
    /// How to read the thread's identity.
    pub thread_id: ThreadId,
    /// The shadow stacks' address in the process that runs the code
    /// ([`shadow::SHADOW_LEN`] bytes, zeroed); needed only with an [`Action::Ret`]
    /// collector, 0 otherwise.
    pub shadow: u64,
    /// Nanoseconds per TSC tick, fixed point with 32 fraction bits (the reader's
    /// calibration): how [`Action::Latency`] turns ticks into its buckets' unit. 0
    /// without such a collector.
    pub tsc_ns_q32: u64,
}
