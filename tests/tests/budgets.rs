//! Issue 25, the budgets: what one client can make the server hold (long-poll replies with
//! presence, non-reading polls in aggregate, presence memory, history, channels), each named
//! after its item and counted from outside.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::time::Duration;

use resync_protocol::{ClientFrame, ErrorCode, Payload, ServerFrame};
use resync_tests::attack::address;
use resync_tests::server_process::ServerProcess;
use resync_tests::{TEST_API_KEY, TestServer, WsClient};

#[tokio::test]
async fn item_11_the_history_budget_bounds_what_the_process_holds() {
    // A budget of 32 MiB of history, 1,500 events of 60 KB over 100 channels (90 MB).
    let budget_mib = 32;
    // The memory broker's budget (the disk broker holds a budget of recent events).
    let server = ServerProcess::start(&[
        "--broker",
        "memory",
        "--history-max-bytes",
        &(budget_mib * 1024 * 1024).to_string(),
        "--max-body-bytes",
        "131072",
    ]);
    let http = reqwest::Client::new();
    let url = format!("{}/api/publish", server.base_url);
    // Warm the server up before measuring where it starts.
    for _ in 0..20 {
        let response = http
            .post(&url)
            .bearer_auth(TEST_API_KEY)
            .json(&serde_json::json!({"channel": "warm", "data": "x"}))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }
    let before = server.rss_kib();
    let data = "x".repeat(60_000);
    let publishes = futures_util::stream::iter(0..1_500).map(|index| {
        let request = http
            .post(&url)
            .bearer_auth(TEST_API_KEY)
            .json(&serde_json::json!({"channel": format!("big:{}", index % 100), "data": data}));
        async move { request.send().await.unwrap().status().is_success() }
    });
    use futures_util::StreamExt;
    let stored = publishes
        .buffer_unordered(8)
        .filter(|stored| std::future::ready(*stored))
        .count()
        .await;
    assert_eq!(stored, 1_500);
    let held_kib = server.rss_kib().saturating_sub(before);
    // The stated factor: what the process holds for history is within 1.5 times the budget
    // (and a few MiB of buffers besides).
    let limit_kib = budget_mib * 1024 * 3 / 2 + 8 * 1024;
    assert!(
        (held_kib as usize) < limit_kib,
        "{held_kib} KiB held for a {budget_mib} MiB history budget (limit {limit_kib} KiB)"
    );
}

/// Publishes `{}` on `channel` over `client`; the reply's error code, or `None` when stored.
async fn client_publish(client: &mut WsClient, channel: &str) -> Option<ErrorCode> {
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Publish {
            id,
            channel: channel.parse().unwrap(),
            data: Payload::from_json("{}").unwrap(),
            idempotency_key: None,
        })
        .await;
    loop {
        match client.frame().await {
            ServerFrame::Published { .. } => return None,
            ServerFrame::Error { code, .. } => return Some(code),
            ServerFrame::Event(_) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test]
async fn item_14_client_publishing_cannot_fill_the_channel_table_or_lock_the_api_out() {
    let server = TestServer::start(|settings| {
        settings.max_channels = 400;
        settings.ws_publishes_per_second = 100_000.0;
        settings.ws_publish_burst = 100_000;
        settings.namespaces.insert(
            "lobby".to_owned(),
            resync_server::NamespaceSettings {
                anonymous_publish: Some(true),
                ..Default::default()
            },
        );
    });
    // One address publishing to 150 new channels: its budget of new channels runs out.
    let mut one = WsClient::connect_ready_from(&server.ws_url(""), address(80)).await;
    let mut made = 0;
    for index in 0..150 {
        if client_publish(&mut one, &format!("lobby:one-{index}"))
            .await
            .is_none()
        {
            made += 1;
        }
    }
    assert!(
        (100..=105).contains(&made),
        "one address made {made} channels"
    );
    // Many addresses together: clients may fill only their share of the table.
    for attacker in 0..4 {
        let mut client =
            WsClient::connect_ready_from(&server.ws_url(""), address(90 + attacker)).await;
        for index in 0..100 {
            client_publish(&mut client, &format!("lobby:many-{attacker}-{index}")).await;
        }
    }
    // The application still makes new channels.
    for index in 0..150 {
        server
            .publish(&format!("app:{index}"), serde_json::json!({"n": index}))
            .await;
    }
}

#[tokio::test]
async fn item_10_presence_counts_against_the_address_budget() {
    // 256 KiB of presence per address: about 200 memberships with 1 KiB of info each.
    let server =
        ServerProcess::start_with_env(&[], &[("RESYNC_MAX_PRESENCE_BYTES_PER_IP", "262144")]);
    let info = Payload::from_value(&serde_json::json!({ "bio": "x".repeat(1000) })).unwrap();
    let url = format!("ws://{}/ws", server.address);
    let (mut joined, mut refused) = (0, 0);
    let mut sockets = Vec::new();
    for socket in 0..4 {
        let mut client = WsClient::connect_ready_from(&url, address(100)).await;
        for channel in 0..128 {
            let id = client.next_request_id();
            client
                .send(&ClientFrame::Subscribe {
                    id,
                    channel: format!("room:{socket}-{channel}").parse().unwrap(),
                    since: None,
                    presence: Some(resync_protocol::PresenceRequest {
                        info: Some(info.clone()),
                    }),
                    join_leave: false,
                    state: false,
                })
                .await;
            match client.frame().await {
                ServerFrame::Subscribed { .. } => joined += 1,
                ServerFrame::Error {
                    code: ErrorCode::RateLimited,
                    ..
                } => refused += 1,
                other => panic!("unexpected {other:?}"),
            }
        }
        sockets.push(client);
    }
    assert!(
        (150..220).contains(&joined) && refused == 512 - joined,
        "one address joined {joined} channels with 1 KiB of info each ({refused} refused)"
    );
    // Another address is not affected.
    let mut other = WsClient::connect_ready_from(&url, address(101)).await;
    let id = other.next_request_id();
    other
        .send(&ClientFrame::Subscribe {
            id,
            channel: "room:other".parse().unwrap(),
            since: None,
            presence: Some(resync_protocol::PresenceRequest { info: Some(info) }),
            join_leave: false,
            state: false,
        })
        .await;
    assert!(matches!(
        other.frame().await,
        ServerFrame::Subscribed { .. }
    ));
}

#[tokio::test]
async fn item_4_a_long_polls_presence_counts_in_its_reply_budget() {
    let server = ServerProcess::start_with_env(&[], &[("RESYNC_POLL_MAX_BYTES", "131072")]);
    let info = Payload::from_value(&serde_json::json!({ "bio": "x".repeat(1000) })).unwrap();
    let url = format!("ws://{}/ws", server.address);
    let channels: Vec<String> = (0..8).map(|index| format!("crowd:{index}")).collect();
    // 100 members in each of 8 channels, with 1 KiB of info each: 800 KB of lists.
    let mut members = Vec::new();
    for member in 0..100 {
        let mut client = WsClient::connect_ready_from(&url, address(110 + member / 50)).await;
        for channel in &channels {
            let id = client.next_request_id();
            client
                .send(&ClientFrame::Subscribe {
                    id,
                    channel: channel.parse().unwrap(),
                    since: None,
                    presence: Some(resync_protocol::PresenceRequest {
                        info: Some(info.clone()),
                    }),
                    join_leave: false,
                    state: false,
                })
                .await;
            assert!(matches!(
                client.frame().await,
                ServerFrame::Subscribed { .. }
            ));
        }
        members.push(client);
    }
    // One anonymous poll asking for the joins and leaves of all 8: its first reply holds the
    // lists it has room for, and the next polls of its session the rest.
    let http = reqwest::Client::new();
    let base = format!(
        "{}/poll?channels={}&join_leave=1",
        server.base_url,
        channels.join(",")
    );
    let mut listed: std::collections::HashMap<String, usize> = Default::default();
    let mut session = String::new();
    let mut cursor = String::new();
    let mut replies = 0;
    while listed.values().sum::<usize>() < 800 {
        replies += 1;
        assert!(
            replies <= 20,
            "lists still incomplete after 20 polls: {listed:?}"
        );
        let mut url = base.clone();
        if !session.is_empty() {
            url.push_str(&format!(
                "&presence_session={session}&cursor={cursor}&timeout=1"
            ));
        }
        let body = http.get(&url).send().await.unwrap().bytes().await.unwrap();
        assert!(
            body.len() <= 131_072 + 8_192,
            "a poll reply of {} bytes for a limit of 128 KiB",
            body.len()
        );
        let reply: serde_json::Value = serde_json::from_slice(&body).unwrap();
        session = reply["presence_session"].as_str().unwrap().to_owned();
        cursor = reply["cursor"].as_str().unwrap().to_owned();
        for frame in reply["presence"].as_array().unwrap() {
            let frame: serde_json::Value = serde_json::from_str(frame.as_str().unwrap_or_default())
                .unwrap_or_else(|_| frame.clone());
            if frame["type"] == "presence" {
                *listed
                    .entry(frame["channel"].as_str().unwrap().to_owned())
                    .or_default() += frame["members"].as_array().unwrap().len();
            }
        }
    }
    assert!(
        replies > 1,
        "800 KB of lists in one reply of at most 128 KiB"
    );
    assert!(listed.values().all(|count| *count == 100), "{listed:?}");
    drop(members);
}

#[tokio::test]
async fn item_5_non_reading_long_polls_share_one_budget_and_give_memory_back() {
    // Replies of up to 8 MiB (twice what the kernel buffers for a socket), a budget of 32 MiB
    // of bytes waiting for clients.
    let server = ServerProcess::start_with_env(
        &["--max-body-bytes", "131072"],
        &[
            ("RESYNC_QUEUED_BYTES_BUDGET", "33554432"),
            ("RESYNC_POLL_MAX_BYTES", "8388608"),
        ],
    );
    let http = reqwest::Client::new();
    // A channel of 64 KB events: a poll from its start is a reply of about 8 MiB.
    for _ in 0..128 {
        let response = http
            .post(format!("{}/api/publish", server.base_url))
            .bearer_auth(TEST_API_KEY)
            .json(&serde_json::json!({"channel": "heavy", "data": "y".repeat(64_000)}))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }
    let position: serde_json::Value = http
        .get(format!("{}/api/channels/heavy", server.base_url))
        .bearer_auth(TEST_API_KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let epoch = position["position"]["epoch"].as_str().unwrap().to_owned();
    let before = server.rss_kib();
    // Four addresses, 25 polls each, from the channel's start, never reading a byte.
    let request =
        format!("GET /poll?channel=heavy&cursor=heavy:{epoch}:0 HTTP/1.1\r\nHost: test\r\n\r\n");
    let mut sockets = Vec::new();
    for attacker in 0..4 {
        for _ in 0..25 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.set_recv_buffer_size(4096).unwrap();
            socket
                .bind(std::net::SocketAddr::new(address(120 + attacker), 0))
                .unwrap();
            let mut stream = socket.connect(server.address).await.unwrap();
            use tokio::io::AsyncWriteExt;
            stream.write_all(request.as_bytes()).await.unwrap();
            sockets.push(stream);
        }
    }
    // Either the replies share the budget (and fill it), or each pins its own 8 MiB.
    let limit_kib = 160 * 1024;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let grown = server.rss_kib().saturating_sub(before);
        assert!(
            grown < limit_kib,
            "{grown} KiB for 100 non-reading polls (budget 32 MiB)"
        );
        let queued = resync_tests::attack::metric(&server.metrics().await, "resync_queued_bytes")
            .unwrap_or(0);
        if queued >= 24 * 1024 * 1024 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the replies never filled the budget ({queued} bytes queued)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let peak = server.rss_kib().saturating_sub(before);
    assert!(peak < limit_kib, "{peak} KiB");
    // The clients go: the memory comes back (within 64 MiB of where it started).
    drop(sockets);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = server.metrics().await;
        let open =
            resync_tests::attack::metric(&metrics, "resync_open_connections{transport=\"poll\"}");
        let queued = resync_tests::attack::metric(&metrics, "resync_queued_bytes");
        if open == Some(0) && queued == Some(0) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "polls still open: {open:?}, {queued:?} bytes queued"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after = server.rss_kib().saturating_sub(before);
    assert!(
        after < 64 * 1024,
        "{after} KiB still held after every poll's socket closed"
    );
}
