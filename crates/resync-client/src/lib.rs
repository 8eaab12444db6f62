//! Follow resync channels from Rust without ever missing an event.
//!
//! A [`Client`] keeps one connection to a resync server, over WebSocket, SSE or long polling
//! ([`TransportChoice::Auto`] tries them in that order and remembers what worked), and
//! reconnects after any failure with exponential backoff and full jitter ([`backoff`]). It
//! keeps every channel's position and resumes from it, so a [`Subscription`] yields each event
//! once, in order, across any number of reconnects; when the server cannot replay what was
//! missed, the subscription yields an explicit [`Update::Reset`] instead of silently skipping.
//!
//! ```no_run
//! use futures_util::StreamExt;
//! use resync_client::{Client, Update};
//!
//! # async fn run() -> Result<(), resync_client::Error> {
//! let client = Client::builder("http://127.0.0.1:8080").build()?;
//! let mut orders = client.subscribe("orders".parse().unwrap());
//! while let Some(update) = orders.next().await {
//!     match update? {
//!         Update::Event(event) => println!("{} {}", event.position, event.data.as_str()),
//!         Update::Reset { reason, .. } => println!("refetch everything ({reason:?})"),
//!         // Only on a keyed channel the history no longer reaches: the latest of each key.
//!         Update::State { entries, .. } => println!("{} keys", entries.len()),
//!         // Only for a subscription `with_members()`.
//!         Update::Members(members) => println!("{} online", members.len()),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! To resume across process restarts, give the client a [`PositionStore`] (a [`FileStore`],
//! or your own) with [`ClientBuilder::position_store`]: each subscription then starts where
//! the last process stopped. Or keep [`Subscription::position`] (or each event's position)
//! with your own state and pass it to [`Subscription::since`].
//! [`Client::subscribe_with_snapshot`] combines a snapshot of your state with the channel's
//! events, refetching on every reset.

pub mod backoff;
mod connection;
mod error;
mod keyed;
mod poll;
mod position_store;
mod registry;
mod snapshot;
mod sse;
mod tls;
mod transports;
mod ws;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::Stream;
use resync_protocol::{
    Channel, Event, IdempotencyKey, Member, Payload, Position, PresenceRequest, ResetReason,
};
use tokio::sync::{mpsc, oneshot, watch};

pub use backoff::{Backoff, BackoffConfig};
pub use error::{Error, Result};
pub use keyed::{KeyedChange, KeyedSubscription};
pub use position_store::{FileStore, PositionStore};
pub use snapshot::{SnapshotStream, SnapshotUpdate};

use crate::registry::Registry;

/// An item of a subscription.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// The next event of the channel: in seq order, never twice, never skipped.
    Event(Event),
    /// The client's state for this channel is stale (history did not reach back, the server
    /// lost its history): refetch it; events after `position` follow.
    Reset {
        /// Why.
        reason: ResetReason,
        /// Where the stream continues from.
        position: Position,
    },
    /// A page of a keyed channel's state: the latest event of each key (a `None` data: the
    /// key was deleted), standing for `position`; after the last page (`more` false) the
    /// events after `position` follow. It comes when the history no longer reaches the
    /// subscription's position: the state replaces what the application held.
    State {
        /// Entries in key order.
        entries: Vec<resync_protocol::StateEntry>,
        /// Where the events after the state start.
        position: Position,
        /// More pages follow.
        more: bool,
    },
    /// The channel's members now (for a subscription [`with_members`](Subscription::with_members)):
    /// the whole list after each subscribe, then after every join and leave. Not history:
    /// never replayed (docs/presence.md).
    Members(Vec<Member>),
}

/// A transport the client can use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TransportKind {
    /// WebSocket: both directions; needed for [`Client::publish`].
    WebSocket,
    /// Server-Sent Events.
    Sse,
    /// Long polling.
    LongPolling,
}

impl TransportKind {
    /// A short name for logs and state.
    pub fn as_str(self) -> &'static str {
        match self {
            TransportKind::WebSocket => "websocket",
            TransportKind::Sse => "sse",
            TransportKind::LongPolling => "long-polling",
        }
    }
}

/// Which transports the client may use.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TransportChoice {
    /// WebSocket first; when the upgrade is refused or blocked, SSE; then long polling. The
    /// transport that connected is tried first on the next reconnect.
    #[default]
    Auto,
    /// Only this transport.
    Only(TransportKind),
}

/// The state of the client's connection, observable with [`Client::state`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConnectionState {
    /// Opening a connection.
    Connecting {
        /// The transport being tried.
        transport: TransportKind,
    },
    /// Connected and following every subscribed channel.
    Connected {
        /// The transport in use.
        transport: TransportKind,
    },
    /// Waiting before the next attempt.
    Reconnecting {
        /// Attempts since the last stable connection.
        attempt: u32,
        /// The wait before the next attempt.
        delay: Duration,
        /// Why the last attempt failed or the last connection ended (a refused connection, a
        /// certificate the client does not trust, a close code).
        reason: String,
    },
    /// Stopped for good; no more reconnects.
    Closed {
        /// Why.
        reason: String,
    },
}

/// A future returning a fresh token (or why none could be had).
pub type TokenFuture = Pin<Box<dyn Future<Output = std::result::Result<String, String>> + Send>>;

/// Produces tokens: called before the first connection and whenever the server says the token
/// is invalid or expired (HTTP 401, close code 4300).
pub type TokenRefresher = Arc<dyn Fn() -> TokenFuture + Send + Sync>;

/// Settings of a [`Client`].
#[derive(Clone)]
pub(crate) struct ClientConfig {
    pub(crate) base_url: reqwest::Url,
    pub(crate) token: Option<String>,
    pub(crate) refresher: Option<TokenRefresher>,
    pub(crate) transport: TransportChoice,
    pub(crate) backoff: BackoffConfig,
    pub(crate) heartbeat_grace: Duration,
    pub(crate) sse_idle_timeout: Duration,
    pub(crate) poll_timeout: Duration,
    pub(crate) connect_timeout: Duration,
    pub(crate) subscription_buffer: usize,
    pub(crate) rng_seed: Option<u64>,
    /// Roots trusted besides the public web's (a private CA, a test certificate).
    pub(crate) extra_roots: Vec<rustls_pki_types::CertificateDer<'static>>,
    /// Where subscriptions start from and keep their positions.
    pub(crate) positions: Option<Arc<dyn PositionStore>>,
}

/// Builds a [`Client`].
pub struct ClientBuilder {
    config: std::result::Result<ClientConfig, Error>,
}

impl std::fmt::Debug for ClientBuilder {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("ClientBuilder")
            .finish_non_exhaustive()
    }
}

impl ClientBuilder {
    /// A static token, sent as `Authorization: Bearer`. Defaults to none (anonymous).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        if let Ok(config) = &mut self.config {
            config.token = Some(token.into());
        }
        self
    }

    /// A function that fetches a fresh token; called before connecting and after the server
    /// refuses the current one. Defaults to none.
    pub fn token_refresher<F, Fut>(mut self, refresher: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<String, String>> + Send + 'static,
    {
        if let Ok(config) = &mut self.config {
            config.refresher = Some(Arc::new(move || Box::pin(refresher())));
        }
        self
    }

    /// Which transports to use. Defaults to [`TransportChoice::Auto`].
    pub fn transport(mut self, transport: TransportChoice) -> Self {
        if let Ok(config) = &mut self.config {
            config.transport = transport;
        }
        self
    }

    /// Reconnection delays. Defaults to [`BackoffConfig::default`] (0.5 s, doubling, 20 s cap,
    /// full jitter).
    pub fn backoff(mut self, backoff: BackoffConfig) -> Self {
        if let Ok(config) = &mut self.config {
            config.backoff = backoff;
        }
        self
    }

    /// Seeds the client's random source (backoff jitter), for reproducible tests. Defaults to
    /// a random seed.
    pub fn rng_seed(mut self, seed: u64) -> Self {
        if let Ok(config) = &mut self.config {
            config.rng_seed = Some(seed);
        }
        self
    }

    /// Trusts the certificates of `pem` (a private CA, or a server's self-signed certificate)
    /// for `https://` and `wss://`, besides the public web's roots (`webpki-roots`), which are
    /// always trusted. Defaults to none.
    pub fn add_root_certificates_pem(mut self, pem: &[u8]) -> Self {
        if let Ok(config) = &mut self.config {
            match tls::certificates_from_pem(pem) {
                Ok(certificates) => config.extra_roots.extend(certificates),
                Err(error) => self.config = Err(error),
            }
        }
        self
    }

    /// How long past the server's ping interval a silent WebSocket is still trusted before it
    /// is replaced. Defaults to 10 s.
    pub fn heartbeat_grace(mut self, grace: Duration) -> Self {
        if let Ok(config) = &mut self.config {
            config.heartbeat_grace = grace;
        }
        self
    }

    /// How long an SSE stream may stay silent (no event, no heartbeat comment) before it is
    /// replaced. Defaults to 40 s (two server heartbeats of 15 s, plus grace).
    pub fn sse_idle_timeout(mut self, timeout: Duration) -> Self {
        if let Ok(config) = &mut self.config {
            config.sse_idle_timeout = timeout;
        }
        self
    }

    /// How long each long poll asks the server to wait. Defaults to 25 s.
    pub fn poll_timeout(mut self, timeout: Duration) -> Self {
        if let Ok(config) = &mut self.config {
            config.poll_timeout = timeout;
        }
        self
    }

    /// How long opening a connection may take. Defaults to 10 s.
    pub fn connect_timeout(mut self, timeout: Duration) -> Self {
        if let Ok(config) = &mut self.config {
            config.connect_timeout = timeout;
        }
        self
    }

    /// Updates buffered per subscription before the client stops reading from the server
    /// (which then, if it lasts, disconnects the client as slow; it resumes without loss).
    /// Defaults to 1,024.
    pub fn subscription_buffer(mut self, updates: usize) -> Self {
        if let Ok(config) = &mut self.config {
            config.subscription_buffer = updates.max(1);
        }
        self
    }

    /// Keeps each subscription's position in `store` as the application handles its updates,
    /// and starts a subscription without [`since`](Subscription::since) from the position
    /// kept for its channel: a restarted process continues where the last one stopped (see
    /// [`PositionStore`]). Defaults to none: subscriptions start from now.
    pub fn position_store(mut self, store: Arc<dyn PositionStore>) -> Self {
        if let Ok(config) = &mut self.config {
            config.positions = Some(store);
        }
        self
    }

    /// Starts the client. Must be called inside a tokio runtime.
    pub fn build(self) -> Result<Client> {
        let config = self.config?;
        let registry = Arc::new(Registry::default());
        let (state_sender, state) = watch::channel(ConnectionState::Connecting {
            transport: match config.transport {
                TransportChoice::Only(kind) => kind,
                TransportChoice::Auto => TransportKind::WebSocket,
            },
        });
        let (publish_sender, publish_receiver) = mpsc::channel(256);
        let manager = connection::Manager::new(
            config.clone(),
            registry.clone(),
            state_sender,
            publish_receiver,
        )?;
        tokio::spawn(manager.run(transports::Transports));
        Ok(Client {
            inner: Arc::new(ClientInner {
                registry,
                state,
                publishes: publish_sender,
                config,
            }),
        })
    }
}

struct ClientInner {
    registry: Arc<Registry>,
    state: watch::Receiver<ConnectionState>,
    publishes: mpsc::Sender<connection::PublishRequest>,
    config: ClientConfig,
}

impl Drop for ClientInner {
    fn drop(&mut self) {
        self.registry.close("client dropped");
    }
}

/// A connection to a resync server, shared by every subscription. Cloning is cheap.
#[derive(Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Client")
            .field("base_url", &self.inner.config.base_url.as_str())
            .field("state", &*self.inner.state.borrow())
            .finish()
    }
}

impl Client {
    /// A builder for a client of the server at `base_url` (`http://host:port`, optionally with
    /// a path prefix under which resync is mounted).
    pub fn builder(base_url: &str) -> ClientBuilder {
        let config = parse_base(base_url).map(|base_url| ClientConfig {
            base_url,
            token: None,
            refresher: None,
            transport: TransportChoice::Auto,
            backoff: BackoffConfig::default(),
            heartbeat_grace: Duration::from_secs(10),
            sse_idle_timeout: Duration::from_secs(40),
            poll_timeout: Duration::from_secs(25),
            connect_timeout: Duration::from_secs(10),
            subscription_buffer: 1_024,
            rng_seed: None,
            extra_roots: Vec::new(),
            positions: None,
        });
        ClientBuilder { config }
    }

    /// Follows `channel`. Events start from now, from the client's [`PositionStore`], or from
    /// [`Subscription::since`]; the subscription registers when it is first polled.
    pub fn subscribe(&self, channel: Channel) -> Subscription {
        let positions = self.inner.config.positions.clone();
        Subscription {
            since: positions.as_ref().and_then(|store| store.load(&channel)),
            channel,
            presence: registry::PresenceWish::default(),
            state: false,
            registry: self.inner.registry.clone(),
            receiver: None,
            buffer: self.inner.config.subscription_buffer,
            failed: None,
            positions,
            handled: None,
        }
    }

    /// Follows a keyed channel as a map of its keys' latest values (docs/protocol.md,
    /// section 14): the channel's state first, then every change, kept by the seq of each
    /// key; after a reset (its history started over) the map empties and the new state is
    /// read. It starts from the state, never from the [`PositionStore`]: the map is not
    /// stored, so a position without it would miss the keys set before it.
    pub fn subscribe_keyed(&self, channel: Channel) -> KeyedSubscription {
        keyed::start(self.clone(), channel)
    }

    /// A subscription that asks for the channel's state while it has no position, and keeps
    /// no position in the store (the map it builds is not kept there).
    pub(crate) fn subscribe_state(&self, channel: Channel) -> Subscription {
        let mut subscription = self.subscribe(channel);
        subscription.since = None;
        subscription.state = true;
        subscription.positions = None;
        subscription
    }

    /// Follows `channel` with a snapshot: calls `fetch` for the current state and its position,
    /// yields it, then yields the channel's events after that position; on every reset it
    /// calls `fetch` again. A failed fetch is reported as [`SnapshotUpdate::FetchFailed`] and
    /// retried with this client's backoff; refetches that a reset follows at once back off
    /// too, so a stale snapshot source (a draining process) cannot make it spin.
    pub fn subscribe_with_snapshot<S, F, Fut>(
        &self,
        channel: Channel,
        fetch: F,
    ) -> SnapshotStream<S>
    where
        S: Send + 'static,
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = std::result::Result<(S, Position), String>> + Send + 'static,
    {
        snapshot::start(self.clone(), channel, fetch)
    }

    /// The reconnection delays this client was built with.
    pub(crate) fn backoff_config(&self) -> BackoffConfig {
        self.inner.config.backoff
    }

    /// Publishes `data` on `channel` over the WebSocket connection (waiting for one if needed)
    /// and returns the stored position. The server must allow this client to publish.
    pub async fn publish(&self, channel: Channel, data: Payload) -> Result<Position> {
        self.publish_request(channel, data, None).await
    }

    /// Like [`publish`](Self::publish) with an idempotency key: retrying after an error is safe.
    pub async fn publish_once(
        &self,
        channel: Channel,
        data: Payload,
        key: IdempotencyKey,
    ) -> Result<Position> {
        self.publish_request(channel, data, Some(key)).await
    }

    async fn publish_request(
        &self,
        channel: Channel,
        data: Payload,
        idempotency_key: Option<IdempotencyKey>,
    ) -> Result<Position> {
        let (reply, answer) = oneshot::channel();
        let request = connection::PublishRequest {
            channel,
            data,
            idempotency_key,
            reply,
        };
        self.inner
            .publishes
            .send(request)
            .await
            .map_err(|_| Error::Closed("client stopped".to_owned()))?;
        match tokio::time::timeout(self.inner.config.connect_timeout * 3, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(Error::Closed("client stopped".to_owned())),
            Err(_) => Err(Error::Timeout("no publish reply".to_owned())),
        }
    }

    /// The connection state now, and every change after.
    pub fn state(&self) -> watch::Receiver<ConnectionState> {
        self.inner.state.clone()
    }

    /// Stops the client: closes the connection (code 1000), ends every subscription, and never
    /// reconnects.
    pub fn close(&self) {
        self.inner.registry.close("closed by the application");
    }
}

fn parse_base(base_url: &str) -> Result<reqwest::Url> {
    let mut url =
        reqwest::Url::parse(base_url).map_err(|error| Error::InvalidUrl(error.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(Error::InvalidUrl(format!(
            "{base_url}: use http:// or https://"
        )));
    }
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    Ok(url)
}

/// The updates of one channel: a [`Stream`] of [`Update`]s, each event once, in order, across
/// reconnects. Dropping it unsubscribes.
pub struct Subscription {
    channel: Channel,
    since: Option<Position>,
    presence: registry::PresenceWish,
    /// Asks for the channel's state while it has no position (a keyed subscription).
    state: bool,
    registry: Arc<Registry>,
    receiver: Option<mpsc::Receiver<Result<Update>>>,
    buffer: usize,
    failed: Option<Error>,
    /// Where positions are kept ([`ClientBuilder::position_store`]).
    positions: Option<Arc<dyn PositionStore>>,
    /// The position of the update last handed to the application: kept once it asks for the
    /// next one (it handled this one), or drops the subscription.
    handled: Option<Position>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Subscription")
            .field("channel", &self.channel)
            .field("position", &self.position())
            .finish()
    }
}

impl Subscription {
    /// Resumes from `position` (stored by the application, e.g. across a restart): the events
    /// after it are replayed first. Only effective before the first poll.
    pub fn since(mut self, position: Position) -> Self {
        self.since = Some(position);
        self
    }

    /// Appears among the channel's members while subscribed, with `info` (a small JSON value
    /// the others see; the server bounds its size). WebSocket only. Only effective before the
    /// first poll.
    pub fn with_presence(mut self, info: Option<Payload>) -> Self {
        self.presence.appear = Some(PresenceRequest { info });
        self
    }

    /// Yields the channel's member list as [`Update::Members`], after each subscribe and on
    /// every join and leave. WebSocket only. Only effective before the first poll.
    pub fn with_members(mut self) -> Self {
        self.presence.track = true;
        self
    }

    /// The channel followed.
    pub fn channel(&self) -> &Channel {
        &self.channel
    }

    /// The position of the last update handed to this subscription's buffer (or the starting
    /// position). Store it to resume later.
    pub fn position(&self) -> Option<Position> {
        self.registry
            .position(&self.channel)
            .or_else(|| self.since.clone())
    }
}

impl Stream for Subscription {
    type Item = Result<Update>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Err(error) = this.keep_handled() {
            return Poll::Ready(Some(Err(error)));
        }
        if let Some(error) = this.failed.take() {
            return Poll::Ready(Some(Err(error)));
        }
        if this.receiver.is_none() {
            let (sender, receiver) = mpsc::channel(this.buffer);
            if let Err(error) = this.registry.register(
                this.channel.clone(),
                this.since.clone(),
                sender,
                this.presence.clone(),
                this.state,
            ) {
                this.receiver = Some(mpsc::channel(1).1);
                return Poll::Ready(Some(Err(error)));
            }
            this.receiver = Some(receiver);
        }
        let polled = match &mut this.receiver {
            Some(receiver) => receiver.poll_recv(context),
            None => Poll::Ready(None),
        };
        if this.positions.is_some()
            && let Poll::Ready(Some(Ok(update))) = &polled
        {
            this.handled = match update {
                Update::Event(event) => Some(event.position.clone()),
                Update::Reset { position, .. } => Some(position.clone()),
                Update::State {
                    position,
                    more: false,
                    ..
                } => Some(position.clone()),
                Update::State { .. } | Update::Members(_) => this.handled.take(),
            };
        }
        polled
    }
}

impl Subscription {
    /// Keeps the position of the update the application handled last, once.
    fn keep_handled(&mut self) -> Result<()> {
        match (&self.positions, self.handled.take()) {
            (Some(store), Some(position)) => store.save(&self.channel, &position),
            _ => Ok(()),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if let Err(error) = self.keep_handled() {
            tracing::warn!(target: "resync::client", channel = %self.channel, %error, "the last position was not kept");
        }
        // Close the receiving end first, so the registry sees the subscription gone.
        if let Some(receiver) = self.receiver.take() {
            drop(receiver);
            self.registry.unregister(&self.channel);
        }
    }
}
