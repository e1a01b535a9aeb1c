//! The one error type of the registry and every backend.

use crate::HandlerId;

/// Why a probe operation failed. Every failure leaves the registry as it was before
/// the call, except where a variant says otherwise.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The address can never hold a probe (null, non-canonical, ...).
    #[error("{addr:#x} is not a valid probe address: {reason}")]
    InvalidAddress {
        /// The address.
        addr: u64,
        /// Why.
        reason: &'static str,
    },
    /// Nothing is mapped at the address.
    #[error("{addr:#x} is not mapped")]
    Unmapped {
        /// The address.
        addr: u64,
    },
    /// The address is mapped but not executable.
    #[error("{addr:#x} is not in executable memory")]
    NotExecutable {
        /// The address.
        addr: u64,
    },
    /// The address is inside an instruction, not at its start.
    #[error("{addr:#x} is not an instruction boundary{context}")]
    NotInstructionBoundary {
        /// The address.
        addr: u64,
        /// Where it is, e.g. " (inside the instruction at main+0x4)"; may be empty.
        context: String,
    },
    /// The instruction at the address cannot be executed out of line or emulated.
    #[error("the instruction at {addr:#x} cannot be probed: {reason}")]
    UnsupportedInstruction {
        /// The address.
        addr: u64,
        /// What the instruction is and why it is refused.
        reason: String,
    },
    /// A return probe (a handler with a return hook) was asked for at an address that is
    /// not a function's first instruction: its entry could not be paired with a return.
    #[error("{addr:#x} is not a function's first instruction, so a return probe there could not pair a call with its return{context}")]
    NotFunctionEntry {
        /// The address.
        addr: u64,
        /// Where it is, e.g. " (main+0x4)", or why the backend refuses; may be empty.
        context: String,
    },
    /// A return probe was asked for on a function whose call returns twice on one
    /// stack (`vfork`: the child returns first, then the parent; `setjmp`: again at
    /// each `longjmp`): the second return finds its entry's frame gone.
    #[error("{name} at {addr:#x} returns twice (a vfork child or a longjmp returns from it again), so a return probe there could not pair a call with its return")]
    ReturnsTwice {
        /// The address.
        addr: u64,
        /// The function.
        name: String,
    },
    /// Something else already put a breakpoint there.
    #[error("{addr:#x} already holds a breakpoint that is not ours")]
    AlreadyBreakpoint {
        /// The address.
        addr: u64,
    },
    /// The address belongs to the probing machinery itself (probing it would recurse).
    #[error("{addr:#x} is inside the probe machinery ({what}) and cannot be probed")]
    Reserved {
        /// The address.
        addr: u64,
        /// Which part.
        what: &'static str,
    },
    /// An exclusive registration met another handler at the same address.
    #[error(
        "exclusive conflict at {addr:#x}: handler {holder} is registered there{}",
        if *.holder_exclusive { " exclusively" } else { " and this registration asked to be exclusive" }
    )]
    ExclusiveConflict {
        /// The address.
        addr: u64,
        /// A handler already there.
        holder: HandlerId,
        /// Whether that handler is the exclusive one (otherwise the new one asked).
        holder_exclusive: bool,
    },
    /// No handler has this id (never registered, or already unregistered).
    #[error("no handler {0} is registered")]
    UnknownHandler(HandlerId),
    /// `unregister` was called on a thread that is itself inside a dispatch (from a
    /// handler). The handler *was* unlinked — hits that begin from now on do not run it —
    /// but waiting for hits already in flight would wait for the caller itself, so the
    /// call returned without that guarantee; the handler is freed later. (With a backend
    /// that dispatches in signal handlers, the registry's bookkeeping of the removal is
    /// finished later too, in thread context: see [`crate::PreAction::Remove`].)
    #[error("handler {0} was unlinked from inside a dispatch; in-flight hits were not awaited")]
    InsideDispatch(HandlerId),
    /// A registry operation was called from inside a handler of a backend that dispatches
    /// in signal handlers ([`crate::backend::Backend::dispatches_in_signal_handlers`]), where it
    /// would have to lock or allocate. Nothing was changed. From there, remove handlers
    /// with [`crate::PreAction::Remove`] or [`crate::Registry::unregister`].
    #[error("{0} cannot be called from inside a handler that runs in a signal handler (it would lock or allocate there); nothing was changed")]
    SignalContext(&'static str),
    /// A batch operation failed at one item; nothing of the batch was applied.
    #[error("batch item {index}: {source}")]
    Batch {
        /// Index of the failing item.
        index: usize,
        /// What went wrong with it.
        #[source]
        source: Box<Error>,
    },
    /// The operating system refused.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// The target process does not exist (any more).
    #[error("the target process is gone")]
    ProcessGone,
    /// The code at `addr` was unmapped (a library unloaded) or replaced since the
    /// breakpoint was inserted: the breakpoint went with it, and nothing was written.
    #[error("the code at {addr:#x} was unmapped or replaced; its breakpoint went with it")]
    CodeGone {
        /// The probed address.
        addr: u64,
    },
    /// An I/O or system call error, with what was being done.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A backend-specific failure.
    #[error("{0}")]
    Backend(String),
}

impl Error {
    /// An [`Error::Io`] with context.
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
