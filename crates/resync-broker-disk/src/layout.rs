//! How the store's keys and values are laid out: pure encodings, no I/O.
//!
//! Five keyspaces (each its own LSM tree in fjall):
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
//! - `state` (layout 2): the latest event of each key of keyed channels:
//!   `[name length][name][key]` → `[epoch length][epoch][seq][expires at, ms][1: data | 0:
//!   deleted][data]`, written in the same batch as the event. An entry of another epoch than
//!   its channel's is stale and never served. A keyed event's value in `events` is
//!   `[stored at][1][key length, 2 bytes][key][data]` (JSON data never starts with byte 1).

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

/// A keyed event's stored value: when it was stored, its key, then its data.
pub(crate) fn keyed_event_value(stored_at_ms: u64, key: &str, data: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(11 + key.len() + data.len());
    value.extend_from_slice(&stored_at_ms.to_le_bytes());
    value.push(KEYED);
    // Keys are at most 256 bytes (resync-protocol's MAX_KEY_LEN).
    value.extend_from_slice(&u16::try_from(key.len()).unwrap_or(u16::MAX).to_le_bytes());
    value.extend_from_slice(key.as_bytes());
    value.extend_from_slice(data.as_bytes());
    value
}

/// What marks a keyed event's value: no JSON text starts with it.
const KEYED: u8 = 1;

/// The parts of an event's stored value, keyed or not: when, its key, its data.
pub(crate) fn split_any_event_value(value: &[u8]) -> Option<(u64, Option<&str>, &str)> {
    let (time, rest) = value.split_at_checked(8)?;
    let time = u64::from_le_bytes(time.try_into().ok()?);
    if rest.first() != Some(&KEYED) {
        return Some((time, None, std::str::from_utf8(rest).ok()?));
    }
    let length: [u8; 2] = rest.get(1..3)?.try_into().ok()?;
    let length = usize::from(u16::from_le_bytes(length));
    let key = std::str::from_utf8(rest.get(3..3 + length)?).ok()?;
    let data = std::str::from_utf8(rest.get(3 + length..)?).ok()?;
    Some((time, Some(key), data))
}

/// The key of `channel`'s state entry for `key`.
pub(crate) fn state_key(channel: &str, key: &str) -> Vec<u8> {
    let mut stored = channel_prefix(channel);
    stored.extend_from_slice(key.as_bytes());
    stored
}

/// A state entry's value: the epoch and seq of the event it holds, when it expires (0:
/// never), and its data (`None`: the key was deleted).
pub(crate) fn state_value(epoch: &Epoch, seq: Seq, expires_ms: u64, data: Option<&str>) -> Vec<u8> {
    let epoch = epoch.as_str();
    let mut value = Vec::with_capacity(18 + epoch.len() + data.map_or(0, str::len));
    // Epochs are at most 32 bytes.
    value.push(u8::try_from(epoch.len()).unwrap_or(u8::MAX));
    value.extend_from_slice(epoch.as_bytes());
    value.extend_from_slice(&seq.get().to_le_bytes());
    value.extend_from_slice(&expires_ms.to_le_bytes());
    match data {
        Some(data) => {
            value.push(1);
            value.extend_from_slice(data.as_bytes());
        }
        None => value.push(0),
    }
    value
}

/// The parts of a state entry's value.
pub(crate) fn split_state_value(value: &[u8]) -> Option<(&str, Seq, u64, Option<&str>)> {
    let length = usize::from(*value.first()?);
    let epoch = std::str::from_utf8(value.get(1..1 + length)?).ok()?;
    let rest = value.get(1 + length..)?;
    let seq = u64::from_le_bytes(rest.get(..8)?.try_into().ok()?);
    let expires = u64::from_le_bytes(rest.get(8..16)?.try_into().ok()?);
    let data = match rest.get(16)? {
        1 => Some(std::str::from_utf8(rest.get(17..)?).ok()?),
        0 => None,
        _ => return None,
    };
    Some((epoch, Seq::new(seq), expires, data))
}

/// An event's stored value: when it was stored, then its data.
pub(crate) fn event_value(stored_at_ms: u64, data: &str) -> Vec<u8> {
    let mut value = Vec::with_capacity(8 + data.len());
    value.extend_from_slice(&stored_at_ms.to_le_bytes());
    value.extend_from_slice(data.as_bytes());
    value
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
            prop_assert_eq!(split_any_event_value(&value), Some((time, None, data.as_str())));
        }

        #[test]
        fn keyed_event_values_round_trip(time in any::<u64>(), key in "[a-z0-9:/@._-]{1,64}", data in "[^\u{1}]\\PC{0,64}") {
            let value = keyed_event_value(time, &key, &data);
            prop_assert_eq!(split_any_event_value(&value), Some((time, Some(key.as_str()), data.as_str())));
            let plain = event_value(time, &data);
            prop_assert_eq!(split_any_event_value(&plain), Some((time, None, data.as_str())));
        }

        #[test]
        fn state_values_round_trip(epoch in epoch(), seq in any::<u64>(), expires in any::<u64>(), data in proptest::option::of("\\PC{0,64}")) {
            let value = state_value(&epoch, Seq::new(seq), expires, data.as_deref());
            prop_assert_eq!(split_state_value(&value), Some((epoch.as_str(), Seq::new(seq), expires, data.as_deref())));
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
        assert_eq!(split_any_event_value(&[1, 2, 3]), None);
        assert_eq!(RunRecord::decode(&[0; 7]), None);
    }
}
