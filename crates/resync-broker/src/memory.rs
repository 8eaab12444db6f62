//! The in-memory broker: one process, no dependencies, the reference server's default.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use resync_log::{ChannelLog, Retention};
use resync_protocol::{Channel, Epoch, Event, IdempotencyKey, Position};

use crate::broker::{Broker, HistoryRead, Publish};
use crate::error::{Error, Result};
use crate::event::EncodedEvent;
use crate::hub::{Hub, LiveSubscription, lock};

/// A [`Broker`] that keeps history in this process's memory.
///
/// Each channel gets a random epoch when it is first used, so a restarted process never
/// passes off its new history as the old one: clients resuming after a restart get a reset
/// with reason `epoch_changed`.
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
    channels: Mutex<HashMap<Channel, Arc<Mutex<ChannelState>>>>,
    hub: Hub,
    retention: Retention,
    idempotency_window: usize,
    max_channels: usize,
}

#[derive(Debug)]
struct ChannelState {
    log: ChannelLog<EncodedEvent>,
    keys: IdempotencyWindow,
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
    subscriber_queue: usize,
    idempotency_window: usize,
    max_channels: usize,
}

impl Default for MemoryBrokerBuilder {
    fn default() -> Self {
        Self {
            retention: Retention::default(),
            subscriber_queue: DEFAULT_SUBSCRIBER_QUEUE,
            idempotency_window: 1_000,
            max_channels: 100_000,
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

    /// The most channels tracked at once. When the limit is reached, channels with no history
    /// and no subscriber are forgotten first; if none is, new channels are refused with
    /// [`Error::TooManyChannels`]. Defaults to 100,000.
    pub fn max_channels(mut self, max_channels: usize) -> Self {
        self.max_channels = max_channels;
        self
    }

    /// Builds the broker.
    pub fn build(self) -> MemoryBroker {
        MemoryBroker {
            inner: Arc::new(Inner {
                channels: Mutex::new(HashMap::new()),
                hub: Hub::new(self.subscriber_queue),
                retention: self.retention,
                idempotency_window: self.idempotency_window,
                max_channels: self.max_channels,
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
    /// A builder with the defaults.
    pub fn builder() -> MemoryBrokerBuilder {
        MemoryBrokerBuilder::default()
    }

    /// How many channels the broker tracks.
    pub fn channel_count(&self) -> usize {
        lock(&self.inner.channels).len()
    }

    fn channel_state(&self, channel: &Channel) -> Result<Arc<Mutex<ChannelState>>> {
        let mut channels = lock(&self.inner.channels);
        if let Some(state) = channels.get(channel) {
            return Ok(state.clone());
        }
        if channels.len() >= self.inner.max_channels {
            let now = Instant::now();
            let hub = &self.inner.hub;
            channels.retain(|name, state| {
                let mut state = lock(state);
                state.log.expire(now);
                !state.log.is_empty() || hub.subscriber_count(name) > 0
            });
            if channels.len() >= self.inner.max_channels {
                return Err(Error::TooManyChannels {
                    limit: self.inner.max_channels,
                });
            }
        }
        let epoch = Epoch::from_random_bits(fastrand::u64(..));
        let state = Arc::new(Mutex::new(ChannelState {
            log: ChannelLog::new(epoch, self.inner.retention),
            keys: IdempotencyWindow::default(),
        }));
        channels.insert(channel.clone(), state.clone());
        Ok(state)
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, publish: Publish) -> Result<Position> {
        let state = self.channel_state(&publish.channel)?;
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
        let event = EncodedEvent::new(Event {
            channel: publish.channel,
            position: Position::new(state.log.epoch().clone(), next_seq),
            data: publish.data,
        });
        let position = state.log.append(event.clone(), Instant::now());
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
        // Make sure the channel (and its epoch) exists before anyone reads its position.
        self.channel_state(channel)?;
        Ok(self.inner.hub.subscribe(channel).0)
    }

    async fn read_since(
        &self,
        channel: &Channel,
        since: &Position,
        limit: usize,
    ) -> Result<HistoryRead> {
        let state = self.channel_state(channel)?;
        let mut state = lock(&state);
        Ok(state.log.read_since(since, limit, Instant::now()))
    }

    async fn position(&self, channel: &Channel) -> Result<Position> {
        let state = self.channel_state(channel)?;
        let position = lock(&state).log.position();
        Ok(position)
    }

    fn subscriber_count(&self, channel: &Channel) -> usize {
        self.inner.hub.subscriber_count(channel)
    }

    async fn health(&self) -> Result<()> {
        Ok(())
    }
}
