//! resync's transports for actix-web: SSE, WebSocket and long polling over any
//! `Broker` of `resync-broker`, mounted in your app with one call.
//!
//! A [`Resync`] wraps a broker, an [`Authorizer`] and a [`TransportConfig`]. Mount it with
//! [`Resync::configure`] under any scope, and publish from your own handlers with the
//! [`Publisher`] after you change data:
//!
//! ```no_run
//! use actix_web::{App, HttpServer, web};
//! use resync_actix::Resync;
//! use resync_broker::MemoryBroker;
//!
//! # async fn run() -> std::io::Result<()> {
//! let resync = Resync::builder(MemoryBroker::default()).build();
//! let publisher = resync.publisher();
//! HttpServer::new(move || {
//!     let resync = resync.clone();
//!     App::new()
//!         .app_data(web::Data::new(publisher.clone()))
//!         // GET /resync/sse, GET /resync/ws, GET /resync/poll
//!         .service(web::scope("/resync").configure(move |config| resync.configure(config)))
//! })
//! // SSE and long polls notice at once when their client leaves, and every socket gets the
//! // kernel's write deadline (a client that stops reading is dropped).
//! .on_connect(resync_actix::on_connect(resync_actix::ConnectOptions::default()))
//! .bind(("127.0.0.1", 8080))?
//! .run()
//! .await
//! # }
//! ```
//!
//! The three transports keep one contract (`docs/protocol.md`): every event carries its
//! channel position, a client that comes back with its position gets exactly what it missed
//! (the resume algorithm of `resync-broker`), and a client that cannot be caught up gets an
//! explicit reset. Each connection's buffers are bounded; a client that reads slower than a
//! burst is caught up from history on its connection, and one that stops reading is dropped
//! at the write deadline and loses nothing when it resumes. [`Resync::shutdown`] closes every
//! connection with a "reconnect" signal, spread over a short window.

mod admission;
mod auth;
mod channel_set;
mod config;
pub mod edge;
mod error;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
#[cfg(feature = "jwks")]
pub mod jwks;
pub mod jwt;
mod membership;
mod metrics;
mod namespaces;
mod output;
mod permissions;
mod poll_presence;
mod probe;
pub mod proxy;
mod request;
mod session;
mod shared;
mod transport;
mod users;
mod write_size;

use std::sync::Arc;

use actix_web::web;
use resync_broker::{Broker, Publish};
use resync_protocol::{Channel, ErrorCode, IdempotencyKey, Payload, Position};
use tokio::sync::watch;

pub(crate) use shared::Shared;
use shared::Ticker;

pub use auth::{
    AllowAllSubscribers, AuthError, Authorizer, ChannelPattern, Credentials, Identity,
    JwtAuthorizer, MIN_SECRET_BYTES, MIN_SECRET_DISTINCT_BYTES, TokenSource, WeakSecret,
    distinct_bytes, redact_query,
};
pub use config::TransportConfig;
pub use error::{ApiError, RETRY_AFTER_SECONDS, Result, status_of};
pub use metrics::{ConnectionGuard, MAX_NAMESPACE_LABELS, Metrics, Transport};
pub use namespaces::NamespacePolicy;
pub use probe::{ConnectOptions, on_connect, track_disconnects};

/// The transports, ready to mount. Cloning is cheap and shares everything.
///
/// It holds its broker as `Arc<dyn Broker>`: the transports call the broker through the
/// trait only, so an application picks its backend at run time (the reference server does,
/// from `--broker`) without a type parameter following it up the stack.
#[derive(Clone)]
pub struct Resync {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Resync {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Resync")
            .field("config", &self.shared.config)
            .finish_non_exhaustive()
    }
}

/// Builds a [`Resync`].
pub struct ResyncBuilder {
    broker: Arc<dyn Broker>,
    authorizer: Arc<dyn Authorizer>,
    config: TransportConfig,
    proxy: Option<(Arc<dyn proxy::AppProxy>, proxy::ProxyOptions)>,
}

impl std::fmt::Debug for ResyncBuilder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ResyncBuilder")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ResyncBuilder {
    /// Who may subscribe and publish. Defaults to [`AllowAllSubscribers`]: anyone may
    /// subscribe to anything, no client may publish.
    pub fn authorizer(mut self, authorizer: impl Authorizer) -> Self {
        self.authorizer = Arc::new(authorizer);
        self
    }

    /// Asks the application (`proxy`) about what `options` names: connects, refreshes, and
    /// the subscribes and client publishes of some namespaces. Defaults to none.
    pub fn proxy(mut self, proxy: impl proxy::AppProxy, options: proxy::ProxyOptions) -> Self {
        self.proxy = Some((Arc::new(proxy), options));
        self
    }

    /// Transport settings. Defaults to [`TransportConfig::default`].
    pub fn config(mut self, config: TransportConfig) -> Self {
        self.config = config;
        self
    }

    /// Builds the transports.
    pub fn build(mut self) -> Resync {
        let most = resync_protocol::MAX_CURSOR_CHANNELS;
        if self.config.max_channels_per_connection > most {
            tracing::warn!(
                target: "resync",
                asked = self.config.max_channels_per_connection,
                "max_channels_per_connection lowered to {most}: a cursor holds at most that many"
            );
            self.config.max_channels_per_connection = most;
        }
        let broker = self.broker;
        let authorizer = self.authorizer;
        let sse_heartbeat = Ticker::new(self.config.sse_heartbeat);
        let ws_ping = Ticker::new(self.config.ping_interval);
        let metrics = Arc::new(Metrics::default());
        metrics.set_queued_bytes_budget(self.config.queued_bytes_budget);
        let shutdown = watch::channel(false).0;
        Resync {
            shared: Arc::new(Shared {
                admission: Arc::new(admission::Admission::new(&self.config)),
                publisher: Publisher {
                    broker: broker.clone(),
                    metrics: metrics.clone(),
                    hold: PublishHold {
                        share: self.config.publish_hold_share,
                        max: self.config.publish_hold_max,
                    },
                    shutdown: shutdown.subscribe(),
                    keyed: Arc::new(
                        self.config
                            .namespaces
                            .iter()
                            .filter(|(_, policy)| policy.keyed)
                            .map(|(name, _)| name.clone())
                            .collect(),
                    ),
                },
                broker,
                authorizer,
                config: self.config,
                metrics,
                shutdown,
                shutdown_notice: Arc::new(tokio::sync::Notify::new()),
                sse_heartbeat,
                ws_ping,
                poll_sessions: Default::default(),
                replies: Default::default(),
                users: Default::default(),
                proxy: self
                    .proxy
                    .map(|(proxy, options)| proxy::ProxyGate::new(proxy, options)),
            }),
        }
    }
}

impl Resync {
    /// A builder for transports over `broker`.
    pub fn builder(broker: impl Broker) -> ResyncBuilder {
        Self::builder_shared(Arc::new(broker))
    }

    /// A builder for transports over a broker the caller also keeps (to read its own
    /// figures, say, or to share it with other code).
    pub fn builder_shared(broker: Arc<dyn Broker>) -> ResyncBuilder {
        ResyncBuilder {
            broker,
            authorizer: Arc::new(AllowAllSubscribers),
            config: TransportConfig::default(),
            proxy: None,
        }
    }

    /// Registers `GET sse`, `GET ws` and `GET poll` on `config`; use it inside a scope
    /// (`web::scope("/resync").configure(…)`) to choose the prefix.
    pub fn configure(&self, config: &mut web::ServiceConfig) {
        let shared = self.shared.clone();
        config.route(
            "/sse",
            web::get().to(move |request| transport::sse::handle(shared.clone(), request)),
        );
        // CORS preflight, for pages on other origins whose requests carry headers
        // (`Authorization`, `Last-Event-ID` from a polyfill).
        for path in ["/sse", "/poll"] {
            let shared = self.shared.clone();
            config.route(
                path,
                web::method(actix_web::http::Method::OPTIONS)
                    .to(move |request| request::preflight(shared.clone(), request)),
            );
        }
        let shared = self.shared.clone();
        config.route(
            "/ws",
            web::get()
                .to(move |request, body| transport::ws::handle(shared.clone(), request, body)),
        );
        let shared = self.shared.clone();
        config.route(
            "/poll",
            web::get().to(move |request| transport::poll::handle(shared.clone(), request)),
        );
    }

    /// A handle for publishing from your own code.
    pub fn publisher(&self) -> Publisher {
        self.shared.publisher.clone()
    }

    /// The broker.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.shared.broker
    }

    /// The transport settings.
    pub fn config(&self) -> &TransportConfig {
        &self.shared.config
    }

    /// The edge its listeners put every accepted socket under (`edge` module docs).
    pub fn edge(&self) -> edge::Edge {
        edge::Edge::new(self.shared.clone())
    }

    /// The counters of every connection.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.shared.metrics
    }

    /// Tells every connection to close with a "reconnect and resume" signal (WebSocket close
    /// 4200, end of SSE stream with a `retry:` hint, an early long-poll reply), each at a
    /// random moment within [`TransportConfig::shutdown_spread`], and turns new requests
    /// away (SSE with a stream that only says `retry:`, long polls and WebSocket upgrades with
    /// 503). Stop the HTTP server's listener first (`ServerHandle::stop`), so that returning
    /// clients meet a refused connection rather than this process.
    pub fn shutdown(&self) {
        self.shared.shutdown.send_replace(true);
        // Idle keep-alive connections close now (the edge); busy ones after their response,
        // which says `Connection: close`.
        self.shared.shutdown_notice.notify_waiters();
        // Connections learn of it on the clock they already wait on (WebSocket pings, SSE
        // heartbeats): one watch per connection instead of two.
        self.shared.ws_ping.wake_all();
        self.shared.sse_heartbeat.wake_all();
    }

    /// Whether [`shutdown`](Self::shutdown) was called.
    pub fn is_shutting_down(&self) -> bool {
        *self.shared.shutdown.borrow()
    }
}

/// Publishes events from application code, e.g. a handler that just changed data.
#[derive(Clone)]
pub struct Publisher {
    broker: Arc<dyn Broker>,
    metrics: Arc<Metrics>,
    hold: PublishHold,
    /// The keyed namespaces: their publishes name a key, and no other publish does.
    keyed: Arc<std::collections::HashSet<String>>,
    /// Set when the process starts draining for a deploy.
    shutdown: watch::Receiver<bool>,
}

/// Fewer lagging subscribers than this never hold publishers back, whatever their share:
/// a handful of slow clients are slow clients (the transports cut the stuck ones).
pub const PUBLISH_HOLD_MIN_LAGGING: u64 = 8;

/// When publishes wait for the fan-out to catch up ([`TransportConfig::publish_hold_share`]).
#[derive(Clone, Copy, Debug)]
struct PublishHold {
    share: f64,
    max: std::time::Duration,
}

impl PublishHold {
    /// The longest a held publish waits for word that the lag eased before it looks again:
    /// a backstop, since a subscriber may catch up between a look and the wait.
    const RECHECK: std::time::Duration = std::time::Duration::from_millis(20);

    fn holds(&self, lag: resync_broker::DeliveryLag) -> bool {
        self.share > 0.0
            && lag.lagging >= PUBLISH_HOLD_MIN_LAGGING
            && lag.lagging as f64 >= self.share * lag.subscribers as f64
    }
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Publisher").finish_non_exhaustive()
    }
}

impl Publisher {
    /// Publishes `data` (serialized as JSON) on `channel` and returns its position.
    pub async fn publish<T: serde::Serialize + ?Sized>(
        &self,
        channel: &Channel,
        data: &T,
    ) -> Result<Position> {
        let payload = Payload::from_value(data)?;
        self.send(Publish::new(channel.clone(), payload)).await
    }

    /// Publishes with an idempotency key: a retry with the same key is stored once.
    pub async fn publish_once<T: serde::Serialize + ?Sized>(
        &self,
        channel: &Channel,
        data: &T,
        key: IdempotencyKey,
    ) -> Result<Position> {
        let payload = Payload::from_value(data)?;
        self.send(Publish::new(channel.clone(), payload).with_idempotency_key(key))
            .await
    }

    /// Publishes a prepared request. While the server is behind delivering (a large share
    /// of subscribers lag, [`TransportConfig::publish_hold_share`]) the publish waits for them
    /// to catch up, and after [`TransportConfig::publish_hold_max`] fails with `unavailable`
    /// (HTTP 503 with `Retry-After`) without being stored, so the caller may simply retry it.
    /// Once the server drains for a deploy ([`Resync::shutdown`]), a publish on a broker that
    /// does not outlive the process ([`Broker::durable`]) fails the same way.
    pub async fn send(&self, publish: Publish) -> Result<Position> {
        let channel = publish.channel.clone();
        let started = std::time::Instant::now();
        let keyed = self.keyed.contains(channel.namespace());
        if keyed != publish.key.is_some() {
            return Err(ApiError::new(
                ErrorCode::KeyMismatch,
                if keyed {
                    format!("{channel} is keyed: a publish names the key it sets (`key`)")
                } else {
                    format!("{channel} is not keyed: a publish names no key")
                },
            ));
        }
        if *self.shutdown.borrow() && !self.broker.durable() {
            // This process is going away and its broker goes with it: a publish taken now
            // would be acknowledged and lost. Nothing is stored; the retry reaches the next
            // process.
            self.metrics.publish_failed();
            return Err(ApiError::new(
                ErrorCode::Unavailable,
                "the server is shutting down: publish again after Retry-After",
            ));
        }
        if self.hold.holds(self.broker.delivery_lag()) {
            let _waiting = self.metrics.publish_waiting();
            let deadline = started + self.hold.max;
            loop {
                if std::time::Instant::now() >= deadline {
                    self.metrics.publish_held(true);
                    return Err(ApiError::new(
                        ErrorCode::Unavailable,
                        "the server is behind delivering events: publish again after Retry-After",
                    ));
                }
                // Woken when a lagging subscriber catches up, not on a timer per publish.
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                let wait = PublishHold::RECHECK.min(left);
                let _ = tokio::time::timeout(wait, self.broker.lag_eased()).await;
                if !self.hold.holds(self.broker.delivery_lag()) {
                    break;
                }
            }
            self.metrics.publish_held(false);
        }
        match self.broker.publish(publish).await {
            Ok(position) => {
                self.metrics.published(&channel, started.elapsed());
                Ok(position)
            }
            Err(error) => {
                self.metrics.publish_failed();
                Err(error.into())
            }
        }
    }

    /// The broker behind this publisher.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }
}
