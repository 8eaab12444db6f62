//! SSE against a real server: publish -> receive, resume via Last-Event-ID and cursor, resets,
//! bad input, and subscriptions freed the moment clients leave.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use resync_protocol::Cursor;
use resync_tests::{SseClient, TestServer};

#[tokio::test]
async fn events_arrive_and_last_event_id_resumes_exactly() {
    let server = TestServer::start(|_| {});
    let mut client = SseClient::connect(&server, "?channel=news", None).await;
    assert_eq!(client.status, 200);
    let opening = client.next_event().await.unwrap();
    assert_eq!(opening.event, "subscribed");
    assert!(opening.data.contains("\"fresh\""), "{}", opening.data);

    server.publish_many("news", 0..3).await;
    for expected in 1..=3 {
        assert_eq!(client.next_seq("news").await, expected);
    }
    let last_id = client.last_event_id();
    drop(client);
    server.wait_for_subscribers("news", 0).await;

    // Published while the client was away.
    server.publish_many("news", 3..7).await;
    let mut client = SseClient::connect(&server, "?channel=news", Some(&last_id)).await;
    let opening = client.next_event().await.unwrap();
    assert!(
        opening.data.contains("\"replayed\"") && opening.data.contains("\"count\":4"),
        "{}",
        opening.data
    );
    server.publish_many("news", 7..9).await;
    // Exactly the missed events, then the live ones: no gap, no duplicate.
    for expected in 4..=8 {
        assert_eq!(client.next_seq("news").await, expected);
    }
}

#[tokio::test]
async fn one_cursor_resumes_several_channels() {
    let server = TestServer::start(|_| {});
    let mut client = SseClient::connect(&server, "?channels=a,b", None).await;
    client.next_event().await.unwrap();
    server.publish("a", serde_json::json!(1)).await;
    assert_eq!(client.next_seq("a").await, 1);
    server.publish("b", serde_json::json!(1)).await;
    assert_eq!(client.next_seq("b").await, 1);
    let cursor = Cursor::parse(&client.last_event_id()).unwrap();
    assert_eq!(cursor.len(), 2, "the id holds both channels: {cursor}");
    drop(client);

    server.publish("a", serde_json::json!(2)).await;
    server.publish("b", serde_json::json!(2)).await;
    server.publish("b", serde_json::json!(3)).await;
    let query = format!("?channel=a&channel=b&cursor={cursor}");
    let mut client = SseClient::connect(&server, &query, None).await;
    client.next_event().await.unwrap();
    let mut seen = Vec::new();
    for _ in 0..3 {
        let message = client.next_event().await.unwrap();
        let frame: serde_json::Value = serde_json::from_str(&message.data).unwrap();
        seen.push((
            frame["channel"].as_str().unwrap().to_owned(),
            frame["seq"].as_u64().unwrap(),
        ));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("a".to_owned(), 2),
            ("b".to_owned(), 2),
            ("b".to_owned(), 3)
        ]
    );
}

#[tokio::test]
async fn trimmed_history_and_bad_ids_are_resets_not_silence() {
    let server = TestServer::start(|settings| settings.history_size = 5);
    let first = server.publish("t", serde_json::json!(0)).await;
    server.publish_many("t", 1..20).await;
    let id = format!("t:{}:{}", first.epoch, first.seq);
    let mut client = SseClient::connect(&server, "?channel=t", Some(&id)).await;
    let opening = client.next_event().await.unwrap();
    assert!(
        opening.data.contains("\"reset\"") && opening.data.contains("\"truncated\""),
        "{}",
        opening.data
    );
    // The same reset also arrives as a `reset` event, for clients that only listen for those.
    let reset = client.next_event().await.unwrap();
    assert_eq!(reset.event, "reset");
    assert!(reset.data.contains("\"truncated\""), "{}", reset.data);
    // The stream then continues live from the current position.
    server.publish("t", serde_json::json!(20)).await;
    assert_eq!(client.next_seq("t").await, 21);

    // A Last-Event-ID the server cannot read: the stream still opens, with a reset.
    let mut client = SseClient::connect(&server, "?channel=t", Some("garbage!!")).await;
    assert_eq!(client.status, 200);
    let opening = client.next_event().await.unwrap();
    assert!(opening.data.contains("\"bad_cursor\""), "{}", opening.data);

    // A bad explicit cursor follows the same rule: the stream opens, with a reset (one rule
    // for every unreadable cursor, issue 29 defect 10).
    let mut client = SseClient::connect(&server, "?channel=t&cursor=nope", None).await;
    assert_eq!(client.status, 200);
    let opening = client.next_event().await.unwrap();
    assert!(opening.data.contains("\"bad_cursor\""), "{}", opening.data);
}

#[tokio::test]
async fn bad_requests_get_json_errors() {
    let server = TestServer::start(|_| {});
    for (query, code) in [
        ("", "bad_request"),
        ("?channel=has%20space", "invalid_channel"),
    ] {
        let response = server
            .http
            .get(server.url(&format!("/sse{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 400, "{query}");
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["code"], code, "{query}");
    }
}

#[tokio::test]
async fn a_thousand_clients_connect_and_leave_and_nothing_is_left() {
    let server = TestServer::start(|_| {});
    for batch in 0..10 {
        let mut clients = Vec::new();
        for _ in 0..100 {
            let mut client = SseClient::connect(&server, "?channel=crowd", None).await;
            client.next_event().await.unwrap();
            clients.push(client);
        }
        if batch == 0 {
            assert_eq!(server.subscribers("crowd").await, 100);
        }
        drop(clients);
    }
    server.wait_for_subscribers("crowd", 0).await;
    assert_eq!(
        server
            .metric("resync_open_connections{transport=\"sse\"}")
            .await,
        0
    );
    assert_eq!(
        server
            .metric("resync_connections_total{transport=\"sse\"}")
            .await,
        1_000
    );
}

#[tokio::test]
async fn shutdown_ends_streams_with_a_retry_hint_and_refuses_new_ones_with_a_retry() {
    let server = TestServer::start(|_| {});
    let mut client = SseClient::connect(&server, "?channel=s", None).await;
    client.next_event().await.unwrap();
    server.server.resync.shutdown();
    // The stream ends after a retry hint of its own (the opening, already read, had one too,
    // so only hints after the shutdown count), and EventSource reconnects elsewhere.
    let mut retry_hint = None;
    while let Some(message) = client.next().await {
        retry_hint = message.retry_ms.or(retry_hint);
    }
    assert!(retry_hint.is_some(), "shutdown sends a retry hint");
    // A new stream is refused the way EventSource survives: 200, a retry hint, the end (a
    // 503 would close a browser's EventSource for good). It comes on a new connection, as a
    // reconnecting EventSource's does: the ended stream's connection is closed by the drain,
    // and a client that races that close retries on a new one (RFC 9112, 9.3.1), which
    // reqwest does not do by itself.
    let fresh = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let response = fresh
        .get(server.url("/sse?channel=s"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body = response.text().await.unwrap();
    assert!(body.contains("retry:"), "{body}");
    assert!(!body.contains("subscribed"), "not served: {body}");
}
