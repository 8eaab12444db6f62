//! The event envelope and its JSON payload.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

use crate::error::{Error, Result};
use crate::names::{Channel, Epoch, Key, Position, Seq};

/// Arbitrary JSON published on a channel, validated once and then carried as text.
///
/// The payload is parsed exactly once, when it is made; after that it is shared (cloning is a
/// reference-count increment) and copied into frames without being parsed again. Line breaks
/// between JSON tokens are turned into spaces on the way in (JSON forbids raw line breaks
/// inside strings, so this never changes the value), which keeps every encoded event on one
/// line: one SSE `data:` line, one line of a log.
///
/// ```
/// use resync_protocol::Payload;
/// let payload = Payload::from_json("{\"price\":\n 42}").unwrap();
/// assert_eq!(payload.as_str(), "{\"price\":  42}");
/// assert!(Payload::from_json("{not json").is_err());
/// ```
#[derive(Clone)]
pub struct Payload(Arc<RawValue>);

impl Payload {
    /// Validates `json` as one JSON value (object, array, string, number, bool or null).
    pub fn from_json(json: impl Into<String>) -> Result<Self> {
        let json = json.into();
        // Validated as sent, first: JSON forbids raw line breaks inside strings, so a payload
        // with one is refused rather than rewritten into a different string.
        let raw = RawValue::from_string(json)
            .map_err(|error| Error::InvalidPayload(error.to_string()))?;
        if !raw.get().bytes().any(|byte| byte == b'\n' || byte == b'\r') {
            return Ok(Self(Arc::from(raw)));
        }
        // Valid JSON: every line break is whitespace between tokens, and may become a space.
        let one_line = raw.get().replace(['\n', '\r'], " ");
        let raw = RawValue::from_string(one_line)
            .map_err(|error| Error::InvalidPayload(error.to_string()))?;
        Ok(Self(Arc::from(raw)))
    }

    /// Validates UTF-8 `bytes` as one JSON value.
    pub fn from_slice(bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes)
            .map_err(|error| Error::InvalidPayload(format!("not utf-8: {error}")))?;
        Self::from_json(text)
    }

    /// Serializes any serde value as a payload.
    pub fn from_value<T: Serialize + ?Sized>(value: &T) -> Result<Self> {
        let json = serde_json::to_string(value)
            .map_err(|error| Error::InvalidPayload(error.to_string()))?;
        Self::from_json(json)
    }

    /// The JSON text.
    pub fn as_str(&self) -> &str {
        self.0.get()
    }

    /// Parses the payload into a typed value.
    pub fn parse<'a, T: Deserialize<'a>>(&'a self) -> Result<T> {
        serde_json::from_str(self.0.get()).map_err(|error| Error::InvalidPayload(error.to_string()))
    }
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.as_str() == other.as_str()
    }
}

impl Eq for Payload {}

impl fmt::Debug for Payload {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "Payload({})", self.as_str())
    }
}

impl Serialize for Payload {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Payload {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = Box::<RawValue>::deserialize(deserializer)?;
        let text = raw.get();
        if text.bytes().any(|byte| byte == b'\n' || byte == b'\r') {
            return Payload::from_json(text.to_owned()).map_err(serde::de::Error::custom);
        }
        Ok(Self(Arc::from(raw)))
    }
}

/// One event of a channel: where it stands in the channel's history, and its data.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// The channel the event was published on.
    pub channel: Channel,
    /// The epoch and seq the broker assigned when it stored the event.
    pub position: Position,
    /// On a keyed channel, the key the event sets: to its data, or, when the data is `null`,
    /// to nothing (the key is deleted; see [`deletes`](Self::deletes)).
    pub key: Option<Key>,
    /// The published JSON.
    pub data: Payload,
}

impl Event {
    /// Encodes the event as the `event` frame that WebSocket, SSE and long polling all carry:
    /// `{"type":"event","channel":…,"epoch":…,"seq":…,"data":…}`, with `"key":…` before
    /// `data` on a keyed channel. `data` is always last.
    ///
    /// This is the hot path of fan-out, done once per event and shared by every subscriber, so
    /// it is written by hand: channel and epoch never need JSON escaping (see
    /// [`Channel`]), and the payload is already valid JSON text.
    pub fn encode_frame(&self) -> String {
        let data = self.data.as_str();
        // Exactly sized (the fixed text is 52 bytes, a seq at most 20 digits): stored histories
        // keep this buffer, and a guess short by a few bytes doubled it.
        let key = self.key.as_ref().map_or(0, |key| key.as_str().len() + 32);
        let mut frame = String::with_capacity(
            72 + self.channel.as_str().len()
                + self.position.epoch.as_str().len()
                + key
                + data.len(),
        );
        frame.push_str("{\"type\":\"event\",\"channel\":\"");
        frame.push_str(self.channel.as_str());
        frame.push_str("\",\"epoch\":\"");
        frame.push_str(self.position.epoch.as_str());
        frame.push_str("\",\"seq\":");
        frame.push_str(&self.position.seq.get().to_string());
        if let Some(key) = &self.key {
            frame.push_str(",\"key\":\"");
            frame.push_str(key.as_str());
            frame.push('"');
        }
        frame.push_str(",\"data\":");
        frame.push_str(data);
        frame.push('}');
        frame
    }
}

impl Event {
    /// Whether the event deletes its key: a keyed event whose data is `null`.
    pub fn deletes(&self) -> bool {
        self.key.is_some() && self.data.as_str() == "null"
    }
}

/// The shape of an event on the wire, used by serde.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct EventWire {
    channel: Channel,
    epoch: Epoch,
    seq: Seq,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    key: Option<Key>,
    data: Payload,
}

impl From<EventWire> for Event {
    fn from(wire: EventWire) -> Self {
        Event {
            channel: wire.channel,
            position: Position::new(wire.epoch, wire.seq),
            key: wire.key,
            data: wire.data,
        }
    }
}

impl From<Event> for EventWire {
    fn from(event: Event) -> Self {
        EventWire {
            channel: event.channel,
            epoch: event.position.epoch,
            seq: event.position.seq,
            key: event.key,
            data: event.data,
        }
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        EventWire::from(self.clone()).serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for Event {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        EventWire::deserialize(deserializer).map(Event::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defect_9_11_a_raw_line_break_inside_a_string_is_refused_not_rewritten() {
        for bad in ["\"a\nb\"", "{\"text\":\"line\r\nbreak\"}"] {
            assert!(Payload::from_json(bad).is_err(), "{bad:?}");
        }
        // Between tokens a line break is whitespace, and becomes a space (events are one line).
        assert_eq!(
            Payload::from_json("{\n\"a\": 1\r\n}").unwrap().as_str(),
            "{ \"a\": 1  }"
        );
        // An escaped line break inside a string is data, kept as sent.
        assert_eq!(
            Payload::from_json(r#""a\nb""#).unwrap().as_str(),
            r#""a\nb""#
        );
    }

    #[test]
    fn payload_accepts_every_kind_of_json_value() {
        for json in [
            "{}",
            "[]",
            "\"text\"",
            "1.5",
            "true",
            "null",
            "{\"nested\":{\"a\":[1,2]}}",
        ] {
            assert_eq!(Payload::from_json(json).unwrap().as_str(), json);
        }
        for bad in ["", "{", "1 2", "{\"a\":}", "undefined"] {
            assert!(
                Payload::from_json(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn line_breaks_between_tokens_become_spaces() {
        let payload = Payload::from_json("{\r\n\"a\": \"x\\ny\"\n}").unwrap();
        assert!(!payload.as_str().contains('\n'));
        let value: serde_json::Value = payload.parse().unwrap();
        assert_eq!(value["a"], "x\ny");
    }

    #[test]
    fn hand_written_frame_matches_serde() {
        let event = Event {
            channel: Channel::new("c:1").unwrap(),
            position: Position::new(Epoch::new("e1").unwrap(), Seq::new(7)),
            key: None,
            data: Payload::from_json("{\"k\":[1,\"two\"]}").unwrap(),
        };
        let frame: serde_json::Value = serde_json::from_str(&event.encode_frame()).unwrap();
        assert_eq!(
            frame,
            serde_json::json!({"type":"event","channel":"c:1","epoch":"e1","seq":7,"data":{"k":[1,"two"]}})
        );
        let deleted = Event {
            key: Some(Key::new("order/7").unwrap()),
            data: Payload::from_json("null").unwrap(),
            ..event
        };
        assert!(deleted.deletes());
        let frame: serde_json::Value = serde_json::from_str(&deleted.encode_frame()).unwrap();
        assert_eq!(
            frame,
            serde_json::json!({"type":"event","channel":"c:1","epoch":"e1","seq":7,"key":"order/7","data":null})
        );
    }
}
