//! A resync [`Broker`] over Redis, so that many server processes serve the same channels.
//!
//! - **Publish** is one Lua script, atomic in Redis: it assigns the channel's next seq (the
//!   epoch lives in Redis too, and a channel whose metadata is gone gets a new one), appends to
//!   the channel's Stream trimmed to the history size, and `PUBLISH`es the encoded event.
//!   Only a publish creates a channel's keys: subscribing to, reading or asking the position
//!   of a channel never published costs no Redis memory (it stands at seq 0 of one shared
//!   epoch). Redis must not evict keys (`maxmemory-policy noeviction`, its default): a
//!   channel's metadata evicted early could start its seqs over in the same epoch.
//!   A publish that Redis did not confirm returns [`Error::Unavailable`](resync_broker::Error)
//!   and was not stored. Concurrent publishes share multiplexed connections, so they are
//!   pipelined rather than paying one round trip each. deadpool-redis opens and checks the
//!   connections; commands share them rather than taking one from the pool per command,
//!   because deadpool checks a connection with a `PING` round trip each time it is taken.
//!   Each thread keeps to one connection, opened on it, so a reply wakes its caller on the
//!   caller's own thread (on a busy HTTP worker, a wake from elsewhere waits behind the
//!   fan-out: `docs/scaling.md`).
//! - **Delivery** uses one Pub/Sub connection per process, subscribed to a channel while this
//!   process has local subscribers, and fans out through the shared [`Hub`].
//! - **History** is read from the Stream. Gaps in live delivery are filled from it by the
//!   resume algorithm; when the Pub/Sub connection drops, it reconnects with backoff,
//!   resubscribes, and makes every local subscription check history from its last position,
//!   so events published during the outage still arrive, and a Redis that came back empty is
//!   reported as a reset (new epoch), not silence.
//!
//! ```no_run
//! # async fn run() -> Result<(), resync_broker::Error> {
//! use resync_broker_redis::RedisBroker;
//! let broker = RedisBroker::builder("redis://127.0.0.1:6379").key_prefix("myapp:").build()?;
//! # Ok(()) }
//! ```

mod presence;
mod presence_events;
mod pubsub;
mod recent;
mod scripts;
mod topology;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_redis::{Config, Pool, Runtime};
use resync_broker::{
    Broker, DEFAULT_SUBSCRIBER_QUEUE, EncodedEvent, Error, HistoryRead, Hub, LiveSubscription,
    Publish, ReadDecision, ReadOutcome, Result, Retention, decide_read,
};
use resync_protocol::{Channel, Epoch, Event, Key, Payload, Position, Seq, StateEntry};
use tokio::sync::{mpsc, watch};
use topology::{CommandConnection, Topology};

/// Builds a [`RedisBroker`].
#[derive(Clone, Debug)]
pub struct RedisBrokerBuilder {
    topology: Topology,
    key_prefix: String,
    pool_size: usize,
    retention: Retention,
    namespace_retention: std::collections::HashMap<String, Retention>,
    subscriber_queue: usize,
    idempotency_ttl: Duration,
    meta_ttl: Duration,
    command_timeout: Duration,
    max_in_flight: usize,
    queue_timeout: Duration,
    presence_ttl: Duration,
    keyed_limits: resync_broker::KeyedLimits,
}

impl RedisBrokerBuilder {
    /// The bounds of each keyed channel's state (its keys: the bytes bound is the memory and
    /// disk brokers' alone). Defaults to [`KeyedLimits::default`](resync_broker::KeyedLimits).
    pub fn keyed_limits(mut self, limits: resync_broker::KeyedLimits) -> Self {
        self.keyed_limits = limits;
        self
    }

    /// How long a presence entry lives unless its instance refreshes it (every third of
    /// this): a member of an instance that died leaves within this and a third. Defaults to
    /// 30 seconds.
    pub fn presence_ttl(mut self, ttl: Duration) -> Self {
        self.presence_ttl = ttl.max(Duration::from_millis(30));
        self
    }

    /// Prefix of every key and Pub/Sub channel, so several apps can share one Redis.
    /// Defaults to `resync:`.
    /// A prefix with `{` or `}` is refused at [`build`](Self::build): it would change the
    /// hash tag that keeps a channel's keys in one cluster slot.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// Connections to Redis for commands (each multiplexed, shared by concurrent commands).
    /// Defaults to 16.
    pub fn pool_size(mut self, size: usize) -> Self {
        self.pool_size = size.max(1);
        self
    }

    /// History per channel. The count and byte limits (payload bytes) trim the Stream's
    /// oldest entries at each publish; the age limit expires a channel's whole history that
    /// long after its last publish (Redis Streams keep no per-entry age). Defaults to [`Retention::default`] (10,000 events, 24 hours).
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

    /// Events one local subscriber may have queued before it is cut off as lagging.
    /// Defaults to 1,024.
    pub fn subscriber_queue(mut self, capacity: usize) -> Self {
        self.subscriber_queue = capacity;
        self
    }

    /// How long an idempotency key is remembered. Defaults to 10 minutes.
    pub fn idempotency_ttl(mut self, ttl: Duration) -> Self {
        self.idempotency_ttl = ttl;
        self
    }

    /// How long a channel's epoch and seq are kept after its last use (a publish, or a read
    /// of a channel that has them). Losing them starts a new epoch (clients get a reset).
    /// Defaults to 7 days. The shared epoch of channels without metadata changes every half
    /// of this, so a subscriber of a never-published channel across that change gets a
    /// reset (`epoch_changed`) at the channel's first publish.
    pub fn meta_ttl(mut self, ttl: Duration) -> Self {
        self.meta_ttl = ttl;
        self
    }

    /// How long one Redis command may take before it counts as failed. Defaults to 2 seconds.
    pub fn command_timeout(mut self, timeout: Duration) -> Self {
        self.command_timeout = timeout;
        self
    }

    /// Commands (and scripts) sent to Redis at once; the next wait their turn, for at most
    /// [`queue_timeout`](Self::queue_timeout), before their command timeout starts. Without
    /// it, 5,000 clients resuming at once after a deploy put 5,000 commands in the
    /// connections' queues, the last ones passed their 2 s while Redis worked through the
    /// first, and the clients were cut off and came back to do it again. Defaults to 64
    /// (Redis answers one at a time: a deeper queue only moves the wait past the timeout).
    pub fn max_in_flight(mut self, commands: usize) -> Self {
        self.max_in_flight = commands.max(1);
        self
    }

    /// How long a command may wait for its turn ([`max_in_flight`](Self::max_in_flight))
    /// before it fails as unavailable. Defaults to 30 seconds.
    pub fn queue_timeout(mut self, timeout: Duration) -> Self {
        self.queue_timeout = timeout;
        self
    }

    /// Creates the pool and starts the Pub/Sub task. Must be called inside a tokio runtime,
    /// where the Pub/Sub task runs: build it outside the HTTP workers (the reference server
    /// builds it on its main thread). Command connections are opened lazily, each on the
    /// thread that first needs it, so this succeeds while Redis is down.
    pub fn build(self) -> Result<RedisBroker> {
        if self.key_prefix.contains(['{', '}']) {
            return Err(Error::Unavailable(format!(
                "the redis key prefix {:?} may not hold '{{' or '}}'",
                self.key_prefix
            )));
        }
        let (opener, subscriber) = match &self.topology {
            Topology::Single { url } => {
                let client = redis::Client::open(url.as_str())
                    .map_err(|error| Error::Unavailable(format!("bad redis url: {error}")))?;
                let mut config = Config::from_url(url.clone());
                config.pool = Some(deadpool_redis::PoolConfig {
                    max_size: self.pool_size,
                    timeouts: deadpool_redis::Timeouts {
                        wait: Some(self.command_timeout),
                        create: Some(self.command_timeout),
                        recycle: Some(self.command_timeout),
                    },
                    ..Default::default()
                });
                let pool = config.create_pool(Some(Runtime::Tokio1)).map_err(|error| {
                    Error::Unavailable(format!("cannot create redis pool: {error}"))
                })?;
                (Opener::Single(pool), pubsub::Subscriber::Single(client))
            }
            Topology::Cluster { seeds } => {
                let commands = redis::cluster::ClusterClientBuilder::new(seeds.clone())
                    .connection_timeout(self.command_timeout / 4)
                    .response_timeout(self.command_timeout)
                    .build()
                    .map_err(|error| Error::Unavailable(format!("bad redis cluster: {error}")))?;
                let subscriber = pubsub::ClusterSubscriber::new(seeds, self.command_timeout)?;
                (
                    Opener::Cluster(Box::new(commands)),
                    pubsub::Subscriber::Cluster(subscriber),
                )
            }
        };
        let (commands, receiver) = mpsc::channel(1_024);
        let idle_commands = commands.clone();
        let recent = Arc::new(recent::RecentEvents::default());
        let idle_recent = recent.clone();
        let hub = Hub::with_idle_callback(self.subscriber_queue, move |channel| {
            idle_recent.forget(channel);
            // If the queue is full the Pub/Sub task catches up later: it unsubscribes from any
            // channel that delivers a message with no local subscriber.
            let _ = idle_commands.try_send(pubsub::Command::Unsubscribe(channel.clone()));
        });
        let (connected_sender, connected) = watch::channel(false);
        let presence_fanout = Arc::new(presence_events::Fanout::default());
        let user_commands = resync_broker::UserCommandFanout::default();
        // Where the Pub/Sub and presence tasks run; outside a runtime, a typed error rather
        // than `tokio::spawn`'s panic.
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Unavailable(
                "build the redis broker inside a Tokio runtime (it starts its Pub/Sub task)"
                    .to_owned(),
            )
        })?;
        let connections: pubsub::CommandConnections = (0..self.pool_size)
            .map(|_| std::sync::Mutex::new(None))
            .collect();
        let inner = Arc::new(Inner {
            user_commands: user_commands.clone(),
            presence_fanout: presence_fanout.clone(),
            presence_local: presence::Local::default(),
            opener,
            connections: connections.clone(),
            next_connection: AtomicUsize::new(0),
            hub: hub.clone(),
            recent: recent.clone(),
            commands,
            connected,
            scripts: Scripts::new(&self.topology),
            turns: tokio::sync::Semaphore::new(self.max_in_flight),
            state_pages: resync_broker::StatePageCache::new(
                16 * 1024 * 1024,
                Duration::from_secs(1),
            ),
            settings: self,
        });
        runtime.spawn(pubsub::run(
            subscriber,
            pubsub::Delivery {
                connections,
                hub,
                recent: recent.clone(),
            },
            receiver,
            inner.settings.key_prefix.clone(),
            connected_sender,
            presence_fanout,
            user_commands,
        ));
        runtime.spawn(presence::keep_alive(
            Arc::downgrade(&inner),
            inner.settings.presence_ttl / 3,
        ));
        Ok(RedisBroker { inner })
    }
}

struct Scripts {
    publish: redis::Script,
    position: redis::Script,
    read_since: redis::Script,
    presence_join: redis::Script,
    presence_leave: redis::Script,
    presence_refresh: redis::Script,
    presence_sweep: redis::Script,
    state: redis::Script,
}

impl Scripts {
    /// The scripts, publishing with the topology's Pub/Sub command (`SPUBLISH` on a cluster).
    fn new(topology: &Topology) -> Self {
        let script = |source: &str| {
            redis::Script::new(
                &source.replace("'PUBLISH'", &format!("'{}'", topology.publish_command())),
            )
        };
        Scripts {
            publish: script(scripts::PUBLISH),
            state: script(scripts::STATE),
            position: script(scripts::POSITION),
            read_since: script(scripts::READ_SINCE),
            presence_join: script(scripts::PRESENCE_JOIN),
            presence_leave: script(scripts::PRESENCE_LEAVE),
            presence_refresh: script(scripts::PRESENCE_REFRESH),
            presence_sweep: script(scripts::PRESENCE_SWEEP),
        }
    }
}

/// How command connections are opened.
enum Opener {
    /// From a pool, which opens and checks them.
    Single(Pool),
    /// A cluster connection each, which keeps one connection per node and routes by slot.
    Cluster(Box<redis::cluster::ClusterClient>),
}

struct Inner {
    opener: Opener,
    /// Connections shared by every command, `pool_size` of them, taken from `pool` lazily;
    /// each thread keeps to one ([`Inner::slot`]).
    connections: pubsub::CommandConnections,
    next_connection: AtomicUsize,
    hub: Hub,
    /// The events received over Pub/Sub lately, for catch-up reads.
    recent: Arc<recent::RecentEvents>,
    commands: mpsc::Sender<pubsub::Command>,
    connected: watch::Receiver<bool>,
    settings: RedisBrokerBuilder,
    scripts: Scripts,
    /// Turns to send a command: `max_in_flight` of them, so that the command timeout counts
    /// Redis's answer, not a queue behind a crowd.
    turns: tokio::sync::Semaphore,
    /// State pages read lately, for the readers that ask for them at the same position.
    state_pages: resync_broker::StatePageCache,
    /// This process's watchers of joins and leaves (shared with the Pub/Sub task).
    presence_fanout: Arc<presence_events::Fanout>,
    /// This process's own presence entries, which it keeps alive.
    presence_local: presence::Local,
    /// User commands from every instance, fed by the Pub/Sub task.
    user_commands: resync_broker::UserCommandFanout,
}

/// A [`Broker`] whose seqs, epochs and history live in Redis, shared by every process that
/// uses the same Redis and key prefix. Cloning shares the broker.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("RedisBroker")
            .field("key_prefix", &self.inner.settings.key_prefix)
            .field("connected", &*self.inner.connected.borrow())
            .finish_non_exhaustive()
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it (an `Option` that is
/// set or taken whole is consistent at every step).
fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn unavailable(error: impl std::fmt::Display) -> Error {
    Error::Unavailable(format!("redis: {error}"))
}

fn random_epoch() -> String {
    Epoch::from_random_bits(fastrand::u64(..))
        .as_str()
        .to_owned()
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl RedisBroker {
    /// A builder for a broker on the Redis at `url` (`redis://host:port/db`).
    pub fn builder(url: impl Into<String>) -> RedisBrokerBuilder {
        Self::with_topology(Topology::Single { url: url.into() })
    }

    /// A builder for a broker on the Redis Cluster that any of `seeds` (`redis://host:port`)
    /// belongs to. Every key of a channel lives in the channel's slot, live events go out
    /// with `SPUBLISH` to that slot's shard, and each process keeps one Pub/Sub connection
    /// per node (`docs/scaling.md`, "Redis Cluster").
    pub fn cluster_builder(
        seeds: impl IntoIterator<Item = impl Into<String>>,
    ) -> RedisBrokerBuilder {
        Self::with_topology(Topology::Cluster {
            seeds: seeds.into_iter().map(Into::into).collect(),
        })
    }

    fn with_topology(topology: Topology) -> RedisBrokerBuilder {
        RedisBrokerBuilder {
            topology,
            key_prefix: "resync:".to_owned(),
            pool_size: 16,
            retention: Retention::default(),
            namespace_retention: std::collections::HashMap::new(),
            subscriber_queue: DEFAULT_SUBSCRIBER_QUEUE,
            idempotency_ttl: Duration::from_secs(600),
            keyed_limits: resync_broker::KeyedLimits::default(),
            meta_ttl: Duration::from_secs(7 * 24 * 60 * 60),
            command_timeout: Duration::from_secs(2),
            max_in_flight: 64,
            queue_timeout: Duration::from_secs(30),
            presence_ttl: Duration::from_secs(30),
        }
    }

    fn key(&self, channel: &Channel, suffix: &str) -> String {
        format!("{}{{{}}}:{suffix}", self.inner.settings.key_prefix, channel)
    }

    /// The shared epoch's key for `channel`: one for the whole prefix on one Redis (channel
    /// keys always hold a `{`, so it meets none of them), one per slot on a cluster, in the
    /// channel's slot so its scripts may touch it (`topology`).
    fn shared_epoch_key(&self, channel: &Channel) -> String {
        let prefix = &self.inner.settings.key_prefix;
        if self.inner.settings.topology.is_cluster() {
            let slot = topology::slot_of(&self.key(channel, "meta"));
            format!("{prefix}{{{}}}:epoch", topology::slot_tag(slot))
        } else {
            format!("{prefix}epoch")
        }
    }

    /// The shared epoch lives half as long as metadata (see `scripts`).
    fn shared_epoch_ttl(&self) -> u64 {
        (millis(self.inner.settings.meta_ttl) / 2).max(1)
    }

    /// Runs a script with the command timeout; any failure is "unavailable".
    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        self.inner.run(invocation).await
    }

    fn position_from(epoch: String, seq: u64) -> Result<Position> {
        let epoch = Epoch::new(&epoch).map_err(|error| Error::Corrupt(error.to_string()))?;
        Ok(Position::new(epoch, Seq::new(seq)))
    }
}

/// Whether a command waits for its turn ([`RedisBrokerBuilder::max_in_flight`]).
#[derive(Clone, Copy)]
enum Lane {
    /// Publishes, reads, presence changes: in turn.
    Turn,
    /// Keeping presence alive and health checks: at once, few and small.
    Upkeep,
}

impl Inner {
    /// Runs a script with the command timeout; any failure is "unavailable".
    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        self.on_connection(Lane::Turn, |mut connection| async move {
            invocation.invoke_async::<T>(&mut connection).await
        })
        .await
    }

    /// Runs an upkeep script (presence refreshes and sweeps) without waiting for a turn: a
    /// crowd's queue must not outlast the presence TTL and make live members leave.
    pub(crate) async fn run_upkeep<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
    ) -> Result<T> {
        self.on_connection(Lane::Upkeep, |mut connection| async move {
            invocation.invoke_async::<T>(&mut connection).await
        })
        .await
    }

    /// Runs one command with the command timeout; any failure is "unavailable".
    pub(crate) async fn command<T: redis::FromRedisValue>(
        &self,
        command: &mut redis::Cmd,
    ) -> Result<T> {
        self.on_connection(Lane::Turn, |mut connection| async move {
            command.query_async::<T>(&mut connection).await
        })
        .await
    }

    /// Runs one upkeep command (a health check) without waiting for a turn.
    pub(crate) async fn command_upkeep<T: redis::FromRedisValue>(
        &self,
        command: &mut redis::Cmd,
    ) -> Result<T> {
        self.on_connection(Lane::Upkeep, |mut connection| async move {
            command.query_async::<T>(&mut connection).await
        })
        .await
    }

    /// Runs `call` on the next shared connection within the command timeout; a connection
    /// that failed or timed out is forgotten, so the next call takes a fresh one.
    async fn on_connection<T, Call, Fut>(&self, lane: Lane, call: Call) -> Result<T>
    where
        Call: FnOnce(CommandConnection) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let waited = self.settings.queue_timeout;
        let _turn = match lane {
            Lane::Upkeep => None,
            Lane::Turn => match tokio::time::timeout(waited, self.turns.acquire()).await {
                Ok(Ok(turn)) => Some(turn),
                Ok(Err(_)) => return Err(Error::Closed),
                Err(_) => {
                    return Err(Error::Unavailable(format!(
                        "redis is busy: no turn for a command within {waited:?}"
                    )));
                }
            },
        };
        let timeout = self.settings.command_timeout;
        let slot = self.slot();
        let attempt = async {
            let connection = self.connection(slot).await?;
            call(connection).await.map_err(|error| {
                if error.is_io_error() || error.is_connection_dropped() || error.is_timeout() {
                    self.forget_connection(slot);
                }
                unavailable(error)
            })
        };
        tokio::time::timeout(timeout, attempt).await.map_err(|_| {
            self.forget_connection(slot);
            Error::Unavailable(format!("redis did not answer within {timeout:?}"))
        })?
    }

    /// The shared connection in `slot`, taken from the pool (opened and checked there) the
    /// first time and after a failure. It is opened on the calling thread, so its driver
    /// (the task that writes commands and reads replies) runs beside the callers that use
    /// this slot ([`Inner::slot`]).
    async fn connection(&self, slot: usize) -> Result<CommandConnection> {
        if let Some(connection) = lock(&self.connections[slot]).clone() {
            return Ok(connection);
        }
        let connection = match &self.opener {
            Opener::Single(pool) => {
                let pooled = pool.get().await.map_err(unavailable)?;
                CommandConnection::Single(deadpool_redis::Connection::take(pooled))
            }
            Opener::Cluster(client) => CommandConnection::Cluster(
                client.get_async_connection().await.map_err(unavailable)?,
            ),
        };
        *lock(&self.connections[slot]) = Some(connection.clone());
        Ok(connection)
    }

    /// The connection slot of the calling thread: each thread keeps to one (while there are
    /// as many slots as threads), so a command's reply wakes its caller on the caller's own
    /// thread. On an HTTP worker busy with fan-out, a wake from another thread waits behind
    /// every subscriber that thread's Pub/Sub woke; a wake from the worker's own connection
    /// comes first. Measured on a busy box (issue 28, `docs/scaling.md`): connections handed
    /// out in turn to whichever thread asked, 4.5M deliveries/s; all on one other thread,
    /// 5.0M; each thread its own, 8.1M.
    fn slot(&self) -> usize {
        thread_local! {
            static SLOT: std::cell::Cell<Option<usize>> = const { std::cell::Cell::new(None) };
        }
        let slot = SLOT.with(|slot| match slot.get() {
            Some(chosen) => chosen,
            None => {
                let chosen = self.next_connection.fetch_add(1, Ordering::Relaxed);
                slot.set(Some(chosen));
                chosen
            }
        });
        slot % self.connections.len()
    }

    /// Drops the connection of `slot` after a failure, so the next command opens another (a
    /// cluster connection too: one that lost every node does not always come back by
    /// itself). A new cluster connection reaches the seeds first, so their connect timeout
    /// is a quarter of the command timeout: a node that accepts no connection (a dead host)
    /// then costs a fraction of a command's time.
    fn forget_connection(&self, slot: usize) {
        lock(&self.connections[slot]).take();
    }
}

/// When a keyed publish of `data` stops being served: a deleted key's tombstone after its
/// time, a value after the key TTL (ms since the Unix epoch; 0: never).
fn keyed_expiry(limits: &resync_broker::KeyedLimits, data: &Payload) -> u64 {
    limits
        .ttl_of(data)
        .map_or(0, |ttl| now_ms().saturating_add(millis(ttl)))
}

/// Milliseconds since the Unix epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since| {
            u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
        })
}

/// Parses one XRANGE entry (`0-<seq>`, `[d, payload]`, or `[d, payload, k, key]` for a keyed
/// event) into an event.
fn event_from_entry(
    channel: &Channel,
    epoch: &Epoch,
    entry: &redis::Value,
) -> Result<EncodedEvent> {
    let corrupt = || Error::Corrupt(format!("unreadable stream entry of {channel}"));
    let redis::Value::Array(parts) = entry else {
        return Err(corrupt());
    };
    let [id, fields] = parts.as_slice() else {
        return Err(corrupt());
    };
    let id: String = redis::from_redis_value_ref(id).map_err(|_| corrupt())?;
    let seq: u64 = id
        .strip_prefix("0-")
        .and_then(|seq| seq.parse().ok())
        .ok_or_else(corrupt)?;
    let fields: Vec<String> = redis::from_redis_value_ref(fields).map_err(|_| corrupt())?;
    let (data, key) = match fields.as_slice() {
        [name, data] if name == "d" => (data, None),
        [name, data, key_name, key] if name == "d" && key_name == "k" => (data, Some(key)),
        _ => return Err(corrupt()),
    };
    let payload =
        Payload::from_json(data.clone()).map_err(|error| Error::Corrupt(error.to_string()))?;
    let key = key
        .map(|key| Key::new(key).map_err(|error| Error::Corrupt(error.to_string())))
        .transpose()?;
    Ok(EncodedEvent::new(Event {
        channel: channel.clone(),
        position: Position::new(epoch.clone(), Seq::new(seq)),
        key,
        data: payload,
    }))
}

/// User commands travel on one Pub/Sub channel per key prefix; each instance's Pub/Sub
/// connection hands them to its own receivers.
#[async_trait]
impl resync_broker::UserCommandBus for Inner {
    async fn send(&self, command: &resync_protocol::bodies::UserCommand) -> Result<()> {
        // A plain enum of strings: serializing cannot fail.
        let message = serde_json::to_string(command).unwrap_or_default();
        let name = pubsub::user_commands_name(&self.settings.key_prefix);
        let publish = self.settings.topology.publish_command();
        self.command::<u64>(redis::cmd(publish).arg(name).arg(message))
            .await
            .map(|_| ())
    }

    fn receive(&self) -> resync_broker::UserCommands {
        self.user_commands.receiver()
    }
}

#[async_trait]
impl resync_broker::KeyedState for RedisBroker {
    async fn state_page(
        &self,
        channel: &Channel,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<resync_broker::StatePage> {
        // The channel's position first (one cheap script): a crowd catching up at once asks
        // for the same pages at the same position, and Redis then runs each page's script
        // once, not once per client (5,000 clients of 1,000 keys: 20,000 scripts, 8 s).
        let limit = limit.clamp(1, 10_000);
        let now = self.position(channel).await?;
        if let Some(page) = self.inner.state_pages.get(channel, &now, after, limit) {
            return Ok(page);
        }
        let settings = &self.inner.settings;
        let mut invocation = self.inner.scripts.state.prepare_invoke();
        invocation
            .key(self.key(channel, "meta"))
            .key(self.shared_epoch_key(channel))
            .key(self.key(channel, "stream"))
            .key(self.key(channel, "state"))
            .key(self.key(channel, "statekeys"))
            .arg(millis(settings.meta_ttl))
            .arg(self.shared_epoch_ttl())
            .arg(random_epoch())
            .arg(after.map_or("", |after| after.as_str()))
            .arg(limit)
            .arg(now_ms());
        let (epoch, seq, more, last, flat): (String, u64, u64, String, Vec<String>) =
            self.run(invocation).await?;
        let position = Self::position_from(epoch, seq)?;
        let corrupt = || Error::Corrupt(format!("a state entry of {channel} cannot be read"));
        let mut entries = Vec::with_capacity(flat.len() / 3);
        for entry in flat.chunks(3) {
            let [key, seq, data] = entry else {
                return Err(corrupt());
            };
            entries.push(StateEntry {
                key: Key::new(key).map_err(|_| corrupt())?,
                seq: Seq::new(seq.parse().map_err(|_| corrupt())?),
                data: if data.is_empty() {
                    None
                } else {
                    Some(Payload::from_json(data.clone()).map_err(|_| corrupt())?)
                },
            });
        }
        let next = if more == 1 {
            Some(Key::new(&last).map_err(|_| corrupt())?)
        } else {
            None
        };
        let page = resync_broker::StatePage {
            entries,
            position,
            next,
        };
        self.inner.state_pages.keep(channel, after, limit, &page);
        Ok(page)
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn durable(&self) -> bool {
        // Stored in Redis: another process (or the next one) serves it.
        true
    }

    async fn publish(&self, publish: Publish) -> Result<Position> {
        let settings = &self.inner.settings;
        let idempotency_key = match &publish.idempotency_key {
            Some(key) => self.key(&publish.channel, &format!("idem:{key}")),
            None => self.key(&publish.channel, "idem:"),
        };
        let retention = settings
            .namespace_retention
            .get(publish.channel.namespace())
            .unwrap_or(&settings.retention);
        let stream_ttl = retention.max_age().map_or(0, millis);
        let mut invocation = self.inner.scripts.publish.prepare_invoke();
        invocation
            .key(self.key(&publish.channel, "meta"))
            .key(self.key(&publish.channel, "stream"))
            .key(idempotency_key)
            .key(self.shared_epoch_key(&publish.channel))
            .key(self.key(&publish.channel, "state"))
            .key(self.key(&publish.channel, "statekeys"))
            .arg(publish.data.as_str())
            .arg(retention.max_events())
            .arg(stream_ttl)
            .arg(millis(settings.meta_ttl))
            .arg(random_epoch())
            .arg(format!("{}{{{}}}", settings.key_prefix, publish.channel))
            .arg(if publish.idempotency_key.is_some() {
                "1"
            } else {
                "0"
            })
            .arg(millis(settings.idempotency_ttl).max(1))
            .arg(self.shared_epoch_ttl())
            .arg(retention.max_bytes().unwrap_or(0))
            .arg(publish.key.as_ref().map_or("", |key| key.as_str()))
            .arg(settings.keyed_limits.max_keys)
            .arg(keyed_expiry(&settings.keyed_limits, &publish.data))
            .arg(now_ms());
        let (epoch, seq): (String, u64) = self.run(invocation).await?;
        if epoch == "!full" {
            return Err(Error::KeyedStateFull(format!(
                "the channel keeps at most {} keys (it has {seq})",
                settings.keyed_limits.max_keys
            )));
        }
        Self::position_from(epoch, seq)
    }

    async fn subscribe(&self, channel: &Channel) -> Result<LiveSubscription> {
        let live = self.inner.hub.subscribe(channel);
        // Wait until Redis confirms the SUBSCRIBE: only then is every later publish delivered.
        let (reply, confirmed) = tokio::sync::oneshot::channel();
        self.inner
            .commands
            .send(pubsub::Command::Subscribe(channel.clone(), reply))
            .await
            .map_err(|_| Error::Closed)?;
        let timeout = self.inner.settings.command_timeout;
        match tokio::time::timeout(timeout, confirmed).await {
            Ok(Ok(Ok(()))) => Ok(live),
            Ok(Ok(Err(error))) => Err(error),
            Ok(Err(_)) => Err(Error::Closed),
            Err(_) => Err(Error::Unavailable(format!(
                "redis did not confirm SUBSCRIBE within {timeout:?}"
            ))),
        }
    }

    async fn read_since(
        &self,
        channel: &Channel,
        since: &Position,
        limit: usize,
    ) -> Result<HistoryRead> {
        // Catch-up reads of what this process has just received are answered here, once
        // decoded, instead of every lagging subscriber asking Redis for the same events.
        if let Some(read) = self.inner.recent.read_since(channel, since, limit) {
            return Ok(read);
        }
        let settings = &self.inner.settings;
        let mut invocation = self.inner.scripts.read_since.prepare_invoke();
        invocation
            .key(self.key(channel, "meta"))
            .key(self.shared_epoch_key(channel))
            .key(self.key(channel, "stream"))
            .arg(millis(settings.meta_ttl))
            .arg(self.shared_epoch_ttl())
            .arg(random_epoch())
            .arg(since.epoch.as_str())
            .arg(since.seq.get())
            .arg(limit.clamp(1, i64::MAX as usize));
        let (epoch, last, entries): (String, u64, Vec<redis::Value>) = self.run(invocation).await?;
        let latest = Self::position_from(epoch, last)?;
        let mut events = Vec::with_capacity(entries.len().min(limit));
        for entry in &entries {
            events.push(event_from_entry(channel, &latest.epoch, entry)?);
        }
        // The script read from `since + 1` on, so the first entry is the oldest that counts.
        let oldest = events.first().map(|first| first.position().seq);
        match decide_read(since, &latest, oldest) {
            ReadDecision::Replay { .. } => {
                events.truncate(limit);
                Ok(ReadOutcome::Replayed { events, latest })
            }
            ReadDecision::UpToDate => Ok(ReadOutcome::UpToDate { latest }),
            ReadDecision::Reset(reason) => Ok(ReadOutcome::Reset { reason, latest }),
        }
    }

    async fn position(&self, channel: &Channel) -> Result<Position> {
        let mut invocation = self.inner.scripts.position.prepare_invoke();
        invocation
            .key(self.key(channel, "meta"))
            .key(self.shared_epoch_key(channel))
            .key(self.key(channel, "stream"))
            .arg(millis(self.inner.settings.meta_ttl))
            .arg(self.shared_epoch_ttl())
            .arg(random_epoch());
        let (epoch, seq): (String, u64) = self.run(invocation).await?;
        Self::position_from(epoch, seq)
    }

    fn subscriber_count(&self, channel: &Channel) -> usize {
        self.inner.hub.subscriber_count(channel)
    }

    fn delivery_lag(&self) -> resync_broker::DeliveryLag {
        self.inner.hub.delivery_lag()
    }

    async fn lag_eased(&self) {
        self.inner.hub.lag_eased().await;
    }

    fn presence(&self) -> Option<&dyn resync_broker::Presence> {
        Some(&*self.inner)
    }

    fn keyed_state(&self) -> Option<&dyn resync_broker::KeyedState> {
        Some(self)
    }

    fn user_commands(&self) -> Option<&dyn resync_broker::UserCommandBus> {
        Some(&*self.inner)
    }

    async fn close(&self) {
        self.inner.hub.close_all();
        // Best effort: a full queue means the task is busy, and it ends with the process.
        let _ = self.inner.commands.try_send(pubsub::Command::Close);
    }

    async fn health(&self) -> Result<()> {
        let timeout = self.inner.settings.command_timeout;
        let ping = async {
            match &self.inner.opener {
                Opener::Single(pool) => {
                    let mut connection = pool.get().await.map_err(unavailable)?;
                    redis::cmd("PING")
                        .query_async::<String>(&mut connection)
                        .await
                        .map_err(unavailable)
                }
                // Sent to every primary; it fails if one of them does not answer.
                Opener::Cluster(_) => {
                    self.inner
                        .command_upkeep::<String>(&mut redis::cmd("PING"))
                        .await
                }
            }
        };
        tokio::time::timeout(timeout, ping)
            .await
            .map_err(|_| Error::Unavailable("redis did not answer PING".to_owned()))??;
        if !*self.inner.connected.borrow() {
            return Err(Error::Unavailable(
                "redis pub/sub is not connected".to_owned(),
            ));
        }
        Ok(())
    }
}
