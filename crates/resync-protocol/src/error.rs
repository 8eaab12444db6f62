//! The one error type of this crate.

/// What went wrong while validating or decoding protocol data.
///
/// Every decoder in this crate returns this type for bad input; none of them panics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A channel name is empty, too long, or uses a character outside the allowed set.
    #[error("invalid channel name: {0}")]
    InvalidChannel(String),
    /// A key of a keyed channel is empty, too long, or uses a character outside the allowed
    /// set.
    #[error("invalid key: {0}")]
    InvalidKey(String),
    /// An epoch is empty, too long, or not alphanumeric.
    #[error("invalid epoch: {0}")]
    InvalidEpoch(String),
    /// An idempotency key is empty, too long, or not printable ASCII.
    #[error("invalid idempotency key: {0}")]
    InvalidIdempotencyKey(String),
    /// A payload is not a single valid JSON value.
    #[error("invalid json payload: {0}")]
    InvalidPayload(String),
    /// A cursor string does not follow the cursor grammar.
    #[error("invalid cursor: {0}")]
    InvalidCursor(String),
    /// A frame is not valid JSON or does not match any frame type.
    #[error("malformed frame: {0}")]
    MalformedFrame(String),
    /// An SSE stream broke the event-stream grammar or a size limit.
    #[error("malformed event stream: {0}")]
    MalformedEventStream(String),
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
