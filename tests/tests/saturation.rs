//! Saturation without cut-offs (issue 17): a client reading as fast as it can through a
//! publish burst bigger than its subscriber queue keeps its connection and gets every event
//! once and in order (the server catches it up from history), while a client that stops
//! reading is still cut, by how long its socket stays unwritable, with bounded memory
//! (`websocket.rs`'s stuck-client test covers the cut and the resume after it).

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use resync_broker::{Broker, Publish};
use resync_protocol::{Channel, Payload, ServerFrame};
use resync_tests::{TestServer, WsClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_speed_reader_outrun_by_a_burst_is_caught_up_not_cut_off() {
    let server = TestServer::start(|settings| settings.subscriber_queue = 16);
    let memory = server.server.memory_broker.clone().unwrap();
    let mut reader = WsClient::connect_ready(&server.ws_url("")).await;
    reader.subscribe("burst", None).await;
    let channel = Channel::new("burst").unwrap();
    let total = 3_000u64;
    // Published straight into the broker, without yielding: far faster than any socket.
    let publisher = tokio::spawn({
        let memory = memory.clone();
        async move {
            for n in 0..total {
                let data = Payload::from_value(&serde_json::json!({ "n": n })).unwrap();
                memory
                    .publish(Publish::new(channel.clone(), data))
                    .await
                    .unwrap();
            }
        }
    });
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
