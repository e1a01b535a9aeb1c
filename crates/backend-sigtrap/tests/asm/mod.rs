//! Test functions whose first instruction is known, written in assembly, with ELF
//! symbol types and sizes so the backend can check instruction boundaries.
#![allow(dead_code)]

#[macro_use]
#[path = "../asm_func/mod.rs"]
mod asm_func;
#[allow(unused_imports)] // each test file uses some
pub use asm_func::{addr, bytes};

core::arch::global_asm!(
    ".pushsection .text.mp_test_funcs,\"ax\",@progbits",
    func!("mp_t_endbr", "endbr64", "lea rax, [rdi + 1]", "ret"),
    func!(
        "mp_t_push",
        "push rbx",
        "mov rbx, rdi",
        "lea rax, [rbx + 2]",
        "pop rbx",
        "ret"
    ),
    func!("mp_t_helper", "mov rax, rdi", "ret"),
    func!("mp_t_call", "call mp_t_helper", "add rax, 3", "ret"),
    func!(
        "mp_t_jmp",
        "jmp 2f",
        "ud2",
        "2:",
        "lea rax, [rdi + 4]",
        "ret"
    ),
    func!(
        "mp_t_riprel",
        "mov rax, qword ptr [rip + mp_t_data]",
        "add rax, rdi",
        "ret"
    ),
    func!("mp_t_lea", "lea rax, [rip + mp_t_data]", "ret"),
    func!("mp_t_imul", "imul rax, rdi, 7", "ret"),
    func!("mp_t_load", "mov rax, qword ptr [rdi]", "ret"),
    func!("mp_t_div", "div rsi", "ret"),
    func!("mp_t_mid", "mov eax, 0x12345678", "ret"),
    func!("mp_t_int80", "int 0x80", "ret"),
    func!("mp_t_int3", "int3", "ret"),
    func!("mp_t_alt", "lea rax, [rdi + 100]", "ret"),
    // `mov rax, rdi` (3 bytes), then SLED_LEN times `lea rax, [rax + 1]` (4 bytes each),
    // then `ret`: many instruction boundaries, each a site.
    ".globl mp_t_sled",
    ".type mp_t_sled,@function",
    ".p2align 4",
    "mp_t_sled:",
    "mov rax, rdi",
    ".rept 96",
    "lea rax, [rax + 1]",
    ".endr",
    "ret",
    ".size mp_t_sled, . - mp_t_sled",
    ".popsection",
    ".pushsection .data.mp_test_data,\"aw\",@progbits",
    ".p2align 3",
    ".globl mp_t_data",
    "mp_t_data:",
    ".quad 5",
    ".popsection",
);

extern "C" {
    /// `endbr64` first; returns `x + 1`.
    pub fn mp_t_endbr(x: u64) -> u64;
    /// `push rbx` first; returns `x + 2`.
    pub fn mp_t_push(x: u64) -> u64;
    /// `call` first; returns `x + 3`.
    pub fn mp_t_call(x: u64) -> u64;
    /// `jmp` first; returns `x + 4`.
    pub fn mp_t_jmp(x: u64) -> u64;
    /// RIP-relative load first; returns `x + 5`.
    pub fn mp_t_riprel(x: u64) -> u64;
    /// RIP-relative `lea` first; returns `&mp_t_data`.
    pub fn mp_t_lea() -> u64;
    /// `imul rax, rdi, 7` first (relocated as is); returns `7 * x`.
    pub fn mp_t_imul(x: u64) -> u64;
    /// `mov rax, [rdi]` first: faults for a bad pointer.
    pub fn mp_t_load(p: u64) -> u64;
    /// `div rsi` first (relocated): raises SIGFPE when `divisor` is 0.
    pub fn mp_t_div(x: u64, divisor: u64) -> u64;
    /// A 5-byte `mov` first; returns `0x12345678`.
    pub fn mp_t_mid() -> u64;
    /// `int 0x80` first (never called).
    pub fn mp_t_int80();
    /// `int3` first (never called).
    pub fn mp_t_int3();
    /// Returns `x + 100` (a redirection target).
    pub fn mp_t_alt(x: u64) -> u64;
    /// Returns `x + SLED_LEN`, one `lea` at a time ([`sled_sites`]).
    pub fn mp_t_sled(x: u64) -> u64;
    /// The quadword (5) the RIP-relative functions read.
    pub static mp_t_data: u64;
}

/// The `lea`s of [`mp_t_sled`].
pub const SLED_LEN: usize = 96;

/// Every instruction start of [`mp_t_sled`] but its `ret`: its entry, then each `lea`.
pub fn sled_sites() -> Vec<u64> {
    let entry = mp_t_sled as *const () as u64;
    assert_eq!(bytes(entry, 7), [0x48, 0x89, 0xf8, 0x48, 0x8d, 0x40, 0x01]);
    std::iter::once(entry)
        .chain((0..SLED_LEN as u64).map(|k| entry + 3 + 4 * k))
        .collect()
}
