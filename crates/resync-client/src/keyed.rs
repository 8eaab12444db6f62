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
    view: KeyedView,
}

/// The map a keyed subscription builds, by the rule of docs/protocol.md (section 14).
#[derive(Default)]
struct KeyedView {
    held: Held,
    /// The deleted keys `held` keeps from a state, by the seq of their delete: kept until the
    /// events pass that seq (an older event of the key, replayed after the state, must not
    /// bring it back), then let go, so a channel of short-lived keys does not grow the map.
    tombstones: BTreeMap<Seq, Key>,
    /// A state being read.
    building: Option<Building>,
}

/// A state being read: its pages so far, the last key read, and the position every page of
/// it stands for.
struct Building {
    held: Held,
    last: Option<Key>,
    position: Position,
}

/// Sets `key` in `held` unless it holds a newer event of it.
fn keep_newer(held: &mut Held, key: Key, seq: Seq, data: Option<Payload>) {
    if held.get(&key).is_none_or(|(kept, _)| *kept < seq) {
        held.insert(key, (seq, data));
    }
}

pub(crate) fn start(client: Client, channel: Channel) -> KeyedSubscription {
    KeyedSubscription {
        subscription: client.subscribe_state(channel),
        client,
        view: KeyedView::default(),
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
        self.view.held.get(key)?.1.as_ref()
    }

    /// Every key set, in key order, with its value.
    pub fn values(&self) -> impl Iterator<Item = (&Key, &Payload)> {
        self.view
            .held
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
}

impl KeyedView {
    /// Lets go of the tombstones at or before `seq`: the events are past them.
    fn forget_tombstones_through(&mut self, seq: Seq) {
        while let Some(entry) = self.tombstones.first_entry() {
            if *entry.key() > seq {
                break;
            }
            let (at, key) = entry.remove_entry();
            if self
                .held
                .get(&key)
                .is_some_and(|(held, data)| *held == at && data.is_none())
            {
                self.held.remove(&key);
            }
        }
    }

    /// Applies one update of the channel; answers the change it makes, if any.
    fn apply(&mut self, update: Update) -> Option<KeyedChange> {
        match update {
            Update::State {
                entries,
                position,
                more,
            } => {
                // Every page of one state stands for one position; a page of another position,
                // or one that does not go on after the last key read, is a new state (after a
                // cut halfway: long polling says so no other way).
                let goes_on = self.building.as_ref().is_some_and(|building| {
                    building.position == position
                        && match (&building.last, entries.first()) {
                            (Some(last), Some(first)) => first.key > *last,
                            _ => true,
                        }
                });
                if !goes_on {
                    self.building = Some(Building {
                        held: Held::new(),
                        last: None,
                        position,
                    });
                }
                let building = self.building.as_mut()?;
                for entry in entries {
                    building.last = Some(entry.key.clone());
                    keep_newer(&mut building.held, entry.key, entry.seq, entry.data);
                }
                if more {
                    return None;
                }
                let state = self.building.take()?.held;
                let mut changed: Vec<Key> = self.held.keys().cloned().collect();
                changed.extend(
                    state
                        .keys()
                        .filter(|key| !self.held.contains_key(*key))
                        .cloned(),
                );
                changed.sort();
                self.held = state;
                self.tombstones = self
                    .held
                    .iter()
                    .filter(|(_, (_, data))| data.is_none())
                    .map(|(key, (seq, _))| (*seq, key.clone()))
                    .collect();
                Some(KeyedChange::Keys(changed))
            }
            Update::Event(event) => {
                let key = event.key?;
                let seq = event.position.seq;
                let data = (event.data.as_str() != "null").then_some(event.data);
                if let Some(building) = self.building.as_mut() {
                    // None comes inside a state; if one does, the state's pages keep it.
                    keep_newer(&mut building.held, key, seq, data);
                    return None;
                }
                self.forget_tombstones_through(seq);
                if self.held.get(&key).is_some_and(|(held, _)| *held >= seq) {
                    // Already in the state.
                    return None;
                }
                match data {
                    Some(data) => {
                        self.held.insert(key.clone(), (seq, Some(data)));
                    }
                    // Every later event has a later seq: nothing older can bring it back.
                    None => {
                        self.held.remove(&key);
                    }
                }
                Some(KeyedChange::Keys(vec![key]))
            }
            Update::Reset { reason, position } => {
                // Another history: its keys are not these. Its state, from the start.
                *self = Self::default();
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
                    let Some(change) = this.view.apply(update) else {
                        continue;
                    };
                    if let KeyedChange::Reset { .. } = change {
                        // Another history: its state, from the start. The new subscription
                        // registers when first polled, after the old one is dropped here.
                        let channel = this.subscription.channel().clone();
                        this.subscription = this.client.subscribe_state(channel);
                    }
                    return Poll::Ready(Some(Ok(change)));
                }
                Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(error))),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use resync_protocol::{Epoch, Event, StateEntry};

    use super::*;

    fn key(name: &str) -> Key {
        Key::new(name).expect("key")
    }

    fn at(seq: u64) -> Position {
        Position::new(Epoch::new("e").expect("epoch"), Seq::new(seq))
    }

    fn entry(name: &str, seq: u64, data: Option<&str>) -> StateEntry {
        StateEntry {
            key: key(name),
            seq: Seq::new(seq),
            data: data.map(|data| Payload::from_json(data).expect("json")),
        }
    }

    fn page(entries: Vec<StateEntry>, position: u64, more: bool) -> Update {
        Update::State {
            entries,
            position: at(position),
            more,
        }
    }

    fn event(name: &str, seq: u64, data: &str) -> Update {
        Update::Event(Event {
            channel: Channel::new("prices").expect("channel"),
            position: at(seq),
            key: Some(key(name)),
            data: Payload::from_json(data).expect("json"),
        })
    }

    fn values(view: &KeyedView) -> Vec<(String, String)> {
        view.held
            .iter()
            .filter_map(|(key, (_, data))| {
                Some((key.to_string(), data.as_ref()?.as_str().to_owned()))
            })
            .collect()
    }

    #[test]
    fn a_state_then_only_newer_events_apply() {
        let mut view = KeyedView::default();
        assert!(
            view.apply(page(vec![entry("a", 3, Some("1"))], 5, true))
                .is_none()
        );
        let change = view.apply(page(vec![entry("b", 6, Some("2"))], 5, false));
        assert_eq!(change, Some(KeyedChange::Keys(vec![key("a"), key("b")])));
        // b's event at 6 is already in the state; a's at 7 is new.
        assert_eq!(view.apply(event("b", 6, "2")), None);
        assert_eq!(
            view.apply(event("a", 7, "9")),
            Some(KeyedChange::Keys(vec![key("a")]))
        );
        assert_eq!(
            values(&view),
            [("a".into(), "9".into()), ("b".into(), "2".into())]
        );
    }

    #[test]
    fn a_state_started_over_at_another_position_drops_the_half_read_one() {
        let mut view = KeyedView::default();
        view.apply(page(
            vec![entry("a", 1, Some("1")), entry("m", 2, Some("2"))],
            2,
            true,
        ));
        // Cut halfway; the new state's first page is empty (dead entries skipped), then z.
        view.apply(page(vec![], 9, true));
        view.apply(page(vec![entry("z", 9, Some("3"))], 9, false));
        assert_eq!(values(&view), [("z".into(), "3".into())]);
    }

    #[test]
    fn a_tombstone_holds_until_the_events_pass_it_then_goes() {
        let mut view = KeyedView::default();
        view.apply(page(
            vec![entry("a", 8, None), entry("b", 4, Some("1"))],
            5,
            false,
        ));
        // An older event of a, replayed after the state, does not bring it back.
        assert_eq!(view.apply(event("a", 6, "\"old\"")), None);
        assert!(
            view.held.contains_key(&key("a")),
            "kept while events are before it"
        );
        view.apply(event("b", 9, "2"));
        assert!(
            !view.held.contains_key(&key("a")),
            "gone once the events passed it"
        );
        // A live delete keeps nothing.
        view.apply(event("b", 10, "null"));
        assert!(view.held.is_empty());
    }

    #[test]
    fn an_event_inside_a_state_is_kept_by_its_seq() {
        let mut view = KeyedView::default();
        view.apply(page(vec![entry("a", 1, Some("1"))], 3, true));
        assert_eq!(view.apply(event("b", 4, "5")), None);
        view.apply(page(vec![entry("b", 2, Some("2"))], 3, false));
        assert_eq!(
            values(&view),
            [("a".into(), "1".into()), ("b".into(), "5".into())]
        );
    }

    #[test]
    fn a_reset_empties_the_map() {
        let mut view = KeyedView::default();
        view.apply(page(vec![entry("a", 1, Some("1"))], 1, false));
        let change = view.apply(Update::Reset {
            reason: resync_protocol::ResetReason::EpochChanged,
            position: at(0),
        });
        assert!(matches!(change, Some(KeyedChange::Reset { .. })));
        assert!(view.held.is_empty() && view.tombstones.is_empty());
    }
}
