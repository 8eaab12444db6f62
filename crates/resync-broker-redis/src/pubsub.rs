//! The one Pub/Sub connection of a process: subscribes to channels with local subscribers,
//! feeds their messages into the hub, and after a reconnect makes every subscriber re-check
//! history.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use resync_broker::{EncodedEvent, Error, Hub};
use resync_protocol::{Channel, Epoch, Event, Payload, Position, Seq};
use tokio::sync::{mpsc, oneshot, watch};

pub(crate) enum Command {
    Subscribe(Channel, oneshot::Sender<Result<(), Error>>),
    Unsubscribe(Channel),
    /// Deliver the channel's joins and leaves to this process's watchers.
    SubscribePresence(Channel, oneshot::Sender<Result<(), Error>>),
    /// The broker was closed: stop for good.
    Close,
}

/// The Pub/Sub channel of user commands (`UserCommandBus::send`), one per key prefix.
pub(crate) fn user_commands_name(prefix: &str) -> String {
    format!("{prefix}user-commands")
}

fn pubsub_name(prefix: &str, channel: &Channel) -> String {
    format!("{prefix}{{{channel}}}")
}

fn presence_name(prefix: &str, channel: &Channel) -> String {
    format!("{prefix}{{{channel}}}:presence")
}

/// The channel of a presence Pub/Sub name (`<prefix>{<channel>}:presence`).
fn presence_channel(prefix: &str, name: &str) -> Option<Channel> {
    let channel = name
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix("}:presence")?;
    Channel::new(channel).ok()
}

/// Reads `<prefix>{<channel>}` and `<epoch>:<seq>:<payload>` back into an event.
fn decode(prefix: &str, name: &str, payload: &str) -> Option<EncodedEvent> {
    let channel = name
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix('}')?;
    let channel = Channel::new(channel).ok()?;
    let (epoch, rest) = payload.split_once(':')?;
    let (seq, data) = rest.split_once(':')?;
    let position = Position::new(Epoch::new(epoch).ok()?, Seq::new(seq.parse().ok()?));
    let data = Payload::from_json(data).ok()?;
    Some(EncodedEvent::new(Event {
        channel,
        position,
        data,
    }))
}

/// The command connections of the broker, one per slot, shared with the Pub/Sub task.
pub(crate) type CommandConnections =
    std::sync::Arc<[std::sync::Mutex<Option<redis::aio::MultiplexedConnection>>]>;

/// Where received events go: the recent copy first, then the hub's subscribers.
pub(crate) struct Delivery {
    /// Dropped when Pub/Sub reconnects: Redis went away, and a command connection of before
    /// would fail the first command sent on it (the catch-up reads that follow included).
    pub(crate) connections: CommandConnections,
    pub(crate) hub: Hub,
    pub(crate) recent: std::sync::Arc<crate::recent::RecentEvents>,
}

pub(crate) async fn run(
    client: redis::Client,
    delivery: Delivery,
    mut commands: mpsc::Receiver<Command>,
    prefix: String,
    connected: watch::Sender<bool>,
    presence: crate::presence_events::SharedFanout,
    user_commands: resync_broker::UserCommandFanout,
) {
    let Delivery {
        connections,
        hub,
        recent,
    } = delivery;
    let commands_name = user_commands_name(&prefix);
    let mut delay = Duration::from_millis(100);
    let mut was_connected = false;
    loop {
        let connection =
            tokio::time::timeout(Duration::from_secs(2), client.get_async_pubsub()).await;
        let pubsub = match connection {
            Ok(Ok(pubsub)) => pubsub,
            Ok(Err(error)) => {
                tracing::warn!(target: "resync::redis", %error, "pub/sub connection failed");
                if !wait_refusing(&mut commands, delay).await {
                    return;
                }
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
            Err(_) => {
                tracing::warn!(target: "resync::redis", "pub/sub connection timed out");
                if !wait_refusing(&mut commands, delay).await {
                    return;
                }
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let (mut sink, mut stream) = pubsub.split();
        let mut subscribed: HashSet<Channel> = HashSet::new();
        // User commands are few and every instance needs them: always subscribed.
        let mut healthy = sink.subscribe(&commands_name).await.is_ok();
        for channel in hub.channels() {
            if !healthy {
                break;
            }
            if let Err(error) = sink.subscribe(pubsub_name(&prefix, &channel)).await {
                tracing::warn!(target: "resync::redis", %error, "resubscribe failed");
                healthy = false;
                break;
            }
            subscribed.insert(channel);
        }
        let mut presence_subscribed: HashSet<Channel> = HashSet::new();
        for channel in presence.channels() {
            if healthy
                && sink
                    .subscribe(presence_name(&prefix, &channel))
                    .await
                    .is_err()
            {
                healthy = false;
                break;
            }
            presence_subscribed.insert(channel);
        }
        if !healthy {
            continue;
        }
        // Messages may have been missed while disconnected: the local copy starts over.
        recent.clear();
        if was_connected {
            for slot in connections.iter() {
                slot.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
            }
            // Events may have been published while we were away: every local subscription
            // checks history from its last position (and learns of a new epoch).
            for channel in &subscribed {
                hub.request_resync(channel);
            }
        }
        was_connected = true;
        delay = Duration::from_millis(100);
        connected.send_replace(true);
        tracing::info!(target: "resync::redis", channels = subscribed.len(), "pub/sub connected");

        loop {
            tokio::select! {
                message = stream.next() => {
                    let Some(message) = message else { break };
                    let name = message.get_channel_name().to_owned();
                    let payload: String = match message.get_payload() {
                        Ok(payload) => payload,
                        Err(error) => {
                            tracing::warn!(target: "resync::redis", %error, "unreadable pub/sub payload");
                            continue;
                        }
                    };
                    if name == commands_name {
                        match serde_json::from_str(&payload) {
                            // No receiver yet (no connection asked): nobody to tell.
                            Ok(command) => drop(user_commands.send(command)),
                            Err(error) => tracing::warn!(target: "resync::redis", %error, "undecodable user command"),
                        }
                        continue;
                    }
                    if let Some(channel) = presence_channel(&prefix, &name) {
                        match crate::presence_events::decode_event(&payload) {
                            Some(event) => {
                                if !presence.deliver(&channel, event)
                                    && presence_subscribed.remove(&channel)
                                    && sink.unsubscribe(&name).await.is_err()
                                {
                                    break;
                                }
                            }
                            None => tracing::warn!(target: "resync::redis", %name, "undecodable presence message"),
                        }
                        continue;
                    }
                    match decode(&prefix, &name, &payload) {
                        Some(event) => {
                            // Kept before it is delivered: a subscriber registering between
                            // the two finds it in one place or the other.
                            recent.record(&event);
                            if hub.deliver(&event) == 0 && hub.subscriber_count(event.channel()) == 0 {
                                let channel = event.channel().clone();
                                recent.forget(&channel);
                                if subscribed.remove(&channel) && sink.unsubscribe(&name).await.is_err() {
                                    break;
                                }
                            }
                        }
                        None => tracing::warn!(target: "resync::redis", %name, "undecodable pub/sub message"),
                    }
                }
                command = commands.recv() => match command {
                    None | Some(Command::Close) => {
                        connected.send_replace(false);
                        return;
                    }
                    Some(Command::Subscribe(channel, reply)) => {
                        if subscribed.contains(&channel) {
                            let _ = reply.send(Ok(()));
                            continue;
                        }
                        match sink.subscribe(pubsub_name(&prefix, &channel)).await {
                            Ok(()) => {
                                subscribed.insert(channel);
                                let _ = reply.send(Ok(()));
                            }
                            Err(error) => {
                                let _ = reply.send(Err(Error::Unavailable(format!("redis SUBSCRIBE failed: {error}"))));
                                break;
                            }
                        }
                    }
                    Some(Command::SubscribePresence(channel, reply)) => {
                        if presence_subscribed.contains(&channel) {
                            let _ = reply.send(Ok(()));
                            continue;
                        }
                        match sink.subscribe(presence_name(&prefix, &channel)).await {
                            Ok(()) => {
                                presence_subscribed.insert(channel);
                                let _ = reply.send(Ok(()));
                            }
                            Err(error) => {
                                let _ = reply.send(Err(Error::Unavailable(format!("redis SUBSCRIBE failed: {error}"))));
                                break;
                            }
                        }
                    }
                    Some(Command::Unsubscribe(channel)) => {
                        if hub.subscriber_count(&channel) == 0 && subscribed.remove(&channel)
                            && sink.unsubscribe(pubsub_name(&prefix, &channel)).await.is_err()
                        {
                            break;
                        }
                    }
                },
            }
        }
        connected.send_replace(false);
        tracing::warn!(target: "resync::redis", "pub/sub connection lost; reconnecting");
    }
}

/// Sleeps `delay` while Redis is unreachable, refusing subscriptions meanwhile. Returns false
/// when the broker is gone.
async fn wait_refusing(commands: &mut mpsc::Receiver<Command>, delay: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + delay;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(deadline) => return true,
            command = commands.recv() => match command {
                None | Some(Command::Close) => return false,
                Some(Command::Subscribe(_, reply) | Command::SubscribePresence(_, reply)) => {
                    let _ = reply.send(Err(Error::Unavailable("redis pub/sub is not connected".to_owned())));
                }
                Some(Command::Unsubscribe(_)) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_decode_back_into_events() {
        let event = decode("resync:", "resync:{chat:1}", "k3x9:42:{\"a\":\"b:c\"}").unwrap();
        assert_eq!(event.channel().as_str(), "chat:1");
        assert_eq!(event.position().seq.get(), 42);
        assert_eq!(event.data(), "{\"a\":\"b:c\"}");
        assert!(decode("resync:", "other:{x}", "e:1:1").is_none());
        assert!(decode("resync:", "resync:{x}", "e:notanumber:1").is_none());
    }
}
