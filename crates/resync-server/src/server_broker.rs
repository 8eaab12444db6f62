//! The broker the server was configured with, as one type.

use async_trait::async_trait;
use resync_broker::{Broker, HistoryRead, LiveSubscription, MemoryBroker, Publish, Result};
use resync_broker_redis::RedisBroker;
use resync_protocol::{Channel, Position};

/// Either broker, chosen at start-up by `--broker`.
#[derive(Clone, Debug)]
pub enum ServerBroker {
    /// In memory.
    Memory(MemoryBroker),
    /// In Redis.
    Redis(RedisBroker),
}

macro_rules! delegate {
    ($self:ident, $broker:ident => $call:expr) => {
        match $self {
            ServerBroker::Memory($broker) => $call,
            ServerBroker::Redis($broker) => $call,
        }
    };
}

#[async_trait]
impl Broker for ServerBroker {
    async fn publish(&self, publish: Publish) -> Result<Position> {
        delegate!(self, broker => broker.publish(publish).await)
    }

    async fn subscribe(&self, channel: &Channel) -> Result<LiveSubscription> {
        delegate!(self, broker => broker.subscribe(channel).await)
    }

    async fn read_since(
        &self,
        channel: &Channel,
        since: &Position,
        limit: usize,
    ) -> Result<HistoryRead> {
        delegate!(self, broker => broker.read_since(channel, since, limit).await)
    }

    async fn position(&self, channel: &Channel) -> Result<Position> {
        delegate!(self, broker => broker.position(channel).await)
    }

    fn subscriber_count(&self, channel: &Channel) -> usize {
        delegate!(self, broker => broker.subscriber_count(channel))
    }

    async fn health(&self) -> Result<()> {
        delegate!(self, broker => broker.health().await)
    }
}
