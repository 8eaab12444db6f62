//! The Redis broker on a real Redis Cluster (three primaries with a replica each, started by
//! the test): the conformance suite every broker passes, delivery between processes through
//! shard channels, and failovers that lose nothing acknowledged or say so with a reset.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::sync::Arc;
use std::time::Duration;

use resync_broker::conformance::{ConformanceConfig, run_all};
use resync_broker::{Broker, Publish, ResumeOptions, SubscriptionItem, resume};
use resync_protocol::{Channel, Payload};
use resync_tests::redis_cluster::{RedisCluster, cli};

use resync_tests::redis_topology::cluster_broker as broker;

/// A subscription of `broker` to `channel` from now on.
async fn follow(broker: &Arc<dyn Broker>, channel: &Channel) -> resync_broker::Subscription {
    resume(
        broker.clone(),
        channel.clone(),
        None,
        ResumeOptions::default(),
    )
    .await
    .unwrap()
    .1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_broker_passes_conformance_on_a_cluster() {
    let cluster = RedisCluster::start();
    run_all(
        Arc::new(broker(&cluster, 2_000, 64)),
        ConformanceConfig::new(2_000, 64),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_brokers_on_a_cluster_deliver_every_channel_through_its_shard() {
    let cluster = RedisCluster::start();
    let first: Arc<dyn Broker> = Arc::new(broker(&cluster, 100, 64));
    let second: Arc<dyn Broker> = Arc::new(broker(&cluster, 100, 64));
    // Enough channels that every primary serves some.
    let channels: Vec<Channel> = (0..24)
        .map(|index| Channel::new(format!("room:{index}")).unwrap())
        .collect();
    let primaries: std::collections::HashSet<u16> = channels
        .iter()
        .map(|channel| cluster.primary_of(&format!("{{{channel}}}")))
        .collect();
    assert_eq!(
        primaries.len(),
        3,
        "the channels spread over the three primaries"
    );
    let mut followers = Vec::new();
    for channel in &channels {
        followers.push(follow(&second, channel).await);
    }
    let published_before = cluster.command_calls("publish");
    for round in 0..5u64 {
        for (index, channel) in channels.iter().enumerate() {
            let broker = if index % 2 == 0 { &first } else { &second };
            let position = broker
                .publish(Publish::new(
                    channel.clone(),
                    Payload::from_value(&round).unwrap(),
                ))
                .await
                .unwrap();
            assert_eq!(
                position.seq.get(),
                round + 1,
                "one seq sequence per channel"
            );
        }
    }
    for subscription in &mut followers {
        for expected in 1..=5 {
            match tokio::time::timeout(Duration::from_secs(10), subscription.next())
                .await
                .unwrap()
                .unwrap()
            {
                SubscriptionItem::Event(event) => {
                    assert_eq!(event.position().seq.get(), expected);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }
    assert!(
        cluster.command_calls("spublish") >= 120,
        "events go out with SPUBLISH"
    );
    assert_eq!(
        cluster.command_calls("publish"),
        published_before,
        "no PUBLISH, which every node of the cluster would carry"
    );
}

/// The next item of `subscription` within 20 s.
async fn next_item(subscription: &mut resync_broker::Subscription) -> SubscriptionItem {
    tokio::time::timeout(Duration::from_secs(20), subscription.next())
        .await
        .expect("an item within 20 s")
        .expect("the subscription goes on")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_that_lost_acknowledged_events_is_a_reset_never_reused_seqs() {
    let mut cluster = RedisCluster::start();
    let publisher: Arc<dyn Broker> = Arc::new(broker(&cluster, 100, 64));
    let follower: Arc<dyn Broker> = Arc::new(broker(&cluster, 100, 64));
    let channel = Channel::new("orders:1").unwrap();
    let primary = cluster.primary_of(&format!("{{{channel}}}"));
    let replica = cluster.replica_of(primary);
    let mut following = follow(&follower, &channel).await;
    let publish = |value: u64| {
        let publisher = publisher.clone();
        let channel = channel.clone();
        async move {
            publisher
                .publish(Publish::new(channel, Payload::from_value(&value).unwrap()))
                .await
        }
    };
    let mut acknowledged = Vec::new();
    for value in 1..=5 {
        acknowledged.push(publish(value).await.unwrap());
    }
    cluster.wait_replicated(primary, replica);
    // The replica misses the next five, which the primary acknowledges and delivers: it is
    // stopped, and its link cut on the primary's side, so nothing reaches it.
    cluster.signal(replica, "-STOP");
    assert_eq!(
        cli(primary, &["client", "kill", "type", "replica"]).trim(),
        "1",
        "the replica's link is cut"
    );
    for value in 6..=10 {
        acknowledged.push(publish(value).await.unwrap());
    }
    let epoch = acknowledged[0].epoch.clone();
    assert!(acknowledged.iter().all(|position| position.epoch == epoch));
    for expected in 1..=10 {
        match next_item(&mut following).await {
            SubscriptionItem::Event(event) => assert_eq!(event.position().seq.get(), expected),
            other => panic!("unexpected {other:?}"),
        }
    }
    let seen = acknowledged[9].clone();
    cluster.kill(primary);
    cluster.signal(replica, "-CONT");
    cluster.wait_until_healthy();
    assert_eq!(
        cluster.primary_of(&format!("{{{channel}}}")),
        replica,
        "the replica took over"
    );
    let kept = cli(
        replica,
        &["hget", &format!("resync:{{{channel}}}:meta"), "s"],
    );
    assert_eq!(
        kept.trim(),
        "5",
        "the new primary lost the last five acknowledged events"
    );

    // Publishing goes on (in a new epoch: no seq of the old one is ever given again).
    let mut after = Vec::new();
    for value in 11..=15 {
        let position = loop {
            // The cluster connection may still be settling on the new topology.
            match publish(value).await {
                Ok(position) => break position,
                Err(error) => {
                    eprintln!("publish during failover: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        after.push(position);
    }
    // A client that saw seq 10 comes back once as many were published again: it is told to
    // refetch, not that it is up to date.
    let read = publisher.read_since(&channel, &seen, 100).await.unwrap();
    match read {
        resync_broker::ReadOutcome::Reset { reason, latest } => {
            assert_eq!(reason, resync_protocol::ResetReason::EpochChanged);
            assert_ne!(latest.epoch, epoch);
        }
        other => panic!("a client behind a lost tail must be reset, got {other:?}"),
    }
    assert!(
        after.iter().all(|position| position.epoch != epoch),
        "a new epoch after the lost tail: {after:?}"
    );
    // The follower, which saw seq 10 live, is reset (its application refetches) and then
    // follows the new epoch up to the last acknowledged event.
    let mut reset = None;
    let mut followed = Vec::new();
    let last = after.last().unwrap().clone();
    while followed.last().or(reset.as_ref()) != Some(&last) {
        match next_item(&mut following).await {
            SubscriptionItem::Reset { reason, position } => {
                assert_eq!(reason, resync_protocol::ResetReason::EpochChanged);
                assert_ne!(position.epoch, epoch);
                reset = Some(position);
            }
            SubscriptionItem::Event(event) => {
                let position = event.position().clone();
                let from = reset
                    .as_ref()
                    .expect("no event of the new epoch before the reset");
                assert_eq!(position.epoch, from.epoch);
                assert!(position.seq > from.seq);
                followed.push(position);
            }
            other @ SubscriptionItem::State { .. } => panic!("not a keyed channel: {other:?}"),
        }
    }
    let from = reset.expect("a reset").seq.get();
    let expected: Vec<_> = after
        .iter()
        .filter(|position| position.seq.get() > from)
        .cloned()
        .collect();
    assert_eq!(
        followed, expected,
        "every event after the reset, in order, once"
    );
    // And it goes on live.
    let next = publish(14).await.unwrap();
    match next_item(&mut following).await {
        SubscriptionItem::Event(event) => assert_eq!(event.position(), &next),
        other => panic!("unexpected {other:?}"),
    }
}

/// Publishes again until the cluster takes it (it may still be settling on a new topology),
/// for at most 30 s.
async fn until_published<F, Fut>(mut publish: F) -> resync_protocol::Position
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = resync_broker::Result<resync_protocol::Position>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match publish().await {
            Ok(position) => return position,
            Err(error) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "not published within 30 s: {error}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_without_a_primary_pauses_only_its_own_channels() {
    let mut cluster = RedisCluster::start();
    let publisher: Arc<dyn Broker> = Arc::new(broker(&cluster, 100, 64));
    let follower: Arc<dyn Broker> = Arc::new(broker(&cluster, 100, 64));
    let dead = Channel::new("room:0").unwrap();
    let victim = cluster.primary_of(&format!("{{{dead}}}"));
    let alive = (1..)
        .map(|index| Channel::new(format!("room:{index}")).unwrap())
        .find(|channel| cluster.primary_of(&format!("{{{channel}}}")) != victim)
        .unwrap();
    let replica = cluster.replica_of(victim);
    let mut streams = Vec::new();
    for channel in [&dead, &alive] {
        streams.push(follow(&follower, channel).await);
    }
    let publish = |channel: &Channel, value: u64| {
        let publisher = publisher.clone();
        let channel = channel.clone();
        async move {
            publisher
                .publish(Publish::new(channel, Payload::from_value(&value).unwrap()))
                .await
        }
    };
    // The shard of `dead` is gone, primary and replica: no failover can bring it back.
    cluster.kill(replica);
    cluster.kill(victim);
    // The other shard goes on: what is published there reaches the follower, whose Pub/Sub
    // connection lost one node and still serves the channels of the others.
    let mut published = Vec::new();
    for value in 1..=3 {
        published.push(until_published(|| publish(&alive, value)).await);
    }
    // A history read that met the cluster client while it was still finding the dead nodes
    // may end the subscription with a broker error: a client then comes back from where it
    // was (the server tells it to), as this does.
    let mut stream = streams.swap_remove(1);
    let mut at = Some(resync_protocol::Position::start_of(
        published[0].epoch.clone(),
    ));
    let mut delivered = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while delivered.len() < published.len() {
        let item = tokio::time::timeout_at(deadline, stream.next())
            .await
            .expect("the other shard's events arrive");
        match item {
            Ok(SubscriptionItem::Event(event)) => {
                at = Some(event.position().clone());
                delivered.push(event.position().clone());
            }
            Err(resync_broker::SubscriptionError::Broker(error)) => {
                eprintln!("the follower comes back after: {error}");
                stream = resume(
                    follower.clone(),
                    alive.clone(),
                    at.clone(),
                    ResumeOptions::default(),
                )
                .await
                .unwrap()
                .1;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(delivered, published, "every event once, in order");
    // The dead shard says so: its publishes fail, they do not vanish.
    assert!(matches!(
        publish(&dead, 1).await,
        Err(resync_broker::Error::Unavailable(_))
    ));
}
