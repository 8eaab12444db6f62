//! The wires a [`Session`](crate::session::Session) is carried on. Each reads its client's
//! requests and encodes the session's events onto its own wire; none decides what a user
//! command, a presence change, an expiry, a limit or a shutdown means (`session.rs` does).
//!
//! - [`sse`]: Server-Sent Events, one GET per stream; a browser's `EventSource` resumes by
//!   itself through `Last-Event-ID`.
//! - [`ws`]: WebSocket, both directions: subscribes, publishes, presence queries and token
//!   refreshes from the client, on our own framing over actix-http's codec (`ws/socket.rs`).
//! - [`poll`]: long polling, one session per request, the cursor carrying the client's
//!   place from one poll to the next.

pub(crate) mod poll;
pub(crate) mod sse;
pub(crate) mod ws;
