//! Local fan-out: delivering each event to every subscriber of its channel in this process.
//!
//! Every broker uses a [`Hub`] the same way: it calls [`Hub::subscribe`] for each local
//! subscriber and [`Hub::deliver`] for each event it learns of (published here, or received
//! from Redis pub/sub, NATS, …). Each channel keeps one bounded ring of its newest items,
//! shared by all its local subscribers, and each subscriber reads it at its own cursor: a
//! publish stores the event once and wakes the subscribers that wait, however many there
//! are, so its cost does not grow with the subscribers that are busy reading (a queue per
//! subscriber cost the publisher a lock and a reference count per subscriber per event, most
//! of a thread at 10,000 subscribers). A subscriber that falls a whole ring behind is not cut
//! off: it is told to catch up ([`Live::Resync`]), which the resume algorithm does from
//! history, a page at a time. Nothing is skipped silently, a slow subscriber never delays a
//! fast one, and a reader that is merely slower than a burst keeps its connection; a reader
//! that stops reading is the transports' to cut (by how long its socket stays unwritable).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::task::{Context, Poll, Waker};

use resync_protocol::Channel;
use slab::Slab;

use crate::event::EncodedEvent;

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical
/// section here leaves its data consistent at each step, so the data stays usable.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

/// Called with a channel when its last local subscriber leaves.
type IdleCallback = Box<dyn Fn(&Channel) + Send + Sync>;

/// Local fan-out to subscribers, each at most a bounded number of items behind the newest
/// (then told to catch up). Cloning shares the hub.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    channels: Mutex<HashMap<Channel, Arc<Feed>>>,
    queue_capacity: usize,
    on_idle: Option<IdleCallback>,
    gauges: Arc<Gauges>,
    /// Where subscribers are woken from, when not from the publisher's thread
    /// ([`Hub::waking_from_own_thread`]).
    relay: Option<WakeRelay>,
}

/// A thread of the hub's own that wakes the subscribers of each delivery.
///
/// An actix worker runs the tasks woken on its own thread before those woken from another
/// (tokio's `LocalSet` takes its remote queue once in 31 ticks). A publish handled on a
/// worker that woke that worker's subscribers there put them all ahead of the next publish
/// request, so on a busy box publishes slowed to one a pass over the subscribers, each wake
/// carried fewer events, and every delivery cost more (issue 28: 3.9-7.2M deliveries/s
/// against 9.1M with the same publishes from a thread of their own). Woken from here, the
/// subscribers wait in the workers' remote queues and the next publish goes first, as on a
/// Redis broker, whose subscribers are woken by its Pub/Sub thread.
struct WakeRelay {
    batches: std::sync::mpsc::SyncSender<Vec<Waker>>,
}

impl WakeRelay {
    /// Batches of wakers waiting for the thread: past them, a delivery wakes its own.
    const QUEUE: usize = 1_024;
    /// Fewer subscribers than this are woken by the delivering thread: the relay's hop (a
    /// thread woken, then the workers) cost 0.3 ms of p50 at 150 subscribers and 50 events/s
    /// (`cargo xtask bench flood`, without floods), more than such a short pass over them
    /// holds up the next publish.
    const FROM: usize = 256;

    fn start() -> Option<Self> {
        let (batches, receiver) = std::sync::mpsc::sync_channel::<Vec<Waker>>(Self::QUEUE);
        std::thread::Builder::new()
            .name("resync-wake".into())
            .spawn(move || {
                // Ends when the hub is dropped (its sender with it).
                while let Ok(batch) = receiver.recv() {
                    for waker in batch {
                        waker.wake();
                    }
                }
            })
            .ok()?;
        Some(Self { batches })
    }

    /// Hands `wakers` to the thread, or wakes them here when it is behind or gone: a wake is
    /// only a signal to read the ring, so the order of wakes does not matter.
    fn wake(&self, wakers: Vec<Waker>) {
        if let Err(
            std::sync::mpsc::TrySendError::Full(wakers)
            | std::sync::mpsc::TrySendError::Disconnected(wakers),
        ) = self.batches.try_send(wakers)
        {
            for waker in wakers {
                waker.wake();
            }
        }
    }
}

/// Counters shared by the hub and every feed, read without taking a lock.
#[derive(Default)]
struct Gauges {
    /// Times a subscriber fell a whole ring behind (each counts once, until it caught up).
    overflows: AtomicU64,
    /// Subscribers that fell a whole ring behind and have not yet taken their
    /// [`Live::Resync`].
    lagging: AtomicU64,
    /// Subscribers registered now.
    subscribers: AtomicU64,
    /// Woken whenever a lagging subscriber stops lagging (caught up, or gone).
    lag_eased: tokio::sync::Notify,
}

impl Gauges {
    fn lag_ended(&self) {
        self.lagging.fetch_sub(1, Ordering::Relaxed);
        self.lag_eased.notify_waiters();
    }
}

/// How far this process's fan-out is behind: how many of its subscribers are behind by
/// more than their queue right now, out of how many. One lagging subscriber is a slow
/// client; a large share of them at once is a server that cannot keep up with its
/// publishers (the transports push back on publishers then, rather than cut readers off).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DeliveryLag {
    /// Subscribers whose queue overflowed and who have not caught up yet.
    pub lagging: u64,
    /// Subscribers in all.
    pub subscribers: u64,
}

/// One channel's newest items and the subscribers reading them.
///
/// Hand-written rather than a broadcast channel: it allocates nothing until its first
/// event and gives back what every subscriber has read, where a broadcast channel
/// allocates all its slots up front, and it counts, without visiting them, the subscribers
/// that fell behind (what the publish hold needs).
struct Feed {
    ring: RwLock<Ring>,
    /// The index one past the newest item, for a subscriber to see without the ring's lock
    /// that something arrived after it registered to be woken.
    end: AtomicU64,
    waiters: Mutex<Waiters>,
    /// Times the feed was closed ([`Hub::close_all`]): a subscription made before a close
    /// ends once it has read what was there.
    closes: AtomicU64,
    /// Subscribers registered; changed only under the hub's channel map lock.
    subscribers: AtomicUsize,
}

/// Where every subscriber of a feed stands is kept as counts, so a publish learns in one
/// step who fell behind: each item counts the subscribers whose next item it is, `at_end`
/// those that have read everything, `behind` those whose next item was dropped. A
/// subscriber moves its own count (atomically, under the read lock); pushes and drops move
/// whole counts under the write lock.
struct Ring {
    items: VecDeque<Slot>,
    /// The index of `items[0]`; indices only grow.
    first: u64,
    at_end: AtomicU64,
    behind: AtomicU64,
}

struct Slot {
    item: Live,
    /// Subscribers whose next item this is.
    readers: AtomicU64,
}

impl Ring {
    fn end(&self) -> u64 {
        self.first + self.items.len() as u64
    }

    /// Moves one subscriber out of the count its `cursor` puts it in; `true` if it was
    /// behind.
    fn leave(&self, cursor: u64) -> bool {
        if cursor < self.first {
            self.behind.fetch_sub(1, Ordering::Relaxed);
            return true;
        }
        match self.items.get((cursor - self.first) as usize) {
            Some(slot) => slot.readers.fetch_sub(1, Ordering::Relaxed),
            None => self.at_end.fetch_sub(1, Ordering::Relaxed),
        };
        false
    }
}

/// The wakers of subscribers waiting for the next item. Each publish takes them all, and a
/// subscriber that leaves takes its own out, so each subscriber is in it at most once
/// (bounded by the subscriber count).
#[derive(Default)]
struct Waiters {
    wakers: Slab<Waker>,
    /// Times the wakers were taken: a subscriber's registration of an earlier round is gone.
    round: u64,
}

impl Feed {
    fn new() -> Self {
        Self {
            ring: RwLock::new(Ring {
                items: VecDeque::new(),
                first: 0,
                at_end: AtomicU64::new(0),
                behind: AtomicU64::new(0),
            }),
            end: AtomicU64::new(0),
            waiters: Mutex::default(),
            closes: AtomicU64::new(0),
            subscribers: AtomicUsize::new(0),
        }
    }

    /// Stores `item` as the newest, dropping the items nobody still needs and, once the
    /// ring is full, the oldest (whose readers are then behind): returns how many fell
    /// behind.
    fn push(&self, item: Live, capacity: usize, relay: Option<&WakeRelay>) -> u64 {
        let mut ring = write(&self.ring);
        while ring
            .items
            .front()
            .is_some_and(|slot| slot.readers.load(Ordering::Relaxed) == 0)
        {
            ring.items.pop_front();
            ring.first += 1;
        }
        let mut fell_behind = 0;
        if ring.items.len() >= capacity
            && let Some(mut oldest) = ring.items.pop_front()
        {
            ring.first += 1;
            fell_behind = *oldest.readers.get_mut();
            *ring.behind.get_mut() += fell_behind;
        }
        let readers = std::mem::take(ring.at_end.get_mut());
        ring.items.push_back(Slot {
            item,
            readers: AtomicU64::new(readers),
        });
        if ring.items.capacity() > RETAINED_SLOTS && ring.items.len() <= RETAINED_SLOTS / 4 {
            ring.items.shrink_to(RETAINED_SLOTS);
        }
        self.end.store(ring.end(), Ordering::Release);
        drop(ring);
        self.wake_all(relay);
        fell_behind
    }

    fn wake_all(&self, relay: Option<&WakeRelay>) {
        let mut wakers = {
            let mut waiters = lock(&self.waiters);
            waiters.round += 1;
            std::mem::take(&mut waiters.wakers)
        };
        if wakers.is_empty() {
            return;
        }
        match relay {
            Some(relay) if wakers.len() >= WakeRelay::FROM => relay.wake(wakers.drain().collect()),
            _ => {
                for waker in wakers.drain() {
                    waker.wake();
                }
            }
        }
        // The emptied list goes back, so the next round does not grow one from nothing.
        let mut waiters = lock(&self.waiters);
        if waiters.wakers.is_empty() && waiters.wakers.capacity() < wakers.capacity() {
            waiters.wakers = wakers;
        }
    }
}

/// A ring that grew past this many slots in a burst gives its memory back once drained.
const RETAINED_SLOTS: usize = 64;

impl std::fmt::Debug for Hub {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("Hub")
            .field("channels", &lock(&self.inner.channels).len())
            .field("queue_capacity", &self.inner.queue_capacity)
            .finish()
    }
}

/// What a live subscription receives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Live {
    /// An event, as the broker delivered it.
    Event(EncodedEvent),
    /// The broker may have missed events (its link to the backend broke and came back): check
    /// history from the last delivered position.
    Resync,
}

/// What [`LiveSubscription::recv`] reports when no event comes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LiveError {
    /// The subscriber fell behind and was cut off; it must resume from its position. The
    /// [`Hub`] itself no longer cuts anyone off (a full queue makes its subscriber catch up
    /// from history); a broker with live subscriptions of its own may still report it.
    #[error("subscriber lagged behind and was cut off")]
    Lagged,
    /// The broker dropped the subscription (shutdown).
    #[error("subscription closed by the broker")]
    Closed,
}

impl Hub {
    /// A hub whose subscribers may each fall at most `queue_capacity` items (at least 1)
    /// behind the newest before they are told to catch up.
    pub fn new(queue_capacity: usize) -> Self {
        Self::build(queue_capacity, None)
    }

    /// Like [`new`](Self::new), and calls `on_idle` with a channel whenever its last local
    /// subscriber leaves (a Redis broker unsubscribes there). `on_idle` runs while the hub is
    /// locked: it must be quick and must not call back into the hub.
    pub fn with_idle_callback(
        queue_capacity: usize,
        on_idle: impl Fn(&Channel) + Send + Sync + 'static,
    ) -> Self {
        Self::build(queue_capacity, Some(Box::new(on_idle)))
    }

    fn build(queue_capacity: usize, on_idle: Option<IdleCallback>) -> Self {
        Self {
            inner: Arc::new(HubInner {
                channels: Mutex::new(HashMap::new()),
                queue_capacity: queue_capacity.max(1),
                on_idle,
                gauges: Arc::default(),
                relay: None,
            }),
        }
    }

    /// Wakes subscribers from a thread of the hub's own instead of the thread that
    /// delivers (see `WakeRelay`): for a broker whose publishes are delivered on the thread
    /// that took them (the memory broker), so that on an HTTP worker the next publish is not
    /// queued behind the subscribers this one woke. Call it on a new hub, before cloning it;
    /// without a thread to spare, the hub wakes them itself.
    #[must_use]
    pub fn waking_from_own_thread(mut self) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.relay = WakeRelay::start();
        }
        self
    }

    /// Registers a local subscriber of `channel`: it receives what is delivered from now on.
    pub fn subscribe(&self, channel: &Channel) -> LiveSubscription {
        let mut channels = lock(&self.inner.channels);
        let feed = channels
            .entry(channel.clone())
            .or_insert_with(|| Arc::new(Feed::new()))
            .clone();
        feed.subscribers.fetch_add(1, Ordering::Relaxed);
        self.inner
            .gauges
            .subscribers
            .fetch_add(1, Ordering::Relaxed);
        drop(channels);
        let cursor = {
            let ring = read(&feed.ring);
            ring.at_end.fetch_add(1, Ordering::Relaxed);
            ring.end()
        };
        let closes = feed.closes.load(Ordering::Acquire);
        LiveSubscription {
            feed,
            cursor,
            closes,
            registered: None,
            taken: VecDeque::new(),
            registration: Registration {
                hub: self.inner.clone(),
                channel: channel.clone(),
            },
        }
    }

    /// Delivers `event` to every local subscriber of its channel and returns how many there
    /// are. A subscriber that is a whole ring behind misses it for now, and is told to catch
    /// up from history ([`Live::Resync`]).
    pub fn deliver(&self, event: &EncodedEvent) -> usize {
        self.push(event.channel(), Live::Event(event.clone()))
    }

    fn push(&self, channel: &Channel, item: Live) -> usize {
        let Some(feed) = lock(&self.inner.channels).get(channel).cloned() else {
            return 0;
        };
        let fell_behind = feed.push(item, self.inner.queue_capacity, self.inner.relay.as_ref());
        if fell_behind > 0 {
            let gauges = &self.inner.gauges;
            gauges.lagging.fetch_add(fell_behind, Ordering::Relaxed);
            gauges.overflows.fetch_add(fell_behind, Ordering::Relaxed);
        }
        feed.subscribers.load(Ordering::Relaxed)
    }

    /// How many times a subscriber fell a whole ring behind (a burst it then caught up with
    /// from history), since the hub was made.
    pub fn overflows(&self) -> u64 {
        self.inner.gauges.overflows.load(Ordering::Relaxed)
    }

    /// Completes the next time a lagging subscriber stops lagging (it took its
    /// [`Live::Resync`], or left): what a held publisher waits for, instead of polling
    /// [`delivery_lag`](Self::delivery_lag).
    pub async fn lag_eased(&self) {
        self.inner.gauges.lag_eased.notified().await;
    }

    /// How many subscribers are behind by more than their queue now, out of how many.
    pub fn delivery_lag(&self) -> DeliveryLag {
        DeliveryLag {
            lagging: self.inner.gauges.lagging.load(Ordering::Relaxed),
            subscribers: self.inner.gauges.subscribers.load(Ordering::Relaxed),
        }
    }

    /// Tells every local subscriber of `channel` to check history from its last position,
    /// because this process may have missed events (a broker reconnected).
    pub fn request_resync(&self, channel: &Channel) {
        self.push(channel, Live::Resync);
    }

    /// How many local subscribers `channel` has.
    pub fn subscriber_count(&self, channel: &Channel) -> usize {
        lock(&self.inner.channels)
            .get(channel)
            .map_or(0, |feed| feed.subscribers.load(Ordering::Relaxed))
    }

    /// The channels that have at least one local subscriber.
    pub fn channels(&self) -> Vec<Channel> {
        lock(&self.inner.channels).keys().cloned().collect()
    }

    /// Ends every subscription (they see [`LiveError::Closed`] once they have read what was
    /// delivered before).
    pub fn close_all(&self) {
        let feeds: Vec<_> = lock(&self.inner.channels).values().cloned().collect();
        for feed in feeds {
            feed.closes.fetch_add(1, Ordering::Release);
            feed.wake_all(None);
        }
    }
}

/// Removes a subscriber from the hub when its subscription is dropped.
struct Registration {
    hub: Arc<HubInner>,
    channel: Channel,
}

/// The live items of one channel for one subscriber, from the moment it subscribed.
///
/// Knows nothing of history; [`crate::resume`] combines it with history into a gap-free
/// stream. Dropping it unsubscribes at once.
pub struct LiveSubscription {
    feed: Arc<Feed>,
    /// The index of the next item to read.
    cursor: u64,
    /// The feed's close count when this subscription was made.
    closes: u64,
    /// The waiters' round and slot of this subscriber's waker, if it registered one.
    registered: Option<(u64, usize)>,
    /// Items read in one go, not yet handed out.
    taken: VecDeque<Live>,
    registration: Registration,
}

impl Drop for LiveSubscription {
    fn drop(&mut self) {
        self.unregister();
        let was_behind = read(&self.feed.ring).leave(self.cursor);
        let hub = &self.registration.hub;
        if was_behind {
            hub.gauges.lag_ended();
        }
        hub.gauges.subscribers.fetch_sub(1, Ordering::Relaxed);
        let channel = &self.registration.channel;
        let mut channels = lock(&hub.channels);
        if self.feed.subscribers.fetch_sub(1, Ordering::Relaxed) == 1 {
            channels.remove(channel);
            if let Some(on_idle) = &hub.on_idle {
                on_idle(channel);
            }
        }
    }
}

impl std::fmt::Debug for LiveSubscription {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LiveSubscription")
            .field("channel", &self.registration.channel)
            .field("cursor", &self.cursor)
            .finish()
    }
}

impl LiveSubscription {
    /// The channel followed.
    pub fn channel(&self) -> &Channel {
        &self.registration.channel
    }

    /// The next live item. Delivered items come before a close is reported.
    pub async fn recv(&mut self) -> Result<Live, LiveError> {
        std::future::poll_fn(|context| self.poll_recv(context)).await
    }

    /// Polls for the next live item; delivered items come before a close is reported.
    pub fn poll_recv(&mut self, context: &mut Context<'_>) -> Poll<Result<Live, LiveError>> {
        if let Some(item) = self.taken.pop_front() {
            return Poll::Ready(Ok(item));
        }
        match self.take_all(Some(context.waker())) {
            Some(item) => Poll::Ready(item),
            None => Poll::Pending,
        }
    }

    /// The next live item if one is there, without waiting.
    pub fn try_recv(&mut self) -> Option<Result<Live, LiveError>> {
        if let Some(item) = self.taken.pop_front() {
            return Some(Ok(item));
        }
        self.take_all(None)
    }

    /// Reads everything after the cursor under one lock (the first item is returned, the
    /// rest kept in `taken`, which must be empty), or the catch-up signal if the ring moved
    /// past the cursor, or the end; `None` when there is nothing yet (the waker, if given,
    /// is registered).
    fn take_all(&mut self, waker: Option<&Waker>) -> Option<Result<Live, LiveError>> {
        loop {
            if let Some(item) = self.read_ring() {
                return Some(item);
            }
            let waker = waker?;
            self.register(waker);
            // A publish between the read and the registration took the wakers before this
            // one was there: look again rather than wait for the next.
            if self.feed.end.load(Ordering::Acquire) == self.cursor && !self.closed() {
                return None;
            }
        }
    }

    fn closed(&self) -> bool {
        self.feed.closes.load(Ordering::Acquire) != self.closes
    }

    fn read_ring(&mut self) -> Option<Result<Live, LiveError>> {
        let ring = read(&self.feed.ring);
        let end = ring.end();
        if self.cursor == end {
            drop(ring);
            return self.closed().then_some(Err(LiveError::Closed));
        }
        let behind = self.cursor < ring.first;
        let first = if behind {
            Live::Resync
        } else {
            let start = (self.cursor - ring.first) as usize;
            // The cursor is before the end, so its item is there.
            let first = ring.items.get(start)?.item.clone();
            if self.taken.capacity() > RETAINED_SLOTS {
                self.taken = VecDeque::new();
            }
            self.taken
                .extend(ring.items.range(start + 1..).map(|slot| slot.item.clone()));
            first
        };
        ring.leave(self.cursor);
        ring.at_end.fetch_add(1, Ordering::Relaxed);
        self.cursor = end;
        drop(ring);
        if behind {
            self.registration.hub.gauges.lag_ended();
        }
        Some(Ok(first))
    }

    fn register(&mut self, waker: &Waker) {
        let mut waiters = lock(&self.feed.waiters);
        let round = waiters.round;
        if let Some((registered_round, key)) = self.registered
            && registered_round == round
            && let Some(registered) = waiters.wakers.get_mut(key)
        {
            if !registered.will_wake(waker) {
                *registered = waker.clone();
            }
            return;
        }
        self.registered = Some((round, waiters.wakers.insert(waker.clone())));
    }

    /// Takes this subscriber's waker out of the waiters, if it is still there.
    fn unregister(&mut self) {
        let Some((registered_round, key)) = self.registered.take() else {
            return;
        };
        let mut waiters = lock(&self.feed.waiters);
        if waiters.round == registered_round {
            waiters.wakers.try_remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use resync_protocol::{Epoch, Event, Payload, Position, Seq};

    fn event(channel: &Channel, seq: u64) -> EncodedEvent {
        EncodedEvent::new(Event {
            channel: channel.clone(),
            position: Position::new(Epoch::new("e").unwrap(), Seq::new(seq)),
            key: None,
            data: Payload::from_json("1").unwrap(),
        })
    }

    fn seq_of(live: Live) -> u64 {
        match live {
            Live::Event(event) => event.position().seq.get(),
            Live::Resync => panic!("unexpected resync"),
        }
    }

    /// A waker that reports the name of the thread that woke it.
    struct ThreadReporter(Mutex<std::sync::mpsc::Sender<Option<String>>>);

    impl std::task::Wake for ThreadReporter {
        fn wake(self: Arc<Self>) {
            let name = std::thread::current().name().map(str::to_owned);
            let _ = lock(&self.0).send(name);
        }
    }

    #[test]
    fn a_hub_waking_from_its_own_thread_wakes_many_subscribers_there_and_a_few_itself() {
        let hub = Hub::new(8).waking_from_own_thread();
        // As many subscribers as the relay takes, each with a waker that reports its thread.
        let channel = Channel::new("c").unwrap();
        let (sender, woken) = std::sync::mpsc::channel();
        let waker = Waker::from(Arc::new(ThreadReporter(Mutex::new(sender))));
        let mut context = Context::from_waker(&waker);
        let mut subscriptions: Vec<_> = (0..WakeRelay::FROM)
            .map(|_| hub.subscribe(&channel))
            .collect();
        for subscription in &mut subscriptions {
            assert!(subscription.poll_recv(&mut context).is_pending());
        }
        hub.deliver(&event(&channel, 1));
        hub.deliver(&event(&channel, 2));
        for _ in 0..WakeRelay::FROM {
            let by = woken
                .recv_timeout(std::time::Duration::from_secs(30))
                .expect("woken");
            assert_eq!(
                by.as_deref(),
                Some("resync-wake"),
                "not the delivering thread"
            );
        }
        for subscription in &mut subscriptions {
            for seq in 1..=2 {
                match subscription.poll_recv(&mut context) {
                    Poll::Ready(Ok(live)) => assert_eq!(seq_of(live), seq),
                    other => panic!("event {seq}: {other:?}"),
                }
            }
        }
        // A few are woken where the event is delivered: the hop would cost them more.
        let few_channel = Channel::new("few").unwrap();
        let mut few = hub.subscribe(&few_channel);
        assert!(few.poll_recv(&mut context).is_pending());
        hub.deliver(&event(&few_channel, 1));
        let by = woken
            .recv_timeout(std::time::Duration::from_secs(30))
            .expect("woken");
        assert_eq!(by, std::thread::current().name().map(str::to_owned));
    }

    #[tokio::test]
    async fn a_full_ring_drops_for_the_slow_subscriber_only_and_tells_it_to_catch_up() {
        let hub = Hub::new(2);
        let channel = Channel::new("c").unwrap();
        let mut slow = hub.subscribe(&channel);
        let mut fast = hub.subscribe(&channel);
        for seq in 1..=2 {
            hub.deliver(&event(&channel, seq));
            assert_eq!(seq_of(fast.recv().await.unwrap()), seq);
        }
        hub.deliver(&event(&channel, 3));
        hub.deliver(&event(&channel, 4));
        assert_eq!(seq_of(fast.recv().await.unwrap()), 3);
        assert_eq!(seq_of(fast.recv().await.unwrap()), 4);
        assert_eq!(
            hub.overflows(),
            1,
            "one overflow, however many events it dropped"
        );
        // The slow one, a whole ring behind, is told to catch up, and stays subscribed.
        assert_eq!(
            hub.delivery_lag(),
            DeliveryLag {
                lagging: 1,
                subscribers: 2
            },
            "behind until it takes its resync"
        );
        assert_eq!(slow.recv().await, Ok(Live::Resync));
        assert_eq!(hub.delivery_lag().lagging, 0);
        hub.deliver(&event(&channel, 5));
        assert_eq!(seq_of(slow.recv().await.unwrap()), 5);
        assert_eq!(hub.subscriber_count(&channel), 2);
    }

    #[tokio::test]
    async fn a_lagging_subscriber_that_leaves_no_longer_counts_as_lagging() {
        let hub = Hub::new(1);
        let channel = Channel::new("c").unwrap();
        let slow = hub.subscribe(&channel);
        hub.deliver(&event(&channel, 1));
        hub.deliver(&event(&channel, 2));
        assert_eq!(hub.delivery_lag().lagging, 1);
        drop(slow);
        assert_eq!(hub.delivery_lag(), DeliveryLag::default());
    }

    #[tokio::test]
    async fn a_waiter_for_the_lag_to_ease_is_woken_when_a_lagging_subscriber_catches_up() {
        let hub = Hub::new(1);
        let channel = Channel::new("c").unwrap();
        let mut slow = hub.subscribe(&channel);
        hub.deliver(&event(&channel, 1));
        hub.deliver(&event(&channel, 2));
        let waiter = tokio::spawn({
            let hub = hub.clone();
            async move { hub.lag_eased().await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "nothing eased yet");
        assert_eq!(slow.recv().await, Ok(Live::Resync));
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("woken by the catch-up, not by a timer")
            .unwrap();
    }

    #[tokio::test]
    async fn last_unsubscribe_calls_the_idle_callback() {
        let idle = Arc::new(Mutex::new(Vec::new()));
        let seen = idle.clone();
        let hub = Hub::with_idle_callback(4, move |channel| lock(&seen).push(channel.clone()));
        let channel = Channel::new("c").unwrap();
        let first = hub.subscribe(&channel);
        let second = hub.subscribe(&channel);
        assert_eq!(hub.subscriber_count(&channel), 2);
        drop(first);
        assert!(lock(&idle).is_empty());
        assert_eq!(hub.subscriber_count(&channel), 1);
        drop(second);
        assert_eq!(*lock(&idle), vec![channel.clone()]);
        assert_eq!(hub.subscriber_count(&channel), 0);
        assert!(hub.channels().is_empty());
    }

    #[tokio::test]
    async fn the_ring_keeps_only_what_a_subscriber_still_needs_and_no_waker_of_one_that_left() {
        let hub = Hub::new(1_024);
        let channel = Channel::new("c").unwrap();
        let mut reader = hub.subscribe(&channel);
        for seq in 1..=100 {
            hub.deliver(&event(&channel, seq));
        }
        for seq in 1..=100 {
            assert_eq!(seq_of(reader.recv().await.unwrap()), seq);
        }
        hub.deliver(&event(&channel, 101));
        let feed = lock(&hub.inner.channels).get(&channel).cloned().unwrap();
        assert_eq!(
            read(&feed.ring).items.len(),
            1,
            "what every subscriber has read is given back at the next delivery"
        );
        // Subscribers that wait and leave take their wakers with them: churn on a quiet
        // channel does not grow its waiters.
        for _ in 0..100 {
            let mut passer_by = hub.subscribe(&channel);
            let mut context = Context::from_waker(Waker::noop());
            assert!(passer_by.poll_recv(&mut context).is_pending());
            drop(passer_by);
        }
        assert!(lock(&feed.waiters).wakers.is_empty());
        assert_eq!(hub.subscriber_count(&channel), 1);
    }

    #[tokio::test]
    async fn close_all_ends_subscriptions_after_what_was_delivered_and_wakes_waiters() {
        let hub = Hub::new(8);
        let channel = Channel::new("c").unwrap();
        let mut reader = hub.subscribe(&channel);
        let mut waiting = hub.subscribe(&channel);
        let waiter = tokio::spawn(async move { waiting.recv().await });
        tokio::task::yield_now().await;
        hub.deliver(&event(&channel, 1));
        hub.close_all();
        assert_eq!(seq_of(reader.recv().await.unwrap()), 1);
        assert_eq!(reader.recv().await, Err(LiveError::Closed));
        let woken = tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("the waiting subscriber was woken")
            .unwrap();
        assert_eq!(woken.map(seq_of), Ok(1));
        // A subscription made after the close is open.
        let mut later = hub.subscribe(&channel);
        hub.deliver(&event(&channel, 2));
        assert_eq!(seq_of(later.recv().await.unwrap()), 2);
    }
}
