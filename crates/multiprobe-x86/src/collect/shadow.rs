//! The shadow stacks of `ret` collectors: where a return-probed call's original return
//! address waits, with the entry's stack pointer, time and arguments, until the call
//! returns (DESIGN.md, "Return probes"). Offsets only, and a parser for the tracer;
//! the code that pushes and pops is generated (`retgen`).
//!
//! ```text
//! THREADS blocks of BLOCK_LEN bytes, one per thread (claimed by its fs base):
//!   0      owner  u64: the thread's fs base, 0 while free (claimed by `lock cmpxchg`)
//!   8      depth  u64: frames in use
//!   16     busy   u64: entries and returns of this thread in the shadow code now (more
//!                 than one: a signal handler's call nested in another's)
//!   k * FRAME_LEN (k = 1..=FRAMES): frame k, the k-th call still in flight
//!     0    ret    u64: the return address the entry replaced
//!     8    rsp    u64: the address of that return slot (the entry's stack pointer)
//!     16   tsc    u64: rdtsc at the entry
//!     24   lost   u64: where to count the call lost (a collector's counter word) ...
//!     32   lost2  u64: ... and a second one, or 0
//!     40   code   u64: the return code's address (what the slot holds while armed)
//!     48   args   6 × u64: rdi rsi rdx rcx r8 r9 at the entry
//!     96   flags  u64: SUSPECT (counted lost already, see below)
//! ```
//!
//! The mapping is the tracee's own, private and anonymous (`MAP_NORESERVE`: pages are
//! only made for the threads and depths used): a `fork` child gets a copy of its
//! parent's stacks, which describe the calls in flight on its copy of the parent's
//! stacks — exactly what its own returns need.
//!
//! Invariants the generated code keeps, so that a signal handler nesting on the same
//! thread (a probed call inside it) cannot corrupt an interrupted push or pop:
//! * an entry raises `depth` before it writes its frame, and a return lowers it only
//!   after it has read its frame and written its records;
//! * frames are matched by stack pointer: a return at `rsp = R` owns the innermost
//!   frame whose `rsp` is `R - 8`. At an entry at slot `S`, a frame at `S` is dead (a
//!   `call` overwrote the slot), unless the slot still holds that frame's return code:
//!   the entry came by a tail call (`jmp`) from inside that call. It stays, and the new
//!   frame's original return address is that return code, so the two returns chain;
//! * what the code cannot decide alone it asks the tracer, by an `int3` the tracer
//!   knows ([`crate::collect::CollectMap::ask`]): an entry that finds a frame below its
//!   slot (a call skipped by a `longjmp`, or live on another stack: a coroutine the
//!   program switched away from), and a return whose frame is not the innermost. The
//!   tracer reads the slots (its reads cannot fault the program), drops the frames
//!   whose slot no longer holds their return code (counted lost), keeps the others as
//!   *suspects* (counted lost once, un-counted by the return code if they return after
//!   all), puts a returning call's frame innermost, and lets the thread go on. It
//!   compacts the block only when `busy` says no other entry or return of the thread
//!   is under way (one interrupted by the signal whose handler asks);
//! * a thread whose block cannot be found or claimed (more than THREADS threads hashed
//!   to a crowded neighbourhood), or whose stack is full, runs its call unswapped and
//!   counts it lost: the program never depends on a free slot.

/// Thread blocks (a power of two).
pub const THREADS: usize = 256;
/// Frames per thread: calls in flight one thread can have return-probed at once.
pub const FRAMES: usize = 1024;
/// Bytes of a frame (a power of two); the block's header takes the first one.
pub const FRAME_LEN: usize = 128;
/// Bytes of a thread's block.
pub const BLOCK_LEN: usize = FRAME_LEN * (FRAMES + 1);
/// Bytes of the whole mapping (a page multiple).
pub const SHADOW_LEN: usize = BLOCK_LEN * THREADS;
/// How many blocks from its hashed one a thread looks at before it gives up.
pub(crate) const PROBES: u32 = 8;

/// A block's owner word (its thread's fs base, 0 while free).
pub const OWNER: usize = 0;
/// A block's depth word (frames in use).
pub const DEPTH: usize = 8;
/// A block's busy word (entries and returns under way).
pub const BUSY: usize = 16;
/// Frame offsets (module docs): the original return address,
pub const F_RET: usize = 0;
/// the return slot's address,
pub const F_RSP: usize = 8;
/// the entry's `rdtsc`,
pub const F_TSC: usize = 16;
/// the first collector's lost-counter word,
pub const F_LOST: usize = 24;
/// the second's (or 0),
pub const F_LOST2: usize = 32;
/// the return code's address,
pub const F_CODE: usize = 40;
/// the six arguments,
pub const F_ARGS: usize = 48;
/// the flags ([`SUSPECT`]).
pub const F_FLAGS: usize = 96;
/// Frame flag: the call is counted lost already (its frame was found where a skipped
/// call's would be, its slot still holding the return code); its return, if it comes,
/// takes the count back.
pub const SUSPECT: u64 = 1;

const _: () = assert!(THREADS.is_power_of_two() && FRAME_LEN.is_power_of_two());
const _: () = assert!(F_ARGS + 6 * 8 <= F_FLAGS && F_FLAGS + 8 <= FRAME_LEN);
const _: () = assert!(SHADOW_LEN.is_multiple_of(4096));

/// A call in flight, as the tracer reads it from a block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InFlight {
    /// The original return address.
    pub ret: u64,
    /// Where the return slot is on the thread's stack.
    pub slot: u64,
    /// What the slot holds while the call is armed: the return code's address.
    pub code: u64,
    /// Where the call is counted lost if it never returns: the counter words of its
    /// one or two collectors (0 for none).
    pub lost: [u64; 2],
    /// Counted lost already ([`SUSPECT`]).
    pub suspect: bool,
}

/// Offset of block `i` in the mapping.
pub fn block_offset(i: usize) -> usize {
    (i % THREADS) * BLOCK_LEN
}

/// The blocks a thread whose fs base is `fs` looks at for its own, in the order the
/// generated code does: the hash of its fs base (the low 32 bits times the 32-bit
/// golden ratio, the top bits of that: `Gen::thread_hash`), then the next
/// `PROBES - 1`.
pub fn blocks_of(fs: u64) -> impl Iterator<Item = usize> {
    let h = ((fs as u32).wrapping_mul(0x9e37_79b9) >> (32 - THREADS.trailing_zeros())) as usize;
    (0..PROBES as usize).map(move |k| (h + k) % THREADS)
}

/// A block's owner (fs base) and depth, from its first 16 bytes.
pub fn block_header(head: &[u8; 16]) -> (u64, u64) {
    let w = |o: usize| u64::from_le_bytes(head[o..o + 8].try_into().expect("8 bytes"));
    (w(OWNER), w(DEPTH))
}

/// One frame's bytes, as the tracee wrote them, for a tracer that reads and rewrites
/// them (nothing in them is trusted beyond its own use of a field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameBytes(pub [u8; FRAME_LEN]);

impl FrameBytes {
    /// The word at `off` (one of the `F_*` offsets).
    pub fn word(&self, off: usize) -> u64 {
        u64::from_le_bytes(self.0[off..off + 8].try_into().expect("8 bytes"))
    }

    /// Set the word at `off`.
    pub fn set_word(&mut self, off: usize, v: u64) {
        self.0[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// The original return address.
    pub fn ret(&self) -> u64 {
        self.word(F_RET)
    }

    /// The return slot's address.
    pub fn slot(&self) -> u64 {
        self.word(F_RSP)
    }

    /// The return code's address.
    pub fn code(&self) -> u64 {
        self.word(F_CODE)
    }

    /// Whether it is counted lost already ([`SUSPECT`]).
    pub fn suspect(&self) -> bool {
        self.word(F_FLAGS) & SUSPECT != 0
    }

    /// Flag it [`SUSPECT`].
    pub fn set_suspect(&mut self) {
        let f = self.word(F_FLAGS);
        self.set_word(F_FLAGS, f | SUSPECT);
    }

    /// The counter words its loss is counted in (none of them 0).
    pub fn lost_words(&self) -> impl Iterator<Item = u64> {
        [self.word(F_LOST), self.word(F_LOST2)]
            .into_iter()
            .filter(|&w| w != 0)
    }

    /// The frame's fields.
    pub fn call(&self) -> InFlight {
        InFlight {
            ret: self.ret(),
            slot: self.slot(),
            code: self.code(),
            lost: [self.word(F_LOST), self.word(F_LOST2)],
            suspect: self.suspect(),
        }
    }
}

/// The frames of a block, outermost first: `frames` holds the bytes of frames `1..=n`
/// (from [`FRAME_LEN`] into the block). At most what `frames` holds.
pub fn frames_of(frames: &[u8]) -> impl Iterator<Item = FrameBytes> + '_ {
    frames
        .chunks_exact(FRAME_LEN)
        .map(|c| FrameBytes(c.try_into().expect("a frame")))
}

/// The calls in flight of a block, outermost first (as [`frames_of`]). Never trusts
/// the bytes: at most what `frames` holds.
pub fn in_flight(frames: &[u8]) -> Vec<InFlight> {
    frames_of(frames).map(|f| f.call()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_parsed_outermost_first() {
        let mut b = vec![0u8; 2 * FRAME_LEN + 5];
        b[F_RET..F_RET + 8].copy_from_slice(&0x1111u64.to_le_bytes());
        b[F_RSP..F_RSP + 8].copy_from_slice(&0x7ff0u64.to_le_bytes());
        b[FRAME_LEN + F_RET..FRAME_LEN + F_RET + 8].copy_from_slice(&0x2222u64.to_le_bytes());
        b[FRAME_LEN + F_RSP..FRAME_LEN + F_RSP + 8].copy_from_slice(&0x7f00u64.to_le_bytes());
        let f = in_flight(&b);
        assert_eq!(
            f,
            [
                InFlight {
                    ret: 0x1111,
                    slot: 0x7ff0,
                    code: 0,
                    lost: [0, 0],
                    suspect: false,
                },
                InFlight {
                    ret: 0x2222,
                    slot: 0x7f00,
                    code: 0,
                    lost: [0, 0],
                    suspect: false,
                }
            ]
        );
        assert_eq!(block_offset(THREADS + 1), BLOCK_LEN);
    }
}
