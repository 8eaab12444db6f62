//! The JSON bodies outside the WebSocket frames: the data of the SSE `subscribed`, `reset`,
//! `disconnect`, `unsubscribed` and `presence_lagged` events, the long-poll reply, the HTTP
//! API's requests and replies, and what resync asks the application's backend and reads back
//! (its proxy). The server writes them with these types, the Rust client (and an application
//! backend in Rust) reads them with the same ones, and `docs/protocol.md` describes them for
//! clients in other languages. No library crate builds a body by hand (`json!`): `xtask`'s
//! tidy test refuses it.
//!
//! The long-poll reply and the history reply have hand-written encoders
//! ([`PollReply::encode`], [`HistoryReply::encode_replayed`]) that splice event frames
//! already encoded at publish time; `tests/properties.rs` checks that they decode back to
//! the same replies as the types' own serde forms.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{
    Channel, Cursor, IdempotencyKey, Key, Payload, Position, RecoveryOutcome, ResetReason,
    UnsubscribeReason,
};

/// The data of the `subscribed` event that opens every SSE stream: each channel's recovery
/// outcome. The event's `id` is the stream's cursor.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SseOpening {
    /// How each channel of the stream was recovered (replayed, fresh, or reset).
    pub channels: BTreeMap<Channel, RecoveryOutcome>,
}

/// A channel's history no longer reaches the client's position: the data of an SSE `reset`
/// event, and an entry of a long-poll reply's `resets`. The client refetches, then continues
/// from `position`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResetNotice {
    /// The channel to refetch.
    pub channel: Channel,
    /// Why its history cannot be replayed.
    pub reason: ResetReason,
    /// Where to continue after the refetch.
    pub position: Position,
}

impl ResetNotice {
    /// The notice as one line of JSON.
    pub fn to_json(&self) -> String {
        // A struct of validated names and an enum: serialization cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// The application disconnected the client's user: the data of an SSE `disconnect` event, and
/// a long-poll reply's `disconnect`. With `reconnect` false the client must not come back on
/// its own (WebSocket: close 4005); with true it reconnects soon (4203).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisconnectNotice {
    /// The application's reason, for people.
    pub reason: String,
    /// Whether the client may reconnect.
    pub reconnect: bool,
}

/// The server ended a subscription: the data of an SSE `unsubscribed` event, and an entry of a
/// long-poll reply's `unsubscribed`. No more events of the channel follow; the client does not
/// subscribe again on its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsubscribedNotice {
    /// The channel.
    pub channel: Channel,
    /// Why: `server` (the application), `permission` (a refreshed token).
    pub reason: UnsubscribeReason,
}

/// A watcher of a channel's joins and leaves missed some and its list could not be read
/// again: the data of an SSE `presence_lagged` event (WebSocket: an `error` without `id`).
/// The client fetches the list again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceLaggedNotice {
    /// The channel.
    pub channel: Channel,
    /// What happened, for people.
    pub message: String,
}

macro_rules! json_line_bodies {
    ($($name:ident),*) => {
        $(
            impl $name {
                /// The body as one line of JSON.
                pub fn to_json(&self) -> String {
                    // Strings, validated names and enums: serialization cannot fail.
                    serde_json::to_string(self).unwrap_or_default()
                }
            }
        )*
    };
}

json_line_bodies!(DisconnectNotice, UnsubscribedNotice, PresenceLaggedNotice);

/// `POST /api/users/{user}/disconnect`: why, and whether the user may come back. An empty
/// body is no reason and no reconnect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DisconnectRequest {
    /// Shown to the client (a WebSocket close reason: at most 123 bytes are sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether the client should reconnect (close 4203) or stay away (close 4005).
    #[serde(default)]
    pub reconnect: bool,
}

/// `POST /api/users/{user}/unsubscribe`: the channel whose subscriptions end.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnsubscribeRequest {
    /// The channel.
    pub channel: Channel,
}

/// What resync asks the application's backend (its proxy, `docs/auth.md`): a `POST` of this
/// JSON, answered with a [`ProxyAnswer`].
///
/// Read back with serde as well: an application written in Rust decodes it with this type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    rename_all = "snake_case",
    tag = "kind",
    deny_unknown_fields,
    try_from = "ProxyRequestWire"
)]
#[non_exhaustive]
pub enum ProxyRequest {
    /// A client connects (any transport), with the token it brought (if any).
    Connect {
        /// The token's subject, if it had a token.
        user: Option<String>,
        /// The raw token, for a backend that verifies its own.
        token: Option<String>,
    },
    /// A client refreshes its token over WebSocket.
    Refresh {
        /// The connection's subject.
        user: Option<String>,
        /// The new token.
        token: String,
    },
    /// A client subscribes to a channel of a proxied namespace.
    Subscribe {
        /// The connection's subject.
        user: Option<String>,
        /// The channel.
        channel: Channel,
    },
    /// A client publishes on a channel of a proxied namespace.
    Publish {
        /// The connection's subject.
        user: Option<String>,
        /// The channel.
        channel: Channel,
        /// The event's data.
        data: Payload,
    },
}

/// [`ProxyRequest`] as read: serde's tagged enums buffer their fields, which a raw JSON value
/// (the published data) cannot come through, so the fields are read flat and checked after.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ProxyRequestWire {
    kind: String,
    #[serde(default)]
    user: Option<String>,
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    channel: Option<Channel>,
    #[serde(default, deserialize_with = "present_payload")]
    data: Option<Payload>,
}

impl TryFrom<ProxyRequestWire> for ProxyRequest {
    type Error = String;

    fn try_from(wire: ProxyRequestWire) -> Result<Self, Self::Error> {
        let ProxyRequestWire {
            kind,
            user,
            token,
            channel,
            data,
        } = wire;
        let unexpected = |field: &str| format!("`{field}` is not a field of a `{kind}` request");
        let missing = |field: &str| format!("a `{kind}` request needs `{field}`");
        match kind.as_str() {
            "connect" => {
                if channel.is_some() {
                    return Err(unexpected("channel"));
                }
                if data.is_some() {
                    return Err(unexpected("data"));
                }
                Ok(Self::Connect { user, token })
            }
            "refresh" => {
                if channel.is_some() {
                    return Err(unexpected("channel"));
                }
                if data.is_some() {
                    return Err(unexpected("data"));
                }
                let token = token.ok_or_else(|| missing("token"))?;
                Ok(Self::Refresh { user, token })
            }
            "subscribe" => {
                if token.is_some() {
                    return Err(unexpected("token"));
                }
                if data.is_some() {
                    return Err(unexpected("data"));
                }
                let channel = channel.ok_or_else(|| missing("channel"))?;
                Ok(Self::Subscribe { user, channel })
            }
            "publish" => {
                if token.is_some() {
                    return Err(unexpected("token"));
                }
                let channel = channel.ok_or_else(|| missing("channel"))?;
                let data = data.ok_or_else(|| missing("data"))?;
                Ok(Self::Publish {
                    user,
                    channel,
                    data,
                })
            }
            other => Err(format!("unknown proxy request kind `{other}`")),
        }
    }
}

/// The application's answer to a [`ProxyRequest`]: `{}` allows it as it is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyAnswer {
    /// Refuse the request, with this reason shown to the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deny: Option<String>,
    /// Connect: act as this user from now on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Connect: the channel patterns the connection may subscribe to, instead of its token's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscribe: Option<Vec<String>>,
    /// Connect: the channel patterns it may publish to, instead of its token's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<Vec<String>>,
    /// Connect: the info the client appears among members with (when its subscribe gives
    /// none).
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_payload"
    )]
    pub info: Option<Payload>,
    /// Publish: store this data instead of the client's.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_payload"
    )]
    pub data: Option<Payload>,
}

/// Reads a present payload field as `Some`, even when it is JSON `null` (a valid payload).
fn present_payload<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<Payload>, D::Error> {
    Payload::deserialize(deserializer).map(Some)
}

/// A long-poll reply: the events (each an `event` frame, as on WebSocket), the resets, and
/// the cursor to send with the next poll.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollReply {
    /// `event` frames, oldest first per channel; on a keyed channel whose recovery was
    /// `state`, its `state` frames come first (before the events after them).
    pub events: Vec<Box<RawValue>>,
    /// Channels to refetch; a channel's events in the same reply come after its reset.
    pub resets: Vec<ResetNotice>,
    /// Where every channel of the poll stands after this reply.
    pub cursor: Cursor,
    /// The presence session to name in the next poll (`presence_session=`), when the poll
    /// asked for presence (`presence=` or `join_leave=1`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_session: Option<String>,
    /// `join`, `leave` and `presence` (the whole list) frames since the session's last
    /// reply, oldest first: what a WebSocket watcher would have been sent.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub presence: Vec<Box<RawValue>>,
    /// Channels the server ended (the application unsubscribed the user): drop them from the
    /// next poll.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unsubscribed: Vec<UnsubscribedNotice>,
    /// The application disconnected the user: stop polling (or, with `reconnect`, poll again
    /// after a moment).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disconnect: Option<DisconnectNotice>,
    /// Keyed channels whose state this reply delivered only in part: pass them back as
    /// `state_after=` (each `channel|epoch:seq|key`: the state's position and the last key
    /// delivered), with the cursor, and the next reply goes on from there.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub state_after: Vec<String>,
}

/// What the server tells a long-polling client besides events: the subscriptions it ended
/// and a disconnect.
#[derive(Clone, Copy, Debug, Default)]
pub struct PollNotices<'a> {
    /// Channels the server ended.
    pub unsubscribed: &'a [UnsubscribedNotice],
    /// The user was disconnected.
    pub disconnect: Option<&'a DisconnectNotice>,
    /// Keyed channels whose state goes on in the next reply (`channel|epoch:seq|key`).
    pub state_after: &'a [String],
}

/// A long-poll reply's presence part: its session and the frames it owes the client.
#[derive(Clone, Copy, Debug)]
pub struct PollPresence<'a> {
    /// The session to name in the next poll.
    pub session: &'a str,
    /// `join`, `leave` and `presence` frames, each one line of JSON.
    pub frames: &'a [String],
}

impl PollReply {
    /// Encodes a reply from event frames already encoded (the broker encodes each event once,
    /// at publish), without parsing them again: the bytes of [`PollReply`]'s serde form.
    pub fn encode<'a>(
        frames: impl ExactSizeIterator<Item = &'a [u8]> + Clone,
        resets: &[ResetNotice],
        cursor: &Cursor,
        presence: Option<PollPresence<'_>>,
        notices: PollNotices<'_>,
    ) -> Vec<u8> {
        let cursor = serde_json::to_string(&cursor.to_string()).unwrap_or_default();
        let size = frames.clone().map(|frame| frame.len() + 1).sum::<usize>()
            + resets.len() * 96
            + cursor.len()
            + presence.map_or(0, |presence| {
                presence.session.len()
                    + presence
                        .frames
                        .iter()
                        .map(|frame| frame.len() + 1)
                        .sum::<usize>()
                    + 40
            })
            + 40;
        let mut body = Vec::with_capacity(size);
        body.extend_from_slice(b"{\"events\":[");
        push_joined(&mut body, frames);
        body.extend_from_slice(b"],\"resets\":[");
        let resets: Vec<String> = resets.iter().map(ResetNotice::to_json).collect();
        push_joined(&mut body, resets.iter().map(String::as_bytes));
        body.extend_from_slice(b"],\"cursor\":");
        body.extend_from_slice(cursor.as_bytes());
        if let Some(presence) = presence {
            body.extend_from_slice(b",\"presence_session\":");
            let session = serde_json::to_string(presence.session).unwrap_or_default();
            body.extend_from_slice(session.as_bytes());
            if !presence.frames.is_empty() {
                body.extend_from_slice(b",\"presence\":[");
                push_joined(&mut body, presence.frames.iter().map(String::as_bytes));
                body.push(b']');
            }
        }
        if !notices.unsubscribed.is_empty() {
            body.extend_from_slice(b",\"unsubscribed\":[");
            let notices: Vec<String> = notices
                .unsubscribed
                .iter()
                .map(UnsubscribedNotice::to_json)
                .collect();
            push_joined(&mut body, notices.iter().map(String::as_bytes));
            body.push(b']');
        }
        if let Some(disconnect) = notices.disconnect {
            body.extend_from_slice(b",\"disconnect\":");
            body.extend_from_slice(disconnect.to_json().as_bytes());
        }
        if !notices.state_after.is_empty() {
            body.extend_from_slice(b",\"state_after\":");
            body.extend_from_slice(
                serde_json::to_string(notices.state_after)
                    .unwrap_or_default()
                    .as_bytes(),
            );
        }
        body.push(b'}');
        body
    }
}

/// Appends JSON texts separated by commas: the inside of an array of pre-encoded values.
fn push_joined<'a>(body: &mut Vec<u8>, values: impl Iterator<Item = &'a [u8]>) {
    for (index, value) in values.enumerate() {
        if index > 0 {
            body.push(b',');
        }
        body.extend_from_slice(value);
    }
}

/// `POST /api/publish`: the event to publish.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishRequest {
    /// The channel to publish on.
    pub channel: Channel,
    /// The event's data, any JSON value (validated once, as the body is read). On a keyed
    /// channel, `null` deletes the key.
    pub data: Payload,
    /// Makes a retried publish store once (the `Idempotency-Key` header does the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<IdempotencyKey>,
    /// On a keyed channel, the key the event sets (required there, refused elsewhere).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<Key>,
}

/// The answer to a publish: where the event was stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublishReply {
    /// The channel published on.
    pub channel: Channel,
    /// The event's position.
    pub position: Position,
}

/// How a history read came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HistoryOutcome {
    /// The events after the position (at most the limit asked for).
    Replayed,
    /// Nothing after the position.
    UpToDate,
    /// The position cannot be resumed (`reason` says why); refetch.
    Reset,
}

/// `GET /api/history`: a channel's events after a position. (A struct with an `outcome`
/// field rather than a tagged enum: serde cannot read raw event frames inside one.)
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryReply {
    /// How the read came out.
    pub outcome: HistoryOutcome,
    /// Why the position cannot be resumed, for a `reset`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<ResetReason>,
    /// `event` frames, oldest first; empty unless `replayed`.
    pub events: Vec<Box<RawValue>>,
    /// The channel's newest position, where a reader continues.
    pub latest: Position,
}

impl HistoryReply {
    /// Encodes a `replayed` reply from event frames already encoded, without parsing them
    /// again: the bytes of [`HistoryReply`]'s serde form.
    pub fn encode_replayed<'a>(
        frames: impl Iterator<Item = &'a [u8]>,
        latest: &Position,
    ) -> Vec<u8> {
        let mut body = Vec::with_capacity(256);
        body.extend_from_slice(b"{\"outcome\":\"replayed\",\"events\":[");
        push_joined(&mut body, frames);
        body.extend_from_slice(b"],\"latest\":");
        // A position of validated names: serializing cannot fail.
        body.extend_from_slice(serde_json::to_string(latest).unwrap_or_default().as_bytes());
        body.push(b'}');
        body
    }
}

/// `GET /api/channels/{channel}`: a channel's newest position and this process's
/// subscribers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelInfo {
    /// The channel.
    pub channel: Channel,
    /// Its newest position (seq 0 if never published).
    pub position: Position,
    /// Subscribers connected to this process.
    pub subscribers: usize,
}

/// `GET /api/channels/{channel}/presence`: who is in a channel, on every instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelPresence {
    /// The channel.
    pub channel: Channel,
    /// How many members it has.
    pub count: u64,
    /// The members, one per identity; absent when only the count was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<Vec<crate::Member>>,
}

/// `GET /api/channels/{channel}/state`: a page of a keyed channel's state (docs/protocol.md,
/// section 14).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChannelState {
    /// The channel.
    pub channel: Channel,
    /// The latest event of each key after `after`, in key order (`data` `null`: deleted).
    pub entries: Vec<crate::StateEntry>,
    /// The channel's position when the page was read; follow from the first page's.
    pub position: Position,
    /// More follow: ask again with `after=` this key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<Key>,
}

/// A command for every connection of one user, on every server instance: the body of
/// `POST /api/users/{user}/…` and what the broker carries between instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case", deny_unknown_fields)]
pub enum UserCommand {
    /// Close the user's connections, saying why and whether to come back.
    Disconnect {
        /// The token subject.
        user: String,
        /// Shown to the client (WebSocket close reason, at most 123 bytes; SSE `disconnect`).
        reason: String,
        /// Whether the client should reconnect (close 4203) or stay away (close 4005).
        reconnect: bool,
    },
    /// End the user's subscriptions to `channel` (`unsubscribed` with reason `server`).
    Unsubscribe {
        /// The token subject.
        user: String,
        /// The channel.
        channel: Channel,
    },
}

impl UserCommand {
    /// The user the command is for.
    pub fn user(&self) -> &str {
        match self {
            UserCommand::Disconnect { user, .. } | UserCommand::Unsubscribe { user, .. } => user,
        }
    }
}
