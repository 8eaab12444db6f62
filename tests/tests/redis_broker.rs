//! The Redis broker against a real `redis-server`: the conformance suite every broker passes,
//! and its behaviour when Redis goes away and comes back.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::sync::Arc;
use std::time::Duration;

use resync_broker::conformance::{ConformanceConfig, run_all};
use resync_broker::{Broker, Publish, ResumeOptions, Retention, SubscriptionItem, resume};
use resync_broker_redis::RedisBroker;
use resync_protocol::{Channel, Payload, ResetReason};
use resync_tests::redis_server::RedisServer;
use resync_tests::redis_topology::Redis;

use resync_tests::redis_topology::one_broker as broker;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_broker_passes_conformance() {
    let redis = RedisServer::start();
    run_all(
        Arc::new(broker(&redis, 2_000, 64)),
        ConformanceConfig::new(2_000, 64),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_on_one_redis_share_seqs_and_deliver_to_each_other() {
    let redis = RedisServer::start();
    let first: Arc<dyn Broker> = Arc::new(broker(&redis, 100, 64));
    let second: Arc<dyn Broker> = Arc::new(broker(&redis, 100, 64));
    let channel = Channel::new("shared").unwrap();
    let (_, mut on_second) = resume(
        second.clone(),
        channel.clone(),
        None,
        ResumeOptions::default(),
    )
    .await
    .unwrap();
    for value in 0..10u64 {
        let broker = if value % 2 == 0 { &first } else { &second };
        let position = broker
            .publish(Publish::new(
                channel.clone(),
                Payload::from_value(&value).unwrap(),
            ))
            .await
            .unwrap();
        assert_eq!(
            position.seq.get(),
            value + 1,
            "one seq sequence across processes"
        );
    }
    for expected in 1..=10 {
        match tokio::time::timeout(Duration::from_secs(5), on_second.next())
            .await
            .unwrap()
            .unwrap()
        {
            SubscriptionItem::Event(event) => assert_eq!(event.position().seq.get(), expected),
            other => panic!("unexpected {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_fails_publishes_loudly_and_loses_nothing_stored() {
    an_outage_fails_publishes_loudly_and_loses_nothing_stored_on(Redis::start(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_outage_fails_publishes_loudly_and_loses_nothing_stored() {
    an_outage_fails_publishes_loudly_and_loses_nothing_stored_on(Redis::start(true)).await;
}

async fn an_outage_fails_publishes_loudly_and_loses_nothing_stored_on(mut redis: Redis) {
    let publisher: Arc<dyn Broker> = Arc::new(redis.broker(1_000, 64));
    let follower: Arc<dyn Broker> = Arc::new(redis.broker(1_000, 64));
    let channel = Channel::new("outage").unwrap();
    let (_, mut stream) = resume(
        follower.clone(),
        channel.clone(),
        None,
        ResumeOptions::default(),
    )
    .await
    .unwrap();
    let publish = |value: u64| {
        let publisher = publisher.clone();
        let channel = channel.clone();
        async move {
            publisher
                .publish(Publish::new(channel, Payload::from_value(&value).unwrap()))
                .await
        }
    };
    publish(1).await.unwrap();

    redis.stop();
    let failed = publish(2).await;
    assert!(
        matches!(failed, Err(resync_broker::Error::Unavailable(_))),
        "{failed:?}"
    );
    assert!(
        follower.health().await.is_err(),
        "not ready while redis is down"
    );
    redis.restart_keeping_data();

    // Published while the follower's pub/sub connection is still reconnecting.
    let mut stored = 1;
    for value in 3..=6 {
        if publish(value).await.is_ok() {
            stored += 1;
        }
    }
    // Once redis is back every publish succeeds.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while publish(7).await.is_err() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "redis never came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stored += 1;
    let mut seqs = Vec::new();
    while seqs.len() < stored {
        match tokio::time::timeout(Duration::from_secs(10), stream.next())
            .await
            .unwrap()
            .unwrap()
        {
            SubscriptionItem::Event(event) => seqs.push(event.position().seq.get()),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        seqs,
        (1..=stored as u64).collect::<Vec<_>>(),
        "everything stored arrives, in order, once"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while follower.health().await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarted_empty_is_an_epoch_reset_not_silence() {
    restarted_empty_is_an_epoch_reset_not_silence_on(Redis::start(false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_restarted_empty_is_an_epoch_reset_not_silence() {
    restarted_empty_is_an_epoch_reset_not_silence_on(Redis::start(true)).await;
}

async fn restarted_empty_is_an_epoch_reset_not_silence_on(mut redis: Redis) {
    let broker: Arc<dyn Broker> = Arc::new(redis.broker(1_000, 64));
    let channel = Channel::new("amnesia").unwrap();
    let (_, mut stream) = resume(
        broker.clone(),
        channel.clone(),
        None,
        ResumeOptions::default(),
    )
    .await
    .unwrap();
    broker
        .publish(Publish::new(
            channel.clone(),
            Payload::from_json("1").unwrap(),
        ))
        .await
        .unwrap();
    assert!(matches!(
        stream.next().await.unwrap(),
        SubscriptionItem::Event(_)
    ));

    redis.restart_empty();
    // Nobody publishes: the subscriber still learns that its history is gone.
    match tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .unwrap()
        .unwrap()
    {
        SubscriptionItem::Reset { reason, .. } => assert_eq!(reason, ResetReason::EpochChanged),
        other => panic!("expected a reset, got {other:?}"),
    }
}

/// The number of keys in the test's Redis.
fn key_count(redis: &RedisServer) -> u64 {
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "DBSIZE"])
        .output()
        .expect("redis-cli is installed with redis-server");
    String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .expect("DBSIZE answers a number")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defect_6_subscribing_and_reading_never_published_channels_create_no_redis_keys() {
    let redis = RedisServer::start();
    let broker: Arc<dyn Broker> = Arc::new(broker(&redis, 100, 64));
    let mut subscriptions = Vec::new();
    for index in 0..300 {
        let channel = Channel::new(format!("spray{index}")).unwrap();
        let position = broker.position(&channel).await.unwrap();
        assert_eq!(position.seq.get(), 0);
        broker.read_since(&channel, &position, 10).await.unwrap();
        let (_, subscription) = resume(
            broker.clone(),
            channel,
            Some(position),
            ResumeOptions::default(),
        )
        .await
        .unwrap();
        subscriptions.push(subscription);
    }
    // One key at most: the epoch that channels without state stand at.
    let keys = key_count(&redis);
    assert!(
        keys <= 1,
        "300 channels read and subscribed made {keys} keys"
    );

    // A subscriber that came in at seq 0 of a never-published channel gets its first event
    // gap-free, without a reset.
    let channel = Channel::new("spray7").unwrap();
    broker
        .publish(Publish::new(
            channel.clone(),
            Payload::from_json("1").unwrap(),
        ))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(5), subscriptions[7].next())
        .await
        .unwrap()
        .unwrap()
    {
        SubscriptionItem::Event(event) => assert_eq!(event.position().seq.get(), 1),
        other => panic!("expected the first event, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_whose_metadata_expired_starts_a_new_epoch_so_old_positions_reset() {
    let redis = RedisServer::start();
    let broker: Arc<dyn Broker> = Arc::new(
        RedisBroker::builder(redis.url())
            .meta_ttl(Duration::from_millis(600))
            .command_timeout(Duration::from_millis(500))
            .build()
            .unwrap(),
    );
    let channel = Channel::new("forgotten").unwrap();
    let publish = || Publish::new(channel.clone(), Payload::from_json("1").unwrap());
    broker.publish(publish()).await.unwrap();
    let before = broker.publish(publish()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let after = broker.publish(publish()).await.unwrap();
    assert_eq!(after.seq.get(), 1, "the metadata expired: seqs start over");
    assert_ne!(
        after.epoch, before.epoch,
        "seqs that start over must not reuse the epoch"
    );
    match broker.read_since(&channel, &before, 10).await.unwrap() {
        resync_broker::ReadOutcome::Reset { reason, .. } => {
            assert_eq!(reason, ResetReason::EpochChanged)
        }
        other => panic!("an old position must reset, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn defect_4_redis_history_has_a_byte_budget_per_channel() {
    let redis = RedisServer::start();
    let broker: Arc<dyn Broker> = Arc::new(
        RedisBroker::builder(redis.url())
            .retention(
                Retention::default()
                    .with_max_events(1_000)
                    .with_max_bytes(Some(20 * 1024)),
            )
            .command_timeout(Duration::from_millis(500))
            .build()
            .unwrap(),
    );
    let channel = Channel::new("big").unwrap();
    let data = Payload::from_value(&"x".repeat(1_022)).unwrap(); // 1,024 bytes with quotes
    let mut positions = Vec::new();
    for _ in 0..200 {
        positions.push(
            broker
                .publish(Publish::new(channel.clone(), data.clone()))
                .await
                .unwrap(),
        );
    }
    let output = std::process::Command::new("redis-cli")
        .args(["-p", &redis.port.to_string(), "XLEN", "resync:{big}:stream"])
        .output()
        .unwrap();
    let kept: u64 = String::from_utf8_lossy(&output.stdout)
        .trim()
        .parse()
        .unwrap();
    assert_eq!(kept, 20, "20 KiB hold 20 events of 1 KiB, of 200 published");
    // Further back than the budget reaches: a typed reset; within it: the replay.
    match broker
        .read_since(&channel, &positions[100], 100)
        .await
        .unwrap()
    {
        resync_broker::ReadOutcome::Reset { reason, .. } => {
            assert_eq!(reason, ResetReason::Truncated)
        }
        other => panic!("expected truncated, got {other:?}"),
    }
    match broker
        .read_since(&channel, &positions[179], 100)
        .await
        .unwrap()
    {
        resync_broker::ReadOutcome::Replayed { events, .. } => assert_eq!(events.len(), 20),
        other => panic!("expected a replay of 20, got {other:?}"),
    }
    // The count limit still holds with the byte limit in play.
    let small = Channel::new("small").unwrap();
    let counted: Arc<dyn Broker> = Arc::new(
        RedisBroker::builder(redis.url())
            .retention(
                Retention::default()
                    .with_max_events(5)
                    .with_max_bytes(Some(1 << 20)),
            )
            .build()
            .unwrap(),
    );
    let mut last = None;
    for value in 0..12u64 {
        last = Some(
            counted
                .publish(Publish::new(
                    small.clone(),
                    Payload::from_value(&value).unwrap(),
                ))
                .await
                .unwrap(),
        );
    }
    let since = resync_protocol::Position::new(last.unwrap().epoch, resync_protocol::Seq::new(7));
    match counted.read_since(&small, &since, 100).await.unwrap() {
        resync_broker::ReadOutcome::Replayed { events, .. } => assert_eq!(events.len(), 5),
        other => panic!("expected the last 5, got {other:?}"),
    }
}

/// How many times Redis ran `command` (scripts' own calls included).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribers_behind_a_burst_catch_up_from_what_pub_sub_delivered_not_from_redis() {
    let redis = RedisServer::start();
    let publisher = broker(&redis, 10_000, 16);
    let receiver: Arc<dyn Broker> = Arc::new(broker(&redis, 10_000, 16));
    let channel = Channel::new("burst").unwrap();
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (_, subscription) = resume(
            receiver.clone(),
            channel.clone(),
            None,
            ResumeOptions::default(),
        )
        .await
        .unwrap();
        readers.push(subscription);
    }
    let reads_before = redis.command_calls("xrange");
    let total = 2_000u64;
    for n in 0..total {
        let data = Payload::from_value(&serde_json::json!({ "n": n })).unwrap();
        publisher
            .publish(Publish::new(channel.clone(), data))
            .await
            .unwrap();
    }
    // Only now do the readers read: 2,000 events against queues of 16, so every one of them
    // overflowed and had to catch up (the fault happened by construction).
    for reader in &mut readers {
        for expected in 1..=total {
            let item = tokio::time::timeout(Duration::from_secs(10), reader.next())
                .await
                .unwrap()
                .unwrap();
            let SubscriptionItem::Event(event) = item else {
                panic!("unexpected {item:?}");
            };
            assert_eq!(event.position().seq.get(), expected, "in order, no gap");
        }
    }
    assert_eq!(
        redis.command_calls("xrange") - reads_before,
        0,
        "four subscribers caught up 2,000 events without one history read from Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promoted_without_the_last_acknowledged_events_resets_never_reuses_seqs() {
    // A managed Redis failing over: its replica, behind on the last writes, takes over.
    let mut primary = RedisServer::start();
    let replica = RedisServer::start_replica_of(&primary);
    let channel = Channel::new("orders:7").unwrap();
    let before: Arc<dyn Broker> = Arc::new(broker(&primary, 100, 64));
    let publish = |broker: Arc<dyn Broker>, value: u64| {
        let channel = channel.clone();
        async move {
            broker
                .publish(Publish::new(channel, Payload::from_value(&value).unwrap()))
                .await
                .unwrap()
        }
    };
    for value in 1..=5 {
        publish(before.clone(), value).await;
    }
    let written = |server: &RedisServer, field: &str| -> String {
        server
            .cli(&["info", "replication"])
            .lines()
            .find_map(|line| line.strip_prefix(field).map(str::to_owned))
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while written(&replica, "slave_repl_offset:") != written(&primary, "master_repl_offset:") {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The replica misses the next five: stopped, its link cut on the primary's side.
    replica.signal("-STOP");
    assert_eq!(
        primary.cli(&["client", "kill", "type", "replica"]).trim(),
        "1"
    );
    let mut seen = None;
    for value in 6..=10 {
        seen = Some(publish(before.clone(), value).await);
    }
    let seen = seen.unwrap();
    primary.stop();
    replica.signal("-CONT");
    assert_eq!(replica.cli(&["replicaof", "no", "one"]).trim(), "OK");
    let kept = replica.cli(&["hget", &format!("resync:{{{channel}}}:meta"), "s"]);
    assert_eq!(kept.trim(), "5", "the promoted replica lost the last five");

    // The service's address now leads to the promoted replica.
    let after: Arc<dyn Broker> = Arc::new(broker(&replica, 100, 64));
    let mut published = Vec::new();
    for value in 11..=15 {
        published.push(publish(after.clone(), value).await);
    }
    match after.read_since(&channel, &seen, 100).await.unwrap() {
        resync_broker::ReadOutcome::Reset { reason, latest } => {
            assert_eq!(reason, ResetReason::EpochChanged);
            assert_ne!(latest.epoch, seen.epoch);
        }
        other => panic!("a client behind a lost tail must be reset, got {other:?}"),
    }
    assert!(
        published
            .iter()
            .all(|position| position.epoch != seen.epoch),
        "no seq of the old epoch is given again: {published:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pub_sub_connection_that_went_silent_is_noticed_and_nothing_is_missed() {
    // A half-open connection: the follower's sockets stay open and carry nothing, as when a
    // link or a NAT in between dropped them without telling either side.
    let redis = RedisServer::start();
    let proxy =
        resync_tests::proxy::ChaosProxy::tcp(format!("127.0.0.1:{}", redis.port).parse().unwrap())
            .await;
    let follower: Arc<dyn Broker> = Arc::new(
        RedisBroker::builder(format!("redis://{}/", proxy.address))
            .command_timeout(Duration::from_millis(500))
            .build()
            .unwrap(),
    );
    let publisher: Arc<dyn Broker> = Arc::new(broker(&redis, 100, 64));
    let channel = Channel::new("silent").unwrap();
    let (_, mut stream) = resume(
        follower.clone(),
        channel.clone(),
        None,
        ResumeOptions::default(),
    )
    .await
    .unwrap();
    let accepted = proxy.accepted();
    proxy.freeze_open_connections();
    let published = publisher
        .publish(Publish::new(
            channel.clone(),
            Payload::from_json("1").unwrap(),
        ))
        .await
        .unwrap();
    match tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .expect("the event arrives once the silent connection is replaced")
        .unwrap()
    {
        SubscriptionItem::Event(event) => assert_eq!(event.position(), &published),
        other => panic!("unexpected {other:?}"),
    }
    assert!(
        proxy.accepted() > accepted,
        "the follower opened a new connection"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_reads_longer_than_the_command_timeout_waits_its_turn_instead_of_failing() {
    // Found by `cargo xtask bench keyed`: 5,000 clients resuming at once after a deploy put
    // their reads in the shared connections' queues all at once; the last ones passed the
    // command timeout while Redis still answered the first, failed as "unavailable", and
    // their clients were cut off. Commands now wait their turn (`max_in_flight`), and the
    // command timeout counts only Redis's answer.
    let redis = RedisServer::start();
    let broker = RedisBroker::builder(redis.url())
        .command_timeout(Duration::from_millis(1_000))
        // Fewer turns than the default 64 (sized for a release build, `cargo xtask bench
        // keyed`): this debug build parses replies ten times slower, on a busy machine.
        .max_in_flight(16)
        .build()
        .unwrap();
    let channel = Channel::new("crowd").unwrap();
    let value = Payload::from_value(&"v".repeat(500)).unwrap();
    let mut first = None;
    for _ in 0..256 {
        let position = broker
            .publish(Publish::new(channel.clone(), value.clone()))
            .await
            .unwrap();
        first.get_or_insert(position);
    }
    let since = resync_protocol::Position::start_of(first.unwrap().epoch);
    // Each read answers 256 events of 500 B from Redis. A crowd that takes longer than one
    // command may is the fault; larger crowds until one does (a fast machine answers 1,000
    // within the timeout), and not one read may fail.
    for crowd in [1_000, 3_000, 9_000] {
        let started = std::time::Instant::now();
        let readers: Vec<_> = (0..crowd)
            .map(|_| {
                let (broker, channel, since) = (broker.clone(), channel.clone(), since.clone());
                tokio::spawn(async move { broker.read_since(&channel, &since, 1_000).await })
            })
            .collect();
        let mut failed = Vec::new();
        for reader in readers {
            match reader.await.unwrap() {
                Ok(resync_broker::ReadOutcome::Replayed { events, .. }) => {
                    assert_eq!(events.len(), 256);
                }
                Ok(other) => panic!("{other:?}"),
                Err(error) => failed.push(error.to_string()),
            }
        }
        let took = started.elapsed();
        assert!(
            failed.is_empty(),
            "{} of {crowd} reads failed in {took:?}: {:?}",
            failed.len(),
            failed.first()
        );
        if took > Duration::from_millis(2_000) {
            return;
        }
    }
    panic!("no crowd took longer than the command timeout: the test proved nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_page_read_again_after_another_instances_publish_holds_it() {
    // State pages are kept for the crowd that asks for them at the same position; a publish
    // (from this instance or another) moves the position, so the next read is Redis's.
    use resync_broker::KeyedState;
    let redis = RedisServer::start();
    let reader = RedisBroker::builder(redis.url()).build().unwrap();
    let writer = RedisBroker::builder(redis.url()).build().unwrap();
    let channel = Channel::new("prices:kept").unwrap();
    let publish = |broker: &RedisBroker, key: &str, data: &str| {
        let (broker, channel) = (broker.clone(), channel.clone());
        let (key, data) = (key.to_owned(), data.to_owned());
        async move {
            broker
                .publish(
                    Publish::new(channel, Payload::from_json(data).unwrap())
                        .with_key(Some(resync_protocol::Key::new(&key).unwrap())),
                )
                .await
                .unwrap()
        }
    };
    let values = |broker: &RedisBroker| {
        let (broker, channel) = (broker.clone(), channel.clone());
        async move {
            let page = broker.state_page(&channel, None, 10).await.unwrap();
            page.entries
                .into_iter()
                .map(|entry| {
                    (
                        entry.key.to_string(),
                        entry.data.map(|data| data.as_str().to_owned()),
                    )
                })
                .collect::<Vec<_>>()
        }
    };
    publish(&writer, "a", "1").await;
    publish(&writer, "b", "2").await;
    let expected = vec![
        ("a".to_owned(), Some("1".to_owned())),
        ("b".to_owned(), Some("2".to_owned())),
    ];
    assert_eq!(values(&reader).await, expected);
    assert_eq!(values(&reader).await, expected, "the same page again");
    publish(&writer, "a", "3").await;
    assert_eq!(
        values(&reader).await,
        [
            ("a".to_owned(), Some("3".to_owned())),
            ("b".to_owned(), Some("2".to_owned()))
        ],
        "another instance's publish is seen at once"
    );
}
