//! Events read from the disk, kept a while in pages shared by every reader.
//!
//! After a restart nothing is in memory, and every client of a channel comes back at once
//! with a position a little behind: without sharing, each of 5,000 resumes would read and
//! decode the same events from the disk 5,000 times. A page is `PAGE` consecutive seqs of
//! one channel in one epoch, read once; only whole pages below the channel's newest event are
//! kept (they no longer change, except that retention may drop their oldest events, which the
//! reader's own decision already excludes). The pages are bounded by bytes, oldest first out.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use resync_broker::EncodedEvent;
use resync_protocol::{Channel, Epoch};

/// Seqs per page.
pub(crate) const PAGE: u64 = 128;

/// Stored events in seq order, each with the time it was stored (ms since 1970).
pub(crate) type Page = Arc<[(u64, EncodedEvent)]>;

/// Which page: a channel, its epoch, and the page's number (`(seq - 1) / PAGE`).
type PageKey = (Channel, Epoch, u64);

/// The pages kept, up to a byte budget.
#[derive(Debug)]
pub(crate) struct PageCache {
    pages: HashMap<PageKey, Page>,
    order: VecDeque<PageKey>,
    bytes: usize,
    max_bytes: usize,
}

impl PageCache {
    pub(crate) fn new(max_bytes: usize) -> Self {
        Self {
            pages: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    pub(crate) fn get(&self, channel: &Channel, epoch: &Epoch, number: u64) -> Option<Page> {
        self.pages
            .get(&(channel.clone(), epoch.clone(), number))
            .cloned()
    }

    /// Keeps `page`, dropping the oldest pages past the budget.
    pub(crate) fn insert(&mut self, channel: &Channel, epoch: &Epoch, number: u64, page: Page) {
        let size = page_bytes(&page);
        if size > self.max_bytes {
            return;
        }
        let key = (channel.clone(), epoch.clone(), number);
        if let Some(old) = self.pages.insert(key.clone(), page) {
            self.bytes -= page_bytes(&old);
        } else {
            self.order.push_back(key);
        }
        self.bytes += size;
        while self.bytes > self.max_bytes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(page) = self.pages.remove(&oldest) {
                self.bytes -= page_bytes(&page);
            }
        }
    }

    /// The bytes the pages hold.
    #[cfg(test)]
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }
}

fn page_bytes(page: &Page) -> usize {
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
                data: Payload::from_json("1").expect("json"),
            });
            (0, event)
        })
        .collect()
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
        let mut cache = PageCache::new(room);
        cache.insert(&channel, &epoch, 0, zero);
        cache.insert(&channel, &epoch, 1, one);
        cache.insert(&channel, &epoch, 2, two);
        assert!(cache.get(&channel, &epoch, 0).is_none());
        assert!(cache.get(&channel, &epoch, 1).is_some());
        assert!(cache.get(&channel, &epoch, 2).is_some());
        assert_eq!(cache.bytes(), room);
        // Another epoch is another page.
        let other = Epoch::new("f").expect("valid");
        assert!(cache.get(&channel, &other, 2).is_none());
    }
}
