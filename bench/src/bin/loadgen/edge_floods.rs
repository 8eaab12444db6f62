//! The floods of issue 25, beside those of `flood.rs`: each one what an anonymous address
//! with a few hundred sockets did to the surface added since the first hardening, bounded in
//! sockets and stopped with the run.
//!
//! - **keep-alive drip**: one full request, then the next request's head a byte every 2 s;
//! - **TLS handshake stall**: TCP connections to the TLS listener that never say hello;
//! - **pipelining non-readers**: 64 KiB of pipelined requests for the browser client on
//!   sockets that never read;
//! - **long-poll presence**: first polls with `join_leave=1` on 8 channels of 100 members;
//! - **non-reading polls**: four addresses, 250 polls each of a channel of 60 KB events, from
//!   its start, never read;
//! - **refresh-signature flood**: WebSockets sending `refresh` frames with bad RS256 tokens;
//! - **proxy-slot hogging**: 128 subscribes at a time to a proxied namespace whose backend
//!   takes 0.9 s, re-issued as each ends.
//!
//! Legitimate checks beside them: `https://…/healthz` on the TLS listener, and a subscribe to
//! the proxied namespace from the legitimate address twice a second.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::API_KEY;

/// What the floods of issue 25 did and got.
#[derive(Default)]
pub(crate) struct EdgeCounts {
    pub(crate) drips_closed: AtomicU64,
    pub(crate) tls_stalls_closed: AtomicU64,
    pub(crate) tls_health_ok: AtomicU64,
    pub(crate) tls_health_failed: AtomicU64,
    pub(crate) pipelines_opened: AtomicU64,
    pub(crate) presence_polls: AtomicU64,
    pub(crate) presence_reply_max_bytes: AtomicU64,
    pub(crate) heavy_polls: AtomicU64,
    pub(crate) refreshes_sent: AtomicU64,
    pub(crate) refreshes_rationed: AtomicU64,
    pub(crate) proxy_hogs: AtomicU64,
    pub(crate) proxy_legit_allowed: AtomicU64,
    pub(crate) proxy_legit_refused: AtomicU64,
    pub(crate) proxy_legit_server_full: AtomicU64,
}

async fn connect(source: IpAddr, server: SocketAddr, small_window: bool) -> Option<TcpStream> {
    let socket = TcpSocket::new_v4().ok()?;
    if small_window {
        socket.set_recv_buffer_size(4096).ok()?;
    }
    socket.bind(SocketAddr::new(source, 0)).ok()?;
    tokio::time::timeout(Duration::from_secs(5), socket.connect(server))
        .await
        .ok()?
        .ok()
}

/// How long a non-reading flood holds a socket before it opens a fresh one in its place:
/// such a client cannot see the server close its socket without reading what was sent first,
/// and reading would make it a reading client (which is what the flood must not be).
const NON_READER_LIFE: Duration = Duration::from_secs(5);

/// Sockets of a non-reading flood, each with when it was opened.
type NonReaders = Vec<(Instant, TcpStream)>;

/// Drops the sockets held for [`NON_READER_LIFE`] (their replacements are opened by the
/// caller).
fn retire_old(held: &mut NonReaders) {
    held.retain(|(opened, _)| opened.elapsed() < NON_READER_LIFE);
}

/// Whether the server closed `stream` (end of stream or an error), without waiting. Reads
/// what is waiting: only for floods whose server sends little (a refusal, a close).
fn closed(stream: &TcpStream) -> bool {
    let mut byte = [0u8; 256];
    loop {
        match stream.try_read(&mut byte) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(error) => return error.kind() != std::io::ErrorKind::WouldBlock,
        }
    }
}

/// Keeps `count` keep-alive connections dripping their second request's head.
pub(crate) async fn drip(
    source: IpAddr,
    server: SocketAddr,
    count: usize,
    counts: Arc<EdgeCounts>,
    stop: watch::Receiver<bool>,
) {
    let mut dripping: Vec<TcpStream> = Vec::new();
    while !*stop.borrow() {
        while dripping.len() < count {
            let Some(mut stream) = connect(source, server, false).await else {
                break;
            };
            let request =
                b"GET /healthz HTTP/1.1\r\nHost: flood\r\n\r\nGET /healthz HTTP/1.1\r\nX-Drip: ";
            if stream.write_all(request).await.is_err() {
                continue;
            }
            dripping.push(stream);
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = dripping.len();
        dripping.retain(|stream| !closed(stream) && stream.try_write(b"a").is_ok());
        counts
            .drips_closed
            .fetch_add((before - dripping.len()) as u64, Ordering::Relaxed);
    }
}

/// Keeps `count` TCP connections to the TLS listener that never start their handshake.
pub(crate) async fn tls_stall(
    source: IpAddr,
    server: SocketAddr,
    count: usize,
    counts: Arc<EdgeCounts>,
    stop: watch::Receiver<bool>,
) {
    let mut stalled: Vec<TcpStream> = Vec::new();
    while !*stop.borrow() {
        let before = stalled.len();
        stalled.retain(|stream| !closed(stream));
        counts
            .tls_stalls_closed
            .fetch_add((before - stalled.len()) as u64, Ordering::Relaxed);
        while stalled.len() < count {
            match connect(source, server, false).await {
                Some(stream) => stalled.push(stream),
                None => break,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `https://…/healthz` on the TLS listener twice a second, as a legitimate client.
pub(crate) async fn tls_health(
    url: String,
    ca_pem: Vec<u8>,
    counts: Arc<EdgeCounts>,
    stop: watch::Receiver<bool>,
) {
    let Ok(certificate) = reqwest::Certificate::from_pem(&ca_pem) else {
        return;
    };
    let Ok(https) = reqwest::Client::builder()
        .add_root_certificate(certificate)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(3))
        .build()
    else {
        return;
    };
    while !*stop.borrow() {
        let answered = https
            .get(format!("{url}/healthz"))
            .send()
            .await
            .is_ok_and(|response| response.status().is_success());
        let counter = if answered {
            &counts.tls_health_ok
        } else {
            &counts.tls_health_failed
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `count` sockets, each with 64 KiB of pipelined requests for the browser client, never
/// reading; reopened when the server drops one.
pub(crate) async fn pipeliner(
    source: IpAddr,
    server: SocketAddr,
    count: usize,
    counts: Arc<EdgeCounts>,
    stop: watch::Receiver<bool>,
) {
    let request = b"GET /client/resync.js HTTP/1.1\r\nHost: flood\r\n\r\n";
    let burst = request.repeat(65_536 / request.len());
    let mut held = NonReaders::new();
    while !*stop.borrow() {
        retire_old(&mut held);
        while held.len() < count {
            let Some(stream) = connect(source, server, true).await else {
                break;
            };
            // As much as the kernel takes without the server reading; the rest is dropped.
            let mut written = 0;
            while written < burst.len() {
                match stream.try_write(&burst[written..]) {
                    Ok(0) | Err(_) => break,
                    Ok(more) => written += more,
                }
            }
            counts.pipelines_opened.fetch_add(1, Ordering::Relaxed);
            held.push((Instant::now(), stream));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A masked client text frame (mask 0).
fn text_frame(payload: &[u8]) -> Vec<u8> {
    crate::client_frame(1, payload)
}

/// A WebSocket upgrade from `source`; the stream after the 101.
async fn upgrade(source: IpAddr, server: SocketAddr) -> Option<TcpStream> {
    let mut stream = connect(source, server, false).await?;
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            return None;
        }
        tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut byte))
            .await
            .ok()?
            .ok()?;
        head.push(byte[0]);
    }
    head.starts_with(b"HTTP/1.1 101").then_some(stream)
}

/// Reads and drops whatever `reader` sends until it ends; counts the refreshes it refuses
/// for their rate (`needle` in what it sends).
async fn drain(
    mut reader: tokio::net::tcp::OwnedReadHalf,
    needle: &'static [u8],
    counts: Arc<EdgeCounts>,
) {
    let mut buffer = vec![0u8; 16 * 1024];
    while let Ok(read) = reader.read(&mut buffer).await {
        if read == 0 {
            return;
        }
        let matches = memchr::memmem::find_iter(&buffer[..read], needle).count();
        counts
            .refreshes_rationed
            .fetch_add(matches as u64, Ordering::Relaxed);
    }
}

/// `members` WebSockets that appear among the members of `channels` with 1 KiB of info,
/// reading what they are sent, until the run ends.
pub(crate) async fn presence_crowd(
    sources: Vec<IpAddr>,
    server: SocketAddr,
    channels: Vec<String>,
    members: usize,
    stop: watch::Receiver<bool>,
) {
    let info = format!(r#"{{"bio":"{}"}}"#, "x".repeat(1000));
    let mut held = Vec::new();
    for member in 0..members {
        let Some(stream) = upgrade(sources[member % sources.len()], server).await else {
            continue;
        };
        let (mut reader, mut writer) = stream.into_split();
        held.push(tokio::spawn(async move {
            let mut buffer = vec![0u8; 16 * 1024];
            while reader.read(&mut buffer).await.is_ok_and(|read| read > 0) {}
        }));
        for (id, channel) in channels.iter().enumerate() {
            let frame = format!(
                r#"{{"type":"subscribe","id":{},"channel":"{channel}","presence":{{"info":{info}}}}}"#,
                id + 1
            );
            if writer
                .write_all(&text_frame(frame.as_bytes()))
                .await
                .is_err()
            {
                break;
            }
        }
        held.push(tokio::spawn(async move {
            let _writer = writer;
            std::future::pending::<()>().await;
        }));
    }
    let mut stop = stop;
    let _ = stop.wait_for(|stopped| *stopped).await;
    for task in held {
        task.abort();
    }
}

/// First polls (a new presence session each) with `join_leave=1` on `channels`, read whole,
/// one after another: the largest reply is counted.
pub(crate) async fn presence_poller(
    source: IpAddr,
    server: SocketAddr,
    channels: Vec<String>,
    counts: Arc<EdgeCounts>,
    stop: watch::Receiver<bool>,
) {
    let request = format!(
        "GET /poll?channels={}&join_leave=1 HTTP/1.1\r\nHost: flood\r\nConnection: close\r\n\r\n",
        channels.join(",")
    );
    while !*stop.borrow() {
        let Some(mut stream) = connect(source, server, false).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if stream.write_all(request.as_bytes()).await.is_err() {
            continue;
        }
        let mut reply = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply)).await;
        counts.presence_polls.fetch_add(1, Ordering::Relaxed);
        counts
            .presence_reply_max_bytes
            .fetch_max(reply.len() as u64, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Publishes 16 events of 60 KB on `channel` through the API; the channel's epoch.
pub(crate) async fn heavy_channel(
    http: &reqwest::Client,
    url: &str,
    channel: &str,
) -> Option<String> {
    let data = "y".repeat(60_000);
    let mut epoch = None;
    for _ in 0..16 {
        let reply: serde_json::Value = http
            .post(format!("{url}/api/publish"))
            .bearer_auth(API_KEY)
            .json(&serde_json::json!({"channel": channel, "data": data}))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        epoch = reply["position"]["epoch"].as_str().map(str::to_owned);
    }
    epoch
}

/// `count` polls of `channel` from its start (about 1 MiB of reply each) that never read,
/// reopened as the server drops them.
pub(crate) async fn heavy_poller(
    source: IpAddr,
    server: SocketAddr,
    channel: String,
    epoch: String,
    count: usize,
    counts: Arc<EdgeCounts>,
    stop: watch::Receiver<bool>,
) {
    let request = format!(
        "GET /poll?channel={channel}&cursor={channel}:{epoch}:0 HTTP/1.1\r\nHost: flood\r\n\r\n"
    );
    let mut held = NonReaders::new();
    while !*stop.borrow() {
        retire_old(&mut held);
        while held.len() < count {
            let Some(mut stream) = connect(source, server, true).await else {
                break;
            };
            if stream.write_all(request.as_bytes()).await.is_ok() {
                counts.heavy_polls.fetch_add(1, Ordering::Relaxed);
                held.push((Instant::now(), stream));
            }
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// `sockets` WebSockets sending `refresh` frames with a bad RS256 token as fast as they may
/// send messages (50 a second each, under the message rate).
pub(crate) async fn refresher(
    source: IpAddr,
    server: SocketAddr,
    sockets: usize,
    counts: Arc<EdgeCounts>,
    stop: watch::Receiver<bool>,
) {
    // A well-formed RS256 token whose signature is 512 bytes of nothing: the server must run
    // the RSA check to refuse it, unless refreshes are rationed first.
    use base64::Engine;
    let encode = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let token = format!(
        "{}.{}.{}",
        encode(br#"{"alg":"RS256","typ":"JWT"}"#),
        encode(br#"{"sub":"mallory","exp":4102444800}"#),
        encode(&[7u8; 512])
    );
    let mut tasks = Vec::new();
    for _ in 0..sockets {
        let stop = stop.clone();
        let counts = counts.clone();
        let token = token.clone();
        tasks.push(tokio::spawn(async move {
            while !*stop.borrow() {
                let Some(stream) = upgrade(source, server).await else {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                };
                let (reader, mut writer) = stream.into_split();
                let reading = tokio::spawn(drain(reader, b"\"rate_limited\"", counts.clone()));
                let mut id = 0u64;
                while !*stop.borrow() {
                    id += 1;
                    let frame = format!(r#"{{"type":"refresh","id":{id},"token":"{token}"}}"#);
                    if writer
                        .write_all(&text_frame(frame.as_bytes()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                    counts.refreshes_sent.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                reading.abort();
            }
        }));
    }
    let mut stop = stop;
    let _ = stop.wait_for(|stopped| *stopped).await;
    for task in tasks {
        task.abort();
    }
}

/// The application's backend for the proxied namespace: every answer takes 0.9 s.
pub(crate) async fn slow_backend(port: u16, stop: watch::Receiver<bool>) {
    let Ok(listener) = tokio::net::TcpListener::bind(("127.0.0.1", port)).await else {
        eprintln!("loadgen: the proxy backend's port {port} is taken");
        return;
    };
    let mut stop = stop;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        let Ok((mut socket, _)) = accepted else {
            continue;
        };
        tokio::spawn(async move {
            let mut request = vec![0u8; 8192];
            let _ = socket.read(&mut request).await;
            tokio::time::sleep(Duration::from_millis(900)).await;
            let _ = socket
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")
                .await;
        });
    }
}

/// Whether an SSE request to `path` from `source` is answered with `subscribed` (`Some(true)`),
/// refused or told to retry (`Some(false)`), or not answered in 5 s (`None`).
/// What a subscribe over SSE got.
enum SseAnswer {
    Subscribed,
    /// Refused because the server holds its global cap of connections (a flood from many
    /// addresses filled it: the cap working, not the proxy's fairness failing).
    ServerFull,
    Refused,
}

async fn sse_subscribed(
    source: Option<IpAddr>,
    server: SocketAddr,
    path: &str,
) -> Option<SseAnswer> {
    let mut stream = match source {
        Some(source) => connect(source, server, false).await?,
        None => TcpStream::connect(server).await.ok()?,
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: flood\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut answer = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut refused = false;
    loop {
        if memchr::memmem::find(&answer, b"event: subscribed").is_some() {
            return Some(SseAnswer::Subscribed);
        }
        refused = refused
            || memchr::memmem::find(&answer, b"retry:").is_some()
            || memchr::memmem::find(&answer, b"HTTP/1.1 4").is_some();
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline.into(), stream.read(&mut chunk)).await {
            Ok(Ok(read)) if read > 0 => answer.extend_from_slice(&chunk[..read]),
            // A refusal is read to its end (its reason follows the `retry:` line).
            _ if refused => {
                let full = memchr::memmem::find(&answer, b"connection limit").is_some();
                return Some(if full {
                    SseAnswer::ServerFull
                } else {
                    SseAnswer::Refused
                });
            }
            _ => return None,
        }
    }
}

/// 128 subscribes at a time from `source` to the proxied namespace, each re-issued as it ends
/// (at most ten times a second per slot: faster, it is a connection-rate flood from one
/// address, whose cost is the kernel's accept and close, `docs/security.md`).
pub(crate) async fn proxy_hog(
    source: IpAddr,
    server: SocketAddr,
    counts: Arc<EdgeCounts>,
    stop: watch::Receiver<bool>,
) {
    let mut tasks = Vec::new();
    for index in 0..128 {
        let stop = stop.clone();
        let counts = counts.clone();
        tasks.push(tokio::spawn(async move {
            let mut pace = tokio::time::interval(Duration::from_millis(100));
            while !*stop.borrow() {
                pace.tick().await;
                counts.proxy_hogs.fetch_add(1, Ordering::Relaxed);
                let _ = sse_subscribed(
                    Some(source),
                    server,
                    &format!("/sse?channel=slow:hog{index}"),
                )
                .await;
            }
        }));
    }
    let mut stop = stop;
    let _ = stop.wait_for(|stopped| *stopped).await;
    for task in tasks {
        task.abort();
    }
}

/// A legitimate subscribe to the proxied namespace twice a second, from the legitimate
/// address.
pub(crate) async fn proxy_legit(
    server: SocketAddr,
    counts: Arc<EdgeCounts>,
    stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let counter = match sse_subscribed(None, server, "/sse?channel=slow:legit").await {
            Some(SseAnswer::Subscribed) => &counts.proxy_legit_allowed,
            Some(SseAnswer::ServerFull) => &counts.proxy_legit_server_full,
            _ => &counts.proxy_legit_refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
