//! Server-side control (issue 16): the HTTP API disconnects a user (every WebSocket and SSE
//! connection of theirs, with a reason and whether to come back) and unsubscribes a user from
//! a channel, on one process and on every instance of a Redis cluster; other users are not
//! touched.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use resync_protocol::{ServerFrame, UnsubscribeReason};
use resync_tests::{JWT_SECRET, SseClient, TestServer, WsClient, WsRead};

fn token(subject: &str) -> String {
    resync_tests::user_token(subject, &["*"])
}

async fn command(
    http: &reqwest::Client,
    base: &str,
    api_key: &str,
    path: &str,
    body: serde_json::Value,
) -> u16 {
    http.post(format!("{base}{path}"))
        .bearer_auth(api_key)
        .json(&body)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn closed_with(client: &mut WsClient) -> u16 {
    loop {
        match client.read().await {
            WsRead::Closed(code) => return code.map_or(1006, |code| code.0),
            WsRead::Frame(_) => {}
        }
    }
}

#[tokio::test]
async fn the_api_unsubscribes_then_disconnects_a_user_and_leaves_others_alone() {
    let server = TestServer::start(|settings| settings.jwt_secret = Some(JWT_SECRET.into()));
    let ws = |subject: &str| server.ws_url(&format!("?token={}", token(subject)));
    let mut tabs = vec![
        WsClient::connect_ready(&ws("ann")).await,
        WsClient::connect_ready(&ws("ann")).await,
    ];
    for tab in &mut tabs {
        tab.subscribe("chat:1", None).await;
        tab.subscribe("news", None).await;
    }
    let mut bob = WsClient::connect_ready(&ws("bob")).await;
    bob.subscribe("chat:1", None).await;
    let mut stream = SseClient::connect(
        &server,
        &format!("?channel=chat:1&channel=news&token={}", token("ann")),
        None,
    )
    .await;
    assert_eq!(stream.next().await.unwrap().event, "subscribed");
    let (http, base, key) = (&server.http, server.url(""), server.server.api_key.clone());

    // Unsubscribe ann from chat:1: each of her connections is told, bob is not.
    let status = command(
        http,
        &base,
        &key,
        "/api/users/ann/unsubscribe",
        serde_json::json!({"channel": "chat:1"}),
    )
    .await;
    assert_eq!(status, 200);
    for tab in &mut tabs {
        match tab.frame().await {
            ServerFrame::Unsubscribed {
                id,
                channel,
                reason,
            } => {
                assert_eq!(
                    (id, channel.as_str(), reason),
                    (0, "chat:1", Some(UnsubscribeReason::Server))
                );
            }
            other => panic!("expected unsubscribed, got {other:?}"),
        }
    }
    let told = stream.next().await.unwrap();
    assert_eq!(told.event, "unsubscribed");
    assert!(told.data.contains(r#""channel":"chat:1""#), "{}", told.data);
    server.publish("chat:1", serde_json::json!({"n": 1})).await;
    server.publish("news", serde_json::json!({"n": 2})).await;
    bob.next_event("chat:1").await;
    for tab in &mut tabs {
        match tab.frame().await {
            ServerFrame::Event(event) => {
                assert_eq!(event.channel.as_str(), "news", "chat:1 no longer comes")
            }
            other => panic!("expected the news event, got {other:?}"),
        }
    }
    let event = stream.next_event().await.unwrap();
    assert!(
        event.data.contains(r#""channel":"news""#),
        "only news comes: {}",
        event.data
    );

    // Disconnect ann, for good: every connection of hers ends; bob keeps going.
    let status = command(
        http,
        &base,
        &key,
        "/api/users/ann/disconnect",
        serde_json::json!({"reason": "banned", "reconnect": false}),
    )
    .await;
    assert_eq!(status, 200);
    for tab in &mut tabs {
        assert_eq!(closed_with(tab).await, 4005, "do not reconnect");
    }
    let told = stream.next().await.unwrap();
    assert_eq!(told.event, "disconnect");
    assert_eq!(told.data, r#"{"reason":"banned","reconnect":false}"#);
    // Then the end, with a retry that keeps a bare EventSource away for an hour.
    let mut retry = None;
    while let Some(message) = stream.next().await {
        assert!(
            message.data.is_empty(),
            "nothing after the disconnect: {message:?}"
        );
        retry = message.retry_ms.or(retry);
    }
    assert_eq!(retry, Some(3_600_000));
    server.publish("chat:1", serde_json::json!({"n": 3})).await;
    bob.next_event("chat:1").await;
    // Bad requests are refused.
    assert_eq!(
        command(
            http,
            &base,
            &key,
            "/api/users/ann/unsubscribe",
            serde_json::json!({"channel": "bad channel"})
        )
        .await,
        400
    );
    assert_eq!(
        command(
            http,
            &base,
            "wrong-key",
            "/api/users/ann/disconnect",
            serde_json::json!({})
        )
        .await,
        401
    );
}

#[tokio::test]
async fn disconnecting_a_user_closes_their_connections_on_every_instance_on_one_redis() {
    disconnecting_a_user_closes_their_connections_on_every_instance(false).await;
}

#[tokio::test]
async fn disconnecting_a_user_closes_their_connections_on_every_instance_on_a_redis_cluster() {
    disconnecting_a_user_closes_their_connections_on_every_instance(true).await;
}

async fn disconnecting_a_user_closes_their_connections_on_every_instance(cluster: bool) {
    use resync_tests::redis_topology::Redis;
    use resync_tests::server_process::ServerProcess;

    let redis = Redis::start(cluster);
    let instances =
        ServerProcess::start_many(3, &redis.server_arguments(), &["--jwt-secret", JWT_SECRET]);
    let ws = |instance: &ServerProcess, subject: &str| {
        format!(
            "{}/ws?token={}",
            instance.base_url.replacen("http", "ws", 1),
            token(subject)
        )
    };
    let mut ann = Vec::new();
    for instance in &instances {
        let mut client = WsClient::connect_ready(&ws(instance, "ann")).await;
        client.subscribe("room", None).await;
        ann.push(client);
    }
    let mut bob = WsClient::connect_ready(&ws(&instances[2], "bob")).await;
    bob.subscribe("room", None).await;
    let http = reqwest::Client::new();
    let status = command(
        &http,
        &instances[0].base_url,
        "test-api-key-0123456789",
        "/api/users/ann/disconnect",
        serde_json::json!({"reason": "password changed", "reconnect": true}),
    )
    .await;
    assert_eq!(status, 200);
    let mut closed = 0;
    for client in &mut ann {
        assert_eq!(closed_with(client).await, 4203, "reconnect soon");
        closed += 1;
    }
    assert_eq!(closed, 3, "one connection on each instance");
    // Bob, on the third instance, still gets the room's events.
    let published = http
        .post(format!("{}/api/publish", instances[1].base_url))
        .bearer_auth("test-api-key-0123456789")
        .json(&serde_json::json!({"channel": "room", "data": {"n": 1}}))
        .send()
        .await
        .unwrap();
    assert!(published.status().is_success());
    bob.next_event("room").await;
}
