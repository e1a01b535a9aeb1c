//! Bad input is refused with a clear error and nothing armed; removing every probe
//! leaves every probed byte as it was.

mod asm;

use asm::*;
use multiprobe_core::Error;

#[inline(never)]
fn rust_target(x: u64) -> u64 {
    std::hint::black_box(x).rotate_left(3)
}

static DATA: [u8; 64] = [0; 64];

fn refused(addr: u64) -> Error {
    let reg = multiprobe_backend_sigtrap::registry();
    let e = reg.register(addr, |_h| {}).unwrap_err();
    assert!(reg.is_empty(), "nothing registered after {e}");
    e
}

#[test]
fn bad_addresses_are_refused_and_nothing_is_armed() {
    assert!(matches!(refused(0x1000), Error::Unmapped { addr: 0x1000 }));
    let d = DATA.as_ptr() as u64;
    assert!(matches!(refused(d), Error::NotExecutable { .. }));
    assert!(matches!(refused(1 << 60), Error::InvalidAddress { .. }));

    let mid = mp_t_mid as *const () as u64;
    let before = bytes(mid, 8);
    match refused(mid + 1) {
        Error::NotInstructionBoundary { addr, context } => {
            assert_eq!(addr, mid + 1);
            assert!(context.contains(&format!("{mid:#x}")), "{context}");
        }
        e => panic!("{e}"),
    }
    assert_eq!(bytes(mid, 8), before);

    let int80 = mp_t_int80 as *const () as u64;
    assert!(matches!(
        refused(int80),
        Error::UnsupportedInstruction { .. }
    ));
    assert_eq!(bytes(int80, 2), [0xcd, 0x80]);

    let int3 = mp_t_int3 as *const () as u64;
    assert!(matches!(refused(int3), Error::AlreadyBreakpoint { .. }));

    // The backend's own code and the core's.
    let own = multiprobe_backend_sigtrap::registry as *const () as u64;
    assert!(
        matches!(refused(own), Error::Reserved { .. }),
        "{}",
        refused(own)
    );
    let core = multiprobe_core::Registry::<multiprobe_backend_sigtrap::SigtrapBackend>::dispatcher
        as *const () as u64;
    assert!(matches!(refused(core), Error::Reserved { .. }));
}

#[test]
fn a_second_registry_cannot_arm_an_address_the_first_armed() {
    let r1 = multiprobe_backend_sigtrap::registry();
    let r2 = multiprobe_backend_sigtrap::registry();
    let a = mp_t_alt as *const () as u64;
    let g = r1.register(a, |_h| {}).unwrap();
    let e = r2.register(a, |_h| {}).unwrap_err();
    assert!(matches!(e, Error::AlreadyBreakpoint { .. }), "{e}");
    // SAFETY: integer in, integer out.
    assert_eq!(unsafe { mp_t_alt(1) }, 101);
    assert_eq!(g.unregister().unwrap().hits, 1);
}

#[test]
fn removing_all_probes_leaves_every_probed_byte_as_before() {
    let reg = multiprobe_backend_sigtrap::registry();
    let rust = rust_target as *const () as u64;
    // A few instruction boundaries inside a Rust function too, not only its entry: take
    // the ones the backend accepts among the first bytes.
    let mut sites = vec![rust, mp_t_lea as *const () as u64];
    let candidates: Vec<u64> = (1..12).map(|k| rust + k).collect();
    let snapshot: Vec<(u64, Vec<u8>)> = [rust, sites[1]]
        .iter()
        .map(|&a| (a, bytes(a, 32)))
        .collect();
    let mut guards = Vec::new();
    for &a in &sites {
        for _ in 0..3 {
            guards.push(reg.register(a, |_h| {}).unwrap());
        }
    }
    for a in candidates {
        match reg.register(a, |_h| {}) {
            Ok(g) => {
                sites.push(a);
                guards.push(g);
            }
            Err(Error::NotInstructionBoundary { .. }) => {}
            Err(e) => panic!("{a:#x}: {e}"),
        }
    }
    assert!(sites.len() > 2, "some inner instruction was probed");
    for &a in &sites {
        // A jump where the site was promoted, an int3 where it stays a trap site.
        let want = match reg.backend().mode_at(a) {
            Some(multiprobe_backend_sigtrap::Mode::Jump) => 0xe9,
            _ => 0xcc,
        };
        assert_eq!(bytes(a, 1), [want], "{a:#x}");
    }
    assert_eq!(rust_target(5), 5u64.rotate_left(3));
    // SAFETY: returns an address.
    unsafe { mp_t_lea() };
    let ids: Vec<_> = guards.into_iter().map(|g| g.into_id()).collect();
    reg.unregister_batch(&ids).unwrap();
    assert!(reg.is_empty());
    for (a, b) in snapshot {
        assert_eq!(bytes(a, 32), b, "{a:#x}");
    }
}

/// `dlopen("libz.so.1")` and its `zlibVersion`.
fn load_libz() -> (*mut libc::c_void, extern "C" fn() -> *const libc::c_char) {
    // SAFETY: a NUL-terminated name; the handle is checked.
    let lib = unsafe { libc::dlopen(c"libz.so.1".as_ptr(), libc::RTLD_NOW) };
    assert!(!lib.is_null(), "libz.so.1 is part of every Debian system");
    // SAFETY: a symbol lookup in a valid handle.
    let sym = unsafe { libc::dlsym(lib, c"zlibVersion".as_ptr()) };
    assert!(!sym.is_null());
    // SAFETY: zlibVersion is `const char *zlibVersion(void)`.
    let f = unsafe {
        std::mem::transmute::<*mut libc::c_void, extern "C" fn() -> *const libc::c_char>(sym)
    };
    (lib, f)
}

fn libz_mapped() -> bool {
    std::fs::read_to_string("/proc/self/maps")
        .unwrap()
        .contains("libz.so")
}

#[test]
fn a_probe_in_an_unloaded_library_ends_without_writing_there() {
    let reg = multiprobe_backend_sigtrap::registry();
    let (lib, f) = load_libz();
    let addr = f as *const () as u64;
    let g = reg.register(addr, |_h| {}).unwrap();
    f();
    // SAFETY: a handle from dlopen; `f` is not called after this.
    assert_eq!(unsafe { libc::dlclose(lib) }, 0);
    if libz_mapped() {
        // Something else in this process holds libz: nothing to test here.
        g.unregister().unwrap();
        return;
    }
    // The breakpoint went with the library: unregistering writes nothing (the address is
    // unmapped, or holds whatever was loaded there since) and ends the probe cleanly.
    assert_eq!(g.unregister().unwrap().hits, 1);
    assert!(reg.sites().is_empty(), "no site is kept armed");
    // Loaded again (often at the same address): its code is intact and probes work.
    let (lib, f) = load_libz();
    let addr2 = f as *const () as u64;
    assert_ne!(bytes(addr2, 1), [0xcc]);
    let g = reg.register(addr2, |_h| {}).unwrap();
    f();
    assert_eq!(g.unregister().unwrap().hits, 1);
    assert_ne!(bytes(addr2, 1), [0xcc]);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::dlclose(lib) }, 0);
}
