//! A conformance suite that any [`Broker`] can run (feature `testing`).
//!
//! Build your broker the way you would in production, describe its limits in a
//! [`ConformanceConfig`], and call [`run_all`] from a `#[tokio::test]` (multi-threaded). Each
//! check uses its own channels (under `config.channel_prefix`), so one broker instance serves
//! all of them, and each panics with the check's name and what went wrong.
//!
//! ```no_run
//! # async fn example() {
//! use std::sync::Arc;
//! use resync_broker::conformance::{ConformanceConfig, run_all};
//! use resync_broker::{MemoryBroker, Retention};
//!
//! let broker = MemoryBroker::builder()
//!     .retention(Retention::default().with_max_events(50))
//!     .subscriber_queue(16)
//!     .build();
//! run_all(Arc::new(broker), ConformanceConfig::new(50, 16)).await;
//! # }
//! ```

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::join_all;
use resync_protocol::{
    Channel, Epoch, IdempotencyKey, Payload, Position, RecoveryOutcome, ResetReason, Seq,
};

use crate::ReadOutcome;
use crate::broker::{Broker, Publish};
use crate::hub::LiveError;
use crate::resume::{ResumeOptions, SubscriptionError, SubscriptionItem, resume};

/// How the broker under test is configured, so the checks know its limits.
#[derive(Clone, Debug)]
pub struct ConformanceConfig {
    /// The broker's history size per channel (retention by count).
    pub max_events: usize,
    /// The broker's per-subscriber queue capacity.
    pub subscriber_queue: usize,
    /// Prefix for the channels the checks use; make it unique per run when the backend keeps
    /// data between runs (e.g. a shared Redis).
    pub channel_prefix: String,
    /// How long a check waits for an expected event before failing.
    pub timeout: Duration,
}

impl ConformanceConfig {
    /// A config for a broker keeping `max_events` per channel with `subscriber_queue`-deep
    /// subscriber queues. The channel prefix is random; the timeout is 10 seconds.
    pub fn new(max_events: usize, subscriber_queue: usize) -> Self {
        Self {
            max_events,
            subscriber_queue,
            channel_prefix: format!("conformance-{}", fastrand::u32(..)),
            timeout: Duration::from_secs(10),
        }
    }

    fn channel(&self, name: &str) -> Channel {
        Channel::new(format!("{}:{name}", self.channel_prefix)).expect("prefix and name are valid")
    }
}

/// Runs every check in turn.
pub async fn run_all<B: Broker>(broker: Arc<B>, config: ConformanceConfig) {
    let broker: Arc<dyn Broker> = broker;
    publish_assigns_consecutive_seqs(&broker, &config).await;
    live_subscribers_receive_in_order(&broker, &config).await;
    history_reads_follow_the_contract(&broker, &config).await;
    idempotent_publish_is_stored_once(&broker, &config).await;
    resume_reports_each_outcome(&broker, &config).await;
    dropping_a_subscription_unsubscribes(&broker, &config).await;
    a_subscriber_behind_a_burst_catches_up_without_ending(&broker, &config).await;
    concurrent_publishers_and_resuming_subscribers_see_no_gap(&broker, &config).await;
    presence_is_one_member_per_identity(&broker, &config).await;
    user_commands_reach_every_receiver(&broker, &config).await;
    keyed_state_holds_the_latest_event_of_each_key(&broker, &config).await;
    // Last: it ends the broker's work.
    close_ends_local_subscriptions(&broker, &config).await;
}

fn payload(value: u64) -> Payload {
    Payload::from_value(&value).expect("numbers are json")
}

async fn publish_n(broker: &Arc<dyn Broker>, channel: &Channel, count: u64) -> Vec<Position> {
    let mut positions = Vec::new();
    for value in 0..count {
        let position = broker
            .publish(Publish::new(channel.clone(), payload(value)))
            .await
            .expect("publish succeeds");
        positions.push(position);
    }
    positions
}

/// Seqs count from 1 in one epoch, and `position` reports the newest.
pub async fn publish_assigns_consecutive_seqs(
    broker: &Arc<dyn Broker>,
    config: &ConformanceConfig,
) {
    let channel = config.channel("consecutive");
    let before = broker
        .position(&channel)
        .await
        .expect("position of a new channel");
    assert_eq!(
        before.seq,
        Seq::ZERO,
        "publish_assigns_consecutive_seqs: a new channel is at seq 0"
    );
    let positions = publish_n(broker, &channel, 5).await;
    for (index, position) in positions.iter().enumerate() {
        assert_eq!(
            position.seq.get(),
            index as u64 + 1,
            "publish_assigns_consecutive_seqs: seqs count from 1"
        );
        assert_eq!(
            position.epoch, before.epoch,
            "publish_assigns_consecutive_seqs: the first publish keeps the epoch position() reported"
        );
    }
    let after = broker.position(&channel).await.expect("position");
    assert_eq!(
        &after,
        positions.last().expect("five positions"),
        "publish_assigns_consecutive_seqs"
    );
}

/// A live subscription receives every later event, in order.
pub async fn live_subscribers_receive_in_order(
    broker: &Arc<dyn Broker>,
    config: &ConformanceConfig,
) {
    let channel = config.channel("live-order");
    let mut live = broker.subscribe(&channel).await.expect("subscribe");
    // Stay within the queue: this check is about order, lagging has its own.
    let positions = publish_n(broker, &channel, config.subscriber_queue.min(20) as u64).await;
    for expected in positions {
        let live_item = tokio::time::timeout(config.timeout, live.recv())
            .await
            .expect("live_subscribers_receive_in_order: event arrives in time")
            .expect("live_subscribers_receive_in_order: subscription stays open");
        let crate::Live::Event(event) = live_item else {
            panic!("live_subscribers_receive_in_order: expected an event, got {live_item:?}")
        };
        assert_eq!(
            event.position(),
            &expected,
            "live_subscribers_receive_in_order"
        );
        assert_eq!(
            event.channel(),
            &channel,
            "live_subscribers_receive_in_order"
        );
    }
}

/// History answers with events, up-to-date, or the right reset reason.
pub async fn history_reads_follow_the_contract(
    broker: &Arc<dyn Broker>,
    config: &ConformanceConfig,
) {
    let name = "history_reads_follow_the_contract";
    let channel = config.channel("history");
    let positions = publish_n(broker, &channel, 10).await;
    let epoch = positions[0].epoch.clone();
    let at = |seq: u64| Position::new(epoch.clone(), Seq::new(seq));

    match broker
        .read_since(&channel, &at(3), 100)
        .await
        .expect("read")
    {
        ReadOutcome::Replayed { events, latest } => {
            let seqs: Vec<u64> = events
                .iter()
                .map(|event| event.position().seq.get())
                .collect();
            assert_eq!(
                seqs,
                (4..=10).collect::<Vec<_>>(),
                "{name}: replay after seq 3"
            );
            assert_eq!(latest, at(10), "{name}: latest");
            assert_eq!(
                events[0].data(),
                payload(3).as_str(),
                "{name}: data survives storage"
            );
        }
        other => panic!("{name}: expected a replay, got {other:?}"),
    }
    match broker.read_since(&channel, &at(3), 2).await.expect("read") {
        ReadOutcome::Replayed { events, .. } => {
            assert_eq!(events.len(), 2, "{name}: limit is honoured")
        }
        other => panic!("{name}: expected a limited replay, got {other:?}"),
    }
    assert!(
        matches!(
            broker
                .read_since(&channel, &at(10), 100)
                .await
                .expect("read"),
            ReadOutcome::UpToDate { .. }
        ),
        "{name}: nothing after the newest seq"
    );
    let stranger = Position::start_of(Epoch::new("someOtherEpoch").expect("valid epoch"));
    assert!(
        matches!(
            broker
                .read_since(&channel, &stranger, 100)
                .await
                .expect("read"),
            ReadOutcome::Reset {
                reason: ResetReason::EpochChanged,
                ..
            }
        ),
        "{name}: another epoch is a reset"
    );
    assert!(
        matches!(
            broker
                .read_since(&channel, &at(99), 100)
                .await
                .expect("read"),
            ReadOutcome::Reset {
                reason: ResetReason::PositionAhead,
                ..
            }
        ),
        "{name}: a position ahead of the stream is a reset"
    );

    // Publish past the retention limit: the start of history is gone.
    let trimmed = config.channel("history-trimmed");
    let positions = publish_n(broker, &trimmed, config.max_events as u64 + 5).await;
    let start = Position::start_of(positions[0].epoch.clone());
    assert!(
        matches!(
            broker
                .read_since(&trimmed, &start, usize::MAX)
                .await
                .expect("read"),
            ReadOutcome::Reset {
                reason: ResetReason::Truncated,
                ..
            }
        ),
        "{name}: a position older than history is a reset"
    );
    let recent = positions[positions.len() - 3].clone();
    assert!(
        matches!(
            broker.read_since(&trimmed, &recent, 100).await.expect("read"),
            ReadOutcome::Replayed { ref events, .. } if events.len() == 2
        ),
        "{name}: recent history is still there"
    );
}

/// A repeated idempotency key stores the event once and answers with the first position.
pub async fn idempotent_publish_is_stored_once(
    broker: &Arc<dyn Broker>,
    config: &ConformanceConfig,
) {
    let name = "idempotent_publish_is_stored_once";
    let channel = config.channel("idempotent");
    let key = IdempotencyKey::new(format!("order-{}", fastrand::u64(..))).expect("valid key");
    let publish = Publish::new(channel.clone(), payload(1)).with_idempotency_key(key.clone());
    let first = broker.publish(publish.clone()).await.expect("publish");
    let again = broker.publish(publish).await.expect("publish");
    assert_eq!(
        first, again,
        "{name}: retry answers with the first position"
    );
    let other = broker
        .publish(Publish::new(channel.clone(), payload(2)))
        .await
        .expect("publish");
    assert_eq!(
        other.seq.get(),
        first.seq.get() + 1,
        "{name}: the retry took no seq"
    );
    // The same key on another channel is another event.
    let elsewhere = broker
        .publish(
            Publish::new(config.channel("idempotent-other"), payload(1)).with_idempotency_key(key),
        )
        .await
        .expect("publish");
    assert_eq!(elsewhere.seq.get(), 1, "{name}: keys are per channel");
}

async fn next_item(
    stream: &mut crate::resume::Subscription,
    config: &ConformanceConfig,
    name: &str,
) -> SubscriptionItem {
    tokio::time::timeout(config.timeout, stream.next())
        .await
        .unwrap_or_else(|_| panic!("{name}: no item within {:?}", config.timeout))
        .unwrap_or_else(|error| panic!("{name}: stream ended: {error}"))
}

fn seq_of(item: &SubscriptionItem, name: &str) -> u64 {
    match item {
        SubscriptionItem::Event(event) => event.position().seq.get(),
        SubscriptionItem::Reset { .. } | SubscriptionItem::State { .. } => {
            panic!("{name}: unexpected {item:?}")
        }
    }
}

/// `resume` reports fresh, replayed, up-to-date and reset starts, and then delivers live
/// events without duplicates.
pub async fn resume_reports_each_outcome(broker: &Arc<dyn Broker>, config: &ConformanceConfig) {
    let name = "resume_reports_each_outcome";
    let channel = config.channel("resume");
    let positions = publish_n(broker, &channel, 6).await;
    let options = ResumeOptions::default();

    let (outcome, mut fresh) = resume(broker.clone(), channel.clone(), None, options)
        .await
        .expect("resume");
    assert_eq!(
        outcome,
        RecoveryOutcome::Fresh {
            position: positions[5].clone()
        },
        "{name}: fresh"
    );

    let (outcome, mut replayed) = resume(
        broker.clone(),
        channel.clone(),
        Some(positions[2].clone()),
        options,
    )
    .await
    .expect("resume");
    assert_eq!(
        outcome,
        RecoveryOutcome::Replayed { count: 3 },
        "{name}: replayed"
    );

    let (outcome, mut current) = resume(
        broker.clone(),
        channel.clone(),
        Some(positions[5].clone()),
        options,
    )
    .await
    .expect("resume");
    assert_eq!(outcome, RecoveryOutcome::UpToDate, "{name}: up to date");

    let stale = Position::new(Epoch::new("staleEpoch").expect("valid"), Seq::new(3));
    let (outcome, _) = resume(broker.clone(), channel.clone(), Some(stale), options)
        .await
        .expect("resume");
    assert_eq!(
        outcome,
        RecoveryOutcome::Reset {
            reason: ResetReason::EpochChanged,
            position: positions[5].clone()
        },
        "{name}: reset"
    );

    let few = ResumeOptions {
        max_replay: 2,
        ..ResumeOptions::default()
    };
    let (outcome, _) = resume(
        broker.clone(),
        channel.clone(),
        Some(positions[0].clone()),
        few,
    )
    .await
    .expect("resume");
    assert!(
        matches!(
            outcome,
            RecoveryOutcome::Reset {
                reason: ResetReason::TooFarBehind,
                ..
            }
        ),
        "{name}: more missed than max_replay is a reset, got {outcome:?}"
    );

    publish_n(broker, &channel, 2).await;
    for expected in [4, 5, 6, 7, 8] {
        assert_eq!(
            seq_of(&next_item(&mut replayed, config, name).await, name),
            expected,
            "{name}: replay then live"
        );
    }
    for stream in [&mut fresh, &mut current] {
        for expected in [7, 8] {
            assert_eq!(
                seq_of(&next_item(stream, config, name).await, name),
                expected,
                "{name}: live after start"
            );
        }
    }
    assert_eq!(
        replayed.position().seq.get(),
        8,
        "{name}: position follows delivery"
    );
}

/// Dropping a subscription frees it at once.
pub async fn dropping_a_subscription_unsubscribes(
    broker: &Arc<dyn Broker>,
    config: &ConformanceConfig,
) {
    let name = "dropping_a_subscription_unsubscribes";
    let channel = config.channel("unsubscribe");
    let mut subscriptions = Vec::new();
    for _ in 0..50 {
        subscriptions.push(broker.subscribe(&channel).await.expect("subscribe"));
    }
    assert_eq!(broker.subscriber_count(&channel), 50, "{name}: counted");
    subscriptions.truncate(10);
    assert_eq!(
        broker.subscriber_count(&channel),
        10,
        "{name}: dropped ones are gone"
    );
    drop(subscriptions);
    assert_eq!(broker.subscriber_count(&channel), 0, "{name}: none left");
}

/// A subscriber that falls behind a burst bigger than its queue is not cut off: it takes what
/// was queued, catches up from history, and goes on live, every event once and in order. Its
/// live queue stays bounded meanwhile.
pub async fn a_subscriber_behind_a_burst_catches_up_without_ending(
    broker: &Arc<dyn Broker>,
    config: &ConformanceConfig,
) {
    let name = "a_subscriber_behind_a_burst_catches_up_without_ending";
    let channel = config.channel("lagging");
    let (_, mut stream) = resume(
        broker.clone(),
        channel.clone(),
        None,
        ResumeOptions::default(),
    )
    .await
    .expect("resume");
    let total = (config.subscriber_queue as u64 * 2 + 10).min(config.max_events as u64);
    assert!(
        total > config.subscriber_queue as u64,
        "{name}: needs max_events > subscriber_queue to be meaningful"
    );
    publish_n(broker, &channel, total).await;
    // Let asynchronous delivery (Redis Pub/Sub) overfill the queue before the first read.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for expected in 1..=total {
        assert_eq!(
            seq_of(&next_item(&mut stream, config, name).await, name),
            expected,
            "{name}: every event once, in order, without a cut"
        );
    }
    // And live again after catching up.
    publish_n(broker, &channel, 1).await;
    assert_eq!(
        seq_of(&next_item(&mut stream, config, name).await, name),
        total + 1,
        "{name}: live after the catch-up"
    );
    // The live queue itself stays bounded and then says to catch up.
    let mut live = broker.subscribe(&channel).await.expect("subscribe");
    publish_n(broker, &channel, config.subscriber_queue as u64 * 2 + 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = 0;
    loop {
        match tokio::time::timeout(config.timeout, live.recv()).await {
            Ok(Ok(crate::Live::Event(_))) => seen += 1,
            Ok(Ok(crate::Live::Resync)) => break,
            Ok(Err(error)) => panic!("{name}: the live queue ended: {error}"),
            Err(_) => panic!("{name}: an overfilled live queue never said to catch up"),
        }
    }
    assert!(seen <= config.subscriber_queue, "{name}: queue is bounded");
}

/// Many publishers and many subscribers that start at random positions while publishing goes
/// on: every subscriber sees one contiguous, duplicate-free run of seqs up to the end.
pub async fn concurrent_publishers_and_resuming_subscribers_see_no_gap(
    broker: &Arc<dyn Broker>,
    config: &ConformanceConfig,
) {
    let name = "concurrent_publishers_and_resuming_subscribers_see_no_gap";
    let channel = config.channel("concurrent");
    const PUBLISHERS: u64 = 4;
    let per_publisher = (config.max_events as u64 / PUBLISHERS / 2).clamp(5, 250);
    let total = PUBLISHERS * per_publisher;
    let epoch = broker.position(&channel).await.expect("position").epoch;

    let publishers = (0..PUBLISHERS).map(|publisher| {
        let broker = broker.clone();
        let channel = channel.clone();
        tokio::spawn(async move {
            for index in 0..per_publisher {
                broker
                    .publish(Publish::new(
                        channel.clone(),
                        payload(publisher * 1_000_000 + index),
                    ))
                    .await
                    .expect("publish");
                if index % 7 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    });
    let publishers: Vec<_> = publishers.collect();

    let subscribers = (0..16u64).map(|subscriber| {
        let broker = broker.clone();
        let channel = channel.clone();
        let epoch = epoch.clone();
        let timeout = config.timeout;
        tokio::spawn(async move {
            // Start at a random moment, from a random position at or behind the stream.
            tokio::time::sleep(Duration::from_millis(fastrand::u64(0..20))).await;
            let newest = broker.position(&channel).await.expect("position").seq.get();
            let since = match subscriber % 3 {
                0 => None,
                _ => Some(Position::new(
                    epoch.clone(),
                    Seq::new(fastrand::u64(0..=newest)),
                )),
            };
            let start = since.as_ref().map(|position| position.seq.get());
            let (outcome, mut stream) = resume(
                broker.clone(),
                channel.clone(),
                since,
                ResumeOptions::default(),
            )
            .await
            .expect("resume");
            let mut seqs = Vec::new();
            let mut last = match (&outcome, start) {
                (RecoveryOutcome::Fresh { position }, _) => position.seq.get(),
                (_, Some(start)) => start,
                (other, None) => panic!("unexpected outcome {other:?}"),
            };
            let first = last;
            while last < total {
                let item = tokio::time::timeout(timeout, stream.next())
                    .await
                    .unwrap_or_else(|_| panic!("subscriber {subscriber} stalled at {last}"));
                match item {
                    Ok(SubscriptionItem::Event(event)) => {
                        last = event.position().seq.get();
                        seqs.push(last);
                    }
                    Ok(
                        item @ (SubscriptionItem::Reset { .. } | SubscriptionItem::State { .. }),
                    ) => {
                        panic!("subscriber {subscriber}: unexpected {item:?}")
                    }
                    // A subscriber that fell behind resumes from its position, as a transport
                    // would make its client do; it must still see every seq exactly once.
                    Err(SubscriptionError::Lagged { position }) => {
                        stream = resume(
                            broker.clone(),
                            channel.clone(),
                            Some(position),
                            ResumeOptions::default(),
                        )
                        .await
                        .expect("resume after lag")
                        .1;
                    }
                    Err(error) => panic!("subscriber {subscriber} ended: {error}"),
                }
            }
            (first, seqs)
        })
    });
    let subscribers: Vec<_> = subscribers.collect();

    for publisher in join_all(publishers).await {
        publisher.expect("publisher task");
    }
    for (index, result) in join_all(subscribers).await.into_iter().enumerate() {
        let (first, seqs) =
            result.unwrap_or_else(|error| panic!("{name}: subscriber {index} failed: {error}"));
        let expected: Vec<u64> = (first + 1..=total).collect();
        assert_eq!(seqs, expected, "{name}: subscriber {index} from {first}");
        let unique: HashSet<u64> = seqs.iter().copied().collect();
        assert_eq!(unique.len(), seqs.len(), "{name}: no duplicates");
    }
}

/// [`Broker::close`] ends every local subscription: events already delivered to it first, then
/// [`LiveError::Closed`]; a resumed subscription ends with [`SubscriptionError::Closed`]. Run
/// last: the broker is closed afterwards.
pub async fn close_ends_local_subscriptions(broker: &Arc<dyn Broker>, config: &ConformanceConfig) {
    let name = "close_ends_local_subscriptions";
    let channel = config.channel("close");
    let mut live = broker.subscribe(&channel).await.expect("subscribe");
    let (_, mut resumed) = resume(
        broker.clone(),
        channel.clone(),
        None,
        ResumeOptions::default(),
    )
    .await
    .expect("resume");
    let position = broker
        .publish(Publish::new(channel.clone(), payload(1)))
        .await
        .expect("publish");
    let within = Duration::from_secs(5);
    // Delivered before the close (a broker over a network delivers a moment later).
    match tokio::time::timeout(within, resumed.next()).await {
        Ok(Ok(SubscriptionItem::Event(event))) => assert_eq!(event.position(), &position, "{name}"),
        other => panic!("{name}: expected the event, got {other:?}"),
    }
    broker.close().await;
    let mut ended = false;
    for _ in 0..3 {
        match tokio::time::timeout(within, live.recv()).await {
            Ok(Err(LiveError::Closed)) => {
                ended = true;
                break;
            }
            Ok(Ok(_)) => {}
            other => panic!("{name}: the live subscription did not end: {other:?}"),
        }
    }
    assert!(ended, "{name}: the live subscription ended with Closed");
    match tokio::time::timeout(within, resumed.next()).await {
        Ok(Err(SubscriptionError::Closed)) => {}
        other => panic!("{name}: the resumed subscription did not end: {other:?}"),
    }
}

/// For a broker that keeps presence: a member with two connections joins once and leaves
/// with its last connection; watchers see exactly those events, in order; the list and the
/// count agree. Skipped (it passes) for a broker without presence.
pub async fn presence_is_one_member_per_identity(
    broker: &Arc<dyn Broker>,
    config: &ConformanceConfig,
) {
    use crate::presence::PresenceEvent;
    use futures_util::StreamExt;
    use resync_protocol::Member;

    let name = "presence_is_one_member_per_identity";
    let Some(presence) = broker.presence() else {
        return;
    };
    let channel = config.channel("presence");
    let member = |id: &str| Member {
        id: id.to_owned(),
        info: Some(payload(7)),
    };
    let mut watch = presence.watch(&channel).await.expect("watch");
    let within = Duration::from_secs(5);
    assert!(
        presence
            .join(&channel, &member("ann"), "c1")
            .await
            .expect("join"),
        "{name}: first connection joins"
    );
    assert!(
        !presence
            .join(&channel, &member("ann"), "c2")
            .await
            .expect("join"),
        "{name}: a second tab is the same member"
    );
    assert!(
        presence
            .join(&channel, &member("bob"), "c3")
            .await
            .expect("join"),
        "{name}: another member"
    );
    assert_eq!(
        presence.member_count(&channel).await.expect("count"),
        2,
        "{name}: count"
    );
    let mut ids: Vec<String> = presence
        .members(&channel)
        .await
        .expect("members")
        .into_iter()
        .map(|member| member.id)
        .collect();
    ids.sort();
    assert_eq!(ids, ["ann", "bob"], "{name}: list");
    assert!(
        !presence.leave(&channel, "ann", "c1").await.expect("leave"),
        "{name}: one tab left, the member stays"
    );
    assert!(
        presence.leave(&channel, "ann", "c2").await.expect("leave"),
        "{name}: the last tab left"
    );
    let mut seen = Vec::new();
    for _ in 0..3 {
        match tokio::time::timeout(within, watch.next()).await {
            Ok(Some(Ok(event))) => seen.push(event),
            other => panic!("{name}: expected a presence event, got {other:?}"),
        }
    }
    assert_eq!(
        seen,
        [
            PresenceEvent::Join(member("ann")),
            PresenceEvent::Join(member("bob")),
            PresenceEvent::Leave(member("ann")),
        ],
        "{name}: one join per member, one leave at the last connection"
    );
    assert_eq!(
        presence.member_count(&channel).await.expect("count"),
        1,
        "{name}: bob stays"
    );
    assert!(presence.leave(&channel, "bob", "c3").await.expect("leave"));
}

/// A user command sent through the broker reaches every receiver, in order (when the broker
/// carries user commands at all).
pub async fn user_commands_reach_every_receiver(
    broker: &Arc<dyn Broker>,
    config: &ConformanceConfig,
) {
    use resync_protocol::bodies::UserCommand;

    let name = "user_commands_reach_every_receiver";
    let Some(bus) = broker.user_commands() else {
        return;
    };
    let (mut first, mut second) = (bus.receive(), bus.receive());
    let commands = [
        UserCommand::Unsubscribe {
            user: "ann".to_owned(),
            channel: config.channel("commands"),
        },
        UserCommand::Disconnect {
            user: "ann".to_owned(),
            reason: "banned".to_owned(),
            reconnect: false,
        },
    ];
    for command in &commands {
        bus.send(command)
            .await
            .unwrap_or_else(|error| panic!("{name}: send failed: {error}"));
    }
    for receiver in [&mut first, &mut second] {
        for expected in &commands {
            let received = tokio::time::timeout(config.timeout, receiver.recv())
                .await
                .unwrap_or_else(|_| panic!("{name}: no command within {:?}", config.timeout))
                .unwrap_or_else(|| panic!("{name}: the commands ended"))
                .unwrap_or_else(|error| panic!("{name}: {error}"));
            assert_eq!(&received, expected, "{name}: in order, unchanged");
        }
    }
}

/// What a reader of a keyed channel ends with: each key's latest data, from the state pages
/// read `limit` at a time and the events after the first page's position (applied only when
/// past the seq held for their key). The algorithm of the module docs of
/// [`KeyedState`](crate::KeyedState), which clients follow.
pub async fn keyed_catch_up(
    broker: &Arc<dyn Broker>,
    channel: &Channel,
    limit: usize,
) -> std::collections::BTreeMap<resync_protocol::Key, (Seq, String)> {
    // A history trimmed past the state's position meanwhile: the reader starts over.
    for _ in 0..100 {
        if let Some(state) = keyed_read(broker, channel, limit).await {
            return state;
        }
    }
    panic!("keyed catch-up: the history never reached a state's position");
}

/// One try of [`keyed_catch_up`]: `None` when the history no longer reaches the first page's
/// position.
async fn keyed_read(
    broker: &Arc<dyn Broker>,
    channel: &Channel,
    limit: usize,
) -> Option<std::collections::BTreeMap<resync_protocol::Key, (Seq, String)>> {
    let keyed = broker.keyed_state().expect("the broker keeps keyed state");
    let mut held: std::collections::BTreeMap<resync_protocol::Key, (Seq, Option<String>)> =
        std::collections::BTreeMap::new();
    let first = keyed
        .state_page(channel, None, limit)
        .await
        .expect("state page");
    let from = first.position.clone();
    let mut page = first;
    loop {
        assert!(
            page.entries.len() <= limit.max(1),
            "a page holds at most its limit"
        );
        for entry in page.entries {
            assert!(
                entry.seq <= page.position.seq,
                "a page stands at or past its entries"
            );
            held.insert(
                entry.key,
                (entry.seq, entry.data.map(|data| data.as_str().to_owned())),
            );
        }
        let Some(next) = page.next else { break };
        page = keyed
            .state_page(channel, Some(&next), limit)
            .await
            .expect("state page");
    }
    let mut since = from;
    loop {
        match broker
            .read_since(channel, &since, 1_000)
            .await
            .expect("read")
        {
            ReadOutcome::Replayed { events, .. } => {
                for event in &events {
                    if let Some(key) = event.key() {
                        let seq = event.position().seq;
                        if held.get(key).is_none_or(|(known, _)| *known < seq) {
                            let data = event.data();
                            held.insert(
                                key.clone(),
                                (seq, (data != "null").then(|| data.to_owned())),
                            );
                        }
                    }
                }
                match events.last() {
                    Some(last) => since = last.position().clone(),
                    None => break,
                }
            }
            ReadOutcome::UpToDate { .. } => break,
            _ => return None,
        }
    }
    Some(
        held.into_iter()
            .filter_map(|(key, (seq, data))| data.map(|data| (key, (seq, data))))
            .collect(),
    )
}

/// For a broker that keeps keyed state: each key holds its latest event, a `null` deletes it,
/// events carry their key through history, pages go in key order within their limit and
/// stand at or past their entries, and a reader that pages the state while publishes go on
/// ends with exactly the latest value of each key. Skipped (it passes) for a broker without
/// keyed state.
pub async fn keyed_state_holds_the_latest_event_of_each_key(
    broker: &Arc<dyn Broker>,
    config: &ConformanceConfig,
) {
    use resync_protocol::Key;
    let name = "keyed_state_holds_the_latest_event_of_each_key";
    let Some(keyed) = broker.keyed_state() else {
        return;
    };
    let channel = config.channel("keyed");
    let key = |text: &str| Key::new(text).expect("valid key");
    let publish = |key_name: &'static str, data: &'static str| {
        let broker = broker.clone();
        let channel = channel.clone();
        async move {
            broker
                .publish(
                    Publish::new(channel, Payload::from_json(data).expect("json"))
                        .with_key(Some(Key::new(key_name).expect("valid key"))),
                )
                .await
                .expect("keyed publish")
        }
    };
    publish("a", "1").await;
    publish("b", "2").await;
    publish("a", "3").await;
    publish("c", "4").await;
    let last = publish("b", "null").await;

    let first = keyed
        .state_page(&channel, None, 2)
        .await
        .expect("state page");
    assert_eq!(
        first.position, last,
        "{name}: a page stands at the channel's position"
    );
    let summary = |entries: &[crate::StateEntry]| -> Vec<(String, u64, Option<String>)> {
        entries
            .iter()
            .map(|entry| {
                (
                    entry.key.to_string(),
                    entry.seq.get(),
                    entry.data.as_ref().map(|data| data.as_str().to_owned()),
                )
            })
            .collect()
    };
    assert_eq!(
        summary(&first.entries),
        [
            ("a".to_owned(), 3, Some("3".to_owned())),
            ("b".to_owned(), 5, None)
        ],
        "{name}: the latest event of each key, a deleted one as a tombstone"
    );
    assert_eq!(first.next, Some(key("b")), "{name}: more follow");
    let second = keyed
        .state_page(&channel, Some(&key("b")), 2)
        .await
        .expect("state page");
    assert_eq!(
        summary(&second.entries),
        [("c".to_owned(), 4, Some("4".to_owned()))],
        "{name}: the page after b"
    );
    assert_eq!(second.next, None, "{name}: the last page");

    match broker
        .read_since(&channel, &Position::start_of(last.epoch.clone()), 10)
        .await
        .expect("read")
    {
        ReadOutcome::Replayed { events, .. } => {
            let keys: Vec<Option<&str>> = events
                .iter()
                .map(|event| event.key().map(Key::as_str))
                .collect();
            assert_eq!(
                keys,
                [Some("a"), Some("b"), Some("a"), Some("c"), Some("b")],
                "{name}: events keep their key in history"
            );
        }
        other => panic!("{name}: expected a replay, got {other:?}"),
    }

    // Publishes go on while a reader pages the state a key at a time.
    let busy = config.channel("keyed-busy");
    let writer = {
        let broker = broker.clone();
        let busy = busy.clone();
        tokio::spawn(async move {
            for round in 0..200u64 {
                let name = format!("k{}", round % 17);
                let data = if round % 11 == 0 {
                    Payload::from_json("null").expect("json")
                } else {
                    payload(round)
                };
                broker
                    .publish(
                        Publish::new(busy.clone(), data)
                            .with_key(Some(Key::new(&name).expect("key"))),
                    )
                    .await
                    .expect("keyed publish");
                if round % 10 == 0 {
                    tokio::task::yield_now().await;
                }
            }
        })
    };
    let mut readers = Vec::new();
    for _ in 0..5 {
        readers.push(keyed_catch_up(broker, &busy, 1).await);
        tokio::task::yield_now().await;
    }
    writer.await.expect("writer");
    // The model: the last publish of each key, unless it deleted it.
    let mut model = std::collections::BTreeMap::new();
    for round in 0..200u64 {
        let name = key(&format!("k{}", round % 17));
        if round % 11 == 0 {
            model.remove(&name);
        } else {
            model.insert(name, payload(round).as_str().to_owned());
        }
    }
    let caught_up = keyed_catch_up(broker, &busy, 3).await;
    let values: std::collections::BTreeMap<_, _> = caught_up
        .into_iter()
        .map(|(key, (_, data))| (key, data))
        .collect();
    assert_eq!(
        values, model,
        "{name}: a reader ends with the latest value of each key"
    );
    // Readers during the publishes held a consistent state of some moment: every value they
    // hold was published for that key.
    // The writer was alone on the channel: publish `round` got seq `round + 1`, so every
    // value held is the one published for its key at its seq, never another key's or a stale
    // mix.
    for reader in readers {
        for (key_name, (seq, data)) in reader {
            let round = seq.get() - 1;
            assert_eq!(
                key_name.as_str(),
                format!("k{}", round % 17),
                "{name}: {key_name} holds another key's event (seq {seq:?})"
            );
            assert_eq!(
                data,
                payload(round).as_str(),
                "{name}: {key_name} at seq {seq:?} holds other data"
            );
        }
    }
}
