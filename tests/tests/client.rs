//! The Rust client over real sockets: exact delivery while a proxy cuts connections, heartbeat
//! detection of a blackholed connection, transport fallback, server restarts, close codes,
//! publishing, token refresh and snapshots.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use resync_client::{
    Client, ConnectionState, SnapshotUpdate, Subscription, TransportChoice, TransportKind, Update,
};
use resync_protocol::{Channel, Payload, Position, ResetReason, Seq};
use resync_tests::proxy::ChaosProxy;
use resync_tests::{TestServer, collect_seqs, fast_backoff, fast_client};

fn client(base: &str, transport: TransportChoice) -> Client {
    fast_client(base, transport)
}

async fn channel_start(server: &TestServer, channel: &str) -> Position {
    server.position(channel).await
}

async fn collect(subscription: Subscription, count: usize, label: &str) -> Vec<u64> {
    collect_seqs(subscription, count as u64, label).await
}

async fn wait_for_state(
    client: &Client,
    wanted: impl Fn(&ConnectionState) -> bool,
    label: &str,
) -> ConnectionState {
    let mut state = client.state();
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        state.wait_for(|state| wanted(state)),
    )
    .await;
    match result {
        Ok(Ok(state)) => state.clone(),
        _ => panic!(
            "{label}: state never matched; last {:?}",
            *client.state().borrow()
        ),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_event_arrives_exactly_once_while_a_proxy_cuts_connections() {
    let server = TestServer::start(|settings| settings.ping_interval_secs = 1);
    let proxy = ChaosProxy::start(server.server.addresses[0]).await;
    let start = channel_start(&server, "chaos").await;
    let choices = [
        ("auto", TransportChoice::Auto),
        ("websocket", TransportChoice::Only(TransportKind::WebSocket)),
        ("sse", TransportChoice::Only(TransportKind::Sse)),
        ("polling", TransportChoice::Only(TransportKind::LongPolling)),
    ];
    let mut collectors = Vec::new();
    let mut clients = Vec::new();
    for (label, choice) in choices {
        let client = client(&proxy.base_url(), choice);
        let subscription = client
            .subscribe(Channel::new("chaos").unwrap())
            .since(start.clone());
        collectors.push(tokio::spawn(collect(subscription, 1_000, label)));
        clients.push(client);
    }
    let chaos = {
        let proxy = Arc::new(proxy);
        let cutter = proxy.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(fastrand::u64(100..400))).await;
                cutter.cut_all();
            }
        });
        (proxy, task)
    };
    for value in 0..1_000u64 {
        server
            .publish("chaos", serde_json::json!({ "n": value }))
            .await;
        if value % 20 == 0 {
            tokio::time::sleep(Duration::from_millis(15)).await;
        }
    }
    for (collector, (label, _)) in collectors.into_iter().zip(choices) {
        let seqs = collector.await.unwrap();
        assert_eq!(
            seqs,
            (1..=1_000).collect::<Vec<_>>(),
            "{label}: all 1,000, in order, exactly once"
        );
    }
    chaos.1.abort();
    let proxy = chaos.0;
    // Prove the fault happened: connections were really cut, and clients came back each time.
    assert!(
        proxy.cut() >= 5,
        "only {} connections were cut",
        proxy.cut()
    );
    assert!(
        proxy.accepted() >= 4 + proxy.cut() / 2,
        "clients reconnected: {} accepted",
        proxy.accepted()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blackholed_connection_is_detected_by_the_heartbeat_and_replaced() {
    let server = TestServer::start(|settings| settings.ping_interval_secs = 1);
    let proxy = ChaosProxy::start(server.server.addresses[0]).await;
    let client = client(
        &proxy.base_url(),
        TransportChoice::Only(TransportKind::WebSocket),
    );
    let mut subscription = client
        .subscribe(Channel::new("dark").unwrap())
        .since(channel_start(&server, "dark").await);
    server.publish("dark", serde_json::json!(1)).await;
    assert!(matches!(
        subscription.next().await,
        Some(Ok(Update::Event(_)))
    ));

    proxy.set_blackhole(true);
    let mut states = client.state();
    states.borrow_and_update();
    for value in 2..=5 {
        server.publish("dark", serde_json::json!(value)).await;
    }
    // TCP reports nothing; only the missing pings reveal the dead connection.
    wait_for_state(
        &client,
        |state| {
            matches!(
                state,
                ConnectionState::Reconnecting { .. } | ConnectionState::Connecting { .. }
            )
        },
        "detects the blackhole",
    )
    .await;
    proxy.set_blackhole(false);
    wait_for_state(
        &client,
        |state| matches!(state, ConnectionState::Connected { .. }),
        "reconnects",
    )
    .await;
    let seqs = collect(subscription, 4, "after blackhole").await;
    assert_eq!(seqs, [2, 3, 4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_websockets_fall_back_to_sse_then_long_polling() {
    let server = TestServer::start(|_| {});
    let proxy = ChaosProxy::start(server.server.addresses[0]).await;
    let start = channel_start(&server, "fallback").await;

    proxy.refuse_websocket(true);
    let sse_client = client(&proxy.base_url(), TransportChoice::Auto);
    // Every state the client passes through, to say why when it does not settle on SSE.
    let history = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut states = sse_client.state();
    let recorder = tokio::spawn({
        let history = history.clone();
        async move {
            loop {
                history
                    .lock()
                    .unwrap()
                    .push(states.borrow_and_update().clone());
                if states.changed().await.is_err() {
                    return;
                }
            }
        }
    });
    let sse_subscription = sse_client
        .subscribe(Channel::new("fallback").unwrap())
        .since(start.clone());
    let sse_collector = tokio::spawn(collect(sse_subscription, 20, "sse fallback"));
    let settled = tokio::time::timeout(Duration::from_secs(20), async {
        let mut state = sse_client.state();
        state
            .wait_for(|state| {
                *state
                    == ConnectionState::Connected {
                        transport: TransportKind::Sse,
                    }
            })
            .await
            .is_ok()
    })
    .await;
    assert!(
        matches!(settled, Ok(true)),
        "falls back to sse; the states were {:?}",
        history.lock().unwrap()
    );
    recorder.abort();

    proxy.refuse_sse(true);
    let poll_client = client(&proxy.base_url(), TransportChoice::Auto);
    let poll_subscription = poll_client
        .subscribe(Channel::new("fallback").unwrap())
        .since(start);
    let poll_collector = tokio::spawn(collect(poll_subscription, 20, "polling fallback"));
    wait_for_state(
        &poll_client,
        |state| {
            *state
                == ConnectionState::Connected {
                    transport: TransportKind::LongPolling,
                }
        },
        "falls back to polling",
    )
    .await;

    server.publish_many("fallback", 0..20).await;
    assert_eq!(sse_collector.await.unwrap(), (1..=20).collect::<Vec<_>>());
    assert_eq!(poll_collector.await.unwrap(), (1..=20).collect::<Vec<_>>());
    assert!(
        proxy.refused() >= 3,
        "the proxy really refused: {}",
        proxy.refused()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_in_memory_server_is_reported_as_an_epoch_reset() {
    let port = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().port()
    };
    let listen: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let first = TestServer::start(|settings| settings.listen = listen);
    let client = client(
        &first.server.base_url(),
        TransportChoice::Only(TransportKind::WebSocket),
    );
    let mut subscription = client
        .subscribe(Channel::new("restart").unwrap())
        .since(channel_start(&first, "restart").await);
    first.publish("restart", serde_json::json!("before")).await;
    let Some(Ok(Update::Event(before))) = subscription.next().await else {
        panic!("no event before restart")
    };
    drop(first);

    let second = TestServer::start(|settings| settings.listen = listen);
    match tokio::time::timeout(Duration::from_secs(20), subscription.next())
        .await
        .unwrap()
    {
        Some(Ok(Update::Reset { reason, position })) => {
            assert_eq!(reason, ResetReason::EpochChanged);
            assert_ne!(position.epoch, before.position.epoch);
        }
        other => panic!("expected an epoch reset, got {other:?}"),
    }
    second.publish("restart", serde_json::json!("after")).await;
    match tokio::time::timeout(Duration::from_secs(10), subscription.next())
        .await
        .unwrap()
    {
        Some(Ok(Update::Event(event))) => assert_eq!(event.data.as_str(), "\"after\""),
        other => panic!("expected the new event, got {other:?}"),
    }
}

/// A WebSocket server that greets and then closes every connection with `code`.
async fn closing_server(code: u16) -> (String, Arc<AtomicU64>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let connections = Arc::new(AtomicU64::new(0));
    let counter = connections.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                use futures_util::SinkExt;
                use tokio_tungstenite::tungstenite::Message;
                use tokio_tungstenite::tungstenite::protocol::CloseFrame;
                let Ok(mut socket) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                let connected = r#"{"type":"connected","client_id":"fake","ping_interval_ms":30000,"protocol":1}"#;
                let _ = socket.send(Message::text(connected)).await;
                let _ = socket
                    .send(Message::Close(Some(CloseFrame {
                        code: code.into(),
                        reason: "bye".into(),
                    })))
                    .await;
                while socket.next().await.is_some() {}
            });
        }
    });
    (format!("http://{address}"), connections)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_code_1000_never_reconnects_but_shutdown_does() {
    let (url, connections) = closing_server(1000).await;
    let done = client(&url, TransportChoice::Only(TransportKind::WebSocket));
    let mut subscription = done.subscribe(Channel::new("x").unwrap());
    let ended = tokio::time::timeout(Duration::from_secs(5), subscription.next())
        .await
        .unwrap();
    assert!(
        matches!(ended, Some(Err(resync_client::Error::Terminal(_)))),
        "{ended:?}"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        connections.load(Ordering::SeqCst),
        1,
        "1000 means done: never reconnect"
    );
    assert!(matches!(
        *done.state().borrow(),
        ConnectionState::Closed { .. }
    ));

    let (url, connections) = closing_server(4200).await;
    let restarting = client(&url, TransportChoice::Only(TransportKind::WebSocket));
    let mut subscription = restarting.subscribe(Channel::new("x").unwrap());
    let _ = tokio::time::timeout(Duration::from_secs(2), subscription.next()).await;
    assert!(
        connections.load(Ordering::SeqCst) >= 3,
        "4200 means reconnect: {}",
        connections.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_over_websocket_and_refreshes_expiring_tokens() {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(resync_tests::JWT_SECRET.into());
        settings.anonymous_subscribe = Some(vec![]);
    });
    let refreshes = Arc::new(AtomicU64::new(0));
    let counter = refreshes.clone();
    let client = Client::builder(&server.server.base_url())
        .transport(TransportChoice::Only(TransportKind::WebSocket))
        .backoff(fast_backoff())
        .token_refresher(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async move {
                // Tokens that expire after two seconds, so the server closes with 4300.
                let exp = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_secs()
                    + 2;
                Ok(resync_actix::jwt::sign(
                    &resync_actix::jwt::Claims {
                        exp,
                        subscribe: vec!["*".into()],
                        publish: vec!["chat:*".into()],
                        ..Default::default()
                    },
                    resync_tests::JWT_SECRET.as_bytes(),
                ))
            }
        })
        .build()
        .unwrap();
    let channel = Channel::new("chat:1").unwrap();
    let mut subscription = client.subscribe(channel.clone()).since(Position::start_of(
        channel_start(&server, "chat:1").await.epoch,
    ));
    // Register the subscription, then publish through the same connection.
    let publisher = client.clone();
    let published = tokio::spawn(async move {
        publisher
            .publish(channel, Payload::from_json("{\"text\":\"hi\"}").unwrap())
            .await
    });
    let Some(Ok(Update::Event(event))) = subscription.next().await else {
        panic!("no event")
    };
    assert_eq!(event.data.as_str(), "{\"text\":\"hi\"}");
    assert_eq!(published.await.unwrap().unwrap(), event.position);

    // Outlive two tokens: the client refreshes and keeps following.
    tokio::time::sleep(Duration::from_secs(5)).await;
    server.publish("chat:1", serde_json::json!("later")).await;
    let Some(Ok(Update::Event(later))) =
        tokio::time::timeout(Duration::from_secs(10), subscription.next())
            .await
            .unwrap()
    else {
        panic!("no event after refresh")
    };
    assert_eq!(later.position.seq, Seq::new(2));
    assert!(
        refreshes.load(Ordering::SeqCst) >= 2,
        "refresher called {} times",
        refreshes.load(Ordering::SeqCst)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_refetched_on_reset() {
    let server = Arc::new(TestServer::start(|settings| settings.history_size = 3));
    let proxy = ChaosProxy::start(server.server.addresses[0]).await;
    let fetches = Arc::new(AtomicU64::new(0));
    let client = client(
        &proxy.base_url(),
        TransportChoice::Only(TransportKind::WebSocket),
    );
    let fetch_server = server.clone();
    let fetch_count = fetches.clone();
    // The "state" is the seq the snapshot reflects.
    let mut stream = client.subscribe_with_snapshot(Channel::new("snap").unwrap(), move || {
        let server = fetch_server.clone();
        let count = fetch_count.clone();
        async move {
            count.fetch_add(1, Ordering::SeqCst);
            let position = channel_start(&server, "snap").await;
            Ok::<_, String>((position.seq.get(), position))
        }
    });
    let Some(Ok(SnapshotUpdate::Snapshot {
        state: 0,
        after_reset: None,
        ..
    })) = stream.next().await
    else {
        panic!("first snapshot")
    };
    server.publish("snap", serde_json::json!(1)).await;
    let Some(Ok(SnapshotUpdate::Event(event))) = stream.next().await else {
        panic!("event after snapshot")
    };
    assert_eq!(event.position.seq.get(), 1);

    // Cut the client off while more is published than history keeps: it must refetch.
    proxy.set_blackhole(true);
    proxy.cut_all();
    server.publish_many("snap", 1..11).await;
    proxy.set_blackhole(false);
    match tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .unwrap()
    {
        Some(Ok(SnapshotUpdate::Snapshot {
            state, after_reset, ..
        })) => {
            assert_eq!(after_reset, Some(ResetReason::Truncated));
            assert_eq!(state, 11, "the new snapshot reflects everything published");
        }
        other => panic!("expected a new snapshot, got {other:?}"),
    }
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    server.publish("snap", serde_json::json!(12)).await;
    let Some(Ok(SnapshotUpdate::Event(event))) = stream.next().await else {
        panic!("event after refetch")
    };
    assert_eq!(
        event.position.seq.get(),
        12,
        "events continue right after the new snapshot"
    );
}
