//! Failovers of the Redis behind two reference-server instances while a backend publishes,
//! followed by clients of every transport on both instances: a Redis Cluster whose primary is
//! killed (`kill -9`), and a single Redis whose replica the test promotes (a managed Redis
//! failing over behind its address). In both the replica had missed the last acknowledged
//! events. Every client ends with every acknowledged event exactly once, or with a reset it
//! sees; no silence, and no seq is ever given to two events.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use resync_client::{Subscription, TransportChoice, TransportKind, Update};
use resync_protocol::{Channel, Position, ResetReason};
use resync_tests::proxy::ChaosProxy;
use resync_tests::redis_cluster::{RedisCluster, cli};
use resync_tests::redis_server::RedisServer;
use resync_tests::server_process::ServerProcess;
use resync_tests::{TEST_API_KEY, channel_position, fast_client};
use tokio::sync::watch;

const TRANSPORTS: [TransportKind; 3] = [
    TransportKind::WebSocket,
    TransportKind::Sse,
    TransportKind::LongPolling,
];

const CHANNEL: &str = "orders";

/// Values the backend publishes; the replica is starved at the first mark and takes over at
/// the second.
const VALUES: u64 = 120;
const STARVE_AT: u64 = 40;
const FAIL_OVER_AT: u64 = 60;

/// The Redis the instances share, and how its failover is staged.
enum Setup {
    Cluster {
        cluster: RedisCluster,
        primary: u16,
        replica: u16,
    },
    Replicated {
        primary: RedisServer,
        replica: RedisServer,
        /// The address the instances know, which moves to the replica at the failover.
        address: ChaosProxy,
    },
}

fn port_of(address: &str) -> SocketAddr {
    address.parse().unwrap()
}

impl Setup {
    fn cluster() -> Self {
        let cluster = RedisCluster::start();
        let primary = cluster.primary_of(&format!("{{{CHANNEL}}}"));
        let replica = cluster.replica_of(primary);
        Setup::Cluster {
            cluster,
            primary,
            replica,
        }
    }

    async fn replicated() -> Self {
        let primary = RedisServer::start();
        let replica = RedisServer::start_replica_of(&primary);
        let address = ChaosProxy::tcp(port_of(&format!("127.0.0.1:{}", primary.port))).await;
        Setup::Replicated {
            primary,
            replica,
            address,
        }
    }

    fn server_arguments(&self) -> Vec<String> {
        match self {
            Setup::Cluster { cluster, .. } => cluster.server_arguments(),
            Setup::Replicated { address, .. } => vec![
                "--broker".to_owned(),
                "redis".to_owned(),
                "--redis-url".to_owned(),
                format!("redis://{}/", address.address),
            ],
        }
    }

    fn ports(&self) -> (u16, u16) {
        match self {
            Setup::Cluster {
                primary, replica, ..
            } => (*primary, *replica),
            Setup::Replicated {
                primary, replica, ..
            } => (primary.port, replica.port),
        }
    }

    /// The primary's replication offset: how much it has written.
    fn written(&self) -> u64 {
        let (primary, _) = self.ports();
        cli(primary, &["info", "replication"])
            .lines()
            .find_map(|line| line.strip_prefix("master_repl_offset:"))
            .and_then(|offset| offset.trim().parse().ok())
            .unwrap()
    }

    /// The replica stops receiving (stopped, and its link cut on the primary's side) once
    /// it has everything written so far; returns that offset.
    fn starve_replica(&self) -> u64 {
        let (primary, replica) = self.ports();
        let offset = |port: u16, field: &str| -> Option<u64> {
            cli(port, &["info", "replication"])
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|value| value.trim().parse().ok())
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while offset(replica, "slave_repl_offset:") != offset(primary, "master_repl_offset:") {
            assert!(
                std::time::Instant::now() < deadline,
                "the replica caught up"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let had = self.written();
        match self {
            Setup::Cluster { cluster, .. } => cluster.signal(replica, "-STOP"),
            Setup::Replicated { replica, .. } => replica.signal("-STOP"),
        }
        assert_eq!(
            cli(primary, &["client", "kill", "type", "replica"]).trim(),
            "1"
        );
        had
    }

    /// The primary dies; its replica takes over (elected by the cluster, or promoted by the
    /// test and the service's address moved to it).
    fn fail_over(&mut self) {
        match self {
            Setup::Cluster {
                cluster,
                primary,
                replica,
            } => {
                cluster.kill(*primary);
                cluster.signal(*replica, "-CONT");
            }
            Setup::Replicated {
                primary,
                replica,
                address,
            } => {
                primary.stop();
                replica.signal("-CONT");
                assert_eq!(replica.cli(&["replicaof", "no", "one"]).trim(), "OK");
                address.retarget(vec![port_of(&format!("127.0.0.1:{}", replica.port))]);
                address.cut_all();
            }
        }
    }
}

/// What one client saw, until it reached the last acknowledged position.
#[derive(Debug)]
enum Seen {
    Event(Position, u64),
    Reset(ResetReason, Position),
}

async fn follow(
    mut subscription: Subscription,
    mut last: watch::Receiver<Option<Position>>,
    label: String,
) -> Vec<Seen> {
    let mut seen = Vec::new();
    let mut at: Option<Position> = None;
    loop {
        if let Some(last) = last.borrow().clone()
            && at.as_ref() == Some(&last)
        {
            return seen;
        }
        tokio::select! {
            changed = last.changed() => changed.unwrap(),
            update = tokio::time::timeout(Duration::from_secs(60), subscription.next()) => {
                let update = update
                    .unwrap_or_else(|_| panic!("{label}: silent for 60 s at {at:?}, after {seen:?}"))
                    .unwrap_or_else(|| panic!("{label}: the stream ended"))
                    .unwrap_or_else(|error| panic!("{label}: {error}"));
                match update {
                    Update::Event(event) => {
                        let value = event.data.as_str().parse().unwrap();
                        at = Some(event.position.clone());
                        seen.push(Seen::Event(event.position, value));
                    }
                    Update::Reset { reason, position } => {
                        at = Some(position.clone());
                        seen.push(Seen::Reset(reason, position));
                    }
                    Update::State { .. } => panic!("{label}: not a keyed channel"),
                    Update::Members(_) => {}
                }
            }
        }
    }
}

/// Publishes `value` through `base` with an idempotency key, again until it is acknowledged
/// (a backend's retry through a failover).
async fn publish(http: &reqwest::Client, base: &str, value: u64) -> Position {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let response = http
            .post(format!("{base}/api/publish"))
            .bearer_auth(TEST_API_KEY)
            .json(&serde_json::json!({
                "channel": CHANNEL,
                "data": value,
                "idempotency_key": format!("value-{value}"),
            }))
            .send()
            .await;
        if let Ok(response) = response
            && response.status().is_success()
        {
            let body: serde_json::Value = response.json().await.unwrap();
            return serde_json::from_value(body["position"].clone()).unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "value {value} was never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn every_client_ends_with_every_acknowledged_event_or_a_reset(mut setup: Setup) {
    let instances =
        ServerProcess::start_many(2, &setup.server_arguments(), &["--ping-interval-secs", "2"]);
    let http = reqwest::Client::new();
    for instance in &instances {
        // Ready once its Pub/Sub connection is up, which may come a moment after it listens.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http
                .get(format!("{}/readyz", instance.base_url))
                .send()
                .await
                .is_ok_and(|response| response.status().is_success());
            if ready {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "never ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let start = channel_position(&http, &instances[0].base_url, TEST_API_KEY, CHANNEL).await;
    let (last_sender, last) = watch::channel(None);
    let mut clients = Vec::new();
    let mut followers = Vec::new();
    for (index, instance) in instances.iter().enumerate() {
        for transport in TRANSPORTS {
            let client = fast_client(&instance.base_url, TransportChoice::Only(transport));
            let subscription = client
                .subscribe(Channel::new(CHANNEL).unwrap())
                .since(start.clone());
            let label = format!("instance {index} {}", transport.as_str());
            followers.push((
                label.clone(),
                tokio::spawn(follow(subscription, last.clone(), label)),
            ));
            clients.push(client);
        }
    }

    let mut acknowledged = Vec::new();
    let mut replica_had = 0;
    for value in 1..=VALUES {
        if value == STARVE_AT {
            replica_had = setup.starve_replica();
        }
        if value == FAIL_OVER_AT {
            assert!(
                setup.written() > replica_had,
                "the primary acknowledged writes its replica never got"
            );
            setup.fail_over();
        }
        let base = &instances[(value % 2) as usize].base_url;
        acknowledged.push((value, publish(&http, base, value).await));
    }
    let last_position = acknowledged.last().unwrap().1.clone();
    last_sender.send_replace(Some(last_position.clone()));

    // No seq was ever given to two events, and the events after the failover are in a new
    // epoch (the replica lacked the last ones acknowledged before it).
    let positions: HashSet<&Position> = acknowledged.iter().map(|(_, position)| position).collect();
    assert_eq!(positions.len(), acknowledged.len(), "{acknowledged:?}");
    let before = &acknowledged[0].1.epoch;
    assert_ne!(
        &last_position.epoch, before,
        "a new epoch after the lost tail"
    );

    for (label, follower) in followers {
        let seen = follower.await.unwrap();
        let mut resets = Vec::new();
        let mut events = Vec::new();
        let mut at = start.clone();
        for item in &seen {
            match item {
                Seen::Event(position, value) => {
                    assert!(
                        position.epoch == at.epoch && position.seq > at.seq,
                        "{label}: {position:?} after {at:?} (a duplicate, a reused seq or an \
                         event of another epoch without a reset): {seen:?}"
                    );
                    let (_, acked) = acknowledged[(*value - 1) as usize].clone();
                    if &acked != position {
                        // Only an event of the lost tail can differ from its acknowledgement
                        // (its retry was stored again after the failover), and it was then
                        // followed by a reset.
                        assert_eq!(&position.epoch, before, "{label}: {seen:?}");
                    }
                    events.push(position.clone());
                    at = position.clone();
                }
                Seen::Reset(reason, position) => {
                    resets.push((*reason, position.clone()));
                    at = position.clone();
                }
            }
        }
        assert!(
            resets
                .iter()
                .any(|(reason, position)| *reason == ResetReason::EpochChanged
                    && position.epoch == last_position.epoch),
            "{label}: a client that saw the lost events is told to refetch: {seen:?}"
        );
        // Every acknowledged event after the last reset arrived, once, in order.
        let (_, from) = resets.last().unwrap();
        let expected: Vec<Position> = acknowledged
            .iter()
            .map(|(_, position)| position.clone())
            .filter(|position| position.epoch == from.epoch && position.seq > from.seq)
            .collect();
        let after: Vec<Position> = events
            .iter()
            .filter(|position| position.epoch == from.epoch && position.seq > from.seq)
            .cloned()
            .collect();
        assert_eq!(after, expected, "{label}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_primary_killed_while_a_backend_publishes_loses_nothing_silently() {
    every_client_ends_with_every_acknowledged_event_or_a_reset(Setup::cluster()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_promoted_behind_the_address_loses_nothing_silently() {
    every_client_ends_with_every_acknowledged_event_or_a_reset(Setup::replicated().await).await;
}
