//! What bounds the store: expired channels are forgotten, the channel count has a limit,
//! and memory holds only a budget of recent events while the disk serves the rest.

use std::time::Duration;

use resync_broker::{Broker, Error, Publish, ReadOutcome, Retention};
use resync_broker_disk::DiskBroker;
use resync_protocol::{Channel, Payload, Position, ResetReason};

fn channel(name: &str) -> Channel {
    Channel::new(name).expect("valid channel")
}

fn payload(value: u64) -> Payload {
    Payload::from_value(&value).expect("json")
}

/// The seqs and data a reader of `name` at `since` is replayed (empty when up to date), or
/// the reset it gets.
async fn replayed(
    broker: &DiskBroker,
    name: &str,
    since: &Position,
) -> Result<Vec<(u64, String)>, ResetReason> {
    match broker
        .read_since(&channel(name), since, 10_000)
        .await
        .expect("read")
    {
        ReadOutcome::Replayed { events, .. } => Ok(events
            .iter()
            .map(|event| (event.position().seq.get(), event.data().to_owned()))
            .collect()),
        ReadOutcome::UpToDate { .. } => Ok(Vec::new()),
        ReadOutcome::Reset { reason, .. } => Err(reason),
    }
}

fn seqs(events: &[(u64, String)]) -> Vec<u64> {
    events.iter().map(|(seq, _)| *seq).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_idle_channel_is_forgotten_and_its_old_clients_are_reset() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = DiskBroker::builder(dir.path())
        .retention(Retention::default().with_max_age(Some(Duration::ZERO)))
        .open()
        .expect("opens");
    let old = broker
        .publish(Publish::new(channel("gone"), payload(1)))
        .await
        .expect("publish");
    assert_eq!(broker.channel_count(), 1);
    // Drop it from memory (as an idle channel is), then sweep until its one event, past an
    // age of zero, has expired and the channel is forgotten.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while broker.channel_count() > 0 {
        assert!(std::time::Instant::now() < deadline, "never forgotten");
        broker.sweep_now(100).expect("sweeps");
        tokio::task::yield_now().await;
    }
    assert_eq!(broker.history_bytes(), 0);
    let now = broker.position(&channel("gone")).await.expect("position");
    assert_ne!(
        now.epoch, old.epoch,
        "a forgotten channel's seqs are never reused in its epoch"
    );
    assert_eq!(
        replayed(&broker, "gone", &old).await,
        Err(ResetReason::EpochChanged)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_channel_count_is_bounded_and_clients_get_half() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = DiskBroker::builder(dir.path())
        .max_channels(4)
        .open()
        .expect("opens");
    for n in 0..2 {
        broker
            .publish(Publish::new(channel(&format!("client:{n}")), payload(n)).from_client())
            .await
            .expect("within the clients' half");
    }
    let refused = broker
        .publish(Publish::new(channel("client:2"), payload(2)).from_client())
        .await;
    assert!(
        matches!(refused, Err(Error::TooManyChannels { limit: 2 })),
        "{refused:?}"
    );
    for n in 0..2 {
        broker
            .publish(Publish::new(channel(&format!("app:{n}")), payload(n)))
            .await
            .expect("the application's own half");
    }
    let refused = broker
        .publish(Publish::new(channel("app:2"), payload(2)))
        .await;
    assert!(
        matches!(refused, Err(Error::TooManyChannels { limit: 4 })),
        "{refused:?}"
    );
    // A channel already stored takes more events.
    broker
        .publish(Publish::new(channel("app:0"), payload(3)))
        .await
        .expect("an existing channel");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_memory_budget_resumes_are_served_from_the_disk_alike() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = DiskBroker::builder(dir.path())
        .max_recent_bytes(4 * 1024)
        .open()
        .expect("opens");
    let mut positions: Vec<Position> = Vec::new();
    for n in 0..200 {
        for name in ["a", "b"] {
            let position = broker
                .publish(Publish::new(channel(name), payload(n)))
                .await
                .expect("publish");
            if name == "a" {
                positions.push(position);
            }
        }
    }
    for back in [1, 10, 150] {
        let since = &positions[199 - back];
        let events = replayed(&broker, "a", since).await.expect("a replay");
        let first = since.seq.get() + 1;
        assert_eq!(
            seqs(&events),
            (first..=200).collect::<Vec<_>>(),
            "{back} back"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resumes_from_the_disk_are_exact_across_pages_and_after_trimming() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = DiskBroker::builder(dir.path())
        .retention(Retention::default().with_max_events(500))
        .recent_in_memory(8, 64 * 1024)
        .max_page_bytes(1024 * 1024)
        .open()
        .expect("opens");
    let mut positions: Vec<Position> = Vec::new();
    for n in 0..600 {
        positions.push(
            broker
                .publish(Publish::new(channel("paged"), payload(n)))
                .await
                .expect("publish"),
        );
    }
    // The oldest kept is seq 101: a reader at 100 is replayed from it, one at 99 is not.
    for (since, expected_first) in [
        (100u64, Some(101u64)),
        (150, Some(151)),
        (150, Some(151)),
        (383, Some(384)),
        (99, None),
    ] {
        let position = &positions[since as usize - 1];
        match (replayed(&broker, "paged", position).await, expected_first) {
            (Ok(events), Some(first)) => {
                assert_eq!(
                    seqs(&events),
                    (first..=600).collect::<Vec<_>>(),
                    "from {since}"
                );
                assert_eq!(
                    events[0].1,
                    (first - 1).to_string(),
                    "the event's own data, from {since}"
                );
            }
            (outcome, expected) => {
                assert_eq!(
                    (outcome, expected),
                    (Err(ResetReason::Truncated), None),
                    "from {since}"
                );
            }
        }
    }
}
