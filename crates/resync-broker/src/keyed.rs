//! Keyed channels: beside its history, a channel whose publishes name a key keeps the latest
//! event of each key, so that a client the history no longer reaches catches up from the
//! current value of every key instead of a reset.
//!
//! The state is read in pages ([`KeyedState::state_page`]), each with the channel's position
//! when it was read, and the pages of one read need not stand for one moment: a key may have
//! moved on between two pages. What makes the whole exact is that every entry carries the seq
//! of the event it holds, and a deleted key stays as a tombstone (with the seq of its delete)
//! for a while. A reader takes the position of its first page, reads every page, then follows
//! the channel from that position, and applies an event only when its seq is past the seq it
//! holds for the event's key: nothing is missed (an event after the position is either in the
//! state or replayed) and nothing is applied twice.
//!
//! [`KeyedMap`] is that state in memory, with its bounds; the memory and disk brokers keep one
//! per keyed channel. [`StatePageCache`] keeps pages a broker read from its store, for the
//! crowd that asks for the same pages at once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use resync_protocol::{Channel, Key, Payload, Position, Seq};

use crate::error::{Error, Result};

/// The latest event of one key of a keyed channel: its data is `None` when the key was
/// deleted (a tombstone, kept for [`KeyedLimits::tombstone_ttl`], so a reader whose pages
/// straddle the delete does not bring the key back from an older event).
pub use resync_protocol::StateEntry;

/// A page of a keyed channel's state, in key order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatePage {
    /// The entries after the asked key, at most the asked number.
    pub entries: Vec<StateEntry>,
    /// The channel's position when the page was read.
    pub position: Position,
    /// The last key of this page when more may follow: ask for the page after it.
    pub next: Option<Key>,
}

/// Reads the state of keyed channels; a broker that keeps them returns one from
/// [`Broker::keyed_state`](crate::Broker::keyed_state). Contract (the conformance suite checks
/// it): a publish that names a key sets that key's entry to the event (its data `null`: a
/// tombstone) in the same step that stores the event, so a page never holds an entry whose
/// event is not stored, and a page's `position` is at or past the seq of every entry in it.
#[async_trait]
pub trait KeyedState: Send + Sync {
    /// The entries of `channel` after `after` (from the first with `None`), at most `limit`
    /// (at least one), with the channel's position. A channel that was never keyed has no
    /// entries.
    async fn state_page(
        &self,
        channel: &Channel,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<StatePage>;
}

/// The bounds of a keyed channel's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyedLimits {
    /// The most keys (tombstones included) a channel keeps; a publish of one more key is
    /// refused ([`Error::KeyedStateFull`]), nothing stored. Default 100,000.
    pub max_keys: usize,
    /// The most bytes of keys and data a channel's state holds; a publish past it is refused
    /// the same way. Default 64 MiB.
    pub max_bytes: usize,
    /// How long a key's entry lives after its last publish (`None`: until it is deleted or
    /// replaced). Default none.
    pub key_ttl: Option<Duration>,
    /// How long a deleted key's tombstone lives: longer than any reader takes to read the
    /// state and catch up. Default 5 minutes.
    pub tombstone_ttl: Duration,
}

impl KeyedLimits {
    /// How long an entry of `data` lives from its publish: a deleted key's tombstone
    /// [`tombstone_ttl`](Self::tombstone_ttl), a value the [`key_ttl`](Self::key_ttl).
    pub fn ttl_of(&self, data: &Payload) -> Option<Duration> {
        if data.as_str() == "null" {
            Some(self.tombstone_ttl)
        } else {
            self.key_ttl
        }
    }
}

impl Default for KeyedLimits {
    fn default() -> Self {
        Self {
            max_keys: 100_000,
            max_bytes: 64 * 1024 * 1024,
            key_ttl: None,
            tombstone_ttl: Duration::from_secs(300),
        }
    }
}

/// About the most bytes of keys and data in one page of state: a page stops at its entry
/// limit or here, whichever comes first (and holds at least one entry).
pub const STATE_PAGE_BYTES: usize = 256 * 1024;

/// Bytes an entry costs its state besides its key and data (map node, seq, times).
pub const STATE_ENTRY_OVERHEAD_BYTES: usize = 96;

/// Which page: the channel and the position it stands for, the key it starts after, and its
/// entry limit.
type StatePageKey = (Channel, Position, Option<Key>, usize);

/// Pages of keyed channels' state a broker read from its store lately, served again to the
/// readers that ask for the same page while the channel stands at the same position: a crowd
/// of clients catching up at once (after a deploy, 5,000 of them) then costs the store one
/// read a page, not one per client. The position in the key is what keeps a kept page true:
/// every publish moves it. A page is served for a short while only ([`new`](Self::new)'s
/// `fresh`), since a key's TTL may end with no publish. Bounded by bytes, oldest out first.
#[derive(Debug)]
pub struct StatePageCache {
    kept: Mutex<KeptPages>,
    max_bytes: usize,
    fresh: Duration,
}

#[derive(Debug, Default)]
struct KeptPages {
    pages: HashMap<StatePageKey, (Instant, StatePage, usize)>,
    /// Pages in the order they were kept, each with the time it was kept: a key kept again
    /// has a later time, so its earlier place in the queue lets go of nothing.
    order: VecDeque<(Instant, StatePageKey)>,
    bytes: usize,
}

impl KeptPages {
    fn remove(&mut self, key: &StatePageKey) {
        if let Some((_, _, bytes)) = self.pages.remove(key) {
            self.bytes -= bytes.min(self.bytes);
        }
    }
}

impl StatePageCache {
    /// Keeps at most `max_bytes` of pages, each served for `fresh` after its read.
    pub fn new(max_bytes: usize, fresh: Duration) -> Self {
        Self {
            kept: Mutex::default(),
            max_bytes,
            fresh,
        }
    }

    /// The page after `after` (at most `limit` entries) of `channel` standing at `position`,
    /// if one was read lately.
    pub fn get(
        &self,
        channel: &Channel,
        position: &Position,
        after: Option<&Key>,
        limit: usize,
    ) -> Option<StatePage> {
        let key = (channel.clone(), position.clone(), after.cloned(), limit);
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        let (read_at, page, _) = kept.pages.get(&key)?;
        if read_at.elapsed() <= self.fresh {
            return Some(page.clone());
        }
        kept.remove(&key);
        None
    }

    /// Keeps `page`, read after `after` with `limit`, for the readers that come next.
    pub fn keep(&self, channel: &Channel, after: Option<&Key>, limit: usize, page: &StatePage) {
        let bytes = page
            .entries
            .iter()
            .map(|entry| entry_bytes(&entry.key, entry.data.as_ref()))
            .sum::<usize>()
            + 256;
        if bytes > self.max_bytes {
            return;
        }
        let key = (
            channel.clone(),
            page.position.clone(),
            after.cloned(),
            limit,
        );
        let now = Instant::now();
        let mut kept = self.kept.lock().unwrap_or_else(PoisonError::into_inner);
        kept.remove(&key);
        kept.bytes += bytes;
        kept.pages.insert(key.clone(), (now, page.clone(), bytes));
        kept.order.push_back((now, key));
        while kept.bytes > self.max_bytes {
            let Some((at, oldest)) = kept.order.pop_front() else {
                break;
            };
            if kept
                .pages
                .get(&oldest)
                .is_some_and(|(kept_at, ..)| *kept_at == at)
            {
                kept.remove(&oldest);
            }
        }
        // Places whose page went (kept again, or gone stale) are skipped as they come up;
        // the queue is bounded by what is kept, so it cannot grow with them.
        if kept.order.len() > 2 * kept.pages.len() + 64 {
            let KeptPages { pages, order, .. } = &mut *kept;
            order.retain(|(at, key)| pages.get(key).is_some_and(|(kept_at, ..)| kept_at == at));
        }
    }
}

#[derive(Clone, Debug)]
struct Kept {
    seq: Seq,
    data: Option<Payload>,
    /// When the entry stops being served (a key's TTL, a tombstone's).
    expires: Option<Instant>,
}

impl Kept {
    fn bytes(&self, key: &Key) -> usize {
        entry_bytes(key, self.data.as_ref())
    }
}

/// What an entry of `key` holding `data` costs a state.
fn entry_bytes(key: &Key, data: Option<&Payload>) -> usize {
    STATE_ENTRY_OVERHEAD_BYTES + key.as_str().len() + data.map_or(0, |data| data.as_str().len())
}

/// The latest event of each key of one channel, in memory, within its [`KeyedLimits`].
#[derive(Debug, Default)]
pub struct KeyedMap {
    entries: BTreeMap<Key, Kept>,
    bytes: usize,
    /// Entries that expire, soonest first (checked lazily: an entry whose time changed is
    /// skipped). Key TTLs and tombstone times interleave, hence a heap, not a queue.
    expiries: BinaryHeap<Reverse<(Instant, Key)>>,
}

impl KeyedMap {
    /// Whether a publish of `data` for `key` fits within `limits` (expired entries are let go
    /// first). Checked before the event is stored, so a refused publish stores nothing.
    pub fn admits(
        &mut self,
        key: &Key,
        data: &Payload,
        limits: &KeyedLimits,
        now: Instant,
    ) -> Result<()> {
        self.expire(now);
        let deletes = data.as_str() == "null";
        let new = Kept {
            seq: Seq::ZERO,
            data: (!deletes).then(|| data.clone()),
            expires: None,
        };
        let (keys, bytes) = match self.entries.get(key) {
            Some(old) => (
                self.entries.len(),
                self.bytes - old.bytes(key) + new.bytes(key),
            ),
            None => (self.entries.len() + 1, self.bytes + new.bytes(key)),
        };
        if keys > limits.max_keys || bytes > limits.max_bytes {
            return Err(Error::KeyedStateFull(format!(
                "the channel keeps at most {} keys and {} bytes of state (it has {} keys, {} bytes)",
                limits.max_keys,
                limits.max_bytes,
                self.entries.len(),
                self.bytes
            )));
        }
        Ok(())
    }

    /// Sets `key` to the event at `seq` (`null` data: a tombstone).
    pub fn set(&mut self, key: Key, seq: Seq, data: &Payload, limits: &KeyedLimits, now: Instant) {
        let expires = limits.ttl_of(data).map(|ttl| now + ttl);
        let kept = Kept {
            seq,
            data: (data.as_str() != "null").then(|| data.clone()),
            expires,
        };
        self.bytes += kept.bytes(&key);
        if let Some(expires) = expires {
            self.expiries.push(Reverse((expires, key.clone())));
        }
        if let Some(old) = self.entries.insert(key.clone(), kept) {
            self.bytes -= old.bytes(&key);
        }
    }

    /// Lets go of the entries whose time has come.
    pub fn expire(&mut self, now: Instant) {
        while let Some(Reverse((when, _))) = self.expiries.peek() {
            if *when > now {
                break;
            }
            let Some(Reverse((when, key))) = self.expiries.pop() else {
                break;
            };
            // Only if the entry still expires then: a later publish of the key moved it.
            if self
                .entries
                .get(&key)
                .is_some_and(|kept| kept.expires == Some(when))
                && let Some(old) = self.entries.remove(&key)
            {
                self.bytes -= old.bytes(&key);
            }
        }
    }

    /// The entries after `after`, at most `limit` (at least one), and whether more follow.
    pub fn page(
        &mut self,
        after: Option<&Key>,
        limit: usize,
        now: Instant,
    ) -> (Vec<StateEntry>, bool) {
        self.expire(now);
        let limit = limit.max(1);
        let range = match after {
            Some(after) => self
                .entries
                .range::<Key, _>((std::ops::Bound::Excluded(after), std::ops::Bound::Unbounded)),
            None => self.entries.range::<Key, _>(..),
        };
        let mut entries = Vec::new();
        let mut more = false;
        let mut bytes = 0;
        for (key, kept) in range {
            if entries.len() == limit || bytes >= STATE_PAGE_BYTES {
                more = true;
                break;
            }
            bytes += kept.bytes(key);
            entries.push(StateEntry {
                key: key.clone(),
                seq: kept.seq,
                data: kept.data.clone(),
            });
        }
        (entries, more)
    }

    /// How many keys are kept (tombstones included).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no key is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The bytes the state counts ([`STATE_ENTRY_OVERHEAD_BYTES`] per entry, its key and data).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

    use super::*;

    fn page_at(seq: u64, data: &str) -> StatePage {
        StatePage {
            entries: vec![StateEntry {
                key: Key::new("k").expect("key"),
                seq: Seq::new(seq),
                data: Some(Payload::from_json(data).expect("json")),
            }],
            position: Position::new(
                resync_protocol::Epoch::new("e").expect("epoch"),
                Seq::new(seq),
            ),
            next: None,
        }
    }

    #[test]
    fn a_kept_page_is_served_only_at_its_position_and_while_fresh() {
        let channel = Channel::new("c").expect("channel");
        let cache = StatePageCache::new(1 << 20, Duration::from_secs(60));
        let page = page_at(5, "1");
        cache.keep(&channel, None, 10, &page);
        assert_eq!(
            cache.get(&channel, &page.position, None, 10),
            Some(page.clone())
        );
        let moved = page_at(6, "1").position;
        assert_eq!(
            cache.get(&channel, &moved, None, 10),
            None,
            "a publish moved it"
        );
        assert_eq!(
            cache.get(&channel, &page.position, None, 11),
            None,
            "another limit"
        );
        let stale = StatePageCache::new(1 << 20, Duration::ZERO);
        stale.keep(&channel, None, 10, &page);
        std::thread::sleep(Duration::from_millis(2));
        assert_eq!(
            stale.get(&channel, &page.position, None, 10),
            None,
            "no longer fresh"
        );
    }

    #[test]
    fn kept_pages_past_the_budget_let_the_oldest_go_not_one_kept_again() {
        let channel = Channel::new("c").expect("channel");
        let one = page_at(1, "1");
        let size = STATE_ENTRY_OVERHEAD_BYTES + 1 + 1 + 256;
        let cache = StatePageCache::new(2 * size, Duration::from_secs(60));
        cache.keep(&channel, None, 10, &one);
        cache.keep(&channel, None, 10, &page_at(2, "2"));
        // `one` kept again: its first place in the queue must not let it go.
        cache.keep(&channel, None, 10, &one);
        cache.keep(&channel, None, 10, &page_at(3, "3"));
        assert!(cache.get(&channel, &one.position, None, 10).is_some());
        assert!(
            cache
                .get(&channel, &page_at(2, "2").position, None, 10)
                .is_none()
        );
        assert!(
            cache
                .get(&channel, &page_at(3, "3").position, None, 10)
                .is_some()
        );
    }

    fn key(name: &str) -> Key {
        Key::new(name).unwrap()
    }

    fn json(text: &str) -> Payload {
        Payload::from_json(text).unwrap()
    }

    #[test]
    fn a_key_holds_its_latest_event_and_a_delete_leaves_a_tombstone_that_expires() {
        let limits = KeyedLimits {
            tombstone_ttl: Duration::from_secs(10),
            ..KeyedLimits::default()
        };
        let now = Instant::now();
        let mut map = KeyedMap::default();
        map.set(key("a"), Seq::new(1), &json("1"), &limits, now);
        map.set(key("b"), Seq::new(2), &json("2"), &limits, now);
        map.set(key("a"), Seq::new(3), &json("3"), &limits, now);
        map.set(key("b"), Seq::new(4), &json("null"), &limits, now);
        let (entries, more) = map.page(None, 10, now);
        assert!(!more);
        assert_eq!(
            entries,
            [
                StateEntry {
                    key: key("a"),
                    seq: Seq::new(3),
                    data: Some(json("3"))
                },
                StateEntry {
                    key: key("b"),
                    seq: Seq::new(4),
                    data: None
                },
            ]
        );
        let (entries, _) = map.page(None, 10, now + Duration::from_secs(11));
        assert_eq!(entries.len(), 1, "the tombstone expired");
        assert_eq!(
            map.bytes(),
            STATE_ENTRY_OVERHEAD_BYTES + 1 + 1,
            "counted as held"
        );
    }

    #[test]
    fn a_ttl_lets_a_key_go_unless_it_was_published_again() {
        let limits = KeyedLimits {
            key_ttl: Some(Duration::from_secs(10)),
            ..KeyedLimits::default()
        };
        let now = Instant::now();
        let mut map = KeyedMap::default();
        map.set(key("a"), Seq::new(1), &json("1"), &limits, now);
        map.set(key("b"), Seq::new(2), &json("2"), &limits, now);
        map.set(
            key("a"),
            Seq::new(3),
            &json("3"),
            &limits,
            now + Duration::from_secs(5),
        );
        let (entries, _) = map.page(None, 10, now + Duration::from_secs(12));
        assert_eq!(entries.len(), 1);
        assert_eq!(
            entries[0].key,
            key("a"),
            "published again at 5 s: lives to 15 s"
        );
    }

    #[test]
    fn pages_go_in_key_order_and_the_bounds_refuse_before_anything_is_stored() {
        let limits = KeyedLimits {
            max_keys: 3,
            ..KeyedLimits::default()
        };
        let now = Instant::now();
        let mut map = KeyedMap::default();
        for (seq, name) in ["c", "a", "b"].into_iter().enumerate() {
            map.admits(&key(name), &json("1"), &limits, now).unwrap();
            map.set(
                key(name),
                Seq::new(seq as u64 + 1),
                &json("1"),
                &limits,
                now,
            );
        }
        let (first, more) = map.page(None, 2, now);
        assert!(more);
        assert_eq!(
            first
                .iter()
                .map(|entry| entry.key.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        let (rest, more) = map.page(Some(&key("b")), 2, now);
        assert!(!more);
        assert_eq!(rest[0].key, key("c"));
        assert!(matches!(
            map.admits(&key("d"), &json("1"), &limits, now),
            Err(Error::KeyedStateFull(_))
        ));
        assert!(
            map.admits(&key("a"), &json("2"), &limits, now).is_ok(),
            "a kept key may change"
        );
    }
}
