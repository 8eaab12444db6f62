//! Issue 12, "deploys and outages that no client notices": each test is named after the
//! defect it proves fixed (`defect_N_…`). The browser side (bare `EventSource`, the npm
//! `eventsource` package) is in `clients/browser/test/e2e/deploys.test.js`.

use std::time::{Duration, Instant};

use resync_protocol::sse::SseParser;
use resync_tests::redis_server::RedisServer;
use resync_tests::server_process::ServerProcess;
use resync_tests::{SseClient, TestServer, poll};

#[tokio::test]
async fn defect_1_after_sigterm_new_connections_are_refused_and_open_streams_get_a_retry() {
    let mut server = ServerProcess::start(&["--shutdown-spread-ms", "1500"]);
    let http = reqwest::Client::new();
    let mut stream = http
        .get(format!("{}/sse?channel=deploy", server.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    server.terminate();
    // Within the spread the process still runs, but its listener is closed: a client that
    // comes back meets a refused connection (a network error EventSource retries), never a 503.
    let deadline = Instant::now() + Duration::from_secs(1);
    let refused = loop {
        match tokio::net::TcpStream::connect(server.address).await {
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionRefused => break true,
            _ if Instant::now() > deadline => break false,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    assert!(refused, "the listener still accepts after SIGTERM");
    assert!(
        server.is_running(),
        "refused while the process still drains, not because it is gone"
    );
    // The open stream ends with a retry hint.
    let mut parser = SseParser::new();
    let mut retry = None;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(5), stream.chunk())
        .await
        .expect("the stream ends within the spread")
        .unwrap()
    {
        for message in parser.feed(&chunk).unwrap() {
            retry = message.retry_ms.or(retry);
        }
    }
    assert!(retry.is_some(), "the stream ended with a retry: hint");
    assert!(
        server.wait_for_exit(Duration::from_secs(10)),
        "the process exits once drained"
    );
}

#[tokio::test]
async fn defect_1_during_a_broker_outage_sse_answers_a_retry_stream_and_polls_say_when() {
    let mut redis = RedisServer::start();
    let server = ServerProcess::start(&["--broker", "redis", "--redis-url", &redis.url()]);
    let http = reqwest::Client::new();
    let healthy = http
        .get(format!("{}/sse?channel=outage", server.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(healthy.status().as_u16(), 200);
    drop(healthy);
    redis.stop();
    assert!(!redis.is_running(), "the outage happened");

    let response = http
        .get(format!("{}/sse?channel=outage", server.base_url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        200,
        "a non-200 answer would close an EventSource for good"
    );
    assert_eq!(
        response.headers()["content-type"].to_str().unwrap(),
        "text/event-stream"
    );
    let body = tokio::time::timeout(Duration::from_secs(10), response.text())
        .await
        .expect("the retry stream ends by itself")
        .unwrap();
    let messages = SseParser::new().feed(body.as_bytes()).unwrap();
    let retry = messages.iter().find_map(|message| message.retry_ms);
    assert!(
        retry.is_some_and(|retry| retry >= 1_000),
        "says when to retry: {body:?}"
    );

    let poll = http
        .get(format!(
            "{}/poll?channel=outage&cursor=outage:abc:0",
            server.base_url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(poll.status().as_u16(), 503);
    assert!(
        poll.headers().contains_key("retry-after"),
        "503 says when to come back"
    );
}

#[tokio::test]
async fn defect_2_resets_found_at_resume_time_arrive_as_reset_events() {
    let server = TestServer::start(|_| {});
    server.publish("resumed", serde_json::json!(1)).await;
    // An epoch this server never had (a restarted in-memory server), and an unreadable id.
    for (last_event_id, reason) in [
        ("resumed:oldepoch:7", "epoch_changed"),
        ("not a cursor", "bad_cursor"),
    ] {
        let mut client = SseClient::connect(&server, "?channel=resumed", Some(last_event_id)).await;
        assert_eq!(client.status, 200);
        let opening = client.next_event().await.unwrap();
        assert_eq!(opening.event, "subscribed");
        let reset = client.next_event().await.unwrap();
        assert_eq!(reset.event, "reset", "{last_event_id}: {reset:?}");
        let body: serde_json::Value = serde_json::from_str(&reset.data).unwrap();
        assert_eq!(body["channel"], "resumed");
        assert_eq!(body["reason"], reason);
        assert_eq!(body["position"]["seq"], 1, "continues from the head");
    }
}

#[tokio::test]
async fn defect_3_a_long_poll_whose_cursor_names_no_requested_channel_answers_at_once() {
    let server = TestServer::start(|_| {});
    let head = server.publish("polled", serde_json::json!(1)).await;
    for query in [
        "?channel=polled&cursor=&timeout=20".to_owned(),
        format!("?channel=polled&cursor=other:{}:0&timeout=20", head.epoch),
    ] {
        let started = Instant::now();
        let reply = poll(&server, &query).await;
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{query}: held for {:?}",
            started.elapsed()
        );
        assert_eq!(reply.status, 200);
        assert!(
            reply.cursor.contains(&format!("polled:{}:1", head.epoch)),
            "{query}: the reply carries the channel's current position: {}",
            reply.cursor
        );
    }
}
