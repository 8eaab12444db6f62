//! Refreshing a token in place (issue 16): a WebSocket that refreshes its token across five
//! short expiries stays one connection and loses nothing, from a raw client and from the Rust
//! client's own refresher; a refresh that narrows permissions ends the affected subscription
//! with reason `permission`; a refresh for another subject is refused.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use resync_actix::jwt::{self, Claims};
use resync_protocol::{ClientFrame, ErrorCode, ServerFrame, UnsubscribeReason};
use resync_tests::{JWT_SECRET, TestServer, WsClient};

fn token(subject: &str, subscribe: &[&str], lifetime: Duration) -> String {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    jwt::sign(
        &Claims {
            sub: Some(subject.to_owned()),
            exp: (now + lifetime).as_secs(),
            subscribe: subscribe
                .iter()
                .map(|pattern| (*pattern).to_owned())
                .collect(),
            ..Claims::default()
        },
        JWT_SECRET.as_bytes(),
    )
}

fn jwt_server() -> TestServer {
    TestServer::start(|settings| settings.jwt_secret = Some(JWT_SECRET.into()))
}

/// Publishes `count` events on `channel`, one every 50 ms, in the background.
fn publish_steadily(
    server: &TestServer,
    channel: &'static str,
    count: u64,
) -> tokio::task::JoinHandle<()> {
    let http = server.http.clone();
    let url = server.url("/api/publish");
    let api_key = server.server.api_key.clone();
    tokio::spawn(async move {
        for n in 0..count {
            let response = http
                .post(&url)
                .bearer_auth(&api_key)
                .json(&serde_json::json!({"channel": channel, "data": {"n": n}}))
                .send()
                .await
                .unwrap();
            assert!(response.status().is_success());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
}

#[tokio::test]
async fn five_refreshes_across_five_short_expiries_keep_one_connection_and_every_event() {
    let server = jwt_server();
    let lifetime = Duration::from_secs(3);
    let mut client = WsClient::connect_ready(
        &server.ws_url(&format!("?token={}", token("ann", &["feed"], lifetime))),
    )
    .await;
    client.subscribe("feed", None).await;
    let started = Instant::now();
    let publisher = publish_steadily(&server, "feed", 100);
    let mut seqs = Vec::new();
    let mut refreshes = 0;
    let mut next_refresh = Instant::now() + Duration::from_secs(1);
    while seqs.len() < 100 {
        if refreshes < 5 && Instant::now() >= next_refresh {
            let id = client.next_request_id();
            client
                .send(&ClientFrame::Refresh {
                    id,
                    token: token("ann", &["feed"], lifetime),
                })
                .await;
            refreshes += 1;
            next_refresh += Duration::from_secs(1);
        }
        match tokio::time::timeout(Duration::from_millis(100), client.frame()).await {
            Ok(ServerFrame::Event(event)) => seqs.push(event.position.seq.get()),
            Ok(ServerFrame::Refreshed { expires_at, .. }) => assert!(expires_at.is_some()),
            Ok(other) => panic!("unexpected {other:?}"),
            Err(_) => {}
        }
    }
    publisher.await.unwrap();
    assert_eq!(refreshes, 5);
    assert!(
        started.elapsed() > lifetime,
        "the connection outlived its first token by far ({:?})",
        started.elapsed()
    );
    assert_eq!(
        seqs,
        (1..=100).collect::<Vec<u64>>(),
        "every event, in order, once"
    );
    assert_eq!(
        server
            .metric("resync_connections_total{transport=\"websocket\"}")
            .await,
        1,
        "one connection throughout"
    );
}

#[tokio::test]
async fn a_refresh_that_narrows_permissions_ends_the_affected_subscription_with_the_reason() {
    let server = jwt_server();
    let long = Duration::from_secs(600);
    let mut client = WsClient::connect_ready(
        &server.ws_url(&format!("?token={}", token("ann", &["a:*", "b:*"], long))),
    )
    .await;
    client.subscribe("a:1", None).await;
    client.subscribe("b:1", None).await;
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Refresh {
            id,
            token: token("ann", &["a:*"], long),
        })
        .await;
    match client.frame().await {
        ServerFrame::Unsubscribed {
            id,
            channel,
            reason,
        } => {
            assert_eq!((id, channel.as_str()), (0, "b:1"));
            assert_eq!(reason, Some(UnsubscribeReason::Permission));
        }
        other => panic!("expected b:1 to be unsubscribed, got {other:?}"),
    }
    assert!(
        matches!(client.frame().await, ServerFrame::Refreshed { id: reply, .. } if reply == id)
    );
    server.publish("b:1", serde_json::json!({"n": 1})).await;
    server.publish("a:1", serde_json::json!({"n": 2})).await;
    match client.frame().await {
        ServerFrame::Event(event) => {
            assert_eq!(event.channel.as_str(), "a:1", "b:1 is no longer followed")
        }
        other => panic!("expected an event of a:1, got {other:?}"),
    }
    // A token for someone else is refused, and the connection goes on as it was.
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Refresh {
            id,
            token: token("mallory", &["*"], long),
        })
        .await;
    match client.frame().await {
        ServerFrame::Error {
            id: reply, code, ..
        } => {
            assert_eq!((reply, code), (Some(id), ErrorCode::Forbidden));
        }
        other => panic!("expected forbidden, got {other:?}"),
    }
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Refresh {
            id,
            token: "not-a-token".to_owned(),
        })
        .await;
    match client.frame().await {
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Unauthorized),
        other => panic!("expected unauthorized, got {other:?}"),
    }
    server.publish("a:1", serde_json::json!({"n": 3})).await;
    assert!(matches!(client.frame().await, ServerFrame::Event(_)));
}

#[tokio::test]
async fn the_rust_client_refreshes_ahead_of_expiry_on_one_connection() {
    let server = jwt_server();
    let lifetime = Duration::from_secs(2);
    let asked = Arc::new(AtomicUsize::new(0));
    let client = resync_client::Client::builder(&server.url(""))
        .transport(resync_client::TransportChoice::Only(
            resync_client::TransportKind::WebSocket,
        ))
        .backoff(resync_tests::fast_backoff())
        .token_refresher({
            let asked = asked.clone();
            move || {
                asked.fetch_add(1, Ordering::SeqCst);
                let token = token("ann", &["feed"], lifetime);
                async move { Ok(token) }
            }
        })
        .build()
        .unwrap();
    // A subscription starts when first polled: the reader runs while the events come.
    let mut feed = client.subscribe("feed".parse().unwrap());
    let reader = tokio::spawn(async move {
        let mut seqs = Vec::new();
        while seqs.len() < 160 {
            match tokio::time::timeout(Duration::from_secs(10), feed.next())
                .await
                .unwrap()
            {
                Some(Ok(resync_client::Update::Event(event))) => {
                    seqs.push(event.position.seq.get())
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        seqs
    });
    server.wait_for_subscribers("feed", 1).await;
    let publisher = publish_steadily(&server, "feed", 160);
    let seqs = reader.await.unwrap();
    publisher.await.unwrap();
    assert_eq!(seqs, (1..=160).collect::<Vec<u64>>());
    // 8 s of 2 s tokens: the first, then at least 3 refreshes in place.
    assert!(
        asked.load(Ordering::SeqCst) >= 4,
        "{} tokens",
        asked.load(Ordering::SeqCst)
    );
    assert_eq!(
        server
            .metric("resync_connections_total{transport=\"websocket\"}")
            .await,
        1,
        "refreshed in place, never reconnected"
    );
}

#[tokio::test]
async fn an_sse_stream_whose_token_expires_resumes_with_a_new_token_and_loses_nothing() {
    let server = jwt_server();
    let short = token("ann", &["feed"], Duration::from_secs(2));
    let mut stream =
        resync_tests::SseClient::connect(&server, &format!("?channel=feed&token={short}"), None)
            .await;
    assert_eq!(stream.next().await.unwrap().event, "subscribed");
    server.publish("feed", serde_json::json!({"n": 1})).await;
    let first = stream.next_event().await.unwrap();
    // The stream ends at the token's expiry…
    let ended = Instant::now();
    while stream.next().await.is_some() {}
    assert!(
        ended.elapsed() < Duration::from_secs(4),
        "ended at the expiry"
    );
    // …events published meanwhile are not lost: the documented path is a reconnect with a
    // new token and the last event id.
    server.publish("feed", serde_json::json!({"n": 2})).await;
    server.publish("feed", serde_json::json!({"n": 3})).await;
    let fresh = token("ann", &["feed"], Duration::from_secs(600));
    let mut resumed = resync_tests::SseClient::connect(
        &server,
        &format!("?channel=feed&token={fresh}"),
        Some(&first.last_event_id),
    )
    .await;
    assert_eq!(resumed.next().await.unwrap().event, "subscribed");
    let mut data = Vec::new();
    while data.len() < 2 {
        data.push(resumed.next_event().await.unwrap().data);
    }
    assert!(
        data[0].contains(r#""n":2"#) && data[1].contains(r#""n":3"#),
        "{data:?}"
    );
}
