//! The server's settings: one typed struct, filled from defaults, then an optional TOML file,
//! then `RESYNC_*` environment variables, then command-line flags (later wins).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use serde::Deserialize;

/// What one namespace (the channels named `<namespace>:…`) does differently; each field
/// left out keeps the server-wide setting. TOML: `[namespaces.chat]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceSettings {
    /// Events of history kept per channel.
    pub history_size: Option<usize>,
    /// Seconds an event is kept in history.
    pub history_max_age_secs: Option<u64>,
    /// Presence (members, list, count) on or off.
    pub presence: Option<bool>,
    /// Join and leave events on or off.
    pub join_leave: Option<bool>,
    /// Anonymous clients may subscribe, or may not.
    pub anonymous_subscribe: Option<bool>,
    /// Anonymous clients may publish over WebSocket, or may not.
    pub anonymous_publish: Option<bool>,
    /// Clients may publish over WebSocket (as their tokens allow), or no client may.
    pub client_publish: Option<bool>,
    /// Ask the application's proxy (`proxy_url`) about this namespace's subscribes and client
    /// publishes.
    pub proxy: Option<bool>,
}

/// Every setting of the reference server, with its default.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// A second address serving only the HTTP API, health and metrics, on a worker thread
    /// of its own; none by default (the API is on `listen` either way).
    pub api_listen: Option<SocketAddr>,
    /// PEM certificate chain for serving TLS itself (with `tls_key`); plain HTTP without.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// API key for the HTTP API; generated at start when unset.
    pub api_key: Option<String>,
    /// HS256 secret for client tokens; without it, clients are anonymous.
    pub jwt_secret: Option<String>,
    /// Longest token lifetime accepted (`exp` minus now), in seconds; none when unset.
    pub max_token_lifetime_secs: Option<u64>,
    /// PEM public keys (RSA for RS256, P-256 for ES256, Ed25519 for EdDSA) client tokens may
    /// be signed with.
    pub jwt_public_keys: Vec<PathBuf>,
    /// A JWKS URL whose keys client tokens may be signed with.
    pub jwks_url: Option<String>,
    /// How long a fetched JWKS is used before it is fetched again, in seconds.
    pub jwks_cache_secs: u64,
    /// The least time between two JWKS fetches caused by unknown `kid`s, in milliseconds.
    pub jwks_min_refetch_ms: u64,
    /// The `iss` client tokens must carry; not checked when unset.
    pub jwt_issuer: Option<String>,
    /// Audiences of which a client token's `aud` must name one; not checked when empty.
    pub jwt_audience: Vec<String>,
    /// Per-namespace settings (TOML only), by namespace.
    pub namespaces: std::collections::BTreeMap<String, NamespaceSettings>,
    /// The application's endpoint asked about connects, refreshes and the subscribes and
    /// publishes of namespaces with `proxy = true` (POST, JSON); none when unset.
    pub proxy_url: Option<String>,
    /// Ask the proxy on every connect.
    pub proxy_connect: bool,
    /// Ask the proxy on every WebSocket token refresh.
    pub proxy_refresh: bool,
    /// The deadline of one proxy call, in milliseconds.
    pub proxy_timeout_ms: u64,
    /// Proxy calls in flight at once.
    pub proxy_max_in_flight: usize,
    /// Let requests through when the proxy cannot be asked (default: refuse them).
    pub proxy_fail_open: bool,
    /// Channel patterns anonymous clients may subscribe to; unset: every channel when no
    /// token key is configured, none when one is (a missing token is then a 401).
    pub anonymous_subscribe: Option<Vec<String>>,
    /// Channel patterns anonymous clients may publish to over WebSocket (none by default;
    /// the demo adds `demo:*` for its chat).
    pub anonymous_publish: Vec<String>,
    /// Extra origins allowed to use cookie credentials.
    pub allowed_origins: Vec<String>,
    /// This server's origin as browsers see it, for the cookie Origin check behind a proxy.
    pub public_origin: Option<String>,
    /// Events of history kept per channel.
    pub history_size: usize,
    /// Seconds an event stays in history.
    pub history_max_age_secs: u64,
    /// Bytes of history kept per channel (memory broker).
    pub history_max_bytes_per_channel: usize,
    /// Bytes of history kept over all channels (memory broker).
    pub history_max_bytes: usize,
    /// Channels with state at once (memory broker); client publishes may make half of them.
    pub max_channels: usize,
    /// Most events replayed to one resuming client.
    pub max_replay: usize,
    /// Events a subscriber may have queued before it counts as slow.
    pub subscriber_queue: usize,
    /// Seconds between WebSocket pings.
    pub ping_interval_secs: u64,
    /// Seconds between SSE heartbeat comments.
    pub sse_heartbeat_secs: u64,
    /// Default long-poll wait in seconds.
    pub poll_timeout_secs: u64,
    /// How long a long-polling client's presence session outlives its last poll, in seconds.
    pub poll_presence_idle_secs: u64,
    /// Largest WebSocket message accepted.
    pub max_message_bytes: usize,
    /// Largest presence info a subscriber may join with, in bytes.
    pub max_presence_info_bytes: usize,
    /// Bytes of presence the connections of one address may hold.
    pub max_presence_bytes_per_ip: usize,
    /// Bytes of presence the process holds for its clients.
    pub max_presence_bytes: usize,
    /// Largest HTTP API body accepted.
    pub max_body_bytes: usize,
    /// Most bytes of events in one long-poll reply.
    pub poll_max_bytes: usize,
    /// Most channels one connection may follow.
    pub max_channels_per_connection: usize,
    /// Seconds to wait for connections on shutdown.
    pub shutdown_timeout_secs: u64,
    /// Window over which clients are disconnected on shutdown.
    pub shutdown_spread_ms: u64,
    /// HTTP worker threads; one per CPU when unset.
    pub workers: Option<usize>,
    /// Seconds one WebSocket write may take before the client is dropped as stuck.
    pub write_timeout_secs: u64,
    /// Share of subscribers that must lag at once before publishes are held back.
    pub publish_hold_share: f64,
    /// Milliseconds a publish may be held back before it is refused with 503.
    pub publish_hold_max_ms: u64,
    /// Which broker carries the channels.
    pub broker: BrokerKind,
    /// Redis URL, for the Redis broker.
    pub redis_url: String,
    /// Prefix of Redis keys and Pub/Sub channels.
    pub redis_prefix: String,
    /// Seconds a Redis presence entry lives unless its instance refreshes it.
    pub presence_ttl_secs: u64,
    /// Redis command connections per process.
    pub redis_pool_size: usize,
    /// Serve the demo page at `/`, publish ticks on `demo:ticker`, and let anonymous clients
    /// publish on `demo:*` (its chat). Off by default: the demo is open by design.
    pub demo: bool,
    /// Most SSE, WebSocket and long-poll connections at once.
    pub max_connections: usize,
    /// Most sockets held at once, whatever they carry.
    pub max_sockets: usize,
    /// Seconds a connection with no request in flight has to send a complete request head.
    pub request_header_timeout_secs: u64,
    /// Bytes of responses that may wait for clients' sockets over the whole process.
    pub queued_bytes_budget: usize,
    /// The kernel send buffer of each accepted socket, in bytes.
    pub socket_send_buffer_bytes: usize,
    /// Most connections from one client address.
    pub max_connections_per_ip: usize,
    /// New connections a second from one address.
    pub connections_per_ip_per_second: f64,
    /// New connections from one address in a burst.
    pub connection_burst_per_ip: u32,
    /// Most channels followed by one address.
    pub max_subscriptions_per_ip: usize,
    /// Most connections of one user (token subject).
    pub max_connections_per_user: usize,
    /// Most channels followed by one user.
    pub max_subscriptions_per_user: usize,
    /// WebSocket messages a second per connection.
    pub ws_messages_per_second: f64,
    /// WebSocket messages in a burst.
    pub ws_message_burst: u32,
    /// Publishes a second per WebSocket.
    pub ws_publishes_per_second: f64,
    /// Publishes per WebSocket in a burst.
    pub ws_publish_burst: u32,
    /// Proxies whose X-Forwarded-For names the client address.
    pub trusted_proxies: Vec<std::net::IpAddr>,
    /// Log line format.
    pub log_format: LogFormat,
    /// Seconds between info-level traffic summaries; 0 for none.
    pub log_summary_secs: u64,
}

/// Which broker the server runs on.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// In this process's memory: one server, history lost on restart.
    #[default]
    Memory,
    /// Redis: many servers share channels, history and seqs.
    Redis,
}

/// How log lines look.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            api_listen: None,
            tls_cert: None,
            tls_key: None,
            api_key: None,
            jwt_secret: None,
            max_token_lifetime_secs: None,
            jwt_public_keys: Vec::new(),
            jwks_url: None,
            jwks_cache_secs: 300,
            jwks_min_refetch_ms: 10_000,
            jwt_issuer: None,
            jwt_audience: Vec::new(),
            namespaces: std::collections::BTreeMap::new(),
            proxy_url: None,
            proxy_connect: false,
            proxy_refresh: false,
            proxy_timeout_ms: 1_000,
            proxy_max_in_flight: 64,
            proxy_fail_open: false,
            anonymous_subscribe: None,
            anonymous_publish: Vec::new(),
            allowed_origins: Vec::new(),
            public_origin: None,
            history_size: 10_000,
            history_max_age_secs: 24 * 60 * 60,
            history_max_bytes_per_channel: 16 * 1024 * 1024,
            history_max_bytes: 256 * 1024 * 1024,
            max_channels: 100_000,
            max_replay: 10_000,
            subscriber_queue: resync_broker::DEFAULT_SUBSCRIBER_QUEUE,
            ping_interval_secs: 30,
            sse_heartbeat_secs: 15,
            poll_timeout_secs: 25,
            poll_presence_idle_secs: 30,
            max_message_bytes: 64 * 1024,
            max_presence_info_bytes: 1024,
            max_presence_bytes_per_ip: 4 * 1024 * 1024,
            max_presence_bytes: 64 * 1024 * 1024,
            max_body_bytes: 64 * 1024,
            poll_max_bytes: 1024 * 1024,
            max_channels_per_connection: 128,
            shutdown_timeout_secs: 10,
            shutdown_spread_ms: 2_000,
            workers: None,
            write_timeout_secs: 10,
            publish_hold_share: 0.25,
            publish_hold_max_ms: 2_000,
            broker: BrokerKind::Memory,
            redis_url: "redis://127.0.0.1:6379/".to_owned(),
            redis_prefix: "resync:".to_owned(),
            presence_ttl_secs: 30,
            redis_pool_size: 16,
            demo: false,
            max_connections: 8_000,
            max_sockets: 10_000,
            request_header_timeout_secs: 10,
            queued_bytes_budget: 64 * 1024 * 1024,
            socket_send_buffer_bytes: 64 * 1024,
            max_connections_per_ip: 1_000,
            connections_per_ip_per_second: 50.0,
            connection_burst_per_ip: 200,
            max_subscriptions_per_ip: 10_000,
            max_connections_per_user: 1_000,
            max_subscriptions_per_user: 10_000,
            ws_messages_per_second: 100.0,
            ws_message_burst: 200,
            ws_publishes_per_second: 20.0,
            ws_publish_burst: 50,
            trusted_proxies: Vec::new(),
            log_format: LogFormat::Text,
            log_summary_secs: 60,
        }
    }
}

/// The resync reference server. Every flag can also be set with its `RESYNC_*` environment
/// variable or in a TOML file (`--config`), whose keys are the flag names with `_` for `-`.
#[derive(Debug, Parser)]
#[command(
    name = "resync-server",
    version,
    about,
    after_help = "Logging: RESYNC_LOG sets the log filter, in tracing's EnvFilter syntax \
                  (RESYNC_LOG=debug, RESYNC_LOG=info,resync::ws=debug) [default: info]. \
                  At info the server logs its start, its stop, warnings, and a summary of \
                  its traffic every minute; every request, publish and subscribe is logged \
                  at debug."
)]
pub struct Args {
    /// TOML file with settings (flags and environment variables override it).
    #[arg(long, env = "RESYNC_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on. [default: 127.0.0.1:8080]
    #[arg(long, env = "RESYNC_LISTEN")]
    listen: Option<SocketAddr>,
    /// Also serve the HTTP API (publish, history, channels, users), health and metrics on
    /// this address, with a worker thread of its own: backends' publishes then never wait
    /// behind the fan-out to thousands of connections. Keep it on an internal network.
    /// [default: none; the API is on --listen either way]
    #[arg(long, env = "RESYNC_API_LISTEN")]
    api_listen: Option<SocketAddr>,
    /// Serve TLS (https://, wss://) with this PEM certificate chain; needs --tls-key. For
    /// deployments without a TLS proxy in front. [default: plain HTTP]
    #[arg(long, env = "RESYNC_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert.
    #[arg(long, env = "RESYNC_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// API key for the HTTP publish/history API. [default: generated at start and logged]
    #[arg(long, env = "RESYNC_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// HS256 secret for client JWTs, at least 32 bytes; without it, clients are anonymous.
    /// [default: none]
    #[arg(long, env = "RESYNC_JWT_SECRET", hide_env_values = true)]
    jwt_secret: Option<String>,
    /// Refuse tokens whose expiry lies further ahead than this many seconds, so a leaked
    /// token is worth less. [default: no limit]
    #[arg(long, env = "RESYNC_MAX_TOKEN_LIFETIME_SECS")]
    max_token_lifetime_secs: Option<u64>,
    /// PEM public key files client tokens may be signed with (RSA: RS256, P-256: ES256,
    /// Ed25519: EdDSA), comma-separated. [default: none]
    #[arg(long, env = "RESYNC_JWT_PUBLIC_KEYS", value_delimiter = ',')]
    jwt_public_keys: Option<Vec<PathBuf>>,
    /// A JWKS URL (an identity provider's `/.well-known/jwks.json`) whose keys client
    /// tokens may be signed with; fetched when needed, cached, refetched for an unknown
    /// `kid`. [default: none]
    #[arg(long, env = "RESYNC_JWKS_URL")]
    jwks_url: Option<String>,
    /// Seconds a fetched JWKS is used before it is fetched again; when it cannot be, tokens
    /// are refused. [default: 300]
    #[arg(long, env = "RESYNC_JWKS_CACHE_SECS")]
    jwks_cache_secs: Option<u64>,
    /// The least milliseconds between two JWKS fetches caused by unknown `kid`s. [default: 10000]
    #[arg(long, env = "RESYNC_JWKS_MIN_REFETCH_MS")]
    jwks_min_refetch_ms: Option<u64>,
    /// The `iss` client tokens must carry. [default: not checked]
    #[arg(long, env = "RESYNC_JWT_ISSUER")]
    jwt_issuer: Option<String>,
    /// Audiences of which a client token's `aud` must name one, comma-separated.
    /// [default: not checked]
    #[arg(long, env = "RESYNC_JWT_AUDIENCE", value_delimiter = ',')]
    jwt_audience: Option<Vec<String>>,
    /// The application's endpoint asked (POST, JSON) about connects, refreshes and the
    /// subscribes and publishes of proxied namespaces; the rest is in the config file
    /// (docs/auth.md). [default: none]
    #[arg(long, env = "RESYNC_PROXY_URL")]
    proxy_url: Option<String>,
    /// Channel patterns anonymous clients may subscribe to (`*`, `public:*`, `news`),
    /// comma-separated. [default: * without token keys; none with a JWT secret, public keys
    /// or a JWKS, so that a missing token is a 401]
    #[arg(long, env = "RESYNC_ANONYMOUS_SUBSCRIBE", value_delimiter = ',')]
    anonymous_subscribe: Option<Vec<String>>,
    /// Channel patterns anonymous clients may publish to over WebSocket, comma-separated.
    /// [default: none; `--demo` adds demo:* for its chat]
    #[arg(long, env = "RESYNC_ANONYMOUS_PUBLISH", value_delimiter = ',')]
    anonymous_publish: Option<Vec<String>>,
    /// Extra origins allowed to use cookie credentials, comma-separated. [default: none]
    #[arg(long, env = "RESYNC_ALLOWED_ORIGINS", value_delimiter = ',')]
    allowed_origins: Option<Vec<String>>,
    /// This server's origin as browsers see it (`https://live.example.com`), for the cookie
    /// Origin check behind a TLS proxy. [default: the request's scheme and Host header]
    #[arg(long, env = "RESYNC_PUBLIC_ORIGIN")]
    public_origin: Option<String>,
    /// Events of history kept per channel. [default: 10000]
    #[arg(long, env = "RESYNC_HISTORY_SIZE")]
    history_size: Option<usize>,
    /// Seconds an event is kept in history. [default: 86400]
    #[arg(long, env = "RESYNC_HISTORY_MAX_AGE_SECS")]
    history_max_age_secs: Option<u64>,
    /// Bytes of history kept per channel (memory broker; Redis bounds by count). Past it the
    /// oldest events go and clients further back get a `truncated` reset. [default: 16777216]
    #[arg(long, env = "RESYNC_HISTORY_MAX_BYTES_PER_CHANNEL")]
    history_max_bytes_per_channel: Option<usize>,
    /// Bytes of history over all channels (memory broker): past it, the channel published to
    /// sheds its oldest events, so memory never grows with what publishers send.
    /// [default: 268435456]
    #[arg(long, env = "RESYNC_HISTORY_MAX_BYTES")]
    history_max_bytes: Option<usize>,
    /// Channels with state at once (memory broker): past it, a publish to a new channel is
    /// refused (429 too_many_channels) unless one without history or subscribers can be
    /// forgotten. Client publishes may make at most half of them, so the API's never run out.
    /// [default: 100000]
    #[arg(long, env = "RESYNC_MAX_CHANNELS")]
    max_channels: Option<usize>,
    /// Most events replayed to a resuming client; further behind is a reset. [default: 10000]
    #[arg(long, env = "RESYNC_MAX_REPLAY")]
    max_replay: Option<usize>,
    /// Events a subscriber may have queued; past it, it catches up from history. [default: 1024]
    #[arg(long, env = "RESYNC_SUBSCRIBER_QUEUE")]
    subscriber_queue: Option<usize>,
    /// Seconds between WebSocket pings. [default: 30]
    #[arg(long, env = "RESYNC_PING_INTERVAL_SECS")]
    ping_interval_secs: Option<u64>,
    /// Seconds between SSE heartbeat comments. [default: 15]
    #[arg(long, env = "RESYNC_SSE_HEARTBEAT_SECS")]
    sse_heartbeat_secs: Option<u64>,
    /// Default long-poll wait in seconds. [default: 25]
    #[arg(long, env = "RESYNC_POLL_TIMEOUT_SECS")]
    poll_timeout_secs: Option<u64>,
    /// How long a long-polling client's presence session (its memberships and join/leave
    /// events) outlives its last poll; its members leave then. [default: 30]
    #[arg(long, env = "RESYNC_POLL_PRESENCE_IDLE_SECS")]
    poll_presence_idle_secs: Option<u64>,
    /// Largest WebSocket message accepted, in bytes. [default: 65536]
    #[arg(long, env = "RESYNC_MAX_MESSAGE_BYTES")]
    max_message_bytes: Option<usize>,
    /// Largest presence info (JSON) a subscriber may join a channel's members with; over it,
    /// the subscribe fails with `presence_info_too_large`. [default: 1024]
    #[arg(long, env = "RESYNC_MAX_PRESENCE_INFO_BYTES")]
    max_presence_info_bytes: Option<usize>,
    /// Bytes of presence the connections of one address may hold: each membership its info,
    /// member id and channel and 256 bytes, each join/leave watch 512 bytes; past it a
    /// subscribe asking for presence is refused (rate_limited). [default: 4194304]
    #[arg(long, env = "RESYNC_MAX_PRESENCE_BYTES_PER_IP")]
    max_presence_bytes_per_ip: Option<usize>,
    /// Bytes of presence the process holds for its clients, counted the same way.
    /// [default: 67108864]
    #[arg(long, env = "RESYNC_MAX_PRESENCE_BYTES")]
    max_presence_bytes: Option<usize>,
    /// Largest HTTP API request body accepted, in bytes. [default: 65536]
    #[arg(long, env = "RESYNC_MAX_BODY_BYTES")]
    max_body_bytes: Option<usize>,
    /// Most bytes of events in one long-poll reply (at least one event goes; the cursor
    /// continues the rest). [default: 1048576]
    #[arg(long, env = "RESYNC_POLL_MAX_BYTES")]
    poll_max_bytes: Option<usize>,
    /// Most channels one connection may follow. [default: 128]
    #[arg(long, env = "RESYNC_MAX_CHANNELS_PER_CONNECTION")]
    max_channels_per_connection: Option<usize>,
    /// Seconds to wait for connections to close on shutdown before exiting. [default: 10]
    #[arg(long, env = "RESYNC_SHUTDOWN_TIMEOUT_SECS")]
    shutdown_timeout_secs: Option<u64>,
    /// On shutdown, clients are disconnected at random moments within this many milliseconds,
    /// so they do not all reconnect at once. [default: 2000]
    #[arg(long, env = "RESYNC_SHUTDOWN_SPREAD_MS")]
    shutdown_spread_ms: Option<u64>,
    /// HTTP worker threads. [default: one per CPU]
    #[arg(long, env = "RESYNC_WORKERS")]
    workers: Option<usize>,
    /// Seconds one write may wait for a client that does not read before it is dropped as
    /// stuck: a WebSocket write; unacknowledged data on any connection waits at most twice
    /// this (TCP_USER_TIMEOUT). [default: 10]
    #[arg(long, env = "RESYNC_WRITE_TIMEOUT_SECS")]
    write_timeout_secs: Option<u64>,
    /// Publishes wait while at least this share of subscribers (and at least 8) are behind
    /// by more than their queue: the server is behind, so publishers are slowed rather than
    /// readers cut off. 0 turns it off. [default: 0.25]
    #[arg(long, env = "RESYNC_PUBLISH_HOLD_SHARE")]
    publish_hold_share: Option<f64>,
    /// Milliseconds a held publish may wait before it is refused with 503 and Retry-After
    /// (not stored: retry it). [default: 2000]
    #[arg(long, env = "RESYNC_PUBLISH_HOLD_MAX_MS")]
    publish_hold_max_ms: Option<u64>,
    /// Broker: `memory` (one process) or `redis` (many processes). [default: memory]
    #[arg(long, env = "RESYNC_BROKER", value_enum)]
    broker: Option<BrokerKind>,
    /// Redis URL for `--broker redis`. [default: redis://127.0.0.1:6379/]
    #[arg(long, env = "RESYNC_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
    /// Prefix of Redis keys and Pub/Sub channels. [default: resync:]
    #[arg(long, env = "RESYNC_REDIS_PREFIX")]
    redis_prefix: Option<String>,
    /// Seconds a presence entry lives on Redis unless its instance refreshes it (every third
    /// of this): the members of an instance that dies leave within this and a third.
    /// [default: 30]
    #[arg(long, env = "RESYNC_PRESENCE_TTL_SECS")]
    presence_ttl_secs: Option<u64>,
    /// Redis command connections per process. [default: 16]
    #[arg(long, env = "RESYNC_REDIS_POOL_SIZE")]
    redis_pool_size: Option<usize>,
    /// Serve the demo page at `/`, publish a tick on `demo:ticker` every 2 s, and let anonymous
    /// clients publish on `demo:*` (its chat). Open by design: not for the internet.
    /// `--demo` alone means true. [default: false]
    #[arg(long, env = "RESYNC_DEMO", num_args = 0..=1, default_missing_value = "true")]
    demo: Option<bool>,
    /// SSE, WebSocket and long-poll connections at once; past it SSE gets a retry stream, polls
    /// 503, WebSocket close 1013. [default: 8000]
    #[arg(long, env = "RESYNC_MAX_CONNECTIONS")]
    max_connections: Option<usize>,
    /// Sockets held at once, whatever they carry (streams, API requests, health checks, TLS
    /// handshakes); past it a new socket is closed at accept. [default: 10000]
    #[arg(long, env = "RESYNC_MAX_SOCKETS")]
    max_sockets: Option<usize>,
    /// Connections (sockets, counted from accept) from one client address (IPv6: one /64).
    /// [default: 1000]
    #[arg(long, env = "RESYNC_MAX_CONNECTIONS_PER_IP")]
    max_connections_per_ip: Option<usize>,
    /// Seconds a connection with no request in flight has to send a complete request head,
    /// from accept (TLS handshake included) and from the end of its last response: dripped
    /// headers and idle keep-alive connections close at it. [default: 10]
    #[arg(long, env = "RESYNC_REQUEST_HEADER_TIMEOUT_SECS")]
    request_header_timeout_secs: Option<u64>,
    /// Bytes of responses that may wait for clients' sockets over the whole process; past
    /// it, connections holding more than 16 KiB wait for their clients to read, and long
    /// polls shrink their replies. [default: 67108864]
    #[arg(long, env = "RESYNC_QUEUED_BYTES_BUDGET")]
    queued_bytes_budget: Option<usize>,
    /// The kernel send buffer of each accepted socket (Linux grants twice this): what a
    /// client that does not read holds in kernel memory, beyond the budget above, which the
    /// rest waits in. [default: 65536]
    #[arg(long, env = "RESYNC_SOCKET_SEND_BUFFER_BYTES")]
    socket_send_buffer_bytes: Option<usize>,
    /// New connections a second from one address, sustained. [default: 50]
    #[arg(long, env = "RESYNC_CONNECTIONS_PER_IP_PER_SECOND")]
    connections_per_ip_per_second: Option<f64>,
    /// New connections from one address in a burst above the rate. [default: 200]
    #[arg(long, env = "RESYNC_CONNECTION_BURST_PER_IP")]
    connection_burst_per_ip: Option<u32>,
    /// Channels followed by all connections of one address. [default: 10000]
    #[arg(long, env = "RESYNC_MAX_SUBSCRIPTIONS_PER_IP")]
    max_subscriptions_per_ip: Option<usize>,
    /// Connections of one user (token subject), from any addresses: a leaked token's reach.
    /// [default: 1000]
    #[arg(long, env = "RESYNC_MAX_CONNECTIONS_PER_USER")]
    max_connections_per_user: Option<usize>,
    /// Channels followed by all connections of one user. [default: 10000]
    #[arg(long, env = "RESYNC_MAX_SUBSCRIPTIONS_PER_USER")]
    max_subscriptions_per_user: Option<usize>,
    /// WebSocket messages a second per connection, sustained; past it `rate_limited`, then
    /// close 4100. [default: 100]
    #[arg(long, env = "RESYNC_WS_MESSAGES_PER_SECOND")]
    ws_messages_per_second: Option<f64>,
    /// WebSocket messages in a burst above the rate. [default: 200]
    #[arg(long, env = "RESYNC_WS_MESSAGE_BURST")]
    ws_message_burst: Option<u32>,
    /// Publishes a second per WebSocket, sustained; past it `rate_limited`. [default: 20]
    #[arg(long, env = "RESYNC_WS_PUBLISHES_PER_SECOND")]
    ws_publishes_per_second: Option<f64>,
    /// Publishes per WebSocket in a burst above the rate. [default: 50]
    #[arg(long, env = "RESYNC_WS_PUBLISH_BURST")]
    ws_publish_burst: Option<u32>,
    /// Proxies (IP addresses, comma-separated) whose X-Forwarded-For names the client address
    /// for the per-address limits. [default: none: the TCP peer is the client]
    #[arg(long, env = "RESYNC_TRUSTED_PROXIES", value_delimiter = ',')]
    trusted_proxies: Option<Vec<std::net::IpAddr>>,
    /// Log line format. [default: text]
    #[arg(long, env = "RESYNC_LOG_FORMAT", value_enum)]
    log_format: Option<LogFormat>,
    /// Seconds between info-level traffic summaries (connections, publishes, deliveries,
    /// requests); 0 for none. [default: 60]
    #[arg(long, env = "RESYNC_LOG_SUMMARY_SECS")]
    log_summary_secs: Option<u64>,
}

macro_rules! overlay {
    ($settings:ident, $args:ident, $($field:ident),* $(,)?) => {
        $( if let Some(value) = $args.$field { $settings.$field = value; } )*
    };
}

impl Settings {
    /// Defaults, then the file, then environment and flags.
    pub fn load(args: Args) -> Result<Self> {
        let mut settings = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading config file {}", path.display()))?;
                toml::from_str(&text)
                    .with_context(|| format!("parsing config file {}", path.display()))?
            }
            None => Settings::default(),
        };
        if args.api_key.is_some() {
            settings.api_key = args.api_key;
        }
        if args.jwt_secret.is_some() {
            settings.jwt_secret = args.jwt_secret;
        }
        if args.public_origin.is_some() {
            settings.public_origin = args.public_origin;
        }
        if args.tls_cert.is_some() {
            settings.tls_cert = args.tls_cert;
        }
        if args.tls_key.is_some() {
            settings.tls_key = args.tls_key;
        }
        if args.max_token_lifetime_secs.is_some() {
            settings.max_token_lifetime_secs = args.max_token_lifetime_secs;
        }
        if args.jwks_url.is_some() {
            settings.jwks_url = args.jwks_url;
        }
        if args.proxy_url.is_some() {
            settings.proxy_url = args.proxy_url;
        }
        if args.jwt_issuer.is_some() {
            settings.jwt_issuer = args.jwt_issuer;
        }
        if args.anonymous_subscribe.is_some() {
            settings.anonymous_subscribe = args.anonymous_subscribe;
        }
        overlay!(
            settings,
            args,
            jwt_public_keys,
            jwks_cache_secs,
            jwks_min_refetch_ms,
            jwt_audience,
        );
        overlay!(
            settings,
            args,
            listen,
            anonymous_publish,
            allowed_origins,
            history_size,
            history_max_age_secs,
            history_max_bytes_per_channel,
            history_max_bytes,
            max_channels,
            max_replay,
            subscriber_queue,
            ping_interval_secs,
            sse_heartbeat_secs,
            poll_timeout_secs,
            poll_presence_idle_secs,
            max_message_bytes,
            max_presence_info_bytes,
            max_presence_bytes_per_ip,
            max_presence_bytes,
            max_body_bytes,
            poll_max_bytes,
            max_channels_per_connection,
            shutdown_timeout_secs,
            shutdown_spread_ms,
            write_timeout_secs,
            publish_hold_share,
            publish_hold_max_ms,
            broker,
            redis_url,
            redis_prefix,
            presence_ttl_secs,
            redis_pool_size,
            demo,
            log_format,
            log_summary_secs,
            max_connections,
            max_sockets,
            request_header_timeout_secs,
            queued_bytes_budget,
            socket_send_buffer_bytes,
            max_connections_per_ip,
            connections_per_ip_per_second,
            connection_burst_per_ip,
            max_subscriptions_per_ip,
            max_connections_per_user,
            max_subscriptions_per_user,
            ws_messages_per_second,
            ws_message_burst,
            ws_publishes_per_second,
            ws_publish_burst,
            trusted_proxies,
        );
        if args.api_listen.is_some() {
            settings.api_listen = args.api_listen;
        }
        if args.workers.is_some() {
            settings.workers = args.workers;
        }
        Ok(settings)
    }

    /// How long shutdown may take.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_then_flags_override_defaults() {
        let directory =
            std::env::temp_dir().join(format!("resync-settings-{}", std::process::id()));
        std::fs::create_dir_all(&directory).unwrap();
        let file = directory.join("resync.toml");
        std::fs::write(&file, "history_size = 5\nping_interval_secs = 7\n").unwrap();
        let args = Args::parse_from([
            "resync-server",
            "--config",
            file.to_str().unwrap(),
            "--history-size",
            "9",
        ]);
        let settings = Settings::load(args).unwrap();
        assert_eq!(settings.history_size, 9, "flag beats file");
        assert_eq!(settings.ping_interval_secs, 7, "file beats default");
        assert_eq!(settings.poll_timeout_secs, 25, "default");
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(toml::from_str::<Settings>("histroy_size = 5").is_err());
    }
}
