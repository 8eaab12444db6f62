//! The wire contract of resync, with no runtime and no HTTP.
//!
//! resync keeps every client of a channel in step with its backend: each event a backend
//! publishes gets a per-channel [`Seq`] within an [`Epoch`], and a client that comes back with
//! its [`Position`] gets exactly the events it missed, or an explicit reset telling it to
//! refetch. This crate defines the words of that contract, shared by the server, the broker
//! and every client:
//!
//! - validated names: [`Channel`], [`Epoch`], [`Seq`], [`Position`], [`IdempotencyKey`];
//! - the [`Event`] envelope, whose JSON [`Payload`] is parsed once and carried as text;
//! - WebSocket frames in both directions, [`ClientFrame`] and [`ServerFrame`], with the typed
//!   [`RecoveryOutcome`] of a subscription and stable [`ErrorCode`]s;
//! - [`sse`] encoding and parsing, and the multi-channel [`Cursor`] that serves as an SSE
//!   event id so that a browser's own `EventSource` resumes a whole stream;
//! - the [`close`] codes, each with the [`ReconnectAdvice`] a client follows;
//! - the [`bodies`] outside WebSocket frames: SSE `subscribed` and `reset` data, the
//!   long-poll reply, and the HTTP API's requests and replies.
//!
//! Every decoder returns [`Error`] on bad input and never panics. `docs/protocol.md` in the
//! repository describes the same contract in prose, for writing a client in any language.
//!
//! ```
//! use resync_protocol::{ClientFrame, Cursor, ServerFrame};
//!
//! let frame = ClientFrame::decode(br#"{"type":"subscribe","id":1,"channel":"news"}"#)?;
//! assert!(matches!(frame, ClientFrame::Subscribe { .. }));
//!
//! let reply = ServerFrame::decode(
//!     br#"{"type":"event","channel":"news","epoch":"k3x9","seq":18,"data":{"title":"hi"}}"#,
//! )?;
//! let ServerFrame::Event(event) = reply else { unreachable!() };
//! let mut cursor = Cursor::new();
//! cursor.set(event.channel.clone(), event.position.clone());
//! assert_eq!(cursor.to_string(), "news:k3x9:18");
//! # Ok::<(), resync_protocol::Error>(())
//! ```

pub mod bodies;
pub mod close;
pub mod cursor;
mod error;
mod event;
mod frame;
mod names;
pub mod sse;

pub use close::{CloseCode, ReconnectAdvice};
pub use cursor::{Cursor, MAX_CURSOR_CHANNELS, MAX_CURSOR_LEN};
pub use error::{Error, Result};
pub use event::{Event, Payload};
pub use frame::{
    ClientFrame, ErrorBody, ErrorCode, Member, PROTOCOL_VERSION, PresenceRequest, RecoveryOutcome,
    RefusedFrame, RequestId, ResetReason, ServerFrame, StateEntry, UnsubscribeReason,
};
pub use names::{Channel, Epoch, IdempotencyKey, Key, MAX_CHANNEL_LEN, MAX_KEY_LEN, Position, Seq};
