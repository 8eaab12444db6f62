//! Several reference-server processes sharing one Redis or one Redis Cluster: one gap-free
//! sequence per channel for every subscriber on every instance and transport, no loss when an
//! instance dies, and an outage that shows.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::time::Duration;

use resync_client::{Client, Subscription, TransportChoice, TransportKind};
use resync_protocol::{Channel, Position};
use resync_tests::proxy::ChaosProxy;
use resync_tests::redis_topology::Redis;
use resync_tests::server_process::ServerProcess;
use resync_tests::{channel_position, collect_seqs, fast_client};

const TRANSPORTS: [TransportKind; 3] = [
    TransportKind::WebSocket,
    TransportKind::Sse,
    TransportKind::LongPolling,
];

fn start_instances(redis: &Redis, count: usize) -> Vec<ServerProcess> {
    ServerProcess::start_many(
        count,
        &redis.server_arguments(),
        &["--ping-interval-secs", "2"],
    )
}

fn client(base: &str, transport: TransportKind) -> Client {
    fast_client(base, TransportChoice::Only(transport))
}

async fn position(http: &reqwest::Client, base: &str, channel: &str) -> Position {
    channel_position(http, base, "test-api-key-0123456789", channel).await
}

async fn publish(http: &reqwest::Client, base: &str, channel: &str, value: u64) -> bool {
    let response = http
        .post(format!("{base}/api/publish"))
        .bearer_auth("test-api-key-0123456789")
        .json(&serde_json::json!({ "channel": channel, "data": value }))
        .send()
        .await;
    response.is_ok_and(|response| response.status().is_success())
}

async fn collect(subscription: Subscription, count: u64, label: String) -> Vec<u64> {
    collect_seqs(subscription, count, &label).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_give_every_subscriber_the_same_sequence() {
    three_instances_give_every_subscriber_the_same_sequence_on(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_give_every_subscriber_the_same_sequence_on_a_cluster() {
    three_instances_give_every_subscriber_the_same_sequence_on(true).await;
}

async fn three_instances_give_every_subscriber_the_same_sequence_on(cluster: bool) {
    let redis = Redis::start(cluster);
    let instances = start_instances(&redis, 3);
    let http = reqwest::Client::new();
    let channels = ["orders", "news"];
    let mut starts = Vec::new();
    for channel in channels {
        starts.push(position(&http, &instances[0].base_url, channel).await);
    }
    let per_channel = 150u64;
    let mut collectors = Vec::new();
    let mut clients = Vec::new();
    for (index, instance) in instances.iter().enumerate() {
        for transport in TRANSPORTS {
            let client = client(&instance.base_url, transport);
            for (channel, start) in channels.iter().zip(&starts) {
                let subscription = client
                    .subscribe(Channel::new(*channel).unwrap())
                    .since(start.clone());
                let label = format!("instance {index} {} {channel}", transport.as_str());
                collectors.push(tokio::spawn(collect(subscription, per_channel, label)));
            }
            clients.push(client);
        }
    }
    // Concurrent publishers, each through random instances.
    let bases: Vec<String> = instances
        .iter()
        .map(|instance| instance.base_url.clone())
        .collect();
    let publishers: Vec<_> = channels
        .iter()
        .map(|channel| {
            let http = http.clone();
            let bases = bases.clone();
            let channel = (*channel).to_owned();
            tokio::spawn(async move {
                for value in 0..per_channel {
                    let base = &bases[fastrand::usize(..bases.len())];
                    assert!(
                        publish(&http, base, &channel, value).await,
                        "publish through {base}"
                    );
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await.unwrap();
    }
    for collector in collectors {
        assert_eq!(
            collector.await.unwrap(),
            (1..=per_channel).collect::<Vec<_>>()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instance_moves_its_clients_elsewhere_without_loss() {
    killing_an_instance_moves_its_clients_elsewhere_without_loss_on(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_an_instance_moves_its_clients_elsewhere_without_loss_on_a_cluster() {
    killing_an_instance_moves_its_clients_elsewhere_without_loss_on(true).await;
}

async fn killing_an_instance_moves_its_clients_elsewhere_without_loss_on(cluster: bool) {
    let redis = Redis::start(cluster);
    let mut instances = start_instances(&redis, 3);
    let balancer =
        ChaosProxy::balance(instances.iter().map(|instance| instance.address).collect()).await;
    let http = reqwest::Client::new();
    let start = position(&http, &instances[1].base_url, "survive").await;
    let total = 300u64;
    let mut collectors = Vec::new();
    let mut clients = Vec::new();
    for round in 0..2 {
        for transport in TRANSPORTS {
            let client = client(&balancer.base_url(), transport);
            let subscription = client
                .subscribe(Channel::new("survive").unwrap())
                .since(start.clone());
            let label = format!("{} #{round}", transport.as_str());
            collectors.push(tokio::spawn(collect(subscription, total, label)));
            clients.push(client);
        }
    }
    // Let every client connect (round-robin spreads them over the three instances).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted_before = balancer.accepted();
    let survivors: Vec<String> = instances[1..]
        .iter()
        .map(|instance| instance.base_url.clone())
        .collect();
    for value in 0..total {
        if value == total / 3 {
            instances[0].kill();
        }
        let base = &survivors[(value % 2) as usize];
        assert!(publish(&http, base, "survive", value).await);
        if value % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for collector in collectors {
        assert_eq!(collector.await.unwrap(), (1..=total).collect::<Vec<_>>());
    }
    // The dead instance's clients really had to reconnect through the balancer.
    assert!(
        balancer.accepted() > accepted_before,
        "no client reconnected"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_shows_in_readyz_and_publish_answers_503() {
    a_redis_outage_shows_in_readyz_and_publish_answers_503_on(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_outage_shows_in_readyz_and_publish_answers_503() {
    a_redis_outage_shows_in_readyz_and_publish_answers_503_on(true).await;
}

async fn a_redis_outage_shows_in_readyz_and_publish_answers_503_on(cluster: bool) {
    let mut redis = Redis::start(cluster);
    let instance = start_instances(&redis, 1).pop().unwrap();
    let http = reqwest::Client::new();
    let status = |path: &'static str| {
        let http = http.clone();
        let url = format!("{}{path}", instance.base_url);
        async move { http.get(url).send().await.unwrap().status().as_u16() }
    };
    // Ready once its Pub/Sub connection is up, which may come a moment after it listens.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while status("/readyz").await != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    redis.stop();
    assert_eq!(status("/readyz").await, 503);
    let response = http
        .post(format!("{}/api/publish", instance.base_url))
        .bearer_auth("test-api-key-0123456789")
        .json(&serde_json::json!({ "channel": "c", "data": 1 }))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status().as_u16(),
        503,
        "a publish redis did not store is an error"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert_eq!(body["code"], "unavailable");
    assert_eq!(status("/healthz").await, 200, "the process itself is alive");
    redis.restart_keeping_data();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while status("/readyz").await != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never ready again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(publish(&http, &instance.base_url, "c", 2).await);
}
