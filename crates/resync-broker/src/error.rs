//! The one error type of this crate.

/// Why a broker operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The backing store could not be reached or did not confirm the operation. A publish that
    /// returns this was **not** stored; retrying it (with an idempotency key) is safe.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The broker refuses to track more channels.
    #[error("too many channels: the broker tracks at most {limit}")]
    TooManyChannels {
        /// The configured limit.
        limit: usize,
    },
    /// A keyed channel's state is at its bounds ([`KeyedLimits`](crate::KeyedLimits)): the
    /// publish of a new key (or a larger value) was not stored.
    #[error("keyed state full: {0}")]
    KeyedStateFull(String),
    /// The broker does not do what was asked (a keyed publish on a broker that keeps no
    /// keyed state, say); nothing was stored.
    #[error("not supported by this broker: {0}")]
    Unsupported(&'static str),
    /// The backing store returned data this broker cannot read.
    #[error("corrupt data in broker: {0}")]
    Corrupt(String),
    /// The broker was shut down.
    #[error("broker closed")]
    Closed,
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
