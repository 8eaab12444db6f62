//! The channels a client follows, their positions, and where their updates go: shared by the
//! application's handles and the connection task.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard, PoisonError};

use resync_protocol::bodies::ResetNotice;
use resync_protocol::{Channel, Cursor, Event, Member, Position, PresenceRequest, RecoveryOutcome};
use tokio::sync::{Notify, mpsc};

use crate::{Error, Result, Update};

#[derive(Default)]
pub(crate) struct Registry {
    inner: Mutex<Inner>,
    /// Wakes the connection task when the channel set changes or the client closes.
    pub(crate) changed: Notify,
}

#[derive(Default)]
struct Inner {
    entries: BTreeMap<Channel, Entry>,
    closed: Option<String>,
    /// What ended the client, for a subscription that comes after: the same error its
    /// earlier ones got (a terminal close code, say), not a bare "closed".
    ended: Option<Error>,
    /// Counts registrations, so a channel dropped and followed again (say, from a new
    /// snapshot's position) is told apart from one that stayed.
    registrations: u64,
}

pub(crate) struct Entry {
    pub(crate) position: Option<Position>,
    pub(crate) sender: mpsc::Sender<Result<Update>>,
    /// Which registration this is: a session that subscribed for an earlier one must
    /// subscribe again, from this one's position.
    pub(crate) generation: u64,
    /// What the subscription asks of the channel's presence.
    pub(crate) presence: PresenceWish,
    /// The member list, when the subscription tracks it.
    members: BTreeMap<String, Member>,
    /// A keyed subscription: it asks for the channel's state while it has no position
    /// (docs/protocol.md, section 14), so it starts from the latest value of every key.
    pub(crate) state: bool,
}

/// A subscription's presence: appear among the members (with this request), and/or track
/// the member list (WebSocket only; docs/presence.md).
#[derive(Clone, Debug, Default)]
pub(crate) struct PresenceWish {
    pub(crate) appear: Option<PresenceRequest>,
    pub(crate) track: bool,
}

/// A change of a channel's member list.
pub(crate) enum MembersChange {
    All(Vec<Member>),
    Join(Member),
    Leave(Member),
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn register(
        &self,
        channel: Channel,
        since: Option<Position>,
        sender: mpsc::Sender<Result<Update>>,
        presence: PresenceWish,
        state: bool,
    ) -> Result<()> {
        let mut inner = self.lock();
        if let Some(error) = &inner.ended {
            return Err(error.clone());
        }
        if let Some(reason) = &inner.closed {
            return Err(Error::Closed(reason.clone()));
        }
        if inner
            .entries
            .get(&channel)
            .is_some_and(|entry| !entry.sender.is_closed())
        {
            return Err(Error::AlreadySubscribed(channel.to_string()));
        }
        inner.registrations += 1;
        let generation = inner.registrations;
        inner.entries.insert(
            channel,
            Entry {
                position: since,
                sender,
                generation,
                presence,
                members: BTreeMap::new(),
                state,
            },
        );
        drop(inner);
        self.changed.notify_one();
        Ok(())
    }

    pub(crate) fn unregister(&self, channel: &Channel) {
        let mut inner = self.lock();
        if inner
            .entries
            .get(channel)
            .is_some_and(|entry| entry.sender.is_closed())
        {
            inner.entries.remove(channel);
        }
        drop(inner);
        self.changed.notify_one();
    }

    pub(crate) fn close(&self, reason: &str) {
        let mut inner = self.lock();
        if inner.closed.is_none() {
            inner.closed = Some(reason.to_owned());
        }
        drop(inner);
        self.changed.notify_one();
    }

    /// Closes the registry for good because of `error`: every later subscription gets it.
    pub(crate) fn end_with(&self, reason: &str, error: Error) {
        let mut inner = self.lock();
        if inner.closed.is_none() {
            inner.closed = Some(reason.to_owned());
        }
        if inner.ended.is_none() {
            inner.ended = Some(error);
        }
        drop(inner);
        self.changed.notify_one();
    }

    pub(crate) fn closed(&self) -> Option<String> {
        self.lock().closed.clone()
    }

    pub(crate) fn position(&self, channel: &Channel) -> Option<Position> {
        self.lock()
            .entries
            .get(channel)
            .and_then(|entry| entry.position.clone())
    }

    /// The followed channels (dropping those whose subscription is gone), with positions.
    pub(crate) fn snapshot(&self) -> Vec<(Channel, Option<Position>)> {
        let mut inner = self.lock();
        inner.entries.retain(|_, entry| !entry.sender.is_closed());
        inner
            .entries
            .iter()
            .map(|(channel, entry)| (channel.clone(), entry.position.clone()))
            .collect()
    }

    /// The positions known, as a cursor (channels without a position are left out).
    /// Like [`snapshot`](Self::snapshot), with each channel's registration generation.
    pub(crate) fn wanted(&self) -> Vec<(Channel, Option<Position>, u64)> {
        let mut inner = self.lock();
        inner.entries.retain(|_, entry| !entry.sender.is_closed());
        inner
            .entries
            .iter()
            .map(|(channel, entry)| (channel.clone(), entry.position.clone(), entry.generation))
            .collect()
    }

    /// What `channel`'s subscription asks of its presence.
    pub(crate) fn presence_wish(&self, channel: &Channel) -> PresenceWish {
        self.lock()
            .entries
            .get(channel)
            .map(|entry| entry.presence.clone())
            .unwrap_or_default()
    }

    /// Whether `channel`'s subscription asks for its state now: keyed, with no position yet
    /// (or none since a state read was cut halfway).
    pub(crate) fn wants_state(&self, channel: &Channel) -> bool {
        self.lock()
            .entries
            .get(channel)
            .is_some_and(|entry| entry.state && entry.position.is_none())
    }

    /// Applies a change to `channel`'s member list and hands the whole list to its
    /// subscription (if it tracks members). Waits while the subscription's buffer is full.
    pub(crate) async fn members_changed(&self, channel: &Channel, change: MembersChange) {
        let update = {
            let mut inner = self.lock();
            let Some(entry) = inner.entries.get_mut(channel) else {
                return;
            };
            if !entry.presence.track {
                return;
            }
            match change {
                MembersChange::All(members) => {
                    entry.members = members
                        .into_iter()
                        .map(|member| (member.id.clone(), member))
                        .collect();
                }
                MembersChange::Join(member) => {
                    entry.members.insert(member.id.clone(), member);
                }
                MembersChange::Leave(member) => {
                    entry.members.remove(&member.id);
                }
            }
            (
                entry.sender.clone(),
                Update::Members(entry.members.values().cloned().collect()),
            )
        };
        let _ = update.0.send(Ok(update.1)).await;
    }

    pub(crate) fn cursor(&self) -> Cursor {
        self.snapshot()
            .into_iter()
            .filter_map(|(channel, position)| position.map(|position| (channel, position)))
            .collect()
    }

    /// Sets a channel's position without delivering anything (a fresh start).
    pub(crate) fn set_position(&self, channel: &Channel, position: Position) {
        if let Some(entry) = self.lock().entries.get_mut(channel) {
            entry.position = Some(position);
        }
    }

    /// Hands an event to its channel's subscription, as [`deliver`](Self::deliver) does.
    pub(crate) async fn deliver_event(&self, event: Event) {
        let channel = event.channel.clone();
        self.deliver(&channel, Update::Event(event)).await;
    }

    /// Hands a reset (an SSE `reset` event, a long-poll reply's reset) to its channel's
    /// subscription.
    pub(crate) async fn deliver_reset(&self, notice: ResetNotice) {
        let update = Update::Reset {
            reason: notice.reason,
            position: notice.position,
        };
        self.deliver(&notice.channel, update).await;
    }

    /// Hands an update to the channel's subscription, unless it repeats one already handed
    /// over; advances the position. Waits while the subscription's buffer is full.
    pub(crate) async fn deliver(&self, channel: &Channel, update: Update) {
        let sender = {
            let inner = self.lock();
            let Some(entry) = inner.entries.get(channel) else {
                return;
            };
            if let (Update::Event(event), Some(position)) = (&update, &entry.position)
                && event.position.epoch == position.epoch
                && event.position.seq <= position.seq
            {
                // Already delivered: a duplicate across a reconnect. Never hand it out twice.
                return;
            }
            entry.sender.clone()
        };
        let position = match &update {
            Update::Event(event) => Some(event.position.clone()),
            Update::Reset { position, .. } => Some(position.clone()),
            Update::State {
                position,
                more: false,
                ..
            } => Some(position.clone()),
            Update::State { .. } | Update::Members(_) => None,
        };
        if sender.send(Ok(update)).await.is_ok()
            && let Some(position) = position
        {
            self.set_position(channel, position);
        }
    }

    /// Applies how the server started a subscription: a fresh start sets the position (unless
    /// the client already has one), a reset is handed over; replays need nothing.
    pub(crate) async fn apply_recovery(&self, channel: &Channel, recovery: RecoveryOutcome) {
        match recovery {
            RecoveryOutcome::Fresh { position } => {
                if self.position(channel).is_none() {
                    self.set_position(channel, position);
                }
            }
            RecoveryOutcome::Reset { reason, position } => {
                self.deliver(channel, Update::Reset { reason, position })
                    .await;
            }
            // The state's pages follow (`Update::State`); the position moves to the state's
            // with its last page, so a connection lost before it asks for the state again.
            RecoveryOutcome::State { .. } => {}
            RecoveryOutcome::Replayed { .. } | RecoveryOutcome::UpToDate => {}
        }
    }

    /// Hands a `state` frame to its channel's subscription.
    pub(crate) async fn deliver_state(&self, frame: resync_protocol::ServerFrame) {
        if let resync_protocol::ServerFrame::State {
            channel,
            entries,
            position,
            more,
        } = frame
        {
            let update = Update::State {
                entries,
                position,
                more,
            };
            self.deliver(&channel, update).await;
        }
    }

    /// Ends a channel's subscription with an error.
    pub(crate) async fn fail(&self, channel: &Channel, error: Error) {
        let sender = self
            .lock()
            .entries
            .remove(channel)
            .map(|entry| entry.sender);
        if let Some(sender) = sender {
            let _ = sender.send(Err(error)).await;
        }
    }

    /// Ends every subscription with an error.
    pub(crate) async fn fail_all(&self, error: Error) {
        let senders: Vec<_> = std::mem::take(&mut self.lock().entries)
            .into_values()
            .map(|entry| entry.sender)
            .collect();
        for sender in senders {
            let _ = sender.send(Err(error.clone())).await;
        }
    }
}
