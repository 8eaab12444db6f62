//! One Redis or a Redis Cluster, started by the test, behind one interface, so a test of the
//! Redis broker or of reference servers on Redis runs on both.

use std::time::Duration;

use resync_broker::Retention;
use resync_broker_redis::{RedisBroker, RedisBrokerBuilder};

use crate::redis_cluster::RedisCluster;
use crate::redis_server::RedisServer;

/// A broker on `redis` keeping `max_events` per channel and `queue` events per subscriber,
/// whose commands time out after 500 ms.
pub fn one_broker(redis: &RedisServer, max_events: usize, queue: usize) -> RedisBroker {
    configured(RedisBroker::builder(redis.url()), max_events, queue, 500)
}

/// The same on `cluster`, with 2 s for a command (room for the cluster client's routing).
pub fn cluster_broker(cluster: &RedisCluster, max_events: usize, queue: usize) -> RedisBroker {
    configured(
        RedisBroker::cluster_builder(cluster.seeds()),
        max_events,
        queue,
        2_000,
    )
}

fn configured(
    builder: RedisBrokerBuilder,
    max_events: usize,
    queue: usize,
    timeout_ms: u64,
) -> RedisBroker {
    builder
        .retention(Retention::default().with_max_events(max_events))
        .subscriber_queue(queue)
        .command_timeout(Duration::from_millis(timeout_ms))
        .build()
        .expect("a redis broker")
}

pub enum Redis {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl Redis {
    /// Starts one Redis, or a cluster of three primaries with a replica each.
    pub fn start(cluster: bool) -> Self {
        if cluster {
            Redis::Cluster(RedisCluster::start())
        } else {
            Redis::One(RedisServer::start())
        }
    }

    /// A broker builder for it.
    pub fn builder(&self) -> RedisBrokerBuilder {
        match self {
            Redis::One(redis) => RedisBroker::builder(redis.url()),
            Redis::Cluster(cluster) => RedisBroker::cluster_builder(cluster.seeds()),
        }
    }

    /// A broker keeping `max_events` per channel, `queue` events per subscriber.
    pub fn broker(&self, max_events: usize, queue: usize) -> RedisBroker {
        match self {
            Redis::One(redis) => one_broker(redis, max_events, queue),
            Redis::Cluster(cluster) => cluster_broker(cluster, max_events, queue),
        }
    }

    pub fn is_cluster(&self) -> bool {
        matches!(self, Redis::Cluster(_))
    }

    /// The reference server's arguments for it.
    pub fn server_arguments(&self) -> Vec<String> {
        match self {
            Redis::One(redis) => ["--broker", "redis", "--redis-url", &redis.url()]
                .map(str::to_owned)
                .to_vec(),
            Redis::Cluster(cluster) => cluster.server_arguments(),
        }
    }

    /// Kills it (every node of a cluster).
    pub fn stop(&mut self) {
        match self {
            Redis::One(redis) => redis.stop(),
            Redis::Cluster(cluster) => cluster.stop_all(),
        }
    }

    /// Starts it again with its data.
    pub fn restart_keeping_data(&mut self) {
        match self {
            Redis::One(redis) => redis.restart_keeping_data(),
            Redis::Cluster(cluster) => cluster.restart_all(true),
        }
    }

    /// Starts it again empty, as if its data were lost.
    pub fn restart_empty(&mut self) {
        match self {
            Redis::One(redis) => redis.restart_empty(),
            Redis::Cluster(cluster) => cluster.restart_all(false),
        }
    }
}
