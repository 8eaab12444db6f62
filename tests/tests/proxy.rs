//! The application's backend in the loop (issue 16), against a backend served in the test:
//! allow, deny with a reason, a timeout (fail closed), a rewrite of the published data, an
//! identity attached on connect, and a slow backend that does not delay delivery to clients
//! already subscribed.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use resync_protocol::{ClientFrame, ErrorCode, Payload, ServerFrame};
use resync_tests::{TestServer, WsClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A backend answering by what it is asked: channels named `gated:<how>` say how.
struct Backend {
    url: String,
    asked: Arc<Mutex<Vec<serde_json::Value>>>,
}

async fn read_request(socket: &mut tokio::net::TcpStream) -> Option<serde_json::Value> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let read = socket.read(&mut chunk).await.ok()?;
        if read == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..read]);
        let text = String::from_utf8_lossy(&buffer).into_owned();
        if let Some(end) = text.find("\r\n\r\n") {
            let length: usize = text[..end]
                .lines()
                .find_map(|line| {
                    let (name, value) = line.split_once(':')?;
                    name.eq_ignore_ascii_case("content-length")
                        .then(|| value.trim().parse().ok())?
                })
                .unwrap_or(0);
            if buffer.len() >= end + 4 + length {
                return serde_json::from_slice(&buffer[end + 4..end + 4 + length]).ok();
            }
        }
    }
}

impl Backend {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/resync", listener.local_addr().unwrap());
        let asked = Arc::new(Mutex::new(Vec::new()));
        let log = asked.clone();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let log = log.clone();
                tokio::spawn(async move {
                    let Some(request) = read_request(&mut socket).await else {
                        return;
                    };
                    log.lock().unwrap().push(request.clone());
                    let how = request["channel"]
                        .as_str()
                        .unwrap_or("")
                        .trim_start_matches("gated:")
                        .to_owned();
                    let answer = match (request["kind"].as_str().unwrap(), how.as_str()) {
                        ("connect", _) if request["user"].is_null() => {
                            r#"{"user":"from-backend","subscribe":["*"],"info":{"name":"Backend"}}"#
                                .to_owned()
                        }
                        (_, "denied") => r#"{"deny":"not on the guest list"}"#.to_owned(),
                        (_, "slow") => {
                            tokio::time::sleep(Duration::from_millis(1_500)).await;
                            "{}".to_owned()
                        }
                        (_, "hang") => {
                            tokio::time::sleep(Duration::from_secs(10)).await;
                            "{}".to_owned()
                        }
                        ("publish", "rewrite") => r#"{"data":{"rewritten":true}}"#.to_owned(),
                        _ => "{}".to_owned(),
                    };
                    let response = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{answer}",
                        answer.len()
                    );
                    let _ = socket.write_all(response.as_bytes()).await;
                    let _ = socket.shutdown().await;
                });
            }
        });
        Self { url, asked }
    }
}

fn server(backend: &Backend) -> TestServer {
    let url = backend.url.clone();
    TestServer::start(move |settings| {
        settings.proxy_url = Some(url);
        settings.proxy_connect = true;
        settings.proxy_timeout_ms = 2_500;
        settings.anonymous_publish = vec!["*".to_owned()];
        settings.namespaces.insert(
            "gated".to_owned(),
            resync_server::NamespaceSettings {
                proxy: Some(true),
                ..Default::default()
            },
        );
    })
}

async fn subscribe_reply(client: &mut WsClient, channel: &str) -> ServerFrame {
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Subscribe {
            id,
            channel: channel.parse().unwrap(),
            since: None,
            presence: None,
            join_leave: false,
            state: false,
        })
        .await;
    client.frame().await
}

#[tokio::test]
async fn the_backend_allows_denies_times_out_closed_and_rewrites() {
    let backend = Backend::start().await;
    let server = server(&backend);
    let mut client = WsClient::connect_ready(&server.ws_url("")).await;
    let connect = backend.asked.lock().unwrap().first().cloned().unwrap();
    assert_eq!(connect["kind"], "connect", "asked on connect: {connect}");

    assert!(matches!(
        subscribe_reply(&mut client, "gated:allowed").await,
        ServerFrame::Subscribed { .. }
    ));
    match subscribe_reply(&mut client, "gated:denied").await {
        ServerFrame::Error { code, message, .. } => {
            assert_eq!(code, ErrorCode::Forbidden);
            assert_eq!(message, "not on the guest list", "the backend's reason");
        }
        other => panic!("expected a denial, got {other:?}"),
    }
    let asked_at = Instant::now();
    match subscribe_reply(&mut client, "gated:hang").await {
        // Fail closed, as "later" (issue 25, L1): the application did not say no.
        ServerFrame::Error { code, .. } => assert_eq!(code, ErrorCode::Unavailable, "fail closed"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let waited = asked_at.elapsed();
    assert!(
        waited >= Duration::from_millis(2_400) && waited < Duration::from_secs(5),
        "refused at the 2.5 s deadline, not the backend's 10 s ({waited:?})"
    );
    // Channels outside the proxied namespace are not asked about.
    let before = backend.asked.lock().unwrap().len();
    assert!(matches!(
        subscribe_reply(&mut client, "news").await,
        ServerFrame::Subscribed { .. }
    ));
    assert_eq!(backend.asked.lock().unwrap().len(), before);

    // A publish the backend rewrites is stored rewritten.
    assert!(matches!(
        subscribe_reply(&mut client, "gated:rewrite").await,
        ServerFrame::Subscribed { .. }
    ));
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Publish {
            id,
            channel: "gated:rewrite".parse().unwrap(),
            data: Payload::from_value(&serde_json::json!({"original": true})).unwrap(),
            idempotency_key: None,
        })
        .await;
    let mut stored = None;
    while stored.is_none() {
        match client.frame().await {
            ServerFrame::Event(event) => stored = Some(event.data.as_str().to_owned()),
            ServerFrame::Published { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(stored.unwrap(), r#"{"rewritten":true}"#);
    let published = backend
        .asked
        .lock()
        .unwrap()
        .iter()
        .find(|asked| asked["kind"] == "publish")
        .cloned()
        .unwrap();
    assert_eq!(
        published["data"],
        serde_json::json!({"original": true}),
        "the backend saw the client's data"
    );
    assert_eq!(
        published["user"], "from-backend",
        "the identity the backend attached on connect"
    );
    // The info the backend attached is what the client appears among members with.
    let id = client.next_request_id();
    client
        .send(&ClientFrame::Subscribe {
            id,
            channel: "room:1".parse().unwrap(),
            since: None,
            presence: Some(resync_protocol::PresenceRequest { info: None }),
            join_leave: false,
            state: false,
        })
        .await;
    assert!(matches!(
        client.frame().await,
        ServerFrame::Subscribed { .. }
    ));
    let members: serde_json::Value = server
        .http
        .get(server.url("/api/channels/room:1/presence"))
        .bearer_auth(&server.server.api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        members["members"],
        serde_json::json!([{"id": "from-backend", "info": {"name": "Backend"}}])
    );
    // SSE: a denied channel is a 403 with the reason.
    let response = server
        .http
        .get(server.url("/sse?channel=gated:denied"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    assert!(
        response
            .text()
            .await
            .unwrap()
            .contains("not on the guest list")
    );
}

#[tokio::test]
async fn a_slow_backend_does_not_delay_delivery_to_clients_already_subscribed() {
    let backend = Backend::start().await;
    let server = server(&backend);
    let mut reader = WsClient::connect_ready(&server.ws_url("")).await;
    reader.subscribe("news", None).await;
    let mut asking = WsClient::connect_ready(&server.ws_url("")).await;
    let id = asking.next_request_id();
    asking
        .send(&ClientFrame::Subscribe {
            id,
            channel: "gated:slow".parse().unwrap(),
            since: None,
            presence: None,
            join_leave: false,
            state: false,
        })
        .await;
    let asked = Instant::now();
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.publish("news", serde_json::json!({"n": 1})).await;
    reader.next_event("news").await;
    let delivered = asked.elapsed();
    assert!(matches!(
        asking.frame().await,
        ServerFrame::Subscribed { .. }
    ));
    let answered = asked.elapsed();
    assert!(
        delivered < Duration::from_millis(1_000) && answered >= Duration::from_millis(1_400),
        "delivered after {delivered:?}, while the backend answered after {answered:?}"
    );
}

/// Whether an SSE request was served (`subscribed`), told to come back later (a retry
/// stream), or refused for good (any other status).
async fn sse_outcome(http: &reqwest::Client, url: String) -> String {
    let mut response = http.get(url).send().await.unwrap();
    if response.status() != 200 {
        return format!("status {}", response.status().as_u16());
    }
    let mut text = String::new();
    while !text.contains("\n\n") {
        match tokio::time::timeout(Duration::from_secs(10), response.chunk()).await {
            Ok(Ok(Some(chunk))) => text.push_str(&String::from_utf8_lossy(&chunk)),
            _ => break,
        }
    }
    if text.contains("event: subscribed") {
        "subscribed".to_owned()
    } else if text.contains("retry:") {
        "retry".to_owned()
    } else {
        format!("unexpected {text:?}")
    }
}

#[tokio::test]
async fn l1_a_proxy_that_cannot_be_asked_gives_sse_a_retry_stream_not_a_403() {
    let backend =
        resync_tests::backend::AppBackend::start(|_| (Duration::from_secs(5), "{}".to_owned()))
            .await;
    let url = backend.url.clone();
    let server = TestServer::start(move |settings| {
        settings.proxy_url = Some(url);
        settings.proxy_timeout_ms = 200;
        settings.namespaces.insert(
            "gated".to_owned(),
            resync_server::NamespaceSettings {
                proxy: Some(true),
                ..Default::default()
            },
        );
    });
    // A 403 would end a browser's EventSource for good; the application never said no.
    assert_eq!(
        sse_outcome(&server.http, server.url("/sse?channel=gated:1")).await,
        "retry"
    );
}

#[tokio::test]
async fn item_6_one_address_cannot_take_the_proxys_slots() {
    // A backend that takes 0.9 s to answer a subscribe.
    let backend = resync_tests::backend::AppBackend::start(|request| {
        let delay = if request["kind"] == "subscribe" {
            Duration::from_millis(900)
        } else {
            Duration::ZERO
        };
        (delay, "{}".to_owned())
    })
    .await;
    let url = backend.url.clone();
    let server = TestServer::start(move |settings| {
        settings.proxy_url = Some(url);
        settings.proxy_timeout_ms = 2_000;
        settings.proxy_max_in_flight = 64;
        settings.namespaces.insert(
            "slow".to_owned(),
            resync_server::NamespaceSettings {
                proxy: Some(true),
                ..Default::default()
            },
        );
    });
    // One address keeps 192 subscribes to the proxied namespace in flight, again and again.
    let target = server.server.addresses[0];
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let started = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut hogs = Vec::new();
    for index in 0..192 {
        let stopped = stopped.clone();
        let started = started.clone();
        hogs.push(tokio::spawn(async move {
            while !*stopped.borrow() {
                let Ok(mut stream) =
                    resync_tests::attack::connect_from(resync_tests::attack::address(60), target)
                        .await
                else {
                    continue;
                };
                let request =
                    format!("GET /sse?channel=slow:hog{index} HTTP/1.1\r\nHost: test\r\n\r\n");
                let _ = stream.write_all(request.as_bytes()).await;
                started.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let mut head = [0u8; 256];
                let _ = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut head)).await;
            }
        }));
    }
    while started.load(std::sync::atomic::Ordering::Relaxed) < 384 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Nine legitimate subscribes from three other addresses, at once: every one is asked and
    // let in.
    let clients: Vec<reqwest::Client> = (0..3)
        .map(|index| {
            reqwest::Client::builder()
                .local_address(resync_tests::attack::address(70 + index))
                .build()
                .unwrap()
        })
        .collect();
    let outcomes = futures_util::future::join_all((0..9).map(|index| {
        sse_outcome(
            &clients[index % 3],
            server.url(&format!("/sse?channel=slow:legit{index}")),
        )
    }))
    .await;
    stop.send_replace(true);
    for hog in hogs {
        hog.await.unwrap();
    }
    assert!(
        outcomes.iter().all(|outcome| outcome == "subscribed"),
        "{outcomes:?}"
    );
}
