//! Issue 27, keyed channels: a client the history no longer reaches catches up from the latest
//! event of each key (the channel's state, in pages, then the events after it) with no reset,
//! on WebSocket, SSE and long polling alike, and ends with exactly what a model of the
//! publishes says; deletes are honoured.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::collections::BTreeMap;
use std::time::Duration;

use futures_util::StreamExt;
use resync_client::{TransportChoice, TransportKind, Update};
use resync_protocol::{Channel, Position};
use resync_tests::{TestServer, fast_client};

/// The brokers that keep keyed state.
const BROKERS: [resync_server::BrokerKind; 2] = [
    resync_server::BrokerKind::Memory,
    resync_server::BrokerKind::Disk,
];

/// A server on `broker` whose `prices` namespace is keyed, with a short history.
fn server_on(broker: resync_server::BrokerKind) -> TestServer {
    TestServer::start(|settings| keyed_prices(settings, broker))
}

fn keyed_prices(settings: &mut resync_server::Settings, broker: resync_server::BrokerKind) {
    settings.broker = broker;
    settings.history_size = 20;
    settings.namespaces.insert(
        "prices".to_owned(),
        resync_server::NamespaceSettings {
            keyed: Some(true),
            ..Default::default()
        },
    );
}

/// Publishes `data` for `key` through the HTTP API; `null` deletes the key.
async fn publish(
    server: &TestServer,
    channel: &str,
    key: &str,
    data: serde_json::Value,
) -> Position {
    let response = server
        .http
        .post(server.url("/api/publish"))
        .bearer_auth(&server.server.api_key)
        .json(&serde_json::json!({"channel": channel, "key": key, "data": data}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200, "{}", response.text().await.unwrap());
    let body: serde_json::Value = response.json().await.unwrap();
    serde_json::from_value(body["position"].clone()).unwrap()
}

/// What a keyed subscriber holds: each key's seq and data (`None`: deleted), kept by the rule
/// of docs/protocol.md: a state replaces what is held, and an event applies only past the
/// seq held for its key.
#[derive(Default)]
struct Held {
    keys: BTreeMap<String, (u64, Option<String>)>,
    /// Whether the last update was a state page with more to come.
    in_state: bool,
    states: usize,
    resets: usize,
}

impl Held {
    fn apply(&mut self, update: Update) {
        match update {
            Update::State { entries, more, .. } => {
                if !self.in_state {
                    self.keys.clear();
                    self.states += 1;
                }
                self.in_state = more;
                for entry in entries {
                    let data = entry.data.map(|data| data.as_str().to_owned());
                    self.keys
                        .insert(entry.key.to_string(), (entry.seq.get(), data));
                }
            }
            Update::Event(event) => {
                let key = event.key.as_ref().unwrap().to_string();
                let seq = event.position.seq.get();
                if self.keys.get(&key).is_none_or(|(held, _)| *held < seq) {
                    let data = event.data.as_str();
                    self.keys
                        .insert(key, (seq, (data != "null").then(|| data.to_owned())));
                }
            }
            Update::Reset { .. } => self.resets += 1,
            Update::Members(_) => {}
        }
    }

    fn values(&self) -> BTreeMap<String, String> {
        self.keys
            .iter()
            .filter_map(|(key, (_, data))| Some((key.clone(), data.clone()?)))
            .collect()
    }
}

fn server() -> TestServer {
    server_on(resync_server::BrokerKind::Memory)
}

#[tokio::test]
async fn a_client_far_behind_a_keyed_channel_catches_up_from_its_state_on_every_transport_and_broker()
 {
    for broker in BROKERS {
        far_behind_catches_up(broker, server_on(broker)).await;
    }
    // And on Redis: the state is a hash beside the channel's stream, in its slot.
    let redis = resync_tests::redis_server::RedisServer::start();
    let url = redis.url();
    let server = TestServer::start(|settings| {
        keyed_prices(settings, resync_server::BrokerKind::Redis);
        settings.redis_url = url;
    });
    far_behind_catches_up(resync_server::BrokerKind::Redis, server).await;
}

async fn far_behind_catches_up(broker: resync_server::BrokerKind, server: TestServer) {
    for kind in [
        TransportKind::WebSocket,
        TransportKind::Sse,
        TransportKind::LongPolling,
    ] {
        let channel = format!("prices:{}", kind.as_str());
        // The client's place: the first event, long gone from a 20-event history by the end.
        let first = publish(&server, &channel, "k0", serde_json::json!(0)).await;
        let mut model: BTreeMap<String, String> = BTreeMap::new();
        model.insert("k0".to_owned(), "0".to_owned());
        // 1,000 keys of 2 KB: more than one page, and more than one long-poll reply (1 MiB).
        let filler = "x".repeat(2_000);
        for index in 0..1_000u64 {
            let key = format!("k{}", index % 1_000);
            let data = serde_json::json!(format!("{index}{filler}"));
            publish(&server, &channel, &key, data.clone()).await;
            model.insert(key, data.to_string());
        }
        // Then changes to a few keys, and deletes.
        for index in 0..60u64 {
            let key = format!("k{}", index % 7);
            if index % 5 == 0 {
                publish(&server, &channel, &key, serde_json::Value::Null).await;
                model.remove(&key);
            } else {
                publish(&server, &channel, &key, serde_json::json!(index)).await;
                model.insert(key, index.to_string());
            }
        }
        let client = fast_client(&server.url(""), TransportChoice::Only(kind));
        let mut subscription = client
            .subscribe(Channel::new(&channel).unwrap())
            .since(first);
        let mut held = Held::default();
        // Until the state and the events after it are in: then it holds the model.
        while held.states == 0 || held.in_state || held.values() != model {
            let update = tokio::time::timeout(Duration::from_secs(30), subscription.next())
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "{kind:?}: stalled with {} keys held, {} states",
                        held.keys.len(),
                        held.states
                    )
                })
                .unwrap()
                .unwrap();
            held.apply(update);
        }
        assert_eq!(held.states, 1, "{broker:?} {kind:?}: one state read");
        assert_eq!(held.resets, 0, "{broker:?} {kind:?}: no reset");
        // Then live, each change applied once.
        publish(&server, &channel, "k3", serde_json::json!("live")).await;
        model.insert("k3".to_owned(), "\"live\"".to_owned());
        while held.values() != model {
            let update = tokio::time::timeout(Duration::from_secs(30), subscription.next())
                .await
                .unwrap_or_else(|_| panic!("{kind:?}: the live change never came"))
                .unwrap()
                .unwrap();
            held.apply(update);
        }
        client.close();
    }
}

#[tokio::test]
async fn a_publish_must_name_a_key_on_a_keyed_channel_and_only_there() {
    let server = server();
    let refused = server
        .http
        .post(server.url("/api/publish"))
        .bearer_auth(&server.server.api_key)
        .json(&serde_json::json!({"channel": "prices:eu", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "key_mismatch");
    let refused = server
        .http
        .post(server.url("/api/publish"))
        .bearer_auth(&server.server.api_key)
        .json(&serde_json::json!({"channel": "news", "key": "k", "data": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["code"], "key_mismatch");
}

#[tokio::test]
async fn the_http_api_reads_a_keyed_channels_state_in_pages() {
    let server = server();
    for (key, data) in [("b", "2"), ("a", "1"), ("c", "3"), ("b", "4")] {
        publish(&server, "prices:api", key, serde_json::json!(data)).await;
    }
    let last = publish(&server, "prices:api", "c", serde_json::Value::Null).await;
    let mut after = None::<String>;
    let mut entries = Vec::new();
    let mut first_position = None;
    loop {
        let mut query = "limit=2".to_owned();
        if let Some(after) = &after {
            query.push_str(&format!("&after={after}"));
        }
        let page = state_page(&server, "prices:api", &query).await;
        first_position.get_or_insert(page.position.clone());
        entries.extend(page.entries);
        match page.next {
            Some(next) => after = Some(next.to_string()),
            None => break,
        }
    }
    assert_eq!(first_position, Some(last), "the position to follow from");
    let summary: Vec<(String, u64, Option<String>)> = entries
        .into_iter()
        .map(|entry| {
            (
                entry.key.to_string(),
                entry.seq.get(),
                entry.data.map(|data| data.as_str().to_owned()),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("a".to_owned(), 2, Some("\"1\"".to_owned())),
            ("b".to_owned(), 4, Some("\"4\"".to_owned())),
            ("c".to_owned(), 5, None),
        ]
    );
}

#[tokio::test]
async fn a_state_asked_with_a_reachable_position_is_followed_by_every_event_after_that_position() {
    // A keyed subscription joining a channel its connection already follows from `since`:
    // the state comes, and then every event after `since` (not only after the state's), so
    // the connection's other subscriptions miss nothing.
    let server = server_on(resync_server::BrokerKind::Disk);
    let channel = "prices:joined";
    let mut positions = Vec::new();
    for index in 0..10u64 {
        positions.push(
            publish(
                &server,
                channel,
                &format!("k{}", index % 3),
                serde_json::json!(index),
            )
            .await,
        );
    }
    let since = positions[6].clone();
    let mut socket = resync_tests::WsClient::connect_ready(&server.ws_url("")).await;
    socket
        .send(&resync_protocol::ClientFrame::Subscribe {
            id: 1,
            channel: Channel::new(channel).unwrap(),
            since: Some(since.clone()),
            presence: None,
            join_leave: false,
            state: true,
        })
        .await;
    let mut states = 0;
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        match socket.frame().await {
            resync_protocol::ServerFrame::Subscribed { recovery, .. } => assert!(
                matches!(recovery, resync_protocol::RecoveryOutcome::State { .. }),
                "{recovery:?}"
            ),
            resync_protocol::ServerFrame::State { entries, more, .. } => {
                assert_eq!(entries.len(), 3);
                assert!(!more);
                states += 1;
            }
            resync_protocol::ServerFrame::Event(event) => seqs.push(event.position.seq.get()),
            _ => {}
        }
    }
    assert_eq!(states, 1);
    assert_eq!(seqs, [8, 9, 10], "every event after since = 7, in order");
}

#[tokio::test]
async fn state_1_reads_no_state_for_a_channel_the_cursor_names_and_a_named_state_does() {
    // A bare `EventSource` keeps its URL (`state=1`) and reconnects with `Last-Event-ID`: it
    // must not read the whole state again at every reconnect. Naming the channel asks anyway.
    let server = server();
    let channel = "prices:wish";
    let mut last = None;
    for index in 0..5u64 {
        last = Some(
            publish(
                &server,
                channel,
                &format!("k{index}"),
                serde_json::json!(index),
            )
            .await,
        );
    }
    let last = last.unwrap();
    let cursor = format!("{channel}:{}:{}", last.epoch, last.seq.get());
    let outcome = |query: String, id: Option<String>| {
        let server = &server;
        async move {
            let mut stream = resync_tests::SseClient::connect(server, &query, id.as_deref()).await;
            let opening = stream.next().await.unwrap();
            assert_eq!(opening.event, "subscribed");
            let data: serde_json::Value = serde_json::from_str(&opening.data).unwrap();
            data["channels"][channel]["outcome"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    assert_eq!(
        outcome(format!("?channels={channel}&state=1"), Some(cursor.clone())).await,
        "up_to_date",
        "state=1 with the channel in the cursor"
    );
    assert_eq!(
        outcome(format!("?channels={channel}&state=1"), None).await,
        "state"
    );
    assert_eq!(
        outcome(format!("?channels={channel}&state={channel}"), Some(cursor)).await,
        "state",
        "a named channel reads its state even from a cursor"
    );
}

/// A page of `channel`'s state from the HTTP API (`query`: `limit=`, `after=`).
async fn state_page(
    server: &TestServer,
    channel: &str,
    query: &str,
) -> resync_protocol::bodies::ChannelState {
    let response = server
        .http
        .get(server.url(&format!("/api/channels/{channel}/state?{query}")))
        .bearer_auth(&server.server.api_key)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    response.json().await.unwrap()
}

/// The keys of `channel`'s state with a value (tombstones left out), from the HTTP API.
async fn state_keys(server: &TestServer, channel: &str) -> Vec<String> {
    let page = state_page(server, channel, "").await;
    assert!(page.next.is_none(), "one page");
    page.entries
        .into_iter()
        .filter(|entry| entry.data.is_some())
        .map(|entry| entry.key.to_string())
        .collect()
}

#[tokio::test]
async fn the_servers_keyed_settings_bound_keys_and_expire_them_on_every_broker() {
    // `keyed_max_keys` and `keyed_key_ttl_secs` reach every broker: a key past the limit is
    // refused with 409 keyed_state_full (a key already held may change), and a key nobody
    // published for its TTL leaves the state.
    let redis = resync_tests::redis_server::RedisServer::start();
    for broker in [
        resync_server::BrokerKind::Memory,
        resync_server::BrokerKind::Disk,
        resync_server::BrokerKind::Redis,
    ] {
        let url = redis.url();
        let server = TestServer::start(|settings| {
            keyed_prices(settings, broker);
            settings.redis_url = url;
            settings.keyed_max_keys = 3;
            settings.keyed_key_ttl_secs = Some(2);
        });
        let channel = format!("prices:limits-{broker:?}");
        // A channel whose state nobody reads: its expired keys must not count either.
        let unread = format!("prices:unread-{broker:?}");
        for key in ["a", "b", "c"] {
            publish(&server, &unread, key, serde_json::json!(key)).await;
        }
        for key in ["a", "b", "c"] {
            publish(&server, &channel, key, serde_json::json!(key)).await;
        }
        assert_eq!(state_keys(&server, &channel).await, ["a", "b", "c"]);
        let refused = server
            .http
            .post(server.url("/api/publish"))
            .bearer_auth(&server.server.api_key)
            .json(&serde_json::json!({"channel": channel, "key": "d", "data": 1}))
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), 409, "{broker:?}: a fourth key");
        let body: serde_json::Value = refused.json().await.unwrap();
        assert_eq!(body["code"], "keyed_state_full", "{broker:?}");
        publish(&server, &channel, "a", serde_json::json!("again")).await;
        // Every key expires 2 s after its last publish: `a` was published last, so `b` and
        // `c` go first (or all at once, on a slow machine); then all of them.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let keys = state_keys(&server, &channel).await;
            if keys.is_empty() {
                break;
            }
            assert!(
                keys == ["a", "b", "c"] || keys == ["a"],
                "{broker:?}: {keys:?}"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "{broker:?}: the keys never expired"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The expired keys no longer count: three new ones fit, on both channels (the unread
        // one's keys were published first, so they expired first).
        for key in ["x", "y", "z"] {
            publish(&server, &unread, key, serde_json::json!(key)).await;
            publish(&server, &channel, key, serde_json::json!(key)).await;
        }
        assert_eq!(state_keys(&server, &channel).await, ["x", "y", "z"]);
        assert_eq!(state_keys(&server, &unread).await, ["x", "y", "z"]);
    }
}

#[tokio::test]
async fn the_rust_clients_keyed_subscription_holds_the_latest_value_of_each_key_on_every_transport()
{
    // A new keyed subscription asks for the state (it has no position), builds its map from
    // the pages, then applies each change once: on every transport the map equals the model.
    let server = server_on(resync_server::BrokerKind::Disk);
    for kind in [
        TransportKind::WebSocket,
        TransportKind::Sse,
        TransportKind::LongPolling,
    ] {
        let channel = format!("prices:map-{}", kind.as_str());
        let mut model: BTreeMap<String, String> = BTreeMap::new();
        // 300 keys of 1 KB: more than one page (256 entries).
        let filler = "y".repeat(1_000);
        for index in 0..300u64 {
            let key = format!("k{index:03}");
            let data = serde_json::json!(format!("{index}{filler}"));
            publish(&server, &channel, &key, data.clone()).await;
            model.insert(key, data.to_string());
        }
        publish(&server, &channel, "k007", serde_json::Value::Null).await;
        model.remove("k007");
        let client = fast_client(&server.url(""), TransportChoice::Only(kind));
        let mut map = client.subscribe_keyed(Channel::new(&channel).unwrap());
        let values = |map: &resync_client::KeyedSubscription| -> BTreeMap<String, String> {
            map.values()
                .map(|(key, data)| (key.to_string(), data.as_str().to_owned()))
                .collect()
        };
        let mut changes = 0;
        while values(&map) != model {
            let change = tokio::time::timeout(Duration::from_secs(30), map.next())
                .await
                .unwrap_or_else(|_| panic!("{kind:?}: stalled at {} keys", map.len()))
                .unwrap()
                .unwrap();
            assert!(
                matches!(change, resync_client::KeyedChange::Keys(_)),
                "{kind:?}: {change:?}"
            );
            changes += 1;
        }
        assert_eq!(changes, 1, "{kind:?}: the whole state as one change");
        // Live: a change, a delete and a new key, each applied once.
        publish(&server, &channel, "k001", serde_json::json!("live")).await;
        publish(&server, &channel, "k002", serde_json::Value::Null).await;
        publish(&server, &channel, "new", serde_json::json!(1)).await;
        model.insert("k001".to_owned(), "\"live\"".to_owned());
        model.remove("k002");
        model.insert("new".to_owned(), "1".to_owned());
        let mut changed = Vec::new();
        while values(&map) != model {
            match tokio::time::timeout(Duration::from_secs(30), map.next())
                .await
                .unwrap_or_else(|_| panic!("{kind:?}: the live changes never came"))
                .unwrap()
                .unwrap()
            {
                resync_client::KeyedChange::Keys(keys) => {
                    changed.extend(keys.into_iter().map(|key| key.to_string()));
                }
                other => panic!("{kind:?}: {other:?}"),
            }
        }
        assert_eq!(changed, ["k001", "k002", "new"], "{kind:?}");
        client.close();
    }
}
