//! WebSocket frames in both directions, the recovery outcome, and stable error codes.
//!
//! Every frame is one JSON object in one WebSocket text message, told apart by its `type`
//! field. Unknown fields are rejected so that typos surface as errors instead of being ignored.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::event::{Event, Payload};
use crate::names::{Channel, IdempotencyKey, Key, Position, Seq, truncate_for_message};

/// The version of the wire protocol described in `docs/protocol.md`.
pub const PROTOCOL_VERSION: u32 = 1;

/// A number the client picks to match a reply to its request. The server echoes it.
pub type RequestId = u64;

/// A frame the client sends to the server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientFrame {
    /// Follow a channel, optionally resuming after `since`.
    Subscribe {
        /// Echoed in the `subscribed` or `error` reply.
        id: RequestId,
        /// The channel to follow.
        channel: Channel,
        /// The last position the client has seen; missed events are replayed first.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        since: Option<Position>,
        /// Appear among the channel's members while subscribed, with this info.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        presence: Option<PresenceRequest>,
        /// Be told when members join and leave (`join` and `leave` frames).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        join_leave: bool,
        /// On a keyed channel, start from the current state (`state` frames, then the events
        /// after them) instead of from `since` or from now.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        state: bool,
    },
    /// Stop following a channel.
    Unsubscribe {
        /// Echoed in the `unsubscribed` or `error` reply.
        id: RequestId,
        /// The channel to stop following.
        channel: Channel,
    },
    /// Publish an event (where the server allows client publishing).
    Publish {
        /// Echoed in the `published` or `error` reply.
        id: RequestId,
        /// The channel to publish on.
        channel: Channel,
        /// The event's JSON data.
        data: Payload,
        /// Makes a retried publish land once.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        idempotency_key: Option<IdempotencyKey>,
    },
    /// Replace the connection's token before it expires (answered with `refreshed`): the
    /// connection's deadline moves to the new `exp`, and channels the new token no longer
    /// allows are unsubscribed (`unsubscribed` with reason `permission`). The token must be
    /// for the same subject.
    Refresh {
        /// Echoed in the `refreshed` or `error` reply.
        id: RequestId,
        /// The new token.
        token: String,
    },
    /// Ask who is in a channel now (answered with `presence`).
    Presence {
        /// Echoed in the reply.
        id: RequestId,
        /// The channel.
        channel: Channel,
    },
    /// Ask how many members a channel has (answered with `presence_count`); cheap for
    /// channels of many thousands.
    PresenceCount {
        /// Echoed in the reply.
        id: RequestId,
        /// The channel.
        channel: Channel,
    },
    /// The answer to a server `ping`.
    Pong,
}

/// Why the server ended a subscription by itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UnsubscribeReason {
    /// A refreshed token no longer allows the channel.
    Permission,
    /// The application's backend unsubscribed the user (the HTTP API).
    Server,
    /// A reason this version does not know.
    #[serde(other)]
    Unknown,
}

/// How a subscriber appears among a channel's members.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceRequest {
    /// A small JSON value the others see with the member (a name, an avatar); bounded in size
    /// by the server (over it, the subscribe fails with `presence_info_too_large`).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_payload"
    )]
    pub info: Option<Payload>,
}

/// The latest event of one key of a keyed channel, as a `state` frame carries it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateEntry {
    /// The key.
    pub key: Key,
    /// The seq of the event the entry holds: an event of the key at or before it is already
    /// in the state.
    pub seq: Seq,
    /// The key's data; `null` when the key was deleted (kept a while, so that an older event
    /// of the key, replayed after the state, does not bring it back).
    pub data: Option<Payload>,
}

/// One member of a channel: an identity (a token's subject, or an anonymous client's id),
/// however many connections it has there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// The member's id: the token's subject, or `anon:<client id>`.
    pub id: String,
    /// The info its first connection joined with.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_payload"
    )]
    pub info: Option<Payload>,
}

impl ClientFrame {
    /// Decodes one frame from the bytes of a WebSocket text message.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        Self::decode_request(bytes).map_err(|refused| refused.error)
    }

    /// Decodes a client's frame, and when it is refused, says which request it was (its
    /// `id`, when that much could be read) and why, so that the error answers that request:
    /// a bad channel is `invalid_channel`, a bad position `bad_cursor`, whatever else a
    /// client may wait on by its `id`.
    pub fn decode_request(bytes: &[u8]) -> std::result::Result<Self, RefusedFrame> {
        let wire: LenientClientWire<'_> =
            serde_json::from_slice(bytes).map_err(|error| RefusedFrame {
                // An unknown field, or a frame of the wrong shape: its `id` still answers it
                // when it can be read.
                id: serde_json::from_slice::<IdOnly>(bytes)
                    .ok()
                    .and_then(|frame| frame.id)
                    .and_then(|id| id.as_u64()),
                error: malformed(error),
            })?;
        let id = wire
            .id
            .and_then(|raw| serde_json::from_str::<RequestId>(raw.get()).ok());
        wire.into_wire()
            .and_then(ClientWire::into_frame)
            .map_err(|error| RefusedFrame { id, error })
    }

    /// Encodes the frame as JSON text.
    pub fn encode(&self) -> String {
        // Serializing these types cannot fail: every field is a string, number or raw JSON.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// How a subscription starts: what the server did with the client's `since`.
///
/// This is a typed answer, never a boolean: a client can tell "nothing was missed" from
/// "missed events follow" from "your state is stale, refetch".
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case", deny_unknown_fields)]
pub enum RecoveryOutcome {
    /// No `since` was given: live events after `position` follow.
    Fresh {
        /// The channel's position when the subscription started.
        position: Position,
    },
    /// `count` missed events follow (before any live event), then live ones.
    Replayed {
        /// How many replayed events follow.
        count: u64,
    },
    /// Nothing was missed; live events follow.
    UpToDate,
    /// A keyed channel whose history no longer reaches the client's position (or a client
    /// that asked for the state): the channel's state follows in `state` frames, standing
    /// for `position`, then the events after it. An event of a key at or before the seq the
    /// state holds for that key is already in the state.
    State {
        /// Where the events after the state start.
        position: Position,
    },
    /// The missed events cannot be replayed: the client must refetch its state, then follow
    /// the live events after `position`, which follow.
    Reset {
        /// Why replay was impossible.
        reason: ResetReason,
        /// Where the stream continues from.
        position: Position,
    },
}

/// Why a client's position could not be resumed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ResetReason {
    /// The channel's history started again (broker restart, lost metadata); old positions
    /// mean nothing in the new epoch.
    EpochChanged,
    /// History no longer reaches back to the position (trimmed by count or by age).
    Truncated,
    /// More events were missed than the server replays at once.
    TooFarBehind,
    /// The position is ahead of the channel's newest event, which a real client never holds.
    PositionAhead,
    /// The client's cursor could not be read.
    BadCursor,
    /// A reason added in a later protocol version; treat it like any other reset.
    #[serde(other)]
    Unknown,
}

impl ResetReason {
    /// The snake_case name used on the wire and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ResetReason::EpochChanged => "epoch_changed",
            ResetReason::Truncated => "truncated",
            ResetReason::TooFarBehind => "too_far_behind",
            ResetReason::PositionAhead => "position_ahead",
            ResetReason::BadCursor => "bad_cursor",
            ResetReason::Unknown => "unknown",
        }
    }
}

/// Stable, machine-readable error codes, shared by WebSocket `error` frames and the JSON
/// bodies of HTTP errors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorCode {
    /// The request is malformed in a way no other code describes.
    BadRequest,
    /// A frame is not JSON or not a known frame type, or has unknown fields.
    MalformedFrame,
    /// A channel name breaks the channel grammar.
    InvalidChannel,
    /// The channel's namespace is not served by this server.
    UnknownChannel,
    /// A cursor or position could not be read.
    BadCursor,
    /// A payload is not valid JSON.
    InvalidPayload,
    /// A message or body is larger than the server accepts.
    PayloadTooLarge,
    /// No valid credentials were given, or they expired.
    Unauthorized,
    /// The credentials do not allow this action on this channel.
    Forbidden,
    /// The client is already subscribed to this channel on this connection.
    AlreadySubscribed,
    /// The client is not subscribed to this channel on this connection.
    NotSubscribed,
    /// The connection follows as many channels as the server allows.
    TooManyChannels,
    /// The client sends faster than the server allows.
    RateLimited,
    /// The broker could not store or read events; retry later.
    Unavailable,
    /// A subscription's presence info is larger than the server accepts.
    PresenceInfoTooLarge,
    /// A bug or unexpected state on the server.
    Internal,
    /// No such endpoint (an HTTP path the server does not serve).
    NotFound,
    /// A keyed channel's state is at its bounds (keys or bytes): the publish of a new key
    /// was not stored. Delete keys, or raise the namespace's bounds.
    KeyedStateFull,
    /// A publish names a key on a channel that is not keyed, or names none on a keyed one.
    KeyMismatch,
    /// A code added in a later protocol version.
    #[serde(other)]
    Unknown,
}

impl ErrorCode {
    /// The snake_case name used on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::MalformedFrame => "malformed_frame",
            ErrorCode::InvalidChannel => "invalid_channel",
            ErrorCode::UnknownChannel => "unknown_channel",
            ErrorCode::BadCursor => "bad_cursor",
            ErrorCode::InvalidPayload => "invalid_payload",
            ErrorCode::PayloadTooLarge => "payload_too_large",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::AlreadySubscribed => "already_subscribed",
            ErrorCode::NotSubscribed => "not_subscribed",
            ErrorCode::TooManyChannels => "too_many_channels",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::PresenceInfoTooLarge => "presence_info_too_large",
            ErrorCode::Internal => "internal",
            ErrorCode::NotFound => "not_found",
            ErrorCode::KeyedStateFull => "keyed_state_full",
            ErrorCode::KeyMismatch => "key_mismatch",
            ErrorCode::Unknown => "unknown",
        }
    }
}

/// The JSON body of every error, over HTTP and inside WebSocket `error` frames.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorBody {
    /// The stable code.
    pub code: ErrorCode,
    /// A human-readable explanation; not stable, not for matching.
    pub message: String,
}

/// A frame the server sends to the client.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// The first frame on every connection.
    Connected {
        /// The server's id for this connection (for logs and support).
        client_id: String,
        /// How often the server pings; a client that hears nothing for this long plus a grace
        /// period should treat the connection as dead.
        ping_interval_ms: u64,
        /// The protocol version the server speaks.
        protocol: u32,
        /// When the connection's token expires (seconds since the Unix epoch), if it does:
        /// send a `refresh` before then to keep the connection.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    /// The reply to `subscribe`; replayed events (if any) follow, then live ones.
    Subscribed {
        /// The request's id.
        id: RequestId,
        /// The channel now followed.
        channel: Channel,
        /// What happened to the client's `since`.
        recovery: RecoveryOutcome,
    },
    /// The reply to `unsubscribe` or, with `id` 0 and a `reason`, the server ending a
    /// subscription by itself; the client should not subscribe again on its own.
    Unsubscribed {
        /// The request's id; 0 when the server ended the subscription.
        id: RequestId,
        /// The channel no longer followed.
        channel: Channel,
        /// Why the server ended it, when it did.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<UnsubscribeReason>,
    },
    /// The reply to `refresh`: the new token is in force.
    Refreshed {
        /// The request's id.
        id: RequestId,
        /// When the new token expires (seconds since the Unix epoch), if it does.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires_at: Option<u64>,
    },
    /// A page of a keyed channel's state (after a `subscribed` whose recovery is `state`):
    /// every page but the last says `more`; the state is the pages' entries together.
    State {
        /// The channel.
        channel: Channel,
        /// Entries in key order.
        entries: Vec<StateEntry>,
        /// Where the events after the state start (the same on every page of one state).
        position: Position,
        /// More pages follow.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
    /// The reply to `publish`: where the event was stored.
    Published {
        /// The request's id.
        id: RequestId,
        /// The channel published on.
        channel: Channel,
        /// The stored event's position.
        position: Position,
    },
    /// An event of a followed channel.
    Event(Event),
    /// A followed channel's history broke mid-stream; the client must refetch, then follows
    /// the events after `position`.
    Reset {
        /// The channel that was reset.
        channel: Channel,
        /// Why.
        reason: ResetReason,
        /// Where the stream continues from.
        position: Position,
    },
    /// A request failed, or (without `id`) the connection did something wrong.
    Error {
        /// The failed request's id, when the error answers a request.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<RequestId>,
        /// The stable error code.
        code: ErrorCode,
        /// A human-readable explanation.
        message: String,
    },
    /// The reply to `presence`: who is in the channel now. A long list comes in pages, each
    /// frame bounded in bytes: every page but the last says `more`, and the list is the
    /// pages' members together, once the last has come.
    Presence {
        /// The request's id.
        id: RequestId,
        /// The channel.
        channel: Channel,
        /// Its members, one per identity.
        members: Vec<Member>,
        /// More members follow in the next `presence` frame of this channel.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
    /// The reply to `presence_count`.
    PresenceCount {
        /// The request's id.
        id: RequestId,
        /// The channel.
        channel: Channel,
        /// How many members it has.
        count: u64,
    },
    /// A member arrived in a followed channel (to subscribers that asked for `join_leave`).
    /// Never replayed: a client that resumes asks for the list instead.
    Join {
        /// The channel.
        channel: Channel,
        /// Who arrived.
        member: Member,
    },
    /// A member's last connection left a followed channel.
    Leave {
        /// The channel.
        channel: Channel,
        /// Who left.
        member: Member,
    },
    /// A heartbeat; the client answers with `pong`.
    Ping,
}

impl ServerFrame {
    /// Decodes one frame from the bytes of a WebSocket text message.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let wire: ServerWire = serde_json::from_slice(bytes).map_err(malformed)?;
        wire.into_frame()
    }

    /// Encodes the frame as JSON text. Events take the hand-written fast path.
    pub fn encode(&self) -> String {
        match self {
            ServerFrame::Event(event) => event.encode_frame(),
            // Serializing these types cannot fail: every field is a string, number or raw JSON.
            other => serde_json::to_string(other).unwrap_or_default(),
        }
    }
}

fn malformed(error: serde_json::Error) -> Error {
    Error::MalformedFrame(truncate_for_message(&error.to_string()))
}

// Decoding goes through flat "wire" structs instead of serde's internally tagged enums: serde
// buffers tagged content before it knows the variant, and raw JSON payloads cannot be read
// back from that buffer. A flat struct reads the payload straight from the input, in one pass.

/// Reads a `reason` string as the enum of its frame type.
fn named<T: serde::de::DeserializeOwned>(reason: String, kind: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(reason))
        .map_err(|error| Error::MalformedFrame(format!("{kind} frame has a bad `reason`: {error}")))
}

/// Takes a field that the frame type requires.
fn required<T>(field: Option<T>, kind: &str, name: &str) -> Result<T> {
    field.ok_or_else(|| Error::MalformedFrame(format!("{kind} frame is missing field `{name}`")))
}

/// Fails when a frame carries a field that its type does not have.
fn reject_extra(kind: &str, extra: &[(&str, bool)]) -> Result<()> {
    match extra.iter().find(|(_, present)| *present) {
        Some((name, _)) => Err(Error::MalformedFrame(format!(
            "{kind} frame has unknown field `{name}`"
        ))),
        None => Ok(()),
    }
}

/// A client frame the server refused: the request's `id` (when it could be read) and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RefusedFrame {
    /// The request's `id`, if the frame had a readable one.
    pub id: Option<RequestId>,
    /// Why it was refused.
    pub error: Error,
}

/// Only a frame's `id`, whatever else it holds.
#[derive(Deserialize)]
struct IdOnly {
    id: Option<serde_json::Value>,
}

/// A client frame with every field kept as raw JSON: the frame as a whole is read first, so
/// that a field that does not validate is refused for what it is, with the request's `id`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LenientClientWire<'a> {
    #[serde(rename = "type")]
    kind: String,
    #[serde(borrow)]
    id: Option<&'a RawValue>,
    #[serde(borrow)]
    channel: Option<&'a RawValue>,
    #[serde(borrow)]
    since: Option<&'a RawValue>,
    #[serde(borrow, default, deserialize_with = "present_raw")]
    data: Option<&'a RawValue>,
    #[serde(borrow)]
    idempotency_key: Option<&'a RawValue>,
    #[serde(borrow)]
    presence: Option<&'a RawValue>,
    #[serde(borrow)]
    join_leave: Option<&'a RawValue>,
    #[serde(borrow)]
    state: Option<&'a RawValue>,
    #[serde(borrow)]
    token: Option<&'a RawValue>,
}

/// Reads a present field as `Some`, even when it is JSON `null`.
fn present_raw<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<&'de RawValue>, D::Error> {
    <&RawValue>::deserialize(deserializer).map(Some)
}

/// Reads one raw field as `T`; a field of the wrong JSON type makes the frame malformed.
fn field<T: serde::de::DeserializeOwned>(
    raw: Option<&RawValue>,
    kind: &str,
    name: &str,
) -> Result<Option<T>> {
    let Some(raw) = raw else {
        return Ok(None);
    };
    serde_json::from_str(raw.get()).map(Some).map_err(|error| {
        Error::MalformedFrame(format!(
            "{kind} frame has a bad `{name}`: {}",
            truncate_for_message(&error.to_string())
        ))
    })
}

/// A position as a client writes it, read before it is validated.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PositionWire {
    epoch: String,
    seq: serde_json::Value,
}

impl<'a> LenientClientWire<'a> {
    /// The typed wire, each field validated on its own: a channel name that breaks the
    /// grammar is `invalid_channel`, a position that does not read (its epoch, a seq of -1
    /// or "5") is `bad_cursor`, a bad key `bad_request`, anything else of the wrong shape
    /// `malformed_frame`.
    fn into_wire(self) -> Result<ClientWire> {
        let kind = self.kind;
        let channel = field::<String>(self.channel, &kind, "channel")?
            .map(Channel::new)
            .transpose()?;
        let since = match self.since {
            Some(raw) => {
                let wire: PositionWire = serde_json::from_str(raw.get()).map_err(|error| {
                    Error::InvalidCursor(format!(
                        "`since` is not a position {{\"epoch\",\"seq\"}}: {}",
                        truncate_for_message(&error.to_string())
                    ))
                })?;
                let seq = wire.seq.as_u64().ok_or_else(|| {
                    Error::InvalidCursor(format!(
                        "`since.seq` must be a whole number from 0, not {}",
                        truncate_for_message(&wire.seq.to_string())
                    ))
                })?;
                Some(Position::new(
                    crate::names::Epoch::new(&wire.epoch)?,
                    crate::names::Seq::new(seq),
                ))
            }
            None => None,
        };
        let idempotency_key = field::<String>(self.idempotency_key, &kind, "idempotency_key")?
            .map(IdempotencyKey::new)
            .transpose()?;
        Ok(ClientWire {
            id: field(self.id, &kind, "id")?,
            channel,
            since,
            data: match self.data {
                Some(raw) => Some(Payload::from_json(raw.get().to_owned())?),
                None => None,
            },
            idempotency_key,
            presence: field(self.presence, &kind, "presence")?,
            join_leave: field(self.join_leave, &kind, "join_leave")?,
            state: field(self.state, &kind, "state")?,
            token: field(self.token, &kind, "token")?,
            kind,
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientWire {
    #[serde(rename = "type")]
    kind: String,
    id: Option<RequestId>,
    channel: Option<Channel>,
    since: Option<Position>,
    #[serde(default, deserialize_with = "present_payload")]
    data: Option<Payload>,
    idempotency_key: Option<IdempotencyKey>,
    presence: Option<PresenceRequest>,
    join_leave: Option<bool>,
    state: Option<bool>,
    token: Option<String>,
}

/// Reads a present `data` field as `Some`, even when it is JSON `null` (a valid payload).
fn present_payload<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Payload>, D::Error> {
    Payload::deserialize(deserializer).map(Some)
}

impl ClientWire {
    fn into_frame(self) -> Result<ClientFrame> {
        let kind = self.kind.as_str();
        if kind != "subscribe" {
            reject_extra(kind, &[("state", self.state.is_some())])?;
        }
        match kind {
            "subscribe" => {
                reject_extra(
                    kind,
                    &[
                        ("data", self.data.is_some()),
                        ("idempotency_key", self.idempotency_key.is_some()),
                        ("token", self.token.is_some()),
                    ],
                )?;
                Ok(ClientFrame::Subscribe {
                    id: required(self.id, kind, "id")?,
                    channel: required(self.channel, kind, "channel")?,
                    since: self.since,
                    presence: self.presence,
                    join_leave: self.join_leave.unwrap_or(false),
                    state: self.state.unwrap_or(false),
                })
            }
            "refresh" => {
                reject_extra(
                    kind,
                    &[
                        ("channel", self.channel.is_some()),
                        ("since", self.since.is_some()),
                        ("data", self.data.is_some()),
                        ("idempotency_key", self.idempotency_key.is_some()),
                        ("presence", self.presence.is_some()),
                        ("join_leave", self.join_leave.is_some()),
                    ],
                )?;
                Ok(ClientFrame::Refresh {
                    id: required(self.id, kind, "id")?,
                    token: required(self.token, kind, "token")?,
                })
            }
            "unsubscribe" | "presence" | "presence_count" => {
                reject_extra(
                    kind,
                    &[
                        ("since", self.since.is_some()),
                        ("data", self.data.is_some()),
                        ("idempotency_key", self.idempotency_key.is_some()),
                        ("presence", self.presence.is_some()),
                        ("join_leave", self.join_leave.is_some()),
                        ("token", self.token.is_some()),
                    ],
                )?;
                let id = required(self.id, kind, "id")?;
                let channel = required(self.channel, kind, "channel")?;
                Ok(match kind {
                    "unsubscribe" => ClientFrame::Unsubscribe { id, channel },
                    "presence" => ClientFrame::Presence { id, channel },
                    _ => ClientFrame::PresenceCount { id, channel },
                })
            }
            "publish" => {
                reject_extra(
                    kind,
                    &[
                        ("since", self.since.is_some()),
                        ("presence", self.presence.is_some()),
                        ("join_leave", self.join_leave.is_some()),
                        ("token", self.token.is_some()),
                    ],
                )?;
                Ok(ClientFrame::Publish {
                    id: required(self.id, kind, "id")?,
                    channel: required(self.channel, kind, "channel")?,
                    data: required(self.data, kind, "data")?,
                    idempotency_key: self.idempotency_key,
                })
            }
            "pong" => {
                reject_extra(
                    kind,
                    &[
                        ("id", self.id.is_some()),
                        ("channel", self.channel.is_some()),
                        ("since", self.since.is_some()),
                        ("data", self.data.is_some()),
                        ("idempotency_key", self.idempotency_key.is_some()),
                        ("presence", self.presence.is_some()),
                        ("join_leave", self.join_leave.is_some()),
                        ("token", self.token.is_some()),
                    ],
                )?;
                Ok(ClientFrame::Pong)
            }
            other => Err(Error::MalformedFrame(format!(
                "unknown frame type {:?}",
                truncate_for_message(other)
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for ClientFrame {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ClientWire::deserialize(deserializer)?
            .into_frame()
            .map_err(serde::de::Error::custom)
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServerWire {
    #[serde(rename = "type")]
    kind: String,
    client_id: Option<String>,
    ping_interval_ms: Option<u64>,
    protocol: Option<u32>,
    id: Option<RequestId>,
    channel: Option<Channel>,
    recovery: Option<RecoveryOutcome>,
    position: Option<Position>,
    epoch: Option<crate::names::Epoch>,
    seq: Option<crate::names::Seq>,
    key: Option<crate::names::Key>,
    #[serde(default, deserialize_with = "present_payload")]
    data: Option<Payload>,
    /// A reset's or a server unsubscribe's reason, read by the frame type.
    reason: Option<String>,
    code: Option<ErrorCode>,
    message: Option<String>,
    members: Option<Vec<Member>>,
    entries: Option<Vec<StateEntry>>,
    more: Option<bool>,
    count: Option<u64>,
    member: Option<Member>,
    expires_at: Option<u64>,
}

impl ServerWire {
    /// The names of the fields present, to reject those a frame type does not have.
    fn present(&self) -> [(&'static str, bool); 20] {
        [
            ("client_id", self.client_id.is_some()),
            ("ping_interval_ms", self.ping_interval_ms.is_some()),
            ("protocol", self.protocol.is_some()),
            ("id", self.id.is_some()),
            ("channel", self.channel.is_some()),
            ("recovery", self.recovery.is_some()),
            ("position", self.position.is_some()),
            ("epoch", self.epoch.is_some()),
            ("seq", self.seq.is_some()),
            ("key", self.key.is_some()),
            ("data", self.data.is_some()),
            ("reason", self.reason.is_some()),
            ("code", self.code.is_some()),
            ("message", self.message.is_some()),
            ("members", self.members.is_some()),
            ("entries", self.entries.is_some()),
            ("more", self.more.is_some()),
            ("count", self.count.is_some()),
            ("member", self.member.is_some()),
            ("expires_at", self.expires_at.is_some()),
        ]
    }

    fn reject_all_but(&self, kind: &str, allowed: &[&str]) -> Result<()> {
        let extra: Vec<(&str, bool)> = self
            .present()
            .into_iter()
            .filter(|(name, _)| !allowed.contains(name))
            .collect();
        reject_extra(kind, &extra)
    }

    fn into_frame(self) -> Result<ServerFrame> {
        let kind = self.kind.clone();
        let kind = kind.as_str();
        match kind {
            "connected" => {
                self.reject_all_but(
                    kind,
                    &["client_id", "ping_interval_ms", "protocol", "expires_at"],
                )?;
                Ok(ServerFrame::Connected {
                    client_id: required(self.client_id, kind, "client_id")?,
                    ping_interval_ms: required(self.ping_interval_ms, kind, "ping_interval_ms")?,
                    protocol: required(self.protocol, kind, "protocol")?,
                    expires_at: self.expires_at,
                })
            }
            "subscribed" => {
                self.reject_all_but(kind, &["id", "channel", "recovery"])?;
                Ok(ServerFrame::Subscribed {
                    id: required(self.id, kind, "id")?,
                    channel: required(self.channel, kind, "channel")?,
                    recovery: required(self.recovery, kind, "recovery")?,
                })
            }
            "unsubscribed" => {
                self.reject_all_but(kind, &["id", "channel", "reason"])?;
                Ok(ServerFrame::Unsubscribed {
                    id: required(self.id, kind, "id")?,
                    channel: required(self.channel, kind, "channel")?,
                    reason: self.reason.map(|reason| named(reason, kind)).transpose()?,
                })
            }
            "refreshed" => {
                self.reject_all_but(kind, &["id", "expires_at"])?;
                Ok(ServerFrame::Refreshed {
                    id: required(self.id, kind, "id")?,
                    expires_at: self.expires_at,
                })
            }
            "published" => {
                self.reject_all_but(kind, &["id", "channel", "position"])?;
                Ok(ServerFrame::Published {
                    id: required(self.id, kind, "id")?,
                    channel: required(self.channel, kind, "channel")?,
                    position: required(self.position, kind, "position")?,
                })
            }
            "event" => {
                self.reject_all_but(kind, &["channel", "epoch", "seq", "key", "data"])?;
                Ok(ServerFrame::Event(Event {
                    channel: required(self.channel, kind, "channel")?,
                    position: Position::new(
                        required(self.epoch, kind, "epoch")?,
                        required(self.seq, kind, "seq")?,
                    ),
                    key: self.key,
                    data: required(self.data, kind, "data")?,
                }))
            }
            "reset" => {
                self.reject_all_but(kind, &["channel", "reason", "position"])?;
                Ok(ServerFrame::Reset {
                    channel: required(self.channel, kind, "channel")?,
                    reason: named(required(self.reason, kind, "reason")?, kind)?,
                    position: required(self.position, kind, "position")?,
                })
            }
            "error" => {
                self.reject_all_but(kind, &["id", "code", "message"])?;
                Ok(ServerFrame::Error {
                    id: self.id,
                    code: required(self.code, kind, "code")?,
                    message: required(self.message, kind, "message")?,
                })
            }
            "presence" => {
                self.reject_all_but(kind, &["id", "channel", "members", "more"])?;
                Ok(ServerFrame::Presence {
                    id: required(self.id, kind, "id")?,
                    channel: required(self.channel, kind, "channel")?,
                    members: required(self.members, kind, "members")?,
                    more: self.more.unwrap_or(false),
                })
            }
            "state" => {
                self.reject_all_but(kind, &["channel", "entries", "position", "more"])?;
                Ok(ServerFrame::State {
                    channel: required(self.channel, kind, "channel")?,
                    entries: required(self.entries, kind, "entries")?,
                    position: required(self.position, kind, "position")?,
                    more: self.more.unwrap_or(false),
                })
            }
            "presence_count" => {
                self.reject_all_but(kind, &["id", "channel", "count"])?;
                Ok(ServerFrame::PresenceCount {
                    id: required(self.id, kind, "id")?,
                    channel: required(self.channel, kind, "channel")?,
                    count: required(self.count, kind, "count")?,
                })
            }
            "join" | "leave" => {
                self.reject_all_but(kind, &["channel", "member"])?;
                let channel = required(self.channel, kind, "channel")?;
                let member = required(self.member, kind, "member")?;
                Ok(if kind == "join" {
                    ServerFrame::Join { channel, member }
                } else {
                    ServerFrame::Leave { channel, member }
                })
            }
            "ping" => {
                self.reject_all_but(kind, &[])?;
                Ok(ServerFrame::Ping)
            }
            other => Err(Error::MalformedFrame(format!(
                "unknown frame type {:?}",
                truncate_for_message(other)
            ))),
        }
    }
}

impl<'de> Deserialize<'de> for ServerFrame {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        ServerWire::deserialize(deserializer)?
            .into_frame()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::names::{Epoch, Seq};

    #[test]
    fn subscribe_frame_reads_as_documented() {
        let frame = ClientFrame::decode(
            br#"{"type":"subscribe","id":1,"channel":"news","since":{"epoch":"e1","seq":5}}"#,
        )
        .unwrap();
        assert_eq!(
            frame,
            ClientFrame::Subscribe {
                id: 1,
                channel: Channel::new("news").unwrap(),
                since: Some(Position::new(Epoch::new("e1").unwrap(), Seq::new(5))),
                presence: None,
                join_leave: false,
                state: false,
            }
        );
    }

    #[test]
    fn unknown_fields_and_types_are_rejected() {
        for bad in [
            &br#"{"type":"subscribe","id":1,"channel":"news","sinse":null}"#[..],
            br#"{"type":"teleport","id":1}"#,
            br#"{"id":1}"#,
            b"not json",
        ] {
            assert!(matches!(
                ClientFrame::decode(bad),
                Err(Error::MalformedFrame(_))
            ));
        }
        // A field that reads but does not validate is refused for what it is, with the
        // request's id (issue 29, defects 7 and 8).
        let refused =
            ClientFrame::decode_request(br#"{"type":"subscribe","id":1,"channel":"bad channel"}"#)
                .unwrap_err();
        assert_eq!(refused.id, Some(1));
        assert!(matches!(refused.error, Error::InvalidChannel(_)));
        let refused = ClientFrame::decode_request(
            br#"{"type":"subscribe","id":2,"channel":"news","sinse":null}"#,
        )
        .unwrap_err();
        assert_eq!(
            refused.id,
            Some(2),
            "an unknown field still answers its request"
        );
    }

    #[test]
    fn recovery_outcome_is_tagged() {
        let frame = ServerFrame::Subscribed {
            id: 3,
            channel: Channel::new("c").unwrap(),
            recovery: RecoveryOutcome::Reset {
                reason: ResetReason::Truncated,
                position: Position::new(Epoch::new("e").unwrap(), Seq::new(9)),
            },
        };
        let json: serde_json::Value = serde_json::from_str(&frame.encode()).unwrap();
        assert_eq!(json["recovery"]["outcome"], "reset");
        assert_eq!(json["recovery"]["reason"], "truncated");
        assert_eq!(json["recovery"]["position"]["seq"], 9);
    }

    #[test]
    fn newer_reasons_and_codes_decode_as_unknown() {
        let reason: ResetReason = serde_json::from_str("\"meteor_strike\"").unwrap();
        assert_eq!(reason, ResetReason::Unknown);
        let code: ErrorCode = serde_json::from_str("\"meteor_strike\"").unwrap();
        assert_eq!(code, ErrorCode::Unknown);
    }

    #[test]
    fn as_str_matches_serde_names() {
        for reason in [
            ResetReason::EpochChanged,
            ResetReason::Truncated,
            ResetReason::TooFarBehind,
            ResetReason::PositionAhead,
            ResetReason::BadCursor,
        ] {
            assert_eq!(
                serde_json::to_string(&reason).unwrap(),
                format!("\"{}\"", reason.as_str())
            );
        }
        for code in [
            ErrorCode::MalformedFrame,
            ErrorCode::TooManyChannels,
            ErrorCode::Unavailable,
        ] {
            assert_eq!(
                serde_json::to_string(&code).unwrap(),
                format!("\"{}\"", code.as_str())
            );
        }
    }
}
