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
    /// The largest WebSocket message accepted from a client, in bytes; a larger one closes the
    /// connection with code 1009. Defaults to 64 KiB.
    pub max_message_bytes: usize,
    /// The most channels one connection may follow. Defaults to 128.
    pub max_channels_per_connection: usize,
    /// The cookie a token may come in. Defaults to `resync_token`.
    pub token_cookie: String,
    /// Origins (`https://app.example.com`) allowed to use cookie credentials, besides the
    /// server's own origin. Defaults to none.
    pub allowed_origins: Vec<String>,
    /// On shutdown, connections are closed at random moments within this window, so that
    /// clients do not all reconnect at once. Defaults to 2 seconds.
    pub shutdown_spread: Duration,
    /// How long one write to a WebSocket client may take before the client counts as stuck
    /// and is dropped. Defaults to 10 seconds.
    pub write_timeout: Duration,
    /// Replay limits for resuming clients. Defaults to [`ResumeOptions::default`].
    pub resume: ResumeOptions,
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
            max_message_bytes: 64 * 1024,
            max_channels_per_connection: 128,
            token_cookie: "resync_token".to_owned(),
            allowed_origins: Vec::new(),
            shutdown_spread: Duration::from_secs(2),
            write_timeout: Duration::from_secs(10),
            resume: ResumeOptions::default(),
        }
    }
}
