//! Per-namespace settings (issue 16): history size, presence, join/leave, anonymous
//! subscribe and publish, client publish, each for one namespace only, from the TOML's
//! `[namespaces.<name>]`; channels of other namespaces keep the server-wide behaviour.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use resync_protocol::{
    ClientFrame, ErrorCode, Payload, PresenceRequest, RecoveryOutcome, ServerFrame,
};
use resync_server::Settings;
use resync_tests::{TestServer, WsClient};

const TOML: &str = r#"
jwt_secret = "an-hs256-secret-that-is-long-enough-for-the-test"
anonymous_subscribe = []

[namespaces.chat]
history_size = 3

[namespaces.private]
presence = false
join_leave = false

[namespaces.lobby]
client_publish = false

[namespaces.open]
anonymous_subscribe = true
anonymous_publish = true
"#;

fn server() -> TestServer {
    let from_file: Settings = toml::from_str(TOML).unwrap();
    TestServer::start(move |settings| {
        settings.jwt_secret = from_file.jwt_secret.clone();
        settings.anonymous_subscribe = from_file.anonymous_subscribe.clone();
        settings.namespaces = from_file.namespaces.clone();
    })
}

fn token(subject: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    resync_actix::jwt::sign(
        &resync_actix::jwt::Claims {
            sub: Some(subject.to_owned()),
            exp: now + 600,
            subscribe: vec!["*".to_owned()],
            publish: vec!["*".to_owned()],
            ..Default::default()
        },
        "an-hs256-secret-that-is-long-enough-for-the-test".as_bytes(),
    )
}

/// The next error, skipping the events and joins of earlier subscriptions.
async fn expect_error(client: &mut WsClient, code: ErrorCode) {
    loop {
        match client.frame().await {
            ServerFrame::Error {
                code: got, message, ..
            } => {
                assert_eq!(got, code, "{message}");
                return;
            }
            ServerFrame::Event(_) | ServerFrame::Join { .. } => {}
            other => panic!("expected {code:?}, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn each_namespace_keeps_its_own_rules_and_the_others_keep_the_defaults() {
    let server = server();
    let mut ann =
        WsClient::connect_ready(&server.ws_url(&format!("?token={}", token("ann")))).await;

    // History: 3 events in chat, the default elsewhere.
    let mut first = Vec::new();
    for channel in ["chat:1", "news"] {
        let positions = server.publish_many(channel, 0..6).await;
        first.push(positions[0].clone());
    }
    match ann.subscribe("chat:1", Some(first[0].clone())).await {
        RecoveryOutcome::Reset { .. } => {}
        other => panic!("chat keeps 3 events, so seq 1 is gone: {other:?}"),
    }
    match ann.subscribe("news", Some(first[1].clone())).await {
        RecoveryOutcome::Replayed { count, .. } => assert_eq!(count, 5),
        other => panic!("news keeps the default history: {other:?}"),
    }

    // Presence and join/leave are off in private, on elsewhere.
    for (channel, presence, join_leave, refused) in [
        ("private:1", true, false, true),
        ("private:2", false, true, true),
        ("room:1", true, true, false),
    ] {
        let id = ann.next_request_id();
        ann.send(&ClientFrame::Subscribe {
            id,
            channel: channel.parse().unwrap(),
            since: None,
            presence: presence.then(|| PresenceRequest {
                info: Some(Payload::from_value(&serde_json::json!({"n": 1})).unwrap()),
            }),
            join_leave,
            state: false,
        })
        .await;
        if refused {
            expect_error(&mut ann, ErrorCode::Forbidden).await;
        } else {
            loop {
                if let ServerFrame::Subscribed { .. } = ann.frame().await {
                    break;
                }
            }
        }
    }

    // No client publishes in lobby, whatever its token says; elsewhere the token decides.
    let id = ann.next_request_id();
    ann.send(&ClientFrame::Publish {
        id,
        channel: "lobby:1".parse().unwrap(),
        data: Payload::from_value(&serde_json::json!({})).unwrap(),
        idempotency_key: None,
    })
    .await;
    loop {
        match ann.frame().await {
            ServerFrame::Error { code, .. } => {
                assert_eq!(code, ErrorCode::Forbidden);
                break;
            }
            ServerFrame::Join { .. } | ServerFrame::Event(_) => {}
            other => panic!("expected forbidden, got {other:?}"),
        }
    }

    // Anonymous clients: only the open namespace lets them subscribe and publish.
    let mut anonymous = WsClient::connect_ready(&server.ws_url("")).await;
    anonymous.subscribe("open:1", None).await;
    let id = anonymous.next_request_id();
    anonymous
        .send(&ClientFrame::Subscribe {
            id,
            channel: "news".parse().unwrap(),
            since: None,
            presence: None,
            join_leave: false,
            state: false,
        })
        .await;
    expect_error(&mut anonymous, ErrorCode::Forbidden).await;
    let id = anonymous.next_request_id();
    anonymous
        .send(&ClientFrame::Publish {
            id,
            channel: "open:1".parse().unwrap(),
            data: Payload::from_value(&serde_json::json!({"hi": true})).unwrap(),
            idempotency_key: None,
        })
        .await;
    loop {
        match anonymous.frame().await {
            ServerFrame::Published { id: reply, .. } if reply == id => break,
            ServerFrame::Event(_) => {}
            other => panic!("expected published, got {other:?}"),
        }
    }
    let status = server
        .http
        .get(server.url("/sse?channel=news"))
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 403, "anonymous SSE outside the open namespace");
}
