//! The disk broker: the store on disk is the truth; memory holds each active channel's
//! recent events and its subscribers.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use fjall::{OwnedWriteBatch, PersistMode};
use resync_broker::{
    Broker, DEFAULT_SUBSCRIBER_QUEUE, EncodedEvent, Error, HistoryRead, Hub, LiveSubscription,
    MemoryPresence, Publish, PublishOrigin, ReadDecision, ReadOutcome, Result, Retention,
    UserCommandFanout, decide_read,
};
use resync_log::ChannelLog;
use resync_protocol::{
    Channel, Epoch, Event, IdempotencyKey, Key, Payload, Position, ResetReason, Seq, StateEntry,
};
use tokio::sync::{Notify, oneshot};

use crate::durability::{Durability, GroupCommit, Waiting};
use crate::layout::{
    ChannelMeta, RunRecord, channel_prefix, event_key, event_value, idempotency_key,
    idempotency_slot, idempotency_value, keyed_event_value, seq_of_event_key,
    split_any_event_value, split_idempotency_value, split_state_value, state_key, state_value,
};
use crate::open::{OpenError, Store, close_clean, current_boot, new_epoch, open};
use crate::pages::{PAGE, Page, PageCache};

/// A [`Broker`] for one process whose history outlives it: events, positions, epochs and
/// idempotency keys are stored in a data directory, so a restart or a deploy resumes every
/// client exactly, with no reset.
///
/// Every publish is written to the operating system before it is acknowledged (a killed
/// process loses nothing); [`Durability`] says when it is synced to the disk. After a power
/// cut that may have lost acknowledged publishes, the channels written before it start over
/// in new epochs, so their clients get resets instead of seqs reused for other events.
/// Presence and user commands describe live connections and stay in memory.
///
/// ```no_run
/// # async fn run() -> Result<(), resync_broker_disk::OpenError> {
/// use resync_broker_disk::{DiskBroker, Durability};
/// let broker = DiskBroker::builder("/var/lib/resync")
///     .durability(Durability::Always)
///     .open()?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct DiskBroker {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Store,
    table: Mutex<Table>,
    hub: Hub,
    retention: Retention,
    namespace_retention: HashMap<String, Retention>,
    recent: Retention,
    /// The bounds of each keyed channel's state.
    keyed_limits: resync_broker::KeyedLimits,
    idempotency_window: u64,
    max_history_bytes: Option<u64>,
    /// The bytes of every channel's stored events.
    history_bytes: AtomicU64,
    max_cached_channels: usize,
    /// Channels stored, and those of them a client's publish made.
    channel_count: AtomicUsize,
    client_channels: AtomicUsize,
    max_channels: usize,
    /// Bytes of recent events held in memory over all channels, and the most they may be.
    recent_bytes: AtomicUsize,
    max_recent_bytes: usize,
    /// Events read from the disk, shared by every reader (`pages.rs`).
    pages: Mutex<PageCache>,
    /// Pages of keyed channels' state read from the disk, served again to the readers that
    /// ask for the same page at the same position (a crowd catching up after a deploy).
    state_pages: resync_broker::StatePageCache,
    /// Read by every write (publish, sweep) while it writes; taken by `close` to wait for
    /// them, so that nothing is written after the run is marked clean.
    gate: std::sync::RwLock<()>,
    /// Where the next sweep of idle channels starts (a channel name; empty: the first).
    sweep_cursor: Mutex<Vec<u8>>,
    run: u64,
    lost_through: Option<u64>,
    /// The epoch of channels never published (or forgotten): it changes when a channel that
    /// used it is forgotten, so that a new history never reuses the old one's seqs.
    shared_epoch: Mutex<Epoch>,
    durability: Durability,
    boot: String,
    place: String,
    group_commit: Arc<GroupCommit>,
    stop: Arc<Notify>,
    closed: AtomicBool,
    /// Set when a write or a sync failed: the store may be unusable (a full disk), and
    /// readiness says so.
    failure: Mutex<Option<String>>,
    presence: MemoryPresence,
    user_commands: UserCommandFanout,
}

/// The channels held in memory: every channel with subscribers or a publish in flight, and
/// recently used ones up to a bound.
#[derive(Debug, Default)]
struct Table {
    channels: HashMap<Channel, Arc<Mutex<ChannelState>>>,
    /// Oldest first: where the search for one to drop from memory starts.
    order: VecDeque<Channel>,
}

/// Channels examined for dropping from memory, per channel loaded into a full table.
const EVICTION_CANDIDATES: usize = 16;

#[derive(Debug)]
struct ChannelState {
    channel: Channel,
    /// What is stored: its newest seq is the last one given out.
    meta: ChannelMeta,
    /// The most recent events that may be shown (with `Durability::Always`, only once
    /// synced), served from memory; its position is the channel's as readers see it.
    recent: ChannelLog<EncodedEvent>,
    retention: Retention,
    /// The oldest stored event's seq and time, once read: most publishes then need no read
    /// to know that nothing has expired.
    oldest_time: Option<(Seq, u64)>,
    /// Whether the channel's metadata is on the disk (false until its first publish).
    stored: bool,
    /// The channel's keyed state as counted for its bounds, once counted (at its first keyed
    /// publish since the store opened, or after a sweep removed entries).
    keyed: Option<KeyedCounts>,
}

/// The live entries (of the channel's epoch, not expired) of a keyed channel's state, as
/// counted for its [`KeyedLimits`](resync_broker::KeyedLimits). An entry that expires stays
/// counted until the sweep removes it or a publish the count would refuse counts again:
/// over-counting only ever refuses early, and the recount mends it.
#[derive(Clone, Copy, Debug)]
struct KeyedCounts {
    keys: usize,
    bytes: usize,
    /// When the soonest counted entry expires (`u64::MAX`: none does); a publish over the
    /// bounds counts again only past it, and at most once a second (keys that keep expiring
    /// would otherwise cost a scan per refused publish).
    next_expiry_ms: u64,
    /// When these counts were taken.
    counted_at_ms: u64,
}

impl KeyedCounts {
    /// The counts once `key`'s entry of `size` bytes replaces its live entry of `old` bytes
    /// (`None`: a new key), expiring at `expires_ms` (0: never).
    fn with(self, old: Option<usize>, size: usize, expires_ms: u64) -> Self {
        let (keys, bytes) = match old {
            Some(old) => (self.keys, self.bytes - old.min(self.bytes) + size),
            None => (self.keys + 1, self.bytes + size),
        };
        Self {
            keys,
            bytes,
            next_expiry_ms: if expires_ms == 0 {
                self.next_expiry_ms
            } else {
                self.next_expiry_ms.min(expires_ms)
            },
            counted_at_ms: self.counted_at_ms,
        }
    }

    fn within(&self, limits: &resync_broker::KeyedLimits) -> bool {
        self.keys <= limits.max_keys && self.bytes <= limits.max_bytes
    }
}

/// The least time between two counts of a keyed channel's state for a publish over its
/// bounds.
const RECOUNT_EVERY_MS: u64 = 1_000;

/// Whether a stored state entry is live: of `epoch`, and not expired at `now_ms`.
fn live_state_value(value: &[u8], epoch: &Epoch, now_ms: u64) -> bool {
    split_state_value(value).is_some_and(|(of, _, expires, _)| {
        of == epoch.as_str() && (expires == 0 || expires > now_ms)
    })
}

/// The most state entries one page reads (served or skipped as stale or expired), so a
/// page's cost is bounded however many dead entries a channel holds.
const STATE_SCAN_MOST: usize = 4_096;

/// The bytes of keyed channels' state pages kept for the readers that ask for them next.
const STATE_PAGES_BYTES: usize = 16 * 1024 * 1024;

/// How long a kept state page is served: a key's TTL may end meanwhile, with no publish.
const STATE_PAGE_FRESH: Duration = Duration::from_secs(1);

/// What a keyed publish makes of its channel's state.
struct KeyedUpdate {
    /// The channel's state as counted after it.
    counts: KeyedCounts,
    /// When its entry expires (0: never).
    expires_ms: u64,
}

/// Builds a [`DiskBroker`].
#[derive(Clone, Debug)]
pub struct DiskBrokerBuilder {
    dir: PathBuf,
    durability: Durability,
    retention: Retention,
    namespace_retention: HashMap<String, Retention>,
    recent_events: usize,
    recent_bytes: usize,
    subscriber_queue: usize,
    idempotency_window: u64,
    max_history_bytes: Option<u64>,
    max_cached_channels: usize,
    max_channels: usize,
    max_recent_bytes: usize,
    max_page_bytes: usize,
    boot: Option<String>,
    keyed_limits: resync_broker::KeyedLimits,
}

impl DiskBrokerBuilder {
    /// The bounds of each keyed channel's state. Defaults to
    /// [`KeyedLimits::default`](resync_broker::KeyedLimits).
    pub fn keyed_limits(mut self, limits: resync_broker::KeyedLimits) -> Self {
        self.keyed_limits = limits;
        self
    }

    /// When publishes are synced to the disk. Defaults to [`Durability::EverySecond`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

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

    /// The most recent events of each channel in memory kept to serve resumes without the
    /// disk: at most `events` and about `bytes` (defaults: 256 events, 64 KiB).
    pub fn recent_in_memory(mut self, events: usize, bytes: usize) -> Self {
        self.recent_events = events;
        self.recent_bytes = bytes;
        self
    }

    /// Events one subscriber may have queued before it is cut off as lagging. Defaults to
    /// 1,024.
    pub fn subscriber_queue(mut self, capacity: usize) -> Self {
        self.subscriber_queue = capacity;
        self
    }

    /// How many recent idempotency keys each channel remembers. Defaults to 1,000.
    pub fn idempotency_window(mut self, keys: u64) -> Self {
        self.idempotency_window = keys;
        self
    }

    /// The most bytes of stored events over all channels, or `None` for no limit. Past it,
    /// the channel being published to sheds its oldest events; readers further back get a
    /// `truncated` reset. Defaults to 1 GiB.
    pub fn max_history_bytes(mut self, bytes: Option<u64>) -> Self {
        self.max_history_bytes = bytes;
        self
    }

    /// How many channels are held in memory at most, besides those with subscribers or a
    /// publish in flight; the others are read from the disk when next used. Defaults to
    /// 4,096.
    pub fn max_cached_channels(mut self, channels: usize) -> Self {
        self.max_cached_channels = channels;
        self
    }

    /// The most channels stored at once. A publish to a new channel past it is refused with
    /// [`Error::TooManyChannels`] (in O(1)); clients' publishes may make at most half of
    /// them, so the application's never run out. Channels whose history has expired and that
    /// have no subscriber are forgotten in the background. Defaults to 1,000,000.
    pub fn max_channels(mut self, channels: usize) -> Self {
        self.max_channels = channels;
        self
    }

    /// The most bytes of recent events held in memory over all channels (each event's
    /// frame and [`EVENT_OVERHEAD_BYTES`](resync_broker::EVENT_OVERHEAD_BYTES)); past it,
    /// the channel published to keeps fewer in memory and serves more from the disk.
    /// Defaults to 32 MiB.
    pub fn max_recent_bytes(mut self, bytes: usize) -> Self {
        self.max_recent_bytes = bytes;
        self
    }

    /// The most bytes of events read from the disk kept for other readers (after a restart
    /// every client of a channel comes back at once, a little behind). Defaults to 16 MiB.
    pub fn max_page_bytes(mut self, bytes: usize) -> Self {
        self.max_page_bytes = bytes;
        self
    }

    /// What identifies the machine's current boot, instead of Linux's `boot_id`. A store
    /// that was not closed, reopened in another boot under a durability that acknowledges
    /// before syncing, assumes a power cut took its tail. Tests that simulate a power cut
    /// (by truncating the store's files after a kill) set it.
    pub fn boot_id(mut self, boot: impl Into<String>) -> Self {
        self.boot = Some(boot.into());
        self
    }

    /// Opens (or makes) the store and starts its background syncs; call it inside a tokio
    /// runtime.
    pub fn open(self) -> Result<DiskBroker, OpenError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| OpenError::NoRuntime)?;
        let boot = self.boot.unwrap_or_else(current_boot);
        let opened = open(&self.dir, &boot, self.durability.acknowledges_unsynced())?;
        let stored = stored_totals(&opened.store).map_err(|message| OpenError::Store {
            path: self.dir.clone(),
            message,
        })?;
        let inner = Arc::new(Inner {
            store: opened.store,
            table: Mutex::new(Table::default()),
            hub: Hub::new(self.subscriber_queue).waking_from_own_thread(),
            recent: self
                .retention
                .with_max_events(self.recent_events.max(1))
                .with_max_bytes(Some(self.recent_bytes)),
            retention: self.retention,
            namespace_retention: self.namespace_retention,
            idempotency_window: self.idempotency_window,
            keyed_limits: self.keyed_limits,
            max_history_bytes: self.max_history_bytes,
            history_bytes: AtomicU64::new(stored.bytes),
            max_cached_channels: self.max_cached_channels,
            channel_count: AtomicUsize::new(stored.channels),
            client_channels: AtomicUsize::new(stored.client_channels),
            max_channels: self.max_channels.max(1),
            recent_bytes: AtomicUsize::new(0),
            max_recent_bytes: self.max_recent_bytes,
            pages: Mutex::new(PageCache::new(self.max_page_bytes)),
            state_pages: resync_broker::StatePageCache::new(STATE_PAGES_BYTES, STATE_PAGE_FRESH),
            gate: std::sync::RwLock::new(()),
            sweep_cursor: Mutex::new(Vec::new()),
            run: opened.run,
            lost_through: opened.lost_through,
            shared_epoch: Mutex::new(opened.shared_epoch),
            durability: self.durability,
            boot,
            place: opened.place,
            group_commit: Arc::default(),
            stop: Arc::new(Notify::new()),
            closed: AtomicBool::new(false),
            failure: Mutex::new(None),
            presence: MemoryPresence::default(),
            user_commands: UserCommandFanout::default(),
        });
        if self.durability == Durability::Always {
            let weak = Arc::downgrade(&inner);
            let sync = move || match weak.upgrade() {
                Some(inner) => inner.sync(),
                None => Err(Error::Closed),
            };
            runtime.spawn(inner.group_commit.clone().run(sync));
        }
        if let Some(interval) = self.durability.interval() {
            runtime.spawn(sync_every(
                Arc::downgrade(&inner),
                interval,
                inner.stop.clone(),
            ));
        }
        runtime.spawn(sweep_every(
            Arc::downgrade(&inner),
            SWEEP_INTERVAL,
            inner.stop.clone(),
        ));
        Ok(DiskBroker { inner })
    }
}

/// What the store holds, added up.
#[derive(Default)]
struct Totals {
    bytes: u64,
    channels: usize,
    client_channels: usize,
}

/// The store's totals from the channels' metadata: one read per channel, none per event, so
/// opening does not grow with the history stored.
fn stored_totals(store: &Store) -> std::result::Result<Totals, String> {
    let mut totals = Totals::default();
    for entry in store.channels.iter() {
        let value = entry.value().map_err(|error| error.to_string())?;
        let meta = ChannelMeta::decode(&value).ok_or("a channel's metadata cannot be read")?;
        totals.bytes = totals.bytes.saturating_add(meta.bytes);
        totals.channels += 1;
        totals.client_channels += usize::from(meta.made_by_client);
    }
    Ok(totals)
}

/// How often idle channels are swept (their expired events removed, the empty ones
/// forgotten), and how many channels one sweep looks at.
const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
const SWEEP_CHANNELS: usize = 1_000;

async fn sweep_every(inner: std::sync::Weak<Inner>, interval: Duration, stop: Arc<Notify>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.notified() => return,
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let swept =
            tokio::task::spawn_blocking(move || strong.sweep(SWEEP_CHANNELS, now_ms())).await;
        if let Ok(Err(error)) = swept {
            tracing::warn!(%error, "sweeping idle channels failed; the next sweep tries again");
        }
    }
}

async fn sync_every(inner: std::sync::Weak<Inner>, interval: Duration, stop: Arc<Notify>) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.notified() => return,
        }
        let Some(strong) = inner.upgrade() else {
            return;
        };
        // The sync runs off the async workers: an fdatasync can take milliseconds.
        let synced = tokio::task::spawn_blocking(move || strong.sync()).await;
        if let Ok(Err(error)) = synced {
            tracing::error!(%error, "the store could not sync to the disk");
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl DiskBroker {
    /// A builder for a store in `dir` (made if missing), with the defaults.
    pub fn builder(dir: impl Into<PathBuf>) -> DiskBrokerBuilder {
        DiskBrokerBuilder {
            dir: dir.into(),
            durability: Durability::default(),
            retention: Retention::default(),
            namespace_retention: HashMap::new(),
            recent_events: 256,
            recent_bytes: 64 * 1024,
            subscriber_queue: DEFAULT_SUBSCRIBER_QUEUE,
            idempotency_window: 1_000,
            max_history_bytes: Some(1024 * 1024 * 1024),
            max_cached_channels: 4_096,
            max_channels: 1_000_000,
            max_recent_bytes: 32 * 1024 * 1024,
            max_page_bytes: 16 * 1024 * 1024,
            boot: None,
            keyed_limits: resync_broker::KeyedLimits::default(),
        }
    }

    /// The bytes of stored events over all channels (keys and values, before compression).
    pub fn history_bytes(&self) -> u64 {
        self.inner.history_bytes.load(Ordering::Relaxed)
    }

    /// The bytes the store's files take on the disk.
    pub fn disk_bytes(&self) -> u64 {
        self.inner.store.db.disk_space().unwrap_or(0)
    }

    /// How many channels are stored.
    pub fn channel_count(&self) -> usize {
        self.inner.channel_count.load(Ordering::Relaxed)
    }

    /// Sweeps up to `channels` idle channels now, as the background sweep does every ten
    /// seconds: their expired events are removed, and those left with no history and no
    /// subscriber are forgotten. For tests and tools.
    pub fn sweep_now(&self, channels: usize) -> Result<()> {
        self.inner.sweep(channels, now_ms())
    }

    /// How many times a subscriber's queue overflowed in a burst (each then caught up from
    /// history), since the broker was opened.
    pub fn subscriber_overflows(&self) -> u64 {
        self.inner.hub.overflows()
    }
}

impl Inner {
    fn sync(&self) -> Result<()> {
        self.store
            .db
            .persist(PersistMode::SyncData)
            .map_err(|error| self.failed(format!("the store could not sync to the disk: {error}")))
    }

    /// Records a failed write or sync, for readiness, and makes the error a publish returns.
    fn failed(&self, message: String) -> Error {
        tracing::error!(%message, "the store failed");
        *lock(&self.failure) = Some(message.clone());
        Error::Unavailable(message)
    }

    fn unreadable(&self, error: impl std::fmt::Display) -> Error {
        Error::Unavailable(format!("the store could not be read: {error}"))
    }

    /// Whether a new channel may be stored: within the limit, and a client's within the
    /// clients' half.
    fn admit_channel(&self, by_client: bool) -> Result<()> {
        if self.channel_count.load(Ordering::Relaxed) >= self.max_channels {
            return Err(Error::TooManyChannels {
                limit: self.max_channels,
            });
        }
        let client_share = self.max_channels / 2;
        if by_client && self.client_channels.load(Ordering::Relaxed) >= client_share {
            return Err(Error::TooManyChannels {
                limit: client_share,
            });
        }
        Ok(())
    }

    /// Waits until the channel shows `position` (a keyed retry of a publish still waiting for
    /// its sync), then answers with it.
    async fn shown(
        &self,
        state: &Arc<Mutex<ChannelState>>,
        position: Position,
    ) -> Result<Position> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if lock(state).recent.position().seq >= position.seq {
                return Ok(position);
            }
            if Instant::now() > deadline || self.closed.load(Ordering::Acquire) {
                return Err(Error::Unavailable(
                    "the first publish with this idempotency key is not yet on the disk; retry"
                        .to_owned(),
                ));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    fn shared_epoch(&self) -> Epoch {
        lock(&self.shared_epoch).clone()
    }

    /// Shows a stored event: to the channel's recent events in memory (within the memory
    /// budget) and to its subscribers. Called under the channel's lock, in seq order.
    fn show(&self, state: &mut ChannelState, event: &EncodedEvent, size: usize) -> Position {
        let before = state.recent.bytes();
        let position = state
            .recent
            .append_sized(event.clone(), size, Instant::now());
        let after = state.recent.bytes();
        let total = if after >= before {
            self.recent_bytes
                .fetch_add(after - before, Ordering::Relaxed)
                + (after - before)
        } else {
            self.recent_bytes
                .fetch_sub(before - after, Ordering::Relaxed)
                - (before - after)
        };
        if total > self.max_recent_bytes {
            // The disk has them all: what memory sheds is only read from the disk instead.
            let freed = state.recent.shed_oldest(total - self.max_recent_bytes);
            self.recent_bytes.fetch_sub(freed, Ordering::Relaxed);
        }
        self.hub.deliver(event);
        position
    }

    /// Sweeps up to `count` channels, resuming where the last sweep stopped: removes their
    /// expired events, and forgets those left with nothing stored and no subscriber (their
    /// metadata and keys go; a client's old position then resets).
    fn sweep(&self, count: usize, now_ms: u64) -> Result<()> {
        let cursor = lock(&self.sweep_cursor).clone();
        let mut names = Vec::new();
        for entry in self.store.channels.range(cursor..) {
            let key = entry.key().map_err(|error| self.unreadable(error))?;
            names.push(key.to_vec());
            if names.len() == count {
                break;
            }
        }
        *lock(&self.sweep_cursor) = match names.last() {
            Some(last) if names.len() == count => {
                let mut next = last.clone();
                next.push(0);
                next
            }
            _ => Vec::new(),
        };
        for name in names {
            let Some(channel) = std::str::from_utf8(&name)
                .ok()
                .and_then(|name| Channel::new(name).ok())
            else {
                continue;
            };
            self.sweep_channel(&channel, now_ms)?;
        }
        Ok(())
    }

    fn sweep_channel(&self, channel: &Channel, now_ms: u64) -> Result<()> {
        // The table's lock keeps publishes from loading the channel meanwhile.
        let mut table = lock(&self.table);
        let state = match table.channels.get(channel) {
            Some(state) => state.clone(),
            None => {
                let Some(value) = self
                    .store
                    .channels
                    .get(channel.as_str())
                    .map_err(|error| self.unreadable(error))?
                else {
                    return Ok(());
                };
                let meta = ChannelMeta::decode(&value).ok_or_else(|| {
                    Error::Corrupt(format!("the metadata of {channel} cannot be read"))
                })?;
                Arc::new(Mutex::new(ChannelState {
                    channel: channel.clone(),
                    recent: ChannelLog::continuing(meta.epoch.clone(), meta.last_seq, self.recent),
                    retention: self.retention_of(channel),
                    meta,
                    oldest_time: None,
                    stored: true,
                    keyed: None,
                }))
            }
        };
        // In memory and used (a publish in flight holds it too): kept, only trimmed.
        let in_use = table.channels.contains_key(channel) && Arc::strong_count(&state) > 2;
        let mut guard = lock(&state);
        let st = &mut *guard;
        let _open = self
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.check_open()?;
        let mut meta = st.meta.clone();
        let mut batch = self.store.db.batch();
        let after_newest = meta.last_seq.next().unwrap_or(meta.last_seq);
        let freed = self.trim(&mut batch, st, &mut meta, after_newest, now_ms, 0)?;
        // Keyed state of another epoch, expired keys and tombstones go (a bounded few a sweep).
        let swept = self.sweep_state(&mut batch, channel, &meta.epoch, now_ms)?;
        if swept > 0 {
            // Counted again at the channel's next keyed publish.
            st.keyed = None;
        }
        // A keyed channel's state outlives its history: it is what late readers get.
        let forget = !in_use
            && meta.oldest_stored().is_none()
            && self.hub.subscriber_count(channel) == 0
            && !self.has_state(channel)?;
        let mut rotated = None;
        if forget {
            batch.remove(&self.store.channels, channel.as_str());
            self.remove_keys(&mut batch, channel)?;
            if meta.epoch == self.shared_epoch() {
                // Its seqs were of the shared epoch: a later history must not reuse them.
                let epoch = new_epoch();
                batch.insert(
                    &self.store.records,
                    crate::open::SHARED_EPOCH,
                    epoch.as_str().as_bytes(),
                );
                rotated = Some(epoch);
            }
        } else if freed > 0 {
            batch.insert(&self.store.channels, channel.as_str(), meta.encode());
        } else if swept == 0 {
            return Ok(());
        }
        batch
            .commit()
            .map_err(|error| self.failed(format!("the store could not be written: {error}")))?;
        self.history_bytes.fetch_sub(
            freed.min(self.history_bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        st.meta = meta;
        if forget {
            if table.channels.remove(channel).is_some() {
                self.recent_bytes
                    .fetch_sub(st.recent.bytes(), Ordering::Relaxed);
            }
            self.channel_count.fetch_sub(1, Ordering::Relaxed);
            if st.meta.made_by_client {
                self.client_channels.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if let Some(epoch) = rotated {
            *lock(&self.shared_epoch) = epoch;
        }
        Ok(())
    }

    /// Adds the removal of `channel`'s dead state entries (of another epoch than `epoch`,
    /// or expired) to `batch`, at most [`STATE_SCAN_MOST`] looked at; returns how many.
    fn sweep_state(
        &self,
        batch: &mut OwnedWriteBatch,
        channel: &Channel,
        epoch: &Epoch,
        now_ms: u64,
    ) -> Result<usize> {
        let mut removed = 0;
        for entry in self
            .store
            .state
            .prefix(channel_prefix(channel.as_str()))
            .take(STATE_SCAN_MOST)
        {
            let (stored, value) = entry.into_inner().map_err(|error| self.unreadable(error))?;
            let dead = split_state_value(&value).is_none_or(|(of, _, expires, _)| {
                of != epoch.as_str() || (expires != 0 && expires <= now_ms)
            });
            if dead {
                batch.remove(&self.store.state, stored);
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Whether `channel` keeps keyed state.
    fn has_state(&self, channel: &Channel) -> Result<bool> {
        match self
            .store
            .state
            .prefix(channel_prefix(channel.as_str()))
            .next()
        {
            None => Ok(false),
            Some(entry) => entry
                .into_inner()
                .map(|_| true)
                .map_err(|error| self.unreadable(error)),
        }
    }

    /// What a keyed publish of `data` for `key` makes of the channel's state: the counts after
    /// it and when the entry expires; refused past the bounds ([`Error::KeyedStateFull`]).
    fn keyed_update(
        &self,
        st: &mut ChannelState,
        key: &Key,
        data: &Payload,
        now_ms: u64,
    ) -> Result<KeyedUpdate> {
        let name = st.channel.as_str();
        let epoch = st.meta.epoch.clone();
        let counted = match st.keyed {
            Some(counts) => counts,
            None => self.count_state(name, &epoch, now_ms)?,
        };
        let stored = state_key(name, key.as_str());
        let deletes = data.as_str() == "null";
        let size = stored.len()
            + 18
            + epoch.as_str().len()
            + if deletes { 0 } else { data.as_str().len() };
        let old = self
            .store
            .state
            .get(&stored)
            .map_err(|error| self.unreadable(error))?
            .filter(|value| live_state_value(value, &epoch, now_ms))
            .map(|value| stored.len() + value.len());
        let limits = &self.keyed_limits;
        let expires_ms = limits.ttl_of(data).map_or(0, |ttl| {
            now_ms.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
        });
        let mut counts = counted.with(old, size, expires_ms);
        if !counts.within(limits)
            && st.keyed.is_some()
            && now_ms >= counted.next_expiry_ms
            && now_ms >= counted.counted_at_ms.saturating_add(RECOUNT_EVERY_MS)
        {
            // Entries counted while live have expired since: count what is live now.
            let recounted = self.count_state(name, &epoch, now_ms)?;
            st.keyed = Some(recounted);
            counts = recounted.with(old, size, expires_ms);
        }
        if !counts.within(limits) {
            return Err(Error::KeyedStateFull(format!(
                "the channel keeps at most {} keys and {} bytes of state",
                limits.max_keys, limits.max_bytes
            )));
        }
        Ok(KeyedUpdate { counts, expires_ms })
    }

    /// Counts `name`'s live state entries (a scan of all of them: once per channel and
    /// opening, after a sweep, or when a publish over the bounds may find room).
    fn count_state(&self, name: &str, epoch: &Epoch, now_ms: u64) -> Result<KeyedCounts> {
        let mut counts = KeyedCounts {
            keys: 0,
            bytes: 0,
            next_expiry_ms: u64::MAX,
            counted_at_ms: now_ms,
        };
        for entry in self.store.state.prefix(channel_prefix(name)) {
            let (stored, value) = entry.into_inner().map_err(|error| self.unreadable(error))?;
            if !live_state_value(&value, epoch, now_ms) {
                continue;
            }
            counts.keys += 1;
            counts.bytes += stored.len() + value.len();
            if let Some((_, _, expires, _)) = split_state_value(&value)
                && expires != 0
            {
                counts.next_expiry_ms = counts.next_expiry_ms.min(expires);
            }
        }
        Ok(counts)
    }

    /// Adds the removal of a channel's idempotency keys to `batch`.
    fn remove_keys(&self, batch: &mut OwnedWriteBatch, channel: &Channel) -> Result<()> {
        let prefix = channel_prefix(channel.as_str());
        for marker in [b'k', b's'] {
            let mut keys_prefix = vec![marker];
            keys_prefix.extend_from_slice(&prefix);
            for entry in self.store.keys.prefix(&keys_prefix) {
                batch.remove(
                    &self.store.keys,
                    entry.key().map_err(|error| self.unreadable(error))?,
                );
            }
        }
        Ok(())
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn retention_of(&self, channel: &Channel) -> Retention {
        self.namespace_retention
            .get(channel.namespace())
            .copied()
            .unwrap_or(self.retention)
    }

    /// The channel's state, from memory or the disk; `None` for a channel never published,
    /// unless `for_publish` (only a publish makes a channel).
    fn state(
        &self,
        channel: &Channel,
        for_publish: bool,
    ) -> Result<Option<Arc<Mutex<ChannelState>>>> {
        let mut table = lock(&self.table);
        if let Some(state) = table.channels.get(channel) {
            return Ok(Some(state.clone()));
        }
        let stored = self
            .store
            .channels
            .get(channel.as_str())
            .map_err(|error| self.unreadable(error))?;
        let (meta, stored) = match stored {
            Some(value) => {
                let meta = ChannelMeta::decode(&value).ok_or_else(|| {
                    Error::Corrupt(format!("the metadata of {channel} cannot be read"))
                })?;
                if self.lost_through.is_some_and(|run| meta.run <= run) {
                    (self.start_over(channel, meta)?, true)
                } else {
                    (meta, true)
                }
            }
            None if !for_publish => return Ok(None),
            None => (ChannelMeta::empty(self.shared_epoch(), self.run), false),
        };
        if table.channels.len() >= self.max_cached_channels {
            self.drop_one(&mut table);
        }
        let state = Arc::new(Mutex::new(ChannelState {
            channel: channel.clone(),
            recent: ChannelLog::continuing(meta.epoch.clone(), meta.last_seq, self.recent),
            retention: self.retention_of(channel),
            meta,
            oldest_time: None,
            stored,
            keyed: None,
        }));
        table.channels.insert(channel.clone(), state.clone());
        table.order.push_back(channel.clone());
        if table.order.len() > 2 * table.channels.len() + EVICTION_CANDIDATES {
            // Names of channels forgotten meanwhile: dropped now and then, in O(1) amortized.
            let Table { channels, order } = &mut *table;
            order.retain(|name| channels.contains_key(name));
        }
        Ok(Some(state))
    }

    /// Drops from memory one channel nobody uses (no subscriber, no publish in flight),
    /// looking at a few of the oldest only. Its state stays on the disk.
    fn drop_one(&self, table: &mut Table) {
        for _ in 0..EVICTION_CANDIDATES.min(table.order.len()) {
            let Some(candidate) = table.order.pop_front() else {
                return;
            };
            let unused = table.channels.get(&candidate).is_some_and(|state| {
                Arc::strong_count(state) == 1 && self.hub.subscriber_count(&candidate) == 0
            });
            if unused {
                if let Some(state) = table.channels.remove(&candidate) {
                    let held = lock(&state).recent.bytes();
                    self.recent_bytes.fetch_sub(held, Ordering::Relaxed);
                }
                return;
            }
            if table.channels.contains_key(&candidate) {
                table.order.push_back(candidate);
            }
        }
    }

    /// A channel whose history a power cut may have shortened starts over in a new epoch:
    /// its old events and keys are dropped, and a client's old position is a reset.
    fn start_over(&self, channel: &Channel, meta: ChannelMeta) -> Result<ChannelMeta> {
        let _open = self
            .gate
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.check_open()?;
        let name = channel.as_str();
        let mut batch = self.store.db.batch();
        let prefix = channel_prefix(name);
        for entry in self.store.events.prefix(&prefix) {
            batch.remove(
                &self.store.events,
                entry.key().map_err(|error| self.unreadable(error))?,
            );
        }
        self.remove_keys(&mut batch, channel)?;
        let fresh = ChannelMeta {
            made_by_client: meta.made_by_client,
            ..ChannelMeta::empty(new_epoch(), self.run)
        };
        batch.insert(&self.store.channels, name, fresh.encode());
        batch
            .commit()
            .map_err(|error| self.failed(format!("the store could not be written: {error}")))?;
        self.history_bytes.fetch_sub(
            meta.bytes.min(self.history_bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        tracing::warn!(%channel, epoch = %fresh.epoch, "the channel's history may have lost its tail to a power cut: it starts over in a new epoch");
        Ok(fresh)
    }

    /// The position a keyed publish got, if the channel's window still has the key.
    fn keyed_position(
        &self,
        meta: &ChannelMeta,
        channel: &Channel,
        key: &IdempotencyKey,
    ) -> Result<Option<Position>> {
        let stored = self
            .store
            .keys
            .get(idempotency_key(channel.as_str(), key.as_str()))
            .map_err(|error| self.unreadable(error))?;
        Ok(stored
            .as_deref()
            .and_then(split_idempotency_value)
            .filter(|(epoch, _)| epoch == &meta.epoch)
            .map(|(epoch, seq)| Position::new(epoch, seq)))
    }

    /// Adds the removal of the channel's oldest events to `batch` while a limit is passed
    /// (count, bytes, age, the store's budget), never the event being published (`newest`).
    /// Returns the bytes freed.
    fn trim(
        &self,
        batch: &mut OwnedWriteBatch,
        state: &mut ChannelState,
        meta: &mut ChannelMeta,
        newest: Seq,
        now_ms: u64,
        over_budget: u64,
    ) -> Result<u64> {
        let name = state.channel.as_str();
        let retention = state.retention;
        let max_age_ms = retention
            .max_age()
            .map(|age| u64::try_from(age.as_millis()).unwrap_or(u64::MAX));
        let mut freed = 0u64;
        while let Some(oldest) = meta.oldest_stored().filter(|oldest| *oldest < newest) {
            let count = meta.last_seq.get() - oldest.get() + 1;
            let must = count > retention.max_events() as u64
                || retention
                    .max_bytes()
                    .is_some_and(|max| meta.bytes > max as u64)
                || freed < over_budget;
            let known_fresh = match (max_age_ms, state.oldest_time) {
                (None, _) => true,
                (Some(max_age), Some((seq, time))) if seq == oldest => {
                    now_ms.saturating_sub(time) <= max_age
                }
                _ => false,
            };
            if !must && known_fresh {
                break;
            }
            let key = event_key(name, oldest);
            let value = self
                .store
                .events
                .get(&key)
                .map_err(|error| self.unreadable(error))?;
            let Some(value) = value else {
                // Already gone (a removal whose metadata a crash cut is impossible, since
                // both are one batch; kept for safety): step past it.
                meta.oldest_seq = oldest.next().unwrap_or(oldest);
                continue;
            };
            let time = split_any_event_value(&value).map_or(0, |(time, _, _)| time);
            let expired = max_age_ms.is_some_and(|max_age| now_ms.saturating_sub(time) > max_age);
            if !must && !expired {
                state.oldest_time = Some((oldest, time));
                break;
            }
            let size = (key.len() + value.len()) as u64;
            batch.remove(&self.store.events, key);
            meta.bytes = meta.bytes.saturating_sub(size);
            meta.oldest_seq = oldest.next().unwrap_or(oldest);
            freed += size;
        }
        Ok(freed)
    }

    /// Reads `first..=last` of the channel's events from the disk (through the shared pages),
    /// `latest` being its newest; `None` when one of them is no longer there (trimmed
    /// meanwhile) or the first is past its age.
    fn read_stored(
        &self,
        channel: &Channel,
        epoch: &Epoch,
        (first, last, latest): (Seq, Seq, Seq),
        max_age: Option<Duration>,
    ) -> Result<Option<Vec<EncodedEvent>>> {
        let mut events =
            Vec::with_capacity(usize::try_from(last.get() - first.get() + 1).unwrap_or(0));
        let mut seq = first.get();
        while seq <= last.get() {
            let number = (seq - 1) / PAGE;
            let page_first = number * PAGE + 1;
            let page_last = page_first + PAGE - 1;
            let until = page_last.min(last.get());
            let page = if page_last <= latest.get() {
                // A whole page below the newest: read once, shared by every reader; the
                // cache is not locked while the disk is read.
                let slot = lock(&self.pages).slot(channel, epoch, number);
                let mut failure = None;
                let mut filled = false;
                let page = slot
                    .get_or_init(|| {
                        filled = true;
                        let range = (Seq::new(page_first), Seq::new(page_last));
                        self.read_range(channel, epoch, range.0, range.1)
                            .map(Page::from)
                            .unwrap_or_else(|error| {
                                // Readers waiting on this slot see no events (a reset); the
                                // next ones read again.
                                failure = Some(error);
                                Page::from(Vec::new())
                            })
                    })
                    .clone();
                if let Some(error) = failure {
                    lock(&self.pages).forget(channel, epoch, number);
                    return Err(error);
                }
                if filled {
                    lock(&self.pages).filled(channel, epoch, number, &slot);
                }
                page
            } else {
                self.read_range(channel, epoch, Seq::new(seq), Seq::new(until))?
                    .into()
            };
            let Some(start) = page
                .first()
                .and_then(|(_, event)| seq.checked_sub(event.position().seq.get()))
            else {
                return Ok(None);
            };
            let wanted = usize::try_from(until - seq + 1).unwrap_or(usize::MAX);
            let slice = page
                .iter()
                .skip(usize::try_from(start).unwrap_or(usize::MAX))
                .take(wanted);
            for (time, event) in slice {
                if event.position().seq.get() != seq {
                    return Ok(None);
                }
                if seq == first.get()
                    && max_age.is_some_and(|age| {
                        now_ms().saturating_sub(*time)
                            > u64::try_from(age.as_millis()).unwrap_or(u64::MAX)
                    })
                {
                    return Ok(None);
                }
                events.push(event.clone());
                seq += 1;
            }
            if seq <= until {
                // The page ended early: an event is gone.
                return Ok(None);
            }
        }
        Ok(Some(events))
    }

    /// The channel's stored events from `from` to `to`, as they are (an event trimmed
    /// meanwhile is missing; the caller checks).
    fn read_range(
        &self,
        channel: &Channel,
        epoch: &Epoch,
        from: Seq,
        to: Seq,
    ) -> Result<Vec<(u64, EncodedEvent)>> {
        let name = channel.as_str();
        let corrupt = || Error::Corrupt(format!("an event of {channel} cannot be read"));
        let mut events = Vec::new();
        for entry in self
            .store
            .events
            .range(event_key(name, from)..=event_key(name, to))
        {
            let (key, value) = entry.into_inner().map_err(|error| self.unreadable(error))?;
            let seq = seq_of_event_key(&key).ok_or_else(corrupt)?;
            let (time, key, data) = split_any_event_value(&value).ok_or_else(corrupt)?;
            let data = Payload::from_json(data).map_err(|_| corrupt())?;
            let key = key.map(Key::new).transpose().map_err(|_| corrupt())?;
            let event = EncodedEvent::new(Event {
                channel: channel.clone(),
                position: Position::new(epoch.clone(), seq),
                key,
                data,
            });
            events.push((time, event));
        }
        Ok(events)
    }
}

#[async_trait]
impl resync_broker::KeyedState for DiskBroker {
    async fn state_page(
        &self,
        channel: &Channel,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<resync_broker::StatePage> {
        let inner = &self.inner;
        inner.check_open()?;
        let Some(state) = inner.state(channel, false)? else {
            // Never published: no state, at the shared epoch's start.
            return Ok(resync_broker::StatePage {
                entries: Vec::new(),
                position: Position::start_of(inner.shared_epoch()),
                next: None,
            });
        };
        // What readers see: an entry of a publish not shown yet (waiting for its sync) is
        // left out; its event comes after the position, and the reader's rule applies it. The
        // disk is read with the channel unlocked, so publishes go on meanwhile: what they
        // write is newer than the position, which the reader's rule expects.
        let position = lock(&state).recent.position();
        let limit = limit.max(1);
        if let Some(page) = inner.state_pages.get(channel, &position, after, limit) {
            return Ok(page);
        }
        let page = inner.read_state_page(channel, &position, after, limit, now_ms())?;
        inner.state_pages.keep(channel, after, limit, &page);
        Ok(page)
    }
}

impl Inner {
    /// Reads a page of `channel`'s state from the disk, as readers at `position` see it.
    fn read_state_page(
        &self,
        channel: &Channel,
        position: &Position,
        after: Option<&Key>,
        limit: usize,
        now: u64,
    ) -> Result<resync_broker::StatePage> {
        let name = channel.as_str();
        let prefix = channel_prefix(name);
        let start = match after {
            Some(after) => {
                let mut start = state_key(name, after.as_str());
                // The first key after `after`: a zero byte sorts right after it.
                start.push(0);
                start
            }
            None => prefix.clone(),
        };
        let corrupt = || Error::Corrupt(format!("a state entry of {channel} cannot be read"));
        let mut entries = Vec::new();
        let mut bytes = 0;
        // Entries of another epoch and expired ones are skipped, at most so many a page: a
        // page stops early at `limit` entries, about STATE_PAGE_BYTES or STATE_SCAN_MOST
        // read, and goes on after the last key read, served or not.
        let mut last_read: Option<Key> = None;
        let mut more = false;
        for (scanned, entry) in self.store.state.range(start..).enumerate() {
            let (stored, value) = entry.into_inner().map_err(|error| self.unreadable(error))?;
            let Some(key) = stored.strip_prefix(prefix.as_slice()) else {
                break;
            };
            if entries.len() == limit
                || bytes >= resync_broker::STATE_PAGE_BYTES
                || scanned == STATE_SCAN_MOST
            {
                more = true;
                break;
            }
            let key = std::str::from_utf8(key)
                .ok()
                .and_then(|key| Key::new(key).ok())
                .ok_or_else(corrupt)?;
            last_read = Some(key.clone());
            let (epoch, seq, expires, data) = split_state_value(&value).ok_or_else(corrupt)?;
            let stale = epoch != position.epoch.as_str()
                || seq > position.seq
                || (expires != 0 && expires <= now);
            if stale {
                continue;
            }
            let data = data
                .map(|data| Payload::from_json(data).map_err(|_| corrupt()))
                .transpose()?;
            bytes += key.as_str().len() + data.as_ref().map_or(0, |data| data.as_str().len());
            entries.push(StateEntry { key, seq, data });
        }
        let next = if more { last_read } else { None };
        Ok(resync_broker::StatePage {
            entries,
            position: position.clone(),
            next,
        })
    }
}

#[async_trait]
impl Broker for DiskBroker {
    async fn publish(&self, publish: Publish) -> Result<Position> {
        let inner = &self.inner;
        inner.check_open()?;
        let state = inner
            .state(&publish.channel, true)?
            .ok_or_else(|| Error::Corrupt("a channel to publish to was not made".to_owned()))?;
        let acknowledged = {
            let mut guard = lock(&state);
            let st = &mut *guard;
            // Held until this publish is written (and, under `Always`, queued): a close waits
            // for it before it marks the run clean, and none is written after.
            let _open = inner
                .gate
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            inner.check_open()?;
            if let Some(key) = &publish.idempotency_key
                && let Some(position) = inner.keyed_position(&st.meta, &st.channel, key)?
            {
                if position.seq <= st.recent.position().seq {
                    return Ok(position);
                }
                // Stored by a publish still waiting for its sync (`Always`): this retry is
                // answered once that one is, not before.
                Err(position)
            } else {
                let seq = st
                    .meta
                    .last_seq
                    .next()
                    .ok_or_else(|| Error::Corrupt("channel seq overflow".to_owned()))?;
                let now_ms = now_ms();
                // A keyed publish: refused before anything is written when past the bounds.
                let keyed = match &publish.key {
                    Some(key) => Some(inner.keyed_update(st, key, &publish.data, now_ms)?),
                    None => None,
                };
                let event = EncodedEvent::new(Event {
                    channel: st.channel.clone(),
                    position: Position::new(st.meta.epoch.clone(), seq),
                    key: publish.key,
                    data: publish.data,
                });
                let channel = st.channel.clone();
                let name = channel.as_str();
                let key = event_key(name, seq);
                let value = match event.key() {
                    Some(entry) => keyed_event_value(now_ms, entry.as_str(), event.data()),
                    None => event_value(now_ms, event.data()),
                };
                let size = (key.len() + value.len()) as u64;
                let mut meta = st.meta.clone();
                let by_client = publish.origin == PublishOrigin::Client;
                if !st.stored {
                    inner.admit_channel(by_client)?;
                    meta.made_by_client = by_client;
                }
                let mut batch = inner.store.db.batch();
                batch.insert(&inner.store.events, key, value);
                if let (Some(update), Some(entry)) = (&keyed, event.key()) {
                    let data = (event.data() != "null").then(|| event.data());
                    batch.insert(
                        &inner.store.state,
                        state_key(name, entry.as_str()),
                        state_value(&meta.epoch, seq, update.expires_ms, data),
                    );
                }
                meta.last_seq = seq;
                meta.bytes += size;
                meta.run = inner.run;
                if let Some(idempotency) = &publish.idempotency_key
                    && inner.idempotency_window > 0
                {
                    let slot = idempotency_slot(name, meta.keyed % inner.idempotency_window);
                    if let Some(old) = inner
                        .store
                        .keys
                        .get(&slot)
                        .map_err(|error| inner.unreadable(error))?
                    {
                        let old = String::from_utf8_lossy(&old);
                        batch.remove(&inner.store.keys, idempotency_key(name, &old));
                    }
                    batch.insert(&inner.store.keys, slot, idempotency.as_str().as_bytes());
                    batch.insert(
                        &inner.store.keys,
                        idempotency_key(name, idempotency.as_str()),
                        idempotency_value(&meta.epoch, seq),
                    );
                    meta.keyed += 1;
                }
                let total = inner.history_bytes.load(Ordering::Relaxed) + size;
                let over_budget = inner
                    .max_history_bytes
                    .map_or(0, |budget| total.saturating_sub(budget));
                let freed = inner.trim(&mut batch, st, &mut meta, seq, now_ms, over_budget)?;
                batch.insert(&inner.store.channels, name, meta.encode());
                batch.commit().map_err(|error| {
                    inner.failed(format!("the store could not be written: {error}"))
                })?;
                inner.history_bytes.fetch_add(size, Ordering::Relaxed);
                inner.history_bytes.fetch_sub(
                    freed.min(inner.history_bytes.load(Ordering::Relaxed)),
                    Ordering::Relaxed,
                );
                st.meta = meta;
                if let Some(update) = keyed {
                    st.keyed = Some(update.counts);
                }
                if !st.stored {
                    st.stored = true;
                    inner.channel_count.fetch_add(1, Ordering::Relaxed);
                    if by_client {
                        inner.client_channels.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let held = event.held_bytes();
                if inner.durability == Durability::Always {
                    let (acknowledge, acknowledged) = oneshot::channel();
                    let shown = Arc::clone(&state);
                    let shower = Arc::clone(&self.inner);
                    let position = event.position().clone();
                    let waiting = Waiting {
                        event,
                        size: held,
                        show: Box::new(move |event, size| {
                            shower.show(&mut lock(&shown), &event, size);
                        }),
                        acknowledge,
                    };
                    if let Some(waiting) = inner.group_commit.queue(waiting) {
                        // Closing: the group commit has stopped, so this publish syncs by itself,
                        // still under its channel's lock (seq order).
                        inner.sync()?;
                        inner.show(st, &waiting.event, waiting.size);
                        return Ok(position);
                    }
                    Ok((acknowledged, position))
                } else {
                    // Shown while the channel is still locked, so subscribers see seq order.
                    return Ok(inner.show(st, &event, held));
                }
            }
        };
        let (acknowledged, position) = match acknowledged {
            Ok(waiting) => waiting,
            Err(keyed) => return inner.shown(&state, keyed).await,
        };
        acknowledged.await.map_err(|_| Error::Closed)??;
        Ok(position)
    }

    async fn subscribe(&self, channel: &Channel) -> Result<LiveSubscription> {
        self.inner.check_open()?;
        Ok(self.inner.hub.subscribe(channel))
    }

    async fn read_since(
        &self,
        channel: &Channel,
        since: &Position,
        limit: usize,
    ) -> Result<HistoryRead> {
        let inner = &self.inner;
        let Some(state) = inner.state(channel, false)? else {
            // Never published: the same decision as for a channel with nothing stored.
            let latest = Position::start_of(inner.shared_epoch());
            return Ok(match decide_read(since, &latest, None) {
                ReadDecision::UpToDate | ReadDecision::Replay { .. } => {
                    ReadOutcome::UpToDate { latest }
                }
                ReadDecision::Reset(reason) => ReadOutcome::Reset { reason, latest },
            });
        };
        let (epoch, first, last, latest, max_age) = {
            let mut st = lock(&state);
            let latest = st.recent.position();
            let oldest = st.meta.oldest_stored();
            let first = match decide_read(since, &latest, oldest) {
                ReadDecision::UpToDate => return Ok(ReadOutcome::UpToDate { latest }),
                ReadDecision::Reset(reason) => return Ok(ReadOutcome::Reset { reason, latest }),
                ReadDecision::Replay { first } => first,
            };
            if st.recent.oldest_seq().is_some_and(|recent| recent <= first) {
                let before = st.recent.bytes();
                let read = st.recent.read_since(since, limit, Instant::now());
                // The read dropped what had expired.
                inner
                    .recent_bytes
                    .fetch_sub(before - st.recent.bytes(), Ordering::Relaxed);
                return Ok(read);
            }
            let limit = u64::try_from(limit.max(1)).unwrap_or(u64::MAX);
            let last = Seq::new(latest.seq.get().min(first.get().saturating_add(limit - 1)));
            (
                st.meta.epoch.clone(),
                first,
                last,
                latest,
                st.retention.max_age(),
            )
        };
        // Read with the channel unlocked: its publishes go on meanwhile.
        Ok(
            match inner.read_stored(channel, &epoch, (first, last, latest.seq), max_age)? {
                Some(events) => ReadOutcome::Replayed { events, latest },
                None => ReadOutcome::Reset {
                    reason: ResetReason::Truncated,
                    latest,
                },
            },
        )
    }

    async fn position(&self, channel: &Channel) -> Result<Position> {
        Ok(match self.inner.state(channel, false)? {
            Some(state) => lock(&state).recent.position(),
            None => Position::start_of(self.inner.shared_epoch()),
        })
    }

    fn subscriber_count(&self, channel: &Channel) -> usize {
        self.inner.hub.subscriber_count(channel)
    }

    async fn health(&self) -> Result<()> {
        self.inner.check_open()?;
        if let Some(failure) = lock(&self.inner.failure).clone() {
            return Err(Error::Unavailable(failure));
        }
        Ok(())
    }

    fn delivery_lag(&self) -> resync_broker::DeliveryLag {
        self.inner.hub.delivery_lag()
    }

    async fn lag_eased(&self) {
        self.inner.hub.lag_eased().await;
    }

    fn durable(&self) -> bool {
        true
    }

    async fn close(&self) {
        let inner = &self.inner;
        if inner.closed.swap(true, Ordering::AcqRel) {
            return;
        }
        inner.stop.notify_waiters();
        inner.hub.close_all();
        let closing = Arc::clone(inner);
        let closed = tokio::task::spawn_blocking(move || {
            // Every publish already writing finishes (and is queued) first; none writes after.
            let _closed = closing
                .gate
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Publishes waiting for a sync get it: the group commit drains before it stops.
            closing.group_commit.stop();
            close_clean(
                &closing.store,
                RunRecord {
                    run: closing.run,
                    clean: true,
                    acknowledged_unsynced: closing.durability.acknowledges_unsynced(),
                    boot: closing.boot.clone(),
                    place: closing.place.clone(),
                },
            );
        })
        .await;
        if let Err(error) = closed {
            tracing::error!(%error, "the store's close did not finish");
        }
    }

    fn presence(&self) -> Option<&dyn resync_broker::Presence> {
        Some(&self.inner.presence)
    }

    fn keyed_state(&self) -> Option<&dyn resync_broker::KeyedState> {
        Some(self)
    }

    fn user_commands(&self) -> Option<&dyn resync_broker::UserCommandBus> {
        Some(&self.inner.user_commands)
    }
}
