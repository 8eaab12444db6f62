//! Validated names and numbers: channels, epochs, sequence numbers, positions.
//!
//! Each type checks its invariant once, at construction, so code that holds one never has to
//! check again. The character sets are chosen so that none of these values ever needs escaping
//! in JSON, in an SSE `id:` line, in a cursor or in a URL query.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::error::{Error, Result};

/// The longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 128;
/// The longest key of a keyed channel accepted, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// The longest epoch accepted, in bytes.
pub(crate) const MAX_EPOCH_LEN: usize = 32;
/// The longest idempotency key accepted, in bytes.
pub(crate) const MAX_IDEMPOTENCY_KEY_LEN: usize = 128;

/// The name of a stream of events, such as `chat:room-42` or `orders`.
///
/// 1 to 128 bytes of ASCII letters, digits and `_ - . : @ /`. The part before the first `:` is
/// the channel's *namespace* (empty when there is no `:`), which servers use for per-namespace
/// settings such as anonymous access.
///
/// ```
/// use resync_protocol::Channel;
/// let channel = Channel::new("chat:room-42").unwrap();
/// assert_eq!(channel.namespace(), "chat");
/// assert!(Channel::new("has space").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Channel(Arc<str>);

fn is_channel_byte(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'_' | b'-' | b'.' | b':' | b'@' | b'/')
}

impl Channel {
    /// Validates `name` and makes a channel of it.
    pub fn new(name: impl AsRef<str>) -> Result<Self> {
        let name = name.as_ref();
        if name.is_empty() || name.len() > MAX_CHANNEL_LEN {
            return Err(Error::InvalidChannel(format!(
                "{:?} must be 1 to {MAX_CHANNEL_LEN} bytes long",
                truncate_for_message(name)
            )));
        }
        if let Some(bad) = name.bytes().find(|byte| !is_channel_byte(*byte)) {
            return Err(Error::InvalidChannel(format!(
                "{:?} contains {:?}; allowed are ASCII letters, digits and _ - . : @ /",
                truncate_for_message(name),
                char::from(bad)
            )));
        }
        Ok(Self(Arc::from(name)))
    }

    /// The channel name.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The part before the first `:`, or `""` when the name has none.
    pub fn namespace(&self) -> &str {
        self.0
            .split_once(':')
            .map_or("", |(namespace, _)| namespace)
    }
}

/// The key of an entry of a keyed channel (an order id, a sensor, a user): each publish on a
/// keyed channel names one, and the broker keeps the latest event of each key beside the
/// channel's history, so a client the history no longer reaches catches up from the latest
/// value per key instead of a reset.
///
/// 1 to 256 bytes of ASCII letters, digits and `_ - . : @ /`, as channel names: never escaped in
/// JSON, a URL query or a cursor.
///
/// ```
/// use resync_protocol::Key;
/// assert!(Key::new("order/2026-0042").is_ok());
/// assert!(Key::new("ann@example.com").is_ok());
/// assert!(Key::new("has space").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Key(Arc<str>);

impl Key {
    /// Validates `key`.
    pub fn new(key: impl AsRef<str>) -> Result<Self> {
        let key = key.as_ref();
        if key.is_empty() || key.len() > MAX_KEY_LEN {
            return Err(Error::InvalidKey(format!(
                "{:?} must be 1 to {MAX_KEY_LEN} bytes long",
                truncate_for_message(key)
            )));
        }
        if let Some(bad) = key.bytes().find(|byte| !is_channel_byte(*byte)) {
            return Err(Error::InvalidKey(format!(
                "{:?} contains {:?}; allowed are ASCII letters, digits and _ - . : @ /",
                truncate_for_message(key),
                char::from(bad)
            )));
        }
        Ok(Self(Arc::from(key)))
    }

    /// The key.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Cuts user input that is echoed in an error message to a readable length.
pub(crate) fn truncate_for_message(input: &str) -> String {
    const LIMIT: usize = 64;
    if input.len() <= LIMIT {
        return input.to_owned();
    }
    let mut end = LIMIT;
    while !input.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &input[..end])
}

/// Identifies one incarnation of a channel's history.
///
/// A broker chooses a new epoch whenever a channel's history starts afresh (first use, restart
/// of an in-memory broker, lost metadata in Redis). Positions from different epochs are never
/// comparable: a client holding an old epoch gets a reset, never a silently wrong replay.
/// 1 to 32 ASCII letters or digits.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Epoch(Arc<str>);

impl Epoch {
    /// Validates `text` and makes an epoch of it.
    pub fn new(text: impl AsRef<str>) -> Result<Self> {
        let text = text.as_ref();
        if text.is_empty()
            || text.len() > MAX_EPOCH_LEN
            || !text.bytes().all(|byte| byte.is_ascii_alphanumeric())
        {
            return Err(Error::InvalidEpoch(format!(
                "{:?} must be 1 to {MAX_EPOCH_LEN} ASCII letters or digits",
                truncate_for_message(text)
            )));
        }
        Ok(Self(Arc::from(text)))
    }

    /// Makes an epoch from 64 random bits, as 13 base-32 characters.
    ///
    /// The caller supplies the randomness so that this crate needs no random number source.
    pub fn from_random_bits(bits: u64) -> Self {
        const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
        let mut text = String::with_capacity(13);
        for index in (0..13).rev() {
            let digit = (bits >> (index * 5)) & 31;
            text.push(char::from(ALPHABET[digit as usize]));
        }
        Self(Arc::from(text))
    }

    /// The epoch's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A per-channel sequence number. The first event of an epoch has seq 1; seq 0 is the position
/// before any event.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Seq(u64);

impl Seq {
    /// The position before the first event of an epoch.
    pub const ZERO: Seq = Seq(0);

    /// Wraps a raw sequence number.
    pub const fn new(value: u64) -> Self {
        Self(value)
    }

    /// The raw number.
    pub const fn get(self) -> u64 {
        self.0
    }

    /// The seq that follows this one, or `None` at `u64::MAX` (which no real channel reaches).
    pub fn next(self) -> Option<Seq> {
        self.0.checked_add(1).map(Seq)
    }
}

/// Where a reader stands in a channel: the epoch and the seq of the last event it has seen.
///
/// `Position { epoch, seq: Seq::ZERO }` means "nothing seen yet in this epoch".
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Position {
    /// The history this position belongs to.
    pub epoch: Epoch,
    /// The seq of the last event seen (0 for none).
    pub seq: Seq,
}

impl Position {
    /// A position from its parts.
    pub fn new(epoch: Epoch, seq: Seq) -> Self {
        Self { epoch, seq }
    }

    /// The position before any event of `epoch`.
    pub fn start_of(epoch: Epoch) -> Self {
        Self {
            epoch,
            seq: Seq::ZERO,
        }
    }
}

/// A key that makes a publish idempotent: a retried publish with the same key on the same
/// channel is stored once and answers with the first publish's position.
/// 1 to 128 bytes of printable ASCII (no spaces).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    /// Validates `key`.
    pub fn new(key: impl AsRef<str>) -> Result<Self> {
        let key = key.as_ref();
        if key.is_empty()
            || key.len() > MAX_IDEMPOTENCY_KEY_LEN
            || !key
                .bytes()
                .all(|byte| byte.is_ascii_graphic() || byte == b' ')
        {
            return Err(Error::InvalidIdempotencyKey(format!(
                "{:?} must be 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters (space included)",
                truncate_for_message(key)
            )));
        }
        Ok(Self(Arc::from(key)))
    }

    /// The key's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

macro_rules! string_newtype_impls {
    ($name:ident) => {
        impl fmt::Display for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(formatter, "{}({:?})", stringify!($name), &*self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = Error;
            fn from_str(text: &str) -> Result<Self> {
                Self::new(text)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
                Self::new(&*text).map_err(serde::de::Error::custom)
            }
        }
    };
}

string_newtype_impls!(Channel);
string_newtype_impls!(Epoch);
string_newtype_impls!(IdempotencyKey);
string_newtype_impls!(Key);

impl fmt::Display for Seq {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, formatter)
    }
}

impl fmt::Debug for Seq {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Seq({})", self.0)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{}:{}", self.epoch, self.seq)
    }
}

impl fmt::Debug for Position {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Position({}:{})", self.epoch, self.seq)
    }
}

impl std::str::FromStr for Position {
    type Err = Error;

    /// Parses `epoch:seq`, the form used in URLs and by [`Display`](fmt::Display).
    fn from_str(text: &str) -> Result<Self> {
        let (epoch, seq) = text.split_once(':').ok_or_else(|| {
            Error::InvalidCursor(format!(
                "{:?} is not a position of the form epoch:seq",
                truncate_for_message(text)
            ))
        })?;
        Ok(Self {
            epoch: Epoch::new(epoch).map_err(|error| Error::InvalidCursor(error.to_string()))?,
            seq: parse_seq(seq)?,
        })
    }
}

/// Parses a decimal seq strictly: digits only, no sign, no leading `+`, fits in u64.
pub(crate) fn parse_seq(text: &str) -> Result<Seq> {
    if text.is_empty() || text.len() > 20 || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(Error::InvalidCursor(format!(
            "{:?} is not a decimal sequence number",
            truncate_for_message(text)
        )));
    }
    text.parse::<u64>().map(Seq).map_err(|_| {
        Error::InvalidCursor(format!(
            "{:?} does not fit in 64 bits",
            truncate_for_message(text)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_follow_the_documented_grammar() {
        for good in [
            "a",
            "chat:room-1",
            "user@example.com/feed",
            "x.y_z",
            &"a".repeat(128),
        ] {
            assert!(Channel::new(good).is_ok(), "{good} should be valid");
        }
        for bad in [
            "",
            "has space",
            "comma,separated",
            "tilde~",
            "emoji😀",
            &"a".repeat(129),
        ] {
            assert!(
                matches!(Channel::new(bad), Err(Error::InvalidChannel(_))),
                "{bad} should be invalid"
            );
        }
    }

    #[test]
    fn namespace_is_the_part_before_the_first_colon() {
        let channel = Channel::new("chat:room:1").unwrap();
        assert_eq!(channel.namespace(), "chat");
        assert_eq!(Channel::new("plain").unwrap().namespace(), "");
    }

    #[test]
    fn random_epochs_are_valid_and_distinct() {
        let first = Epoch::from_random_bits(0);
        let second = Epoch::from_random_bits(u64::MAX);
        assert_eq!(first.as_str().len(), 13);
        assert!(Epoch::new(first.as_str()).is_ok());
        assert!(Epoch::new(second.as_str()).is_ok());
        assert_ne!(first, second);
    }

    #[test]
    fn positions_parse_strictly() {
        let position: Position = "abc:42".parse().unwrap();
        assert_eq!(position.seq, Seq::new(42));
        for bad in [
            "abc",
            "abc:",
            ":1",
            "abc:-1",
            "abc:+1",
            "abc:1x",
            "a-b:1",
            "abc:99999999999999999999",
        ] {
            assert!(bad.parse::<Position>().is_err(), "{bad} should not parse");
        }
    }
}
