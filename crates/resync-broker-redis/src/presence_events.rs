//! Join and leave events as they arrive over Pub/Sub (`j<member json>`, `l<member json>`,
//! published by the presence scripts), and this process's watchers of them: what the Pub/Sub
//! task delivers to, apart from the presence queries of `presence.rs` (which asks the Pub/Sub
//! task to subscribe; this module asks nothing of it, so the two do not import each other).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use resync_broker::{PresenceEvent, PresenceFanout, PresenceWatch};
use resync_protocol::{Channel, Member};

/// This process's watchers of each channel's joins and leaves, shared with the Pub/Sub task.
#[derive(Default)]
pub(crate) struct Fanout {
    watchers: Mutex<HashMap<Channel, PresenceFanout>>,
}

impl Fanout {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Channel, PresenceFanout>> {
        self.watchers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Hands an event to the channel's local watchers; `false` when none is left (the
    /// Pub/Sub task then unsubscribes).
    pub(crate) fn deliver(&self, channel: &Channel, event: PresenceEvent) -> bool {
        let mut watchers = self.lock();
        match watchers.get(channel) {
            Some(fanout) if fanout.watchers() > 0 => fanout.send(event),
            Some(_) => {
                watchers.remove(channel);
                false
            }
            None => false,
        }
    }

    /// Channels with local watchers (to subscribe to again after a reconnect).
    pub(crate) fn channels(&self) -> Vec<Channel> {
        self.lock().keys().cloned().collect()
    }

    pub(crate) fn watch(&self, channel: &Channel) -> (PresenceWatch, bool) {
        let mut watchers = self.lock();
        let first = !watchers.contains_key(channel);
        let watch = watchers.entry(channel.clone()).or_default().watch();
        (watch, first)
    }
}

/// Decodes `j<member json>` / `l<member json>`.
pub(crate) fn decode_event(payload: &str) -> Option<PresenceEvent> {
    let (kind, member) = payload.split_at_checked(1)?;
    let member: Member = serde_json::from_str(member).ok()?;
    match kind {
        "j" => Some(PresenceEvent::Join(member)),
        "l" => Some(PresenceEvent::Leave(member)),
        _ => None,
    }
}

/// A shared handle, so the Pub/Sub task can reach the fan-out.
pub(crate) type SharedFanout = Arc<Fanout>;
