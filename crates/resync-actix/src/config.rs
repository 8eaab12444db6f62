//! Settings of the transports, with the defaults a production deployment wants.

use std::time::Duration;

use resync_broker::ResumeOptions;

/// How the transports behave. Every field has a documented default (see [`Default`]).
#[derive(Clone, Debug)]
pub struct TransportConfig {
    /// How often a WebSocket connection is pinged; it is closed (code 4202) after two
    /// intervals without hearing from the client. Defaults to 30 seconds.
    pub ping_interval: Duration,
    /// How often an idle SSE stream gets a comment line, so proxies keep it open. Defaults to
    /// 15 seconds.
    pub sse_heartbeat: Duration,
    /// The `retry:` hint sent on SSE streams, in milliseconds: how long `EventSource` waits
    /// before reconnecting. Defaults to 1,000.
    pub sse_retry_ms: u64,
    /// How long a long poll waits for an event when the client does not say. Defaults to 25
    /// seconds (below the 30-second idle timeout of common load balancers).
    pub poll_timeout: Duration,
    /// The longest wait a client may ask a long poll for. Defaults to 60 seconds.
    pub poll_timeout_max: Duration,
    /// The most events in one long-poll reply; the rest come with the next poll. Defaults to
    /// 1,000.
    pub poll_max_events: usize,
    /// The most bytes of events in one long-poll reply (at least one event always goes);
    /// the rest come with the next poll. Defaults to 1 MiB.
    pub poll_max_bytes: usize,
    /// How long a long-polling client's presence session (its memberships and join/leave
    /// watches) outlives its last poll: its members leave when no poll follows within it.
    /// Defaults to 30 seconds.
    pub poll_presence_idle: Duration,
    /// The largest WebSocket message accepted from a client, in bytes; a larger one closes the
    /// connection with code 1009. Defaults to 64 KiB.
    pub max_message_bytes: usize,
    /// The largest presence info a subscriber may join with, in bytes of JSON. Defaults to
    /// 1 KiB; over it, the subscribe fails with `presence_info_too_large`.
    pub max_presence_info_bytes: usize,
    /// The most bytes of presence (each membership: its info, member id and channel, and
    /// 256 bytes; each join/leave watch: 512 bytes) the connections of one address may hold.
    /// Past it, a subscribe asking for presence fails with `rate_limited`. Defaults to 4 MiB.
    pub max_presence_bytes_per_ip: usize,
    /// The most bytes of presence the process holds for its clients, counted as for
    /// [`max_presence_bytes_per_ip`](Self::max_presence_bytes_per_ip). Defaults to 64 MiB.
    pub max_presence_bytes: usize,
    /// The most channels one connection may follow. Defaults to 128, which is also the
    /// most: a cursor holds at most [`MAX_CURSOR_CHANNELS`](resync_protocol::MAX_CURSOR_CHANNELS)
    /// (a larger value is lowered to it, with a warning).
    pub max_channels_per_connection: usize,
    /// The cookie a token may come in. Defaults to `resync_token`.
    pub token_cookie: String,
    /// Origins (`https://app.example.com`) allowed to use cookie credentials, besides the
    /// server's own origin. Defaults to none.
    pub allowed_origins: Vec<String>,
    /// The server's own origin as browsers see it (`https://live.example.com`), for the
    /// cookie `Origin` check behind a proxy. Defaults to none: the connection's scheme and
    /// `Host` header (never `X-Forwarded-Host`).
    pub public_origin: Option<String>,
    /// On shutdown, connections are closed at random moments within this window, so that
    /// clients do not all reconnect at once. Defaults to 2 seconds.
    pub shutdown_spread: Duration,
    /// How long one write to a WebSocket client may take before the client counts as stuck
    /// and is dropped. Defaults to 10 seconds.
    pub write_timeout: Duration,
    /// Replay limits for resuming clients. Defaults to [`ResumeOptions::default`].
    pub resume: ResumeOptions,
    /// The most SSE, WebSocket and long-poll connections at once; past it, SSE gets a "retry
    /// later" stream, long polls 503 with `Retry-After`, WebSocket close 1013. The HTTP API,
    /// health and metrics are not counted and keep answering. Defaults to 8,000 (with the
    /// disconnect probe's second descriptor, 16,000 of a 20,000 open-file limit).
    pub max_connections: usize,
    /// The most sockets the edge ([`Edge`](crate::edge::Edge)) holds at once, whatever they
    /// carry (streams, API requests, health checks, TLS handshakes); past it, a new socket
    /// is closed at once. Above `max_connections`, so health checks and the API still get in
    /// when the streams are full. Defaults to 10,000 (one descriptor each).
    pub max_sockets: usize,
    /// The most connections from one client address (IPv6: one /64): its sockets, counted
    /// from `accept` through the edge, or its streams otherwise. Defaults to 1,000.
    pub max_connections_per_ip: usize,
    /// New connections (sockets, through the edge) a second from one address, sustained.
    /// Defaults to 50.
    pub connections_per_ip_per_second: f64,
    /// New connections from one address in a burst above the rate. Defaults to 200.
    pub connection_burst_per_ip: u32,
    /// The most channels followed by all connections of one address. Defaults to 10,000.
    pub max_subscriptions_per_ip: usize,
    /// The most connections of one user (token subject), from any addresses. Defaults to
    /// 1,000.
    pub max_connections_per_user: usize,
    /// The most channels followed by all connections of one user. Defaults to 10,000.
    pub max_subscriptions_per_user: usize,
    /// Proxies whose `X-Forwarded-For` names the client address. Defaults to none: the TCP
    /// peer is the client.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// WebSocket messages a second one connection may send, sustained (pings included).
    /// Defaults to 100.
    pub ws_messages_per_second: f64,
    /// WebSocket messages in a burst above the rate. Defaults to 200.
    pub ws_message_burst: u32,
    /// Publishes a second over one WebSocket, sustained. Defaults to 20.
    pub ws_publishes_per_second: f64,
    /// Publishes in a burst above the rate. Defaults to 50.
    pub ws_publish_burst: u32,
    /// Publishes are held back while at least this share of the process's subscribers (and
    /// at least [`PUBLISH_HOLD_MIN_LAGGING`](crate::PUBLISH_HOLD_MIN_LAGGING) of them) are
    /// behind by more than their queue ([`resync_broker::DeliveryLag`]): that many readers
    /// behind at once means the server cannot keep up with its publishers, and holding the
    /// publishers lets everyone catch up from history instead of falling out of it. `0.0`
    /// turns the hold off. Defaults to 0.25.
    pub publish_hold_share: f64,
    /// The longest a publish is held back; past it, it fails with `unavailable` (HTTP 503
    /// with `Retry-After`). Defaults to 2 seconds.
    pub publish_hold_max: Duration,
    /// How long a connection with no request in flight may take to send a complete request
    /// head, counted from `accept` (a TLS handshake included) and from the end of its last
    /// response: a header dripped a byte at a time and an idle keep-alive connection both
    /// close at it (through the edge). Defaults to 10 seconds.
    pub request_header_timeout: Duration,
    /// The most bytes of responses waiting for clients' sockets, over the whole process
    /// (through the edge): past it, a connection holding more than a small floor
    /// ([`CONNECTION_OUTPUT_FLOOR`](crate::edge::CONNECTION_OUTPUT_FLOOR)) waits until its
    /// client has read, and long polls shrink their replies to fit. Defaults to 64 MiB.
    pub queued_bytes_budget: usize,
    /// The kernel send buffer set on each socket the edge accepts (Linux grants twice the
    /// value). Left to itself the kernel grows a socket's buffer to 4 MiB for a client that
    /// does not read, out of sight of [`queued_bytes_budget`](Self::queued_bytes_budget):
    /// a thousand non-reading long polls held 809 MB of kernel memory and cost most of the
    /// process's CPU in copies into it. Fixed, what a client does not read waits in the
    /// process, counted. Defaults to 64 KiB; 0 leaves the kernel's autotuning.
    pub socket_send_buffer: usize,
    /// Rules by namespace (the part of a channel's name before its first `:`), in front of
    /// the authorizer. Defaults to none.
    pub namespaces: std::collections::HashMap<String, crate::NamespacePolicy>,
}

impl Default for TransportConfig {
    fn default() -> Self {
        Self {
            ping_interval: Duration::from_secs(30),
            sse_heartbeat: Duration::from_secs(15),
            sse_retry_ms: 1_000,
            poll_timeout: Duration::from_secs(25),
            poll_timeout_max: Duration::from_secs(60),
            poll_max_events: 1_000,
            poll_max_bytes: 1024 * 1024,
            poll_presence_idle: Duration::from_secs(30),
            max_message_bytes: 64 * 1024,
            max_presence_info_bytes: 1024,
            max_presence_bytes_per_ip: 4 * 1024 * 1024,
            max_presence_bytes: 64 * 1024 * 1024,
            max_channels_per_connection: 128,
            token_cookie: "resync_token".to_owned(),
            allowed_origins: Vec::new(),
            public_origin: None,
            shutdown_spread: Duration::from_secs(2),
            write_timeout: Duration::from_secs(10),
            resume: ResumeOptions::default(),
            max_connections: 8_000,
            max_sockets: 10_000,
            max_connections_per_ip: 1_000,
            connections_per_ip_per_second: 50.0,
            connection_burst_per_ip: 200,
            max_subscriptions_per_ip: 10_000,
            max_connections_per_user: 1_000,
            max_subscriptions_per_user: 10_000,
            trusted_proxies: Vec::new(),
            ws_messages_per_second: 100.0,
            ws_message_burst: 200,
            ws_publishes_per_second: 20.0,
            ws_publish_burst: 50,
            publish_hold_share: 0.25,
            publish_hold_max: Duration::from_secs(2),
            request_header_timeout: Duration::from_secs(10),
            queued_bytes_budget: 64 * 1024 * 1024,
            socket_send_buffer: 64 * 1024,
            namespaces: std::collections::HashMap::new(),
        }
    }
}
