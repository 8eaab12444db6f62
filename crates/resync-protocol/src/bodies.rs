//! The JSON bodies outside the WebSocket frames: the data of the SSE `subscribed` and `reset`
//! events, the long-poll reply, and the HTTP API's requests and replies. The server writes
//! them with these types, the Rust client and the tests read them with the same ones, and
//! `docs/protocol.md` describes them for clients in other languages.
//!
//! The long-poll reply and the history reply have hand-written encoders
//! ([`PollReply::encode`], [`HistoryReply::encode_replayed`]) that splice event frames
//! already encoded at publish time; `tests/properties.rs` checks that they decode back to
//! the same replies as the types' own serde forms.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::{Channel, Cursor, IdempotencyKey, Payload, Position, RecoveryOutcome, ResetReason};

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

/// A long-poll reply: the events (each an `event` frame, as on WebSocket), the resets, and
/// the cursor to send with the next poll.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PollReply {
    /// `event` frames, oldest first per channel.
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
    /// The event's data, any JSON value (validated once, as the body is read).
    pub data: Payload,
    /// Makes a retried publish store once (the `Idempotency-Key` header does the same).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<IdempotencyKey>,
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
