//! Long polling against a real server: immediate cursor, held requests, resume, resets,
//! timeouts.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::time::{Duration, Instant};

use resync_tests::{TestServer, poll, seqs};

#[tokio::test]
async fn first_poll_answers_at_once_then_polls_hold_until_an_event() {
    let server = TestServer::start(|_| {});
    let started = Instant::now();
    let first = poll(&server, "?channel=feed").await;
    assert_eq!(first.status, 200);
    assert!(first.events.is_empty());
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the first poll does not wait"
    );

    // The next poll waits; an event published meanwhile ends the wait.
    let cursor = first.cursor.clone();
    let publisher = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.publish("feed", serde_json::json!("hello")).await
    };
    let query = format!("?channel=feed&cursor={cursor}");
    let (reply, _) = tokio::join!(poll(&server, &query), publisher);
    assert_eq!(seqs(&reply.events), [1]);
    assert_eq!(reply.events[0]["data"], "hello");
    assert_ne!(reply.cursor, cursor);
}

#[tokio::test]
async fn missed_events_come_back_in_order_then_the_cursor_moves_on() {
    let server = TestServer::start(|_| {});
    let first = poll(&server, "?channel=a&channel=b").await;
    server.publish_many("a", 0..5).await;
    server.publish_many("b", 0..2).await;
    let reply = poll(
        &server,
        &format!("?channel=a&channel=b&cursor={}", first.cursor),
    )
    .await;
    let mut a = Vec::new();
    let mut b = Vec::new();
    for event in &reply.events {
        match event["channel"].as_str().unwrap() {
            "a" => a.push(event["seq"].as_u64().unwrap()),
            _ => b.push(event["seq"].as_u64().unwrap()),
        }
    }
    assert_eq!(a, [1, 2, 3, 4, 5]);
    assert_eq!(b, [1, 2]);
    // Polling again with the new cursor gets nothing twice.
    server.publish("a", serde_json::json!("next")).await;
    let again = poll(
        &server,
        &format!("?channel=a&channel=b&cursor={}", reply.cursor),
    )
    .await;
    assert_eq!(seqs(&again.events), [6]);
}

#[tokio::test]
async fn timeouts_reply_empty_and_trimmed_cursors_reply_with_resets() {
    let server = TestServer::start(|settings| settings.history_size = 2);
    let first = poll(&server, "?channel=q").await;
    let started = Instant::now();
    let empty = poll(
        &server,
        &format!("?channel=q&cursor={}&timeout=1", first.cursor),
    )
    .await;
    assert!(empty.events.is_empty() && empty.resets.is_empty());
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "the poll was held"
    );
    assert_eq!(empty.cursor, first.cursor);

    server.publish_many("q", 0..10).await;
    let reply = poll(&server, &format!("?channel=q&cursor={}", first.cursor)).await;
    assert_eq!(reply.resets.len(), 1);
    assert_eq!(reply.resets[0]["reason"], "truncated");
    assert!(reply.cursor.ends_with(":10"), "{}", reply.cursor);
}
