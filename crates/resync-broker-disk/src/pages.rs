//! Events read from the disk, kept a while in pages shared by every reader.
//!
//! After a restart nothing is in memory, and every client of a channel comes back at once
//! with a position a little behind: without sharing, each of 5,000 resumes would read and
//! decode the same events from the disk 5,000 times. A page is `PAGE` consecutive seqs of
//! one channel in one epoch, read once; only whole pages below the channel's newest event are
//! kept (they no longer change, except that retention may drop their oldest events, which the
//! reader's own decision already excludes). The pages are bounded by bytes, oldest first out.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, OnceLock};

use resync_broker::EncodedEvent;
use resync_protocol::{Channel, Epoch};

/// Seqs per page.
pub(crate) const PAGE: u64 = 128;

/// Stored events in seq order, each with the time it was stored (ms since 1970).
pub(crate) type Page = Arc<[(u64, EncodedEvent)]>;

/// Which page: a channel, its epoch, and the page's number (`(seq - 1) / PAGE`).
pub(crate) type PageKey = (Channel, Epoch, u64);

/// A value (a page), filled by the first reader that needs it, while the others that need it
/// at the same time wait for that one read instead of making their own. The cache's lock is
/// not held while the disk is read.
pub(crate) type Slot<V> = Arc<OnceLock<V>>;

/// Pages of stored events (`PAGE` seqs each), by channel, epoch and number.
pub(crate) type PageCache = SharedCache<PageKey, Page>;

/// Values read from the disk once and shared by every reader, up to a byte budget, oldest
/// first out (the pages of events above).
#[derive(Debug)]
pub(crate) struct SharedCache<K, V> {
    slots: HashMap<K, Slot<V>>,
    order: VecDeque<K>,
    bytes: usize,
    max_bytes: usize,
    size_of: fn(&V) -> usize,
}

impl<K: Hash + Eq + Clone, V> SharedCache<K, V> {
    pub(crate) fn new(max_bytes: usize, size_of: fn(&V) -> usize) -> Self {
        Self {
            slots: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_bytes,
            size_of,
        }
    }

    /// The value's slot, made empty if the value is not kept.
    pub(crate) fn slot(&mut self, key: &K) -> Slot<V> {
        if let Some(slot) = self.slots.get(key) {
            return slot.clone();
        }
        let slot = Slot::default();
        self.slots.insert(key.clone(), slot.clone());
        self.order.push_back(key.clone());
        slot
    }

    /// Counts a value its reader has just filled in `slot`, dropping the oldest past the
    /// budget. A slot dropped while it was read is not counted: it is no longer kept.
    pub(crate) fn filled(&mut self, key: &K, slot: &Slot<V>) {
        let kept = self
            .slots
            .get(key)
            .is_some_and(|kept| Arc::ptr_eq(kept, slot));
        let Some(value) = slot.get().filter(|_| kept) else {
            return;
        };
        self.bytes += (self.size_of)(value);
        while self.bytes > self.max_bytes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(slot) = self.slots.remove(&oldest)
                && let Some(value) = slot.get()
            {
                self.bytes -= (self.size_of)(value);
            }
        }
    }

    /// Drops a slot whose read failed (or whose value is too old), so that the next reader
    /// reads again.
    pub(crate) fn forget(&mut self, key: &K) {
        if let Some(slot) = self.slots.remove(key)
            && let Some(value) = slot.get()
        {
            self.bytes -= (self.size_of)(value).min(self.bytes);
        }
    }

    /// The bytes the values hold.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

pub(crate) fn page_bytes(page: &Page) -> usize {
    page.iter().map(|(_, event)| event.held_bytes()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use resync_protocol::{Event, Payload, Position, Seq};

    fn page(channel: &Channel, epoch: &Epoch, seqs: std::ops::RangeInclusive<u64>) -> Page {
        seqs.map(|seq| {
            let event = EncodedEvent::new(Event {
                channel: channel.clone(),
                position: Position::new(epoch.clone(), Seq::new(seq)),
                key: None,
                data: Payload::from_json("1").expect("json"),
            });
            (0, event)
        })
        .collect()
    }

    fn fill(cache: &mut PageCache, channel: &Channel, epoch: &Epoch, number: u64, page: Page) {
        let key = (channel.clone(), epoch.clone(), number);
        let slot = cache.slot(&key);
        slot.get_or_init(|| page);
        cache.filled(&key, &slot);
    }

    #[test]
    fn pages_past_the_budget_drop_the_oldest_first() {
        let channel = Channel::new("a").expect("valid");
        let epoch = Epoch::new("e").expect("valid");
        let (zero, one, two) = (
            page(&channel, &epoch, 1..=128),
            page(&channel, &epoch, 129..=256),
            page(&channel, &epoch, 257..=384),
        );
        // Room for the last two pages, not for all three.
        let room = page_bytes(&one) + page_bytes(&two);
        let mut cache = PageCache::new(room, page_bytes);
        fill(&mut cache, &channel, &epoch, 0, zero);
        fill(&mut cache, &channel, &epoch, 1, one);
        fill(&mut cache, &channel, &epoch, 2, two);
        let kept = |cache: &mut PageCache, number| {
            cache
                .slot(&(channel.clone(), epoch.clone(), number))
                .get()
                .is_some()
        };
        assert!(kept(&mut cache, 1));
        assert!(kept(&mut cache, 2));
        assert!(!kept(&mut cache, 0), "the oldest page went first");
        assert_eq!(cache.bytes(), room);
        // Another epoch is another page.
        let other = Epoch::new("f").expect("valid");
        assert!(
            cache
                .slot(&(channel.clone(), other.clone(), 2))
                .get()
                .is_none()
        );
    }
}
