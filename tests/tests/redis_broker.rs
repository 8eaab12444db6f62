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

fn broker(redis: &RedisServer, max_events: usize, queue: usize) -> RedisBroker {
    RedisBroker::builder(redis.url())
        .retention(Retention::default().with_max_events(max_events))
        .subscriber_queue(queue)
        .command_timeout(Duration::from_millis(500))
        .build()
        .unwrap()
}

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
    let mut redis = RedisServer::start();
    let publisher: Arc<dyn Broker> = Arc::new(broker(&redis, 1_000, 64));
    let follower: Arc<dyn Broker> = Arc::new(broker(&redis, 1_000, 64));
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
    let mut redis = RedisServer::start();
    let broker: Arc<dyn Broker> = Arc::new(broker(&redis, 1_000, 64));
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
    match tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .unwrap()
        .unwrap()
    {
        SubscriptionItem::Reset { reason, .. } => assert_eq!(reason, ResetReason::EpochChanged),
        other => panic!("expected a reset, got {other:?}"),
    }
}
