//! Entry points into this crate's private decoders of client input, for the fuzz targets in
//! `fuzz/` (the `fuzzing` feature). Each one panics when an invariant a client relies on
//! breaks; an error is an answer, not a failure.

use crate::request::QueryParams;
use crate::transport::ws::socket::{FrameReader, Incoming};

/// Reads `bytes` as a client's WebSocket stream, fed `chunk` bytes at a time, and describes
/// the messages (and the error, if any) it yields. Panics if the reader ever holds more than
/// its bound: one frame of `max_message` with its header, a joined message of `max_message`,
/// and the chunk not yet decoded.
pub fn websocket_inbox(bytes: &[u8], chunk: usize, max_message: usize) -> Vec<String> {
    let mut reader = FrameReader::new(max_message);
    let mut seen = Vec::new();
    let bound = 2 * max_message + 14 + chunk.max(1);
    for piece in bytes.chunks(chunk.max(1)) {
        reader.feed(piece);
        loop {
            assert!(
                reader.held() <= bound,
                "the inbox holds {} bytes, over {bound}",
                reader.held()
            );
            match reader.next_message() {
                Ok(Some(message)) => {
                    if let Incoming::Text(text) = &message {
                        assert!(text.len() <= max_message, "a message over the limit");
                    }
                    seen.push(format!("{message:?}"));
                }
                Ok(None) => break,
                Err(error) => {
                    seen.push(format!("error: {error}"));
                    return seen;
                }
            }
        }
    }
    seen
}

/// Parses a request's query string as SSE, long polling and WebSocket upgrades do; panics if
/// more channels than `max_channels` come through, or any twice.
pub fn query(query: &str, max_channels: usize) {
    if let Ok(params) = QueryParams::parse(query, max_channels) {
        assert!(params.channels.len() <= max_channels);
        let mut unique = params.channels.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(unique.len(), params.channels.len(), "a channel named twice");
    }
}
