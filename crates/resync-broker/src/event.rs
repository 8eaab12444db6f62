//! Events as brokers hold and deliver them: decoded once, encoded once, shared by reference.

use std::sync::Arc;

use bytes::Bytes;
use resync_protocol::{Channel, Event, Payload, Position};

/// A stored event together with its wire frame, shared by every subscriber.
///
/// The frame (`{"type":"event",…}`) is encoded once when the event is stored; fan-out to ten
/// thousand subscribers clones this handle ten thousand times (one reference-count increment
/// each) and never re-encodes. Transports write [`frame`](Self::frame) as-is: a WebSocket text
/// message, an SSE `data:` line, an element of a long-poll reply.
#[derive(Clone, Debug)]
pub struct EncodedEvent(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    event: Event,
    frame: Bytes,
}

impl EncodedEvent {
    /// Encodes `event` once.
    pub fn new(event: Event) -> Self {
        let frame = Bytes::from(event.encode_frame());
        Self(Arc::new(Inner { event, frame }))
    }

    /// The event.
    pub fn event(&self) -> &Event {
        &self.0.event
    }

    /// The event's channel.
    pub fn channel(&self) -> &Channel {
        &self.0.event.channel
    }

    /// The event's position.
    pub fn position(&self) -> &Position {
        &self.0.event.position
    }

    /// The event's data.
    pub fn data(&self) -> &Payload {
        &self.0.event.data
    }

    /// The encoded `event` frame, one line of JSON.
    pub fn frame(&self) -> &Bytes {
        &self.0.frame
    }
}

impl PartialEq for EncodedEvent {
    fn eq(&self, other: &Self) -> bool {
        self.0.event == other.0.event
    }
}

impl Eq for EncodedEvent {}
