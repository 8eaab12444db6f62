//! Issue 29, "one session under every transport": the defects seen from outside, each named
//! after its item (`defect_N_…`), and the contract a client written from `docs/protocol.md`
//! alone meets.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::time::{Duration, Instant};

use resync_protocol::{ClientFrame, PresenceRequest, ServerFrame};
use resync_tests::raw_ws::RawWs;
use resync_tests::{SseClient, TestServer, WsClient};

#[tokio::test]
async fn defect_5_a_silent_websocket_member_leaves_two_ping_intervals_after_its_last_byte() {
    let interval = Duration::from_secs(2);
    let server = TestServer::start(|settings| settings.ping_interval_secs = 2);
    let mut watcher = WsClient::connect_ready(&server.ws_url("")).await;
    watcher
        .send(&ClientFrame::Subscribe {
            id: 1,
            channel: "room".parse().unwrap(),
            since: None,
            presence: None,
            join_leave: true,
            state: false,
        })
        .await;
    // Watching before the member joins, so its join is seen.
    loop {
        match watcher.frame().await {
            ServerFrame::Subscribed { .. } => break,
            ServerFrame::Ping => watcher.send(&ClientFrame::Pong).await,
            _ => {}
        }
    }
    // A member that joins, then never sends a byte again (no pong, no close).
    let mut silent = RawWs::connect(server.server.addresses[0], "")
        .await
        .unwrap();
    let subscribe = ClientFrame::Subscribe {
        id: 1,
        channel: "room".parse().unwrap(),
        since: None,
        presence: Some(PresenceRequest { info: None }),
        join_leave: false,
        state: false,
    }
    .encode();
    silent
        .send(&RawWs::frame(
            0x81,
            subscribe.len() as u64,
            subscribe.as_bytes(),
        ))
        .await
        .unwrap();
    let last_byte = Instant::now();
    let mut joined = false;
    let left = loop {
        assert!(
            last_byte.elapsed() < Duration::from_secs(30),
            "the silent member never left (joined: {joined})"
        );
        match watcher.frame().await {
            ServerFrame::Ping => watcher.send(&ClientFrame::Pong).await,
            ServerFrame::Join { .. } => joined = true,
            ServerFrame::Leave { .. } => break last_byte.elapsed(),
            _ => {}
        }
    };
    assert!(joined, "the member's join was seen first");
    // Two intervals after its last byte, and the time the leave takes to arrive.
    assert!(
        left < interval * 2 + Duration::from_secs(1),
        "the silent member left {left:?} after its last byte (ping interval {interval:?})"
    );
    drop(silent);
}

/// The error a WebSocket request gets for `frame` (raw JSON text): its code and `id`.
async fn ws_error(client: &mut WsClient, frame: &str) -> (String, Option<u64>) {
    client.send_text(frame.to_owned()).await;
    loop {
        match client.frame().await {
            ServerFrame::Error { id, code, .. } => {
                let code = serde_json::to_value(code).unwrap();
                return (code.as_str().unwrap().to_owned(), id);
            }
            ServerFrame::Ping => client.send(&ClientFrame::Pong).await,
            other => panic!("expected an error for {frame}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn defects_7_8_11_a_refused_request_gets_the_documented_code_and_its_id() {
    let server = TestServer::start(|settings| settings.anonymous_publish = vec!["*".to_owned()]);
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    // Request × malformed field: the code the protocol document names, and the request's id.
    let table = [
        (
            r#"{"type":"subscribe","id":7,"channel":"bad channel"}"#,
            "invalid_channel",
        ),
        (
            r#"{"type":"subscribe","id":8,"channel":"news","since":{"epoch":"not an epoch!","seq":1}}"#,
            "bad_cursor",
        ),
        (
            r#"{"type":"subscribe","id":9,"channel":"news","since":{"epoch":"abc","seq":-1}}"#,
            "bad_cursor",
        ),
        (
            r#"{"type":"subscribe","id":10,"channel":"news","since":{"epoch":"abc","seq":"5"}}"#,
            "bad_cursor",
        ),
        (
            r#"{"type":"publish","id":11,"channel":"news","data":1,"idempotency_key":""}"#,
            "bad_request",
        ),
        (
            r#"{"type":"publish","id":12,"channel":"bad channel","data":1}"#,
            "invalid_channel",
        ),
        (
            r#"{"type":"subscribe","id":13,"channel":"news","colour":"blue"}"#,
            "malformed_frame",
        ),
        (r#"{"type":"subscribe","id":14}"#, "malformed_frame"),
        (
            r#"{"type":"unsubscribe","id":15,"channel":"a b"}"#,
            "invalid_channel",
        ),
    ];
    let mut wrong = Vec::new();
    for (frame, code) in table {
        let expected_id = serde_json::from_str::<serde_json::Value>(frame).unwrap()["id"].as_u64();
        let (got, id) = ws_error(&mut client, frame).await;
        if got != code || id != expected_id {
            wrong.push(format!(
                "{frame}: {got} with id {id:?} (expected {code} with {expected_id:?})"
            ));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    // An idempotency key is printable ASCII, the space included.
    client
        .send_text(
            r#"{"type":"publish","id":20,"channel":"news","data":1,"idempotency_key":"order 42"}"#
                .to_owned(),
        )
        .await;
    loop {
        match client.frame().await {
            ServerFrame::Published { id: 20, .. } => break,
            ServerFrame::Event(_) | ServerFrame::Ping => {}
            other => panic!("a key with a space: {other:?}"),
        }
    }
    // The API answers a channel with `/` in its path, and any unknown path, in JSON.
    server.publish("a/b", serde_json::json!(1)).await;
    let info = server.channel_info("a/b").await;
    assert_eq!(info["channel"], "a/b", "{info}");
    let missing = server
        .http
        .get(server.url("/api/nothing-here"))
        .bearer_auth(&server.server.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let body: serde_json::Value = missing.json().await.unwrap();
    assert!(
        body["code"].is_string() && body["message"].is_string(),
        "{body}"
    );
}

#[tokio::test]
async fn defect_9_with_token_keys_a_request_without_a_token_is_401_on_every_transport() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(resync_tests::JWT_SECRET.into());
    });
    assert_eq!(
        WsClient::connect(&server.ws_url("")).await.err(),
        Some(401),
        "a WebSocket upgrade without a token"
    );
    for path in ["/sse?channel=news", "/poll?channel=news"] {
        let status = server
            .http
            .get(server.url(path))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        assert_eq!(status, 401, "{path} without a token");
    }
    // Anonymous access is still there when asked for.
    let open = TestServer::start(|settings| {
        settings.jwt_secret = Some(resync_tests::JWT_SECRET.into());
        settings.anonymous_subscribe = Some(vec!["*".to_owned()]);
    });
    assert!(WsClient::connect(&open.ws_url("")).await.is_ok());
}

/// A Rust client over only `transport` for `user` (a token that may subscribe to anything).
fn user_client(
    server: &TestServer,
    transport: resync_client::TransportKind,
    user: &str,
) -> resync_client::Client {
    resync_client::Client::builder(&server.url(""))
        .transport(resync_client::TransportChoice::Only(transport))
        .backoff(resync_tests::fast_backoff())
        .heartbeat_grace(Duration::from_secs(1))
        .poll_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
        .token(resync_tests::user_token(user, &["*"]))
        .build()
        .unwrap()
}

#[tokio::test]
async fn defect_1_3_a_user_command_means_the_same_on_every_transport_of_the_rust_client() {
    use futures_util::StreamExt;
    use resync_client::{ConnectionState, TransportKind};
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(resync_tests::JWT_SECRET.into());
    });
    for transport in [
        TransportKind::WebSocket,
        TransportKind::Sse,
        TransportKind::LongPolling,
    ] {
        let user = format!("user-{}", transport.as_str());
        // Unsubscribe: the subscription ends, telling the application why.
        let client = user_client(&server, transport, &user);
        let mut feed = client.subscribe("feed".parse().unwrap());
        let mut other = client.subscribe("other".parse().unwrap());
        let mut state = client.state();
        let (feed_next, other_next) = (
            tokio::spawn(async move {
                let ended = tokio::time::timeout(Duration::from_secs(15), feed.next()).await;
                (ended, feed)
            }),
            tokio::spawn(async move {
                (
                    tokio::time::timeout(Duration::from_secs(3), other.next())
                        .await
                        .is_err(),
                    other,
                )
            }),
        );
        tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|state| matches!(state, ConnectionState::Connected { .. })),
        )
        .await
        .expect("connected")
        .unwrap();
        server.wait_for_subscribers("feed", 1).await;
        server
            .user_command(&user, "unsubscribe", serde_json::json!({"channel": "feed"}))
            .await;
        let (ended, _feed) = feed_next.await.unwrap();
        assert!(
            matches!(ended, Ok(Some(Err(_)))),
            "{transport:?}: the unsubscribed channel's subscription is told: {ended:?}"
        );
        let (other_quiet, _other) = other_next.await.unwrap();
        assert!(other_quiet, "{transport:?}: the other channel goes on");
        // Disconnect without coming back: the client stops for good.
        server
            .user_command(
                &user,
                "disconnect",
                serde_json::json!({"reason": "banned", "reconnect": false}),
            )
            .await;
        let closed = tokio::time::timeout(
            Duration::from_secs(10),
            state.wait_for(|state| matches!(state, ConnectionState::Closed { .. })),
        )
        .await
        .is_ok();
        assert!(
            closed,
            "{transport:?}: after a disconnect without reconnect the client is in {:?}",
            *state.borrow()
        );
    }
}

#[tokio::test]
async fn defect_2_an_sse_unsubscribe_gives_its_channel_back_to_the_budgets() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(resync_tests::JWT_SECRET.into());
        settings.max_subscriptions_per_user = 2;
    });
    let token = resync_tests::user_token("bea", &["*"]);
    let mut stream =
        resync_tests::SseClient::connect(&server, &format!("?channels=a,b&token={token}"), None)
            .await;
    assert_eq!(stream.status, 200);
    stream.next_event().await.unwrap();
    server
        .user_command("bea", "unsubscribe", serde_json::json!({"channel": "a"}))
        .await;
    loop {
        let message = stream.next_event().await.expect("the stream goes on");
        if message.event == "unsubscribed" {
            break;
        }
    }
    // The user follows one channel now: another subscribe of theirs fits the budget of two.
    let mut client = WsClient::connect_ready(&server.ws_url(&format!("?token={token}"))).await;
    client
        .send(&ClientFrame::Subscribe {
            id: 1,
            channel: "c".parse().unwrap(),
            since: None,
            presence: None,
            join_leave: false,
            state: false,
        })
        .await;
    let reply = client.frame().await;
    assert!(
        matches!(reply, ServerFrame::Subscribed { .. }),
        "the SSE stream still counted the channel it was unsubscribed from: {reply:?}"
    );
}

#[tokio::test]
async fn defect_3_long_polls_obey_user_commands_in_flight_and_between_polls() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(resync_tests::JWT_SECRET.into());
    });
    let token = resync_tests::user_token("cal", &["*"]);
    let poll = |query: String| {
        let request = server
            .http
            .get(server.url(&format!("/poll?{query}&token={token}")));
        async move {
            request
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()
        }
    };
    let first = poll("channels=x,y".to_owned()).await;
    let cursor = first["cursor"].as_str().unwrap().to_owned();
    // In flight: a poll waiting for events is answered at once with the unsubscribe.
    let waiting = tokio::spawn(poll(format!("channels=x,y&cursor={cursor}&timeout=30")));
    server.wait_for_subscribers("x", 1).await;
    server
        .user_command("cal", "unsubscribe", serde_json::json!({"channel": "x"}))
        .await;
    let reply = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("answered at once")
        .unwrap();
    assert_eq!(reply["unsubscribed"][0]["channel"], "x", "{reply}");
    // Between polls: a disconnect without reconnect ends the user's next polls.
    server
        .user_command("cal", "disconnect", serde_json::json!({"reconnect": false}))
        .await;
    let reply = poll(format!("channels=y&cursor={cursor}")).await;
    assert_eq!(reply["disconnect"]["reconnect"], false, "{reply}");
    assert!(reply["events"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn defect_10_the_longest_cursors_resume_and_an_unreadable_poll_cursor_resets() {
    let server = TestServer::start(|_| {});
    // The documented maximums: 128 channels of 128-byte names.
    let channels: Vec<String> = (0..128)
        .map(|index| format!("{index:03}{}", "n".repeat(125)))
        .collect();
    let query = format!("channels={}", channels.join(","));
    let poll = |query: String| {
        let request = server.http.get(server.url(&format!("/poll?{query}")));
        async move {
            let response = request.send().await.unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    let (status, first) = poll(query.clone()).await;
    assert_eq!(status, 200, "{first}");
    let cursor = first["cursor"].as_str().unwrap().to_owned();
    assert!(cursor.len() > 16 * 1024, "{} bytes", cursor.len());
    for channel in &channels[..3] {
        server
            .publish(channel, serde_json::json!({"on": channel}))
            .await;
    }
    // The server's own cursor comes back whole: the events, no reset.
    // Names, epochs and seqs need no escaping in a query: sent as the server wrote it.
    let (status, reply) = poll(format!("{query}&cursor={cursor}")).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["events"].as_array().unwrap().len(), 3, "{reply}");
    assert!(reply["resets"].as_array().unwrap().is_empty(), "{reply}");
    // As a `Last-Event-ID`, it resumes every channel without a reset.
    let mut stream = SseClient::connect(&server, &format!("?{query}"), Some(&cursor)).await;
    assert_eq!(stream.status, 200);
    let opening = stream.next_event().await.unwrap();
    assert_eq!(opening.event, "subscribed", "{opening:?}");
    assert!(!opening.data.contains("reset"), "{}", opening.data);
    for _ in 0..3 {
        let event = stream.next_event().await.unwrap();
        assert_eq!(event.event, "message", "{event:?}");
    }
    // An unreadable cursor follows the reset rules: every channel is told, at once.
    let (status, reply) = poll("channels=a,b&cursor=not-a-cursor".to_owned()).await;
    assert_eq!(status, 200, "{reply}");
    let resets = reply["resets"].as_array().unwrap();
    assert_eq!(resets.len(), 2, "{reply}");
    assert!(
        resets.iter().all(|reset| reset["reason"] == "bad_cursor"),
        "{reply}"
    );
    let next: resync_protocol::Cursor = reply["cursor"].as_str().unwrap().parse().unwrap();
    assert_eq!(next.len(), 2);
}
