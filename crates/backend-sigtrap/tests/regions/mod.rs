//! Functions for the trap-free tests, in assembly so their regions are known: ones the
//! region checks must refuse, ones they accept, one whose second instruction faults (a
//! thread parks in its signal handler there), and one that keeps values live in every
//! vector, opmask and x87 register across its probed instruction.
#![allow(dead_code)]

#[macro_use]
#[path = "../asm_func/mod.rs"]
mod asm_func;
#[allow(unused_imports)] // each test file uses some
pub use asm_func::{addr, bytes};

core::arch::global_asm!(
    ".pushsection .text.mp_region_funcs,\"ax\",@progbits",
    // Promotable: push rbx (1) + mov rbx, rdi (3) + lea rax, [rbx+1] (4) is the region.
    func!(
        "mp_r_plain",
        "push rbx",
        "mov rbx, rdi",
        "lea rax, [rbx + 1]",
        "pop rbx",
        "ret"
    ),
    // Refused: the loop jumps back to the second instruction.
    func!(
        "mp_r_loop",
        "xor eax, eax",
        "2:",
        "add rax, 1",
        "sub rdi, 1",
        "jnz 2b",
        "ret"
    ),
    // Refused: a jump table (jmp through a register).
    func!(
        "mp_r_table",
        "push rbx",
        "mov eax, edi",
        "and eax, 1",
        "lea rbx, [rip + 3f]",
        "movsxd rax, dword ptr [rbx + rax * 4]",
        "add rax, rbx",
        "jmp rax",
        "4:",
        "mov eax, 10",
        "pop rbx",
        "ret",
        "5:",
        "mov eax, 20",
        "pop rbx",
        "ret",
        ".p2align 2",
        "3:",
        ".long 4b - 3b, 5b - 3b",
    ),
    // Refused: a call inside the region.
    func!(
        "mp_r_call",
        "push rbx",
        "call rsi",
        "add rax, 1",
        "pop rbx",
        "ret"
    ),
    // Refused: another function, `mp_r_enters`, jumps to its second instruction (as
    // glibc's mempcpy jumps into memcpy); only the file's branches show it.
    func!(
        "mp_r_entered",
        "mov rax, rdi",
        ".Lmp_r_entered_second:",
        "add rax, 1",
        "ret"
    ),
    func!(
        "mp_r_enters",
        "lea rdi, [rdi + 10]",
        "mov rax, rdi",
        "jmp .Lmp_r_entered_second"
    ),
    // Refused: another function, `mp_r_inner`, starts at its second instruction (nested
    // symbols, as hand-written assembly has them): a call of it would land in the jump.
    ".globl mp_r_outer",
    ".type mp_r_outer,@function",
    ".p2align 4",
    "mp_r_outer:",
    "mov rax, rdi",
    ".globl mp_r_inner",
    ".type mp_r_inner,@function",
    "mp_r_inner:",
    "add rax, 1",
    "ret",
    ".size mp_r_inner, . - mp_r_inner",
    ".size mp_r_outer, . - mp_r_outer",
    // The second instruction loads through rdi: with a bad pointer it faults there.
    func!(
        "mp_r_load",
        "push rbx",
        "mov rax, qword ptr [rdi]",
        "add rax, 1",
        "pop rbx",
        "ret"
    ),
    // rdi: 32 zmm, 7 opmasks, 3 x87 doubles, MXCSR in; rsi: the same out. The probe
    // sits at mp_r_vec_probe, in the middle.
    ".globl mp_r_vec",
    ".type mp_r_vec,@function",
    ".p2align 4",
    "mp_r_vec:",
    "vmovdqu64 zmm0, [rdi + 0*64]",
    "vmovdqu64 zmm1, [rdi + 1*64]",
    "vmovdqu64 zmm2, [rdi + 2*64]",
    "vmovdqu64 zmm3, [rdi + 3*64]",
    "vmovdqu64 zmm4, [rdi + 4*64]",
    "vmovdqu64 zmm5, [rdi + 5*64]",
    "vmovdqu64 zmm6, [rdi + 6*64]",
    "vmovdqu64 zmm7, [rdi + 7*64]",
    "vmovdqu64 zmm8, [rdi + 8*64]",
    "vmovdqu64 zmm9, [rdi + 9*64]",
    "vmovdqu64 zmm10, [rdi + 10*64]",
    "vmovdqu64 zmm11, [rdi + 11*64]",
    "vmovdqu64 zmm12, [rdi + 12*64]",
    "vmovdqu64 zmm13, [rdi + 13*64]",
    "vmovdqu64 zmm14, [rdi + 14*64]",
    "vmovdqu64 zmm15, [rdi + 15*64]",
    "vmovdqu64 zmm16, [rdi + 16*64]",
    "vmovdqu64 zmm17, [rdi + 17*64]",
    "vmovdqu64 zmm18, [rdi + 18*64]",
    "vmovdqu64 zmm19, [rdi + 19*64]",
    "vmovdqu64 zmm20, [rdi + 20*64]",
    "vmovdqu64 zmm21, [rdi + 21*64]",
    "vmovdqu64 zmm22, [rdi + 22*64]",
    "vmovdqu64 zmm23, [rdi + 23*64]",
    "vmovdqu64 zmm24, [rdi + 24*64]",
    "vmovdqu64 zmm25, [rdi + 25*64]",
    "vmovdqu64 zmm26, [rdi + 26*64]",
    "vmovdqu64 zmm27, [rdi + 27*64]",
    "vmovdqu64 zmm28, [rdi + 28*64]",
    "vmovdqu64 zmm29, [rdi + 29*64]",
    "vmovdqu64 zmm30, [rdi + 30*64]",
    "vmovdqu64 zmm31, [rdi + 31*64]",
    "kmovq k1, [rdi + 2048]",
    "kmovq k2, [rdi + 2056]",
    "kmovq k3, [rdi + 2064]",
    "kmovq k4, [rdi + 2072]",
    "kmovq k5, [rdi + 2080]",
    "kmovq k6, [rdi + 2088]",
    "kmovq k7, [rdi + 2096]",
    "fld qword ptr [rdi + 2112]",
    "fld qword ptr [rdi + 2120]",
    "fld qword ptr [rdi + 2128]",
    "ldmxcsr [rdi + 2136]",
    ".globl mp_r_vec_probe",
    "mp_r_vec_probe:",
    "lea rax, [rax + 1]",
    "lea rcx, [rcx + 1]",
    "vmovdqu64 [rsi + 0*64], zmm0",
    "vmovdqu64 [rsi + 1*64], zmm1",
    "vmovdqu64 [rsi + 2*64], zmm2",
    "vmovdqu64 [rsi + 3*64], zmm3",
    "vmovdqu64 [rsi + 4*64], zmm4",
    "vmovdqu64 [rsi + 5*64], zmm5",
    "vmovdqu64 [rsi + 6*64], zmm6",
    "vmovdqu64 [rsi + 7*64], zmm7",
    "vmovdqu64 [rsi + 8*64], zmm8",
    "vmovdqu64 [rsi + 9*64], zmm9",
    "vmovdqu64 [rsi + 10*64], zmm10",
    "vmovdqu64 [rsi + 11*64], zmm11",
    "vmovdqu64 [rsi + 12*64], zmm12",
    "vmovdqu64 [rsi + 13*64], zmm13",
    "vmovdqu64 [rsi + 14*64], zmm14",
    "vmovdqu64 [rsi + 15*64], zmm15",
    "vmovdqu64 [rsi + 16*64], zmm16",
    "vmovdqu64 [rsi + 17*64], zmm17",
    "vmovdqu64 [rsi + 18*64], zmm18",
    "vmovdqu64 [rsi + 19*64], zmm19",
    "vmovdqu64 [rsi + 20*64], zmm20",
    "vmovdqu64 [rsi + 21*64], zmm21",
    "vmovdqu64 [rsi + 22*64], zmm22",
    "vmovdqu64 [rsi + 23*64], zmm23",
    "vmovdqu64 [rsi + 24*64], zmm24",
    "vmovdqu64 [rsi + 25*64], zmm25",
    "vmovdqu64 [rsi + 26*64], zmm26",
    "vmovdqu64 [rsi + 27*64], zmm27",
    "vmovdqu64 [rsi + 28*64], zmm28",
    "vmovdqu64 [rsi + 29*64], zmm29",
    "vmovdqu64 [rsi + 30*64], zmm30",
    "vmovdqu64 [rsi + 31*64], zmm31",
    "kmovq [rsi + 2048], k1",
    "kmovq [rsi + 2056], k2",
    "kmovq [rsi + 2064], k3",
    "kmovq [rsi + 2072], k4",
    "kmovq [rsi + 2080], k5",
    "kmovq [rsi + 2088], k6",
    "kmovq [rsi + 2096], k7",
    "stmxcsr [rsi + 2136]",
    "fnstsw [rsi + 2140]",
    "fstp qword ptr [rsi + 2128]",
    "fstp qword ptr [rsi + 2120]",
    "fstp qword ptr [rsi + 2112]",
    "vzeroupper",
    "ret",
    ".size mp_r_vec, . - mp_r_vec",
    ".popsection",
);

extern "C" {
    /// Returns `x + 1`; its region (push, mov, lea) can be replaced by a jump.
    pub fn mp_r_plain(x: u64) -> u64;
    /// Returns `n` (counting down to 0): the loop targets the second instruction.
    pub fn mp_r_loop(n: u64) -> u64;
    /// Returns 10 for even `x`, 20 for odd: a jump table.
    pub fn mp_r_table(x: u64) -> u64;
    /// Returns `f() + 1`, with a call inside the first 5 bytes.
    pub fn mp_r_call(x: u64, f: extern "C" fn() -> u64) -> u64;
    /// `x + 1`.
    pub fn mp_r_entered(x: u64) -> u64;
    /// `x + 11`, through the second instruction of `mp_r_entered`.
    pub fn mp_r_enters(x: u64) -> u64;
    /// `x + 1`.
    pub fn mp_r_outer(x: u64) -> u64;
    /// `rax + 1` (called from Rust: garbage in, garbage out; only that it returns).
    pub fn mp_r_inner() -> u64;
    /// Returns `*p + 1`; the load is the second instruction.
    pub fn mp_r_load(p: *const u64) -> u64;
    /// Vector state in from `input`, out to `output` (2144 bytes each).
    pub fn mp_r_vec(input: *const u8, output: *mut u8);
    /// The probed instruction inside `mp_r_vec`.
    pub fn mp_r_vec_probe();
}

/// Bytes of `mp_r_vec`'s input and output.
pub const VEC_LEN: usize = 2144;
