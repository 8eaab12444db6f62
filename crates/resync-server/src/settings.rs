//! The server's settings: one typed struct, filled from defaults, then an optional TOML file,
//! then `RESYNC_*` environment variables, then command-line flags (later wins).
//!
//! Each setting is declared once, in the table of [`settings_table!`]: its doc, type,
//! default, flag, bounds and (for the transports') where it goes in
//! [`TransportConfig`]. The table makes the [`Settings`] struct (its TOML keys are the
//! names), its [`Default`], the command line ([`Args`]: `--name-with-dashes`, each also
//! read from `RESYNC_NAME`, its `--help` the doc with the default appended), and the
//! mapping into the transports' configuration; a transport setting's default is the
//! transports' own ([`TransportConfig::default`]). rust-analyzer's `config_data!` is the
//! model (issue 29: one setting had been edited in seven places, its default in three).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Parser;
use resync_actix::TransportConfig;
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
    /// The channels are keyed: every publish names the key it sets (`null` data deletes it),
    /// and a client the history no longer reaches catches up from the latest event of each
    /// key (every broker; docs/protocol.md, section 14).
    pub keyed: Option<bool>,
}

/// Declares every setting once; see the module docs. An entry is its doc, its `#[arg(..)]`
/// (`skip` for TOML-only settings), `name: Type = default => (FlagType)` (`Some (FlagType)`
/// when the setting is an `Option` a flag fills), then optionally `shown "…"` (the default
/// as `--help` words it, when its value does not say it) and `into |config, value| …` (where
/// it goes in the transports' configuration, with its bounds).
macro_rules! settings_table {
    (@shown $value:expr) => {
        ShowDefault::show(&$value)
    };
    (@shown $value:expr, $shown:literal) => {
        $shown.to_owned()
    };
    ($(
        $(#[doc = $doc:literal])*
        #[arg($($arg:tt)*)]
        $name:ident : $ty:ty = $default:expr => $($wrap:ident)? ($flag:ty)
        $(, shown $shown:literal)?
        $(, into |$config:ident, $value:ident| $into:expr)?
        ;
    )*) => {
        /// Every setting of the reference server, with its default.
        #[derive(Clone, Debug, Deserialize, PartialEq)]
        #[serde(default, deny_unknown_fields)]
        pub struct Settings {
            $( $(#[doc = $doc])* pub $name: $ty, )*
        }

        impl Default for Settings {
            fn default() -> Self {
                Self { $( $name: $default, )* }
            }
        }

        /// The resync reference server. Every flag can also be set with its `RESYNC_*`
        /// environment variable or in a TOML file (`--config`), whose keys are the flag names
        /// with `_` for `-`.
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
            #[arg(long)]
            pub config: Option<PathBuf>,
            $( $(#[doc = $doc])* #[arg($($arg)*)] $name: Option<$flag>, )*
        }

        /// How `--help` words the default of the setting `name`.
        fn shown_default(name: &str, defaults: &Settings) -> Option<String> {
            match name {
                $( stringify!($name) => Some(settings_table!(@shown defaults.$name $(, $shown)?)), )*
                _ => None,
            }
        }

        impl Settings {
            /// The flags and environment variables given, over these settings.
            fn overlay(&mut self, args: Args) {
                $( if let Some(value) = args.$name { self.$name = $($wrap)?(value); } )*
            }

            /// The transports' configuration these settings make (namespaces aside, which
            /// the server builds with the broker's retention).
            pub fn transport_config(&self) -> TransportConfig {
                let mut config = TransportConfig::default();
                $( $( {
                    let $config = &mut config;
                    let $value = self.$name.clone();
                    $into;
                } )? )*
                config
            }
        }
    };
}

/// The transports' defaults: a transport setting's default is theirs.
fn transport() -> TransportConfig {
    TransportConfig::default()
}

/// A duration's whole milliseconds, for a default.
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

settings_table! {
    /// Address to listen on.
    #[arg(long)]
    listen: SocketAddr = SocketAddr::from(([127, 0, 0, 1], 8080)) => (SocketAddr);
    /// Also serve the HTTP API (publish, history, channels, users), health and metrics on this
    /// address, with a worker thread of its own: backends' publishes then never wait behind the
    /// fan-out to thousands of connections. Keep it on an internal network.
    #[arg(long)]
    api_listen: Option<SocketAddr> = None => Some (SocketAddr),
        shown "none; the API is on --listen either way";
    /// Serve TLS (https://, wss://) with this PEM certificate chain; needs --tls-key. For
    /// deployments without a TLS proxy in front.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf> = None => Some (PathBuf),
        shown "plain HTTP";
    /// The PEM private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf> = None => Some (PathBuf);
    /// API key for the HTTP publish/history API.
    #[arg(long, hide_env_values = true)]
    api_key: Option<String> = None => Some (String),
        shown "generated at start and logged";
    /// HS256 secret for client JWTs, at least 32 bytes; without it, clients are anonymous.
    #[arg(long, hide_env_values = true)]
    jwt_secret: Option<String> = None => Some (String);
    /// Refuse tokens whose expiry lies further ahead than this many seconds, so a leaked token
    /// is worth less.
    #[arg(long)]
    max_token_lifetime_secs: Option<u64> = None => Some (u64),
        shown "no limit";
    /// PEM public key files client tokens may be signed with (RSA: RS256, P-256: ES256,
    /// Ed25519: EdDSA), comma-separated.
    #[arg(long, value_delimiter = ',')]
    jwt_public_keys: Vec<PathBuf> = Vec::new() => (Vec<PathBuf>);
    /// A JWKS URL (an identity provider's `/.well-known/jwks.json`) whose keys client tokens
    /// may be signed with; fetched when needed, cached, refetched for an unknown `kid`.
    #[arg(long)]
    jwks_url: Option<String> = None => Some (String);
    /// Seconds a fetched JWKS is used before it is fetched again; when it cannot be, tokens are
    /// refused.
    #[arg(long)]
    jwks_cache_secs: u64 = 300 => (u64);
    /// The least milliseconds between two JWKS fetches caused by unknown `kid`s.
    #[arg(long)]
    jwks_min_refetch_ms: u64 = 10_000 => (u64);
    /// The `iss` client tokens must carry.
    #[arg(long)]
    jwt_issuer: Option<String> = None => Some (String),
        shown "not checked";
    /// Audiences of which a client token's `aud` must name one, comma-separated.
    #[arg(long, value_delimiter = ',')]
    jwt_audience: Vec<String> = Vec::new() => (Vec<String>),
        shown "not checked";
    /// Per-namespace settings (TOML only), by namespace.
    #[arg(skip)]
    namespaces: std::collections::BTreeMap<String, NamespaceSettings> = std::collections::BTreeMap::new() => (std::collections::BTreeMap<String, NamespaceSettings>);
    /// The application's endpoint asked (POST, JSON) about connects, refreshes and the
    /// subscribes and publishes of proxied namespaces; the rest is in the config file
    /// (docs/auth.md).
    #[arg(long)]
    proxy_url: Option<String> = None => Some (String);
    /// Ask the proxy on every connect.
    #[arg(skip)]
    proxy_connect: bool = false => (bool);
    /// Ask the proxy on every WebSocket token refresh.
    #[arg(skip)]
    proxy_refresh: bool = false => (bool);
    /// The deadline of one proxy call, in milliseconds.
    #[arg(skip)]
    proxy_timeout_ms: u64 = 1_000 => (u64);
    /// Proxy calls in flight at once.
    #[arg(skip)]
    proxy_max_in_flight: usize = 64 => (usize);
    /// Let requests through when the proxy cannot be asked (default: refuse them).
    #[arg(skip)]
    proxy_fail_open: bool = false => (bool);
    /// Channel patterns anonymous clients may subscribe to (`*`, `public:*`, `news`),
    /// comma-separated.
    #[arg(long, value_delimiter = ',')]
    anonymous_subscribe: Option<Vec<String>> = None => Some (Vec<String>),
        shown "* without token keys; none with a JWT secret, public keys or a JWKS, so that a missing token is a 401";
    /// Channel patterns anonymous clients may publish to over WebSocket, comma-separated.
    #[arg(long, value_delimiter = ',')]
    anonymous_publish: Vec<String> = Vec::new() => (Vec<String>),
        shown "none; `--demo` adds demo:* for its chat";
    /// Extra origins allowed to use cookie credentials, comma-separated.
    #[arg(long, value_delimiter = ',')]
    allowed_origins: Vec<String> = transport().allowed_origins => (Vec<String>),
        into |config, value| config.allowed_origins = value;
    /// This server's origin as browsers see it (`https://live.example.com`), for the cookie
    /// Origin check behind a TLS proxy.
    #[arg(long)]
    public_origin: Option<String> = transport().public_origin => Some (String),
        shown "the request's scheme and Host header",
        into |config, value| config.public_origin = value;
    /// Events of history kept per channel.
    #[arg(long)]
    history_size: usize = 10_000 => (usize);
    /// Seconds an event is kept in history.
    #[arg(long)]
    history_max_age_secs: u64 = 24 * 60 * 60 => (u64);
    /// Bytes of history kept per channel (memory broker; Redis bounds by count). Past it the
    /// oldest events go and clients further back get a `truncated` reset.
    #[arg(long)]
    history_max_bytes_per_channel: usize = 16 * 1024 * 1024 => (usize);
    /// Bytes of history over all channels (memory broker): past it, the channel published to
    /// sheds its oldest events, so memory never grows with what publishers send.
    #[arg(long)]
    history_max_bytes: usize = 256 * 1024 * 1024 => (usize);
    /// Channels with state at once (memory and disk brokers): past it, a publish to a new channel is
    /// refused (429 too_many_channels) unless one without history or subscribers can be
    /// forgotten. Client publishes may make at most half of them, so the API's never run out.
    #[arg(long)]
    max_channels: usize = 100_000 => (usize);
    /// Most keys (tombstones included) a keyed channel keeps (every broker); a publish of one
    /// more key is refused (409 keyed_state_full), nothing stored.
    #[arg(long)]
    keyed_max_keys: usize = resync_broker::KeyedLimits::default().max_keys => (usize);
    /// Most bytes of keys and data a keyed channel's state holds; past it a publish is refused
    /// the same way.
    #[arg(long)]
    keyed_max_bytes: usize = resync_broker::KeyedLimits::default().max_bytes => (usize);
    /// Seconds a key of a keyed channel lives after its last publish (unset: until it is
    /// deleted or replaced); an expired key leaves the state a client catches up from.
    #[arg(long)]
    keyed_key_ttl_secs: Option<u64> = None => Some (u64),
        shown "none: keys live until deleted";
    /// Seconds a deleted key's tombstone stays in a keyed channel's state: longer than any
    /// client takes to read the state and catch up.
    #[arg(long)]
    keyed_tombstone_ttl_secs: u64 =
        resync_broker::KeyedLimits::default().tombstone_ttl.as_secs() => (u64);
    /// Most events replayed to a resuming client; further behind is a reset.
    #[arg(long)]
    max_replay: usize = transport().resume.max_replay => (usize),
        into |config, value| config.resume.max_replay = value;
    /// Events a subscriber may have queued; past it, it catches up from history.
    #[arg(long)]
    subscriber_queue: usize = resync_broker::DEFAULT_SUBSCRIBER_QUEUE => (usize);
    /// Seconds between WebSocket pings.
    #[arg(long)]
    ping_interval_secs: u64 = transport().ping_interval.as_secs() => (u64),
        into |config, value| config.ping_interval = Duration::from_secs(value.max(1));
    /// Seconds between SSE heartbeat comments.
    #[arg(long)]
    sse_heartbeat_secs: u64 = transport().sse_heartbeat.as_secs() => (u64),
        into |config, value| config.sse_heartbeat = Duration::from_secs(value.max(1));
    /// Default long-poll wait in seconds.
    #[arg(long)]
    poll_timeout_secs: u64 = transport().poll_timeout.as_secs() => (u64),
        into |config, value| config.poll_timeout = Duration::from_secs(value);
    /// How long a long-polling client's presence session (its memberships and join/leave
    /// events) outlives its last poll; its members leave then.
    #[arg(long)]
    poll_presence_idle_secs: u64 = transport().poll_presence_idle.as_secs() => (u64),
        into |config, value| config.poll_presence_idle = Duration::from_secs(value.max(1));
    /// Largest WebSocket message accepted, in bytes.
    #[arg(long)]
    max_message_bytes: usize = transport().max_message_bytes => (usize),
        into |config, value| config.max_message_bytes = value;
    /// Largest presence info (JSON) a subscriber may join a channel's members with; over it,
    /// the subscribe fails with `presence_info_too_large`.
    #[arg(long)]
    max_presence_info_bytes: usize = transport().max_presence_info_bytes => (usize),
        into |config, value| config.max_presence_info_bytes = value;
    /// Bytes of presence the connections of one address may hold: each membership its info,
    /// member id and channel and 256 bytes, each join/leave watch 512 bytes; past it a
    /// subscribe asking for presence is refused (rate_limited).
    #[arg(long)]
    max_presence_bytes_per_ip: usize = transport().max_presence_bytes_per_ip => (usize),
        into |config, value| config.max_presence_bytes_per_ip = value;
    /// Bytes of presence the process holds for its clients, counted the same way.
    #[arg(long)]
    max_presence_bytes: usize = transport().max_presence_bytes => (usize),
        into |config, value| config.max_presence_bytes = value;
    /// Largest HTTP API request body accepted, in bytes.
    #[arg(long)]
    max_body_bytes: usize = 64 * 1024 => (usize);
    /// Most bytes of events in one long-poll reply (at least one event goes; the cursor
    /// continues the rest).
    #[arg(long)]
    poll_max_bytes: usize = transport().poll_max_bytes => (usize),
        into |config, value| config.poll_max_bytes = value;
    /// Most channels one connection may follow.
    #[arg(long)]
    max_channels_per_connection: usize = transport().max_channels_per_connection => (usize),
        into |config, value| config.max_channels_per_connection = value;
    /// Seconds to wait for connections to close on shutdown before exiting.
    #[arg(long)]
    shutdown_timeout_secs: u64 = 10 => (u64);
    /// On shutdown, clients are disconnected at random moments within this many milliseconds,
    /// so they do not all reconnect at once.
    #[arg(long)]
    shutdown_spread_ms: u64 = millis(transport().shutdown_spread) => (u64),
        into |config, value| config.shutdown_spread = Duration::from_millis(value);
    /// HTTP worker threads.
    #[arg(long)]
    workers: Option<usize> = None => Some (usize),
        shown "one per CPU";
    /// Seconds one write may wait for a client that does not read before it is dropped as
    /// stuck: a WebSocket write; unacknowledged data on any connection waits at most twice this
    /// (TCP_USER_TIMEOUT).
    #[arg(long)]
    write_timeout_secs: u64 = transport().write_timeout.as_secs() => (u64),
        into |config, value| config.write_timeout = Duration::from_secs(value.max(1));
    /// Publishes wait while at least this share of subscribers (and at least 8) are behind by
    /// more than their queue: the server is behind, so publishers are slowed rather than
    /// readers cut off. 0 turns it off.
    #[arg(long)]
    publish_hold_share: f64 = transport().publish_hold_share => (f64),
        into |config, value| config.publish_hold_share = value.clamp(0.0, 1.0);
    /// Milliseconds a held publish may wait before it is refused with 503 and Retry-After (not
    /// stored: retry it).
    #[arg(long)]
    publish_hold_max_ms: u64 = millis(transport().publish_hold_max) => (u64),
        into |config, value| config.publish_hold_max = Duration::from_millis(value);
    /// Broker: `memory` (one process, history lost on restart), `disk` (one process, history
    /// on disk in `--data-dir`: restarts and deploys resume with no reset) or `redis` (many
    /// processes).
    #[arg(long, value_enum)]
    broker: BrokerKind = BrokerKind::Disk => (BrokerKind);
    /// Directory of the disk broker's store (`--broker disk`); one process per directory.
    #[arg(long)]
    data_dir: PathBuf = PathBuf::from("resync-data") => (PathBuf);
    /// Seconds to wait at start while another process holds the data directory (one process
    /// per directory; in a deploy the previous one may still be draining), before giving up.
    #[arg(long)]
    data_dir_wait_secs: u64 = 30 => (u64);
    /// When the disk broker syncs publishes to the disk: `always` (acknowledged once synced,
    /// one sync per batch of concurrent publishes), `periodic` (every `--sync-interval-ms`; a
    /// power cut may lose that much, and clients behind the loss get resets) or `never`
    /// (left to the operating system). A killed process loses nothing under any of them.
    #[arg(long, value_enum)]
    durability: DurabilityKind = DurabilityKind::Periodic => (DurabilityKind);
    /// Milliseconds between syncs under `--durability periodic`.
    #[arg(long)]
    sync_interval_ms: u64 = 1_000 => (u64);
    /// Bytes of history the disk broker stores over all channels: past it, the channel
    /// published to sheds its oldest events.
    #[arg(long)]
    store_max_bytes: u64 = 1024 * 1024 * 1024 => (u64);
    /// What identifies this machine's boot to the disk broker, instead of Linux's `boot_id`:
    /// for tests that simulate a power cut. Leave it unset.
    #[arg(long)]
    boot_id: Option<String> = None => Some (String),
        shown "/proc/sys/kernel/random/boot_id";
    /// Redis URL for `--broker redis`.
    #[arg(long, hide_env_values = true)]
    redis_url: String = "redis://127.0.0.1:6379/".to_owned() => (String);
    /// Seed nodes of a Redis Cluster for `--broker redis`, comma-separated
    /// (`redis://host:port`); when set, `--redis-url` is not used. Every key of a channel lives
    /// in one slot and live events go out with `SPUBLISH` (docs/scaling.md).
    #[arg(long, value_delimiter = ',', hide_env_values = true)]
    redis_cluster_nodes: Vec<String> = Vec::new() => (Vec<String>),
        shown "none: one Redis at --redis-url";
    /// Prefix of Redis keys and Pub/Sub channels (without `{` or `}`).
    #[arg(long)]
    redis_prefix: String = "resync:".to_owned() => (String);
    /// Seconds a presence entry lives on Redis unless its instance refreshes it (every third of
    /// this): the members of an instance that dies leave within this and a third.
    #[arg(long)]
    presence_ttl_secs: u64 = 30 => (u64);
    /// Redis command connections per process.
    #[arg(long)]
    redis_pool_size: usize = 16 => (usize);
    /// Serve the demo page at `/`, publish a tick on `demo:ticker` every 2 s, and let anonymous
    /// clients publish on `demo:*` (its chat). Open by design: not for the internet. `--demo`
    /// alone means true.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    demo: bool = false => (bool);
    /// SSE, WebSocket and long-poll connections at once; past it SSE gets a retry stream, polls
    /// 503, WebSocket close 1013.
    #[arg(long)]
    max_connections: usize = transport().max_connections => (usize),
        into |config, value| config.max_connections = value;
    /// Sockets held at once, whatever they carry (streams, API requests, health checks, TLS
    /// handshakes); past it a new socket is closed at accept.
    #[arg(long)]
    max_sockets: usize = transport().max_sockets => (usize),
        into |config, value| config.max_sockets = value;
    /// Seconds a connection with no request in flight has to send a complete request head, from
    /// accept (TLS handshake included) and from the end of its last response: dripped headers
    /// and idle keep-alive connections close at it.
    #[arg(long)]
    request_header_timeout_secs: u64 = transport().request_header_timeout.as_secs() => (u64),
        into |config, value| config.request_header_timeout = Duration::from_secs(value.max(1));
    /// Bytes of responses that may wait for clients' sockets over the whole process; past it,
    /// connections holding more than 16 KiB wait for their clients to read, and long polls
    /// shrink their replies.
    #[arg(long)]
    queued_bytes_budget: usize = transport().queued_bytes_budget => (usize),
        into |config, value| config.queued_bytes_budget = value;
    /// The kernel send buffer of each accepted socket (Linux grants twice this): what a client
    /// that does not read holds in kernel memory, beyond the budget above, which the rest waits
    /// in.
    #[arg(long)]
    socket_send_buffer_bytes: usize = transport().socket_send_buffer => (usize),
        into |config, value| config.socket_send_buffer = value;
    /// Connections (sockets, counted from accept) from one client address (IPv6: one /64).
    #[arg(long)]
    max_connections_per_ip: usize = transport().max_connections_per_ip => (usize),
        into |config, value| config.max_connections_per_ip = value;
    /// New connections a second from one address, sustained.
    #[arg(long)]
    connections_per_ip_per_second: f64 = transport().connections_per_ip_per_second => (f64),
        into |config, value| config.connections_per_ip_per_second = value;
    /// New connections from one address in a burst above the rate.
    #[arg(long)]
    connection_burst_per_ip: u32 = transport().connection_burst_per_ip => (u32),
        into |config, value| config.connection_burst_per_ip = value;
    /// Channels followed by all connections of one address.
    #[arg(long)]
    max_subscriptions_per_ip: usize = transport().max_subscriptions_per_ip => (usize),
        into |config, value| config.max_subscriptions_per_ip = value;
    /// Connections of one user (token subject), from any addresses: a leaked token's reach.
    #[arg(long)]
    max_connections_per_user: usize = transport().max_connections_per_user => (usize),
        into |config, value| config.max_connections_per_user = value;
    /// Channels followed by all connections of one user.
    #[arg(long)]
    max_subscriptions_per_user: usize = transport().max_subscriptions_per_user => (usize),
        into |config, value| config.max_subscriptions_per_user = value;
    /// WebSocket messages a second per connection, sustained; past it `rate_limited`, then
    /// close 4100.
    #[arg(long)]
    ws_messages_per_second: f64 = transport().ws_messages_per_second => (f64),
        into |config, value| config.ws_messages_per_second = value;
    /// WebSocket messages in a burst above the rate.
    #[arg(long)]
    ws_message_burst: u32 = transport().ws_message_burst => (u32),
        into |config, value| config.ws_message_burst = value;
    /// Publishes a second per WebSocket, sustained; past it `rate_limited`.
    #[arg(long)]
    ws_publishes_per_second: f64 = transport().ws_publishes_per_second => (f64),
        into |config, value| config.ws_publishes_per_second = value;
    /// Publishes per WebSocket in a burst above the rate.
    #[arg(long)]
    ws_publish_burst: u32 = transport().ws_publish_burst => (u32),
        into |config, value| config.ws_publish_burst = value;
    /// Proxies (IP addresses, comma-separated) whose X-Forwarded-For names the client address
    /// for the per-address limits.
    #[arg(long, value_delimiter = ',')]
    trusted_proxies: Vec<std::net::IpAddr> = transport().trusted_proxies => (Vec<std::net::IpAddr>),
        shown "none: the TCP peer is the client",
        into |config, value| config.trusted_proxies = value;
    /// Log line format.
    #[arg(long, value_enum)]
    log_format: LogFormat = LogFormat::Text => (LogFormat);
    /// Seconds between info-level traffic summaries (connections, publishes, deliveries,
    /// requests); 0 for none.
    #[arg(long)]
    log_summary_secs: u64 = 60 => (u64);
}

/// A default as `--help` shows it.
trait ShowDefault {
    fn show(&self) -> String;
}

macro_rules! show_by_display {
    ($($ty:ty),*) => {
        $( impl ShowDefault for $ty {
            fn show(&self) -> String {
                self.to_string()
            }
        } )*
    };
}

show_by_display!(
    u32,
    u64,
    usize,
    f64,
    bool,
    String,
    SocketAddr,
    std::net::IpAddr
);

impl ShowDefault for PathBuf {
    fn show(&self) -> String {
        self.display().to_string()
    }
}

impl<T: ShowDefault> ShowDefault for Option<T> {
    fn show(&self) -> String {
        self.as_ref()
            .map_or_else(|| "none".to_owned(), ShowDefault::show)
    }
}

impl<T: ShowDefault> ShowDefault for Vec<T> {
    fn show(&self) -> String {
        if self.is_empty() {
            return "none".to_owned();
        }
        self.iter()
            .map(ShowDefault::show)
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl<K, V> ShowDefault for std::collections::BTreeMap<K, V> {
    fn show(&self) -> String {
        "none".to_owned()
    }
}

impl ShowDefault for DurabilityKind {
    fn show(&self) -> String {
        value_name(*self)
    }
}

impl ShowDefault for BrokerKind {
    fn show(&self) -> String {
        value_name(*self)
    }
}

impl ShowDefault for LogFormat {
    fn show(&self) -> String {
        value_name(*self)
    }
}

/// How the command line names an enum's value.
fn value_name(value: impl clap::ValueEnum) -> String {
    value
        .to_possible_value()
        .map(|value| value.get_name().to_owned())
        .unwrap_or_default()
}

/// Which broker the server runs on.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BrokerKind {
    /// In this process's memory: one server, history lost on restart.
    Memory,
    /// On disk in `data_dir`: one server, history kept across restarts.
    #[default]
    Disk,
    /// Redis: many servers share channels, history and seqs.
    Redis,
}

/// When the disk broker syncs publishes to the disk.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityKind {
    /// Acknowledged once synced (group commit).
    Always,
    /// Synced every `sync_interval_ms`.
    #[default]
    Periodic,
    /// Left to the operating system.
    Never,
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

impl Args {
    /// The command line: every flag also read from `RESYNC_<FLAG>`, its default in its help.
    pub fn command() -> clap::Command {
        let defaults = Settings::default();
        <Args as clap::CommandFactory>::command().mut_args(|arg| {
            let id = arg.get_id().as_str().to_owned();
            let mut arg = arg.env(format!("RESYNC_{}", id.to_uppercase()));
            if let Some(shown) = shown_default(&id, &defaults) {
                let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
                arg = arg.help(format!("{help} [default: {shown}]"));
                if let Some(long) = arg.get_long_help().map(ToString::to_string) {
                    arg = arg.long_help(format!("{long} [default: {shown}]"));
                }
            }
            arg
        })
    }

    /// This process's command line and environment (exits with the usage on an error).
    pub fn from_env() -> Self {
        Self::from_command_line(std::env::args_os())
    }

    /// `arguments` (the program name first) and this process's environment (exits with the
    /// usage on an error).
    pub fn from_command_line<I, T>(arguments: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let matches = Self::command().get_matches_from(arguments);
        <Self as clap::FromArgMatches>::from_arg_matches(&matches)
            .unwrap_or_else(|error| error.exit())
    }
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
        settings.overlay(args);
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
        let args = Args::from_command_line([
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
    fn every_flag_has_its_environment_variable_and_its_default_in_the_help() {
        let command = Args::command();
        let mut flags = 0;
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            flags += 1;
            let env = arg.get_env().map(|env| env.to_string_lossy().into_owned());
            assert_eq!(env, Some(format!("RESYNC_{}", id.to_uppercase())), "{id}");
            let help = arg.get_help().map(ToString::to_string).unwrap_or_default();
            if id != "config" {
                assert!(help.contains("[default: "), "{id}: {help}");
            }
        }
        assert!(flags > 60, "{flags} flags");
        let ping = command
            .get_arguments()
            .find(|arg| arg.get_id() == "ping_interval_secs")
            .and_then(|arg| arg.get_help().map(ToString::to_string))
            .unwrap_or_default();
        assert!(ping.ends_with("[default: 30]"), "{ping}");
    }

    #[test]
    fn the_transport_settings_default_to_the_transports_own_defaults() {
        assert_eq!(
            format!("{:?}", Settings::default().transport_config()),
            format!("{:?}", TransportConfig::default())
        );
    }

    #[test]
    fn a_transport_setting_reaches_the_transports_within_its_bounds() {
        let settings: Settings =
            toml::from_str("ping_interval_secs = 0\nshutdown_spread_ms = 250\nmax_replay = 7")
                .unwrap();
        let config = settings.transport_config();
        assert_eq!(
            config.ping_interval,
            Duration::from_secs(1),
            "at least a second"
        );
        assert_eq!(config.shutdown_spread, Duration::from_millis(250));
        assert_eq!(config.resume.max_replay, 7);
    }

    #[test]
    fn unknown_file_keys_are_errors() {
        assert!(toml::from_str::<Settings>("histroy_size = 5").is_err());
    }
}
