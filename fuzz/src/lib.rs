//! One fuzz target for every decoder of untrusted input, and the invariants each must keep.
//!
//! Every target is a plain function of bytes, listed in [`TARGETS`]. `cargo xtask fuzz` runs
//! each under libFuzzer (the `fuzz_targets/` binaries, feature `libfuzzer`) for a bounded
//! time; `cargo test -p resync-fuzz` replays the corpora in `corpus/<target>/` and a few
//! thousand seeded mutations of them, so every CI run smoke-tests every target. A target
//! panics only when an invariant breaks: malformed input must be refused, never accepted
//! half-read or crash.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use resync_protocol::sse::{SseFrame, SseParser};
use resync_protocol::{
    Channel, ClientFrame, Cursor, Epoch, IdempotencyKey, Payload, Position, ServerFrame,
};

/// A fuzz target: any bytes in, a panic only for a broken invariant.
pub type Target = fn(&[u8]);

/// Every target, by the name of its binary and corpus directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("client_frame", client_frame),
    ("server_frame", server_frame),
    ("websocket_inbox", websocket_inbox),
    ("sse_encoder", sse_encoder),
    ("sse_parser", sse_parser),
    ("cursor", cursor),
    ("names", names),
    ("query", query),
    ("jwt", jwt),
    ("payload", payload),
];

/// A frame from a client (WebSocket text): what decodes re-encodes to the same frame.
pub fn client_frame(data: &[u8]) {
    if let Ok(frame) = ClientFrame::decode(data) {
        let again = ClientFrame::decode(frame.encode().as_bytes()).expect("re-encoded frame");
        assert_eq!(again, frame);
    }
}

/// A frame from a server, as both clients decode it: the same round trip.
pub fn server_frame(data: &[u8]) {
    if let Ok(frame) = ServerFrame::decode(data) {
        let again = ServerFrame::decode(frame.encode().as_bytes()).expect("re-encoded frame");
        assert_eq!(again, frame);
    }
}

/// A client's WebSocket byte stream: bounded memory, and the same messages whether it arrives
/// whole or in chunks (the first byte picks the chunk size).
pub fn websocket_inbox(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(first % 64) + 1;
    let whole = resync_actix::fuzzing::websocket_inbox(stream, stream.len().max(1), 1024);
    let chunked = resync_actix::fuzzing::websocket_inbox(stream, chunk, 1024);
    assert_eq!(whole, chunked, "chunks of {chunk} read differently");
}

/// Strings through the server's SSE encoder come out of the parser as one event with the
/// same data (line breaks normalised to `\n`, as the standard has it).
pub fn sse_encoder(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut parts = text.splitn(3, '\u{1}');
    let (id, event, body) = (parts.next(), parts.next(), parts.next().unwrap_or(""));
    let frame = SseFrame {
        id: id.filter(|id| !id.contains('\0')),
        event: event.filter(|event| !event.trim_matches(['\r', '\n']).is_empty()),
        data: body,
        retry_ms: None,
    };
    let encoded = frame.encode();
    let mut parser = SseParser::new();
    let events = parser.feed(&encoded).expect("our own encoding parses");
    assert_eq!(events.len(), 1, "one frame is one event: {encoded:?}");
    let expected = body.replace("\r\n", "\n").replace('\r', "\n");
    assert_eq!(events[0].data, expected);
}

/// A server's event stream as the client parses it: the same events whole or in chunks (the
/// first byte picks the chunk size), and an error either way or neither.
pub fn sse_parser(data: &[u8]) {
    let Some((&first, stream)) = data.split_first() else {
        return;
    };
    let whole = SseParser::new().feed(stream);
    let mut parser = SseParser::new();
    let mut chunked = Ok(Vec::new());
    for piece in stream.chunks(usize::from(first % 16) + 1) {
        match parser.feed(piece) {
            Ok(events) => {
                if let Ok(all) = &mut chunked {
                    all.extend(events);
                }
            }
            Err(error) => {
                chunked = Err(error);
                break;
            }
        }
    }
    match (whole, chunked) {
        (Ok(whole), Ok(chunked)) => assert_eq!(whole, chunked),
        (Err(_), Err(_)) => {}
        (whole, chunked) => panic!("whole {whole:?} but chunked {chunked:?}"),
    }
}

/// Cursors (`cursor=` and `Last-Event-ID`): what parses prints back to the same cursor.
pub fn cursor(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cursor) = Cursor::parse(text) {
        let again = Cursor::parse(&cursor.to_string()).expect("a printed cursor parses");
        assert_eq!(again, cursor);
        let mut written = Vec::new();
        cursor.write_to(&mut written);
        assert_eq!(written, cursor.to_string().into_bytes());
    }
}

/// Channel names, epochs, idempotency keys and positions: valid ones print back to
/// themselves.
pub fn names(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(channel) = Channel::new(text) {
        assert_eq!(channel.as_str(), text);
        assert!(!text.contains(','), "channel names exclude ','");
    }
    if let Ok(epoch) = Epoch::new(text) {
        assert_eq!(epoch.as_str(), text);
    }
    if let Ok(key) = IdempotencyKey::new(text) {
        assert_eq!(key.as_str(), text);
    }
    if let Ok(position) = text.parse::<Position>() {
        let again: Position = position.to_string().parse().expect("a printed position");
        assert_eq!(again, position);
    }
}

/// Query strings of SSE, long-poll and WebSocket requests.
pub fn query(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        resync_actix::fuzzing::query(text, 8);
    }
}

/// The secret the JWT target signs with.
const SECRET: &[u8] = b"fuzzing-secret-0123456789abcdef!";

/// Tokens: arbitrary ones never verify and never panic; the input taken as claims, correctly
/// signed, verifies only with an `exp` in the future (checked arithmetic for every time).
pub fn jwt(data: &[u8]) {
    let now = 1_800_000_000;
    if let Ok(token) = std::str::from_utf8(data) {
        let _ = resync_actix::jwt::verify_at(token, SECRET, now);
    }
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let claims = URL_SAFE_NO_PAD.encode(data);
    let signing_input = format!("{header}.{claims}");
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET).expect("any key length");
    mac.update(signing_input.as_bytes());
    let signature = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    if let Ok(verified) =
        resync_actix::jwt::verify_at(&format!("{signing_input}.{signature}"), SECRET, now)
    {
        assert!(
            verified
                .exp
                .saturating_add(resync_actix::jwt::LEEWAY_SECONDS)
                > now
        );
    }
}

/// Published data: what is accepted is one line of JSON, the text that was sent with its
/// line breaks turned into spaces (whitespace between tokens: the same value).
pub fn payload(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(payload) = Payload::from_json(text) {
        let encoded = payload.as_str();
        assert!(!encoded.contains(['\n', '\r']), "a payload is one line");
        let expected = text.replace(['\n', '\r'], " ");
        assert_eq!(encoded, expected.trim_matches([' ', '\t']));
        assert!(serde_json::from_str::<&serde_json::value::RawValue>(encoded).is_ok());
    }
}
