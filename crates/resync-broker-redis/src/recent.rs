//! The events this process received over Pub/Sub lately, per channel, for catch-up reads.
//!
//! When publishers outrun the fan-out, many subscribers of a channel fall behind their
//! queues at once and each catches up from history ([`resync_broker::Live::Resync`]). Read
//! from Redis, that is one script call per subscriber and page, each moving the same events
//! again: at 5,000 subscribers it starved the publishes and timed reads out. The events are
//! already here, decoded once, shared with the subscriber queues: a read that this copy
//! covers is answered from it, and anything else (older positions, another epoch, a position
//! ahead of this process) still goes to Redis, which stays the source of truth.
//!
//! The copy only ever holds a contiguous run of one epoch as it arrived: an event that does
//! not follow the last one (a message lost in a Pub/Sub reconnect, a new epoch) starts the run
//! over, and a reconnect clears everything. Memory is bounded twice: per channel by event
//! count, and for the whole process by bytes (a channel past the budget drops its own oldest
//! events first).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use resync_broker::{EncodedEvent, HistoryRead, ReadDecision, ReadOutcome, decide_read};
use resync_protocol::{Channel, Epoch, Position};

/// Events kept per channel: a subscriber this far behind its queue catches up locally.
pub(crate) const RECENT_EVENTS_PER_CHANNEL: usize = 4_096;
/// Bytes of event frames kept for all channels together.
pub(crate) const RECENT_EVENTS_BUDGET_BYTES: usize = 64 * 1024 * 1024;

#[derive(Default)]
pub(crate) struct RecentEvents {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    channels: HashMap<Channel, Run>,
    bytes: usize,
}

/// A contiguous run of one epoch, oldest first.
struct Run {
    epoch: Epoch,
    events: VecDeque<EncodedEvent>,
}

fn size_of(event: &EncodedEvent) -> usize {
    event.frame().len()
}

impl RecentEvents {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Keeps `event`, just received over Pub/Sub (before it is delivered to the hub, so a
    /// subscriber that registers in between finds it here).
    pub(crate) fn record(&self, event: &EncodedEvent) {
        let mut state = self.lock();
        let state = &mut *state;
        let position = event.position();
        let run = state
            .channels
            .entry(event.channel().clone())
            .or_insert_with(|| Run {
                epoch: position.epoch.clone(),
                events: VecDeque::new(),
            });
        let follows = run.epoch == position.epoch
            && run
                .events
                .back()
                .is_none_or(|last| last.position().seq.next() == Some(position.seq));
        if !follows {
            state.bytes -= run.events.iter().map(size_of).sum::<usize>();
            run.events.clear();
            run.epoch = position.epoch.clone();
        }
        run.events.push_back(event.clone());
        state.bytes += size_of(event);
        while run.events.len() > RECENT_EVENTS_PER_CHANNEL
            || (state.bytes > RECENT_EVENTS_BUDGET_BYTES && run.events.len() > 1)
        {
            if let Some(oldest) = run.events.pop_front() {
                state.bytes -= size_of(&oldest);
            }
        }
    }

    /// The read, if the events kept here answer it: `since` in the kept run's epoch, no
    /// older than its first event's predecessor and no newer than its last. The newest
    /// position reported is the newest this process has received; later events reach the
    /// reader's live subscription, which is registered before any read.
    pub(crate) fn read_since(
        &self,
        channel: &Channel,
        since: &Position,
        limit: usize,
    ) -> Option<HistoryRead> {
        let state = self.lock();
        let run = state.channels.get(channel)?;
        let first = run.events.front()?.position().seq;
        let latest = run.events.back()?.position().clone();
        if since.epoch != run.epoch || since.seq > latest.seq || since.seq.next()? < first {
            return None;
        }
        Some(match decide_read(since, &latest, Some(first)) {
            ReadDecision::Replay { first: wanted } => {
                let skip = usize::try_from(wanted.get() - first.get()).ok()?;
                let events = run
                    .events
                    .iter()
                    .skip(skip)
                    .take(limit.max(1))
                    .cloned()
                    .collect();
                ReadOutcome::Replayed { events, latest }
            }
            ReadDecision::UpToDate => ReadOutcome::UpToDate { latest },
            ReadDecision::Reset(_) => return None,
        })
    }

    /// Drops the channel's run (its last local subscriber left).
    pub(crate) fn forget(&self, channel: &Channel) {
        let mut state = self.lock();
        if let Some(run) = state.channels.remove(channel) {
            state.bytes -= run.events.iter().map(size_of).sum::<usize>();
        }
    }

    /// Drops everything (the Pub/Sub connection was lost: messages may have been missed).
    pub(crate) fn clear(&self) {
        let mut state = self.lock();
        state.channels.clear();
        state.bytes = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use resync_protocol::{Event, Payload, Seq};

    fn event(epoch: &str, seq: u64) -> EncodedEvent {
        EncodedEvent::new(Event {
            channel: Channel::new("c").unwrap(),
            position: Position::new(Epoch::new(epoch).unwrap(), Seq::new(seq)),
            key: None,
            data: Payload::from_json("1").unwrap(),
        })
    }

    fn at(epoch: &str, seq: u64) -> Position {
        Position::new(Epoch::new(epoch).unwrap(), Seq::new(seq))
    }

    fn seqs(read: Option<HistoryRead>) -> Vec<u64> {
        match read {
            Some(ReadOutcome::Replayed { events, .. }) => events
                .iter()
                .map(|event| event.position().seq.get())
                .collect(),
            other => panic!("not replayed: {other:?}"),
        }
    }

    #[test]
    fn answers_only_what_its_contiguous_run_covers() {
        let recent = RecentEvents::default();
        let channel = Channel::new("c").unwrap();
        for seq in 5..=9 {
            recent.record(&event("e", seq));
        }
        assert_eq!(
            seqs(recent.read_since(&channel, &at("e", 4), 10)),
            [5, 6, 7, 8, 9]
        );
        assert_eq!(seqs(recent.read_since(&channel, &at("e", 6), 2)), [7, 8]);
        assert!(matches!(
            recent.read_since(&channel, &at("e", 9), 10),
            Some(ReadOutcome::UpToDate { .. })
        ));
        assert!(
            recent.read_since(&channel, &at("e", 3), 10).is_none(),
            "older: Redis"
        );
        assert!(
            recent.read_since(&channel, &at("e", 10), 10).is_none(),
            "ahead: Redis"
        );
        assert!(
            recent.read_since(&channel, &at("f", 6), 10).is_none(),
            "epoch: Redis"
        );
        // A gap (a message lost) starts the run over.
        recent.record(&event("e", 11));
        assert!(recent.read_since(&channel, &at("e", 6), 10).is_none());
        assert!(matches!(
            recent.read_since(&channel, &at("e", 11), 10),
            Some(ReadOutcome::UpToDate { .. })
        ));
        recent.clear();
        assert!(recent.read_since(&channel, &at("e", 11), 10).is_none());
    }

    #[test]
    fn keeps_at_most_its_count_per_channel() {
        let recent = RecentEvents::default();
        let channel = Channel::new("c").unwrap();
        for seq in 1..=(RECENT_EVENTS_PER_CHANNEL as u64 + 10) {
            recent.record(&event("e", seq));
        }
        assert!(recent.read_since(&channel, &at("e", 9), 1).is_none());
        assert_eq!(seqs(recent.read_since(&channel, &at("e", 10), 1)), [11]);
    }
}
