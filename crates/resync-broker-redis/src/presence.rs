//! Presence on Redis: members of every instance in one sorted set per channel, each
//! connection's entry expiring unless its instance refreshes it, and join/leave events on a
//! Pub/Sub channel of their own, fanned out to this process's watchers.
//!
//! Leaves are reliable across instance deaths: a dead instance stops refreshing, its entries
//! expire after `presence_ttl`, and the next sweep (every third of the ttl, by each instance
//! for the channels it has members or watchers in, and before every list or count) removes
//! them and publishes their leaves. The bound, documented in `docs/presence.md`: a member of
//! a dead instance leaves within `presence_ttl` plus a third of it.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use resync_broker::{Presence, PresenceWatch, Result};
use resync_protocol::{Channel, Member};

use crate::{Inner, pubsub, unavailable};

/// This process's own connections in each channel, whose entries it keeps alive.
#[derive(Default)]
pub(crate) struct Local {
    connections: Mutex<HashMap<Channel, HashSet<String>>>,
}

impl Local {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Channel, HashSet<String>>> {
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| {
            u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX)
        })
}

fn connection_key(member_id: &str, connection: &str) -> String {
    format!("{member_id}\n{connection}")
}

impl Inner {
    fn presence_keys(&self, channel: &Channel) -> [String; 3] {
        let prefix = &self.settings.key_prefix;
        ["pconn", "pcount", "pmem"].map(|suffix| format!("{prefix}{{{channel}}}:{suffix}"))
    }

    fn presence_name(&self, channel: &Channel) -> String {
        format!("{}{{{channel}}}:presence", self.settings.key_prefix)
    }

    fn presence_ttl_ms(&self) -> u64 {
        u64::try_from(self.settings.presence_ttl.as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// Removes the channel's expired connections, publishing the leaves they make.
    async fn sweep(&self, channel: &Channel) -> Result<()> {
        let mut invocation = self.scripts.presence_sweep.prepare_invoke();
        for key in self.presence_keys(channel) {
            invocation.key(key);
        }
        invocation.arg(now_ms()).arg(self.presence_name(channel));
        let _: u64 = self.run(invocation).await?;
        Ok(())
    }

    /// Refreshes this process's connections and sweeps every channel it has members or
    /// watchers in. Run every third of the presence ttl.
    pub(crate) async fn keep_presence(&self) {
        let local: Vec<(Channel, Vec<String>)> = self
            .presence_local
            .lock()
            .iter()
            .map(|(channel, keys)| (channel.clone(), keys.iter().cloned().collect()))
            .collect();
        let expiry = now_ms().saturating_add(self.presence_ttl_ms());
        let mut channels: HashSet<Channel> = self.presence_fanout.channels().into_iter().collect();
        for (channel, keys) in local {
            let mut invocation = self.scripts.presence_refresh.prepare_invoke();
            for key in self.presence_keys(&channel) {
                invocation.key(key);
            }
            invocation
                .arg(expiry)
                .arg(self.presence_ttl_ms().saturating_mul(2));
            for key in &keys {
                invocation.arg(key);
            }
            if let Err(error) = self.run_upkeep::<u64>(invocation).await {
                tracing::warn!(target: "resync::redis", %channel, %error, "presence refresh failed");
            }
            channels.insert(channel);
        }
        for channel in channels {
            if let Err(error) = self.sweep(&channel).await {
                tracing::warn!(target: "resync::redis", %channel, %error, "presence sweep failed");
            }
        }
    }
}

#[async_trait]
impl Presence for Inner {
    async fn join(&self, channel: &Channel, member: &Member, connection: &str) -> Result<bool> {
        let body = serde_json::to_string(member).map_err(unavailable)?;
        let mut invocation = self.scripts.presence_join.prepare_invoke();
        for key in self.presence_keys(channel) {
            invocation.key(key);
        }
        invocation
            .arg(&member.id)
            .arg(connection)
            .arg(body)
            .arg(now_ms().saturating_add(self.presence_ttl_ms()))
            .arg(self.presence_ttl_ms().saturating_mul(2))
            .arg(self.presence_name(channel));
        let joined: u64 = self.run(invocation).await?;
        self.presence_local
            .lock()
            .entry(channel.clone())
            .or_default()
            .insert(connection_key(&member.id, connection));
        Ok(joined == 1)
    }

    async fn leave(&self, channel: &Channel, member_id: &str, connection: &str) -> Result<bool> {
        {
            let mut local = self.presence_local.lock();
            if let Some(keys) = local.get_mut(channel) {
                keys.remove(&connection_key(member_id, connection));
                if keys.is_empty() {
                    local.remove(channel);
                }
            }
        }
        let mut invocation = self.scripts.presence_leave.prepare_invoke();
        for key in self.presence_keys(channel) {
            invocation.key(key);
        }
        invocation
            .arg(member_id)
            .arg(connection)
            .arg(self.presence_name(channel));
        let left: u64 = self.run(invocation).await?;
        Ok(left == 1)
    }

    async fn members(&self, channel: &Channel) -> Result<Vec<Member>> {
        self.sweep(channel).await?;
        let [_, _, members_key] = self.presence_keys(channel);
        let bodies: Vec<String> = self.command(redis::cmd("HVALS").arg(members_key)).await?;
        Ok(bodies
            .iter()
            .filter_map(|body| serde_json::from_str(body).ok())
            .collect())
    }

    async fn member_count(&self, channel: &Channel) -> Result<u64> {
        self.sweep(channel).await?;
        let [_, _, members_key] = self.presence_keys(channel);
        self.command(redis::cmd("HLEN").arg(members_key)).await
    }

    async fn watch(&self, channel: &Channel) -> Result<PresenceWatch> {
        let (watch, first) = self.presence_fanout.watch(channel);
        if first {
            let (reply, confirmed) = tokio::sync::oneshot::channel();
            self.commands
                .send(pubsub::Command::SubscribePresence(channel.clone(), reply))
                .await
                .map_err(|_| resync_broker::Error::Closed)?;
            let timeout = self.settings.command_timeout;
            match tokio::time::timeout(timeout, confirmed).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(error))) => return Err(error),
                Ok(Err(_)) => return Err(resync_broker::Error::Closed),
                Err(_) => {
                    return Err(resync_broker::Error::Unavailable(format!(
                        "redis did not confirm SUBSCRIBE within {timeout:?}"
                    )));
                }
            }
        }
        Ok(watch)
    }
}

/// Keeps this process's presence entries alive and sweeps expired ones, until the broker is
/// dropped.
pub(crate) async fn keep_alive(inner: std::sync::Weak<Inner>, period: Duration) {
    let mut interval = tokio::time::interval(period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = inner.upgrade() else {
            return;
        };
        inner.keep_presence().await;
    }
}
