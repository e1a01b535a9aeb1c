//! The functions a stripped libc has no symbol for — the implementations its string
//! functions' IFUNCs resolve to — in this process: their extent from the unwind
//! tables, and the branches other functions make into them.

use std::sync::Arc;

use multiprobe_symbols::{BranchInto, ProcessSymbols, SymbolCache};

extern "C" {
    fn memcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8;
    fn mempcpy(d: *mut u8, s: *const u8, n: usize) -> *mut u8;
    fn strlen(s: *const u8) -> usize;
}

/// A function pointer to an IFUNC symbol is the implementation the loader chose.
fn own() -> ProcessSymbols {
    ProcessSymbols::read(0, Arc::new(SymbolCache::default())).unwrap()
}

#[test]
fn a_function_without_a_symbol_has_its_unwind_entry_as_its_extent() {
    let p = own();
    let s = strlen as *const () as u64;
    // SAFETY: a NUL-terminated string.
    assert_eq!(unsafe { strlen(c"four".as_ptr().cast()) }, 4);
    let Some(f) = p.function_bounds(s) else {
        panic!("no extent for strlen's implementation at {s:#x}");
    };
    assert_eq!(f.start, s, "{f:?}");
    assert!(f.size > 16 && f.size < 0x10000, "{f:?}");
    // Inside it, the same function.
    assert_eq!(p.function_bounds(s + 8).map(|g| g.start), Some(s));
    if p.locate(s).is_none() {
        // Stripped (the usual distribution libc): named by file and address.
        assert!(f.name.starts_with("libc.so.6+0x"), "{f:?}");
    }
}

/// glibc's `mempcpy` implementations end with a jump to the second instruction of the
/// `memcpy` implementation of their family (after its `mov rax, rdi`): a jump written
/// over `memcpy`'s first five bytes would take that branch into its middle.
#[test]
fn a_branch_from_another_function_into_memcpy_is_found() {
    let p = own();
    let m = memcpy as *const () as u64;
    let mp = mempcpy as *const () as u64;
    let mut buf = [0u8; 8];
    // SAFETY: 4 bytes within the buffer, non-overlapping.
    unsafe {
        memcpy(buf.as_mut_ptr(), b"abcd".as_ptr(), 4);
        assert_eq!(
            mempcpy(buf.as_mut_ptr().add(4), b"ef".as_ptr(), 2),
            buf.as_mut_ptr().add(6)
        );
    }
    let mp_fn = p.function_bounds(mp).expect("mempcpy's extent");
    match p.branch_into(m + 1..m + 8) {
        BranchInto::At { from, to } => {
            assert!(
                (mp_fn.start..mp_fn.start + mp_fn.size).contains(&from),
                "the branch at {from:#x} into {to:#x} is not mempcpy's ({mp_fn:?})"
            );
            assert!(to > m && to < m + 8);
        }
        other => panic!("no branch into memcpy at {m:#x} found: {other:?}"),
    }
    // Nothing branches into the middle of an instruction, and the answer is the same
    // the second time (the file is decoded once).
    assert_eq!(p.branch_into(m + 1..m + 2), BranchInto::None);
    assert_eq!(p.branch_into(m + 1..m + 2), BranchInto::None);
    // Not code of a file: unknown.
    let anon = Box::new(0u64);
    let heap = &*anon as *const u64 as u64;
    assert_eq!(p.branch_into(heap..heap + 4), BranchInto::Unknown);
}
