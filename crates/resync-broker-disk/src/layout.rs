//! How the store's keys and values are laid out: pure encodings, no I/O.
//!
//! Four keyspaces (each its own LSM tree in fjall):
//! - `events`: `[name length][name][seq, big-endian]` → `[stored at, ms since 1970][data]`.
//!   Big-endian seqs sort a channel's events in seq order, so a resume is one range read.
//! - `channels`: `[name]` → [`ChannelMeta`]: the channel's epoch, newest and oldest seq, the
//!   bytes it stores and the run that last wrote it. It is written in the same batch as the
//!   events it describes, so the two never disagree, whatever a crash cuts.
//! - `keys`: idempotency keys, a window per channel: `k[name length][name][key]` → the seq it
//!   got, and `s[name length][name][slot]` → the key in that slot of the window, so the
//!   oldest is found and dropped in O(1).
//! - `store`: the store's own records (its runs, the epoch of unpublished channels, the bytes
//!   of all history).

use resync_protocol::{Epoch, Seq};

/// The key of a channel's event `seq`.
pub(crate) fn event_key(channel: &str, seq: Seq) -> Vec<u8> {
    let mut key = channel_prefix(channel);
    key.extend_from_slice(&seq.get().to_be_bytes());
    key
}

/// What every key of `channel`'s events starts with: its name, led by its length so that no
/// channel's prefix is another's (`a` and `ab`).
pub(crate) fn channel_prefix(channel: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + channel.len() + 8);
    // Channel names are at most 128 bytes (resync-protocol's MAX_CHANNEL_LEN).
    key.push(u8::try_from(channel.len()).unwrap_or(u8::MAX));
    key.extend_from_slice(channel.as_bytes());
    key
}

/// The seq at the end of an event key.
pub(crate) fn seq_of_event_key(key: &[u8]) -> Option<Seq> {
    let tail: [u8; 8] = key.get(key.len().checked_sub(8)?..)?.try_into().ok()?;
    Some(Seq::new(u64::from_be_bytes(tail)))
}

/// An event's stored value: when it was stored, then its data.
pub(crate) fn event_value(stored_at_ms: u64, data: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + data.len());
    value.extend_from_slice(&stored_at_ms.to_le_bytes());
    value.extend_from_slice(data.as_bytes());
    value
}

/// The parts of an event's stored value, if it is one.
pub(crate) fn split_event_value(value: &[u8]) -> Option<(u64, &str)> {
    let (time, data) = value.split_at_checked(8)?;
    let time = u64::from_le_bytes(time.try_into().ok()?);
    Some((time, std::str::from_utf8(data).ok()?))
}

/// A channel's metadata, as stored.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChannelMeta {
    pub(crate) epoch: Epoch,
    /// The newest seq stored (0: none yet in this epoch).
    pub(crate) last_seq: Seq,
    /// The oldest seq still stored; past `last_seq` when none is.
    pub(crate) oldest_seq: Seq,
    /// The bytes of the channel's stored events (keys and values).
    pub(crate) bytes: u64,
    /// The run of the store that last wrote the channel.
    pub(crate) run: u64,
    /// How many keyed publishes the channel has had: the next slot of its key window.
    pub(crate) keyed: u64,
    /// A client's publish made it: it counts against the clients' share of the channels.
    pub(crate) made_by_client: bool,
}

impl ChannelMeta {
    /// A channel with nothing stored yet, in `epoch`.
    pub(crate) fn empty(epoch: Epoch, run: u64) -> Self {
        Self {
            epoch,
            last_seq: Seq::ZERO,
            oldest_seq: Seq::new(1),
            bytes: 0,
            run,
            keyed: 0,
            made_by_client: false,
        }
    }

    /// The oldest seq stored, if any is.
    pub(crate) fn oldest_stored(&self) -> Option<Seq> {
        (self.oldest_seq <= self.last_seq).then_some(self.oldest_seq)
    }

    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut value = Vec::with_capacity(41 + self.epoch.as_str().len());
        for number in [
            self.last_seq.get(),
            self.oldest_seq.get(),
            self.bytes,
            self.run,
            self.keyed,
        ] {
            value.extend_from_slice(&number.to_le_bytes());
        }
        value.push(u8::from(self.made_by_client));
        value.extend_from_slice(self.epoch.as_str().as_bytes());
        value
    }

    pub(crate) fn decode(value: &[u8]) -> Option<Self> {
        let (numbers, rest) = value.split_at_checked(40)?;
        let (&made_by_client, epoch) = rest.split_first()?;
        let number = |index: usize| -> Option<u64> {
            let bytes: [u8; 8] = numbers.get(index * 8..index * 8 + 8)?.try_into().ok()?;
            Some(u64::from_le_bytes(bytes))
        };
        Some(Self {
            last_seq: Seq::new(number(0)?),
            oldest_seq: Seq::new(number(1)?),
            bytes: number(2)?,
            run: number(3)?,
            keyed: number(4)?,
            made_by_client: made_by_client == 1,
            epoch: Epoch::new(std::str::from_utf8(epoch).ok()?).ok()?,
        })
    }
}

/// The key of an idempotency key's entry: the seq its publish got.
pub(crate) fn idempotency_key(channel: &str, key: &str) -> Vec<u8> {
    let mut out = vec![b'k'];
    out.extend_from_slice(&channel_prefix(channel));
    out.extend_from_slice(key.as_bytes());
    out
}

/// The key of slot `slot` of a channel's idempotency window: which key it holds.
pub(crate) fn idempotency_slot(channel: &str, slot: u64) -> Vec<u8> {
    let mut out = vec![b's'];
    out.extend_from_slice(&channel_prefix(channel));
    out.extend_from_slice(&slot.to_be_bytes());
    out
}

/// An idempotency entry's value: the seq and the epoch it was given in (a key of an earlier
/// epoch answers nothing).
pub(crate) fn idempotency_value(epoch: &Epoch, seq: Seq) -> Vec<u8> {
    let mut value = seq.get().to_le_bytes().to_vec();
    value.extend_from_slice(epoch.as_str().as_bytes());
    value
}

pub(crate) fn split_idempotency_value(value: &[u8]) -> Option<(Epoch, Seq)> {
    let (seq, epoch) = value.split_at_checked(8)?;
    let seq = Seq::new(u64::from_le_bytes(seq.try_into().ok()?));
    Some((Epoch::new(std::str::from_utf8(epoch).ok()?).ok()?, seq))
}

/// The store's record of a run (one opening of the store, to its close).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct RunRecord {
    /// Counts the openings of the store.
    pub(crate) run: u64,
    /// Whether the run ended with a clean close (everything synced).
    pub(crate) clean: bool,
    /// Whether the run acknowledged publishes before they were synced to the disk (the
    /// `periodic` and `never` durabilities): then a power cut may have lost what it
    /// acknowledged last.
    pub(crate) acknowledged_unsynced: bool,
    /// The boot of the machine the run ran on: another boot after an unclean end means the
    /// operating system's buffers may be gone with what they held.
    pub(crate) boot: String,
    /// The inode of the directory's marker file, made anew at each opening: another one
    /// means the directory was copied or restored from a backup, which is behind what
    /// clients saw.
    pub(crate) place: String,
}

impl RunRecord {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut value = self.run.to_le_bytes().to_vec();
        value.push(u8::from(self.clean));
        value.push(u8::from(self.acknowledged_unsynced));
        for text in [&self.boot, &self.place] {
            value.extend_from_slice(&u32::try_from(text.len()).unwrap_or(0).to_le_bytes());
            value.extend_from_slice(text.as_bytes());
        }
        value
    }

    pub(crate) fn decode(value: &[u8]) -> Option<Self> {
        let (run, rest) = value.split_at_checked(8)?;
        let (&clean, rest) = rest.split_first()?;
        let (&acknowledged_unsynced, rest) = rest.split_first()?;
        let (boot, rest) = split_text(rest)?;
        let (place, rest) = split_text(rest)?;
        rest.is_empty().then_some(())?;
        Some(Self {
            run: u64::from_le_bytes(run.try_into().ok()?),
            clean: clean == 1,
            acknowledged_unsynced: acknowledged_unsynced == 1,
            boot,
            place,
        })
    }
}

/// A text led by its length, and what follows it.
fn split_text(value: &[u8]) -> Option<(String, &[u8])> {
    let (length, rest) = value.split_at_checked(4)?;
    let length = usize::try_from(u32::from_le_bytes(length.try_into().ok()?)).ok()?;
    let (text, rest) = rest.split_at_checked(length)?;
    Some((std::str::from_utf8(text).ok()?.to_owned(), rest))
}

/// An unsigned number stored in the `store` keyspace.
pub(crate) fn decode_number(value: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(value.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn epoch() -> impl Strategy<Value = Epoch> {
        "[a-z0-9]{1,32}".prop_map(|text| Epoch::new(text).expect("valid epoch"))
    }

    proptest! {
        #[test]
        fn channel_meta_round_trips(
            epoch in epoch(),
            numbers in proptest::array::uniform5(any::<u64>()),
            made_by_client: bool,
        ) {
            let meta = ChannelMeta {
                epoch,
                last_seq: Seq::new(numbers[0]),
                oldest_seq: Seq::new(numbers[1]),
                bytes: numbers[2],
                run: numbers[3],
                keyed: numbers[4],
                made_by_client,
            };
            prop_assert_eq!(ChannelMeta::decode(&meta.encode()), Some(meta));
        }

        #[test]
        fn run_records_round_trip(
            run in any::<u64>(), clean: bool, unsynced: bool, boot in "[ -~]{0,40}", place in "[0-9:]{0,20}",
        ) {
            let record = RunRecord { run, clean, acknowledged_unsynced: unsynced, boot, place };
            prop_assert_eq!(RunRecord::decode(&record.encode()), Some(record));
        }

        #[test]
        fn event_values_round_trip(time in any::<u64>(), data in "\\PC{0,64}") {
            let value = event_value(time, &data);
            prop_assert_eq!(split_event_value(&value), Some((time, data.as_str())));
        }

        #[test]
        fn idempotency_values_round_trip(epoch in epoch(), seq in any::<u64>()) {
            let value = idempotency_value(&epoch, Seq::new(seq));
            prop_assert_eq!(split_idempotency_value(&value), Some((epoch, Seq::new(seq))));
        }

        /// Keys of one channel sort by seq, and no channel's keys fall among another's.
        #[test]
        fn event_keys_sort_by_seq_within_their_channel(
            a in "[a-z]{1,8}", b in "[a-z]{1,8}", x in any::<u64>(), y in any::<u64>(),
        ) {
            let (ka, kb) = (event_key(&a, Seq::new(x)), event_key(&a, Seq::new(y)));
            prop_assert_eq!(ka.cmp(&kb), x.cmp(&y));
            prop_assert_eq!(seq_of_event_key(&ka), Some(Seq::new(x)));
            if a != b {
                let prefix = channel_prefix(&b);
                prop_assert!(!ka.starts_with(&prefix));
            }
        }
    }

    #[test]
    fn truncated_values_are_refused_not_misread() {
        let meta = ChannelMeta::empty(Epoch::new("e1").expect("valid"), 3).encode();
        assert_eq!(ChannelMeta::decode(&meta[..39]), None);
        assert_eq!(split_event_value(&[1, 2, 3]), None);
        assert_eq!(RunRecord::decode(&[0; 7]), None);
    }
}
