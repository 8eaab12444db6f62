//! One Redis or a Redis Cluster: how the broker opens command connections, which Pub/Sub
//! commands it uses, and where the keys that are not a channel's own live.
//!
//! On a cluster every key of a channel carries the hash tag `{<channel>}`, so it sits in one
//! slot and the publish script stays one atomic script on one shard. Live events go out with
//! `SPUBLISH` to the shard channel `<prefix>{<channel>}` (same slot), so a message reaches
//! only that shard's nodes, not every node of the cluster as `PUBLISH` would.
//!
//! The shared epoch of never-published channels (`scripts`) must be reachable from a
//! channel's scripts, so on a cluster there is one per slot: `<prefix>{<tag>}:epoch`, where
//! `<tag>` is a short string that hashes to the channel's slot ([`slot_tag`]). At most
//! 16,384 such keys exist, each made only when a channel of its slot is first read or
//! published, as the single key is on one Redis.

use std::sync::OnceLock;

use redis::aio::MultiplexedConnection;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};

/// The number of hash slots of a Redis Cluster.
pub(crate) const SLOTS: u16 = 16_384;

/// Where the broker's data lives.
#[derive(Clone, Debug)]
pub(crate) enum Topology {
    /// One Redis (or a primary with replicas behind one address).
    Single { url: String },
    /// A Redis Cluster, found from any of these seed nodes.
    Cluster { seeds: Vec<String> },
}

impl Topology {
    pub(crate) fn is_cluster(&self) -> bool {
        matches!(self, Topology::Cluster { .. })
    }

    /// The Pub/Sub publish command: sharded on a cluster.
    pub(crate) fn publish_command(&self) -> &'static str {
        if self.is_cluster() {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }
}

/// CRC16/XMODEM, the checksum Redis Cluster maps keys to slots with.
fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of `key`, by Redis Cluster's rule: the part between the first `{` and the next
/// `}` when it is not empty, else the whole key.
pub(crate) fn slot_of(key: &str) -> u16 {
    let bytes = key.as_bytes();
    let tagged = bytes
        .iter()
        .position(|&byte| byte == b'{')
        .and_then(|open| {
            let rest = &bytes[open + 1..];
            let close = rest.iter().position(|&byte| byte == b'}')?;
            (close > 0).then(|| &rest[..close])
        });
    crc16(tagged.unwrap_or(bytes)) % SLOTS
}

/// A short tag (a decimal number) that hashes to `slot`: a key `…{<tag>}…` lives there.
/// The table is found once, by trying numbers in order (about 150,000 tries, a few ms).
pub(crate) fn slot_tag(slot: u16) -> &'static str {
    static TAGS: OnceLock<Vec<String>> = OnceLock::new();
    let tags = TAGS.get_or_init(|| {
        let mut tags: Vec<Option<String>> = vec![None; usize::from(SLOTS)];
        let mut missing = usize::from(SLOTS);
        let mut number: u64 = 0;
        while missing > 0 {
            let tag = number.to_string();
            let entry = &mut tags[usize::from(crc16(tag.as_bytes()) % SLOTS)];
            if entry.is_none() {
                *entry = Some(tag);
                missing -= 1;
            }
            number += 1;
        }
        tags.into_iter().map(Option::unwrap_or_default).collect()
    });
    &tags[usize::from(slot % SLOTS)]
}

/// A command connection: multiplexed to one Redis, or a cluster connection that routes each
/// command to the shard of its first key (and follows `MOVED` and failovers itself).
#[derive(Clone)]
pub(crate) enum CommandConnection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for CommandConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            CommandConnection::Single(connection) => connection.req_packed_command(cmd),
            CommandConnection::Cluster(connection) => connection.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            CommandConnection::Single(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
            CommandConnection::Cluster(connection) => {
                connection.req_packed_commands(pipeline, offset, count)
            }
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            CommandConnection::Single(connection) => connection.get_db(),
            CommandConnection::Cluster(connection) => connection.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(slot_of("foo"), 12_182);
        assert_eq!(
            slot_of("{user1000}.following"),
            slot_of("{user1000}.followers")
        );
        assert_eq!(slot_of("foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot_of("foo{{bar}}zap"), slot_of("{bar"));
        for key in ["resync:{news}:meta", "a", "x{y}z", "{}", "plain"] {
            assert_eq!(
                redis::cluster_routing::Slot::new(slot_of(key)),
                Some(redis::cluster_routing::Slot::for_key(key)),
                "{key}"
            );
        }
    }

    #[test]
    fn every_slot_has_a_tag_that_hashes_to_it() {
        for slot in 0..SLOTS {
            let tag = slot_tag(slot);
            assert!(!tag.is_empty());
            assert_eq!(slot_of(&format!("resync:{{{tag}}}:epoch")), slot);
        }
    }
}
