//! Issue 11, "safe to put on the internet": each test is named after the defect it proves
//! fixed (`defect_N_…`) and counts what happened on the wire.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
