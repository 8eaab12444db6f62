//! Events as brokers hold and deliver them: decoded once, encoded once, shared by reference.

use std::sync::Arc;

use bytes::Bytes;
use resync_protocol::{Channel, Event, Key, Position};

/// A stored event as its wire frame, shared by every subscriber.
///
/// The frame (`{"type":"event",…}`) is encoded once when the event is stored; fan-out to ten
/// thousand subscribers clones this handle ten thousand times (one reference-count increment
/// each) and never re-encodes. Transports write [`frame`](Self::frame) as-is: a WebSocket text
/// message, an SSE `data:` line, an element of a long-poll reply.
///
/// The event's data is not kept a second time beside its frame: [`data`](Self::data) is the
/// frame's own slice (issue 25: a history of large events held each one twice).
#[derive(Clone, Debug)]
pub struct EncodedEvent(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    channel: Channel,
    position: Position,
    /// On a keyed channel, the key the event sets.
    key: Option<Key>,
    frame: Bytes,
    /// Where the data starts in the frame; it ends before the frame's closing brace.
    data_start: usize,
}

/// Bytes an event costs a history besides its frame: its handle and position, the frame's
/// allocation, a history slot (with a deque's growth room): 192 measured on x86_64 Linux with
/// glibc, and the 16 bytes of the handle's key since keyed channels (not measured again). A
/// history's byte budget counts [`EncodedEvent::held_bytes`], so that it bounds what the
/// process holds, not only what goes on the wire.
pub const EVENT_OVERHEAD_BYTES: usize = 208;

impl EncodedEvent {
    /// Encodes `event` once.
    pub fn new(event: Event) -> Self {
        let frame = event.encode_frame();
        let data_start = frame.len() - 1 - event.data.as_str().len();
        Self(Arc::new(Inner {
            channel: event.channel,
            position: event.position,
            key: event.key,
            frame: Bytes::from(frame),
            data_start,
        }))
    }

    /// The event's channel.
    pub fn channel(&self) -> &Channel {
        &self.0.channel
    }

    /// The event's position.
    pub fn position(&self) -> &Position {
        &self.0.position
    }

    /// The key the event sets, on a keyed channel.
    pub fn key(&self) -> Option<&Key> {
        self.0.key.as_ref()
    }

    /// The event's data, as the JSON text it was published with.
    pub fn data(&self) -> &str {
        let frame = &self.0.frame;
        // The frame was built from this text: its slice is UTF-8 at these bounds.
        std::str::from_utf8(&frame[self.0.data_start..frame.len() - 1]).unwrap_or("null")
    }

    /// The encoded `event` frame, one line of JSON.
    pub fn frame(&self) -> &Bytes {
        &self.0.frame
    }

    /// What the event costs a history: its frame and [`EVENT_OVERHEAD_BYTES`].
    pub fn held_bytes(&self) -> usize {
        self.0.frame.len() + EVENT_OVERHEAD_BYTES
    }
}

impl PartialEq for EncodedEvent {
    fn eq(&self, other: &Self) -> bool {
        self.0.frame == other.0.frame
    }
}

impl Eq for EncodedEvent {}
