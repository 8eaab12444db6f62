//! Local fan-out: delivering each event to every subscriber of its channel in this process.
//!
//! Every broker uses a [`Hub`] the same way: it calls [`Hub::subscribe`] for each local
//! subscriber and [`Hub::deliver`] for each event it learns of (published here, or received
//! from Redis pub/sub, NATS, …). The hub gives each subscriber its own bounded queue, so a
//! slow subscriber never delays a fast one and never makes the process buffer without limit.
//! A subscriber whose queue is full is not cut off: the events that do not fit are dropped for
//! it, and once it has taken what was queued it is told to catch up ([`Live::Resync`]), which
//! the resume algorithm does from history, a page at a time. Nothing is skipped silently, and
//! a reader that is merely slower than a burst keeps its connection; a reader that stops
//! reading is the transports' to cut (by how long its socket stays unwritable).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use resync_protocol::Channel;
use slab::Slab;

use crate::event::EncodedEvent;

/// Locks a mutex, recovering the data if a panicking thread poisoned it: every critical
/// section here leaves its data consistent at each step, so the data stays usable.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Called with a channel when its last local subscriber leaves.
type IdleCallback = Box<dyn Fn(&Channel) + Send + Sync>;

/// Local fan-out to subscribers with bounded queues. Cloning shares the hub.
#[derive(Clone)]
pub struct Hub {
    inner: Arc<HubInner>,
}

struct HubInner {
    channels: Mutex<HashMap<Channel, Arc<Mutex<Slab<Slot>>>>>,
    queue_capacity: usize,
    on_idle: Option<IdleCallback>,
    gauges: Arc<Gauges>,
}

/// Counters shared by the hub and every queue, read without taking a lock.
#[derive(Default)]
struct Gauges {
    /// Times a subscriber's queue overflowed (each overflow counts once, until it caught up).
    overflows: AtomicU64,
    /// Subscribers whose queue has overflowed and who have not yet taken their
    /// [`Live::Resync`]: behind by more than a queue.
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

struct Slot {
    queue: Arc<Queue>,
    /// `false` once the subscription was closed: nothing more is queued for it.
    open: bool,
}

/// One subscriber's bounded queue, shared by the hub (which fills it) and the subscription.
///
/// Hand-written rather than a channel: an idle subscriber's queue is a few dozen bytes and
/// allocates nothing until its first event, where a channel allocates its slots up front,
/// and idle connections are what a real-time server holds most of.
struct Queue {
    state: Mutex<QueueState>,
    gauges: Arc<Gauges>,
}

struct QueueState {
    items: VecDeque<Live>,
    /// The subscription waiting for an item.
    waker: Option<Waker>,
    /// Why no more items will come, reported once the queued ones are taken.
    end: Option<LiveError>,
    /// Items were dropped because the queue was full: once the queued ones are taken, the
    /// subscriber is told to catch up from history.
    missed: bool,
}

/// What [`Queue::offer`] did with an item.
enum Offer {
    Queued,
    /// The queue was full: the item was dropped, and the subscriber will catch up. `true`
    /// when this began an overflow (the queue had not dropped anything since it caught up).
    Dropped(bool),
    /// The queue had already ended.
    Ended,
}

/// Queues that grew past this many slots during a burst give their memory back once drained;
/// smaller ones keep it (at most 512 bytes), so bursts do not regrow every queue each time.
const RETAINED_QUEUE_SLOTS: usize = 64;

impl Queue {
    fn new(gauges: Arc<Gauges>) -> Self {
        Self {
            state: Mutex::new(QueueState {
                items: VecDeque::new(),
                waker: None,
                end: None,
                missed: false,
            }),
            gauges,
        }
    }

    fn offer(&self, item: Live, capacity: usize) -> Offer {
        let mut state = lock(&self.state);
        if state.end.is_some() {
            return Offer::Ended;
        }
        let offer = if state.items.len() >= capacity {
            let began = !state.missed;
            if began {
                self.gauges.lagging.fetch_add(1, Ordering::Relaxed);
            }
            state.missed = true;
            Offer::Dropped(began)
        } else {
            state.items.push_back(item);
            Offer::Queued
        };
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
        offer
    }

    fn end(&self, reason: LiveError) {
        let mut state = lock(&self.state);
        if state.end.is_none() {
            state.end = Some(reason);
        }
        let waker = state.waker.take();
        drop(state);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Moves every queued item into `taken` (which must be empty) under one lock, or, with
    /// none queued, the catch-up signal or the end; `None` when there is nothing yet (the
    /// waker is registered). One lock per wake-up rather than per event: a subscriber behind
    /// a burst takes it all at once.
    fn take_all(
        &self,
        taken: &mut VecDeque<Live>,
        waker: Option<&Waker>,
    ) -> Option<Result<Live, LiveError>> {
        let mut state = lock(&self.state);
        if let Some(item) = state.items.pop_front() {
            // The drained buffer (with its room) goes back to the queue; a large one is
            // given back to the allocator instead.
            if taken.capacity() > RETAINED_QUEUE_SLOTS {
                *taken = VecDeque::new();
            }
            std::mem::swap(&mut state.items, taken);
            return Some(Ok(item));
        }
        if state.missed {
            state.missed = false;
            self.gauges.lag_ended();
            return Some(Ok(Live::Resync));
        }
        if let Some(end) = state.end {
            return Some(Err(end));
        }
        if let Some(waker) = waker {
            match &state.waker {
                Some(registered) if registered.will_wake(waker) => {}
                _ => state.waker = Some(waker.clone()),
            }
        }
        None
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        if lock(&self.state).missed {
            self.gauges.lag_ended();
        }
    }
}

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
    /// A hub whose subscribers each queue at most `queue_capacity` events (at least 1).
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
            }),
        }
    }

    /// Registers a local subscriber of `channel`.
    pub fn subscribe(&self, channel: &Channel) -> LiveSubscription {
        let queue = Arc::new(Queue::new(self.inner.gauges.clone()));
        self.inner
            .gauges
            .subscribers
            .fetch_add(1, Ordering::Relaxed);
        let mut channels = lock(&self.inner.channels);
        let slots = channels
            .entry(channel.clone())
            .or_insert_with(|| Arc::new(Mutex::new(Slab::new())))
            .clone();
        let key = lock(&slots).insert(Slot {
            queue: queue.clone(),
            open: true,
        });
        drop(channels);
        LiveSubscription {
            queue,
            taken: VecDeque::new(),
            registration: Registration {
                hub: self.inner.clone(),
                channel: channel.clone(),
                key,
            },
        }
    }

    /// Queues `event` for every local subscriber of its channel and returns how many got it.
    /// A subscriber whose queue is full misses it for now, and is told to catch up from
    /// history ([`Live::Resync`]) once it has taken what was queued.
    pub fn deliver(&self, event: &EncodedEvent) -> usize {
        let Some(slots) = lock(&self.inner.channels).get(event.channel()).cloned() else {
            return 0;
        };
        let capacity = self.inner.queue_capacity;
        let mut slots = lock(&slots);
        let mut delivered = 0;
        for (_, slot) in slots.iter_mut().filter(|(_, slot)| slot.open) {
            match slot.queue.offer(Live::Event(event.clone()), capacity) {
                Offer::Queued => delivered += 1,
                Offer::Dropped(began) => self.count_overflow(began),
                Offer::Ended => slot.open = false,
            }
        }
        delivered
    }

    fn count_overflow(&self, began: bool) {
        if began {
            self.inner.gauges.overflows.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// How many times a subscriber's queue overflowed (a burst it then caught up with from
    /// history), since the hub was made.
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
        let Some(slots) = lock(&self.inner.channels).get(channel).cloned() else {
            return;
        };
        let capacity = self.inner.queue_capacity;
        for (_, slot) in lock(&slots).iter_mut().filter(|(_, slot)| slot.open) {
            // A full queue means the subscriber catches up from history anyway.
            match slot.queue.offer(Live::Resync, capacity) {
                Offer::Queued => {}
                Offer::Dropped(began) => self.count_overflow(began),
                Offer::Ended => slot.open = false,
            }
        }
    }

    /// How many local subscribers `channel` has.
    pub fn subscriber_count(&self, channel: &Channel) -> usize {
        lock(&self.inner.channels)
            .get(channel)
            .map_or(0, |slots| lock(slots).len())
    }

    /// The channels that have at least one local subscriber.
    pub fn channels(&self) -> Vec<Channel> {
        lock(&self.inner.channels).keys().cloned().collect()
    }

    /// Ends every subscription (they see [`LiveError::Closed`] after draining their queue).
    pub fn close_all(&self) {
        for slots in lock(&self.inner.channels).values() {
            for (_, slot) in lock(slots).iter_mut() {
                slot.queue.end(LiveError::Closed);
                slot.open = false;
            }
        }
    }
}

/// Removes a subscriber from the hub when its subscription is dropped.
struct Registration {
    hub: Arc<HubInner>,
    channel: Channel,
    key: usize,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.gauges.subscribers.fetch_sub(1, Ordering::Relaxed);
        let mut channels = lock(&self.hub.channels);
        let Some(slots) = channels.get(&self.channel) else {
            return;
        };
        let now_empty = {
            let mut slots = lock(slots);
            slots.try_remove(self.key);
            slots.is_empty()
        };
        if now_empty {
            channels.remove(&self.channel);
            if let Some(on_idle) = &self.hub.on_idle {
                on_idle(&self.channel);
            }
        }
    }
}

/// The live events of one channel for one subscriber, from the moment it subscribed.
///
/// Knows nothing of history; [`crate::resume`] combines it with history into a gap-free
/// stream. Dropping it unsubscribes at once.
pub struct LiveSubscription {
    queue: Arc<Queue>,
    /// Items taken from the queue in one go, not yet handed out.
    taken: VecDeque<Live>,
    registration: Registration,
}

impl std::fmt::Debug for LiveSubscription {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("LiveSubscription")
            .field("channel", &self.registration.channel)
            .finish()
    }
}

impl LiveSubscription {
    /// The channel followed.
    pub fn channel(&self) -> &Channel {
        &self.registration.channel
    }

    /// The next live item. Queued items are delivered before a lag or close is reported.
    pub async fn recv(&mut self) -> Result<Live, LiveError> {
        std::future::poll_fn(|context| self.poll_recv(context)).await
    }

    /// Polls for the next live item; queued items come before a lag or close is reported.
    pub fn poll_recv(&mut self, context: &mut Context<'_>) -> Poll<Result<Live, LiveError>> {
        if let Some(item) = self.taken.pop_front() {
            return Poll::Ready(Ok(item));
        }
        match self.queue.take_all(&mut self.taken, Some(context.waker())) {
            Some(item) => Poll::Ready(item),
            None => Poll::Pending,
        }
    }

    /// The next live item if one is queued, without waiting.
    pub fn try_recv(&mut self) -> Option<Result<Live, LiveError>> {
        if let Some(item) = self.taken.pop_front() {
            return Some(Ok(item));
        }
        self.queue.take_all(&mut self.taken, None)
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
            data: Payload::from_json("1").unwrap(),
        })
    }

    fn seq_of(live: Live) -> u64 {
        match live {
            Live::Event(event) => event.position().seq.get(),
            Live::Resync => panic!("unexpected resync"),
        }
    }

    #[tokio::test]
    async fn a_full_queue_drops_for_the_slow_subscriber_only_and_tells_it_to_catch_up() {
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
        // The slow one gets what was queued, then is told to catch up, and stays subscribed.
        assert_eq!(seq_of(slow.recv().await.unwrap()), 1);
        assert_eq!(seq_of(slow.recv().await.unwrap()), 2);
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
        assert_eq!(seq_of(slow.recv().await.unwrap()), 1);
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
}
