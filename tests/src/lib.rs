//! Test fixtures shared by the integration tests: a real server on port 0, and minimal clients
//! for each transport that speak the wire protocol over real sockets.

#![allow(
    clippy::unwrap_used,
    reason = "fixtures fail the test loudly on any error"
)]
#![allow(missing_docs, reason = "test fixtures, documented by their names")]
#![allow(
    missing_debug_implementations,
    reason = "test fixtures: servers and sockets, never printed"
)]

pub mod attack;
pub mod backend;
pub mod certificate;
pub mod proxy;
pub mod raw_ws;
pub mod redis_cluster;
pub mod redis_server;
pub mod redis_topology;
pub mod server_process;

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use resync_protocol::sse::{SseMessage, SseParser};
use resync_protocol::{ClientFrame, CloseCode, Position, ServerFrame};
use resync_server::{RunningServer, Settings};
use tokio_tungstenite::tungstenite::Message;

/// The HS256 secret of test servers that verify tokens (32 bytes or more, as servers require).
pub const JWT_SECRET: &str = "test-jwt-secret-0123456789abcdef";

/// The API key of test servers (16 bytes or more, as servers require outside the demo).
pub const TEST_API_KEY: &str = "test-api-key-0123456789";

/// A token for `subject`, signed with [`JWT_SECRET`], valid for ten minutes, that may
/// subscribe to `subscribe` (channel patterns).
pub fn user_token(subject: &str, subscribe: &[&str]) -> String {
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 600;
    resync_actix::jwt::sign(
        &resync_actix::jwt::Claims {
            sub: Some(subject.into()),
            exp,
            subscribe: subscribe
                .iter()
                .map(|pattern| (*pattern).to_owned())
                .collect(),
            ..Default::default()
        },
        JWT_SECRET.as_bytes(),
    )
}

/// How long a test waits for anything before failing.
pub const WAIT: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub server: RunningServer,
    pub http: reqwest::Client,
    thread: Option<std::thread::JoinHandle<()>>,
    /// The disk broker's data directory (the default broker), removed with the server.
    _data_dir: tempfile::TempDir,
}

impl TestServer {
    /// A server on 127.0.0.1:0 with the defaults, changed by `configure`.
    pub fn start(configure: impl FnOnce(&mut Settings)) -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let mut settings = Settings {
            data_dir: data_dir.path().join("data"),
            listen: "127.0.0.1:0".parse().unwrap(),
            api_key: Some(TEST_API_KEY.to_owned()),
            workers: Some(2),
            shutdown_spread_ms: 100,
            demo: false,
            // Every test client comes from 127.0.0.1, a thousand at a time in some tests: the
            // per-address limits are lifted here, and tests/tests/hardening.rs sets its own.
            max_connections_per_ip: 100_000,
            connections_per_ip_per_second: 100_000.0,
            connection_burst_per_ip: 100_000,
            max_subscriptions_per_ip: 1_000_000,
            max_connections_per_user: 100_000,
            max_subscriptions_per_user: 1_000_000,
            ..Settings::default()
        };
        configure(&mut settings);
        let (server, thread) = resync_server::start(settings).unwrap();
        Self {
            server,
            http: reqwest::Client::new(),
            thread: Some(thread),
            _data_dir: data_dir,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.server.base_url())
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/ws{query}", self.server.addresses[0])
    }

    /// Publishes through the HTTP API and returns the position.
    pub async fn publish(&self, channel: &str, data: serde_json::Value) -> Position {
        let response = self
            .http
            .post(self.url("/api/publish"))
            .bearer_auth(&self.server.api_key)
            .json(&serde_json::json!({ "channel": channel, "data": data }))
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "publish failed: {}",
            response.status()
        );
        let body: serde_json::Value = response.json().await.unwrap();
        serde_json::from_value(body["position"].clone()).unwrap()
    }

    pub async fn publish_many(&self, channel: &str, range: std::ops::Range<u64>) -> Vec<Position> {
        let mut positions = Vec::new();
        for value in range {
            positions.push(
                self.publish(channel, serde_json::json!({ "n": value }))
                    .await,
            );
        }
        positions
    }

    /// The channel's current position.
    pub async fn position(&self, channel: &str) -> Position {
        channel_position(
            &self.http,
            &self.server.base_url(),
            &self.server.api_key,
            channel,
        )
        .await
    }

    /// `/api/channels/{channel}`: the channel's position and subscriber count.
    pub async fn channel_info(&self, channel: &str) -> serde_json::Value {
        channel_info(
            &self.http,
            &self.server.base_url(),
            &self.server.api_key,
            channel,
        )
        .await
    }

    /// The `subscribers` count of `/api/channels/{channel}`.
    pub async fn subscribers(&self, channel: &str) -> u64 {
        self.channel_info(channel).await["subscribers"]
            .as_u64()
            .unwrap()
    }

    /// Waits until `/api/channels/{channel}` reports `expected` subscribers.
    pub async fn wait_for_subscribers(&self, channel: &str, expected: u64) {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let count = self.subscribers(channel).await;
            if count == expected {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{channel} still has {count} subscribers, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the server counts `expected` open WebSocket connections.
    pub async fn wait_for_websockets(&self, expected: u64) {
        let open = |server: &Self| {
            let metrics = server.server.resync.metrics().clone();
            async move { metrics.open_connections(resync_actix::Transport::WebSocket) }
        };
        loop {
            if open(self).await == expected {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn metrics(&self) -> String {
        self.http
            .get(self.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Sends a user command through the HTTP API (`POST /api/users/{user}/{command}`),
    /// asserting it was taken.
    pub async fn user_command(&self, user: &str, command: &str, body: serde_json::Value) {
        let response = self
            .http
            .post(self.url(&format!("/api/users/{user}/{command}")))
            .bearer_auth(&self.server.api_key)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success(), "{}", response.status());
    }

    /// The value of one metric line, e.g. `resync_open_connections{transport="sse"}`.
    pub async fn metric(&self, name: &str) -> u64 {
        let text = self.metrics().await;
        text.lines()
            .find_map(|line| {
                line.strip_prefix(name)
                    .and_then(|rest| rest.trim().parse().ok())
            })
            .unwrap_or_else(|| panic!("metric {name} not found in:\n{text}"))
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let handle = self.server.handle();
        // Stop without waiting for open streams, then let the thread end. The stop future is
        // driven on a thread of its own, since this may run inside the test's runtime.
        let _ = std::thread::spawn(move || {
            if let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                runtime.block_on(handle.stop(false));
            }
        })
        .join();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// An SSE client over a real HTTP connection.
pub struct SseClient {
    pub status: u16,
    body: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    parser: SseParser,
    buffered: std::collections::VecDeque<SseMessage>,
}

impl SseClient {
    pub async fn connect(server: &TestServer, query: &str, last_event_id: Option<&str>) -> Self {
        Self::connect_with(&server.http, &server.url("/sse"), query, last_event_id).await
    }

    /// Connects to `/sse` of the server at `base` (a server process of its own).
    pub async fn connect_to(base: &str, query: &str, last_event_id: Option<&str>) -> Self {
        Self::connect_with(
            &reqwest::Client::new(),
            &format!("{base}/sse"),
            query,
            last_event_id,
        )
        .await
    }

    async fn connect_with(
        http: &reqwest::Client,
        url: &str,
        query: &str,
        last_event_id: Option<&str>,
    ) -> Self {
        let mut request = http.get(format!("{url}{query}"));
        if let Some(id) = last_event_id {
            request = request.header("Last-Event-ID", id);
        }
        let response = tokio::time::timeout(WAIT, request.send())
            .await
            .unwrap()
            .unwrap();
        let status = response.status().as_u16();
        let body = response.bytes_stream();
        Self {
            status,
            body: Box::pin(body),
            parser: SseParser::new(),
            buffered: Default::default(),
        }
    }

    /// The next SSE event (comments are skipped), or `None` when the stream ended.
    pub async fn next(&mut self) -> Option<SseMessage> {
        loop {
            if let Some(message) = self.buffered.pop_front() {
                return Some(message);
            }
            let chunk = tokio::time::timeout(WAIT, self.body.next())
                .await
                .expect("sse event in time")?;
            let chunk = chunk.ok()?;
            self.buffered.extend(self.parser.feed(&chunk).unwrap());
        }
    }

    /// The id the stream last set: what `EventSource` sends back as `Last-Event-ID`.
    pub fn last_event_id(&self) -> String {
        self.parser.last_event_id().to_owned()
    }

    /// The next event that carries data (skips lone `retry:` hints).
    pub async fn next_event(&mut self) -> Option<SseMessage> {
        loop {
            let message = self.next().await?;
            if !(message.event.is_empty() && message.data.is_empty()) {
                return Some(message);
            }
        }
    }

    /// The next `event` frame's seq, asserting it is an event of `channel`.
    pub async fn next_seq(&mut self, channel: &str) -> u64 {
        let message = self.next_event().await.expect("stream open");
        assert_eq!(
            message.event, "message",
            "expected an event, got {message:?}"
        );
        let frame = ServerFrame::decode(message.data.as_bytes()).unwrap();
        let ServerFrame::Event(event) = frame else {
            panic!("not an event: {frame:?}")
        };
        assert_eq!(event.channel.as_str(), channel);
        event.position.seq.get()
    }
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client speaking the JSON frames.
pub struct WsClient {
    pub stream: WsStream,
    next_id: u64,
}

/// What a WebSocket read produced.
#[derive(Debug)]
pub enum WsRead {
    Frame(ServerFrame),
    Closed(Option<CloseCode>),
}

impl WsClient {
    /// Connects; `Err` carries the HTTP status of a refused upgrade.
    pub async fn connect(url: &str) -> Result<Self, u16> {
        match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
            .await
            .unwrap()
        {
            Ok((stream, _)) => Ok(Self { stream, next_id: 1 }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(response.status().as_u16())
            }
            Err(error) => panic!("websocket connect failed: {error}"),
        }
    }

    /// Connects from the loopback address `source` (each test attacker has its own) and
    /// reads the `connected` frame.
    pub async fn connect_ready_from(url: &str, source: std::net::IpAddr) -> Self {
        let address: std::net::SocketAddr = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let stream = attack::connect_from(source, address).await.unwrap();
        let (stream, _) =
            tokio::time::timeout(WAIT, tokio_tungstenite::client_async_tls(url, stream))
                .await
                .unwrap()
                .unwrap();
        let mut client = Self { stream, next_id: 1 };
        match client.read().await {
            WsRead::Frame(ServerFrame::Connected { .. }) => client,
            other => panic!("expected connected, got {other:?}"),
        }
    }

    /// Connects and reads the `connected` frame.
    pub async fn connect_ready(url: &str) -> Self {
        let mut client = Self::connect(url).await.unwrap();
        match client.read().await {
            WsRead::Frame(ServerFrame::Connected { .. }) => client,
            other => panic!("expected connected, got {other:?}"),
        }
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        self.stream
            .send(Message::text(frame.encode()))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, text: String) {
        self.stream.send(Message::text(text)).await.unwrap();
    }

    pub fn next_request_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// Reads the next protocol frame (skipping pings, which it answers) or the close.
    pub async fn read(&mut self) -> WsRead {
        loop {
            let message = tokio::time::timeout(WAIT, self.stream.next())
                .await
                .expect("websocket frame in time");
            match message {
                Some(Ok(Message::Text(text))) => {
                    let frame = ServerFrame::decode(text.as_bytes()).unwrap();
                    if frame == ServerFrame::Ping {
                        self.send(&ClientFrame::Pong).await;
                        continue;
                    }
                    return WsRead::Frame(frame);
                }
                Some(Ok(Message::Close(close))) => {
                    return WsRead::Closed(close.map(|close| CloseCode(u16::from(close.code))));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return WsRead::Closed(None),
            }
        }
    }

    pub async fn frame(&mut self) -> ServerFrame {
        match self.read().await {
            WsRead::Frame(frame) => frame,
            WsRead::Closed(code) => {
                panic!("connection closed ({code:?}) while a frame was expected")
            }
        }
    }

    /// Subscribes and returns the `subscribed` reply's recovery outcome.
    pub async fn subscribe(
        &mut self,
        channel: &str,
        since: Option<Position>,
    ) -> resync_protocol::RecoveryOutcome {
        let id = self.next_request_id();
        self.send(&ClientFrame::Subscribe {
            id,
            channel: channel.parse().unwrap(),
            since,
            presence: None,
            join_leave: false,
            state: false,
        })
        .await;
        match self.frame().await {
            ServerFrame::Subscribed {
                id: reply_id,
                recovery,
                ..
            } if reply_id == id => recovery,
            other => panic!("expected subscribed, got {other:?}"),
        }
    }

    /// The next event's position, asserting its channel.
    pub async fn next_event(&mut self, channel: &str) -> Position {
        match self.frame().await {
            ServerFrame::Event(event) => {
                assert_eq!(event.channel.as_str(), channel);
                event.position
            }
            other => panic!("expected an event, got {other:?}"),
        }
    }
}

/// One long-poll reply.
#[derive(Debug)]
pub struct PollReply {
    pub status: u16,
    pub events: Vec<serde_json::Value>,
    pub resets: Vec<serde_json::Value>,
    pub cursor: String,
}

pub async fn poll(server: &TestServer, query: &str) -> PollReply {
    let response = tokio::time::timeout(
        WAIT * 2,
        server.http.get(server.url(&format!("/poll{query}"))).send(),
    )
    .await
    .unwrap()
    .unwrap();
    let status = response.status().as_u16();
    let body: serde_json::Value = response.json().await.unwrap();
    PollReply {
        status,
        events: body["events"].as_array().cloned().unwrap_or_default(),
        resets: body["resets"].as_array().cloned().unwrap_or_default(),
        cursor: body["cursor"].as_str().unwrap_or_default().to_owned(),
    }
}

/// The seqs of a poll reply's events.
pub fn seqs(events: &[serde_json::Value]) -> Vec<u64> {
    events
        .iter()
        .map(|event| event["seq"].as_u64().unwrap())
        .collect()
}

/// Backoff for tests: fast enough that reconnects do not slow them down.
pub fn fast_backoff() -> resync_client::BackoffConfig {
    resync_client::BackoffConfig {
        initial: Duration::from_millis(50),
        max: Duration::from_millis(500),
        reset_after: Duration::from_secs(2),
        soon: Duration::from_millis(200),
    }
}

/// A Rust client with short timeouts and fast backoff, for tests.
pub fn fast_client(base: &str, transport: resync_client::TransportChoice) -> resync_client::Client {
    resync_client::Client::builder(base)
        .transport(transport)
        .backoff(fast_backoff())
        .heartbeat_grace(Duration::from_secs(1))
        .poll_timeout(Duration::from_secs(2))
        .connect_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// `/api/channels/{channel}` of the server at `base`.
pub async fn channel_info(
    http: &reqwest::Client,
    base: &str,
    api_key: &str,
    channel: &str,
) -> serde_json::Value {
    http.get(format!("{base}/api/channels/{channel}"))
        .bearer_auth(api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// A channel's current position from `/api/channels/{channel}` of the server at `base`.
pub async fn channel_position(
    http: &reqwest::Client,
    base: &str,
    api_key: &str,
    channel: &str,
) -> Position {
    let info = channel_info(http, base, api_key, channel).await;
    serde_json::from_value(info["position"].clone()).unwrap()
}

/// Collects `count` event seqs from a subscription, failing on resets, errors or a stall.
pub async fn collect_seqs(
    mut subscription: resync_client::Subscription,
    count: u64,
    label: &str,
) -> Vec<u64> {
    let mut seqs = Vec::new();
    while (seqs.len() as u64) < count {
        let update = tokio::time::timeout(Duration::from_secs(60), subscription.next())
            .await
            .unwrap_or_else(|_| panic!("{label}: stalled after {} events", seqs.len()))
            .unwrap_or_else(|| panic!("{label}: stream ended"))
            .unwrap_or_else(|error| panic!("{label}: {error}"));
        match update {
            resync_client::Update::Event(event) => seqs.push(event.position.seq.get()),
            resync_client::Update::Reset { reason, .. } => {
                panic!("{label}: unexpected reset {reason:?}")
            }
            resync_client::Update::State { .. } => panic!("{label}: unexpected state"),
            resync_client::Update::Members(_) => {}
        }
    }
    seqs
}
