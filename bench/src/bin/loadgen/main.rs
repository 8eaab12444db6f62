//! The load generator of `cargo xtask bench`: opens many real connections to a resync server
//! (or to the raw baseline), publishes through the HTTP API, and reports one JSON line.
//!
//! It is a release binary of ours, not the resync client SDK, so that it stays cheap per
//! connection: subscribers only count events, and a sample of them parse timestamps for
//! latency.

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark tool: any failure should stop it loudly"
)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;

mod edge_floods;
mod failover;
mod flood;
mod keyed;
mod presence;

const API_KEY: &str = "bench-api-key-0123456789";
/// Subscribers that parse timestamps for latency; the rest only count.
const LATENCY_SAMPLE: usize = 200;

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_micros() as u64)
}

fn argument(arguments: &[String], name: &str) -> Option<String> {
    arguments
        .iter()
        .position(|argument| argument == name)
        .and_then(|index| arguments.get(index + 1).cloned())
}

fn number(arguments: &[String], name: &str, default: u64) -> u64 {
    argument(arguments, name)
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

#[tokio::main]
async fn main() -> Result<()> {
    let arguments: Vec<String> = std::env::args().collect();
    let scenario = arguments.get(1).cloned().unwrap_or_default();
    let url = argument(&arguments, "--url").context("--url")?;
    let result = match scenario.as_str() {
        "fanout" => fanout(&arguments, &url).await?,
        "resume" => resume(&arguments, &url).await?,
        "memory" => memory(&arguments, &url).await?,
        "storm" => storm(&arguments, &url).await?,
        "poll" => poll(&arguments, &url).await?,
        "channels" => channels(&arguments, &url).await?,
        "publishes" => publishes(&arguments, &url).await?,
        "flood" => flood::flood(&arguments, &url).await?,
        "presence" => presence::presence(&arguments, &url).await?,
        "failover" => failover::run(&arguments, &url).await?,
        "keyed" => keyed::run(&arguments, &url).await?,
        other => bail!("unknown scenario {other:?}"),
    };
    println!("{result}");
    Ok(())
}

/// Shared counters of one run.
#[derive(Default)]
struct Tally {
    delivered: AtomicU64,
    ready: AtomicU64,
    finished: AtomicU64,
    /// Connections that ended under a subscriber before the run did.
    cutoffs: AtomicU64,
    /// Events seen again (seq not past the last one).
    duplicates: AtomicU64,
    /// Events skipped over (seq jumped past the next one).
    gap_events: AtomicU64,
    /// Frames telling a subscriber to refetch.
    resets: AtomicU64,

    latencies: Mutex<Vec<u64>>,
    last_finish: Mutex<Option<Instant>>,
}

/// The payload: a publish timestamp padded to about 100 bytes.
fn payload() -> serde_json::Value {
    serde_json::json!({ "t": now_micros(), "pad": "x".repeat(64) })
}

/// Extracts `"t":<micros>` from an event frame.
fn timestamp(frame: &[u8]) -> Option<u64> {
    let at = frame.windows(4).position(|window| window == b"\"t\":")? + 4;
    let digits: Vec<u8> = frame[at..]
        .iter()
        .take_while(|byte| byte.is_ascii_digit())
        .copied()
        .collect();
    std::str::from_utf8(&digits).ok()?.parse().ok()
}

/// Further attempts at a subscriber's connect before it counts as failed.
const CONNECT_RETRIES: u64 = 3;

/// Runs `connect` again, after a short pause, when a connect is refused or reset while
/// thousands arrive at once: one lost connect should not void a whole run.
async fn with_retries<T, F, Connect>(mut connect: Connect) -> Result<T>
where
    Connect: FnMut() -> F,
    F: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match connect().await {
            Ok(connected) => return Ok(connected),
            Err(_) if attempt < CONNECT_RETRIES => {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            Err(error) => return Err(error),
        }
    }
}

/// Searchers built once: the subscribers run them on every frame, and building a searcher
/// per call showed in the generator's own profile.
static EVENT_TYPE: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(br#""type":"event""#));
static SEQ_KEY: std::sync::LazyLock<memchr::memmem::Finder<'static>> =
    std::sync::LazyLock::new(|| memchr::memmem::Finder::new(br#""seq":"#));

fn is_event(frame: &[u8]) -> bool {
    // WebSocket frames start with it; an SSE event has its `id:` line first.
    frame.starts_with(br#"{"type":"event""#) || EVENT_TYPE.find(frame).is_some()
}

/// One subscriber's place in its channel: what it has seen, so that it can check order and
/// resume after a cut (WebSocket `since`, SSE `Last-Event-ID`).
#[derive(Default)]
struct Progress {
    /// Events counted: new seqs only.
    seen: u64,
    last_seq: u64,
    epoch: Option<String>,
    /// Whether the subscriber comes back after its connection ends (or stops there).
    resumes: bool,
    /// Events counted but not yet added to the run's tally: added once per read, not per
    /// event, since one counter shared by every subscriber was the generator's hottest line.
    unflushed: u64,
}

impl Progress {
    fn flush(&mut self, tally: &Tally) {
        if self.unflushed > 0 {
            tally
                .delivered
                .fetch_add(std::mem::take(&mut self.unflushed), Ordering::Relaxed);
        }
    }

    /// From nothing seen, coming back after every cut.
    fn resuming() -> Self {
        Self {
            resumes: true,
            ..Self::default()
        }
    }
}

/// What a subscriber counts into: the run's tally, how many events finish it, and whether it
/// samples latency.
struct Counting {
    tally: Arc<Tally>,
    expected: u64,
    sampled: bool,
}

/// The number `bytes` start with.
fn digits_at(bytes: &[u8]) -> Option<u64> {
    let mut value: u64 = 0;
    let mut digits = 0;
    for byte in bytes {
        if !byte.is_ascii_digit() {
            break;
        }
        value = value.checked_mul(10)?.checked_add(u64::from(byte - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(value)
}

/// The string after `"epoch":"` in an event frame.
fn epoch_of(frame: &[u8]) -> Option<String> {
    let key = br#""epoch":""#;
    let at = memchr::memmem::find(frame, key)? + key.len();
    let end = memchr::memchr(b'"', &frame[at..])?;
    String::from_utf8(frame[at..at + end].to_vec()).ok()
}

/// Counts an event by its seq: a new one counts (and the `expected`-th marks the subscriber
/// finished), an old one is a duplicate, a jump past the next is a gap (events lost).
fn count(counting: &Counting, progress: &mut Progress, frame: &[u8]) {
    let Counting {
        tally,
        expected,
        sampled,
    } = counting;
    let (expected, sampled) = (*expected, *sampled);
    let Some(seq) = SEQ_KEY
        .find(frame)
        .and_then(|at| digits_at(&frame[at + br#""seq":"#.len()..]))
    else {
        return;
    };
    if progress.epoch.is_none() {
        progress.epoch = epoch_of(frame);
    }
    if seq <= progress.last_seq {
        tally.duplicates.fetch_add(1, Ordering::Relaxed);
        return;
    }
    if seq > progress.last_seq + 1 {
        tally
            .gap_events
            .fetch_add(seq - progress.last_seq - 1, Ordering::Relaxed);
    }
    progress.last_seq = seq;
    progress.seen += 1;
    progress.unflushed += 1;
    if sampled && let Some(sent) = timestamp(frame) {
        tally
            .latencies
            .lock()
            .unwrap()
            .push(now_micros().saturating_sub(sent));
    }
    if progress.seen == expected {
        progress.flush(tally);
        tally.finished.fetch_add(1, Ordering::Relaxed);
        *tally.last_finish.lock().unwrap() = Some(Instant::now());
    }
}

/// A frame that is not an event but says the client must refetch.
fn is_reset(frame: &[u8]) -> bool {
    memchr::memmem::find(frame, br#""outcome":"reset""#).is_some()
        || frame.starts_with(br#"{"type":"reset""#)
}

/// A masked client frame (RFC 6455 requires clients to mask), for the few frames a lean
/// subscriber sends: its subscribe, `pong`s and protocol pongs.
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask: [u8; 4] = fastrand::u32(..).to_be_bytes();
    let mut frame = Vec::with_capacity(payload.len() + 14);
    frame.push(0x80 | opcode);
    match payload.len() {
        length @ 0..=125 => frame.push(0x80 | length as u8),
        length @ 126..=65535 => {
            frame.push(0x80 | 126);
            frame.extend_from_slice(&(length as u16).to_be_bytes());
        }
        length => {
            frame.push(0x80 | 127);
            frame.extend_from_slice(&(length as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(&mask);
    frame.extend(
        payload
            .iter()
            .enumerate()
            .map(|(index, byte)| byte ^ mask[index % 4]),
    );
    frame
}

/// Connects to `address` (retried as [`with_retries`] says) and sends `request`.
async fn send_request(address: &str, request: &str) -> Result<TcpStream> {
    with_retries(|| async {
        let mut stream = TcpStream::connect(address).await?;
        stream.set_nodelay(true)?;
        stream.write_all(request.as_bytes()).await?;
        Ok(stream)
    })
    .await
}

/// Opens a WebSocket to `base` + `path` on a bare socket (the handshake written by hand):
/// the stream, and the bytes read past the response head (already frames).
async fn ws_connect(base: &str, path: &str) -> Result<(TcpStream, Vec<u8>)> {
    let address = base.trim_start_matches("http://").to_owned();
    let request = format!(
        "GET {path} HTTP/1.1\r\nhost: {address}\r\nupgrade: websocket\r\nconnection: Upgrade\r\n\
         sec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\nsec-websocket-version: 13\r\n\r\n"
    );
    let mut stream = send_request(&address, &request).await?;
    let mut buffer: Vec<u8> = Vec::with_capacity(8192);
    let head_end = loop {
        if stream.read_buf(&mut buffer).await? == 0 {
            bail!("closed during the handshake");
        }
        if let Some(end) = memchr::memmem::find(&buffer, b"\r\n\r\n") {
            break end + 4;
        }
    };
    if !buffer.starts_with(b"HTTP/1.1 101") {
        bail!(
            "upgrade refused: {}",
            String::from_utf8_lossy(&buffer[..head_end.min(64)])
        );
    }
    buffer.drain(..head_end);
    Ok((stream, buffer))
}

/// The server frame at the start of `rest`, if it is all there: its opcode, header length
/// and payload length.
fn ws_frame_at(rest: &[u8]) -> Option<(u8, usize, usize)> {
    if rest.len() < 2 {
        return None;
    }
    let opcode = rest[0] & 0x0f;
    let (length, header) = match rest[1] & 0x7f {
        126 if rest.len() >= 4 => (u16::from_be_bytes([rest[2], rest[3]]) as usize, 4),
        127 if rest.len() >= 10 => {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&rest[2..10]);
            (u64::from_be_bytes(bytes) as usize, 10)
        }
        126 | 127 => return None,
        length => (length as usize, 2),
    };
    (rest.len() >= header + length).then_some((opcode, header, length))
}

/// A subscriber that resumes after every cut, as a real client does: each cut counted.
async fn resuming_subscriber(
    base: String,
    channel: String,
    counting: Counting,
    transport: Transport,
    mut progress: Progress,
) -> Result<()> {
    let mut first = true;
    loop {
        let ended = match transport {
            Transport::Ws | Transport::SocketIo => {
                lean_ws_subscriber(
                    &base,
                    &channel,
                    &counting,
                    &mut progress,
                    first,
                    transport == Transport::SocketIo,
                )
                .await
            }
            Transport::Sse => {
                sse_subscriber(&base, &channel, &counting, &mut progress, first).await
            }
        };
        first = false;
        if let Err(error) = ended
            && progress.seen == 0
            && progress.epoch.is_none()
        {
            return Err(error);
        }
        counting.tally.cutoffs.fetch_add(1, Ordering::Relaxed);
        if !progress.resumes {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(10..=200))).await;
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Ws,
    Sse,
    /// Socket.IO 4 over its WebSocket transport (Engine.IO 4 packets), for the peer row.
    SocketIo,
}

/// A WebSocket subscriber on a bare socket: the handshake written by hand, and server frames
/// (unmasked) read in place from one buffer, their payloads searched without a copy. A
/// general WebSocket client (tokio-tungstenite) allocates and checks UTF-8 per message, which
/// made the load generator, sharing two cores with the server, the bottleneck of its own
/// baseline (issue 17). Returns when the connection ends.
async fn lean_ws_subscriber(
    base: &str,
    channel: &str,
    counting: &Counting,
    progress: &mut Progress,
    first: bool,
    socket_io: bool,
) -> Result<()> {
    let path = if socket_io {
        "/socket.io/?EIO=4&transport=websocket"
    } else {
        "/ws"
    };
    let (mut stream, mut buffer) = ws_connect(base, path).await?;
    let subscribe = match &progress.epoch {
        Some(epoch) => format!(
            r#"{{"type":"subscribe","id":1,"channel":"{channel}","since":{{"epoch":"{epoch}","seq":{}}}}}"#,
            progress.last_seq
        ),
        None => format!(r#"{{"type":"subscribe","id":1,"channel":"{channel}"}}"#),
    };
    if socket_io {
        // Join the default namespace; the channel's room once it is joined (below).
        stream.write_all(&client_frame(1, b"40")).await?;
    } else {
        stream
            .write_all(&client_frame(1, subscribe.as_bytes()))
            .await?;
    }
    if first {
        counting.tally.ready.fetch_add(1, Ordering::Relaxed);
    }
    loop {
        // Every complete frame in the buffer.
        let mut start = 0;
        let mut replies: Vec<u8> = Vec::new();
        loop {
            let rest = &buffer[start..];
            let Some((opcode, header, length)) = ws_frame_at(rest) else {
                break;
            };
            let payload = &rest[header..header + length];
            match opcode {
                1 if is_event(payload) => count(counting, progress, payload),
                1 if payload.starts_with(br#"{"type":"ping""#) => {
                    replies.extend(client_frame(1, br#"{"type":"pong"}"#));
                }
                // Engine.IO's ping, answered with its pong.
                1 if socket_io && payload == b"2" => replies.extend(client_frame(1, b"3")),
                // Socket.IO drops a connection that emits before its namespace is joined.
                1 if socket_io && payload.starts_with(b"40") => replies.extend(client_frame(
                    1,
                    format!(r#"42["subscribe","{channel}"]"#).as_bytes(),
                )),
                1 if is_reset(payload) => {
                    counting.tally.resets.fetch_add(1, Ordering::Relaxed);
                }
                9 => replies.extend(client_frame(10, payload)),
                8 => {
                    progress.flush(&counting.tally);
                    return Ok(());
                }
                _ => {}
            }
            start += header + length;
        }
        progress.flush(&counting.tally);
        buffer.drain(..start);
        if !replies.is_empty() {
            stream.write_all(&replies).await?;
        }
        if buffer.capacity() - buffer.len() < 4096 {
            buffer.reserve(8192);
        }
        if stream.read_buf(&mut buffer).await? == 0 {
            return Ok(());
        }
    }
}

/// An SSE subscriber on a bare socket; comes back with `Last-Event-ID` as `EventSource`
/// does. Returns when the stream ends.
async fn sse_subscriber(
    base: &str,
    channel: &str,
    counting: &Counting,
    progress: &mut Progress,
    first: bool,
) -> Result<()> {
    let address = base.trim_start_matches("http://").to_owned();
    let resume = match &progress.epoch {
        Some(epoch) => format!("last-event-id: {channel}:{epoch}:{}\r\n", progress.last_seq),
        None => String::new(),
    };
    let request = format!(
        "GET /sse?channel={channel} HTTP/1.1\r\nhost: {address}\r\naccept: text/event-stream\r\n{resume}\r\n"
    );
    let mut stream = send_request(&address, &request).await?;
    if first {
        counting.tally.ready.fetch_add(1, Ordering::Relaxed);
    }
    // Read straight into one buffer and search it with memchr: 10,000 of these share two
    // cores with the server, and a byte-by-byte scan made the client the bottleneck.
    let blank_line = memchr::memmem::Finder::new(b"\n\n");
    let mut buffer = Vec::with_capacity(4096);
    loop {
        if buffer.capacity() - buffer.len() < 1024 {
            buffer.reserve(4096);
        }
        let read = stream.read_buf(&mut buffer).await?;
        if read == 0 {
            return Ok(());
        }
        // Complete SSE events end with a blank line.
        let mut start = 0;
        while let Some(end) = blank_line.find(&buffer[start..]) {
            let event = &buffer[start..start + end];
            if is_event(event) {
                count(counting, progress, event);
            } else if is_reset(event) || memchr::memmem::find(event, b"event: reset").is_some() {
                counting.tally.resets.fetch_add(1, Ordering::Relaxed);
            }
            start += end + 2;
        }
        progress.flush(&counting.tally);
        buffer.drain(..start);
    }
}

async fn open_subscribers(
    bases: &[String],
    transport: &str,
    subscribers: usize,
    channel_of: impl Fn(usize) -> String,
    tally: &Arc<Tally>,
    expected: u64,
    start_at: impl Fn(usize) -> Progress,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::with_capacity(subscribers);
    for index in 0..subscribers {
        let base = bases[index % bases.len()].clone();
        let channel = channel_of(index);
        let counting = Counting {
            tally: tally.clone(),
            expected,
            sampled: index < LATENCY_SAMPLE,
        };
        let transport = match transport {
            "ws" => Transport::Ws,
            "socketio" => Transport::SocketIo,
            _ => Transport::Sse,
        };
        let progress = start_at(index);
        tasks.push(tokio::spawn(async move {
            let result = resuming_subscriber(base, channel, counting, transport, progress).await;
            if let Err(error) = result {
                eprintln!("loadgen: subscriber {index} failed: {error}");
            }
        }));
        // Pace connection setup a little so the listen backlog never overflows.
        if index % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tasks
}

async fn subscribers_on(http: &reqwest::Client, base: &str, channel: &str) -> u64 {
    let Ok(response) = http
        .get(format!("{base}/api/channels/{channel}"))
        .bearer_auth(API_KEY)
        .send()
        .await
    else {
        return 0;
    };
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    body["subscribers"].as_u64().unwrap_or(0)
}

async fn wait_subscribed(
    http: &reqwest::Client,
    bases: &[String],
    channel: &str,
    wanted: u64,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut total = 0;
        for base in bases {
            total += subscribers_on(http, base, channel).await;
        }
        if total >= wanted {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("only {total} of {wanted} subscribed");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes answered 503 (held by the server for its longest hold, then refused), each
/// retried after its `Retry-After` as a well-behaved backend would.
static PUBLISH_REFUSALS: AtomicU64 = AtomicU64::new(0);

async fn publish(http: &reqwest::Client, base: &str, channel: &str) -> Result<()> {
    publish_request(
        http,
        base,
        &serde_json::json!({ "channel": channel, "data": payload() }),
    )
    .await
    .map(drop)
}

/// Publishes `request` (a `POST /api/publish` body); answers the server's reply.
async fn publish_request(
    http: &reqwest::Client,
    base: &str,
    request: &serde_json::Value,
) -> Result<serde_json::Value> {
    // A held or draining server asks for a retry; one that refuses for a minute is down (its
    // broker gone), and the run stops instead of waiting for ever.
    let give_up = Instant::now() + Duration::from_secs(60);
    loop {
        let response = http
            .post(format!("{base}/api/publish"))
            .bearer_auth(API_KEY)
            .json(request)
            .send()
            .await?;
        if response.status() == reqwest::StatusCode::SERVICE_UNAVAILABLE {
            PUBLISH_REFUSALS.fetch_add(1, Ordering::Relaxed);
            let wait = response
                .headers()
                .get("retry-after")
                .and_then(|value| value.to_str().ok()?.parse::<u64>().ok())
                .unwrap_or(1);
            if Instant::now() + Duration::from_secs(wait) > give_up {
                bail!("publishes refused (503) for a minute: is the server's broker down?");
            }
            tokio::time::sleep(Duration::from_secs(wait)).await;
            continue;
        }
        if !response.status().is_success() {
            bail!(
                "publish failed: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
        }
        return Ok(response.json().await?);
    }
}

/// User plus system CPU time of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields 14 and 15 of /proc/<pid>/stat (utime, stime) are 11 and 12 after the name.
    (ticks(11) + ticks(12)) / 100.0
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| {
                    line.split_whitespace()
                        .nth(1)
                        .and_then(|value| value.parse().ok())
                })
        })
        .unwrap_or(0)
}

/// The value of metric `name` (its full name, with labels) on `base`'s `/metrics`.
async fn server_metric(http: &reqwest::Client, base: &str, name: &str) -> Option<u64> {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines().find_map(|line| {
        line.strip_prefix(name)
            .filter(|rest| rest.starts_with(' '))
            .and_then(|rest| rest.trim().parse::<f64>().ok())
            .map(|value| value as u64)
    })
}

fn percentile(sorted: &[u64], fraction: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn pids(arguments: &[String]) -> Vec<u32> {
    argument(arguments, "--pid")
        .map(|list| list.split(',').filter_map(|pid| pid.parse().ok()).collect())
        .unwrap_or_default()
}

/// Fan-out to N subscribers of one channel: a burst measures deliveries per second at
/// saturation (and server CPU per million deliveries); then a steady rate at half that
/// measures publish-to-deliver latency.
async fn fanout(arguments: &[String], url: &str) -> Result<serde_json::Value> {
    let transport = argument(arguments, "--transport").unwrap_or_else(|| "ws".to_owned());
    let subscribers = number(arguments, "--subscribers", 1_000) as usize;
    let burst = number(arguments, "--burst", 100);
    let latency_seconds = number(arguments, "--latency-seconds", 3);
    let mut bases = vec![url.to_owned()];
    if let Some(extra) = argument(arguments, "--extra-url") {
        bases.push(extra);
    }
    let server_pids = pids(arguments);
    let channel = format!("fanout-{}", fastrand::u32(..));
    let http = reqwest::Client::new();
    // Where publishes go: the server's own API listener (`--api-listen`) when given.
    let publish_base = argument(arguments, "--publish-url").unwrap_or_else(|| bases[0].clone());
    // Publish round trips on the idle server, to compare those under load with.
    let mut idle_publishes = Vec::new();
    for _ in 0..100 {
        let sent = Instant::now();
        publish(&http, &publish_base, &format!("{channel}-idle")).await?;
        idle_publishes.push(sent.elapsed().as_micros() as u64);
    }
    idle_publishes.sort_unstable();
    let tally = Arc::new(Tally::default());
    let tasks = open_subscribers(
        &bases,
        &transport,
        subscribers,
        |_| channel.clone(),
        &tally,
        burst,
        |_| Progress::resuming(),
    )
    .await;
    wait_subscribed(&http, &bases, &channel, subscribers as u64).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held_before = publishes_held(&http, &bases).await;
    let refusals_before = PUBLISH_REFUSALS.load(Ordering::Relaxed);

    let cpu_before: f64 = server_pids.iter().map(|pid| cpu_seconds(*pid)).sum();
    let own_cpu_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    // Concurrent publishers, enough that the burst measures fan-out rather than publish
    // round trips: with 16, the bare-sockets baseline at 5,000 subscribers was paced by them
    // at ~2.1M deliveries/s, with 64 it reaches ~5M (issue 17).
    let concurrency = number(arguments, "--publishers", 64).max(1);
    let publishers: Vec<_> = (0..concurrency)
        .map(|index| {
            let (http, base, channel) = (http.clone(), publish_base.clone(), channel.clone());
            let share = burst / concurrency + u64::from(index < burst % concurrency);
            tokio::spawn(async move {
                for _ in 0..share {
                    publish(&http, &base, &channel).await?;
                }
                anyhow::Ok(())
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await??;
    }
    // Subscribers that never get every event are reported as lost events, not waited for.
    let deadline = Instant::now() + Duration::from_secs(number(arguments, "--finish-seconds", 30));
    while tally.finished.load(Ordering::Relaxed) < subscribers as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let all_finished = tally.finished.load(Ordering::Relaxed) >= subscribers as u64;
    let finished_at = if all_finished {
        tally
            .last_finish
            .lock()
            .unwrap()
            .unwrap_or_else(Instant::now)
    } else {
        Instant::now()
    };
    let elapsed = finished_at.duration_since(started).as_secs_f64();
    let cpu_after: f64 = server_pids.iter().map(|pid| cpu_seconds(*pid)).sum();
    let own_cpu = cpu_seconds(std::process::id()) - own_cpu_before;
    let expected = subscribers as u64 * burst;
    let delivered = tally.delivered.load(Ordering::Relaxed).min(expected);
    let deliveries = delivered as f64;
    let deliveries_per_sec = deliveries / elapsed;
    let burst_report = serde_json::json!({
        "expected": expected,
        "lost_events": expected - delivered,
        "unfinished_subscribers": subscribers as u64 - tally.finished.load(Ordering::Relaxed).min(subscribers as u64),
        "cutoffs": tally.cutoffs.load(Ordering::Relaxed),
        "duplicates": tally.duplicates.load(Ordering::Relaxed),
        "gap_events": tally.gap_events.load(Ordering::Relaxed),
        "resets": tally.resets.load(Ordering::Relaxed),
        "publish_refusals": PUBLISH_REFUSALS.load(Ordering::Relaxed) - refusals_before,
        "publishes_held": publishes_held(&http, &bases).await - held_before,
    });
    tally.latencies.lock().unwrap().clear();

    // Half of saturation, as a steady publish rate.
    let rate = (deliveries_per_sec / 2.0 / subscribers as f64).clamp(1.0, 5_000.0);
    let interval = Duration::from_secs_f64(1.0 / rate);
    let mut ticker = tokio::time::interval(interval);
    let latency_end = Instant::now() + Duration::from_secs(latency_seconds);
    let mut published = 0u64;
    let mut loaded_publishes = Vec::new();
    while Instant::now() < latency_end {
        ticker.tick().await;
        let sent = Instant::now();
        publish(&http, &publish_base, &channel).await?;
        loaded_publishes.push(sent.elapsed().as_micros() as u64);
        published += 1;
    }
    loaded_publishes.sort_unstable();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut latencies = std::mem::take(&mut *tally.latencies.lock().unwrap());
    latencies.sort_unstable();
    for task in tasks {
        task.abort();
    }
    let mut result = serde_json::json!({
        "scenario": "fanout",
        "transport": transport,
        "subscribers": subscribers,
        "burst": burst,
        "publishers": concurrency,
        "deliveries_per_sec": deliveries_per_sec,
        "cpu_seconds_per_million": (cpu_after - cpu_before) / deliveries * 1e6,
        // The load generator's own CPU over the burst: if it nears the burst's wall time on
        // these two cores, the generator, not the server, sets the pace.
        "loadgen_cpu_seconds_per_million": own_cpu / deliveries * 1e6,
        "loadgen_cpu_share": own_cpu / elapsed,
        "latency_rate_events_per_sec": rate,
        "latency_events": published,
        "latency_p50_us": percentile(&latencies, 0.5),
        "latency_p99_us": percentile(&latencies, 0.99),
        "latency_max_us": latencies.last().copied().unwrap_or(0),
        // HTTP publish round trips while the subscribers receive at half saturation,
        // against the same server idle (before any subscriber connected).
        "publish_p50_us": percentile(&loaded_publishes, 0.5),
        "publish_p99_us": percentile(&loaded_publishes, 0.99),
        "idle_publish_p50_us": percentile(&idle_publishes, 0.5),
        "idle_publish_p99_us": percentile(&idle_publishes, 0.99),
    });
    if let (Some(result), serde_json::Value::Object(burst)) = (result.as_object_mut(), burst_report)
    {
        result.extend(burst);
    }
    Ok(result)
}

/// Publishes the servers held back (`resync_publishes_held_total`; 0 where there is no such
/// metric, as on the baseline).
async fn publishes_held(http: &reqwest::Client, bases: &[String]) -> u64 {
    let mut total = 0;
    for base in bases {
        let Ok(response) = http
            .get(format!("{base}/metrics"))
            .bearer_auth(API_KEY)
            .send()
            .await
        else {
            continue;
        };
        let Ok(text) = response.text().await else {
            continue;
        };
        total += text
            .lines()
            .find_map(|line| line.strip_prefix("resync_publishes_held_total "))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0) as u64;
    }
    total
}

/// The channel's epoch, from the HTTP API.
async fn epoch_of_channel(http: &reqwest::Client, url: &str, channel: &str) -> Result<String> {
    let info: serde_json::Value = http
        .get(format!("{url}/api/channels/{channel}"))
        .bearer_auth(API_KEY)
        .send()
        .await?
        .json()
        .await?;
    Ok(info["position"]["epoch"]
        .as_str()
        .context("epoch")?
        .to_owned())
}

/// Subscribers that all come back at once with a position `--behind` events back: the
/// resume path (admission, history read, encoding, replay) at scale, per transport.
async fn resume(arguments: &[String], url: &str) -> Result<serde_json::Value> {
    let transport = argument(arguments, "--transport").unwrap_or_else(|| "ws".to_owned());
    let subscribers = number(arguments, "--subscribers", 5_000) as usize;
    let behind = number(arguments, "--behind", 100);
    let server_pids = pids(arguments);
    let channel = format!("resume-{}", fastrand::u32(..));
    let http = reqwest::Client::new();
    let bases = vec![url.to_owned()];
    for _ in 0..behind {
        publish(&http, url, &channel).await?;
    }
    let epoch = epoch_of_channel(&http, url, &channel).await?;
    let tally = Arc::new(Tally::default());
    let cpu_before: f64 = server_pids.iter().map(|pid| cpu_seconds(*pid)).sum();
    let own_cpu_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    let tasks = open_subscribers(
        &bases,
        &transport,
        subscribers,
        |_| channel.clone(),
        &tally,
        behind,
        |_| Progress {
            epoch: Some(epoch.clone()),
            ..Progress::resuming()
        },
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while tally.finished.load(Ordering::Relaxed) < subscribers as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let finished_at = tally
        .last_finish
        .lock()
        .unwrap()
        .unwrap_or_else(Instant::now);
    let elapsed = finished_at.duration_since(started).as_secs_f64();
    let cpu = server_pids.iter().map(|pid| cpu_seconds(*pid)).sum::<f64>() - cpu_before;
    let own_cpu = cpu_seconds(std::process::id()) - own_cpu_before;
    let expected = subscribers as u64 * behind;
    let delivered = tally.delivered.load(Ordering::Relaxed).min(expected);
    for task in tasks {
        task.abort();
    }
    Ok(serde_json::json!({
        "scenario": "resume",
        "transport": transport,
        "subscribers": subscribers,
        "behind": behind,
        "seconds_until_all_caught_up": elapsed,
        "replayed_per_sec": delivered as f64 / elapsed,
        "cpu_seconds_per_million": cpu / delivered.max(1) as f64 * 1e6,
        "loadgen_cpu_share": own_cpu / elapsed,
        "lost_events": expected - delivered,
        "cutoffs": tally.cutoffs.load(Ordering::Relaxed),
        "duplicates": tally.duplicates.load(Ordering::Relaxed),
        "resets": tally.resets.load(Ordering::Relaxed),
    }))
}

/// Server memory per idle connection.
async fn memory(arguments: &[String], url: &str) -> Result<serde_json::Value> {
    let transport = argument(arguments, "--transport").unwrap_or_else(|| "ws".to_owned());
    let connections = number(arguments, "--connections", 10_000) as usize;
    let pid = *pids(arguments).first().context("--pid")?;
    let channel = format!("idle-{}", fastrand::u32(..));
    let http = reqwest::Client::new();
    // Warm up allocator and runtime with a few connections, then measure the rest.
    let tally = Arc::new(Tally::default());
    let bases = vec![url.to_owned()];
    let warm = open_subscribers(
        &bases,
        &transport,
        100,
        |_| channel.clone(),
        &tally,
        u64::MAX,
        |_| Progress::default(),
    )
    .await;
    wait_subscribed(&http, &bases, &channel, 100).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = rss_kib(pid);
    let tasks = open_subscribers(
        &bases,
        &transport,
        connections,
        |_| channel.clone(),
        &tally,
        u64::MAX,
        |_| Progress::default(),
    )
    .await;
    wait_subscribed(&http, &bases, &channel, connections as u64 + 100).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    for task in tasks.into_iter().chain(warm) {
        task.abort();
    }
    Ok(serde_json::json!({
        "scenario": "memory",
        "transport": transport,
        "connections": connections,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "bytes_per_connection": (after.saturating_sub(before) * 1024) as f64 / connections as f64,
    }))
}

/// Subscribers that resume with `since` after losing their connections all at once.
async fn storm(arguments: &[String], url: &str) -> Result<serde_json::Value> {
    let subscribers = number(arguments, "--subscribers", 5_000) as usize;
    let window_ms = number(arguments, "--window-ms", 1_000);
    let rate = number(arguments, "--rate", 20);
    let channel = format!("storm-{}", fastrand::u32(..));
    let http = reqwest::Client::new();
    let epoch = epoch_of_channel(&http, url, &channel).await?;
    let (cut_sender, cut) = watch::channel(None::<(Instant, u64)>);
    let lost = Arc::new(AtomicU64::new(0));
    let duplicated = Arc::new(AtomicU64::new(0));
    let resets = Arc::new(AtomicU64::new(0));
    let ready = Arc::new(AtomicU64::new(0));
    let caught_up = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for index in 0..subscribers {
        let (url, channel, epoch) = (url.to_owned(), channel.clone(), epoch.clone());
        let (mut cut, lost, duplicated, resets, ready, caught_up) = (
            cut.clone(),
            lost.clone(),
            duplicated.clone(),
            resets.clone(),
            ready.clone(),
            caught_up.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut last = 0u64;
            let mut connected_before = false;
            let mut waiting_since_cut: Option<(Instant, u64)> = None;
            loop {
                let ws_url = format!("{}/ws", url.replacen("http", "ws", 1));
                let Ok((mut socket, _)) = tokio_tungstenite::connect_async(ws_url).await else {
                    tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=window_ms))).await;
                    continue;
                };
                let subscribe = format!(
                    r#"{{"type":"subscribe","id":1,"channel":"{channel}","since":{{"epoch":"{epoch}","seq":{last}}}}}"#
                );
                if socket.send(Message::text(subscribe)).await.is_err() {
                    continue;
                }
                if !connected_before {
                    connected_before = true;
                    ready.fetch_add(1, Ordering::Relaxed);
                }
                loop {
                    tokio::select! {
                        message = socket.next() => {
                            let Some(Ok(Message::Text(text))) = message else { break };
                            let frame: serde_json::Value = serde_json::from_str(text.as_str()).unwrap_or_default();
                            match frame["type"].as_str() {
                                Some("event") => {
                                    let seq = frame["seq"].as_u64().unwrap_or(0);
                                    if seq <= last {
                                        duplicated.fetch_add(1, Ordering::Relaxed);
                                    } else {
                                        lost.fetch_add(seq - last - 1, Ordering::Relaxed);
                                        last = seq;
                                    }
                                    if let Some((cut_at, seq_at_cut)) = waiting_since_cut
                                        && seq > seq_at_cut
                                    {
                                        caught_up.lock().unwrap().push(cut_at.elapsed().as_millis() as u64);
                                        waiting_since_cut = None;
                                    }
                                }
                                Some("reset") => { resets.fetch_add(1, Ordering::Relaxed); }
                                Some("subscribed") if frame["recovery"]["outcome"] == "reset" => {
                                    resets.fetch_add(1, Ordering::Relaxed);
                                }
                                Some("ping") => { let _ = socket.send(Message::text(r#"{"type":"pong"}"#)).await; }
                                _ => {}
                            }
                        }
                        changed = cut.changed() => {
                            if changed.is_err() { return; }
                            let cut_now = *cut.borrow_and_update();
                            if let Some(cut_info) = cut_now {
                                waiting_since_cut = Some(cut_info);
                                // Drop the connection at once, then come back after a jittered delay.
                                drop(socket);
                                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..=window_ms))).await;
                                break;
                            }
                        }
                    }
                }
                let _ = index;
            }
        }));
        if index % 500 == 499 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    while ready.load(Ordering::Relaxed) < subscribers as u64 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_subscribed(&http, &[url.to_owned()], &channel, subscribers as u64).await?;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut published = 0u64;
    let mut ticker = tokio::time::interval(interval);
    let run_started = Instant::now();
    let mut cut_done = false;
    while run_started.elapsed() < Duration::from_secs(6) {
        ticker.tick().await;
        publish(&http, url, &channel).await?;
        published += 1;
        if !cut_done && run_started.elapsed() >= Duration::from_secs(2) {
            cut_done = true;
            cut_sender.send_replace(Some((Instant::now(), published)));
        }
    }
    // Let everyone finish catching up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut times = std::mem::take(&mut *caught_up.lock().unwrap());
    times.sort_unstable();
    for task in tasks {
        task.abort();
    }
    Ok(serde_json::json!({
        "scenario": "storm",
        "subscribers": subscribers,
        "window_ms": window_ms,
        "caught_up": times.len(),
        "p50_catch_up_ms": percentile(&times, 0.5),
        "p99_catch_up_ms": percentile(&times, 0.99),
        "lost": lost.load(Ordering::Relaxed),
        "duplicated": duplicated.load(Ordering::Relaxed),
        "resets": resets.load(Ordering::Relaxed),
        "published": published,
    }))
}

/// Long-polling clients: completed poll cycles per second while events flow.
async fn poll(arguments: &[String], url: &str) -> Result<serde_json::Value> {
    let clients = number(arguments, "--clients", 1_000) as usize;
    let seconds = number(arguments, "--seconds", 5);
    let rate = number(arguments, "--rate", 20);
    let channel = format!("poll-{}", fastrand::u32(..));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .build()?;
    let cycles = Arc::new(AtomicU64::new(0));
    let events = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let (http, url, channel, cycles, events, stop) = (
            http.clone(),
            url.to_owned(),
            channel.clone(),
            cycles.clone(),
            events.clone(),
            stop.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut cursor = String::new();
            while !stop.load(Ordering::Relaxed) {
                let mut query = vec![("channel", channel.clone()), ("timeout", "10".to_owned())];
                if !cursor.is_empty() {
                    query.push(("cursor", cursor.clone()));
                }
                let Ok(response) = http.get(format!("{url}/poll")).query(&query).send().await
                else {
                    continue;
                };
                let Ok(body) = response.json::<serde_json::Value>().await else {
                    continue;
                };
                cycles.fetch_add(1, Ordering::Relaxed);
                events.fetch_add(
                    body["events"].as_array().map_or(0, Vec::len) as u64,
                    Ordering::Relaxed,
                );
                cursor = body["cursor"].as_str().unwrap_or_default().to_owned();
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cycles_before = cycles.load(Ordering::Relaxed);
    let started = Instant::now();
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    while started.elapsed() < Duration::from_secs(seconds) {
        ticker.tick().await;
        publish(&http, url, &channel).await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let completed = cycles.load(Ordering::Relaxed) - cycles_before;
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        task.abort();
    }
    Ok(serde_json::json!({
        "scenario": "poll",
        "clients": clients,
        "publish_rate": rate,
        "cycles_per_sec": completed as f64 / elapsed,
        "events_received": events.load(Ordering::Relaxed),
    }))
}

/// Many channels with one subscriber each; publishes spread over them.
async fn channels(arguments: &[String], url: &str) -> Result<serde_json::Value> {
    let count_of_channels = number(arguments, "--channels", 10_000) as usize;
    let publishes = number(arguments, "--publishes", 5_000);
    let prefix = format!("many-{}", fastrand::u32(..));
    let http = reqwest::Client::new();
    let tally = Arc::new(Tally::default());
    let bases = vec![url.to_owned()];
    let tasks = open_subscribers(
        &bases,
        "ws",
        count_of_channels,
        |index| format!("{prefix}-{index}"),
        &tally,
        u64::MAX,
        |_| Progress::default(),
    )
    .await;
    // Wait for the last channel's subscriber (they subscribe in order).
    let deadline = Instant::now() + Duration::from_secs(60);
    while tally.ready.load(Ordering::Relaxed) < count_of_channels as u64 {
        if Instant::now() > deadline {
            bail!("subscribers did not connect");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    wait_subscribed(
        &http,
        &bases,
        &format!("{prefix}-{}", count_of_channels - 1),
        1,
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Concurrent publishers, as many backends would.
    let started = Instant::now();
    let publishers: Vec<_> = (0..8)
        .map(|_| {
            let (http, url, prefix) = (http.clone(), url.to_owned(), prefix.clone());
            tokio::spawn(async move {
                for _ in 0..publishes / 8 {
                    let channel = format!("{prefix}-{}", fastrand::usize(..count_of_channels));
                    let _ = publish(&http, &url, &channel).await;
                }
            })
        })
        .collect();
    for publisher in publishers {
        publisher.await?;
    }
    let expected = publishes / 8 * 8;
    let deadline = Instant::now() + Duration::from_secs(30);
    while tally.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = std::mem::take(&mut *tally.latencies.lock().unwrap());
    latencies.sort_unstable();
    for task in tasks {
        task.abort();
    }
    Ok(serde_json::json!({
        "scenario": "channels",
        "channels": count_of_channels,
        "delivered": tally.delivered.load(Ordering::Relaxed),
        "expected": expected,
        "deliveries_per_sec": tally.delivered.load(Ordering::Relaxed) as f64 / elapsed,
        "latency_p50_us": percentile(&latencies, 0.5),
        "latency_p99_us": percentile(&latencies, 0.99),
    }))
}

/// Publish throughput: `--publishers` concurrent backends (each its own kept-alive
/// connection) publish `--publishes` events over `--channels` channels, as fast as the server
/// acknowledges them.
async fn publishes(arguments: &[String], url: &str) -> Result<serde_json::Value> {
    let publishers = number(arguments, "--publishers", 64).max(1);
    let total = number(arguments, "--publishes", 20_000);
    let channels = number(arguments, "--channels", 100).max(1);
    let server_pids = pids(arguments);
    let prefix = format!("publishes-{}", fastrand::u32(..));
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(publishers as usize)
        .build()?;
    let cpu_before: f64 = server_pids.iter().map(|pid| cpu_seconds(*pid)).sum();
    let own_cpu_before = cpu_seconds(std::process::id());
    let started = Instant::now();
    let tasks: Vec<_> = (0..publishers)
        .map(|publisher| {
            let (http, url, prefix) = (http.clone(), url.to_owned(), prefix.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                for n in 0..total / publishers {
                    let channel = format!("{prefix}-{}", (publisher + n * publishers) % channels);
                    let sent = Instant::now();
                    publish(&http, &url, &channel).await?;
                    latencies.push(sent.elapsed().as_micros() as u64);
                }
                Ok::<_, anyhow::Error>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = server_pids.iter().map(|pid| cpu_seconds(*pid)).sum::<f64>() - cpu_before;
    let own_cpu = cpu_seconds(std::process::id()) - own_cpu_before;
    latencies.sort_unstable();
    let done = latencies.len() as f64;
    Ok(serde_json::json!({
        "scenario": "publishes",
        "publishers": publishers,
        "publishes": latencies.len(),
        "publishes_per_sec": done / elapsed,
        "latency_p50_us": percentile(&latencies, 0.5),
        "latency_p99_us": percentile(&latencies, 0.99),
        "cpu_seconds_per_thousand": cpu / done.max(1.0) * 1e3,
        "loadgen_cpu_share": own_cpu / elapsed,
    }))
}
