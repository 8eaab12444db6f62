//! Issue 11, "safe to put on the internet": each test is named after the defect it proves
//! fixed (`defect_N_…`) and counts what happened on the wire.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::SinkExt;
use resync_actix::jwt;
use resync_protocol::{ClientFrame, ErrorCode, Payload, ServerFrame};
use resync_tests::raw_ws::{RawEnd, RawWs};
use resync_tests::{JWT_SECRET, TestServer, WsClient};

/// FIN + text.
const TEXT: u8 = 0x81;

#[tokio::test]
async fn defect_1_a_frame_declaring_more_than_the_limit_closes_1009_before_its_payload() {
    let server = TestServer::start(|settings| settings.max_message_bytes = 4096);
    let mut client = RawWs::connect(server.server.addresses[0], "")
        .await
        .unwrap();
    // A header declaring 2^40 bytes, then 1 KiB of the payload: the server must not wait for
    // (and buffer) the rest before refusing it.
    let frame = RawWs::frame(TEXT, 1 << 40, &[b' '; 1024]);
    client.send(&frame).await.unwrap();
    assert_eq!(
        client.close_code(Duration::from_secs(5)).await,
        RawEnd::Closed(1009),
        "refused on the header, after 1 KiB of a declared 1 TiB"
    );
}

#[tokio::test]
async fn defect_1_a_fragment_declared_past_the_limit_of_its_message_closes_1009() {
    let server = TestServer::start(|settings| settings.max_message_bytes = 1024);
    let mut client = RawWs::connect(server.server.addresses[0], "")
        .await
        .unwrap();
    // First fragment: 600 bytes, not final. The next declares 600 more (1,200 > 1,024) and
    // sends only 10 of them.
    client
        .send(&RawWs::frame(0x01, 600, &[b' '; 600]))
        .await
        .unwrap();
    client
        .send(&RawWs::frame(0x80, 600, &[b' '; 10]))
        .await
        .unwrap();
    assert_eq!(
        client.close_code(Duration::from_secs(5)).await,
        RawEnd::Closed(1009)
    );
}

#[test]
fn defect_2_an_empty_or_short_jwt_secret_stops_the_server_at_start() {
    for secret in ["", "short-secret", &"x".repeat(31)] {
        let settings = resync_server::Settings {
            listen: "127.0.0.1:0".parse().unwrap(),
            jwt_secret: Some(secret.to_owned()),
            ..resync_server::Settings::default()
        };
        let error = resync_server::start(settings)
            .err()
            .unwrap_or_else(|| panic!("a {}-byte secret was accepted", secret.len()));
        let message = format!("{error:#}");
        assert!(
            message.contains("at least 32"),
            "the message says what is needed: {message}"
        );
    }
}

fn signed(claims: &jwt::Claims) -> String {
    jwt::sign(claims, JWT_SECRET.as_bytes())
}

#[tokio::test]
async fn defect_2_a_token_expiring_at_2_pow_63_gets_401_and_the_server_keeps_serving() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
    });
    let far = signed(&jwt::Claims {
        exp: 1 << 63,
        subscribe: vec!["*".into()],
        publish: vec!["*".into()],
        ..Default::default()
    });
    for path in [
        format!("/sse?channel=a&token={far}"),
        format!("/poll?channel=a&token={far}"),
    ] {
        let status = server.http.get(server.url(&path)).send().await.unwrap();
        assert_eq!(status.status().as_u16(), 401, "{path}");
    }
    assert_eq!(
        WsClient::connect(&server.ws_url(&format!("?token={far}")))
            .await
            .err(),
        Some(401)
    );
    // The workers did not panic: a normal request still gets its answer.
    let health = server
        .http
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status().as_u16(), 200);
}

#[tokio::test]
async fn defect_2_a_token_longer_lived_than_the_maximum_gets_401() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        settings.max_token_lifetime_secs = Some(3_600);
    });
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let token = |lifetime: u64| {
        signed(&jwt::Claims {
            exp: now + lifetime,
            subscribe: vec!["*".into()],
            ..Default::default()
        })
    };
    let status = |token: String| {
        let request = server
            .http
            .get(server.url(&format!("/poll?channel=a&token={token}")));
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(token(600)).await, 200);
    assert_eq!(status(token(7 * 24 * 3_600)).await, 401);
}

#[tokio::test]
async fn defect_3_anonymous_publishing_is_refused_unless_the_demo_is_on() {
    async fn anonymous_publish(server: &TestServer, channel: &str) -> ServerFrame {
        let mut client = WsClient::connect_ready(&server.ws_url("")).await;
        let id = client.next_request_id();
        client
            .send(&ClientFrame::Publish {
                id,
                channel: channel.parse().unwrap(),
                data: Payload::from_json("{\"text\":\"flood\"}").unwrap(),
                idempotency_key: None,
            })
            .await;
        client.frame().await
    }
    let plain = TestServer::start(|settings| settings.demo = false);
    for channel in ["demo:chat", "news"] {
        match anonymous_publish(&plain, channel).await {
            ServerFrame::Error {
                code: ErrorCode::Forbidden,
                ..
            } => {}
            other => panic!("{channel}: expected forbidden, got {other:?}"),
        }
        assert_eq!(plain.position(channel).await.seq.get(), 0, "nothing stored");
    }
    // The demo's chat needs it, and only there.
    let demo = TestServer::start(|settings| settings.demo = true);
    assert!(matches!(
        anonymous_publish(&demo, "demo:chat").await,
        ServerFrame::Published { .. }
    ));
    assert!(matches!(
        anonymous_publish(&demo, "news").await,
        ServerFrame::Error {
            code: ErrorCode::Forbidden,
            ..
        }
    ));
}

#[tokio::test]
async fn defect_9_websocket_framing_violations_close_1002() {
    let server = TestServer::start(|_| {});
    let cases: [(&str, Vec<u8>); 4] = [
        ("RSV1 set", RawWs::frame(0xC1, 2, b"{}")),
        ("RSV3 set", RawWs::frame(0x91, 2, b"{}")),
        ("a text frame inside a fragmented message", {
            let mut bytes = RawWs::frame(0x01, 1, b"{");
            bytes.extend(RawWs::frame(TEXT, 2, b"{}"));
            bytes
        }),
        (
            "close code 1005, which RFC 6455 forbids on the wire",
            RawWs::frame(0x88, 2, &1005u16.to_be_bytes()),
        ),
    ];
    for (case, bytes) in cases {
        let mut client = RawWs::connect(server.server.addresses[0], "")
            .await
            .unwrap();
        client.send(&bytes).await.unwrap();
        assert_eq!(
            client.close_code(Duration::from_secs(5)).await,
            RawEnd::Closed(1002),
            "{case}"
        );
    }
}

#[tokio::test]
async fn defect_9_the_cookie_origin_check_ignores_x_forwarded_host_and_compares_the_scheme() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        settings.anonymous_subscribe = Some(vec![]);
    });
    let token = signed(&jwt::Claims {
        exp: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600,
        subscribe: vec!["*".into()],
        ..Default::default()
    });
    let address = server.server.addresses[0];
    let status = |origin: String, forwarded_host: Option<&'static str>| {
        let mut request = server
            .http
            .get(server.url("/poll?channel=c"))
            .header("cookie", format!("resync_token={token}"))
            .header("origin", origin);
        if let Some(host) = forwarded_host {
            request = request.header("x-forwarded-host", host);
        }
        async move { request.send().await.unwrap().status().as_u16() }
    };
    assert_eq!(status(format!("http://{address}"), None).await, 200);
    assert_eq!(
        status("http://evil.example".to_owned(), Some("evil.example")).await,
        403,
        "a client-sent X-Forwarded-Host does not make its origin ours"
    );
    assert_eq!(
        status(format!("https://{address}"), None).await,
        403,
        "another scheme is another origin"
    );
}

#[tokio::test]
async fn defect_9_a_percent_encoded_token_parameter_is_not_logged_in_clear() {
    // The transports decode `%74oken` as `token`; the log's redaction must too.
    let redacted = resync_actix::redact_query("channel=a&%74oken=eyJhbGciOi.secret.sig");
    assert!(!redacted.contains("secret"), "{redacted}");
}

/// An SSE stream's first event name: `subscribed` when served, empty for a "retry later"
/// stream (which has only a comment and `retry:`).
async fn sse_opening(
    server: &TestServer,
    query: &str,
    forwarded_for: Option<&str>,
) -> (String, reqwest::Response) {
    let mut request = server.http.get(server.url(&format!("/sse{query}")));
    if let Some(address) = forwarded_for {
        request = request.header("x-forwarded-for", address);
    }
    let mut response = request.send().await.unwrap();
    assert_eq!(response.status().as_u16(), 200, "SSE is always 200");
    let mut text = String::new();
    while !text.contains("\n\n") || (!text.contains("event:") && !text.contains("retry:")) {
        match tokio::time::timeout(Duration::from_secs(5), response.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
    }
    let event = if text.contains("event: subscribed") {
        "subscribed".to_owned()
    } else if text.contains("retry:") {
        format!("retry-later: {}", text.lines().next().unwrap_or_default())
    } else {
        format!("unexpected: {text}")
    };
    (event, response)
}

#[tokio::test]
async fn defect_5_the_global_connection_cap_refuses_cheaply_while_health_metrics_and_the_api_answer()
 {
    let server = TestServer::start(|settings| settings.max_connections = 20);
    let mut held = Vec::new();
    for _ in 0..20 {
        let (event, stream) = sse_opening(&server, "?channel=full", None).await;
        assert_eq!(event, "subscribed");
        held.push(stream);
    }
    let (event, _) = sse_opening(&server, "?channel=full", None).await;
    assert!(event.starts_with("retry-later"), "the 21st stream: {event}");
    let poll = server
        .http
        .get(server.url("/poll?channel=full"))
        .send()
        .await
        .unwrap();
    assert_eq!(poll.status().as_u16(), 503);
    assert!(poll.headers().contains_key("retry-after"));
    let mut socket = RawWs::connect(server.server.addresses[0], "")
        .await
        .unwrap();
    assert_eq!(
        socket.close_code(Duration::from_secs(5)).await,
        RawEnd::Closed(1013),
        "a WebSocket is told after the upgrade"
    );
    for path in ["/healthz", "/readyz", "/metrics"] {
        let response = server.http.get(server.url(path)).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path} at the cap");
    }
    server
        .publish("full", serde_json::json!("the API still publishes"))
        .await;
    // A stream that leaves frees its place.
    drop(held.pop());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (event, stream) = sse_opening(&server, "?channel=full", None).await;
        if event == "subscribed" {
            held.push(stream);
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the freed place was not reused"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn defect_5_per_address_caps_on_connections_and_connection_rate() {
    let server = TestServer::start(|settings| {
        settings.max_connections_per_ip = 5;
        settings.connections_per_ip_per_second = 1.0;
        settings.connection_burst_per_ip = 1_000;
    });
    let mut held = Vec::new();
    for _ in 0..5 {
        let (event, stream) = sse_opening(&server, "?channel=mine", None).await;
        assert_eq!(event, "subscribed");
        held.push(stream);
    }
    let (event, _) = sse_opening(&server, "?channel=mine", None).await;
    assert!(event.contains("too many connections"), "{event}");
    let poll = server
        .http
        .get(server.url("/poll?channel=mine"))
        .send()
        .await
        .unwrap();
    assert_eq!(poll.status().as_u16(), 429);
    assert!(poll.headers().contains_key("retry-after"));
    let body: serde_json::Value = poll.json().await.unwrap();
    assert_eq!(body["code"], "rate_limited");
    // X-Forwarded-For is a client's claim unless a trusted proxy sent it: ignored here.
    let (event, _) = sse_opening(&server, "?channel=mine", Some("203.0.113.9")).await;
    assert!(event.contains("too many connections"), "{event}");

    let rate = TestServer::start(|settings| {
        settings.connections_per_ip_per_second = 1.0;
        settings.connection_burst_per_ip = 10;
    });
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let response = rate
            .http
            .get(rate.url("/poll?channel=fast"))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
    }
    assert_eq!(&statuses[..10], &[200; 10], "{statuses:?}");
    assert!(
        statuses[10..].iter().all(|status| *status == 429),
        "{statuses:?}"
    );
}

#[tokio::test]
async fn defect_5_behind_a_trusted_proxy_each_forwarded_address_has_its_own_budget() {
    let server = TestServer::start(|settings| {
        settings.max_connections_per_ip = 2;
        settings.trusted_proxies = vec!["127.0.0.1".parse().unwrap()];
    });
    let mut held = Vec::new();
    for client in ["198.51.100.1", "198.51.100.2"] {
        for _ in 0..2 {
            let (event, stream) = sse_opening(&server, "?channel=proxied", Some(client)).await;
            assert_eq!(event, "subscribed", "{client}");
            held.push(stream);
        }
        let (event, _) = sse_opening(&server, "?channel=proxied", Some(client)).await;
        assert!(event.contains("too many connections"), "{client}: {event}");
    }
}

#[tokio::test]
async fn defect_5_websocket_message_and_publish_rates_answer_rate_limited_then_close() {
    let server = TestServer::start(|settings| {
        settings.demo = true;
        settings.ws_publishes_per_second = 0.5;
        settings.ws_publish_burst = 2;
        settings.ws_messages_per_second = 5.0;
        settings.ws_message_burst = 10;
    });
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    let mut replies = Vec::new();
    for _ in 0..3 {
        let id = client.next_request_id();
        client
            .send(&ClientFrame::Publish {
                id,
                channel: "demo:rate".parse().unwrap(),
                data: Payload::from_json("1").unwrap(),
                idempotency_key: None,
            })
            .await;
        replies.push(client.frame().await);
    }
    assert!(matches!(replies[0], ServerFrame::Published { .. }));
    assert!(matches!(replies[1], ServerFrame::Published { .. }));
    assert!(
        matches!(
            &replies[2],
            ServerFrame::Error {
                code: ErrorCode::RateLimited,
                id: Some(_),
                ..
            }
        ),
        "{:?}",
        replies[2]
    );
    assert_eq!(
        server.position("demo:rate").await.seq.get(),
        2,
        "the third was not stored"
    );

    // A flood of messages: a rate_limited error, then close 4100 once it goes on.
    let mut flood = WsClient::connect_ready(&server.ws_url("")).await;
    for _ in 0..40 {
        if flood
            .stream
            .send(tokio_tungstenite::tungstenite::Message::text(
                ClientFrame::Pong.encode(),
            ))
            .await
            .is_err()
        {
            break;
        }
    }
    let mut saw_rate_limited = false;
    let closed = loop {
        match flood.read().await {
            resync_tests::WsRead::Frame(ServerFrame::Error {
                code: ErrorCode::RateLimited,
                ..
            }) => saw_rate_limited = true,
            resync_tests::WsRead::Frame(_) => {}
            resync_tests::WsRead::Closed(code) => break code,
        }
    };
    assert!(saw_rate_limited, "told before being closed");
    assert_eq!(closed, Some(resync_protocol::CloseCode::TRY_AGAIN_LATER));
}

#[tokio::test]
async fn defect_6_one_address_has_a_channel_budget_across_its_connections() {
    let server = TestServer::start(|settings| settings.max_subscriptions_per_ip = 10);
    let channels = |from: usize, count: usize| {
        (from..from + count)
            .map(|index| format!("c{index}"))
            .collect::<Vec<_>>()
            .join(",")
    };
    let (event, _first) =
        sse_opening(&server, &format!("?channels={}", channels(0, 8)), None).await;
    assert_eq!(event, "subscribed");
    let (event, _) = sse_opening(&server, &format!("?channels={}", channels(8, 5)), None).await;
    assert!(event.contains("too many channels"), "{event}");
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    client.subscribe("w1", None).await;
    client.subscribe("w2", None).await;
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Subscribe {
            id,
            channel: "w3".parse().unwrap(),
            since: None,
            presence: None,
            join_leave: false,
            state: false,
        })
        .await;
    assert!(matches!(
        client.frame().await,
        ServerFrame::Error {
            code: ErrorCode::RateLimited,
            ..
        }
    ));
}

#[tokio::test]
async fn defect_6_one_user_has_connection_and_channel_budgets_whatever_its_addresses() {
    // The fixture lifts the per-address limits: only the user's budget is in play.
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        settings.max_connections_per_user = 2;
        settings.max_subscriptions_per_user = 3;
    });
    let token = |subject: &str| resync_tests::user_token(subject, &["*"]);
    let alice = token("alice");
    let mut first = WsClient::connect_ready(&server.ws_url(&format!("?token={alice}"))).await;
    let _second = WsClient::connect_ready(&server.ws_url(&format!("?token={alice}"))).await;
    assert_eq!(
        WsClient::connect(&server.ws_url(&format!("?token={alice}")))
            .await
            .err(),
        Some(429),
        "a third connection of the same user"
    );
    let poll = server
        .http
        .get(server.url(&format!("/poll?channel=p&cursor=&token={alice}")))
        .send()
        .await
        .unwrap();
    assert_eq!(poll.status().as_u16(), 429);
    // Another user is not affected.
    let bob = token("bob");
    let _bob = WsClient::connect_ready(&server.ws_url(&format!("?token={bob}"))).await;
    // Channels: three for alice across her connections, then `rate_limited`.
    for channel in ["a1", "a2", "a3"] {
        first.subscribe(channel, None).await;
    }
    let id = first.next_request_id();
    first
        .send(&ClientFrame::Subscribe {
            id,
            channel: "a4".parse().unwrap(),
            since: None,
            presence: None,
            join_leave: false,
            state: false,
        })
        .await;
    assert!(matches!(
        first.frame().await,
        ServerFrame::Error {
            code: ErrorCode::RateLimited,
            ..
        }
    ));
    // A connection that leaves gives its place back.
    drop(first);
    let mut deadline = 50;
    while WsClient::connect(&server.ws_url(&format!("?token={alice}")))
        .await
        .is_err()
    {
        deadline -= 1;
        assert!(deadline > 0, "the user's place was not given back");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn defect_10_every_connection_holds_one_descriptor() {
    use resync_tests::server_process::ServerProcess;
    let server = ServerProcess::start(&[]);
    let descriptors = || {
        std::fs::read_dir(format!("/proc/{}/fd", server.pid()))
            .map(|entries| entries.count())
            .unwrap_or(0)
    };
    const CONNECTIONS: usize = 150;
    // Warm up: the first connections make the runtime's own descriptors.
    drop(WsClient::connect_ready(&format!("ws://{}/ws", server.address)).await);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = descriptors();
    let url = format!("ws://{}/ws", server.address);
    let mut sockets = Vec::new();
    for _ in 0..CONNECTIONS {
        sockets.push(WsClient::connect_ready(&url).await);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let per_websocket = (descriptors() - before) as f64 / CONNECTIONS as f64;
    drop(sockets);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = descriptors();
    let http = reqwest::Client::new();
    let mut streams = Vec::new();
    for index in 0..CONNECTIONS {
        let stream = http
            .get(format!("{}/sse?channel=fd{index}", server.base_url))
            .send()
            .await
            .unwrap();
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let per_stream = (descriptors() - before) as f64 / CONNECTIONS as f64;
    assert!(
        per_websocket < 1.5,
        "{per_websocket:.2} descriptors per WebSocket (the probe's duplicate was kept)"
    );
    // Issue 25: the edge sees an SSE client leave from its own read of the socket, so no
    // connection holds a second descriptor (tests/tests/edge.rs, item 9, sees it leave).
    assert!(
        per_stream < 1.5,
        "{per_stream:.2} per SSE stream: a second descriptor per stream"
    );
}

#[tokio::test]
async fn defect_7_a_client_that_floods_pings_and_never_reads_is_reaped_at_the_tcp_level() {
    let server = TestServer::start(|settings| {
        settings.write_timeout_secs = 1;
        // Not the message rate limit: the write deadline is what must reap this client.
        settings.ws_messages_per_second = 1e9;
        settings.ws_message_burst = u32::MAX;
    });
    let mut client = RawWs::connect_small_window(server.server.addresses[0], "")
        .await
        .unwrap();
    server.wait_for_websockets(1).await;
    // Pings with the largest payload a control frame may carry, never reading a pong.
    let ping = RawWs::frame(0x89, 125, &[b'p'; 125]);
    let started = tokio::time::Instant::now();
    let mut sent = 0usize;
    while started.elapsed() < Duration::from_secs(15) {
        match tokio::time::timeout(Duration::from_millis(200), client.send(&ping)).await {
            Ok(Ok(())) => sent += ping.len(),
            // The server stopped reading (its pong write waits) or dropped us.
            Ok(Err(_)) | Err(_) => break,
        }
        if sent > 64 << 20 {
            break;
        }
    }
    // Within the write timeout plus the kernel's user timeout (1 s each), and some slack,
    // the connection is gone on the server.
    let reaped = tokio::time::timeout(Duration::from_secs(20), server.wait_for_websockets(0)).await;
    assert!(
        reaped.is_ok(),
        "the flooding client still holds a connection after {sent} bytes of pings"
    );
    // And at the TCP level: what the client reads next is the end, not more pongs forever.
    let mut buffer = vec![0u8; 1 << 20];
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match tokio::io::AsyncReadExt::read(&mut client.stream, &mut buffer).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert_eq!(ended, Ok(true), "the server closed the socket");
}

#[tokio::test]
async fn defect_8_a_long_poll_reply_is_bounded_in_bytes_and_the_cursor_continues() {
    let server = TestServer::start(|settings| settings.poll_max_bytes = 256 * 1024);
    let big = "x".repeat(60 * 1024);
    let first = server
        .publish("large", serde_json::json!({ "n": 1, "pad": big }))
        .await;
    for n in 2..=20 {
        server
            .publish("large", serde_json::json!({ "n": n, "pad": big }))
            .await;
    }
    let mut cursor = format!("large:{}:0", first.epoch);
    let mut seqs = Vec::new();
    let mut replies = 0;
    while seqs.len() < 20 {
        let response = server
            .http
            .get(server.url(&format!("/poll?channel=large&cursor={cursor}&timeout=1")))
            .send()
            .await
            .unwrap();
        let body = response.bytes().await.unwrap();
        assert!(
            body.len() <= 256 * 1024 + 64 * 1024,
            "a {} byte reply (limit 256 KiB plus one event)",
            body.len()
        );
        let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
        seqs.extend(resync_tests::seqs(reply["events"].as_array().unwrap()));
        cursor = reply["cursor"].as_str().unwrap().to_owned();
        replies += 1;
        assert!(replies <= 10, "no progress: {seqs:?}");
    }
    assert_eq!(
        seqs,
        (1..=20).collect::<Vec<u64>>(),
        "contiguous, once each"
    );
    assert!(replies >= 4, "1.2 MB took {replies} replies");
}

fn memory_broker(server: &TestServer) -> resync_broker::MemoryBroker {
    server
        .server
        .memory_broker
        .clone()
        .expect("the test server runs the memory broker")
}

#[tokio::test]
async fn defect_4_history_has_a_byte_budget_per_channel_and_for_the_process() {
    let server = TestServer::start(|settings| {
        settings.broker = resync_server::BrokerKind::Memory;
        settings.history_max_bytes_per_channel = 256 * 1024;
        settings.history_max_bytes = 1024 * 1024;
    });
    let big = "x".repeat(60 * 1024);
    let first = server
        .publish("heavy", serde_json::json!({ "pad": big }))
        .await;
    for _ in 0..29 {
        server
            .publish("heavy", serde_json::json!({ "pad": big }))
            .await;
    }
    let broker = memory_broker(&server);
    assert!(
        broker.history_bytes() <= 256 * 1024,
        "one channel: {} bytes kept",
        broker.history_bytes()
    );
    // A client from the first event is further back than the budget kept: a typed reset.
    let mut client = resync_tests::SseClient::connect(
        &server,
        "?channel=heavy",
        Some(&format!("heavy:{}:{}", first.epoch, first.seq)),
    )
    .await;
    client.next_event().await.unwrap();
    let reset = client.next_event().await.unwrap();
    assert_eq!(reset.event, "reset");
    assert!(reset.data.contains("\"truncated\""), "{}", reset.data);
    // Many channels: the process total stays under its budget.
    for channel in 0..20 {
        for _ in 0..4 {
            server
                .publish(
                    &format!("spread{channel}"),
                    serde_json::json!({ "pad": big }),
                )
                .await;
        }
    }
    assert!(
        broker.history_bytes() <= 1024 * 1024 + 64 * 1024,
        "process: {} bytes kept of 4.8 MB published",
        broker.history_bytes()
    );
}

#[tokio::test]
async fn defect_6_subscribing_to_channels_never_published_creates_no_channel_state() {
    // The memory broker's table; the disk broker's is checked in resync-broker-disk's tests.
    let server = TestServer::start(|settings| settings.broker = resync_server::BrokerKind::Memory);
    let broker = memory_broker(&server);
    let query: String = (0..100)
        .map(|index| format!("channel=spray{index}&"))
        .collect();
    for round in 0..5 {
        let (event, _stream) = sse_opening(&server, &format!("?{query}round={round}"), None).await;
        assert_eq!(event, "subscribed");
        let poll = server
            .http
            .get(server.url(&format!("/poll?{query}cursor=")))
            .send()
            .await
            .unwrap();
        assert_eq!(poll.status().as_u16(), 200);
    }
    assert_eq!(
        broker.channel_count(),
        0,
        "subscribers cost their subscription only"
    );
    // A subscriber of a never-published channel still gets its first event, gap-free.
    let mut client = resync_tests::SseClient::connect(&server, "?channel=later", None).await;
    client.next_event().await.unwrap();
    server.publish("later", serde_json::json!(1)).await;
    assert_eq!(client.next_seq("later").await, 1);
    assert_eq!(broker.channel_count(), 1);
}
