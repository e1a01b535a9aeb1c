//! placeholder
mod elf;
mod error;
mod maps;
mod mem;
mod sys;
