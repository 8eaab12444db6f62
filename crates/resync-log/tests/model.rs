//! resync-log agrees with a naive model (keep every event forever, filter on read) under
//! random sequences of appends, reads and clock jumps.

use std::time::{Duration, Instant};

use proptest::prelude::*;
use resync_log::{ChannelLog, ReadOutcome, Retention};
use resync_protocol::{Epoch, Position, ResetReason, Seq};

#[derive(Clone, Debug)]
enum Operation {
    Append {
        advance_ms: u64,
    },
    Read {
        back: u64,
        limit: usize,
        advance_ms: u64,
    },
    ReadOtherEpoch,
    ReadAhead {
        ahead: u64,
    },
}

fn operation() -> impl Strategy<Value = Operation> {
    prop_oneof![
        4 => (0u64..300).prop_map(|advance_ms| Operation::Append { advance_ms }),
        3 => (0u64..40, 0usize..20, 0u64..300)
            .prop_map(|(back, limit, advance_ms)| Operation::Read { back, limit, advance_ms }),
        1 => Just(Operation::ReadOtherEpoch),
        1 => (1u64..5).prop_map(|ahead| Operation::ReadAhead { ahead }),
    ]
}

/// Every event ever appended, with its time; retention is applied when reading.
struct Model {
    appended_at: Vec<Instant>,
    max_events: usize,
    max_age: Option<Duration>,
}

impl Model {
    fn retained_from(&self, now: Instant) -> u64 {
        // The oldest retained seq: cut by count, then by age.
        let count = self.appended_at.len() as u64;
        let mut oldest = count.saturating_sub(self.max_events as u64) + 1;
        if let Some(max_age) = self.max_age {
            while oldest <= count
                && now.saturating_duration_since(self.appended_at[(oldest - 1) as usize]) > max_age
            {
                oldest += 1;
            }
        }
        oldest
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn log_matches_naive_model(
        max_events in 0usize..25,
        max_age_ms in proptest::option::of(1u64..2_000),
        operations in prop::collection::vec(operation(), 1..120),
    ) {
        let epoch = Epoch::new("model").expect("valid epoch");
        let max_age = max_age_ms.map(Duration::from_millis);
        let retention = Retention::default().with_max_events(max_events).with_max_age(max_age);
        let mut log = ChannelLog::new(epoch.clone(), retention);
        let mut model = Model { appended_at: Vec::new(), max_events, max_age };
        let mut now = Instant::now();

        for operation in operations {
            match operation {
                Operation::Append { advance_ms } => {
                    now += Duration::from_millis(advance_ms);
                    let position = log.append(model.appended_at.len() as u64 + 1, now);
                    model.appended_at.push(now);
                    prop_assert_eq!(position.seq.get(), model.appended_at.len() as u64);
                    prop_assert_eq!(&position.epoch, &epoch);
                }
                Operation::Read { back, limit, advance_ms } => {
                    now += Duration::from_millis(advance_ms);
                    let last = model.appended_at.len() as u64;
                    let since_seq = last.saturating_sub(back);
                    let since = Position::new(epoch.clone(), Seq::new(since_seq));
                    let outcome = log.read_since(&since, limit, now);
                    let latest = Position::new(epoch.clone(), Seq::new(last));
                    let oldest = model.retained_from(now);
                    let expected = if since_seq == last {
                        ReadOutcome::UpToDate { latest }
                    } else if since_seq + 1 < oldest {
                        ReadOutcome::Reset { reason: ResetReason::Truncated, latest }
                    } else {
                        let end = (since_seq + limit as u64).min(last);
                        ReadOutcome::Replayed { events: (since_seq + 1..=end).collect(), latest }
                    };
                    prop_assert_eq!(outcome, expected);
                }
                Operation::ReadOtherEpoch => {
                    let other = Position::start_of(Epoch::new("other").expect("valid epoch"));
                    let is_epoch_reset = matches!(
                        log.read_since(&other, 10, now),
                        ReadOutcome::Reset { reason: ResetReason::EpochChanged, .. }
                    );
                    prop_assert!(is_epoch_reset);
                }
                Operation::ReadAhead { ahead } => {
                    let last = model.appended_at.len() as u64;
                    let since = Position::new(epoch.clone(), Seq::new(last + ahead));
                    let is_ahead_reset = matches!(
                        log.read_since(&since, 10, now),
                        ReadOutcome::Reset { reason: ResetReason::PositionAhead, .. }
                    );
                    prop_assert!(is_ahead_reset);
                }
            }
            // Memory stays bounded by the count limit, whatever the operations.
            prop_assert!(log.len() <= max_events);
        }
    }
}
