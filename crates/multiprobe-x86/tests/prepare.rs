//! The shared prepare pipeline over a fake target, and the continuation decision for
//! every kind of backend.

use std::cell::Cell;
use std::ops::Range;

use multiprobe_core::{Error, Memory, MemoryError, Regs};
use multiprobe_x86::{
    analyze, build_trampoline, continue_hit, prepare, Code, CodeSource, Continue, Emulate,
    Function, Mapping, OutsideBranch, RegionRefusal, SlotKind, TrampolineSpec, Via, Ways,
};

const BASE: u64 = 0x40_0000;

struct Fake {
    code: Vec<u8>,
    exec: bool,
    func: Option<(u64, u64)>,
    pads: Option<Vec<u64>>,
    pads_asked: Cell<u32>,
    probes: Vec<u64>,
    /// Branches of other code of the file: `(from, to)`; `None`: it cannot be read.
    outside: Option<Vec<(u64, u64)>>,
    outside_asked: Cell<u32>,
}

impl Fake {
    fn new(code: &[u8]) -> Fake {
        Fake {
            code: code.to_vec(),
            exec: true,
            func: Some((BASE, BASE + code.len() as u64)),
            pads: Some(Vec::new()),
            pads_asked: Cell::new(0),
            probes: Vec::new(),
            outside: Some(Vec::new()),
            outside_asked: Cell::new(0),
        }
    }
}

impl CodeSource for Fake {
    fn mapping(&self, addr: u64) -> Result<Option<Mapping>, Error> {
        let end = BASE + 0x1000;
        Ok((BASE..end).contains(&addr).then_some(Mapping {
            start: BASE,
            end,
            exec: self.exec,
        }))
    }
    fn function(&self, _addr: u64) -> Option<Function> {
        self.func.map(|(start, end)| Function {
            name: "f".into(),
            start,
            end,
        })
    }
    fn read_original(&self, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
        for (i, b) in buf.iter_mut().enumerate() {
            let off = (addr - BASE) as usize + i;
            *b = self.code.get(off).copied().unwrap_or(0xcc);
        }
        Ok(())
    }
    fn landing_pads(&self, _f: &Function) -> Option<Vec<u64>> {
        self.pads_asked.set(self.pads_asked.get() + 1);
        self.pads.clone()
    }
    fn probe_in(&self, range: Range<u64>) -> Option<u64> {
        self.probes.iter().copied().find(|a| range.contains(a))
    }
    fn branch_into(&self, range: Range<u64>) -> OutsideBranch {
        self.outside_asked.set(self.outside_asked.get() + 1);
        match &self.outside {
            None => OutsideBranch::Unknown,
            Some(v) => match v.iter().find(|(_, to)| range.contains(to)) {
                Some(&(from, to)) => OutsideBranch::At { from, to },
                None => OutsideBranch::None,
            },
        }
    }
}

/// push rbp; mov rbp, rsp; sub rsp, 0x10; leave; ret
const PROLOGUE: [u8; 10] = [0x55, 0x48, 0x89, 0xe5, 0x48, 0x83, 0xec, 0x10, 0xc9, 0xc3];

#[test]
fn prepare_validates_then_analyzes_the_instruction_and_the_region() {
    let f = Fake::new(&PROLOGUE);
    let p = prepare(BASE, &f).unwrap();
    assert_eq!(p.plan.addr(), BASE);
    assert_eq!(p.function.as_ref().unwrap().name, "f");
    assert_eq!(p.region.unwrap().len(), 8);
    assert_eq!(
        f.pads_asked.get(),
        1,
        "a multi-instruction region needs the landing pads"
    );

    // Bad input: each its own error, nothing else asked.
    assert!(matches!(
        prepare(1 << 47, &f),
        Err(Error::InvalidAddress { .. })
    ));
    assert!(matches!(prepare(BASE - 1, &f), Err(Error::Unmapped { .. })));
    let mut nx = Fake::new(&PROLOGUE);
    nx.exec = false;
    assert!(matches!(
        prepare(BASE, &nx),
        Err(Error::NotExecutable { .. })
    ));
    match prepare(BASE + 2, &f) {
        Err(Error::NotInstructionBoundary { context, .. }) => {
            assert!(context.ends_with(" in f+0x2"), "{context}")
        }
        other => panic!("{other:?}"),
    }

    // Not promotable is not an error.
    let mut unknown = Fake::new(&PROLOGUE);
    unknown.pads = None;
    assert_eq!(
        prepare(BASE, &unknown).unwrap().region,
        Err(RegionRefusal::UnwindUnknown)
    );
    let mut probed = Fake::new(&PROLOGUE);
    probed.probes = vec![BASE, BASE + 4];
    assert_eq!(
        prepare(BASE, &probed).unwrap().region,
        Err(RegionRefusal::ProbeInside { at: BASE + 4 })
    );
    let mut nofunc = Fake::new(&PROLOGUE);
    nofunc.func = None;
    let p = prepare(BASE, &nofunc).unwrap();
    assert!(!p.plan.boundary_checked());
    assert_eq!(p.region, Err(RegionRefusal::NoFunction));

    // A branch of another function into the interior (glibc's mempcpy jumping to the
    // instruction after memcpy's first) refuses the region; a branch to its first
    // byte or past its end does not; code that cannot be read cannot be ruled out.
    let mut into = Fake::new(&PROLOGUE);
    into.outside = Some(vec![(0x40_0800, BASE), (0x40_0900, BASE + 1)]);
    assert_eq!(
        prepare(BASE, &into).unwrap().region,
        Err(RegionRefusal::BranchInto {
            from: 0x40_0900,
            to: BASE + 1
        })
    );
    let mut around = Fake::new(&PROLOGUE);
    around.outside = Some(vec![(0x40_0800, BASE), (0x40_0900, BASE + 8)]);
    assert_eq!(prepare(BASE, &around).unwrap().region.unwrap().len(), 8);
    let mut unread = Fake::new(&PROLOGUE);
    unread.outside = None;
    assert_eq!(
        prepare(BASE, &unread).unwrap().region,
        Err(RegionRefusal::OutsideUnknown)
    );

    // A long first instruction needs no landing pads, and no other code is looked at.
    let mut long = Fake::new(&[0xb8, 1, 0, 0, 0, 0xc3]);
    long.outside = None;
    assert!(prepare(BASE, &long).unwrap().region.is_ok());
    assert_eq!(long.pads_asked.get(), 0);
    assert_eq!(long.outside_asked.get(), 0);
}

struct NoMem;
impl Memory for NoMem {
    fn read(&self, a: u64, _: &mut [u8]) -> Result<(), MemoryError> {
        Err(MemoryError::Unmapped(a))
    }
    fn write(&self, a: u64, _: &[u8]) -> Result<(), MemoryError> {
        Err(MemoryError::NotWritable(a))
    }
}

#[test]
fn the_continuation_follows_each_backends_costs() {
    let code = Code {
        addr: BASE,
        bytes: &PROLOGUE,
    };
    // `mov rbp, rsp` (emulated, no memory) and `push rbp` (emulated, writes the stack:
    // fails on NoMem) and `leave` (not emulated).
    let mov = analyze(BASE + 1, code, None).unwrap();
    let push = analyze(BASE, code, None).unwrap();
    let leave = analyze(BASE + 8, code, None).unwrap();
    let jb = mov.build_slot(SlotKind::JumpBack, 0x7000_0000).unwrap();
    let ta = mov.build_slot(SlotKind::TrapAfter, 0x7000_0040).unwrap();
    let region = multiprobe_x86::analyze_region(
        BASE,
        code,
        Some(BASE..BASE + 10),
        multiprobe_x86::Unwind::NoLandingPads,
    )
    .unwrap();
    let t = build_trampoline(
        &TrampolineSpec {
            region: &region,
            ctx: 0,
            pre: 1,
            post: 2,
            common: 3,
        },
        BASE + 0x10_0000,
    )
    .unwrap()
    .map;
    let regs = Regs {
        rsp: 0x1000,
        ..Regs::default()
    };
    let run = |plan, jump_back, trap_after, tr, post, e| {
        let ways = Ways {
            plan,
            jump_back,
            trap_after,
            trampoline: tr,
        };
        let mut r = regs;
        continue_hit(&ways, post, e, &mut r, &NoMem)
    };
    use Emulate::*;
    // In-process traps emulate whenever they can, posts right after.
    assert_eq!(
        run(&mov, Some(&jb), Some(&ta), None, true, First),
        Continue::Emulated { post: true }
    );
    // An emulation that fails (the push cannot write) falls back to a copy.
    assert_eq!(
        run(&push, Some(&jb), Some(&ta), None, true, First),
        Continue::OutOfLine {
            at: ta.addr(),
            via: Via::TrapAfter,
            post: true
        }
    );
    // With a trampoline, its post copy runs the posts without a second trap.
    assert_eq!(
        run(&leave, Some(&jb), Some(&ta), Some(&t), true, First),
        Continue::OutOfLine {
            at: t.post_copy(),
            via: Via::RegionPost,
            post: true
        }
    );
    assert_eq!(
        run(&leave, Some(&jb), Some(&ta), Some(&t), false, First),
        Continue::OutOfLine {
            at: jb.addr(),
            via: Via::JumpBack,
            post: false
        }
    );
    // ptrace: no emulation without a reason; none of a copy, in place.
    assert_eq!(
        run(&mov, Some(&jb), Some(&ta), None, false, WhenCheaper),
        Continue::OutOfLine {
            at: jb.addr(),
            via: Via::JumpBack,
            post: false
        }
    );
    assert_eq!(
        run(&mov, None, None, None, false, WhenCheaper),
        Continue::Emulated { post: false }
    );
    assert_eq!(
        run(&leave, None, None, None, true, WhenCheaper),
        Continue::InPlace { post: true }
    );
    // The trampoline entry: the plain copy; with posts, emulation (the posts right
    // after) or, for an instruction that is not emulated, the post copy.
    assert_eq!(
        run(&mov, None, None, Some(&t), false, ForPost),
        Continue::OutOfLine {
            at: t.copy_of(0),
            via: Via::Region,
            post: false
        }
    );
    assert_eq!(
        run(&mov, None, None, Some(&t), true, ForPost),
        Continue::Emulated { post: true }
    );
    assert_eq!(
        run(&leave, None, None, Some(&t), true, ForPost),
        Continue::OutOfLine {
            at: t.post_copy(),
            via: Via::RegionPost,
            post: true
        }
    );
}
