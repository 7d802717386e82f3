//! Typed errors. Library code never panics on caller input and never prints;
//! every failure a caller can cause is a variant here, with the values needed
//! to act on it.

/// Everything an index operation can fail with.
///
/// Each variant carries what a caller needs to act on it, so match on the
/// ones you can handle and pass the rest up:
///
/// ```
/// use nann::{Error, Index, IndexParams, Metric};
/// let index = Index::new(IndexParams::new(2, Metric::L2))?;
/// index.insert(7, &[0.0, 1.0])?;
/// match index.insert(8, &[1.0, 2.0, 3.0]) {
///     Err(Error::DimensionMismatch { expected, actual }) => {
///         assert_eq!((expected, actual), (2, 3));
///     }
///     other => panic!("expected a dimension error, got {other:?}"),
/// }
/// // Upsert: update when the key is taken, insert when it is not.
/// let upsert = |key: u64, v: &[f32]| match index.update(key, v) {
///     Err(Error::KeyNotFound(_)) => index.insert(key, v),
///     done => done,
/// };
/// upsert(7, &[5.0, 5.0])?;
/// upsert(9, &[6.0, 6.0])?;
/// assert_eq!(index.len(), 2);
/// // Every error reads as a sentence a user can act on.
/// let message = index.remove(42).unwrap_err().to_string();
/// assert!(message.contains("42"), "{message}");
/// # Ok::<(), Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A vector's length differs from the index dimension.
    #[error("vector has {actual} components but the index dimension is {expected}")]
    DimensionMismatch {
        /// The index dimension.
        expected: usize,
        /// The length of the vector passed in.
        actual: usize,
    },
    /// A vector holds NaN or an infinity, which would poison every distance.
    #[error(
        "vector component {position} is {value}; only finite values can be indexed or searched"
    )]
    NonFiniteValue {
        /// Index of the first offending component.
        position: usize,
        /// The offending value.
        value: f32,
    },
    /// A zero vector cannot be normalised for the cosine metric.
    #[error("a zero vector has no direction; the cosine metric cannot use it")]
    ZeroVector,
    /// `insert` was called with a key that is already present; use `update`.
    #[error("key {0} is already in the index; use `update` to change its vector")]
    DuplicateKey(u64),
    /// `update`, `remove` or `get` named a key that is not present.
    #[error("key {0} is not in the index")]
    KeyNotFound(u64),
    /// The index cannot hold more entries.
    #[error("the index is full: it cannot address more than {limit} entries")]
    CapacityExceeded {
        /// The largest number of slots the index can address.
        limit: usize,
    },
    /// The allocator refused memory the index needed to grow.
    #[error("could not allocate {bytes} bytes to grow the index")]
    OutOfMemory {
        /// Size of the refused request.
        bytes: usize,
    },
    /// A payload's length differs from the index's
    /// [`payload_len`](crate::IndexParams::payload_len).
    #[error("payload has {actual} bytes but the index stores {expected} per entry")]
    PayloadLength {
        /// The index's payload length.
        expected: usize,
        /// The length of the payload passed in.
        actual: usize,
    },
    /// The operation is not available for this index yet; the message says
    /// what is missing.
    #[error("not supported: {0}")]
    Unsupported(&'static str),
    /// An index parameter is out of its valid range.
    #[error("invalid parameter `{name}`: {reason}")]
    InvalidParameter {
        /// The parameter's name, as spelt in [`IndexParams`](crate::IndexParams).
        name: &'static str,
        /// What is wrong and what range is accepted.
        reason: String,
    },
    /// A [`Scorer`](crate::Scorer) failed; the search that called it ends
    /// with this error.
    #[error("scorer failed: {message}")]
    Scorer {
        /// The scorer's own description of the failure.
        message: String,
    },
    /// An I/O operation on an index file failed.
    #[error("{operation} {path}: {message}")]
    Io {
        /// What was being done (`open`, `write`, `fsync`, `rename`, ...).
        operation: &'static str,
        /// The file or directory.
        path: String,
        /// The OS error's kind.
        kind: std::io::ErrorKind,
        /// The OS error's message.
        message: String,
    },
    /// Another [`DurableIndex`](crate::DurableIndex), in this process or
    /// another, has the directory open; a durable directory has one writer
    /// at a time.
    #[error(
        "{path} is in use by another DurableIndex (this process or another); \
         close that one first, or open a different directory"
    )]
    DirectoryInUse {
        /// The directory.
        path: String,
    },
    /// A file is not a valid index (damaged, truncated, from another format
    /// version or build, or crafted).
    #[cfg(not(loom))]
    #[error(transparent)]
    Format(crate::persist::FormatError),
}

/// A specialised `Result` for index operations.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A broken structural invariant, reported by
/// [`Index::check_invariants`](crate::Index::check_invariants).
///
/// Each variant names the slot (the internal position) involved, so a failing
/// test can be traced to one node.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvariantViolation {
    /// I1: a neighbour id points outside the allocated slots.
    #[error("slot {slot} layer {layer}: neighbour {neighbour} is out of range (slots: {slots})")]
    NeighbourOutOfRange {
        /// The node holding the list.
        slot: u32,
        /// The layer of the list.
        layer: usize,
        /// The bad id.
        neighbour: u32,
        /// Number of allocated slots.
        slots: u32,
    },
    /// I2: a node links to itself.
    #[error("slot {slot} layer {layer}: links to itself")]
    SelfLoop {
        /// The node.
        slot: u32,
        /// The layer.
        layer: usize,
    },
    /// I3: a neighbour appears twice in one list.
    #[error("slot {slot} layer {layer}: neighbour {neighbour} appears twice")]
    DuplicateNeighbour {
        /// The node.
        slot: u32,
        /// The layer.
        layer: usize,
        /// The repeated id.
        neighbour: u32,
    },
    /// I4: a list is longer than the layer's maximum degree.
    #[error("slot {slot} layer {layer}: degree {degree} exceeds the maximum {max}")]
    DegreeTooHigh {
        /// The node.
        slot: u32,
        /// The layer.
        layer: usize,
        /// Its degree.
        degree: usize,
        /// M on upper layers, M0 on layer 0.
        max: usize,
    },
    /// I5: a node is linked from a layer above its own level.
    #[error("slot {slot} (level {level}) is linked from slot {from} on layer {layer}")]
    AboveLevel {
        /// The node.
        slot: u32,
        /// Its level.
        level: usize,
        /// The node whose list holds it.
        from: u32,
        /// The layer of that list.
        layer: usize,
    },
    /// I6: the entry point is missing, unallocated, or not at the max level.
    #[error("entry point is inconsistent: {reason}")]
    EntryPoint {
        /// What is wrong.
        reason: String,
    },
    /// I7/I8: the key map is not a bijection onto the live slots.
    #[error("key map: {reason}")]
    KeyMap {
        /// What is wrong.
        reason: String,
    },
    /// I9: a live node cannot be reached from the entry point on layer 0.
    #[error("{unreachable} live node(s) unreachable from the entry point on layer 0, e.g. slot {example}")]
    Unreachable {
        /// How many.
        unreachable: usize,
        /// One of them.
        example: u32,
    },
    /// I12: a node's anchor (the in-edge pruning must keep) is missing or
    /// does not link it; the anchor tree is what guarantees I9.
    #[error("slot {slot}: anchor invariant broken: {reason}")]
    Anchor {
        /// The node.
        slot: u32,
        /// What is wrong.
        reason: String,
    },
    /// I11: a stored vector holds a non-finite value.
    #[error("slot {slot}: stored vector holds a non-finite value")]
    NonFiniteVector {
        /// The node.
        slot: u32,
    },
}
