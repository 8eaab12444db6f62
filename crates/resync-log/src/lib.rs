//! Bounded, per-channel event history: the memory a broker needs to replay what a client
//! missed.
//!
//! A [`ChannelLog`] holds the most recent events of one channel in publish order, numbered by
//! consecutive [`Seq`]s within one [`Epoch`]. [`ChannelLog::append`] stores an event and returns
//! its [`Position`]; [`ChannelLog::read_since`] answers "what came after this position?" with
//! the events, with "nothing", or with a reset when the history no longer reaches back.
//!
//! The answer is decided by [`decide_read`], a pure function of the reader's position, the
//! newest position and the oldest seq kept, which brokers with history elsewhere (Redis)
//! call too.
//!
//! Retention is by count and by age ([`Retention`]), so memory stays bounded however fast a
//! channel is published to. Appending is O(1) (amortized; an append may expire old events, each
//! of which is removed once), and a read costs O(events returned).
//!
//! The log is sans-IO: it never reads a clock or takes a lock. Callers pass `now` and guard
//! the log with whatever lock they use, which keeps it deterministic under test.
//!
//! ```
//! use std::time::{Duration, Instant};
//! use resync_log::{ChannelLog, ReadOutcome, Retention};
//! use resync_protocol::{Epoch, Position, ResetReason, Seq};
//!
//! let epoch = Epoch::new("e1").unwrap();
//! let mut log = ChannelLog::new(epoch.clone(), Retention::default().with_max_events(2));
//! let now = Instant::now();
//! for item in ["a", "b", "c"] {
//!     log.append(item, now);
//! }
//! // Events 2 and 3 are kept; a reader at seq 1 gets both, one at seq 0 is too far back.
//! match log.read_since(&Position::new(epoch.clone(), Seq::new(1)), 100, now) {
//!     ReadOutcome::Replayed { events, .. } => assert_eq!(events, ["b", "c"]),
//!     other => panic!("{other:?}"),
//! }
//! assert!(matches!(
//!     log.read_since(&Position::start_of(epoch), 100, now),
//!     ReadOutcome::Reset { reason: ResetReason::Truncated, .. }
//! ));
//! ```

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use resync_protocol::{Epoch, Position, ResetReason, Seq};

/// How much history a channel keeps. Whichever limit is reached first trims the oldest events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retention {
    max_events: usize,
    max_age: Option<Duration>,
    max_bytes: Option<usize>,
}

impl Default for Retention {
    /// 10,000 events, kept for at most 24 hours: long enough to ride out a deploy or a laptop
    /// lid closed overnight on a busy channel, at a few MB for a 100-byte payload channel.
    fn default() -> Self {
        Self {
            max_events: 10_000,
            max_age: Some(Duration::from_secs(24 * 60 * 60)),
            max_bytes: None,
        }
    }
}

impl Retention {
    /// The most events kept per channel. Defaults to 10,000. Zero keeps no history: every
    /// resume that missed anything is a reset.
    pub fn with_max_events(mut self, max_events: usize) -> Self {
        self.max_events = max_events;
        self
    }

    /// The longest an event is kept, or `None` for no age limit. Defaults to 24 hours.
    pub fn with_max_age(mut self, max_age: Option<Duration>) -> Self {
        self.max_age = max_age;
        self
    }

    /// The most bytes of events kept per channel, counted as given to
    /// [`ChannelLog::append_sized`], or `None` for no byte limit. Defaults to none.
    pub fn with_max_bytes(mut self, max_bytes: Option<usize>) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// The most bytes of events kept per channel.
    pub fn max_bytes(&self) -> Option<usize> {
        self.max_bytes
    }

    /// The most events kept per channel.
    pub fn max_events(&self) -> usize {
        self.max_events
    }

    /// The longest an event is kept.
    pub fn max_age(&self) -> Option<Duration> {
        self.max_age
    }
}

/// The answer to "what came after this position?".
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReadOutcome<T> {
    /// The events right after the position, oldest first and contiguous: the first has seq
    /// `since.seq + 1`. There may be more than `limit` missed events, in which case the last
    /// returned seq is below `latest.seq`.
    Replayed {
        /// The missed events, at most `limit` of them.
        events: Vec<T>,
        /// The channel's newest position.
        latest: Position,
    },
    /// Nothing came after the position.
    UpToDate {
        /// The channel's newest position (equal to the one asked about).
        latest: Position,
    },
    /// The position cannot be resumed.
    Reset {
        /// Why.
        reason: ResetReason,
        /// The channel's newest position, where a reader continues after refetching.
        latest: Position,
    },
}

/// What a history read must answer, decided from three facts only: the reader's position,
/// the channel's newest position, and the oldest seq the history still holds.
///
/// [`ChannelLog::read_since`] decides with it, and so does every broker whose history lives
/// elsewhere (Redis, or your own): one decision, so the brokers cannot drift apart.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadDecision {
    /// History holds every event after the reader's position: read from `first` on.
    Replay {
        /// The seq right after the reader's position.
        first: Seq,
    },
    /// The reader has the newest event.
    UpToDate,
    /// The position cannot be resumed.
    Reset(ResetReason),
}

/// Decides a read of history after `since`, on a channel at `latest` whose oldest readable
/// event is `oldest` (`None` when history holds nothing). A broker that reads only from
/// `since + 1` on may pass the first seq it found there.
///
/// ```
/// use resync_log::{ReadDecision, decide_read};
/// use resync_protocol::{Epoch, Position, ResetReason, Seq};
///
/// let epoch = Epoch::new("e1").unwrap();
/// let at = |seq| Position::new(epoch.clone(), Seq::new(seq));
/// assert_eq!(decide_read(&at(3), &at(9), Some(Seq::new(2))), ReadDecision::Replay { first: Seq::new(4) });
/// assert_eq!(decide_read(&at(9), &at(9), Some(Seq::new(2))), ReadDecision::UpToDate);
/// assert_eq!(decide_read(&at(1), &at(9), Some(Seq::new(5))), ReadDecision::Reset(ResetReason::Truncated));
/// assert_eq!(decide_read(&at(10), &at(9), None), ReadDecision::Reset(ResetReason::PositionAhead));
/// ```
pub fn decide_read(since: &Position, latest: &Position, oldest: Option<Seq>) -> ReadDecision {
    if since.epoch != latest.epoch {
        return ReadDecision::Reset(ResetReason::EpochChanged);
    }
    if since.seq > latest.seq {
        return ReadDecision::Reset(ResetReason::PositionAhead);
    }
    let Some(first) = since.seq.next().filter(|_| since.seq < latest.seq) else {
        return ReadDecision::UpToDate;
    };
    match oldest {
        Some(oldest) if oldest <= first => ReadDecision::Replay { first },
        _ => ReadDecision::Reset(ResetReason::Truncated),
    }
}

/// The retained history of one channel in one epoch.
#[derive(Debug)]
pub struct ChannelLog<T> {
    epoch: Epoch,
    last_seq: Seq,
    /// When each event was appended, its size in bytes, and the event.
    entries: VecDeque<(Instant, usize, T)>,
    /// The sizes of the entries, added up.
    bytes: usize,
    retention: Retention,
}

impl<T: Clone> ChannelLog<T> {
    /// An empty history in `epoch`; the first append gets seq 1.
    pub fn new(epoch: Epoch, retention: Retention) -> Self {
        Self {
            epoch,
            last_seq: Seq::ZERO,
            entries: VecDeque::new(),
            bytes: 0,
            retention,
        }
    }

    /// An empty history in `epoch` whose newest event, kept elsewhere, was `last_seq`: the next
    /// append gets `last_seq + 1`. A broker that keeps older events on disk holds only the
    /// recent ones in such a log.
    pub fn continuing(epoch: Epoch, last_seq: Seq, retention: Retention) -> Self {
        Self {
            last_seq,
            ..Self::new(epoch, retention)
        }
    }

    /// The epoch of this history.
    pub fn epoch(&self) -> &Epoch {
        &self.epoch
    }

    /// The position of the newest event (seq 0 when nothing was appended).
    pub fn position(&self) -> Position {
        Position::new(self.epoch.clone(), self.last_seq)
    }

    /// How many events are retained.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no event is retained.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The seq of the oldest retained event, or `None` when none is retained.
    pub fn oldest_seq(&self) -> Option<Seq> {
        if self.entries.is_empty() {
            return None;
        }
        Some(Seq::new(
            self.last_seq.get() - self.entries.len() as u64 + 1,
        ))
    }

    /// The time the newest retained event was appended.
    pub fn newest_append_time(&self) -> Option<Instant> {
        self.entries.back().map(|(appended_at, _, _)| *appended_at)
    }

    /// Stores `item` as the next event and returns its position.
    ///
    /// # Panics
    /// After `u64::MAX` appends to one epoch, which at a billion events a second takes over 500
    /// years.
    pub fn append(&mut self, item: T, now: Instant) -> Position {
        self.append_sized(item, 0, now)
    }

    /// Like [`append`](Self::append), for an event of `bytes` bytes, which count against
    /// [`Retention::with_max_bytes`] and [`bytes`](Self::bytes).
    pub fn append_sized(&mut self, item: T, bytes: usize, now: Instant) -> Position {
        self.last_seq = self
            .last_seq
            .next()
            .expect("a channel cannot reach u64::MAX events in one epoch");
        self.entries.push_back((now, bytes, item));
        self.bytes += bytes;
        self.trim(now);
        self.position()
    }

    /// The bytes of the events kept, as given to [`append_sized`](Self::append_sized).
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Drops the oldest events until at least `bytes` bytes are freed or none is left (a
    /// process-wide memory budget asks for it); returns the bytes freed. Readers further
    /// back then get a `truncated` reset, as with any trimmed history.
    pub fn shed_oldest(&mut self, bytes: usize) -> usize {
        let mut freed = 0;
        while freed < bytes {
            let Some(size) = self.pop_oldest() else {
                break;
            };
            freed += size;
        }
        freed
    }

    fn pop_oldest(&mut self) -> Option<usize> {
        let (_, size, _) = self.entries.pop_front()?;
        self.bytes -= size;
        Some(size)
    }

    /// Drops events past the age limit (the count and byte limits are enforced on append).
    pub fn expire(&mut self, now: Instant) {
        self.trim(now);
    }

    fn trim(&mut self, now: Instant) {
        while self.entries.len() > self.retention.max_events {
            self.pop_oldest();
        }
        if let Some(max_bytes) = self.retention.max_bytes {
            while self.bytes > max_bytes && self.pop_oldest().is_some() {}
        }
        if let Some(max_age) = self.retention.max_age {
            while let Some((appended_at, _, _)) = self.entries.front() {
                if now.saturating_duration_since(*appended_at) > max_age {
                    self.pop_oldest();
                } else {
                    break;
                }
            }
        }
    }

    /// The events after `since`, at most `limit` of them, or why there are none.
    pub fn read_since(&mut self, since: &Position, limit: usize, now: Instant) -> ReadOutcome<T> {
        self.trim(now);
        let latest = self.position();
        let first = match decide_read(since, &latest, self.oldest_seq()) {
            ReadDecision::Replay { first } => first,
            ReadDecision::UpToDate => return ReadOutcome::UpToDate { latest },
            ReadDecision::Reset(reason) => return ReadOutcome::Reset { reason, latest },
        };
        // A replay means the oldest kept event is at or before `first`.
        let oldest = self.oldest_seq().unwrap_or(first);
        let start = usize::try_from(first.get() - oldest.get()).unwrap_or(usize::MAX);
        let events = self
            .entries
            .range(start..)
            .take(limit)
            .map(|(_, _, item)| item.clone())
            .collect();
        ReadOutcome::Replayed { events, latest }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn epoch() -> Epoch {
        Epoch::new("e").unwrap()
    }

    #[test]
    fn a_continuing_log_counts_on_from_its_last_seq_and_holds_nothing_older() {
        let now = Instant::now();
        let mut log = ChannelLog::continuing(epoch(), Seq::new(41), Retention::default());
        assert_eq!(log.position().seq, Seq::new(41));
        assert_eq!(log.oldest_seq(), None);
        assert_eq!(log.append(1, now).seq, Seq::new(42));
        assert_eq!(log.oldest_seq(), Some(Seq::new(42)));
    }

    #[test]
    fn seqs_start_at_one_and_count_up() {
        let mut log = ChannelLog::new(epoch(), Retention::default());
        let now = Instant::now();
        assert_eq!(log.position().seq, Seq::ZERO);
        assert_eq!(log.append(1, now).seq, Seq::new(1));
        assert_eq!(log.append(2, now).seq, Seq::new(2));
    }

    #[test]
    fn another_epoch_is_a_reset_never_a_replay() {
        let mut log = ChannelLog::new(epoch(), Retention::default());
        let now = Instant::now();
        log.append(1, now);
        let stranger = Position::start_of(Epoch::new("other").unwrap());
        assert!(matches!(
            log.read_since(&stranger, 10, now),
            ReadOutcome::Reset {
                reason: ResetReason::EpochChanged,
                ..
            }
        ));
    }

    #[test]
    fn age_limit_expires_old_events() {
        let retention = Retention::default().with_max_age(Some(Duration::from_secs(10)));
        let mut log = ChannelLog::new(epoch(), retention);
        let start = Instant::now();
        log.append("old", start);
        log.append("new", start + Duration::from_secs(8));
        let later = start + Duration::from_secs(15);
        let since_zero = Position::start_of(epoch());
        assert!(matches!(
            log.read_since(&since_zero, 10, later),
            ReadOutcome::Reset {
                reason: ResetReason::Truncated,
                ..
            }
        ));
        let since_one = Position::new(epoch(), Seq::new(1));
        assert_eq!(
            log.read_since(&since_one, 10, later),
            ReadOutcome::Replayed {
                events: vec!["new"],
                latest: Position::new(epoch(), Seq::new(2))
            }
        );
    }

    #[test]
    fn the_byte_budget_trims_the_oldest_and_readers_behind_it_are_reset() {
        let retention = Retention::default().with_max_bytes(Some(250));
        let mut log = ChannelLog::new(epoch(), retention);
        let now = Instant::now();
        for item in 1..=5 {
            log.append_sized(item, 100, now);
        }
        assert_eq!(log.bytes(), 200, "two events of 100 bytes fit 250");
        assert_eq!(log.oldest_seq(), Some(Seq::new(4)));
        assert!(matches!(
            log.read_since(&Position::new(epoch(), Seq::new(1)), 10, now),
            ReadOutcome::Reset {
                reason: ResetReason::Truncated,
                ..
            }
        ));
        assert_eq!(log.shed_oldest(1), 100);
        assert_eq!((log.len(), log.bytes()), (1, 100));
        // One event larger than the budget is not kept either.
        log.append_sized(6, 1_000, now);
        assert_eq!((log.len(), log.bytes()), (0, 0));
        assert_eq!(log.position().seq, Seq::new(6), "the seq still counts it");
    }

    #[test]
    fn position_ahead_of_the_log_is_a_reset() {
        let mut log: ChannelLog<u8> = ChannelLog::new(epoch(), Retention::default());
        let ahead = Position::new(epoch(), Seq::new(5));
        assert!(matches!(
            log.read_since(&ahead, 10, Instant::now()),
            ReadOutcome::Reset {
                reason: ResetReason::PositionAhead,
                ..
            }
        ));
    }
}
