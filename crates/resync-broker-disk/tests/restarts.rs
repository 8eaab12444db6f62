//! What a restart keeps: a clean close and a killed process resume with no reset; a power
//! cut that may have taken acknowledged publishes turns into resets, never into reused seqs.

use std::path::Path;

use resync_broker::{Broker, Publish, ReadOutcome};
use resync_broker_disk::{DiskBroker, Durability, OpenError};
use resync_protocol::{Channel, IdempotencyKey, Payload, Position, ResetReason, Seq};

fn open(dir: &Path, boot: &str) -> DiskBroker {
    DiskBroker::builder(dir)
        .boot_id(boot)
        .recent_in_memory(8, 64 * 1024)
        .open()
        .expect("the store opens")
}

fn channel() -> Channel {
    Channel::new("orders:1").expect("valid channel")
}

async fn publish(broker: &DiskBroker, value: u64) -> Position {
    broker
        .publish(Publish::new(
            channel(),
            Payload::from_value(&value).expect("json"),
        ))
        .await
        .expect("publish succeeds")
}

async fn publish_many(broker: &DiskBroker, count: u64) -> Vec<Position> {
    let mut positions = Vec::new();
    for value in 0..count {
        positions.push(publish(broker, value).await);
    }
    positions
}

/// The seqs and data a reader at `since` gets, or the reset it gets.
async fn read(broker: &DiskBroker, since: &Position) -> Result<Vec<(u64, String)>, ResetReason> {
    match broker
        .read_since(&channel(), since, 10_000)
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_restart_resumes_from_the_disk_with_no_reset() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (seen, last) = {
        let broker = open(dir.path(), "boot-1");
        let positions = publish_many(&broker, 100).await;
        let key = IdempotencyKey::new("order-100").expect("valid key");
        broker
            .publish(
                Publish::new(channel(), Payload::from_value(&100).expect("json"))
                    .with_idempotency_key(key),
            )
            .await
            .expect("keyed publish");
        broker.close().await;
        (positions[9].clone(), positions[99].clone())
    };
    let broker = open(dir.path(), "boot-1");
    assert_eq!(
        broker.position(&channel()).await.expect("position").seq,
        Seq::new(101)
    );
    // 91 events back: more than the 8 kept in memory, so they come from the disk.
    let replay = read(&broker, &seen).await.expect("a replay, not a reset");
    let seqs: Vec<u64> = replay.iter().map(|(seq, _)| *seq).collect();
    assert_eq!(seqs, (11..=101).collect::<Vec<_>>());
    assert_eq!(replay[0].1, "10");
    // The idempotency key outlived the process: a retry stores nothing.
    let key = IdempotencyKey::new("order-100").expect("valid key");
    let again = broker
        .publish(
            Publish::new(channel(), Payload::from_value(&100).expect("json"))
                .with_idempotency_key(key),
        )
        .await
        .expect("keyed retry");
    assert_eq!(again.seq, Seq::new(101));
    // Publishing goes on in the same epoch.
    let next = publish(&broker, 101).await;
    assert_eq!((next.epoch, next.seq), (last.epoch, Seq::new(102)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_process_on_a_live_machine_loses_nothing_and_resets_no_one() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let seen = {
        let broker = open(dir.path(), "boot-1");
        let positions = publish_many(&broker, 50).await;
        // Dropped without close: what a kill leaves (the files as written, no clean mark).
        drop(broker);
        positions[19].clone()
    };
    let broker = open(dir.path(), "boot-1");
    let replay = read(&broker, &seen).await.expect("a replay, not a reset");
    assert_eq!(replay.first().map(|(seq, _)| *seq), Some(21));
    assert_eq!(replay.len(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_power_cut_every_client_of_a_written_channel_is_reset_never_fed_reused_seqs() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (seen, newest) = {
        let broker = DiskBroker::builder(dir.path())
            .boot_id("boot-1")
            .durability(Durability::EverySecond)
            .open()
            .expect("opens");
        let positions = publish_many(&broker, 30).await;
        drop(broker);
        (positions[9].clone(), positions[29].clone())
    };
    // The machine came back in another boot: the store cannot know what the cut took.
    let broker = open(dir.path(), "boot-2");
    let after = publish(&broker, 30).await;
    assert_ne!(
        after.epoch, newest.epoch,
        "a new epoch, not seq 31 of the old one"
    );
    assert_eq!(read(&broker, &seen).await, Err(ResetReason::EpochChanged));
    assert_eq!(read(&broker, &newest).await, Err(ResetReason::EpochChanged));
    // A channel never published before the cut starts in a new shared epoch too.
    let fresh = broker
        .position(&Channel::new("never:published").expect("valid"))
        .await
        .expect("position");
    assert_ne!(fresh.epoch, newest.epoch);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_always_a_power_cut_resets_no_one() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let seen = {
        let broker = DiskBroker::builder(dir.path())
            .boot_id("boot-1")
            .durability(Durability::Always)
            .open()
            .expect("opens");
        let positions = publish_many(&broker, 30).await;
        drop(broker);
        positions[9].clone()
    };
    // Everything acknowledged was synced before it was acknowledged.
    let broker = open(dir.path(), "boot-2");
    assert_eq!(
        read(&broker, &seen).await.map(|events| events.len()),
        Ok(20)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_on_the_same_data_directory_is_refused_plainly() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let _first = open(dir.path(), "boot-1");
    let second = DiskBroker::builder(dir.path()).open();
    let error = second.expect_err("one process per data directory");
    assert!(matches!(error, OpenError::InUse { .. }), "{error:?}");
    assert!(
        error.to_string().contains("in use by another process"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_past_its_count_is_trimmed_on_the_disk_and_readers_behind_it_are_told() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = DiskBroker::builder(dir.path())
        .retention(resync_broker::Retention::default().with_max_events(20))
        .recent_in_memory(4, 64 * 1024)
        .open()
        .expect("opens");
    let positions = publish_many(&broker, 60).await;
    assert_eq!(
        read(&broker, &positions[10]).await,
        Err(ResetReason::Truncated)
    );
    let replay = read(&broker, &positions[39])
        .await
        .expect("within the history");
    assert_eq!(replay.len(), 20);
    let bytes = broker.history_bytes();
    broker.close().await;
    drop(broker);
    // The store's byte count survives the restart, from the channels' metadata alone.
    let broker = open(dir.path(), "boot-1");
    assert_eq!(broker.history_bytes(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_or_restored_data_directory_resets_its_clients_even_after_a_clean_close() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let original = dir.path().join("original");
    let seen = {
        let broker = open(&original, "boot-1");
        let positions = publish_many(&broker, 10).await;
        broker.close().await;
        positions[9].clone()
    };
    // A backup taken now, restored later: clients may have seen events published after it.
    let restored = dir.path().join("restored");
    copy_tree(&original, &restored);
    let broker = open(&restored, "boot-1");
    assert_eq!(read(&broker, &seen).await, Err(ResetReason::EpochChanged));
    drop(broker);
    // The original, where it was, resumes as before.
    let broker = open(&original, "boot-1");
    assert_eq!(read(&broker, &seen).await, Ok(Vec::new()));
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("a directory");
    for entry in std::fs::read_dir(from).expect("readable") {
        let entry = entry.expect("an entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copied");
        }
    }
}

/// Group commit and close: publishes in flight when the broker closes are each answered
/// (none hangs), and every one acknowledged is there after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_always_publishes_racing_a_close_are_all_answered_and_the_acknowledged_kept() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let broker = DiskBroker::builder(dir.path())
        .durability(Durability::Always)
        .open()
        .expect("opens");
    let publishers: Vec<_> = (0..16u64)
        .map(|publisher| {
            let broker = broker.clone();
            tokio::spawn(async move {
                let mut acknowledged = Vec::new();
                for n in 0..1_000u64 {
                    let channel =
                        Channel::new(format!("race:{}", (publisher + n) % 4)).expect("valid");
                    let sent = broker.publish(Publish::new(
                        channel.clone(),
                        Payload::from_value(&n).expect("json"),
                    ));
                    match tokio::time::timeout(std::time::Duration::from_secs(30), sent).await {
                        Ok(Ok(position)) => acknowledged.push((channel, position)),
                        Ok(Err(_)) => break,
                        Err(_) => panic!("a publish was never answered"),
                    }
                }
                acknowledged
            })
        })
        .collect();
    // Close once the publishers are under way.
    while broker.history_bytes() < 10_000 {
        tokio::task::yield_now().await;
    }
    broker.close().await;
    let mut acknowledged = Vec::new();
    for publisher in publishers {
        acknowledged.extend(publisher.await.expect("a publisher finishes"));
    }
    assert!(!acknowledged.is_empty());
    drop(broker);
    let broker = open(dir.path(), "boot-1");
    for (channel, position) in acknowledged {
        let now = broker.position(&channel).await.expect("position");
        assert_eq!(now.epoch, position.epoch);
        assert!(
            now.seq >= position.seq,
            "{channel}: acknowledged {position:?}, stored up to {now:?}"
        );
    }
}

/// A backup restored over the directory itself (its directories kept, as `rsync --delete`
/// or a restore tool does), after more was published since the backup: its clients reset.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_restored_over_the_same_directory_resets_its_clients() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().join("data");
    let backup = dir.path().join("backup");
    {
        let broker = open(&data, "boot-1");
        publish_many(&broker, 10).await;
        broker.close().await;
    }
    copy_tree(&data, &backup);
    let seen = {
        let broker = open(&data, "boot-1");
        let positions = publish_many(&broker, 10).await;
        broker.close().await;
        positions[9].clone()
    };
    restore_over(&backup, &data);
    let broker = open(&data, "boot-1");
    assert_eq!(read(&broker, &seen).await, Err(ResetReason::EpochChanged));
    let next = publish(&broker, 99).await;
    assert_ne!(
        next.epoch, seen.epoch,
        "the seqs after the backup are never given out again"
    );
}

/// Empties `to`'s files, keeping its directories, and copies `from`'s files into them.
fn restore_over(from: &Path, to: &Path) {
    fn clear(path: &Path) {
        for entry in std::fs::read_dir(path).expect("readable") {
            let entry = entry.expect("an entry");
            if entry.file_type().expect("a type").is_dir() {
                clear(&entry.path());
            } else {
                std::fs::remove_file(entry.path()).expect("removed");
            }
        }
    }
    clear(to);
    copy_tree(from, to);
}

/// A keyed publish of `data` (JSON text) for `key` on `channel`.
async fn publish_keyed(broker: &DiskBroker, channel: &Channel, key: &str, data: &str) -> Position {
    broker
        .publish(
            Publish::new(channel.clone(), Payload::from_json(data).expect("json"))
                .with_key(Some(resync_protocol::Key::new(key).expect("valid key"))),
        )
        .await
        .expect("keyed publish")
}

/// The values of a keyed channel's state: key to data, deleted keys left out.
async fn state_of(broker: &DiskBroker, channel: &Channel) -> Vec<(String, u64, String)> {
    use resync_broker::KeyedState;
    let mut values = Vec::new();
    let mut after = None;
    loop {
        let page = broker
            .state_page(channel, after.as_ref(), 3)
            .await
            .expect("state page");
        for entry in page.entries {
            if let Some(data) = entry.data {
                values.push((
                    entry.key.to_string(),
                    entry.seq.get(),
                    data.as_str().to_owned(),
                ));
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => return values,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_channels_state_outlives_its_history_and_a_restart_and_not_an_epoch() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let channel = Channel::new("prices:fx").expect("valid channel");
    let expected = {
        let broker = DiskBroker::builder(dir.path())
            .boot_id("boot-1")
            .retention(resync_broker::Retention::default().with_max_events(5))
            .open()
            .expect("opens");
        for round in 0..40u64 {
            let key = format!("k{}", round % 9);
            let data = if round % 6 == 0 {
                "null".to_owned()
            } else {
                round.to_string()
            };
            publish_keyed(&broker, &channel, &key, &data).await;
        }
        let state = state_of(&broker, &channel).await;
        // The model: each key's last publish, unless it deleted it.
        let mut model = std::collections::BTreeMap::new();
        for round in 0..40u64 {
            let key = format!("k{}", round % 9);
            if round % 6 == 0 {
                model.remove(&key);
            } else {
                model.insert(key, (round + 1, round.to_string()));
            }
        }
        let model: Vec<(String, u64, String)> = model
            .into_iter()
            .map(|(key, (seq, data))| (key, seq, data))
            .collect();
        assert_eq!(
            state, model,
            "the latest event of each key, past a 5-event history"
        );
        // Events keep their key through the disk.
        match broker
            .read_since(
                &channel,
                &Position::new(state_epoch(&broker, &channel).await, Seq::new(37)),
                10,
            )
            .await
            .expect("read")
        {
            ReadOutcome::Replayed { events, .. } => {
                let keys: Vec<Option<String>> = events
                    .iter()
                    .map(|event| event.key().map(ToString::to_string))
                    .collect();
                assert_eq!(
                    keys,
                    [
                        Some("k1".to_owned()),
                        Some("k2".to_owned()),
                        Some("k3".to_owned())
                    ]
                );
            }
            other => panic!("expected a replay, got {other:?}"),
        }
        broker.close().await;
        state
    };
    // A clean restart keeps it.
    {
        let broker = open(dir.path(), "boot-1");
        assert_eq!(
            state_of(&broker, &channel).await,
            expected,
            "after a clean restart"
        );
        drop(broker);
    }
    // Another boot (a power cut the store cannot rule out) starts the channel in a new epoch:
    // the old state is of another history and is not served.
    let broker = open(dir.path(), "boot-2");
    let after = publish_keyed(&broker, &channel, "k1", "1000").await;
    assert_eq!(
        state_of(&broker, &channel).await,
        [("k1".to_owned(), after.seq.get(), "1000".to_owned())],
        "only the new epoch's entries"
    );
}

async fn state_epoch(broker: &DiskBroker, channel: &Channel) -> resync_protocol::Epoch {
    broker.position(channel).await.expect("position").epoch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_page_read_again_after_a_publish_holds_the_publish() {
    // A page read by many readers at once is read from the disk once and shared; a publish
    // moves the position, so the next reader reads the new value, never the kept page.
    let dir = tempfile::tempdir().expect("a temporary directory");
    let channel = Channel::new("prices:kept").expect("valid channel");
    let broker = DiskBroker::builder(dir.path()).open().expect("open");
    publish_keyed(&broker, &channel, "a", "1").await;
    publish_keyed(&broker, &channel, "b", "2").await;
    let first = state_of(&broker, &channel).await;
    assert_eq!(
        first,
        [
            ("a".to_owned(), 1, "1".to_owned()),
            ("b".to_owned(), 2, "2".to_owned())
        ]
    );
    // Read again at the same position: the same page.
    assert_eq!(state_of(&broker, &channel).await, first);
    publish_keyed(&broker, &channel, "a", "3").await;
    assert_eq!(
        state_of(&broker, &channel).await,
        [
            ("a".to_owned(), 3, "3".to_owned()),
            ("b".to_owned(), 2, "2".to_owned())
        ]
    );
    let readers: Vec<_> = (0..16)
        .map(|_| {
            let (broker, channel) = (broker.clone(), channel.clone());
            tokio::spawn(async move { state_of(&broker, &channel).await })
        })
        .collect();
    for reader in readers {
        assert_eq!(
            reader.await.expect("reader"),
            [
                ("a".to_owned(), 3, "3".to_owned()),
                ("b".to_owned(), 2, "2".to_owned())
            ]
        );
    }
}
