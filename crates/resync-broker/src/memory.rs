//! The in-memory broker: one process, no dependencies, the reference server's default.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use resync_log::{ChannelLog, Retention};
use resync_protocol::{Channel, Epoch, Event, IdempotencyKey, Position};

use crate::broker::{Broker, HistoryRead, Publish, PublishOrigin};
use crate::error::{Error, Result};
use crate::event::EncodedEvent;
use crate::hub::{Hub, LiveSubscription, lock};

/// A [`Broker`] that keeps history in this process's memory.
///
/// Channels take the process's epoch, random at start, so a restarted process never passes off
/// its new history as the old one: clients resuming after a restart get a reset with reason
/// `epoch_changed`.
///
/// Only a publish makes a channel's state. Subscribing to, reading or asking the position of
/// a channel never published costs nothing here (it stands at seq 0 of the process's epoch),
/// so clients cannot fill the channel table. History is bounded per channel (count, age,
/// bytes) and over the process (bytes): past the process budget, the channel being
/// published to sheds its oldest events.
///
/// ```
/// # tokio_test_block_on(async {
/// use resync_broker::{Broker, Live, MemoryBroker, Publish};
/// use resync_protocol::{Channel, Payload};
///
/// let broker = MemoryBroker::builder().build();
/// let channel = Channel::new("news").unwrap();
/// let mut live = broker.subscribe(&channel).await.unwrap();
/// let position = broker
///     .publish(Publish::new(channel.clone(), Payload::from_json(r#"{"title":"hi"}"#).unwrap()))
///     .await
///     .unwrap();
/// assert_eq!(position.seq.get(), 1);
/// let Live::Event(event) = live.recv().await.unwrap() else { panic!() };
/// assert_eq!(event.position(), &position);
/// # });
/// # fn tokio_test_block_on<F: std::future::Future>(future: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(future)
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct MemoryBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    table: Mutex<ChannelTable>,
    hub: Hub,
    retention: Retention,
    /// Retention by namespace (the part of a channel name before its first `:`), where it
    /// differs from `retention`.
    namespace_retention: std::collections::HashMap<String, Retention>,
    idempotency_window: usize,
    max_channels: usize,
    /// The bytes of every channel's history, and the most they may add up to.
    history_bytes: std::sync::atomic::AtomicUsize,
    max_history_bytes: Option<usize>,
    keyed_limits: crate::KeyedLimits,
    presence: crate::MemoryPresence,
    /// User commands, from this process to this process.
    user_commands: crate::UserCommandFanout,
}

/// The channels that have been published to.
#[derive(Debug)]
struct ChannelTable {
    channels: HashMap<Channel, Arc<Mutex<ChannelState>>>,
    /// The epoch of channels without state, and of the states made next. It changes when a
    /// channel whose history used it is forgotten, so that a client holding a position of the
    /// forgotten history is told to reset rather than fed a new history under old seqs.
    epoch: Epoch,
    /// Channels in the order they were made: where the search for one to forget starts, so
    /// that a full table is handled in O(1), not by scanning every channel.
    eviction_order: VecDeque<Channel>,
    /// Channels a client's publish made, of the table's.
    made_by_clients: usize,
}

/// Channels examined for forgetting when the table is full, per new channel.
const EVICTION_CANDIDATES: usize = 16;

fn new_epoch() -> Epoch {
    Epoch::from_random_bits(fastrand::u64(..))
}

#[derive(Debug)]
struct ChannelState {
    /// The channel's name, shared by every event stored (one allocation, not one per event).
    channel: Channel,
    /// A client's publish made it: it counts against the clients' share of the table.
    made_by_client: bool,
    log: ChannelLog<EncodedEvent>,
    keys: IdempotencyWindow,
    /// The latest event of each key, once a publish named one.
    keyed: Option<crate::KeyedMap>,
}

/// The positions of a channel's most recent keyed publishes, oldest evicted first.
#[derive(Debug, Default)]
struct IdempotencyWindow {
    positions: HashMap<IdempotencyKey, Position>,
    order: VecDeque<IdempotencyKey>,
}

impl IdempotencyWindow {
    fn get(&self, key: &IdempotencyKey) -> Option<&Position> {
        self.positions.get(key)
    }

    fn insert(&mut self, key: IdempotencyKey, position: Position, capacity: usize) {
        if capacity == 0 {
            return;
        }
        while self.order.len() >= capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.positions.remove(&oldest);
            }
        }
        self.order.push_back(key.clone());
        self.positions.insert(key, position);
    }
}

/// Builds a [`MemoryBroker`].
#[derive(Clone, Debug)]
pub struct MemoryBrokerBuilder {
    retention: Retention,
    namespace_retention: std::collections::HashMap<String, Retention>,
    subscriber_queue: usize,
    idempotency_window: usize,
    max_channels: usize,
    max_history_bytes: Option<usize>,
    keyed_limits: crate::KeyedLimits,
}

impl Default for MemoryBrokerBuilder {
    fn default() -> Self {
        Self {
            retention: Retention::default(),
            namespace_retention: std::collections::HashMap::new(),
            subscriber_queue: DEFAULT_SUBSCRIBER_QUEUE,
            idempotency_window: 1_000,
            max_channels: 100_000,
            max_history_bytes: Some(256 * 1024 * 1024),
            keyed_limits: crate::KeyedLimits::default(),
        }
    }
}

/// Events a subscriber may have queued before it counts as lagging: about a second of a very
/// busy channel, and at 100-byte events about 100 KB of shared data per stuck subscriber.
pub const DEFAULT_SUBSCRIBER_QUEUE: usize = 1_024;

impl MemoryBrokerBuilder {
    /// History kept per channel. Defaults to [`Retention::default`] (10,000 events, 24 hours).
    pub fn retention(mut self, retention: Retention) -> Self {
        self.retention = retention;
        self
    }

    /// History kept per channel of `namespace` (the part of a channel's name before its
    /// first `:`), instead of [`retention`](Self::retention).
    pub fn namespace_retention(
        mut self,
        namespace: impl Into<String>,
        retention: Retention,
    ) -> Self {
        self.namespace_retention.insert(namespace.into(), retention);
        self
    }

    /// Events one subscriber may have queued before it is cut off as lagging. Defaults to
    /// 1,024.
    pub fn subscriber_queue(mut self, capacity: usize) -> Self {
        self.subscriber_queue = capacity;
        self
    }

    /// How many recent idempotency keys each channel remembers. Defaults to 1,000.
    pub fn idempotency_window(mut self, keys: usize) -> Self {
        self.idempotency_window = keys;
        self
    }

    /// The most bytes of history over all channels (each event's frame and
    /// [`EVENT_OVERHEAD_BYTES`](crate::EVENT_OVERHEAD_BYTES)), or `None` for no limit.
    /// Past it, the channel being published to sheds its oldest events; readers further back
    /// get a `truncated` reset. Defaults to 256 MiB.
    pub fn max_history_bytes(mut self, bytes: Option<usize>) -> Self {
        self.max_history_bytes = bytes;
        self
    }

    /// The most channels with state (published to) at once. When the limit is reached, a
    /// channel whose history has expired and that has no subscriber is forgotten; if none is
    /// found among the oldest few, a publish to a new channel is refused with
    /// [`Error::TooManyChannels`] (in O(1)). Defaults to 100,000.
    pub fn max_channels(mut self, max_channels: usize) -> Self {
        self.max_channels = max_channels;
        self
    }

    /// The bounds of each keyed channel's state. Defaults to [`KeyedLimits::default`](crate::KeyedLimits).
    pub fn keyed_limits(mut self, limits: crate::KeyedLimits) -> Self {
        self.keyed_limits = limits;
        self
    }

    /// Builds the broker.
    pub fn build(self) -> MemoryBroker {
        MemoryBroker {
            inner: Arc::new(Inner {
                table: Mutex::new(ChannelTable {
                    channels: HashMap::new(),
                    epoch: new_epoch(),
                    eviction_order: VecDeque::new(),
                    made_by_clients: 0,
                }),
                hub: Hub::new(self.subscriber_queue).waking_from_own_thread(),
                retention: self.retention,
                namespace_retention: self.namespace_retention,
                idempotency_window: self.idempotency_window,
                max_channels: self.max_channels,
                history_bytes: std::sync::atomic::AtomicUsize::new(0),
                max_history_bytes: self.max_history_bytes,
                keyed_limits: self.keyed_limits,
                presence: crate::MemoryPresence::default(),
                user_commands: crate::UserCommandFanout::default(),
            }),
        }
    }
}

impl Default for MemoryBroker {
    fn default() -> Self {
        Self::builder().build()
    }
}

impl MemoryBroker {
    /// How many times a subscriber's queue overflowed in a burst (each then caught up from
    /// history), since the broker was made.
    pub fn subscriber_overflows(&self) -> u64 {
        self.inner.hub.overflows()
    }

    /// A builder with the defaults.
    pub fn builder() -> MemoryBrokerBuilder {
        MemoryBrokerBuilder::default()
    }

    /// How many channels have state (were published to and not forgotten).
    pub fn channel_count(&self) -> usize {
        lock(&self.inner.table).channels.len()
    }

    /// The bytes of history kept over all channels.
    pub fn history_bytes(&self) -> usize {
        self.inner
            .history_bytes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The channel's state, if it was published to.
    fn existing(&self, channel: &Channel) -> Option<Arc<Mutex<ChannelState>>> {
        lock(&self.inner.table).channels.get(channel).cloned()
    }

    /// The epoch a channel without state stands at.
    fn stateless_log(&self) -> ChannelLog<EncodedEvent> {
        ChannelLog::new(lock(&self.inner.table).epoch.clone(), Retention::default())
    }

    /// The channel's state, made if needed (only a publish does).
    fn state_for_publish(
        &self,
        channel: &Channel,
        origin: PublishOrigin,
    ) -> Result<Arc<Mutex<ChannelState>>> {
        let mut table = lock(&self.inner.table);
        if let Some(state) = table.channels.get(channel) {
            return Ok(state.clone());
        }
        let by_client = origin == PublishOrigin::Client;
        // Clients may make channels in half the table: the application's own publishes can
        // always make theirs, whatever clients do.
        let client_share = self.inner.max_channels / 2;
        if table.channels.len() >= self.inner.max_channels
            || (by_client && table.made_by_clients >= client_share)
        {
            self.forget_one(&mut table);
            let full = table.channels.len() >= self.inner.max_channels;
            if full || (by_client && table.made_by_clients >= client_share) {
                return Err(Error::TooManyChannels {
                    limit: if full {
                        self.inner.max_channels
                    } else {
                        client_share
                    },
                });
            }
        }
        if by_client {
            table.made_by_clients += 1;
        }
        let state = Arc::new(Mutex::new(ChannelState {
            made_by_client: by_client,
            channel: channel.clone(),
            log: ChannelLog::new(
                table.epoch.clone(),
                self.inner
                    .namespace_retention
                    .get(channel.namespace())
                    .copied()
                    .unwrap_or(self.inner.retention),
            ),
            keys: IdempotencyWindow::default(),
            keyed: None,
        }));
        table.channels.insert(channel.clone(), state.clone());
        table.eviction_order.push_back(channel.clone());
        Ok(state)
    }

    /// Forgets one channel with no history left and no subscriber, looking at a few of the
    /// oldest only.
    fn forget_one(&self, table: &mut ChannelTable) {
        let now = Instant::now();
        for _ in 0..EVICTION_CANDIDATES.min(table.eviction_order.len()) {
            let Some(candidate) = table.eviction_order.pop_front() else {
                return;
            };
            let Some(state) = table.channels.get(&candidate).cloned() else {
                continue;
            };
            let forgettable = {
                let mut state = lock(&state);
                let before = state.log.bytes();
                state.log.expire(now);
                self.account(before, state.log.bytes());
                // A keyed channel's state outlives its history: it is what late readers get.
                state.log.is_empty()
                    && state.keyed.as_ref().is_none_or(crate::KeyedMap::is_empty)
                    && self.inner.hub.subscriber_count(&candidate) == 0
            };
            if forgettable {
                let (used_epoch, made_by_client) = {
                    let state = lock(&state);
                    (state.log.epoch() == &table.epoch, state.made_by_client)
                };
                table.channels.remove(&candidate);
                if made_by_client {
                    table.made_by_clients = table.made_by_clients.saturating_sub(1);
                }
                if used_epoch {
                    // Its seqs were of the shared epoch: a later state must not reuse them.
                    table.epoch = new_epoch();
                }
                return;
            }
            table.eviction_order.push_back(candidate);
        }
    }

    /// Adds a log's change in size to the process's total.
    fn account(&self, before: usize, after: usize) {
        use std::sync::atomic::Ordering::Relaxed;
        if after >= before {
            self.inner.history_bytes.fetch_add(after - before, Relaxed);
        } else {
            self.inner.history_bytes.fetch_sub(before - after, Relaxed);
        }
    }

    /// Sheds `log`'s oldest events while the process is over its history budget.
    fn keep_within_budget(&self, log: &mut ChannelLog<EncodedEvent>) {
        let Some(budget) = self.inner.max_history_bytes else {
            return;
        };
        let total = self.history_bytes();
        if total > budget {
            let freed = log.shed_oldest(total - budget);
            self.account(freed, 0);
        }
    }
}

#[async_trait]
impl crate::KeyedState for MemoryBroker {
    async fn state_page(
        &self,
        channel: &Channel,
        after: Option<&resync_protocol::Key>,
        limit: usize,
    ) -> Result<crate::StatePage> {
        let Some(state) = self.existing(channel) else {
            return Ok(crate::StatePage {
                entries: Vec::new(),
                position: self.stateless_log().position(),
                next: None,
            });
        };
        let mut state = lock(&state);
        let position = state.log.position();
        let (entries, more) = match state.keyed.as_mut() {
            Some(keyed) => keyed.page(after, limit, Instant::now()),
            None => (Vec::new(), false),
        };
        let next = if more {
            entries.last().map(|entry| entry.key.clone())
        } else {
            None
        };
        Ok(crate::StatePage {
            entries,
            position,
            next,
        })
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, publish: Publish) -> Result<Position> {
        let state = self.state_for_publish(&publish.channel, publish.origin)?;
        let mut state = lock(&state);
        if let Some(key) = &publish.idempotency_key
            && let Some(position) = state.keys.get(key)
        {
            return Ok(position.clone());
        }
        let next_seq = state
            .log
            .position()
            .seq
            .next()
            .ok_or_else(|| Error::Corrupt("channel seq overflow".to_owned()))?;
        let now = Instant::now();
        let limits = &self.inner.keyed_limits;
        if let Some(key) = &publish.key {
            // Refused before anything is stored.
            state
                .keyed
                .get_or_insert_default()
                .admits(key, &publish.data, limits, now)?;
        }
        if let (Some(key), Some(keyed)) = (&publish.key, state.keyed.as_mut()) {
            keyed.set(key.clone(), next_seq, &publish.data, limits, now);
        }
        let event = EncodedEvent::new(Event {
            channel: state.channel.clone(),
            position: Position::new(state.log.epoch().clone(), next_seq),
            key: publish.key,
            data: publish.data,
        });
        let before = state.log.bytes();
        // What the event holds, not only its frame: the budgets bound the process's memory.
        let size = event.held_bytes();
        let position = state.log.append_sized(event.clone(), size, Instant::now());
        self.account(before, state.log.bytes());
        self.keep_within_budget(&mut state.log);
        if let Some(key) = publish.idempotency_key {
            state
                .keys
                .insert(key, position.clone(), self.inner.idempotency_window);
        }
        // Delivered while the channel is still locked, so subscribers see seq order.
        self.inner.hub.deliver(&event);
        Ok(position)
    }

    async fn subscribe(&self, channel: &Channel) -> Result<LiveSubscription> {
        // No state: a channel never published stands at seq 0 of the process's epoch, which
        // its first publish continues.
        Ok(self.inner.hub.subscribe(channel))
    }

    async fn read_since(
        &self,
        channel: &Channel,
        since: &Position,
        limit: usize,
    ) -> Result<HistoryRead> {
        let Some(state) = self.existing(channel) else {
            // The same decision as for a log with no events.
            return Ok(self
                .stateless_log()
                .read_since(since, limit, Instant::now()));
        };
        let mut state = lock(&state);
        let before = state.log.bytes();
        let read = state.log.read_since(since, limit, Instant::now());
        self.account(before, state.log.bytes());
        Ok(read)
    }

    async fn position(&self, channel: &Channel) -> Result<Position> {
        match self.existing(channel) {
            Some(state) => Ok(lock(&state).log.position()),
            None => Ok(self.stateless_log().position()),
        }
    }

    fn subscriber_count(&self, channel: &Channel) -> usize {
        self.inner.hub.subscriber_count(channel)
    }

    fn delivery_lag(&self) -> crate::DeliveryLag {
        self.inner.hub.delivery_lag()
    }

    fn keyed_state(&self) -> Option<&dyn crate::KeyedState> {
        Some(self)
    }

    async fn lag_eased(&self) {
        self.inner.hub.lag_eased().await;
    }

    async fn close(&self) {
        self.inner.hub.close_all();
    }

    fn presence(&self) -> Option<&dyn crate::Presence> {
        Some(&self.inner.presence)
    }

    fn user_commands(&self) -> Option<&dyn crate::UserCommandBus> {
        Some(&self.inner.user_commands)
    }

    async fn health(&self) -> Result<()> {
        Ok(())
    }
}
