//! Multi-channel cursors: the positions of several channels in one string.
//!
//! An SSE stream may follow many channels, but a browser's `EventSource` remembers only one
//! string, the `id:` of the last event, and sends it back as `Last-Event-ID` when it
//! reconnects. So every SSE event's id is a cursor holding the position of *every* channel of
//! the stream, and the same cursor resumes a long poll.
//!
//! Grammar: entries joined by `,`; each entry is `channel:epoch:seq`. The channel may itself
//! contain `:` but never `,`; the epoch and seq never contain `:`, so each entry is split from
//! the right.

use std::fmt;

use crate::error::{Error, Result};
use crate::names::{Channel, Epoch, Position, parse_seq, truncate_for_message};

use crate::names::MAX_EPOCH_LEN;

/// The most channels one cursor holds: the most one SSE stream or long poll follows.
pub const MAX_CURSOR_CHANNELS: usize = 128;

/// The longest cursor accepted, in bytes: [`MAX_CURSOR_CHANNELS`] entries of the longest
/// channel name, epoch and seq (20 digits), and the commas between them (23,423 bytes). A
/// cursor the server writes always fits, so a client that sends back what it was given is
/// never refused for its size.
pub const MAX_CURSOR_LEN: usize = MAX_CURSOR_CHANNELS
    * (crate::MAX_CHANNEL_LEN + 1 + MAX_EPOCH_LEN + 1 + 20)
    + (MAX_CURSOR_CHANNELS - 1);

/// The positions of a set of channels, each channel at most once, in a stable order.
///
/// ```
/// use resync_protocol::{Channel, Cursor};
/// let cursor: Cursor = "chat:room-1:k3x9:17,news:a1b2:4".parse().unwrap();
/// let room = Channel::new("chat:room-1").unwrap();
/// assert_eq!(cursor.get(&room).unwrap().seq.get(), 17);
/// assert_eq!(cursor.to_string(), "chat:room-1:k3x9:17,news:a1b2:4");
/// ```
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cursor {
    entries: Vec<(Channel, Position)>,
}

impl Cursor {
    /// An empty cursor.
    pub fn new() -> Self {
        Self::default()
    }

    /// The position of `channel`, if the cursor holds it.
    pub fn get(&self, channel: &Channel) -> Option<&Position> {
        self.entries
            .iter()
            .find(|(entry_channel, _)| entry_channel == channel)
            .map(|(_, position)| position)
    }

    /// Sets the position of `channel`, keeping its place if it was already there.
    pub fn set(&mut self, channel: Channel, position: Position) {
        match self
            .entries
            .iter_mut()
            .find(|(entry_channel, _)| *entry_channel == channel)
        {
            Some((_, existing)) => *existing = position,
            None => self.entries.push((channel, position)),
        }
    }

    /// Moves `channel` to `position`, as [`set`](Self::set) does, but without cloning
    /// anything when the channel is already there in the same epoch: streams do this per event.
    pub fn advance(&mut self, channel: &Channel, position: &Position) {
        match self
            .entries
            .iter_mut()
            .find(|(entry_channel, _)| entry_channel == channel)
        {
            Some((_, existing)) if existing.epoch == position.epoch => existing.seq = position.seq,
            Some((_, existing)) => *existing = position.clone(),
            None => self.entries.push((channel.clone(), position.clone())),
        }
    }

    /// Appends the cursor's text (what `Display` writes) to `out` without the formatting
    /// machinery, which cost an SSE stream more per event than the rest of its encoding.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        Self::write_entries(self.iter(), out);
    }

    /// Appends the text of a cursor holding `entries`, in their order, without building one:
    /// for positions kept elsewhere (a server's subscriptions).
    pub fn write_entries<'a>(
        entries: impl Iterator<Item = (&'a Channel, &'a Position)>,
        out: &mut Vec<u8>,
    ) {
        let mut digits = itoa::Buffer::new();
        for (index, (channel, position)) in entries.enumerate() {
            if index > 0 {
                out.push(b',');
            }
            out.extend_from_slice(channel.as_str().as_bytes());
            out.push(b':');
            out.extend_from_slice(position.epoch.as_str().as_bytes());
            out.push(b':');
            out.extend_from_slice(digits.format(position.seq.get()).as_bytes());
        }
    }

    /// Removes `channel` from the cursor.
    pub fn remove(&mut self, channel: &Channel) -> Option<Position> {
        let index = self
            .entries
            .iter()
            .position(|(entry_channel, _)| entry_channel == channel)?;
        Some(self.entries.remove(index).1)
    }

    /// The channels and positions, in order.
    pub fn iter(&self) -> impl Iterator<Item = (&Channel, &Position)> {
        self.entries
            .iter()
            .map(|(channel, position)| (channel, position))
    }

    /// How many channels the cursor holds.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the cursor holds no channel.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Parses the cursor grammar. The empty string is the empty cursor.
    pub fn parse(text: &str) -> Result<Self> {
        if text.len() > MAX_CURSOR_LEN {
            return Err(Error::InvalidCursor(format!(
                "cursor is {} bytes, the limit is {MAX_CURSOR_LEN}",
                text.len()
            )));
        }
        let mut cursor = Cursor::new();
        if text.is_empty() {
            return Ok(cursor);
        }
        for (index, entry) in text.split(',').enumerate() {
            // Before the entry is read: the duplicate check below is linear per entry.
            if index == MAX_CURSOR_CHANNELS {
                return Err(Error::InvalidCursor(format!(
                    "a cursor holds at most {MAX_CURSOR_CHANNELS} channels"
                )));
            }
            let mut parts = entry.rsplitn(3, ':');
            let (Some(seq), Some(epoch), Some(channel)) =
                (parts.next(), parts.next(), parts.next())
            else {
                return Err(Error::InvalidCursor(format!(
                    "entry {:?} is not of the form channel:epoch:seq",
                    truncate_for_message(entry)
                )));
            };
            let channel =
                Channel::new(channel).map_err(|error| Error::InvalidCursor(error.to_string()))?;
            let epoch =
                Epoch::new(epoch).map_err(|error| Error::InvalidCursor(error.to_string()))?;
            let seq = parse_seq(seq)?;
            if cursor.get(&channel).is_some() {
                return Err(Error::InvalidCursor(format!(
                    "channel {channel} appears twice"
                )));
            }
            cursor.entries.push((channel, Position::new(epoch, seq)));
        }
        Ok(cursor)
    }
}

impl fmt::Display for Cursor {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, (channel, position)) in self.entries.iter().enumerate() {
            if index > 0 {
                formatter.write_str(",")?;
            }
            write!(formatter, "{channel}:{}:{}", position.epoch, position.seq)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Cursor {
    type Err = Error;
    fn from_str(text: &str) -> Result<Self> {
        Cursor::parse(text)
    }
}

/// A cursor travels as its text (`a:e1:5,b:e1:0`), in JSON too.
impl serde::Serialize for Cursor {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Cursor {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        Cursor::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl FromIterator<(Channel, Position)> for Cursor {
    fn from_iter<I: IntoIterator<Item = (Channel, Position)>>(iter: I) -> Self {
        let mut cursor = Cursor::new();
        for (channel, position) in iter {
            cursor.set(channel, position);
        }
        cursor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_cursors_are_typed_errors() {
        for bad in [
            "nocolons",
            "c:e",
            "c:e:x",
            "c:e-1:1",
            "bad channel:e:1",
            "c:e:1,c:e:2",
            "c:e:1,",
            ",c:e:1",
        ] {
            assert!(
                matches!(Cursor::parse(bad), Err(Error::InvalidCursor(_))),
                "{bad:?} should be rejected"
            );
        }
        assert!(Cursor::parse(&"a".repeat(MAX_CURSOR_LEN + 1)).is_err());
        let too_many: Vec<String> = (0..=MAX_CURSOR_CHANNELS)
            .map(|index| format!("c{index}:e:1"))
            .collect();
        assert!(Cursor::parse(&too_many.join(",")).is_err());
        assert!(Cursor::parse(&too_many[1..].join(",")).is_ok());
    }

    #[test]
    fn the_longest_cursor_a_server_writes_is_read_back() {
        let mut cursor = Cursor::new();
        for index in 0..MAX_CURSOR_CHANNELS {
            let name = format!("{index:03}{}", "c".repeat(crate::MAX_CHANNEL_LEN - 3));
            let position = Position::new(
                Epoch::new("e".repeat(MAX_EPOCH_LEN)).unwrap(),
                crate::Seq::new(u64::MAX),
            );
            cursor.set(Channel::new(name).unwrap(), position);
        }
        let text = cursor.to_string();
        assert_eq!(text.len(), MAX_CURSOR_LEN);
        assert_eq!(Cursor::parse(&text).unwrap(), cursor);
    }

    #[test]
    fn set_keeps_order_and_replaces() {
        let epoch = Epoch::new("e").unwrap();
        let mut cursor = Cursor::new();
        cursor.set(
            Channel::new("b").unwrap(),
            Position::start_of(epoch.clone()),
        );
        cursor.set(
            Channel::new("a").unwrap(),
            Position::start_of(epoch.clone()),
        );
        cursor.set(
            Channel::new("b").unwrap(),
            Position::new(epoch, crate::Seq::new(3)),
        );
        assert_eq!(cursor.to_string(), "b:e:3,a:e:0");
    }
}
