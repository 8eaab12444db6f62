//! The one error type of this crate.

use resync_protocol::{CloseCode, ErrorCode};

/// What went wrong in the client.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The server URL could not be used.
    #[error("invalid server url: {0}")]
    InvalidUrl(String),
    /// The client was closed (by [`Client::close`](crate::Client::close) or a terminal close
    /// code from the server).
    #[error("client closed: {0}")]
    Closed(String),
    /// The server answered a request with an error.
    #[error("server error {code:?}: {message}")]
    Server {
        /// The stable error code.
        code: ErrorCode,
        /// The server's explanation.
        message: String,
    },
    /// The server closed the connection with a code that forbids reconnecting.
    #[error("server closed the connection for good: {} ({})", .0.0, .0.reason())]
    Terminal(CloseCode),
    /// Publishing needs a WebSocket connection, and the client is on another transport.
    #[error("publishing needs a websocket connection; the client is on {0}")]
    PublishNeedsWebSocket(&'static str),
    /// The channel is already followed by this client.
    #[error("already subscribed to {0}")]
    AlreadySubscribed(String),
    /// The TLS settings could not be used (a bad certificate file, say).
    #[error("tls: {0}")]
    Tls(String),
    /// A request timed out.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The position store could not be read or written
    /// ([`PositionStore`](crate::PositionStore)); the subscription goes on.
    #[error("position store: {0}")]
    PositionStore(String),
}

/// `Result` with this crate's [`Error`] as the default error type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An error with every cause after it (`error sending request: … : invalid peer certificate:
/// UnknownIssuer`): reqwest's and tungstenite's own messages leave out the cause that tells a
/// user what to fix.
pub(crate) fn with_causes(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}
