//! The Redis broker on a real Redis Cluster (three primaries with a replica each, started by
//! the test): the conformance suite every broker passes, delivery between processes through
//! shard channels, and failovers that lose nothing acknowledged or say so with a reset.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::sync::Arc;
use std::time::Duration;

use resync_broker::conformance::{ConformanceConfig, run_all};
use resync_broker::{Broker, Publish, ResumeOptions, Retention, SubscriptionItem, resume};
use resync_broker_redis::RedisBroker;
use resync_protocol::{Channel, Payload};
use resync_tests::redis_cluster::{RedisCluster, cli};

fn broker(cluster: &RedisCluster, max_events: usize, queue: usize) -> RedisBroker {
    RedisBroker::cluster_builder(cluster.seeds())
        .retention(Retention::default().with_max_events(max_events))
        .subscriber_queue(queue)
        .command_timeout(Duration::from_secs(2))
        .build()
        .unwrap()
}

/// How many times the cluster's nodes ran `command` (`INFO commandstats`), summed.
fn command_calls(cluster: &RedisCluster, command: &str) -> u64 {
    cluster
        .seeds()
        .iter()
        .map(|seed| {
            let port: u16 = seed
                .trim_start_matches("redis://127.0.0.1:")
                .trim_end_matches('/')
                .parse()
                .unwrap();
            let stats = cli(port, &["info", "commandstats"]);
            stats
                .lines()
                .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
                .and_then(|rest| rest.split(',').next())
                .map_or(0, |calls| calls.parse::<u64>().unwrap())
        })
        .sum()
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
        let (_, subscription) = resume(
            second.clone(),
            channel.clone(),
            None,
            ResumeOptions::default(),
        )
        .await
        .unwrap();
        followers.push(subscription);
    }
    let published_before = command_calls(&cluster, "publish");
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
        command_calls(&cluster, "spublish") >= 120,
        "events go out with SPUBLISH"
    );
    assert_eq!(
        command_calls(&cluster, "publish"),
        published_before,
        "no PUBLISH, which every node of the cluster would carry"
    );
}
