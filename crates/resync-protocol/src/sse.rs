//! Server-Sent Events: encoding frames, and an incremental parser for clients and tests.
//!
//! The encoder writes the `text/event-stream` grammar of the WHATWG HTML standard: optional
//! `id:`, `event:` and `retry:` fields, one `data:` line per line of data, a blank line to end
//! the event; comments (lines starting with `:`) serve as heartbeats. The parser follows the
//! same standard's parsing rules, fed chunk by chunk as bytes arrive.

use crate::error::{Error, Result};

/// One SSE event to encode.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SseFrame<'a> {
    /// The `id:` field; `EventSource` sends the last one back as `Last-Event-ID`.
    pub id: Option<&'a str>,
    /// The `event:` field; `None` makes a default `message` event.
    pub event: Option<&'a str>,
    /// The data; each line becomes one `data:` line.
    pub data: &'a str,
    /// The `retry:` field, the reconnection delay `EventSource` should use, in milliseconds.
    pub retry_ms: Option<u64>,
}

impl SseFrame<'_> {
    /// Appends the encoded event to `out`.
    ///
    /// Line breaks in `id` and `event` would end the field early and corrupt the stream, so
    /// they are dropped; line breaks in `data` split it into several `data:` lines, which the
    /// receiver joins back with `\n`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        if let Some(id) = self.id {
            push_field(out, "id", id);
        }
        if let Some(event) = self.event {
            push_field(out, "event", event);
        }
        if let Some(retry_ms) = self.retry_ms {
            out.extend_from_slice(b"retry: ");
            out.extend_from_slice(retry_ms.to_string().as_bytes());
            out.push(b'\n');
        }
        for line in split_lines(self.data) {
            out.extend_from_slice(b"data: ");
            out.extend_from_slice(line.as_bytes());
            out.push(b'\n');
        }
        out.push(b'\n');
    }

    /// The encoded event as a new buffer.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.data.len());
        self.encode_into(&mut out);
        out
    }
}

fn push_field(out: &mut Vec<u8>, name: &str, value: &str) {
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b": ");
    out.extend(
        value
            .bytes()
            .filter(|byte| *byte != b'\n' && *byte != b'\r'),
    );
    out.push(b'\n');
}

/// Splits on `\r\n`, `\n` and `\r`, the three line endings of the SSE grammar.
fn split_lines(data: &str) -> impl Iterator<Item = &str> {
    let mut rest = Some(data);
    std::iter::from_fn(move || {
        let text = rest?;
        match text.find(['\r', '\n']) {
            Some(index) => {
                let skip = if text[index..].starts_with("\r\n") {
                    2
                } else {
                    1
                };
                rest = Some(&text[index + skip..]);
                Some(&text[..index])
            }
            None => {
                rest = None;
                Some(text)
            }
        }
    })
}

/// Encodes a comment line, which every SSE client ignores: a heartbeat that keeps proxies
/// from closing an idle stream. Line breaks in `text` are dropped.
pub fn encode_comment(text: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + text.len());
    out.push(b':');
    if !text.is_empty() {
        out.push(b' ');
        out.extend(text.bytes().filter(|byte| *byte != b'\n' && *byte != b'\r'));
    }
    out.extend_from_slice(b"\n\n");
    out
}

/// An event as a client receives it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SseMessage {
    /// The last `id:` seen on the stream so far (ids persist across events, per the standard).
    pub last_event_id: String,
    /// The `event:` field, or `message` when absent.
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// A `retry:` value that came with this event.
    pub retry_ms: Option<u64>,
}

/// The longest line and the largest event the parser holds, in bytes, so a hostile or broken
/// server cannot make a client buffer without bound.
pub const MAX_SSE_EVENT_BYTES: usize = 1024 * 1024;

/// An incremental `text/event-stream` parser: feed it bytes as they arrive, take whole events.
///
/// ```
/// use resync_protocol::sse::SseParser;
/// let mut parser = SseParser::new();
/// let mut events = parser.feed(b"id: 7\nevent: tick\nda").unwrap();
/// assert!(events.is_empty());
/// events = parser.feed(b"ta: hello\n\n").unwrap();
/// assert_eq!(events[0].data, "hello");
/// assert_eq!(events[0].last_event_id, "7");
/// ```
#[derive(Debug, Default)]
pub struct SseParser {
    line: Vec<u8>,
    after_cr: bool,
    /// Whether the stream's start has been read past a possible byte order mark.
    bom_decided: bool,
    /// Bytes of the byte order mark matched so far (it may be split across chunks).
    bom_matched: usize,
    last_event_id: String,
    event: String,
    data: String,
    has_data: bool,
    retry_ms: Option<u64>,
}

impl SseParser {
    /// A parser at the start of a stream.
    pub fn new() -> Self {
        Self::default()
    }

    /// The id the stream last set, to send as `Last-Event-ID` on reconnect.
    pub fn last_event_id(&self) -> &str {
        &self.last_event_id
    }

    /// Feeds the next chunk and returns the events it completed.
    ///
    /// An error (invalid UTF-8, a line or event over [`MAX_SSE_EVENT_BYTES`]) leaves the parser
    /// in an unspecified state; the stream should be dropped.
    pub fn feed(&mut self, chunk: &[u8]) -> Result<Vec<SseMessage>> {
        const BOM: &[u8] = "\u{feff}".as_bytes();
        let mut events = Vec::new();
        let mut bytes = chunk;
        // A stream may start with a UTF-8 byte order mark, to be skipped, and it may arrive
        // split across chunks: match it byte by byte.
        while !self.bom_decided && !bytes.is_empty() {
            if bytes[0] == BOM[self.bom_matched] {
                self.bom_matched += 1;
                bytes = &bytes[1..];
                self.bom_decided = self.bom_matched == BOM.len();
            } else {
                // Not a byte order mark: what matched of it is content.
                self.bom_decided = true;
                for &byte in &BOM[..self.bom_matched] {
                    self.push_byte(byte, &mut events)?;
                }
            }
        }
        for &byte in bytes {
            self.push_byte(byte, &mut events)?;
        }
        Ok(events)
    }

    fn push_byte(&mut self, byte: u8, events: &mut Vec<SseMessage>) -> Result<()> {
        if self.after_cr {
            self.after_cr = false;
            if byte == b'\n' {
                return Ok(());
            }
        }
        match byte {
            b'\n' => self.end_line(events)?,
            b'\r' => {
                self.after_cr = true;
                self.end_line(events)?;
            }
            _ => {
                if self.line.len() >= MAX_SSE_EVENT_BYTES {
                    return Err(Error::MalformedEventStream(format!(
                        "line longer than {MAX_SSE_EVENT_BYTES} bytes"
                    )));
                }
                self.line.push(byte);
            }
        }
        Ok(())
    }

    fn end_line(&mut self, events: &mut Vec<SseMessage>) -> Result<()> {
        let line = std::mem::take(&mut self.line);
        let line = String::from_utf8(line)
            .map_err(|_| Error::MalformedEventStream("line is not utf-8".to_owned()))?;
        if line.is_empty() {
            self.dispatch(events);
            return Ok(());
        }
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event = value.to_owned(),
            "data" => {
                if self.data.len() + value.len() + 1 > MAX_SSE_EVENT_BYTES {
                    return Err(Error::MalformedEventStream(format!(
                        "event larger than {MAX_SSE_EVENT_BYTES} bytes"
                    )));
                }
                if self.has_data {
                    self.data.push('\n');
                }
                self.data.push_str(value);
                self.has_data = true;
            }
            // Per the standard, an id containing NUL is ignored.
            "id" if !value.contains('\0') => self.last_event_id = value.to_owned(),
            "retry" if !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit()) => {
                self.retry_ms = value.parse().ok();
            }
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, events: &mut Vec<SseMessage>) {
        let event = std::mem::take(&mut self.event);
        let data = std::mem::take(&mut self.data);
        let retry_ms = self.retry_ms.take();
        if !std::mem::take(&mut self.has_data) {
            // The standard drops events without data; a lone `retry:` still takes effect.
            if retry_ms.is_some() {
                events.push(SseMessage {
                    last_event_id: self.last_event_id.clone(),
                    event: String::new(),
                    data: String::new(),
                    retry_ms,
                });
            }
            return;
        }
        events.push(SseMessage {
            last_event_id: self.last_event_id.clone(),
            event: if event.is_empty() {
                "message".to_owned()
            } else {
                event
            },
            data,
            retry_ms,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defect_9_11_a_byte_order_mark_split_across_chunks_keeps_the_first_event() {
        let stream = "\u{feff}data: first\n\ndata: second\n\n".as_bytes();
        for split in 0..=4 {
            let mut parser = SseParser::new();
            let mut events = parser.feed(&stream[..split]).unwrap();
            events.extend(parser.feed(&stream[split..]).unwrap());
            let data: Vec<&str> = events.iter().map(|event| event.data.as_str()).collect();
            assert_eq!(data, ["first", "second"], "split at {split}");
        }
        // Bytes that only begin like a byte order mark are content (here: invalid UTF-8).
        let mut parser = SseParser::new();
        assert!(parser.feed(&[0xEF]).unwrap().is_empty());
        assert!(parser.feed(b"data: x\n\n").is_err());
    }

    #[test]
    fn encodes_fields_in_standard_order() {
        let frame = SseFrame {
            id: Some("c:e:1"),
            event: Some("reset"),
            data: "line one\nline two",
            retry_ms: Some(2000),
        };
        assert_eq!(
            String::from_utf8(frame.encode()).unwrap(),
            "id: c:e:1\nevent: reset\nretry: 2000\ndata: line one\ndata: line two\n\n"
        );
    }

    #[test]
    fn parser_handles_every_line_ending_and_comments() {
        let mut parser = SseParser::new();
        let events = parser
            .feed(b"\xEF\xBB\xBF: heartbeat\r\ndata: a\rdata: b\r\n\r\nid: 9\ndata\n\n")
            .unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].data, "a\nb");
        assert_eq!(events[0].event, "message");
        assert_eq!(events[1].data, "");
        assert_eq!(events[1].last_event_id, "9");
    }

    #[test]
    fn comment_is_ignored_by_the_parser() {
        let mut parser = SseParser::new();
        assert!(
            parser
                .feed(&encode_comment("keep-alive"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn oversize_lines_are_errors() {
        let mut parser = SseParser::new();
        let huge = vec![b'x'; MAX_SSE_EVENT_BYTES + 1];
        assert!(parser.feed(&huge).is_err());
    }
}
