//! Saturation without cut-offs (issue 17): a client reading as fast as it can through a
//! publish burst bigger than its subscriber queue keeps its connection and gets every event
//! once and in order (the server catches it up from history), while a client that stops
//! reading is still cut, by how long its socket stays unwritable, with bounded memory
//! (`websocket.rs`'s stuck-client test covers the cut and the resume after it).

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use resync_broker::{Broker, Publish};
use resync_protocol::{Channel, Payload, ServerFrame};
use resync_server::BrokerKind;
use resync_tests::{TestServer, WsClient};

/// Publishes `total` events straight into the broker, without yielding: far faster than any
/// socket takes them.
fn burst_into(
    memory: &resync_broker::MemoryBroker,
    channel: &str,
    total: u64,
) -> tokio::task::JoinHandle<()> {
    let memory = memory.clone();
    let channel = Channel::new(channel).unwrap();
    tokio::spawn(async move {
        for n in 0..total {
            let data = Payload::from_value(&serde_json::json!({ "n": n })).unwrap();
            memory
                .publish(Publish::new(channel.clone(), data))
                .await
                .unwrap();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_speed_reader_outrun_by_a_burst_is_caught_up_not_cut_off() {
    let server = TestServer::start(|settings| {
        // These tests publish through the memory broker directly.
        settings.broker = BrokerKind::Memory;
        settings.subscriber_queue = 16;
    });
    let memory = server.server.memory_broker.clone().unwrap();
    let mut reader = WsClient::connect_ready(&server.ws_url("")).await;
    reader.subscribe("burst", None).await;
    let total = 3_000u64;
    let publisher = burst_into(&memory, "burst", total);
    let mut last = 0;
    while last < total {
        match reader.frame().await {
            ServerFrame::Event(event) => {
                assert_eq!(
                    event.position.seq.get(),
                    last + 1,
                    "in order, no gap, no duplicate"
                );
                last = event.position.seq.get();
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    publisher.await.unwrap();
    assert!(
        memory.subscriber_overflows() >= 1,
        "the burst overflowed the 16-event queue ({} overflows): the fault happened",
        memory.subscriber_overflows()
    );
    assert_eq!(
        server
            .metric("resync_slow_consumer_closes_total{transport=\"websocket\"}")
            .await,
        0,
        "nobody was cut off"
    );
    assert_eq!(
        server
            .metric("resync_connections_total{transport=\"websocket\"}")
            .await,
        1,
        "the reader kept its one connection"
    );
    // Live again after the burst.
    server
        .publish("burst", serde_json::json!({"after": true}))
        .await;
    assert_eq!(reader.next_event("burst").await.seq.get(), total + 1);
}

/// Lagging subscribers made in the broker itself (queue of 1, two events each): the state a
/// server is in when its fan-out falls behind its publishers.
async fn lagging_subscribers(
    server: &TestServer,
    count: usize,
) -> Vec<resync_broker::LiveSubscription> {
    let memory = server.server.memory_broker.clone().unwrap();
    let channel = Channel::new(format!("lagging-{count}")).unwrap();
    let mut subscriptions = Vec::new();
    for _ in 0..count {
        subscriptions.push(memory.subscribe(&channel).await.unwrap());
    }
    for n in 0..2 {
        let data = Payload::from_value(&serde_json::json!({ "n": n })).unwrap();
        memory
            .publish(Publish::new(channel.clone(), data))
            .await
            .unwrap();
    }
    subscriptions
}

async fn publish_status(server: &TestServer, channel: &str) -> (u16, Option<String>, String) {
    let response = server
        .http
        .post(server.url("/api/publish"))
        .bearer_auth(&server.server.api_key)
        .json(&serde_json::json!({ "channel": channel, "data": {"n": 1} }))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().to_owned());
    (status, retry_after, response.text().await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishers_wait_while_most_subscribers_lag_and_past_the_hold_get_503_with_retry_after() {
    let server = TestServer::start(|settings| {
        settings.broker = BrokerKind::Memory;
        settings.subscriber_queue = 1;
        settings.publish_hold_max_ms = 300;
    });
    let lagging = lagging_subscribers(&server, 10).await;
    let memory = server.server.memory_broker.clone().unwrap();
    assert_eq!(
        memory.delivery_lag().lagging,
        10,
        "the fault happened: every subscriber is behind by more than its queue"
    );

    let started = std::time::Instant::now();
    let (status, retry_after, body) = publish_status(&server, "refused").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(retry_after.as_deref(), Some("1"));
    assert!(
        body.contains("unavailable") && body.contains("behind"),
        "{body}"
    );
    assert!(
        started.elapsed() >= std::time::Duration::from_millis(300),
        "held first"
    );
    let position = memory
        .position(&Channel::new("refused").unwrap())
        .await
        .unwrap();
    assert_eq!(position.seq.get(), 0, "a refused publish is not stored");

    assert_eq!(server.metric("resync_publishes_held_total").await, 1);
    assert_eq!(
        server.metric("resync_publishes_refused_busy_total").await,
        1
    );
    drop(lagging);
    drop(server);

    // Held, then stored once the subscribers catch up within the hold (a long one, so a
    // busy machine's slow catch-up does not turn it into a refusal).
    let server = TestServer::start(|settings| {
        settings.broker = BrokerKind::Memory;
        settings.subscriber_queue = 1;
        settings.publish_hold_max_ms = 60_000;
    });
    let mut lagging = lagging_subscribers(&server, 10).await;
    let publishing = tokio::spawn({
        let http = server.http.clone();
        let url = server.url("/api/publish");
        let key = server.server.api_key.clone();
        async move {
            let started = std::time::Instant::now();
            let response = http
                .post(url)
                .bearer_auth(key)
                .json(&serde_json::json!({ "channel": "held", "data": {"n": 1} }))
                .send()
                .await
                .unwrap();
            (response.status().as_u16(), started.elapsed())
        }
    });
    // The publish is held while the subscribers lag (the server says so), and stored once
    // they catch up: waited for as events, not as time (issue 29, defect 6).
    while server.metric("resync_publishes_waiting").await != 1 {
        tokio::task::yield_now().await;
    }
    assert!(!publishing.is_finished(), "held while the subscribers lag");
    for subscription in &mut lagging {
        while subscription.recv().await.unwrap() != resync_broker::Live::Resync {}
    }
    let (status, _took) = publishing.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(server.metric("resync_publishes_waiting").await, 0);
    assert_eq!(server.metric("resync_publishes_held_total").await, 1);
    assert_eq!(
        server.metric("resync_publishes_refused_busy_total").await,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_few_lagging_subscribers_among_many_do_not_hold_publishers_back() {
    let server = TestServer::start(|settings| {
        settings.broker = BrokerKind::Memory;
        settings.subscriber_queue = 1;
        settings.publish_hold_max_ms = 5_000;
    });
    // 8 of 40 behind (20%, under the 25% share): slow clients, not a server behind.
    let _lagging = lagging_subscribers(&server, 8).await;
    let memory = server.server.memory_broker.clone().unwrap();
    let _readers: Vec<_> = {
        let channel = Channel::new("keeping-up").unwrap();
        let mut readers = Vec::new();
        for _ in 0..32 {
            readers.push(memory.subscribe(&channel).await.unwrap());
        }
        readers
    };
    assert_eq!(
        memory.delivery_lag(),
        resync_broker::DeliveryLag {
            lagging: 8,
            subscribers: 40
        }
    );
    let started = std::time::Instant::now();
    let (status, _, body) = publish_status(&server, "free").await;
    assert_eq!(status, 200, "{body}");
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "not held: {:?}",
        started.elapsed()
    );
    assert_eq!(server.metric("resync_publishes_held_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_sse_reader_outrun_by_a_burst_keeps_its_stream_and_gets_every_event_in_order() {
    let server = TestServer::start(|settings| {
        // These tests publish through the memory broker directly.
        settings.broker = BrokerKind::Memory;
        settings.subscriber_queue = 16;
    });
    let memory = server.server.memory_broker.clone().unwrap();
    let mut reader = resync_tests::SseClient::connect(&server, "?channel=burst", None).await;
    assert_eq!(reader.status, 200);
    assert_eq!(reader.next_event().await.unwrap().event, "subscribed");
    let total = 3_000u64;
    let publisher = burst_into(&memory, "burst", total);
    for expected in 1..=total {
        assert_eq!(reader.next_seq("burst").await, expected, "in order, no gap");
    }
    publisher.await.unwrap();
    assert!(
        memory.subscriber_overflows() >= 1,
        "the burst overflowed the 16-event queue: the fault happened"
    );
    assert_eq!(
        server
            .metric("resync_connections_total{transport=\"sse\"}")
            .await,
        1,
        "the reader kept its one stream"
    );
}
