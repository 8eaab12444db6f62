//! A keyed channel followed as a map: the latest value of each key, built from the channel's
//! state and kept up to date by its events, by the rule of docs/protocol.md (section 14): a
//! state replaces the map; an event applies only past the seq held for its key.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::Stream;
use resync_protocol::{Channel, Key, Payload, Position, ResetReason, Seq};

use crate::{Client, Result, Subscription, Update};

/// What changed in a [`KeyedSubscription`]'s map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyedChange {
    /// These keys changed value or were deleted. After a state, every key that was held or
    /// is now (the state replaced the map).
    Keys(Vec<Key>),
    /// The channel's history started over (its epoch moved: the server lost it, say): the
    /// map is empty now, and the new history's state is being read.
    Reset {
        /// Why.
        reason: ResetReason,
        /// Where the new history stands.
        position: Position,
    },
}

/// Each key's seq and data (`None`: deleted, kept for its seq).
type Held = BTreeMap<Key, (Seq, Option<Payload>)>;

/// A keyed channel's latest value of each key, as a [`Stream`] of [`KeyedChange`]s; read
/// the map with [`values`](Self::values) or [`get`](Self::get) after each. Made by
/// [`Client::subscribe_keyed`]; dropping it unsubscribes.
pub struct KeyedSubscription {
    client: Client,
    subscription: Subscription,
    held: Held,
    /// A state being read: its pages so far, and the last key read (a page that does not go
    /// on after it is a new state, after a cut halfway).
    building: Option<(Held, Option<Key>)>,
}

pub(crate) fn start(client: Client, channel: Channel) -> KeyedSubscription {
    KeyedSubscription {
        subscription: client.subscribe_state(channel),
        client,
        held: Held::new(),
        building: None,
    }
}

impl std::fmt::Debug for KeyedSubscription {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter
            .debug_struct("KeyedSubscription")
            .field("channel", self.subscription.channel())
            .field("keys", &self.len())
            .finish()
    }
}

impl KeyedSubscription {
    /// The channel followed.
    pub fn channel(&self) -> &Channel {
        self.subscription.channel()
    }

    /// The value of `key`, unless it is not set (or was deleted).
    pub fn get(&self, key: &Key) -> Option<&Payload> {
        self.held.get(key)?.1.as_ref()
    }

    /// Every key set, in key order, with its value.
    pub fn values(&self) -> impl Iterator<Item = (&Key, &Payload)> {
        self.held
            .iter()
            .filter_map(|(key, (_, data))| Some((key, data.as_ref()?)))
    }

    /// How many keys are set.
    pub fn len(&self) -> usize {
        self.values().count()
    }

    /// Whether no key is set.
    pub fn is_empty(&self) -> bool {
        self.values().next().is_none()
    }

    /// The position the map stands at (once its first state is read).
    pub fn position(&self) -> Option<Position> {
        self.subscription.position()
    }

    /// Applies one update of the channel; answers the change it makes, if any.
    fn apply(&mut self, update: Update) -> Option<KeyedChange> {
        match update {
            Update::State { entries, more, .. } => {
                let goes_on = match (&self.building, entries.first()) {
                    (Some((_, Some(last))), Some(first)) => first.key > *last,
                    _ => true,
                };
                if !goes_on {
                    self.building = None;
                }
                let (building, last) = self.building.get_or_insert_with(|| (Held::new(), None));
                for entry in entries {
                    *last = Some(entry.key.clone());
                    building.insert(entry.key, (entry.seq, entry.data));
                }
                if more {
                    return None;
                }
                let (state, _) = self.building.take()?;
                let mut changed: Vec<Key> = self.held.keys().cloned().collect();
                changed.extend(
                    state
                        .keys()
                        .filter(|key| !self.held.contains_key(*key))
                        .cloned(),
                );
                changed.sort();
                self.held = state;
                Some(KeyedChange::Keys(changed))
            }
            Update::Event(event) => {
                // Events follow a state's last page; none comes inside one.
                if self.building.is_some() {
                    return None;
                }
                let key = event.key?;
                let seq = event.position.seq;
                if self.held.get(&key).is_some_and(|(held, _)| *held >= seq) {
                    // Already in the state.
                    return None;
                }
                let data = (event.data.as_str() != "null").then_some(event.data);
                self.held.insert(key.clone(), (seq, data));
                Some(KeyedChange::Keys(vec![key]))
            }
            Update::Reset { reason, position } => {
                // Another history: its keys are not these. Its state, from the start.
                self.held.clear();
                self.building = None;
                let channel = self.subscription.channel().clone();
                // The new one registers when first polled: after the old one is dropped here.
                self.subscription = self.client.subscribe_state(channel.clone());
                Some(KeyedChange::Reset { reason, position })
            }
            Update::Members(_) => None,
        }
    }
}

impl Stream for KeyedSubscription {
    type Item = Result<KeyedChange>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        loop {
            match Pin::new(&mut this.subscription).poll_next(context) {
                Poll::Ready(Some(Ok(update))) => {
                    if let Some(change) = this.apply(update) {
                        return Poll::Ready(Some(Ok(change)));
                    }
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}
