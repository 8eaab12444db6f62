//! Presence: who is in a channel now, and join/leave events, beside a broker's channels.
//!
//! A *member* is an identity (a token's subject, or an anonymous client's id); it may be in a
//! channel through several connections (tabs, devices) and is one member for all of them: it
//! joins with its first connection and leaves with its last. Join and leave events are not
//! history: they are never replayed, and a client that comes back asks for the list.
//!
//! [`Presence`] is the companion trait of [`Broker`](crate::Broker) (as centrifuge keeps its
//! `PresenceManager` beside its broker): a broker that offers presence returns one from
//! [`Broker::presence`](crate::Broker::presence). [`MemoryPresence`] serves one process.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use async_trait::async_trait;
use futures_core::Stream;
use resync_protocol::{Channel, Member};
use tokio::sync::broadcast;
use tokio_stream::wrappers::BroadcastStream;
use tokio_stream::wrappers::errors::BroadcastStreamRecvError;

use crate::error::Result;

/// Join and leave events a watcher may fall behind by before it is told it lagged.
pub const PRESENCE_EVENT_QUEUE: usize = 256;

/// A change of a channel's members.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PresenceEvent {
    /// A member's first connection arrived.
    Join(Member),
    /// A member's last connection left.
    Leave(Member),
}

/// What a [`PresenceWatch`] yields when it fell more than [`PRESENCE_EVENT_QUEUE`] events
/// behind: some events are lost, and the watcher should fetch the member list again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("presence events were missed; fetch the member list again")]
pub struct PresenceLagged;

/// The join and leave events of one channel, as they happen.
pub struct PresenceWatch {
    events: BroadcastStream<PresenceEvent>,
}

impl std::fmt::Debug for PresenceWatch {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("PresenceWatch")
            .finish_non_exhaustive()
    }
}

/// One channel's join/leave fan-out in one process, bounded at [`PRESENCE_EVENT_QUEUE`]:
/// what a presence implementation sends to and hands out watches from.
#[derive(Clone, Debug)]
pub struct PresenceFanout {
    sender: broadcast::Sender<PresenceEvent>,
}

impl Default for PresenceFanout {
    fn default() -> Self {
        Self {
            sender: broadcast::channel(PRESENCE_EVENT_QUEUE).0,
        }
    }
}

impl PresenceFanout {
    /// A watch of the events sent from now on.
    pub fn watch(&self) -> PresenceWatch {
        PresenceWatch {
            events: BroadcastStream::new(self.sender.subscribe()),
        }
    }

    /// Hands `event` to every watch; `false` when none is left.
    pub fn send(&self, event: PresenceEvent) -> bool {
        self.sender.send(event).is_ok()
    }

    /// How many watches are left.
    pub fn watchers(&self) -> usize {
        self.sender.receiver_count()
    }
}

impl Stream for PresenceWatch {
    type Item = std::result::Result<PresenceEvent, PresenceLagged>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        match Pin::new(&mut self.get_mut().events).poll_next(context) {
            Poll::Ready(Some(Ok(event))) => Poll::Ready(Some(Ok(event))),
            Poll::Ready(Some(Err(BroadcastStreamRecvError::Lagged(_)))) => {
                Poll::Ready(Some(Err(PresenceLagged)))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// Who is in each channel, and who joins and leaves. What a backend must keep: per channel,
/// each member with its connections; joining and leaving must be atomic per member (two
/// connections of one member arriving at once join it once), and the events must reach the
/// watchers of every process.
#[async_trait]
pub trait Presence: Send + Sync + 'static {
    /// `connection` of `member` is in `channel` now. `true` when the member joined with it
    /// (its first connection there), and its watchers were told.
    async fn join(&self, channel: &Channel, member: &Member, connection: &str) -> Result<bool>;

    /// `connection` of the member `member_id` left `channel`. `true` when it was the member's
    /// last, so the member left, and its watchers were told.
    async fn leave(&self, channel: &Channel, member_id: &str, connection: &str) -> Result<bool>;

    /// The channel's members now, one per identity, in no particular order.
    async fn members(&self, channel: &Channel) -> Result<Vec<Member>>;

    /// How many members the channel has, without listing them.
    async fn member_count(&self, channel: &Channel) -> Result<u64>;

    /// The channel's join and leave events from now on.
    async fn watch(&self, channel: &Channel) -> Result<PresenceWatch>;
}

#[derive(Default)]
struct ChannelPresence {
    /// Each member with the connections it is here through.
    members: HashMap<String, (Member, Vec<String>)>,
    events: Option<PresenceFanout>,
}

impl ChannelPresence {
    fn tell(&self, event: PresenceEvent) {
        if let Some(events) = &self.events {
            // No watcher left is not an error.
            events.send(event);
        }
    }

    fn is_idle(&self) -> bool {
        self.members.is_empty()
            && self
                .events
                .as_ref()
                .is_none_or(|events| events.watchers() == 0)
    }
}

/// Presence in this process: a map per channel, and a broadcast channel per watched channel.
/// A channel costs nothing once it has no member and no watcher.
#[derive(Clone, Default)]
pub struct MemoryPresence {
    channels: Arc<Mutex<HashMap<Channel, ChannelPresence>>>,
}

impl std::fmt::Debug for MemoryPresence {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("MemoryPresence")
            .field("channels", &self.lock().len())
            .finish()
    }
}

impl MemoryPresence {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Channel, ChannelPresence>> {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[async_trait]
impl Presence for MemoryPresence {
    async fn join(&self, channel: &Channel, member: &Member, connection: &str) -> Result<bool> {
        let mut channels = self.lock();
        let presence = channels.entry(channel.clone()).or_default();
        let (_, connections) = presence
            .members
            .entry(member.id.clone())
            .or_insert_with(|| (member.clone(), Vec::new()));
        if connections.iter().any(|known| known == connection) {
            return Ok(false);
        }
        connections.push(connection.to_owned());
        let joined = connections.len() == 1;
        if joined {
            presence.tell(PresenceEvent::Join(member.clone()));
        }
        Ok(joined)
    }

    async fn leave(&self, channel: &Channel, member_id: &str, connection: &str) -> Result<bool> {
        let mut channels = self.lock();
        let Some(presence) = channels.get_mut(channel) else {
            return Ok(false);
        };
        let Some((_, connections)) = presence.members.get_mut(member_id) else {
            return Ok(false);
        };
        connections.retain(|known| known != connection);
        let left = connections.is_empty();
        if left && let Some((member, _)) = presence.members.remove(member_id) {
            presence.tell(PresenceEvent::Leave(member));
        }
        if presence.is_idle() {
            channels.remove(channel);
        }
        Ok(left)
    }

    async fn members(&self, channel: &Channel) -> Result<Vec<Member>> {
        Ok(self.lock().get(channel).map_or_else(Vec::new, |presence| {
            presence
                .members
                .values()
                .map(|(member, _)| member.clone())
                .collect()
        }))
    }

    async fn member_count(&self, channel: &Channel) -> Result<u64> {
        Ok(self
            .lock()
            .get(channel)
            .map_or(0, |presence| presence.members.len() as u64))
    }

    async fn watch(&self, channel: &Channel) -> Result<PresenceWatch> {
        let mut channels = self.lock();
        let presence = channels.entry(channel.clone()).or_default();
        Ok(presence
            .events
            .get_or_insert_with(PresenceFanout::default)
            .watch())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

    use futures_util::StreamExt;

    use super::*;

    #[tokio::test]
    async fn a_watch_that_falls_behind_a_burst_is_told_it_lagged_then_goes_on() {
        let presence = MemoryPresence::default();
        let channel = Channel::new("crowd").unwrap();
        let mut watch = presence.watch(&channel).await.unwrap();
        let burst = PRESENCE_EVENT_QUEUE + 44;
        for index in 0..burst {
            let member = Member {
                id: format!("m{index}"),
                info: None,
            };
            assert!(presence.join(&channel, &member, "c").await.unwrap());
        }
        // The transports answer this with the whole list (WebSocket) or a refetch hint (SSE).
        assert_eq!(watch.next().await, Some(Err(PresenceLagged)));
        // Then the newest events, the queue's worth, and the list is complete.
        let mut after = 0;
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(std::time::Duration::from_millis(50), watch.next()).await
        {
            after += 1;
        }
        assert_eq!(after, PRESENCE_EVENT_QUEUE);
        assert_eq!(presence.member_count(&channel).await.unwrap(), burst as u64);
    }
}
