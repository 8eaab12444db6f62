//! The resume algorithm repairs what brokers get wrong: lost live messages are filled from
//! history, and a history that restarts in a new epoch is reported as a reset.

#![allow(
    clippy::unwrap_used,
    reason = "test helpers fail the test loudly on any error"
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use resync_broker::{
    Broker, EncodedEvent, HistoryRead, Hub, LiveSubscription, MemoryBroker, Publish, ReadOutcome,
    Result, ResumeOptions, Retention, SubscriptionItem, resume,
};
use resync_protocol::{Channel, Payload, Position, RecoveryOutcome, ResetReason, Seq};

/// Stores every event in a real memory broker, but delivers only some of them live, as a
/// pub/sub system that drops messages would.
struct LossyBroker {
    store: MemoryBroker,
    hub: Hub,
    /// Publish number `n` (from 1) is delivered live when `deliver[(n - 1) % len]` is true.
    deliver: Vec<bool>,
    retention: Retention,
    published: Mutex<u64>,
    swapped_store: Mutex<Option<MemoryBroker>>,
    /// How long each history read takes, in milliseconds.
    read_delay_ms: AtomicU64,
    reads: AtomicU64,
    /// The largest `limit` a history read asked for.
    largest_read: AtomicU64,
}

impl LossyBroker {
    /// Delivers one publish in `deliver_one_in` live (the last of each run of that many).
    fn new(deliver_one_in: u64) -> Self {
        let pattern = if deliver_one_in > 10_000 {
            vec![false]
        } else {
            let mut pattern = vec![false; deliver_one_in as usize - 1];
            pattern.push(true);
            pattern
        };
        Self::with_pattern(pattern, Retention::default())
    }

    /// Delivers live by `pattern`, and keeps history by `retention`.
    fn with_pattern(deliver: Vec<bool>, retention: Retention) -> Self {
        Self {
            store: MemoryBroker::builder().retention(retention).build(),
            hub: Hub::new(4_096),
            deliver,
            retention,
            published: Mutex::new(0),
            swapped_store: Mutex::new(None),
            read_delay_ms: AtomicU64::new(0),
            reads: AtomicU64::new(0),
            largest_read: AtomicU64::new(0),
        }
    }

    /// The broker whose history is current: after `restart`, a fresh one (new epochs).
    fn current(&self) -> MemoryBroker {
        self.swapped_store
            .lock()
            .unwrap()
            .clone()
            .unwrap_or_else(|| self.store.clone())
    }

    fn restart(&self) {
        *self.swapped_store.lock().unwrap() =
            Some(MemoryBroker::builder().retention(self.retention).build());
    }
}

impl LossyBroker {
    /// Publishes and delivers live whatever the pattern says: a subscriber must see a last
    /// event to learn of the dropped ones before it.
    fn publish_delivered(&self, publish: Publish) -> Result<Position> {
        self.publish_with(publish, true)
    }

    fn publish_with(&self, publish: Publish, force_live: bool) -> Result<Position> {
        // One publish at a time, so live delivery keeps seq order as the trait requires.
        let mut published = self.published.lock().unwrap();
        let channel = publish.channel.clone();
        let store = self.current();
        let position = futures_lite_block_on(store.publish(publish))?;
        *published += 1;
        let live = self.deliver[((*published - 1) % self.deliver.len() as u64) as usize];
        if live || force_live {
            let before = Position::new(position.epoch.clone(), Seq::new(position.seq.get() - 1));
            if let ReadOutcome::Replayed { events, .. } =
                futures_lite_block_on(store.read_since(&channel, &before, 1))?
            {
                for event in &events {
                    self.hub.deliver(event);
                }
            }
        }
        Ok(position)
    }
}

#[async_trait]
impl Broker for LossyBroker {
    async fn publish(&self, publish: Publish) -> Result<Position> {
        self.publish_with(publish, false)
    }

    async fn subscribe(&self, channel: &Channel) -> Result<LiveSubscription> {
        Ok(self.hub.subscribe(channel))
    }

    async fn read_since(
        &self,
        channel: &Channel,
        since: &Position,
        limit: usize,
    ) -> Result<HistoryRead> {
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.largest_read.fetch_max(limit as u64, Ordering::SeqCst);
        let delay = self.read_delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.current().read_since(channel, since, limit).await
    }

    async fn position(&self, channel: &Channel) -> Result<Position> {
        self.current().position(channel).await
    }

    fn subscriber_count(&self, channel: &Channel) -> usize {
        self.hub.subscriber_count(channel)
    }

    async fn health(&self) -> Result<()> {
        Ok(())
    }
}

/// The memory broker never actually awaits, so its futures complete on the first poll; this
/// lets the lossy wrapper call it while holding a std mutex.
fn futures_lite_block_on<F: std::future::Future>(future: F) -> F::Output {
    let waker = std::task::Waker::noop();
    let mut context = std::task::Context::from_waker(waker);
    let mut future = std::pin::pin!(future);
    match future.as_mut().poll(&mut context) {
        std::task::Poll::Ready(output) => output,
        std::task::Poll::Pending => panic!("memory broker futures complete at once"),
    }
}

fn payload(value: u64) -> Payload {
    Payload::from_value(&value).unwrap()
}

/// Follows `channel` from now.
async fn follow_from_now(
    broker: &Arc<dyn Broker>,
    channel: &Channel,
) -> resync_broker::Subscription {
    let (_, stream) = resume(
        broker.clone(),
        channel.clone(),
        None,
        ResumeOptions::default(),
    )
    .await
    .unwrap();
    stream
}

async fn next_event_seq(stream: &mut resync_broker::Subscription) -> u64 {
    match tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
    {
        SubscriptionItem::Event(event) => event.position().seq.get(),
        other @ (SubscriptionItem::Reset { .. } | SubscriptionItem::State { .. }) => {
            panic!("expected an event, got {other:?}")
        }
    }
}

#[tokio::test]
async fn lost_live_messages_are_filled_from_history() {
    let lossy = Arc::new(LossyBroker::new(5));
    let broker: Arc<dyn Broker> = lossy.clone();
    let channel = Channel::new("lossy").unwrap();
    let mut stream = follow_from_now(&broker, &channel).await;
    for value in 0..100 {
        broker
            .publish(Publish::new(channel.clone(), payload(value)))
            .await
            .unwrap();
    }
    // Only every fifth event was delivered live, yet the stream has all hundred, in order.
    for expected in 1..=100 {
        assert_eq!(next_event_seq(&mut stream).await, expected);
    }
}

#[tokio::test]
async fn a_gap_repair_survives_a_cancelled_wait() {
    let lossy = Arc::new(LossyBroker::new(5));
    let broker: Arc<dyn Broker> = lossy.clone();
    let channel = Channel::new("slow-history").unwrap();
    let mut stream = follow_from_now(&broker, &channel).await;
    lossy.read_delay_ms.store(300, Ordering::SeqCst);
    for value in 1..=5 {
        broker
            .publish(Publish::new(channel.clone(), payload(value)))
            .await
            .unwrap();
    }
    // Only event 5 came live; the wait gives up while history is still being read, as a
    // transport's select! does when another branch wins.
    let cancelled = tokio::time::timeout(Duration::from_millis(50), stream.next()).await;
    assert!(cancelled.is_err(), "the history read was still in flight");
    assert_eq!(lossy.reads.load(Ordering::SeqCst), 1);
    // Nothing more is published, yet the next waits deliver the whole gap and the event.
    for expected in 1..=5 {
        assert_eq!(next_event_seq(&mut stream).await, expected);
    }
    assert_eq!(
        lossy.reads.load(Ordering::SeqCst),
        1,
        "the read in flight was kept, not restarted"
    );
}

#[tokio::test]
async fn a_new_epoch_mid_stream_is_a_reset_then_the_new_history() {
    let lossy = Arc::new(LossyBroker::new(1));
    let broker: Arc<dyn Broker> = lossy.clone();
    let channel = Channel::new("restarting").unwrap();
    let mut stream = follow_from_now(&broker, &channel).await;
    broker
        .publish(Publish::new(channel.clone(), payload(1)))
        .await
        .unwrap();
    assert_eq!(next_event_seq(&mut stream).await, 1);
    let old_epoch = stream.position().epoch.clone();

    lossy.restart();
    let first_new = broker
        .publish(Publish::new(channel.clone(), payload(2)))
        .await
        .unwrap();
    assert_ne!(
        first_new.epoch, old_epoch,
        "a restarted memory broker picks a new epoch"
    );
    match tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
    {
        SubscriptionItem::Reset { reason, position } => {
            assert_eq!(reason, ResetReason::EpochChanged);
            assert_eq!(position, Position::start_of(first_new.epoch.clone()));
        }
        other @ (SubscriptionItem::Event(_) | SubscriptionItem::State { .. }) => {
            panic!("expected a reset, got {other:?}")
        }
    }
    assert_eq!(next_event_seq(&mut stream).await, 1);
    assert_eq!(stream.position(), &first_new);

    // A client coming back with the old position is told the same.
    let (outcome, _) = resume(
        broker.clone(),
        channel,
        Some(Position::new(old_epoch, Seq::new(1))),
        ResumeOptions::default(),
    )
    .await
    .unwrap();
    assert!(matches!(
        outcome,
        RecoveryOutcome::Reset {
            reason: ResetReason::EpochChanged,
            ..
        }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lossy_delivery_with_concurrent_publishers_and_resumers_has_no_gap() {
    let lossy = Arc::new(LossyBroker::new(3));
    let broker: Arc<dyn Broker> = lossy.clone();
    let channel = Channel::new("lossy-concurrent").unwrap();
    let total = 600u64;
    let publishers: Vec<_> = (0..3)
        .map(|_| {
            let broker = broker.clone();
            let channel = channel.clone();
            tokio::spawn(async move {
                for value in 0..total / 3 {
                    broker
                        .publish(Publish::new(channel.clone(), payload(value)))
                        .await
                        .unwrap();
                    tokio::task::yield_now().await;
                }
            })
        })
        .collect();
    let subscribers: Vec<_> = (0..8)
        .map(|index| {
            let broker = broker.clone();
            let channel = channel.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(index * 2)).await;
                let now = broker.position(&channel).await.unwrap();
                let since = Position::new(
                    now.epoch.clone(),
                    Seq::new(fastrand::u64(0..=now.seq.get())),
                );
                let first = since.seq.get();
                let (_, mut stream) =
                    resume(broker, channel, Some(since), ResumeOptions::default())
                        .await
                        .unwrap();
                let mut seqs = Vec::new();
                while seqs.last().copied().unwrap_or(first) < total {
                    seqs.push(next_event_seq(&mut stream).await);
                }
                (first, seqs)
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    for subscriber in subscribers {
        let (first, seqs) = subscriber.await.unwrap();
        assert_eq!(seqs, (first + 1..=total).collect::<Vec<_>>());
    }
}

#[tokio::test]
async fn events_round_trip_through_the_shared_encoding() {
    let broker = MemoryBroker::default();
    let channel = Channel::new("encoding").unwrap();
    let mut live = broker.subscribe(&channel).await.unwrap();
    broker
        .publish(Publish::new(
            channel.clone(),
            Payload::from_json(r#"{"a":[1,2,"three"]}"#).unwrap(),
        ))
        .await
        .unwrap();
    let resync_broker::Live::Event(event) = live.recv().await.unwrap() else {
        panic!("expected an event")
    };
    let event: EncodedEvent = event;
    let frame: serde_json::Value = serde_json::from_slice(event.frame()).unwrap();
    assert_eq!(frame["type"], "event");
    assert_eq!(frame["data"]["a"][2], "three");
}

#[tokio::test]
async fn defect_8_11_a_long_replay_is_read_a_page_at_a_time_with_no_gap() {
    // Every event stored, none delivered live: resumes and repairs must come from history.
    let lossy = Arc::new(LossyBroker::new(u64::MAX));
    let broker: Arc<dyn Broker> = lossy.clone();
    let channel = Channel::new("paged").unwrap();
    let first = broker
        .publish(Publish::new(channel.clone(), payload(0)))
        .await
        .unwrap();
    for value in 1..1_000 {
        broker
            .publish(Publish::new(channel.clone(), payload(value)))
            .await
            .unwrap();
    }
    let since = Position::start_of(first.epoch.clone());
    let (outcome, mut stream) = resume(
        broker.clone(),
        channel.clone(),
        Some(since.clone()),
        ResumeOptions::default(),
    )
    .await
    .unwrap();
    assert_eq!(outcome, RecoveryOutcome::Replayed { count: 1_000 });
    for expected in 1..=1_000 {
        assert_eq!(next_event_seq(&mut stream).await, expected);
    }
    assert!(
        lossy.largest_read.load(Ordering::SeqCst) <= resync_broker::REPLAY_PAGE as u64,
        "one read asked for {} events",
        lossy.largest_read.load(Ordering::SeqCst)
    );
    assert!(
        lossy.reads.load(Ordering::SeqCst) >= 4,
        "1,000 events in pages"
    );

    // Too far behind is decided from the newest position, without reading everything.
    let (outcome, _) = resume(
        broker.clone(),
        channel.clone(),
        Some(since),
        ResumeOptions {
            max_replay: 999,
            ..ResumeOptions::default()
        },
    )
    .await
    .unwrap();
    assert!(
        matches!(
            outcome,
            RecoveryOutcome::Reset {
                reason: ResetReason::TooFarBehind,
                ..
            }
        ),
        "{outcome:?}"
    );
}

#[tokio::test]
async fn a_gap_longer_than_a_page_is_filled_in_order() {
    // One event in 700 delivered live: the first live one opens a gap of 699.
    let lossy = Arc::new(LossyBroker::new(700));
    let broker: Arc<dyn Broker> = lossy.clone();
    let channel = Channel::new("wide-gap").unwrap();
    let mut stream = follow_from_now(&broker, &channel).await;
    for value in 0..1_400 {
        broker
            .publish(Publish::new(channel.clone(), payload(value)))
            .await
            .unwrap();
    }
    for expected in 1..=1_400 {
        assert_eq!(next_event_seq(&mut stream).await, expected);
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 96, ..Default::default() })]

    /// Whatever a lossy broker drops, however short its history and wherever its epoch
    /// restarts, a resumed subscription yields a contiguous run of seqs from its outcome's
    /// position, where every break is a reset that says where the new run starts, and it
    /// reaches the channel's newest position.
    #[test]
    fn a_resumed_subscription_is_contiguous_runs_joined_by_resets(
        pattern in proptest::collection::vec(proptest::bool::ANY, 1..8),
        max_events in 2usize..40,
        before in 0u64..30,
        resume_at in proptest::option::of(0u64..30),
        publishes in 0u64..120,
        restarts in proptest::collection::vec(0u64..120, 0..3),
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        runtime.block_on(async move {
            let lossy = Arc::new(LossyBroker::with_pattern(
                pattern,
                Retention::default().with_max_events(max_events),
            ));
            let broker: Arc<dyn Broker> = lossy.clone();
            let channel = Channel::new("prop").unwrap();
            let mut positions = vec![lossy.current().position(&channel).await.unwrap()];
            for value in 0..before {
                positions.push(broker.publish(Publish::new(channel.clone(), payload(value))).await.unwrap());
            }
            let since = resume_at.map(|at| positions[(at as usize).min(positions.len() - 1)].clone());
            let (outcome, mut stream) =
                resume(broker.clone(), channel.clone(), since.clone(), ResumeOptions::default())
                    .await
                    .unwrap();
            let mut at = match &outcome {
                RecoveryOutcome::Fresh { position } | RecoveryOutcome::Reset { position, .. } | RecoveryOutcome::State { position } => position.clone(),
                RecoveryOutcome::Replayed { .. } | RecoveryOutcome::UpToDate => since.clone().unwrap(),
            };
            for value in 0..publishes {
                if restarts.contains(&value) {
                    lossy.restart();
                }
                broker.publish(Publish::new(channel.clone(), payload(value))).await.unwrap();
            }
            let newest = lossy.publish_delivered(Publish::new(channel.clone(), payload(0))).unwrap();
            while at != newest {
                let item = tokio::time::timeout(Duration::from_secs(5), stream.next())
                    .await
                    .unwrap_or_else(|_| panic!("stuck at {at:?}, newest {newest:?}"))
                    .unwrap();
                match item {
                    SubscriptionItem::Event(event) => {
                        assert_eq!(event.position().epoch, at.epoch, "an event from another epoch without a reset");
                        assert_eq!(Some(event.position().seq), at.seq.next(), "a gap or a duplicate after {at:?}");
                        at = event.position().clone();
                    }
                    SubscriptionItem::Reset { position, .. } => at = position,
                    other @ SubscriptionItem::State { .. } => panic!("not a keyed channel: {other:?}"),
                }
            }
        });
    }
}
