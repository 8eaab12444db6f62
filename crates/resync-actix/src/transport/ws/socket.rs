//! The WebSocket itself: the handshake, a response body that carries outgoing frames, and
//! the stream of incoming messages, on actix-http's WebSocket handshake and frame codec.
//!
//! actix-ws wraps the same codec, but gives every connection a 32-slot channel and a second
//! frame buffer, about 2.8 KB per idle connection (measured with `loadgen memory`:
//! 16.9 against 14.1 KB at 10,000 idle connections). Here the
//! connection task writes frames straight into one buffer that the response body hands to
//! actix-http's writer; the buffer is allocated only while frames wait, and a connection
//! whose client does not read fills it to [`OUTBOX_LIMIT`] and then waits (and the
//! connection's write timeout ends it).

use std::cell::RefCell;
use std::convert::Infallible;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

use actix_codec::Decoder;
use actix_http::ws::{Codec, Frame, Item, OpCode, Parser, ProtocolError};
use actix_web::body::{BodySize, MessageBody};
use actix_web::{HttpRequest, HttpResponse, web};
use bytes::{Bytes, BytesMut};
use futures_util::Stream;

/// Bytes of frames that may wait for the socket before a send waits for room; the body hands
/// them to actix-http in one chunk per write.
pub(crate) const OUTBOX_LIMIT: usize = crate::write_size::WRITE_BYTES;

/// Accepts the WebSocket handshake of `request`. The response must be returned to actix-web;
/// frames written to the [`Outbox`] go out through it, and the [`Inbox`] yields the client's
/// messages of at most `max_message` bytes.
pub(crate) fn accept(
    request: &HttpRequest,
    payload: web::Payload,
    max_message: usize,
) -> Result<(HttpResponse, Outbox, Inbox), AcceptError> {
    let pipe = Rc::new(RefCell::new(Pipe::default()));
    let body = OutboxBody { pipe: pipe.clone() };
    let response = actix_http::ws::handshake(request.head())?
        .message_body(body.boxed())?
        .into();
    let inbox = Inbox {
        payload: payload.into_inner(),
        reader: FrameReader::new(max_message),
        pipe: pipe.clone(),
        ended: false,
    };
    Ok((response, Outbox { pipe }, inbox))
}

/// Why a WebSocket upgrade was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AcceptError {
    #[error(transparent)]
    Handshake(#[from] actix_http::ws::HandshakeError),
    #[error("cannot build the upgrade response: {0}")]
    Response(#[from] actix_http::Error),
}

/// What the connection task and the response body share.
#[derive(Default)]
struct Pipe {
    /// Encoded frames not yet handed to the writer.
    frames: BytesMut,
    /// The response body, waiting for frames.
    body: Option<Waker>,
    /// The connection task, waiting for room in `frames`.
    sender: Option<Waker>,
    /// The connection task, waiting for the client's next message.
    reader: Option<Waker>,
    /// No more frames will come: the body ends once `frames` is drained.
    finished: bool,
    /// actix-http dropped the body: the connection is gone.
    gone: bool,
}

fn register(slot: &mut Option<Waker>, waker: &Waker) {
    match slot {
        Some(registered) if registered.will_wake(waker) => {}
        _ => *slot = Some(waker.clone()),
    }
}

fn wake(slot: &mut Option<Waker>) {
    if let Some(waker) = slot.take() {
        waker.wake();
    }
}

/// A frame the connection sends.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Outgoing<'a> {
    /// A text message.
    Text(&'a [u8]),
    /// The answer to a client's ping.
    Pong(&'a [u8]),
}

impl<'a> Outgoing<'a> {
    fn parts(self) -> (OpCode, &'a [u8]) {
        match self {
            Outgoing::Text(payload) => (OpCode::Text, payload),
            Outgoing::Pong(payload) => (OpCode::Pong, payload),
        }
    }
}

/// Appends one unmasked, final server frame. The only caller of actix-http's encoder, whose
/// signature changes upstream (it gains an `rsv_bits` argument): the bytes are pinned by the
/// tests below.
fn write_frame(out: &mut BytesMut, opcode: OpCode, payload: &[u8]) {
    Parser::write_message(out, payload, opcode, true, false);
}

/// The socket is gone: nothing more can be sent.
#[derive(Debug)]
pub(crate) struct Gone;

/// The sending half: frames written here go out in order.
pub(crate) struct Outbox {
    pipe: Rc<RefCell<Pipe>>,
}

impl Outbox {
    /// Queues a frame once the queue has room. Text payloads are UTF-8 (every frame of ours
    /// is: it is built from validated JSON and channel names).
    pub(crate) async fn send(&mut self, frame: Outgoing<'_>) -> Result<(), Gone> {
        let (opcode, payload) = frame.parts();
        self.frame(opcode, payload).await
    }

    /// Queues a frame (see [`send`](Self::send)) if the queue has room now; `false` when it
    /// is full.
    pub(crate) fn try_send(&mut self, frame: Outgoing<'_>) -> Result<bool, Gone> {
        let (opcode, payload) = frame.parts();
        self.try_frame(opcode, payload, None)
    }

    /// Gives up on the client: frames still queued are dropped and the response ends. Its
    /// socket goes when the kernel's user timeout (set by `on_connect`) finds it stuck.
    pub(crate) fn abort(&mut self) {
        let mut pipe = self.pipe.borrow_mut();
        pipe.frames = BytesMut::new();
        pipe.finished = true;
        wake(&mut pipe.body);
    }

    /// Queues a close frame; the response ends after it.
    pub(crate) async fn close(&mut self, code: u16, reason: &str) -> Result<(), Gone> {
        let mut payload = Vec::with_capacity(2 + reason.len());
        payload.extend_from_slice(&code.to_be_bytes());
        payload.extend_from_slice(reason.as_bytes());
        self.frame(OpCode::Close, &payload).await?;
        self.pipe.borrow_mut().finished = true;
        Ok(())
    }

    /// Queues one frame once the queue has room.
    async fn frame(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), Gone> {
        std::future::poll_fn(|context| {
            match self.try_frame(opcode, payload, Some(context.waker())) {
                Ok(true) => Poll::Ready(Ok(())),
                Ok(false) => Poll::Pending,
                Err(gone) => Poll::Ready(Err(gone)),
            }
        })
        .await
    }

    /// Queues one frame if the queue has room: `false` when it is full, and then `waker`, if
    /// given, is woken once the writer has drained it.
    fn try_frame(
        &mut self,
        opcode: OpCode,
        payload: &[u8],
        waker: Option<&Waker>,
    ) -> Result<bool, Gone> {
        let mut pipe = self.pipe.borrow_mut();
        if pipe.gone || pipe.finished {
            return Err(Gone);
        }
        if pipe.frames.len() >= OUTBOX_LIMIT {
            if let Some(waker) = waker {
                register(&mut pipe.sender, waker);
            }
            return Ok(false);
        }
        if !pipe.frames.is_empty() {
            // A second frame before the writer came round: a burst.
            let room = crate::write_size::burst_room(pipe.frames.len());
            pipe.frames.reserve(room.max(payload.len() + 14));
        }
        write_frame(&mut pipe.frames, opcode, payload);
        wake(&mut pipe.body);
        Ok(true)
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        let mut pipe = self.pipe.borrow_mut();
        pipe.finished = true;
        wake(&mut pipe.body);
    }
}

/// The response body: whatever frames are queued, in one chunk per poll.
struct OutboxBody {
    pipe: Rc<RefCell<Pipe>>,
}

impl MessageBody for OutboxBody {
    type Error = Infallible;

    fn size(&self) -> BodySize {
        BodySize::Stream
    }

    fn poll_next(
        self: Pin<&mut Self>,
        context: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        let mut pipe = self.pipe.borrow_mut();
        if !pipe.frames.is_empty() {
            // Taken whole, so an idle connection holds no buffer once the writer has copied it.
            let frames = std::mem::take(&mut pipe.frames).freeze();
            wake(&mut pipe.sender);
            return Poll::Ready(Some(Ok(frames)));
        }
        if pipe.finished {
            return Poll::Ready(None);
        }
        register(&mut pipe.body, context.waker());
        Poll::Pending
    }
}

impl Drop for OutboxBody {
    fn drop(&mut self) {
        let mut pipe = self.pipe.borrow_mut();
        pipe.gone = true;
        wake(&mut pipe.sender);
        wake(&mut pipe.reader);
    }
}

/// Why the inbox stopped reading the client.
#[derive(Debug, thiserror::Error)]
pub(crate) enum InboxError {
    /// A frame, or a fragmented message, declared or reached more than the size limit.
    #[error("message over the size limit")]
    TooBig,
    /// The client broke RFC 6455's framing rules.
    #[error("websocket framing error: {0}")]
    Framing(&'static str),
    /// actix-http's codec refused a frame.
    #[error(transparent)]
    Codec(ProtocolError),
    /// Reading the socket failed.
    #[error("reading the socket failed: {0}")]
    Io(String),
}

impl From<ProtocolError> for InboxError {
    fn from(error: ProtocolError) -> Self {
        match error {
            ProtocolError::Overflow => InboxError::TooBig,
            other => InboxError::Codec(other),
        }
    }
}

/// What the first bytes of a frame say, read before its payload arrives: each rule is
/// checked as soon as the bytes it needs are in, so a stream is refused for the same reason
/// however it is split into reads.
#[derive(Debug, PartialEq, Eq)]
struct FrameHeader {
    fin: bool,
    reserved_bits: u8,
    opcode: u8,
    /// The mask bit, once the second byte is in.
    masked: Option<bool>,
    /// The 7-bit length field, once the second byte is in.
    short_length: Option<u8>,
    /// The payload length, once the extended length (if any) is in.
    length: Option<u64>,
}

impl FrameHeader {
    /// What has arrived of the header at the start of `bytes`, or `None` before its first
    /// byte.
    fn peek(bytes: &[u8]) -> Option<FrameHeader> {
        let &first = bytes.first()?;
        let second = bytes.get(1).copied();
        let short_length = second.map(|second| second & 0x7F);
        let length = match short_length {
            None => None,
            Some(126) => bytes
                .get(2..4)
                .map(|long| u64::from(u16::from_be_bytes([long[0], long[1]]))),
            Some(127) => bytes.get(2..10).map(|long| {
                let mut eight = [0u8; 8];
                eight.copy_from_slice(long);
                u64::from_be_bytes(eight)
            }),
            Some(short) => Some(u64::from(short)),
        };
        Some(FrameHeader {
            fin: first & 0x80 != 0,
            reserved_bits: first & 0x70,
            opcode: first & 0x0F,
            masked: second.map(|second| second & 0x80 != 0),
            short_length,
            length,
        })
    }

    /// Checks the header against RFC 6455 and the size limit, given how many bytes of a
    /// fragmented message are already joined (`None` when none is being joined).
    fn check(&self, joined: Option<usize>, max_message: usize) -> Result<(), InboxError> {
        if self.reserved_bits != 0 {
            // No extension is negotiated, so RSV1-3 must be 0 (RFC 6455 section 5.2).
            return Err(InboxError::Framing(
                "reserved bits set without an extension",
            ));
        }
        if matches!(self.opcode, 3..=7 | 11..=15) {
            return Err(InboxError::Framing("reserved opcode"));
        }
        let control = self.opcode & 0x08 != 0;
        if control && !self.fin {
            return Err(InboxError::Framing("fragmented control frame"));
        }
        if !control {
            match (joined.is_some(), self.opcode) {
                (true, 1 | 2) => {
                    return Err(InboxError::Framing(
                        "new data frame inside a fragmented message",
                    ));
                }
                (false, 0) => {
                    return Err(InboxError::Framing(
                        "continuation frame without a message to continue",
                    ));
                }
                _ => {}
            }
        }
        if self.masked == Some(false) {
            return Err(InboxError::Framing("client frames must be masked"));
        }
        if control && self.short_length.is_some_and(|length| length > 125) {
            return Err(InboxError::Framing("control frame over 125 bytes"));
        }
        if self.opcode == 8 && self.short_length == Some(1) {
            // A close payload is empty, or a two-byte code and a reason (RFC 6455 5.5.1).
            return Err(InboxError::Framing("close payload of one byte"));
        }
        let Some(length) = self.length else {
            return Ok(());
        };
        if control {
            return Ok(());
        }
        let total = u64::try_from(joined.unwrap_or(0))
            .unwrap_or(u64::MAX)
            .saturating_add(length);
        if total > u64::try_from(max_message).unwrap_or(u64::MAX) {
            return Err(InboxError::TooBig);
        }
        Ok(())
    }
}

/// A whole close frame at the start of `bytes` must carry its reason as UTF-8 (RFC 6455
/// 5.5.1; actix-http reads it lossily). A close frame not yet whole passes until it is.
fn check_close_reason(bytes: &[u8]) -> Result<(), InboxError> {
    // A checked header: masked, at most 125 bytes, so 2 bytes of header and 4 of mask.
    let Some(&second) = bytes.get(1) else {
        return Ok(());
    };
    let length = usize::from(second & 0x7F);
    let Some(frame) = bytes.get(..6 + length) else {
        return Ok(());
    };
    let (mask, payload) = frame[2..].split_at(4);
    if payload.len() <= 2 {
        return Ok(());
    }
    let reason: Vec<u8> = payload
        .iter()
        .enumerate()
        .skip(2)
        .map(|(index, byte)| byte ^ mask[index % 4])
        .collect();
    match std::str::from_utf8(&reason) {
        Ok(_) => Ok(()),
        Err(_) => Err(InboxError::Framing("close reason is not UTF-8")),
    }
}

/// Whether a close code may be sent by a peer (RFC 6455 section 7.4): 1004-1006 and 1015 are
/// reserved, codes below 1000 and from 5000 on are not codes at all.
fn close_code_is_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A message from the client, continuation frames joined.
#[derive(Debug)]
pub(crate) enum Incoming {
    /// A text message; its bytes are not yet checked to be UTF-8.
    Text(Bytes),
    Binary,
    Ping(Bytes),
    Pong,
    Close,
}

/// A fragmented message being joined.
struct Partial {
    text: bool,
    bytes: BytesMut,
}

/// Turns the client's bytes into messages: frames checked against RFC 6455 and the size
/// limit on their header, continuation frames joined. Sans-IO, so it is tested (and fuzzed,
/// `fuzz/`) byte by byte.
pub(crate) struct FrameReader {
    /// Received bytes not yet decoded into frames; allocated only while a frame is partial.
    buffer: BytesMut,
    codec: Codec,
    partial: Option<Partial>,
    max_message: usize,
}

impl FrameReader {
    pub(crate) fn new(max_message: usize) -> Self {
        Self {
            buffer: BytesMut::new(),
            codec: Codec::new().max_size(max_message),
            partial: None,
            max_message,
        }
    }

    /// Adds bytes read from the socket.
    pub(crate) fn feed(&mut self, bytes: &[u8]) {
        // Copied: keeping the chunk would keep actix-http's whole read buffer alive.
        self.buffer.extend_from_slice(bytes);
    }

    #[cfg(any(test, feature = "fuzzing"))]
    /// Bytes held: received and not yet decoded, plus a fragmented message being joined.
    pub(crate) fn held(&self) -> usize {
        self.buffer.len()
            + self
                .partial
                .as_ref()
                .map_or(0, |partial| partial.bytes.len())
    }

    /// The next whole message, `None` until more bytes are fed. After an error the reader
    /// must not be used again: the connection ends.
    pub(crate) fn next_message(&mut self) -> Result<Option<Incoming>, InboxError> {
        loop {
            self.check_next_header()?;
            match self.codec.decode(&mut self.buffer)? {
                Some(frame) => {
                    if let Some(message) = self.assemble(frame)? {
                        return Ok(Some(message));
                    }
                }
                None => {
                    if self.buffer.is_empty() {
                        // Give the memory back between messages.
                        self.buffer = BytesMut::new();
                    }
                    return Ok(None);
                }
            }
        }
    }

    /// Begins joining a fragmented message.
    fn start(&mut self, text: bool, bytes: &[u8]) -> Result<Option<Incoming>, InboxError> {
        self.partial = Some(Partial {
            text,
            bytes: BytesMut::from(bytes),
        });
        Ok(None)
    }

    /// Adds a fragment to the message being joined, within the size limit.
    fn append(&mut self, bytes: &[u8]) -> Result<(), InboxError> {
        let partial = self
            .partial
            .as_mut()
            .ok_or(InboxError::Codec(ProtocolError::ContinuationNotStarted))?;
        if partial.bytes.len() + bytes.len() > self.max_message {
            return Err(InboxError::TooBig);
        }
        partial.bytes.extend_from_slice(bytes);
        Ok(())
    }

    /// Refuses the next frame as soon as its header is in, before any of its payload is
    /// buffered: actix-http's parser checks the size limit only once the whole frame has
    /// arrived, so a header declaring 2^40 bytes would have us keep whatever the client sends.
    fn check_next_header(&self) -> Result<(), InboxError> {
        match FrameHeader::peek(&self.buffer) {
            Some(header) => {
                header.check(
                    self.partial.as_ref().map(|partial| partial.bytes.len()),
                    self.max_message,
                )?;
                if header.opcode == 8 {
                    check_close_reason(&self.buffer)?;
                }
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Joins continuation frames; `None` while a fragmented message is incomplete.
    fn assemble(&mut self, frame: Frame) -> Result<Option<Incoming>, InboxError> {
        Ok(Some(match frame {
            Frame::Text(bytes) => Incoming::Text(bytes),
            Frame::Binary(_) => Incoming::Binary,
            Frame::Ping(bytes) => Incoming::Ping(bytes),
            Frame::Pong(_) => Incoming::Pong,
            Frame::Close(reason) => {
                if let Some(reason) = reason
                    && !close_code_is_valid(u16::from(reason.code))
                {
                    return Err(InboxError::Framing("close code not allowed on the wire"));
                }
                Incoming::Close
            }
            Frame::Continuation(Item::FirstText(bytes)) => return self.start(true, &bytes),
            Frame::Continuation(Item::FirstBinary(bytes)) => return self.start(false, &bytes),
            Frame::Continuation(Item::Continue(bytes)) => {
                self.append(&bytes)?;
                return Ok(None);
            }
            Frame::Continuation(Item::Last(bytes)) => {
                self.append(&bytes)?;
                match self.partial.take() {
                    Some(Partial { text: true, bytes }) => Incoming::Text(bytes.freeze()),
                    _ => Incoming::Binary,
                }
            }
        }))
    }
}

/// The receiving half: the client's messages, ending when the connection does.
pub(crate) struct Inbox {
    payload: actix_http::Payload,
    reader: FrameReader,
    pipe: Rc<RefCell<Pipe>>,
    ended: bool,
}

impl Stream for Inbox {
    type Item = Result<Incoming, InboxError>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            match this.reader.next_message() {
                Ok(Some(message)) => return Poll::Ready(Some(Ok(message))),
                Ok(None) => {}
                Err(error) => {
                    this.ended = true;
                    this.reader = FrameReader::new(0);
                    return Poll::Ready(Some(Err(error)));
                }
            }
            if this.pipe.borrow().gone {
                this.ended = true;
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.payload).poll_next(context) {
                Poll::Ready(Some(Ok(bytes))) => this.reader.feed(&bytes),
                Poll::Ready(Some(Err(error))) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(InboxError::Io(error.to_string()))));
                }
                Poll::Ready(None) => {
                    this.ended = true;
                    return Poll::Ready(None);
                }
                Poll::Pending => {
                    register(&mut this.pipe.borrow_mut().reader, context.waker());
                    return Poll::Pending;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

    use super::*;

    /// A masked client frame (mask 0: the payload reads as sent).
    fn client_frame(first: u8, payload: &[u8]) -> Vec<u8> {
        let mut frame = vec![first];
        match payload.len() {
            length @ 0..=125 => frame.push(0x80 | length as u8),
            length @ 126..=65_535 => {
                frame.push(0x80 | 126);
                frame.extend_from_slice(&(length as u16).to_be_bytes());
            }
            length => {
                frame.push(0x80 | 127);
                frame.extend_from_slice(&(length as u64).to_be_bytes());
            }
        }
        frame.extend_from_slice(&[0, 0, 0, 0]);
        frame.extend_from_slice(payload);
        frame
    }

    fn text(message: &Incoming) -> &[u8] {
        match message {
            Incoming::Text(bytes) => bytes,
            other => panic!("expected text, got {other:?}"),
        }
    }

    #[test]
    fn server_frames_are_unmasked_final_frames_with_the_shortest_length() {
        let mut out = BytesMut::new();
        write_frame(&mut out, OpCode::Text, b"hi");
        assert_eq!(&out[..], &[0x81, 0x02, b'h', b'i']);
        out.clear();
        write_frame(&mut out, OpCode::Pong, b"");
        assert_eq!(&out[..], &[0x8A, 0x00]);
        out.clear();
        write_frame(&mut out, OpCode::Text, &[b'x'; 300]);
        assert_eq!(&out[..4], &[0x81, 126, 0x01, 0x2C]);
        assert_eq!(out.len(), 4 + 300);
        out.clear();
        write_frame(&mut out, OpCode::Close, &1000u16.to_be_bytes());
        assert_eq!(&out[..], &[0x88, 0x02, 0x03, 0xE8]);
        out.clear();
        write_frame(&mut out, OpCode::Text, &vec![b'y'; 70_000]);
        assert_eq!(&out[..2], &[0x81, 127]);
        assert_eq!(&out[2..10], &70_000u64.to_be_bytes());
    }

    #[test]
    fn a_burst_fills_one_write_allocated_once_and_the_body_hands_it_over_whole() {
        let pipe = Rc::new(RefCell::new(Pipe::default()));
        let mut outbox = Outbox { pipe: pipe.clone() };
        let mut body = OutboxBody { pipe: pipe.clone() };
        let payload = [b'x'; 100];
        let frame = 2 + payload.len();
        let mut queued = 0;
        while outbox.try_send(Outgoing::Text(&payload)).unwrap() {
            queued += 1;
        }
        assert_eq!(
            queued,
            OUTBOX_LIMIT.div_ceil(frame),
            "full at the write size"
        );
        assert_eq!(
            pipe.borrow().frames.capacity(),
            frame + crate::write_size::burst_room(frame),
            "the burst's buffer was sized once, at its second frame, not doubled past it"
        );
        let mut context = Context::from_waker(Waker::noop());
        let Poll::Ready(Some(Ok(chunk))) = Pin::new(&mut body).poll_next(&mut context) else {
            panic!("the body had frames to hand over");
        };
        assert_eq!(
            chunk.len(),
            queued * frame,
            "every queued frame in one chunk"
        );
        assert!(pipe.borrow().frames.is_empty());
        assert!(
            outbox.try_send(Outgoing::Text(&payload)).unwrap(),
            "room again once the writer took them"
        );
    }

    #[test]
    fn fragments_are_joined_and_a_ping_between_them_comes_first() {
        let mut reader = FrameReader::new(1024);
        reader.feed(&client_frame(0x01, b"hel")); // text, not final
        assert!(reader.next_message().unwrap().is_none());
        reader.feed(&client_frame(0x89, b"p")); // ping inside the fragmented message
        match reader.next_message().unwrap() {
            Some(Incoming::Ping(bytes)) => assert_eq!(&bytes[..], b"p"),
            other => panic!("expected the ping, got {other:?}"),
        }
        reader.feed(&client_frame(0x00, b"lo ")); // continuation
        reader.feed(&client_frame(0x80, b"world")); // final continuation
        assert_eq!(
            text(&reader.next_message().unwrap().unwrap()),
            b"hello world"
        );
        assert!(reader.next_message().unwrap().is_none());
        assert_eq!(reader.held(), 0);
    }

    #[test]
    fn a_frame_split_byte_by_byte_is_one_message() {
        let mut reader = FrameReader::new(1024);
        let frame = client_frame(0x81, b"{\"type\":\"ping\"}");
        for (index, byte) in frame.iter().enumerate() {
            reader.feed(&[*byte]);
            let message = reader.next_message().unwrap();
            assert_eq!(message.is_some(), index == frame.len() - 1);
        }
    }

    #[test]
    fn a_header_past_the_limit_is_refused_before_its_payload() {
        let mut reader = FrameReader::new(1024);
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        reader.feed(&header);
        assert!(matches!(reader.next_message(), Err(InboxError::TooBig)));
        assert_eq!(
            reader.held(),
            header.len(),
            "nothing of the payload was waited for"
        );
    }

    #[test]
    fn fragments_past_the_limit_together_are_refused() {
        let mut reader = FrameReader::new(100);
        reader.feed(&client_frame(0x01, &[b'a'; 60]));
        assert!(reader.next_message().unwrap().is_none());
        reader.feed(&client_frame(0x80, &[b'b'; 60]));
        assert!(matches!(reader.next_message(), Err(InboxError::TooBig)));
        assert!(reader.held() <= 100 + 14 + 60);
    }

    #[test]
    fn framing_violations_are_refused() {
        for (frame, why) in [
            (client_frame(0xC1, b"x"), "reserved bit"),
            (client_frame(0x09, b"x"), "fragmented ping"),
            (client_frame(0x89, &[b'x'; 126]), "oversized ping"),
            (
                client_frame(0x88, &1005u16.to_be_bytes()),
                "reserved close code",
            ),
        ] {
            let mut reader = FrameReader::new(1024);
            reader.feed(&frame);
            assert!(
                matches!(reader.next_message(), Err(InboxError::Framing(_))),
                "{why}"
            );
        }
        let mut reader = FrameReader::new(1024);
        reader.feed(&client_frame(0x01, b"a"));
        reader.feed(&client_frame(0x81, b"b"));
        assert!(
            matches!(reader.next_message(), Err(InboxError::Framing(_))),
            "a new text frame inside a fragmented message"
        );
    }
}
