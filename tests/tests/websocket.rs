//! WebSocket against a real server: subscribe/publish, resume with `since`, resets, auth at
//! upgrade, bad input, close codes, slow consumers and shutdown.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use resync_actix::jwt;
use resync_protocol::{
    ClientFrame, CloseCode, ErrorCode, Payload, RecoveryOutcome, ResetReason, ServerFrame,
};
use resync_tests::{TestServer, WsClient, WsRead};

#[tokio::test]
async fn subscribe_receive_then_resume_with_since() {
    let server = TestServer::start(|_| {});
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    assert!(matches!(
        client.subscribe("room", None).await,
        RecoveryOutcome::Fresh { .. }
    ));
    server.publish_many("room", 0..3).await;
    let mut last = None;
    for expected in 1..=3 {
        let position = client.next_event("room").await;
        assert_eq!(position.seq.get(), expected);
        last = Some(position);
    }
    drop(client);
    server.wait_for_subscribers("room", 0).await;

    server.publish_many("room", 3..8).await;
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    assert_eq!(
        client.subscribe("room", last).await,
        RecoveryOutcome::Replayed { count: 5 }
    );
    server.publish_many("room", 8..10).await;
    for expected in 4..=10 {
        assert_eq!(client.next_event("room").await.seq.get(), expected);
    }
}

#[tokio::test]
async fn trimmed_history_is_a_reset() {
    let server = TestServer::start(|settings| settings.history_size = 3);
    let first = server.publish("trim", serde_json::json!(0)).await;
    server.publish_many("trim", 1..10).await;
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    match client.subscribe("trim", Some(first)).await {
        RecoveryOutcome::Reset { reason, position } => {
            assert_eq!(reason, ResetReason::Truncated);
            assert_eq!(position.seq.get(), 10);
        }
        other => panic!("expected a reset, got {other:?}"),
    }
}

#[tokio::test]
async fn many_channels_over_one_socket_and_unsubscribe() {
    let server = TestServer::start(|_| {});
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    client.subscribe("x", None).await;
    client.subscribe("y", None).await;
    server.publish("x", serde_json::json!(1)).await;
    server.publish("y", serde_json::json!(1)).await;
    // Order is guaranteed per channel, not across channels: collect both.
    let mut seen = Vec::new();
    for _ in 0..2 {
        match client.frame().await {
            ServerFrame::Event(event) => {
                seen.push((event.channel.to_string(), event.position.seq.get()))
            }
            other => panic!("expected an event, got {other:?}"),
        }
    }
    seen.sort();
    assert_eq!(seen, [("x".to_owned(), 1), ("y".to_owned(), 1)]);
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Unsubscribe {
            id,
            channel: "x".parse().unwrap(),
        })
        .await;
    assert!(matches!(
        client.frame().await,
        ServerFrame::Unsubscribed { .. }
    ));
    server.wait_for_subscribers("x", 0).await;
    assert_eq!(server.subscribers("y").await, 1);
    // Subscribing twice is an error that names the request.
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Subscribe {
            id,
            channel: "y".parse().unwrap(),
            since: None,
            presence: None,
            join_leave: false,
            state: false,
        })
        .await;
    match client.frame().await {
        ServerFrame::Error {
            id: Some(reply),
            code,
            ..
        } => {
            assert_eq!(reply, id);
            assert_eq!(code, ErrorCode::AlreadySubscribed);
        }
        other => panic!("expected an error, got {other:?}"),
    }
}

fn token(exp_in_seconds: u64, subscribe: &[&str], publish: &[&str]) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + exp_in_seconds;
    jwt::sign(
        &jwt::Claims {
            sub: Some("tester".into()),
            exp,
            subscribe: subscribe
                .iter()
                .map(|pattern| (*pattern).to_owned())
                .collect(),
            publish: publish
                .iter()
                .map(|pattern| (*pattern).to_owned())
                .collect(),
            ..Default::default()
        },
        resync_tests::JWT_SECRET.as_bytes(),
    )
}

#[tokio::test]
async fn credentials_are_checked_at_upgrade_and_per_channel() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(resync_tests::JWT_SECRET.into());
        settings.anonymous_subscribe = Some(vec!["public:*".into()]);
    });
    // A bad token gets a plain HTTP 401 before any WebSocket handshake.
    assert_eq!(
        WsClient::connect(&server.ws_url("?token=not-a-jwt"))
            .await
            .err(),
        Some(401)
    );
    let forged = jwt::sign(
        &jwt::Claims {
            exp: u64::MAX / 2,
            ..Default::default()
        },
        b"wrong-secret",
    );
    assert_eq!(
        WsClient::connect(&server.ws_url(&format!("?token={forged}")))
            .await
            .err(),
        Some(401)
    );

    // Anonymous connections are let in (they may follow `public:*`) but not to `chat:1`.
    let mut anonymous = WsClient::connect_ready(&server.ws_url("")).await;
    let id = anonymous.next_request_id();
    anonymous
        .send(&ClientFrame::Subscribe {
            id,
            channel: "chat:1".parse().unwrap(),
            since: None,
            presence: None,
            join_leave: false,
            state: false,
        })
        .await;
    assert!(matches!(
        anonymous.frame().await,
        ServerFrame::Error {
            code: ErrorCode::Forbidden,
            ..
        }
    ));

    let token = token(600, &["chat:*"], &["chat:*"]);
    let mut client = WsClient::connect_ready(&server.ws_url(&format!("?token={token}"))).await;
    client.subscribe("chat:1", None).await;
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Publish {
            id,
            channel: "chat:1".parse().unwrap(),
            data: Payload::from_json("{\"text\":\"hi\"}").unwrap(),
            idempotency_key: None,
        })
        .await;
    // The publish reply and the event itself both arrive, in either order.
    let mut got_reply = false;
    let mut got_event = false;
    while !(got_reply && got_event) {
        match client.frame().await {
            ServerFrame::Published { id: reply, .. } if reply == id => got_reply = true,
            ServerFrame::Event(event) => {
                assert_eq!(event.data.as_str(), "{\"text\":\"hi\"}");
                got_event = true;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Publish {
            id,
            channel: "news".parse().unwrap(),
            data: Payload::from_json("1").unwrap(),
            idempotency_key: None,
        })
        .await;
    assert!(matches!(
        client.frame().await,
        ServerFrame::Error {
            code: ErrorCode::Forbidden,
            ..
        }
    ));
    assert!(server.metric("resync_auth_failures_total").await >= 2);
}

#[tokio::test]
async fn an_expiring_token_closes_with_refresh_code() {
    let server =
        TestServer::start(|settings| settings.jwt_secret = Some(resync_tests::JWT_SECRET.into()));
    let token = token(1, &["*"], &[]);
    let mut client = WsClient::connect_ready(&server.ws_url(&format!("?token={token}"))).await;
    client.subscribe("a", None).await;
    match client.read().await {
        WsRead::Closed(code) => assert_eq!(code, Some(CloseCode::TOKEN_EXPIRED)),
        other => panic!("expected a close, got {other:?}"),
    }
}

#[tokio::test]
async fn malformed_frames_get_errors_and_oversize_messages_close_1009() {
    let server = TestServer::start(|settings| settings.max_message_bytes = 1024);
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    for (bad, expected) in [
        ("not json", ErrorCode::MalformedFrame),
        (r#"{"type":"teleport"}"#, ErrorCode::MalformedFrame),
        (
            r#"{"type":"subscribe","id":1,"channel":"bad name"}"#,
            ErrorCode::InvalidChannel,
        ),
    ] {
        client.send_text(bad.to_owned()).await;
        match client.frame().await {
            ServerFrame::Error { code, .. } => assert_eq!(code, expected, "{bad}"),
            other => panic!("{bad}: expected an error, got {other:?}"),
        }
    }
    // The connection still works after bad frames.
    client.subscribe("ok", None).await;
    client
        .send_text(format!(r#"{{"type":"pong","pad":"{}"}}"#, "x".repeat(4096)))
        .await;
    match client.read().await {
        WsRead::Closed(code) => assert_eq!(code, Some(CloseCode::MESSAGE_TOO_BIG)),
        other => panic!("expected close 1009, got {other:?}"),
    }
}

#[tokio::test]
async fn fragmented_messages_are_joined_and_text_that_is_not_utf8_closes_4000() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let server = TestServer::start(|_| {});
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    // A subscribe request in three frames, with a ping between two of them, as RFC 6455
    // allows: the server joins the fragments and answers the ping.
    let request = r#"{"type":"subscribe","id":7,"channel":"fragmented"}"#.as_bytes();
    let frames = [
        Frame::message(request[..10].to_vec(), OpCode::Data(Data::Text), false),
        Frame::message(
            request[10..30].to_vec(),
            OpCode::Data(Data::Continue),
            false,
        ),
        Frame::message(request[30..].to_vec(), OpCode::Data(Data::Continue), true),
    ];
    for (index, frame) in frames.into_iter().enumerate() {
        client.stream.send(Message::Frame(frame)).await.unwrap();
        if index == 1 {
            client
                .stream
                .send(Message::Ping(b"mid".to_vec().into()))
                .await
                .unwrap();
        }
    }
    match client.frame().await {
        ServerFrame::Subscribed { id, channel, .. } => {
            assert_eq!((id, channel.as_str()), (7, "fragmented"));
        }
        other => panic!("expected subscribed, got {other:?}"),
    }
    server.publish("fragmented", serde_json::json!(1)).await;
    assert_eq!(client.next_event("fragmented").await.seq.get(), 1);

    let not_utf8 = Frame::message(vec![b'"', 0xff, 0xfe, b'"'], OpCode::Data(Data::Text), true);
    client.stream.send(Message::Frame(not_utf8)).await.unwrap();
    match client.read().await {
        WsRead::Closed(code) => assert_eq!(code, Some(CloseCode::PROTOCOL_VIOLATION)),
        other => panic!("expected close 4000, got {other:?}"),
    }
}

#[tokio::test]
async fn a_fragmented_message_over_the_limit_closes_1009() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::protocol::frame::Frame;
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

    let server = TestServer::start(|settings| settings.max_message_bytes = 1024);
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    // Each fragment is under the limit; together they are not.
    let fragments = [
        Frame::message(vec![b' '; 600], OpCode::Data(Data::Text), false),
        Frame::message(vec![b' '; 600], OpCode::Data(Data::Continue), false),
        Frame::message(vec![b' '; 600], OpCode::Data(Data::Continue), true),
    ];
    for fragment in fragments {
        if client.stream.send(Message::Frame(fragment)).await.is_err() {
            break;
        }
    }
    match client.read().await {
        WsRead::Closed(code) => assert_eq!(code, Some(CloseCode::MESSAGE_TOO_BIG)),
        other => panic!("expected close 1009, got {other:?}"),
    }
}

#[tokio::test]
async fn silent_clients_are_closed_by_the_heartbeat() {
    let server = TestServer::start(|settings| settings.ping_interval_secs = 1);
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    // Read raw frames without answering pings.
    let started = std::time::Instant::now();
    let code = loop {
        use futures_util::StreamExt;
        match tokio::time::timeout(Duration::from_secs(10), client.stream.next())
            .await
            .unwrap()
        {
            Some(Ok(tokio_tungstenite::tungstenite::Message::Close(close))) => {
                break close.map(|close| u16::from(close.code));
            }
            Some(Ok(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    };
    assert_eq!(code, Some(CloseCode::HEARTBEAT_TIMEOUT.0));
    // Two intervals of silence (2 s) by the server's clock, which started a moment before
    // ours: more than one interval is the claim that cannot race.
    assert!(
        started.elapsed() >= Duration::from_millis(1_500),
        "closed only after two silent intervals, not one"
    );
}

#[tokio::test]
async fn a_stuck_client_is_cut_off_with_bounded_memory_and_resumes_without_loss() {
    let server = TestServer::start(|settings| {
        settings.subscriber_queue = 16;
        settings.write_timeout_secs = 1;
        settings.max_body_bytes = 256 * 1024;
        // History must hold all ~40 MB for the resume to be a replay (the default byte
        // budget, 16 MiB a channel, would make it a `truncated` reset).
        settings.history_max_bytes_per_channel = 64 * 1024 * 1024;
        settings.history_max_bytes = 128 * 1024 * 1024;
    });
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    client.subscribe("firehose", None).await;
    // The client stops reading while a fast publisher sends ~40 MB, far more than socket
    // buffers hold.
    let big = "x".repeat(64 * 1024);
    let mut last = None;
    for value in 0..600u64 {
        last = Some(
            server
                .publish("firehose", serde_json::json!({ "n": value, "pad": big }))
                .await,
        );
    }
    // The server let go of the stuck client: its subscription is gone and it was counted.
    server.wait_for_subscribers("firehose", 0).await;
    assert!(
        server
            .metric("resync_slow_consumer_closes_total{transport=\"websocket\"}")
            .await
            >= 1
    );

    // The client reads what reached it, then resumes from its last event: nothing is lost.
    let mut last_seen = 0;
    loop {
        match client.read().await {
            WsRead::Frame(ServerFrame::Event(event)) => {
                assert_eq!(event.position.seq.get(), last_seen + 1, "in order, no gap");
                last_seen = event.position.seq.get();
            }
            WsRead::Frame(other) => panic!("unexpected {other:?}"),
            WsRead::Closed(code) => {
                assert!(
                    matches!(code, None | Some(CloseCode::SLOW_CONSUMER)),
                    "{code:?}"
                );
                break;
            }
        }
    }
    assert!(
        last_seen < 600,
        "the stuck client cannot have received everything"
    );
    let last = last.unwrap();
    let mut resumed = WsClient::connect_ready(&server.ws_url("")).await;
    let since =
        resync_protocol::Position::new(last.epoch.clone(), resync_protocol::Seq::new(last_seen));
    assert_eq!(
        resumed.subscribe("firehose", Some(since)).await,
        RecoveryOutcome::Replayed {
            count: 600 - last_seen
        }
    );
    for expected in last_seen + 1..=600 {
        assert_eq!(resumed.next_event("firehose").await.seq.get(), expected);
    }
}

#[tokio::test]
async fn shutdown_closes_with_the_reconnect_code() {
    let server = TestServer::start(|_| {});
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    client.subscribe("s", None).await;
    server.server.resync.shutdown();
    match client.read().await {
        WsRead::Closed(code) => assert_eq!(code, Some(CloseCode::SHUTDOWN)),
        other => panic!("expected close 4200, got {other:?}"),
    }
    assert_eq!(WsClient::connect(&server.ws_url("")).await.err(), Some(503));
}
