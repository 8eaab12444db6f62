//! Events read from the disk, kept a while in pages shared by every reader.
//!
//! After a restart nothing is in memory, and every client of a channel comes back at once
//! with a position a little behind: without sharing, each of 5,000 resumes would read and
//! decode the same events from the disk 5,000 times. A page is `PAGE` consecutive seqs of
//! one channel in one epoch, read once; only whole pages below the channel's newest event are
//! kept (they no longer change, except that retention may drop their oldest events, which the
//! reader's own decision already excludes). The pages are bounded by bytes, oldest first out.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, OnceLock};

use resync_broker::EncodedEvent;
use resync_protocol::{Channel, Epoch};

/// Seqs per page.
pub(crate) const PAGE: u64 = 128;

/// Stored events in seq order, each with the time it was stored (ms since 1970).
pub(crate) type Page = Arc<[(u64, EncodedEvent)]>;

/// Which page: a channel, its epoch, and the page's number (`(seq - 1) / PAGE`).
type PageKey = (Channel, Epoch, u64);

/// A page, filled by the first reader that needs it, while the others that need it at the
/// same time wait for that one read instead of making their own. The cache's lock is not
/// held while the disk is read.
pub(crate) type PageSlot = Arc<OnceLock<Page>>;

/// The pages kept, up to a byte budget.
#[derive(Debug)]
pub(crate) struct PageCache {
    pages: HashMap<PageKey, PageSlot>,
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

    /// The page's slot, made empty if the page is not kept.
    pub(crate) fn slot(&mut self, channel: &Channel, epoch: &Epoch, number: u64) -> PageSlot {
        let key = (channel.clone(), epoch.clone(), number);
        if let Some(slot) = self.pages.get(&key) {
            return slot.clone();
        }
        let slot = PageSlot::default();
        self.pages.insert(key.clone(), slot.clone());
        self.order.push_back(key);
        slot
    }

    /// Counts a page its reader has just filled in `slot`, dropping the oldest pages past the
    /// budget. A slot dropped while it was read is not counted: it is no longer kept.
    pub(crate) fn filled(
        &mut self,
        channel: &Channel,
        epoch: &Epoch,
        number: u64,
        slot: &PageSlot,
    ) {
        let key = (channel.clone(), epoch.clone(), number);
        let kept = self
            .pages
            .get(&key)
            .is_some_and(|kept| Arc::ptr_eq(kept, slot));
        let Some(page) = slot.get().filter(|_| kept) else {
            return;
        };
        self.bytes += page_bytes(page);
        while self.bytes > self.max_bytes {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(slot) = self.pages.remove(&oldest)
                && let Some(page) = slot.get()
            {
                self.bytes -= page_bytes(page);
            }
        }
    }

    /// Drops a slot whose read failed, so that the next reader tries again.
    pub(crate) fn forget(&mut self, channel: &Channel, epoch: &Epoch, number: u64) {
        self.pages.remove(&(channel.clone(), epoch.clone(), number));
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
                key: None,
                data: Payload::from_json("1").expect("json"),
            });
            (0, event)
        })
        .collect()
    }

    fn fill(cache: &mut PageCache, channel: &Channel, epoch: &Epoch, number: u64, page: Page) {
        let slot = cache.slot(channel, epoch, number);
        slot.get_or_init(|| page);
        cache.filled(channel, epoch, number, &slot);
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
        fill(&mut cache, &channel, &epoch, 0, zero);
        fill(&mut cache, &channel, &epoch, 1, one);
        fill(&mut cache, &channel, &epoch, 2, two);
        let kept =
            |cache: &mut PageCache, number| cache.slot(&channel, &epoch, number).get().is_some();
        assert!(kept(&mut cache, 1));
        assert!(kept(&mut cache, 2));
        assert!(!kept(&mut cache, 0), "the oldest page went first");
        assert_eq!(cache.bytes(), room);
        // Another epoch is another page.
        let other = Epoch::new("f").expect("valid");
        assert!(cache.slot(&channel, &other, 2).get().is_none());
    }
}
