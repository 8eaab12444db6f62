//! The one Pub/Sub connection of a process (on a cluster, one per node, through one cluster
//! connection): subscribes to channels with local subscribers, feeds their messages into the
//! hub, and after a reconnect makes every subscriber re-check history.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::{PushInfo, PushKind};
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
    // A keyed event: `#<key> <data>` (JSON text never starts with `#`).
    let (key, data) = match data.strip_prefix('#') {
        Some(keyed) => {
            let (key, data) = keyed.split_once(' ')?;
            (Some(resync_protocol::Key::new(key).ok()?), data)
        }
        None => (None, data),
    };
    let data = Payload::from_json(data).ok()?;
    Some(EncodedEvent::new(Event {
        channel,
        position,
        key,
        data,
    }))
}

/// The command connections of the broker, one per slot, shared with the Pub/Sub task.
pub(crate) type CommandConnections =
    std::sync::Arc<[std::sync::Mutex<Option<crate::topology::CommandConnection>>]>;

/// Where received events go: the recent copy first, then the hub's subscribers.
pub(crate) struct Delivery {
    /// Dropped when Pub/Sub reconnects: Redis went away, and a command connection of before
    /// would fail the first command sent on it (the catch-up reads that follow included).
    pub(crate) connections: CommandConnections,
    pub(crate) hub: Hub,
    pub(crate) recent: std::sync::Arc<crate::recent::RecentEvents>,
}

/// How the process listens: one Pub/Sub connection to one Redis, or one cluster connection
/// (a connection per node) taking shard channels with `SSUBSCRIBE`.
pub(crate) enum Subscriber {
    Single(redis::Client),
    Cluster(ClusterSubscriber),
}

/// How often a Pub/Sub connection is probed with a `PING` on each of its sockets: a socket
/// that stopped answering (a half-open connection, a node behind a dead link) would deliver
/// nothing and say nothing, so it counts as lost when the `PING` is not answered in time.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// How long a cluster `SSUBSCRIBE` may take before its channel waits for the next try (every
/// [`RETRY_INTERVAL`]): its shard may have no primary until a failover ends.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(1);
const RETRY_INTERVAL: Duration = Duration::from_millis(250);

/// Waiting topics tried at once (each within [`SUBSCRIBE_TIMEOUT`]).
const RETRY_BATCH: usize = 64;

/// A Pub/Sub connection that lasted this long was fine: the next one starts without backoff.
const STABLE_CONNECTION: Duration = Duration::from_secs(5);

/// What a process subscribes to on Redis.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum Topic {
    UserCommands,
    Events(Channel),
    Presence(Channel),
}

/// Pushes a cluster Pub/Sub connection may have waiting before it counts as lost: the
/// process is not keeping up, so it starts over and every subscription checks history.
const PUSH_QUEUE: usize = 16_384;

/// Opens cluster Pub/Sub connections (RESP3, where messages arrive as pushes).
pub(crate) struct ClusterSubscriber {
    seeds: Vec<String>,
    timeout: Duration,
}

impl ClusterSubscriber {
    pub(crate) fn new(seeds: &[String], timeout: Duration) -> Result<Self, Error> {
        let subscriber = Self {
            seeds: seeds.to_vec(),
            timeout,
        };
        // Checked here, so a bad seed is refused at build rather than retried for ever.
        subscriber.client(mpsc::channel(1).0, Arc::default())?;
        Ok(subscriber)
    }

    fn client(
        &self,
        pushes: mpsc::Sender<PushInfo>,
        overflowed: Arc<AtomicBool>,
    ) -> Result<redis::cluster::ClusterClient, Error> {
        redis::cluster::ClusterClientBuilder::new(self.seeds.clone())
            .use_protocol(redis::ProtocolVersion::RESP3)
            .connection_timeout(self.timeout / 4)
            .response_timeout(self.timeout)
            .push_sender(move |push: PushInfo| {
                // Only what the loop acts on is queued: the confirmations of (re)subscribes
                // (redis-rs hands them over too) would fill the queue while nothing reads it.
                let wanted = matches!(
                    push.kind,
                    PushKind::SMessage | PushKind::SUnsubscribe | PushKind::Disconnection
                );
                if wanted && pushes.try_send(push).is_err() {
                    overflowed.store(true, Ordering::Relaxed);
                }
                Ok::<(), std::convert::Infallible>(())
            })
            .build()
            .map_err(|error| Error::Unavailable(format!("bad redis cluster: {error}")))
    }

    /// A new connection with a queue of its own: pushes of a connection given up (its
    /// nodes' disconnections) never reach the next one.
    async fn connect(&self) -> redis::RedisResult<Wire> {
        let (sender, pushes) = mpsc::channel(PUSH_QUEUE);
        let overflowed = Arc::new(AtomicBool::new(false));
        let client = self
            .client(sender, overflowed.clone())
            .map_err(|error| redis::RedisError::from(std::io::Error::other(error.to_string())))?;
        let connection = client.get_async_connection().await?;
        Ok(Wire::Cluster {
            connection,
            pushes,
            overflowed,
        })
    }
}

/// One Pub/Sub connection, of either kind.
enum Wire {
    Single {
        sink: redis::aio::PubSubSink,
        stream: redis::aio::PubSubStream,
    },
    Cluster {
        connection: redis::cluster_async::ClusterConnection,
        pushes: mpsc::Receiver<PushInfo>,
        overflowed: Arc<AtomicBool>,
    },
}

/// What a Pub/Sub connection brought.
enum Incoming {
    Message {
        name: String,
        payload: String,
    },
    /// Redis ended this subscription (a cluster slot moved, its node became a replica).
    Unsubscribed(String),
    /// The connection (or one of its nodes) is gone, or messages were dropped.
    Lost,
    Other,
}

impl Wire {
    async fn subscribe(&mut self, name: &str) -> redis::RedisResult<()> {
        match self {
            Wire::Single { sink, .. } => sink.subscribe(name).await,
            Wire::Cluster { connection, .. } => connection.ssubscribe(name).await,
        }
    }

    fn is_cluster(&self) -> bool {
        matches!(self, Wire::Cluster { .. })
    }

    /// A subscribe within [`SUBSCRIBE_TIMEOUT`] on a cluster (a shard without a primary fails
    /// its own channel, and the loop goes on), as long as it takes on one Redis.
    async fn subscribe_bounded(&mut self, name: &str) -> redis::RedisResult<()> {
        if !self.is_cluster() {
            return self.subscribe(name).await;
        }
        tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.subscribe(name))
            .await
            .unwrap_or_else(|_| {
                Err(redis::RedisError::from(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "its shard did not answer",
                )))
            })
    }

    /// Subscribes to each of `names`; says which succeeded. On one Redis they go one after
    /// another and the first failure fails the rest (the connection is broken). On a cluster
    /// they go at once, each to its shard within [`SUBSCRIBE_TIMEOUT`]: a shard without a
    /// primary fails its own channels only.
    async fn subscribe_many(&mut self, names: &[String]) -> Vec<bool> {
        match self {
            Wire::Single { sink, .. } => {
                let mut results = Vec::with_capacity(names.len());
                let mut broken = false;
                for name in names {
                    broken = broken || sink.subscribe(name).await.is_err();
                    results.push(!broken);
                }
                results
            }
            Wire::Cluster { connection, .. } => subscribe_concurrently(connection, names).await,
        }
    }

    /// The cluster connection, to subscribe with beside the loop.
    fn cluster_connection(&self) -> Option<redis::cluster_async::ClusterConnection> {
        match self {
            Wire::Single { .. } => None,
            Wire::Cluster { connection, .. } => Some(connection.clone()),
        }
    }

    async fn unsubscribe(&mut self, name: &str) -> redis::RedisResult<()> {
        match self {
            Wire::Single { sink, .. } => sink.unsubscribe(name).await,
            Wire::Cluster { connection, .. } => connection.sunsubscribe(name).await,
        }
    }

    /// A `PING` through every socket of the connection (each node's, on a cluster).
    async fn probe(&mut self) -> redis::RedisResult<()> {
        match self {
            Wire::Single { sink, .. } => sink.ping::<redis::Value>().await.map(|_| ()),
            Wire::Cluster { connection, .. } => {
                use redis::cluster_routing::{
                    MultipleNodeRoutingInfo, ResponsePolicy, RoutingInfo,
                };
                connection
                    .route_command(
                        redis::cmd("PING"),
                        RoutingInfo::MultiNode((
                            MultipleNodeRoutingInfo::AllNodes,
                            Some(ResponsePolicy::AllSucceeded),
                        )),
                    )
                    .await
                    .map(|_| ())
            }
        }
    }

    async fn next(&mut self) -> Incoming {
        match self {
            Wire::Single { stream, .. } => match stream.next().await {
                None => Incoming::Lost,
                Some(message) => match message.get_payload::<String>() {
                    Ok(payload) => Incoming::Message {
                        name: message.get_channel_name().to_owned(),
                        payload,
                    },
                    Err(error) => {
                        tracing::warn!(target: "resync::redis", %error, "unreadable pub/sub payload");
                        Incoming::Other
                    }
                },
            },
            Wire::Cluster {
                pushes, overflowed, ..
            } => {
                let push = pushes.recv().await;
                if overflowed.load(Ordering::Relaxed) {
                    tracing::warn!(target: "resync::redis", "cluster pub/sub fell behind");
                    return Incoming::Lost;
                }
                let Some(push) = push else {
                    return Incoming::Lost;
                };
                let text = |value: &redis::Value| redis::from_redis_value_ref::<String>(value).ok();
                match (push.kind, push.data.as_slice()) {
                    (PushKind::SMessage, [name, payload]) => match (text(name), text(payload)) {
                        (Some(name), Some(payload)) => Incoming::Message { name, payload },
                        _ => Incoming::Other,
                    },
                    (PushKind::SUnsubscribe, [name, ..]) => {
                        text(name).map_or(Incoming::Other, Incoming::Unsubscribed)
                    }
                    (PushKind::Disconnection, _) => Incoming::Lost,
                    _ => Incoming::Other,
                }
            }
        }
    }
}

/// `SSUBSCRIBE`s each of `names` (64 at a time, each within [`SUBSCRIBE_TIMEOUT`]); says which
/// were taken.
async fn subscribe_concurrently(
    connection: &redis::cluster_async::ClusterConnection,
    names: &[String],
) -> Vec<bool> {
    // Owned futures: a stream borrowing `names` would not be `Send` where this is spawned.
    let attempts: Vec<_> = names
        .iter()
        .cloned()
        .map(|name| {
            let mut connection = connection.clone();
            async move {
                tokio::time::timeout(SUBSCRIBE_TIMEOUT, connection.ssubscribe(name))
                    .await
                    .is_ok_and(|subscribed| subscribed.is_ok())
            }
        })
        .collect();
    futures_util::stream::iter(attempts)
        .buffered(RETRY_BATCH)
        .collect::<Vec<bool>>()
        .await
}

/// The Pub/Sub name of `topic`.
fn topic_name(prefix: &str, topic: &Topic) -> String {
    match topic {
        Topic::UserCommands => user_commands_name(prefix),
        Topic::Events(channel) => pubsub_name(prefix, channel),
        Topic::Presence(channel) => presence_name(prefix, channel),
    }
}

async fn connect(subscriber: &Subscriber) -> redis::RedisResult<Wire> {
    match subscriber {
        Subscriber::Single(client) => {
            let (sink, stream) = client.get_async_pubsub().await?.split();
            Ok(Wire::Single { sink, stream })
        }
        Subscriber::Cluster(cluster) => cluster.connect().await,
    }
}

pub(crate) async fn run(
    subscriber: Subscriber,
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
        let connection = tokio::time::timeout(Duration::from_secs(2), connect(&subscriber)).await;
        let mut wire = match connection {
            Ok(Ok(wire)) => wire,
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
        let mut subscribed: HashSet<Channel> = HashSet::new();
        let mut presence_subscribed: HashSet<Channel> = HashSet::new();
        // User commands are few and every instance needs them: always subscribed.
        let mut commands_subscribed = false;
        let topics: Vec<Topic> = std::iter::once(Topic::UserCommands)
            .chain(hub.channels().into_iter().map(Topic::Events))
            .chain(presence.channels().into_iter().map(Topic::Presence))
            .collect();
        // On a cluster, what a shard without a primary could not take waits for the next try;
        // the rest is served meanwhile.
        let mut waiting = subscribe_topics(
            &mut wire,
            topics,
            &prefix,
            &mut Subscriptions {
                commands: &mut commands_subscribed,
                events: &mut subscribed,
                presence: &mut presence_subscribed,
            },
        )
        .await;
        let healthy = waiting.is_empty() || wire.is_cluster();
        if !waiting.is_empty() {
            tracing::warn!(target: "resync::redis", waiting = waiting.len(), "subscriptions not taken yet");
        }
        if !healthy {
            if !wait_refusing(&mut commands, delay).await {
                return;
            }
            delay = (delay * 2).min(Duration::from_secs(5));
            continue;
        }
        // Messages may have been missed while disconnected: the local copy starts over.
        recent.clear();
        if was_connected {
            // One Redis's connections of before would fail their first command. A cluster's
            // are kept (most of their nodes may be fine) and replaced when a command on one
            // fails (`Inner::forget_connection`).
            for slot in connections.iter() {
                let mut connection = slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if matches!(
                    *connection,
                    Some(crate::topology::CommandConnection::Single(_))
                ) {
                    connection.take();
                }
            }
            // Events may have been published while we were away: every local subscription
            // checks history from its last position (and learns of a new epoch).
            for channel in &subscribed {
                hub.request_resync(channel);
            }
        }
        was_connected = true;
        let connected_at = tokio::time::Instant::now();
        connected.send_replace(true);
        tracing::info!(target: "resync::redis", channels = subscribed.len(), "pub/sub connected");

        let mut probe =
            tokio::time::interval_at(tokio::time::Instant::now() + PROBE_INTERVAL, PROBE_INTERVAL);
        probe.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut retry = tokio::time::interval(RETRY_INTERVAL);
        retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // A retry of waiting topics runs beside the loop (a shard without a primary takes a
        // second to refuse), at most a batch at a time.
        let mut retrying: Option<tokio::task::JoinHandle<Vec<(Topic, bool)>>> = None;
        loop {
            tokio::select! {
                _ = retry.tick(), if !waiting.is_empty() && retrying.is_none() => {
                    // Topics nobody here needs any more are not taken again.
                    let watched: HashSet<Channel> = presence.channels().into_iter().collect();
                    waiting.retain(|topic| match topic {
                        Topic::Events(channel) => hub.subscriber_count(channel) > 0,
                        Topic::Presence(channel) => watched.contains(channel),
                        Topic::UserCommands => true,
                    });
                    let batch: Vec<Topic> = waiting.drain(..waiting.len().min(RETRY_BATCH)).collect();
                    if let Some(connection) = wire.cluster_connection() {
                        let prefix = prefix.clone();
                        retrying = Some(tokio::spawn(async move {
                            let names: Vec<String> = batch.iter().map(|topic| topic_name(&prefix, topic)).collect();
                            let taken = subscribe_concurrently(&connection, &names).await;
                            batch.into_iter().zip(taken).collect()
                        }));
                    } else {
                        // One Redis never has waiting topics (a failure there is a lost
                        // connection); kept for completeness.
                        waiting.extend(batch);
                    }
                }
                tried = async { retrying.as_mut().expect("guarded").await }, if retrying.is_some() => {
                    retrying = None;
                    let mut subscriptions = Subscriptions {
                        commands: &mut commands_subscribed,
                        events: &mut subscribed,
                        presence: &mut presence_subscribed,
                    };
                    for (topic, taken) in tried.unwrap_or_default() {
                        if !taken {
                            waiting.push(topic);
                            continue;
                        }
                        if let Topic::Events(channel) = &topic {
                            // Events may have been published while it waited.
                            hub.request_resync(channel);
                        }
                        subscriptions.note(topic);
                    }
                }
                _ = probe.tick() => {
                    match tokio::time::timeout(Duration::from_secs(2), wire.probe()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(error)) => {
                            tracing::warn!(target: "resync::redis", %error, "pub/sub probe failed");
                            break;
                        }
                        Err(_) => {
                            tracing::warn!(target: "resync::redis", "pub/sub probe not answered within 2 s");
                            break;
                        }
                    }
                }
                incoming = wire.next() => {
                    let (name, payload) = match incoming {
                        Incoming::Message { name, payload } => (name, payload),
                        Incoming::Lost => break,
                        Incoming::Unsubscribed(name) => {
                            // Redis ended a subscription we still want (its slot moved, its
                            // node became a replica): it waits to be taken again, and its
                            // subscribers re-read history once it is.
                            let topic = if name == commands_name {
                                commands_subscribed.then_some(Topic::UserCommands)
                            } else if let Some(channel) = presence_channel(&prefix, &name) {
                                presence_subscribed.remove(&channel).then_some(Topic::Presence(channel))
                            } else {
                                events_channel(&prefix, &name).filter(|channel| subscribed.remove(channel)).map(Topic::Events)
                            };
                            if let Some(topic) = topic {
                                tracing::warn!(target: "resync::redis", %name, "redis ended a subscription");
                                if !wire.is_cluster() {
                                    break;
                                }
                                match &topic {
                                    Topic::UserCommands => commands_subscribed = false,
                                    Topic::Events(channel) => recent.forget(channel),
                                    Topic::Presence(_) => {}
                                }
                                waiting.push(topic);
                            }
                            continue;
                        }
                        Incoming::Other => continue,
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
                                    && wire.unsubscribe(&name).await.is_err()
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
                                // Nobody here follows it: unsubscribed, whether it was known
                                // as subscribed or taken by a subscribe that timed out here
                                // and still succeeded on Redis.
                                let channel = event.channel().clone();
                                recent.forget(&channel);
                                subscribed.remove(&channel);
                                waiting.retain(|topic| topic != &Topic::Events(channel.clone()));
                                if wire.unsubscribe(&name).await.is_err() && !wire.is_cluster() {
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
                        match wire.subscribe_bounded(&pubsub_name(&prefix, &channel)).await {
                            Ok(()) => {
                                let topic = Topic::Events(channel.clone());
                                if waiting.contains(&topic) {
                                    // Its other subscribers may have missed events meanwhile.
                                    waiting.retain(|waiting| waiting != &topic);
                                    hub.request_resync(&channel);
                                }
                                subscribed.insert(channel);
                                let _ = reply.send(Ok(()));
                            }
                            Err(error) => {
                                let _ = reply.send(Err(Error::Unavailable(format!("redis SUBSCRIBE failed: {error}"))));
                                // On a cluster only that channel's shard failed.
                                if !wire.is_cluster() {
                                    break;
                                }
                            }
                        }
                    }
                    Some(Command::SubscribePresence(channel, reply)) => {
                        if presence_subscribed.contains(&channel) {
                            let _ = reply.send(Ok(()));
                            continue;
                        }
                        match wire.subscribe_bounded(&presence_name(&prefix, &channel)).await {
                            Ok(()) => {
                                waiting.retain(|topic| topic != &Topic::Presence(channel.clone()));
                                presence_subscribed.insert(channel);
                                let _ = reply.send(Ok(()));
                            }
                            Err(error) => {
                                let _ = reply.send(Err(Error::Unavailable(format!("redis SUBSCRIBE failed: {error}"))));
                                if !wire.is_cluster() {
                                    break;
                                }
                            }
                        }
                    }
                    Some(Command::Unsubscribe(channel)) => {
                        if hub.subscriber_count(&channel) == 0 {
                            waiting.retain(|topic| topic != &Topic::Events(channel.clone()));
                        }
                        if hub.subscriber_count(&channel) == 0 && subscribed.remove(&channel)
                            && wire.unsubscribe(&pubsub_name(&prefix, &channel)).await.is_err()
                        {
                            break;
                        }
                    }
                },
            }
        }
        connected.send_replace(false);
        if let Some(retrying) = retrying {
            retrying.abort();
        }
        tracing::warn!(target: "resync::redis", "pub/sub connection lost; reconnecting");
        // A connection lost soon after it was made (a queue that overflowed at once, a node
        // still failing) waits before the next, with backoff; one that lasted starts afresh.
        if connected_at.elapsed() < STABLE_CONNECTION {
            if !wait_refusing(&mut commands, delay).await {
                return;
            }
            delay = (delay * 2).min(Duration::from_secs(5));
        } else {
            delay = Duration::from_millis(100);
        }
    }
}

/// The sets a Pub/Sub loop keeps of what it is subscribed to.
struct Subscriptions<'a> {
    commands: &'a mut bool,
    events: &'a mut HashSet<Channel>,
    presence: &'a mut HashSet<Channel>,
}

impl Subscriptions<'_> {
    /// Notes that `topic` was taken.
    fn note(&mut self, topic: Topic) {
        match topic {
            Topic::UserCommands => *self.commands = true,
            Topic::Events(channel) => {
                self.events.insert(channel);
            }
            Topic::Presence(channel) => {
                self.presence.insert(channel);
            }
        }
    }
}

/// Subscribes to `topics`, noting each that was taken; returns those that were not.
async fn subscribe_topics(
    wire: &mut Wire,
    topics: Vec<Topic>,
    prefix: &str,
    subscriptions: &mut Subscriptions<'_>,
) -> Vec<Topic> {
    let names: Vec<String> = topics
        .iter()
        .map(|topic| topic_name(prefix, topic))
        .collect();
    let taken = wire.subscribe_many(&names).await;
    let mut waiting = Vec::new();
    for (topic, taken) in topics.into_iter().zip(taken) {
        if taken {
            subscriptions.note(topic);
        } else {
            waiting.push(topic);
        }
    }
    waiting
}

/// The channel of an events Pub/Sub name (`<prefix>{<channel>}`).
fn events_channel(prefix: &str, name: &str) -> Option<Channel> {
    let channel = name
        .strip_prefix(prefix)?
        .strip_prefix('{')?
        .strip_suffix('}')?;
    Channel::new(channel).ok()
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
