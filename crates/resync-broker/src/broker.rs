//! The `Broker` trait: what a backend must do to carry resync's channels.

use async_trait::async_trait;
use resync_protocol::{Channel, IdempotencyKey, Payload, Position};

use crate::error::Result;
use crate::event::EncodedEvent;
use crate::hub::LiveSubscription;

/// The answer to a history read (see [`Broker::read_since`]).
pub type HistoryRead = resync_log::ReadOutcome<EncodedEvent>;

/// A request to publish one event. Built with [`Publish::new`] and its `with_*` methods, so
/// that a field added later does not break the code that builds one.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Publish {
    /// The channel to publish on.
    pub channel: Channel,
    /// The event's JSON data.
    pub data: Payload,
    /// When set, a publish with a key the channel has seen recently is not stored again; the
    /// broker answers with the position of the first one.
    pub idempotency_key: Option<IdempotencyKey>,
    /// Who asked for it: the application (its API, its own code) or a client over a
    /// transport. A broker with a bounded channel table keeps room for the application's
    /// channels that clients cannot take.
    pub origin: PublishOrigin,
    /// On a keyed channel, the key the event sets (`null` data deletes it): the broker
    /// stores it with the event and keeps the latest event of each key
    /// ([`KeyedState`](crate::KeyedState)).
    pub key: Option<resync_protocol::Key>,
}

/// Who asked for a publish.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum PublishOrigin {
    /// The application: the HTTP API with its key, or its own code.
    #[default]
    Application,
    /// A client, over WebSocket.
    Client,
}

impl Publish {
    /// A publish of `data` on `channel` by the application, without an idempotency key.
    pub fn new(channel: Channel, data: Payload) -> Self {
        Self {
            channel,
            data,
            idempotency_key: None,
            origin: PublishOrigin::Application,
            key: None,
        }
    }

    /// Sets the key the event sets on a keyed channel, if any.
    pub fn with_key(mut self, key: Option<resync_protocol::Key>) -> Self {
        self.key = key;
        self
    }

    /// Sets the idempotency key.
    pub fn with_idempotency_key(mut self, key: IdempotencyKey) -> Self {
        self.idempotency_key = Some(key);
        self
    }

    /// Sets the idempotency key, if any.
    pub fn with_optional_idempotency_key(mut self, key: Option<IdempotencyKey>) -> Self {
        self.idempotency_key = key;
        self
    }

    /// Marks the publish as a client's.
    pub fn from_client(mut self) -> Self {
        self.origin = PublishOrigin::Client;
        self
    }
}

/// Stores events per channel with consecutive seqs, keeps bounded history, and delivers live
/// events to local subscribers.
///
/// resync ships [`MemoryBroker`](crate::MemoryBroker) (one process) and `RedisBroker` (many
/// processes). Implement this trait to carry channels over another backend (NATS, Postgres,
/// Kafka); use a [`Hub`](crate::Hub) for local fan-out, and run the conformance suite
/// (feature `testing`) in your tests. The contract:
///
/// - **Publish** assigns the next seq of the channel atomically, stores the event in history
///   and then delivers it; it returns only once the event is stored, and an error means it was
///   not. With an idempotency key, a repeated publish is stored once.
/// - **Order**: each subscriber receives a channel's live events in seq order. Gaps and
///   duplicates in live delivery are allowed (the resume algorithm repairs them from history),
///   reordering is not.
/// - **Epochs**: seqs count from 1 within an epoch; whenever a channel's history may have been
///   lost, the broker must pick a new epoch so old positions are recognised as stale.
#[async_trait]
pub trait Broker: Send + Sync + 'static {
    /// Stores the event, delivers it, and returns its position.
    async fn publish(&self, publish: Publish) -> Result<Position>;

    /// Starts delivering the channel's live events: every event stored after this returns is
    /// delivered to the subscription (events stored concurrently may or may not be).
    async fn subscribe(&self, channel: &Channel) -> Result<LiveSubscription>;

    /// The events after `since`, at most `limit`, oldest first; or why they cannot be read.
    async fn read_since(
        &self,
        channel: &Channel,
        since: &Position,
        limit: usize,
    ) -> Result<HistoryRead>;

    /// The channel's newest position. A channel never published to has seq 0 in an epoch that
    /// its first publish will keep.
    async fn position(&self, channel: &Channel) -> Result<Position>;

    /// How many subscribers this process has on `channel`.
    fn subscriber_count(&self, channel: &Channel) -> usize;

    /// Whether the broker can serve requests now (for readiness checks).
    async fn health(&self) -> Result<()>;

    /// How far this process's fan-out is behind ([`Hub::delivery_lag`](crate::Hub::delivery_lag)
    /// for a broker that delivers through a hub); publishers are held back while a large
    /// share of subscribers lag. The default reports no lag: such a broker's publishers are
    /// never held back.
    fn delivery_lag(&self) -> crate::DeliveryLag {
        crate::DeliveryLag::default()
    }

    /// Completes when the lag may have eased ([`Hub::lag_eased`](crate::Hub::lag_eased)); a
    /// held publisher waits for it, with a short timeout as a backstop. The default never
    /// completes, which is right for a broker that reports no lag.
    async fn lag_eased(&self) {
        std::future::pending::<()>().await;
    }

    /// Whether what this broker stores outlives this process (a restart or a deploy keeps it):
    /// `true` for a broker on Redis or on disk. While a process drains for a deploy, its
    /// publishes are taken only when this says so; otherwise they are refused with a retry
    /// hint, since an acknowledged publish would be lost with the process. The default says
    /// no.
    fn durable(&self) -> bool {
        false
    }

    /// Ends the broker's work at shutdown: local subscriptions end (with
    /// [`LiveError::Closed`](crate::LiveError::Closed) after their queued events) and
    /// background tasks stop. The reference server calls it once, after its transports have
    /// closed their connections; a broker with nothing to release keeps the default, which
    /// does nothing.
    async fn close(&self) {}

    /// Who is in each channel, if this broker keeps it ([`Presence`](crate::Presence));
    /// `None` (the default) makes presence requests fail with a clear error.
    fn presence(&self) -> Option<&dyn crate::Presence> {
        None
    }

    /// How user commands (disconnect a user, end one of their subscriptions) reach every
    /// server instance of this broker ([`UserCommandBus`](crate::UserCommandBus)); `None`
    /// (the default) makes the HTTP API's user commands fail with a clear error.
    fn user_commands(&self) -> Option<&dyn crate::UserCommandBus> {
        None
    }

    /// The latest event of each key of keyed channels, if this broker keeps it
    /// ([`KeyedState`](crate::KeyedState)); `None` (the default) makes a keyed publish or a
    /// state read fail with a clear error.
    fn keyed_state(&self) -> Option<&dyn crate::KeyedState> {
        None
    }
}
