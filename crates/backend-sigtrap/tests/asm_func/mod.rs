//! What the assembly modules of the tests (`asm`, `regions`) share: the `func!` macro,
//! which gives a function written in `global_asm!` its ELF symbol type and size (the
//! backend checks instruction boundaries against them), and reading code.
#![allow(dead_code)]

/// `.globl`, `.type`, alignment, the label, the body's lines, `.size`.
macro_rules! func {
    ($name:literal, $($body:literal),+ $(,)?) => {
        concat!(
            ".globl ", $name, "\n",
            ".type ", $name, ",@function\n",
            ".p2align 4\n",
            $name, ":\n",
            $($body, "\n",)+
            ".size ", $name, ", . - ", $name, "\n",
        )
    };
}

/// Address of a function.
pub fn addr(f: *const ()) -> u64 {
    f as u64
}

/// `n` bytes of code at `a`.
pub fn bytes(a: u64, n: usize) -> Vec<u8> {
    // SAFETY: test functions' code is mapped readable.
    unsafe { std::slice::from_raw_parts(a as *const u8, n).to_vec() }
}
