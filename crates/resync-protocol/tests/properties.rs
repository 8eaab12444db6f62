//! Property tests: every frame, cursor and SSE event survives a round trip, and no decoder
//! panics on arbitrary input.

use proptest::prelude::*;
use resync_protocol::bodies::{
    DisconnectNotice, DisconnectRequest, HistoryOutcome, HistoryReply, PollNotices, PollPresence,
    PollReply, PresenceLaggedNotice, ProxyAnswer, ProxyRequest, ResetNotice, SseOpening,
    UnsubscribeRequest, UnsubscribedNotice,
};
use resync_protocol::sse::{SseFrame, SseParser};
use resync_protocol::{
    Channel, ClientFrame, Cursor, Epoch, ErrorCode, Event, IdempotencyKey, Key, Member, Payload,
    Position, PresenceRequest, RecoveryOutcome, ResetReason, Seq, ServerFrame, StateEntry,
    UnsubscribeReason,
};

fn channel() -> impl Strategy<Value = Channel> {
    "[A-Za-z0-9_.:@/-]{1,40}"
        .prop_map(|name| Channel::new(name).expect("strategy makes valid names"))
}

fn epoch() -> impl Strategy<Value = Epoch> {
    "[A-Za-z0-9]{1,32}".prop_map(|text| Epoch::new(text).expect("strategy makes valid epochs"))
}

fn position() -> impl Strategy<Value = Position> {
    (epoch(), any::<u64>()).prop_map(|(epoch, seq)| Position::new(epoch, Seq::new(seq)))
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>()
            .prop_filter("finite", |number| number.is_finite())
            .prop_map(serde_json::Value::from),
        any::<String>().prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(any::<String>(), inner, 0..6)
                .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
        ]
    })
}

fn payload() -> impl Strategy<Value = Payload> {
    (json_value(), any::<bool>()).prop_map(|(value, pretty)| {
        let text = if pretty {
            serde_json::to_string_pretty(&value)
        } else {
            serde_json::to_string(&value)
        }
        .expect("values serialize");
        Payload::from_json(text).expect("serde output is valid json")
    })
}

fn reset_reason() -> impl Strategy<Value = ResetReason> {
    prop_oneof![
        Just(ResetReason::EpochChanged),
        Just(ResetReason::Truncated),
        Just(ResetReason::TooFarBehind),
        Just(ResetReason::PositionAhead),
        Just(ResetReason::BadCursor),
        Just(ResetReason::Unknown),
    ]
}

fn error_code() -> impl Strategy<Value = ErrorCode> {
    prop_oneof![
        Just(ErrorCode::BadRequest),
        Just(ErrorCode::MalformedFrame),
        Just(ErrorCode::InvalidChannel),
        Just(ErrorCode::UnknownChannel),
        Just(ErrorCode::BadCursor),
        Just(ErrorCode::Unauthorized),
        Just(ErrorCode::Forbidden),
        Just(ErrorCode::TooManyChannels),
        Just(ErrorCode::Unavailable),
        Just(ErrorCode::PresenceInfoTooLarge),
        Just(ErrorCode::Unknown),
    ]
}

fn recovery() -> impl Strategy<Value = RecoveryOutcome> {
    prop_oneof![
        position().prop_map(|position| RecoveryOutcome::Fresh { position }),
        position().prop_map(|position| RecoveryOutcome::State { position }),
        any::<u64>().prop_map(|count| RecoveryOutcome::Replayed { count }),
        Just(RecoveryOutcome::UpToDate),
        (reset_reason(), position())
            .prop_map(|(reason, position)| RecoveryOutcome::Reset { reason, position }),
    ]
}

fn client_frame() -> impl Strategy<Value = ClientFrame> {
    prop_oneof![
        (
            any::<u64>(),
            channel(),
            proptest::option::of(position()),
            proptest::option::of(proptest::option::of(payload())),
            any::<bool>(),
            any::<bool>()
        )
            .prop_map(|(id, channel, since, presence, join_leave, state)| {
                ClientFrame::Subscribe {
                    id,
                    channel,
                    since,
                    presence: presence.map(|info| PresenceRequest { info }),
                    join_leave,
                    state,
                }
            }),
        (any::<u64>(), channel())
            .prop_map(|(id, channel)| ClientFrame::Unsubscribe { id, channel }),
        (any::<u64>(), channel()).prop_map(|(id, channel)| ClientFrame::Presence { id, channel }),
        (any::<u64>(), channel())
            .prop_map(|(id, channel)| ClientFrame::PresenceCount { id, channel }),
        (
            any::<u64>(),
            channel(),
            payload(),
            proptest::option::of("[!-~]{1,128}")
        )
            .prop_map(|(id, channel, data, key)| ClientFrame::Publish {
                id,
                channel,
                data,
                idempotency_key: key.map(|key| IdempotencyKey::new(key).expect("valid key")),
            }),
        Just(ClientFrame::Pong),
        (any::<u64>(), "[A-Za-z0-9._-]{1,64}")
            .prop_map(|(id, token)| ClientFrame::Refresh { id, token }),
    ]
}

fn member() -> impl Strategy<Value = Member> {
    ("[a-z:0-9]{1,24}", proptest::option::of(payload())).prop_map(|(id, info)| Member { id, info })
}

fn event() -> impl Strategy<Value = Event> {
    (
        channel(),
        position(),
        proptest::option::of("[A-Za-z0-9_.:@/-]{1,64}"),
        payload(),
    )
        .prop_map(|(channel, position, key, data)| Event {
            channel,
            position,
            key: key.map(|key| Key::new(key).expect("valid key")),
            data,
        })
}

fn server_frame() -> impl Strategy<Value = ServerFrame> {
    prop_oneof![
        (
            any::<String>(),
            any::<u64>(),
            any::<u32>(),
            any::<Option<u64>>()
        )
            .prop_map(|(client_id, ping_interval_ms, protocol, expires_at)| {
                ServerFrame::Connected {
                    client_id,
                    ping_interval_ms,
                    protocol,
                    expires_at,
                }
            }),
        (any::<u64>(), channel(), recovery()).prop_map(|(id, channel, recovery)| {
            ServerFrame::Subscribed {
                id,
                channel,
                recovery,
            }
        }),
        (
            any::<u64>(),
            channel(),
            prop::option::of(prop_oneof![
                Just(UnsubscribeReason::Permission),
                Just(UnsubscribeReason::Server)
            ])
        )
            .prop_map(|(id, channel, reason)| ServerFrame::Unsubscribed {
                id,
                channel,
                reason
            }),
        (any::<u64>(), any::<Option<u64>>())
            .prop_map(|(id, expires_at)| ServerFrame::Refreshed { id, expires_at }),
        (any::<u64>(), channel(), position()).prop_map(|(id, channel, position)| {
            ServerFrame::Published {
                id,
                channel,
                position,
            }
        }),
        event().prop_map(ServerFrame::Event),
        (channel(), reset_reason(), position()).prop_map(|(channel, reason, position)| {
            ServerFrame::Reset {
                channel,
                reason,
                position,
            }
        }),
        (
            proptest::option::of(any::<u64>()),
            error_code(),
            any::<String>()
        )
            .prop_map(|(id, code, message)| ServerFrame::Error { id, code, message }),
        (
            any::<u64>(),
            channel(),
            prop::collection::vec(member(), 0..4),
            any::<bool>()
        )
            .prop_map(|(id, channel, members, more)| ServerFrame::Presence {
                id,
                channel,
                members,
                more
            }),
        (any::<u64>(), channel(), any::<u64>())
            .prop_map(|(id, channel, count)| ServerFrame::PresenceCount { id, channel, count }),
        (
            channel(),
            prop::collection::vec(
                (
                    "[A-Za-z0-9_.:@/-]{1,32}",
                    any::<u64>(),
                    proptest::option::of(payload())
                ),
                0..4
            ),
            position(),
            any::<bool>()
        )
            .prop_map(|(channel, entries, position, more)| ServerFrame::State {
                channel,
                entries: entries
                    .into_iter()
                    .map(|(key, seq, data)| StateEntry {
                        key: Key::new(key).expect("valid key"),
                        seq: Seq::new(seq),
                        // A keyed value is never `null`: that is a deleted key.
                        data: data.filter(|data| data.as_str() != "null"),
                    })
                    .collect(),
                position,
                more
            }),
        (channel(), member()).prop_map(|(channel, member)| ServerFrame::Join { channel, member }),
        (channel(), member()).prop_map(|(channel, member)| ServerFrame::Leave { channel, member }),
        Just(ServerFrame::Ping),
    ]
}

fn cursor() -> impl Strategy<Value = Cursor> {
    prop::collection::vec((channel(), position()), 0..8)
        .prop_map(|entries| entries.into_iter().collect())
}

fn reset_notice() -> impl Strategy<Value = ResetNotice> {
    (channel(), reset_reason(), position()).prop_map(|(channel, reason, position)| ResetNotice {
        channel,
        reason,
        position,
    })
}

fn unsubscribed_notice() -> impl Strategy<Value = UnsubscribedNotice> {
    (
        channel(),
        prop_oneof![
            Just(UnsubscribeReason::Server),
            Just(UnsubscribeReason::Permission)
        ],
    )
        .prop_map(|(channel, reason)| UnsubscribedNotice { channel, reason })
}

fn disconnect_notice() -> impl Strategy<Value = DisconnectNotice> {
    ("\\PC{0,40}", any::<bool>())
        .prop_map(|(reason, reconnect)| DisconnectNotice { reason, reconnect })
}

fn proxy_request() -> impl Strategy<Value = ProxyRequest> {
    let user = prop::option::of("[a-z0-9]{1,12}");
    prop_oneof![
        (user.clone(), prop::option::of("[A-Za-z0-9._-]{1,40}"))
            .prop_map(|(user, token)| ProxyRequest::Connect { user, token }),
        (user.clone(), "[A-Za-z0-9._-]{1,40}")
            .prop_map(|(user, token)| ProxyRequest::Refresh { user, token }),
        (user.clone(), channel())
            .prop_map(|(user, channel)| ProxyRequest::Subscribe { user, channel }),
        (user, channel(), payload()).prop_map(|(user, channel, data)| ProxyRequest::Publish {
            user,
            channel,
            data
        }),
    ]
}

fn proxy_answer() -> impl Strategy<Value = ProxyAnswer> {
    let patterns = prop::option::of(prop::collection::vec("[a-z:*]{1,10}", 0..3));
    (
        prop::option::of("\\PC{0,20}"),
        prop::option::of("[a-z0-9]{1,12}"),
        patterns.clone(),
        patterns,
        prop::option::of(payload()),
        prop::option::of(payload()),
    )
        .prop_map(|(deny, user, subscribe, publish, info, data)| ProxyAnswer {
            deny,
            user,
            subscribe,
            publish,
            info,
            data,
        })
}

proptest! {
    #[test]
    fn sse_openings_and_resets_round_trip(
        outcomes in prop::collection::btree_map(channel(), recovery(), 0..6),
        reset in reset_notice(),
    ) {
        let opening = SseOpening { channels: outcomes };
        let text = serde_json::to_string(&opening).unwrap();
        prop_assert_eq!(serde_json::from_str::<SseOpening>(&text).unwrap(), opening);
        prop_assert_eq!(serde_json::from_str::<ResetNotice>(&reset.to_json()).unwrap(), reset);
    }

    #[test]
    fn hand_written_poll_replies_decode_as_the_type(
        events in prop::collection::vec(event(), 0..6),
        resets in prop::collection::vec(reset_notice(), 0..4),
        cursor in cursor(),
        presence in prop::option::of((
            "[a-z0-9\"\\\\]{0,40}",
            prop::collection::vec(("[a-z]{1,8}", "\\PC{0,12}"), 0..4),
        )),
        unsubscribed in prop::collection::vec(unsubscribed_notice(), 0..3),
        disconnect in prop::option::of(disconnect_notice()),
    ) {
        let frames: Vec<String> = events.iter().map(Event::encode_frame).collect();
        let presence_frames: Vec<String> = presence.iter().flat_map(|(_, members)| members).map(|(id, info)| {
            serde_json::json!({"type": "join", "channel": "c", "member": {"id": id, "info": info}}).to_string()
        }).collect();
        let part = presence.as_ref().map(|(session, _)| PollPresence { session, frames: &presence_frames });
        let state_after = vec!["c|e1:4|order/7".to_owned()];
        let notices = PollNotices { unsubscribed: &unsubscribed, disconnect: disconnect.as_ref(), state_after: &state_after };
        let body = PollReply::encode(frames.iter().map(String::as_bytes), &resets, &cursor, part, notices);
        let reply: PollReply = serde_json::from_slice(&body).unwrap();
        prop_assert_eq!(&reply.unsubscribed, &unsubscribed);
        prop_assert_eq!(&reply.disconnect, &disconnect);
        prop_assert_eq!(&reply.state_after, &state_after);
        let decoded: Vec<&str> = reply.events.iter().map(|raw| raw.get()).collect();
        prop_assert_eq!(decoded, frames.iter().map(String::as_str).collect::<Vec<_>>());
        prop_assert_eq!(reply.resets, resets);
        prop_assert_eq!(reply.cursor, cursor);
        prop_assert_eq!(reply.presence_session.as_deref(), presence.as_ref().map(|(session, _)| session.as_str()));
        let decoded: Vec<&str> = reply.presence.iter().map(|raw| raw.get()).collect();
        prop_assert_eq!(decoded, presence_frames.iter().map(String::as_str).collect::<Vec<_>>());
    }

    #[test]
    fn notices_and_request_bodies_round_trip(
        unsubscribed in unsubscribed_notice(),
        disconnect in disconnect_notice(),
        lagged in (channel(), "\\PC{0,40}"),
        reason in prop::option::of("\\PC{0,40}"),
        reconnect in any::<bool>(),
        proxy in proxy_request(),
        answer in proxy_answer(),
    ) {
        let channel = unsubscribed.channel.clone();
        prop_assert_eq!(serde_json::from_str::<UnsubscribedNotice>(&unsubscribed.to_json()).unwrap(), unsubscribed);
        prop_assert_eq!(serde_json::from_str::<DisconnectNotice>(&disconnect.to_json()).unwrap(), disconnect);
        let lagged = PresenceLaggedNotice { channel: lagged.0, message: lagged.1 };
        prop_assert_eq!(serde_json::from_str::<PresenceLaggedNotice>(&lagged.to_json()).unwrap(), lagged);
        let request = DisconnectRequest { reason, reconnect };
        let text = serde_json::to_string(&request).unwrap();
        prop_assert_eq!(serde_json::from_str::<DisconnectRequest>(&text).unwrap(), request);
        let request = UnsubscribeRequest { channel };
        let text = serde_json::to_string(&request).unwrap();
        prop_assert_eq!(serde_json::from_str::<UnsubscribeRequest>(&text).unwrap(), request);
        let text = serde_json::to_string(&proxy).unwrap();
        prop_assert_eq!(serde_json::from_str::<ProxyRequest>(&text).unwrap(), proxy);
        let text = serde_json::to_string(&answer).unwrap();
        prop_assert_eq!(serde_json::from_str::<ProxyAnswer>(&text).unwrap(), answer);
    }

    #[test]
    fn hand_written_history_replies_decode_as_the_type(
        events in prop::collection::vec(event(), 0..6),
        latest in position(),
    ) {
        let frames: Vec<String> = events.iter().map(Event::encode_frame).collect();
        let body = HistoryReply::encode_replayed(frames.iter().map(String::as_bytes), &latest);
        let reply: HistoryReply = serde_json::from_slice(&body).unwrap();
        prop_assert_eq!(reply.outcome, HistoryOutcome::Replayed);
        prop_assert_eq!(reply.reason, None);
        let decoded: Vec<&str> = reply.events.iter().map(|raw| raw.get()).collect();
        prop_assert_eq!(decoded, frames.iter().map(String::as_str).collect::<Vec<_>>());
        prop_assert_eq!(reply.latest, latest);
    }

    #[test]
    fn client_frames_round_trip(frame in client_frame()) {
        let encoded = frame.encode();
        prop_assert_eq!(ClientFrame::decode(encoded.as_bytes())?, frame);
    }

    #[test]
    fn server_frames_round_trip(frame in server_frame()) {
        let encoded = frame.encode();
        prop_assert!(!encoded.contains('\n'), "frames are one line: {}", encoded);
        prop_assert_eq!(ServerFrame::decode(encoded.as_bytes())?, frame);
    }

    #[test]
    fn hand_written_event_encoding_equals_serde(event in event()) {
        let fast: serde_json::Value = serde_json::from_str(&event.encode_frame()).expect("valid json");
        let slow = serde_json::to_value(ServerFrameForSerde(&event)).expect("serializes");
        prop_assert_eq!(fast, slow);
    }

    #[test]
    fn payloads_keep_their_value(value in json_value()) {
        let pretty = serde_json::to_string_pretty(&value).expect("serializes");
        let compact = serde_json::to_string(&value).expect("serializes");
        let payload = Payload::from_json(pretty)?;
        // Compare through the same parser: serde_json's float parsing is not exact, ours is
        // not the thing under test.
        let back: serde_json::Value = payload.parse()?;
        let expected: serde_json::Value = serde_json::from_str(&compact).expect("parses");
        prop_assert_eq!(back, expected);
    }

    #[test]
    fn cursors_round_trip(cursor in cursor()) {
        let text = cursor.to_string();
        prop_assert_eq!(Cursor::parse(&text)?, cursor);
    }

    #[test]
    fn cursor_fast_paths_agree_with_the_general_ones(
        cursor in cursor(),
        moves in prop::collection::vec((channel(), position()), 0..8),
    ) {
        let mut written = Vec::new();
        cursor.write_to(&mut written);
        prop_assert_eq!(String::from_utf8(written).expect("utf-8"), cursor.to_string());
        let (mut advanced, mut set) = (cursor.clone(), cursor);
        for (channel, position) in moves {
            advanced.advance(&channel, &position);
            set.set(channel, position);
        }
        prop_assert_eq!(advanced, set);
    }

    #[test]
    fn positions_round_trip(position in position()) {
        prop_assert_eq!(position.to_string().parse::<Position>()?, position);
    }

    #[test]
    fn sse_frames_round_trip_through_the_parser(
        id in proptest::option::of("[ -~]{0,40}"),
        event_name in proptest::option::of("[a-z]{1,12}"),
        data in "[ -~\n]{0,200}",
        retry_ms in proptest::option::of(any::<u32>()),
        split in any::<prop::sample::Index>(),
    ) {
        let frame = SseFrame {
            id: id.as_deref(),
            event: event_name.as_deref(),
            data: &data,
            retry_ms: retry_ms.map(u64::from),
        };
        let bytes = frame.encode();
        // Feed in two chunks split at an arbitrary byte, as a network would.
        let cut = split.index(bytes.len() + 1);
        let mut parser = SseParser::new();
        let mut messages = parser.feed(&bytes[..cut])?;
        messages.extend(parser.feed(&bytes[cut..])?);
        prop_assert_eq!(messages.len(), 1);
        let message = &messages[0];
        prop_assert_eq!(&message.data, &data);
        prop_assert_eq!(&message.event, event_name.as_deref().unwrap_or("message"));
        prop_assert_eq!(&message.last_event_id, id.as_deref().unwrap_or(""));
        prop_assert_eq!(message.retry_ms, retry_ms.map(u64::from));
    }

    #[test]
    fn decoders_never_panic_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = ClientFrame::decode(&bytes);
        let _ = ServerFrame::decode(&bytes);
        let _ = Payload::from_slice(&bytes);
        let text = String::from_utf8_lossy(&bytes);
        let _ = Cursor::parse(&text);
        let _ = text.parse::<Position>();
        let _ = Channel::new(&*text);
        let _ = Epoch::new(&*text);
        let _ = IdempotencyKey::new(&*text);
        let _ = SseParser::new().feed(&bytes);
    }

    #[test]
    fn decoders_never_panic_on_json_shaped_input(
        kind in prop_oneof![Just("subscribe".to_owned()), Just("publish".to_owned()), Just("event".to_owned()), Just("subscribed".to_owned()), Just("error".to_owned()), "[a-z]{0,8}"],
        fields in prop::collection::vec(("[a-z_]{1,16}", json_value()), 0..6),
    ) {
        let mut object = serde_json::Map::new();
        object.insert("type".to_owned(), kind.into());
        for (name, value) in fields {
            object.insert(name, value);
        }
        let bytes = serde_json::to_vec(&object).expect("serializes");
        let _ = ClientFrame::decode(&bytes);
        let _ = ServerFrame::decode(&bytes);
    }
}

/// Serializes an event frame through serde's derive, the slow reference path.
struct ServerFrameForSerde<'a>(&'a Event);

impl serde::Serialize for ServerFrameForSerde<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        ServerFrame::Event(self.0.clone()).serialize(serializer)
    }
}
