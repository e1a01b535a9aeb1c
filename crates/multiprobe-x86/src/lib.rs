//! x86-64 instruction knowledge shared by multiprobe's real backends: is this address
//! an instruction boundary, can the instruction there be probed, and how is it
//! executed once the breakpoint displaced it — by emulation, or out of line from a
//! slot; and, for trap-free probes, whether the instructions under a `jmp rel32` may be
//! replaced (the region checks) and the trampoline the jump leads to. A pure library:
//! no signals, no ptrace, no `/proc`.
//!
//! # The pieces every backend shares
//!
//! * [`prepare`] behind [`CodeSource`]: one pipeline from an address to its [`Plan`]
//!   and its [`Region`] (or the [`RegionRefusal`] that keeps it an `int3` site).
//! * [`continue_hit`]: the one decision of how a hit continues (emulation, a slot, a
//!   trampoline copy, in place), given what the site has ([`Ways`]) and what emulating
//!   costs the backend ([`Emulate`]).
//! * [`analyze_region`], [`build_trampoline`] and [`build_common`]: the optprobes-style
//!   checks, and the trampoline (red-zone skip, frame of [`multiprobe_core::Regs`],
//!   vector state, the backend's [`Entry`] points, the relocated region, the post stub,
//!   the exits: see the `frame` and `trampoline` module docs), with its address map
//!   ([`Trampoline::locate`], [`Trampoline::fixup`], [`Trampoline::resume_target`]).
//! * [`collect`]: collecting trampolines for probes in another process with no stop
//!   per hit — generated `count`/`args`/`regs`/`mem` actions writing counters and
//!   records into a shared area ([`collect::build_collect_trampoline`]), the map with
//!   its fault table ([`collect::CollectMap`]), and the reader of the area
//!   ([`collect::AreaReader`]); the module docs state the ring protocol, the memory
//!   orderings and what the reader assumes about a producer that died mid-record. The
//!   relocation of the region and the copy map are shared with [`build_trampoline`].
//!
//! # Use from a backend
//!
//! ```
//! use multiprobe_x86::{analyze, Code, SlotKind};
//! # use multiprobe_core::{Memory, MemoryError, Regs};
//! # struct Stack(std::cell::RefCell<[u8; 64]>);
//! # impl Memory for Stack {
//! #     fn read(&self, a: u64, b: &mut [u8]) -> Result<(), MemoryError> {
//! #         let s = self.0.borrow(); b.copy_from_slice(&s[a as usize..a as usize + b.len()]); Ok(()) }
//! #     fn write(&self, a: u64, d: &[u8]) -> Result<(), MemoryError> {
//! #         self.0.borrow_mut()[a as usize..a as usize + d.len()].copy_from_slice(d); Ok(()) }
//! # }
//! // At prepare time (thread context): the function `f` at 0x1000 starts with
//! // `push rbp; mov rbp, rsp`.
//! let func = [0x55, 0x48, 0x89, 0xe5, 0xc3];
//! let plan = analyze(0x1000, Code { addr: 0x1000, bytes: &func }, Some(0x1000..0x1005))?;
//! let jump_back = plan.build_slot(SlotKind::JumpBack, 0x7000_0000)?; // copy its bytes()
//! let trap_after = plan.build_slot(SlotKind::TrapAfter, 0x7000_0040)?;
//!
//! // At hit time (maybe in a signal handler): emulate when possible, else run a slot.
//! # let mem = Stack(std::cell::RefCell::new([0; 64]));
//! let mut regs = Regs { rip: 0x1000, rsp: 32, rbp: 7, ..Regs::default() };
//! if plan.emulate(&mut regs, &mem).is_ok() {
//!     assert_eq!((regs.rip, regs.rsp), (0x1001, 24)); // pushed, moved on
//! } else {
//!     regs.rip = jump_back.addr();
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The protocol:
//! 1. `prepare`: read the original bytes (from the enclosing function's start, when
//!    its bounds are known) and call [`analyze`]. Refusals and bad input come back as
//!    distinct [`AnalyzeError`]s ([`AnalyzeError::into_core`] converts). Place the slots
//!    within [`Plan::slot_window`] (if any) and build both variants with
//!    [`Plan::build_slot`]; a slot is at most [`MAX_SLOT_LEN`] bytes.
//! 2. A hit without post-handlers: if [`Plan::is_emulated`], [`Plan::emulate`]; if that
//!    fails (a memory access failed; nothing was changed), or the plan is not
//!    emulated, resume at the [`SlotKind::JumpBack`] slot.
//! 3. A hit with post-handlers: emulate as above and run the posts at once (no second
//!    trap); otherwise resume at the [`SlotKind::TrapAfter`] slot, and when its `int3`
//!    traps call [`Slot::fixup_trap`] and run the posts. Plans without a trap-after
//!    variant ([`Plan::has_trap_after_slot`]: `ret`, `jmp [mem]`, `call [mem]`) are
//!    emulated; if their emulation fails, the jump-back slot raises the real fault.
//! 4. A fault (or any stop) with `rip` inside a slot: [`Slot::fixup_ip`] gives the
//!    equivalent state in the original code (`rip` = the probed address for a fault
//!    in the relocated instruction).
//!
//! Emulation touches memory only where the instruction itself does, and only through
//! the backend's [`multiprobe_core::Memory`]: `push`/`call` write the 8 bytes below
//! `rsp`; `pop`/`ret` read `[rsp]`; `jmp [mem]`/`call [mem]` read their target. For
//! the emulation to be transparent, `Memory` must fail where the CPU would fault
//! (`process_vm_readv`/`writev` and guarded direct access do; writes through
//! `/proc/pid/mem` or `PTRACE_POKEDATA` ignore page protections, so a backend using them
//! should check the mapping first). General loads and stores (`mov [mem], reg`) are
//! deliberately relocated, not emulated: the CPU then enforces the protections.
//!
//! # What is emulated, relocated, refused
//!
//! Emulated ([`EmulatedKind`]): `nop`/multi-byte `nop`/`endbr64`/`pause`; `push` reg
//! and imm; `pop` reg; `jmp` rel/reg/mem; `jcc`, `loop*`, `jrcxz`; `call` rel/reg/mem
//! (always pushing the original return address); `ret [imm16]`; `mov` reg,reg and
//! reg,imm; `lea`; `add`/`sub`/`and`/`or`/`xor`/`cmp`/`test` on 32/64-bit registers and
//! immediates, with exact RFLAGS.
//!
//! Relocated ([`RelocatedKind`]): everything else that does not depend on its own
//! address, RIP-relative memory operands re-targeted for the slot, and `syscall`
//! (whose `rcx` is set to the original return address after it). The emulated
//! instructions have slots too, as the fallback.
//!
//! Refused ([`Refusal`]): `int3` already present; `int n`/`int1`; `iret`/`sysret`/
//! `sysexit`; privileged and I/O-privileged instructions; far transfers; `mov ss`;
//! `xbegin`; `sysenter`; `call rsp` and `call [rsp]` without a displacement byte (the
//! slot's push would move their operand), EIP-relative operands.
//!
//! Known limits: emulated and relocated `call`/`ret` do not update a CET shadow stack
//! (Linux user shadow stacks are opt-in; a backend should refuse to run when one is
//! enabled). An x87 instruction run from a slot records the slot's address as the FPU
//! instruction pointer (visible only through `fnstenv`/`fxsave`).
//!
//! # Coverage report
//!
//! `cargo run --release -p multiprobe-x86 --example coverage` analyzes every function
//! entry and every instruction boundary of `libc.so.6`, `libstdc++.so.6` and the
//! workspace's release binaries (or of the ELF files given as arguments) and prints the
//! share emulated / relocated / refused by reason.

#![warn(missing_docs)]

mod analyze;
pub mod collect;
mod continuation;
mod cpu;
mod emulate;
mod error;
mod flags;
mod frame;
mod plan;
mod prepare;
mod region;
mod relocate;
mod ret_trampoline;
mod slot;
mod trampoline;

pub use analyze::{analyze, Code};
pub use continuation::{continue_hit, Continue, Emulate, Via, Ways};
pub use cpu::CpuState;
pub use error::{AnalyzeError, EmulateError, Refusal, SlotError};
pub use frame::{
    Entry, Frame, EVENT_POST, EVENT_PRE, EVENT_RET, EXIT_NEXT, EXIT_POST, EXIT_REGION, EXIT_RESUME,
    EXIT_RESUME_STACK, EXIT_TRAP, FRAME_TO_RSP, RED_ZONE,
};
pub use plan::{Class, EmulatedKind, Plan, RelocatedKind, MAX_INSN_LEN};
pub use prepare::{prepare, CodeSource, Function, Mapping, OutsideBranch, Prepared, USER_END};
pub use region::{
    analyze_region, Mnem, Region, RegionRefusal, Unwind, JMP_LEN, MAX_REGION_INSNS, MAX_REGION_LEN,
};
pub use ret_trampoline::{build_return_trampoline, ReturnTrampoline, RETURN_TRAMPOLINE_LEN};
pub use slot::{slot_reach, Slot, SlotKind, INT3, MAX_SLOT_LEN};
pub use trampoline::{
    build_common, build_trampoline, Built, CommonStub, Location, StateSave, Trampoline,
    TrampolineError, TrampolineSpec, COMMON_LEN, TRAMPOLINE_LEN,
};

/// This crate's README example, run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
