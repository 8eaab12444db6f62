//! The raw limit: a minimal tokio server that writes the same pre-encoded SSE bytes or
//! WebSocket frames to every connected socket, of the same shape and length as resync's (an
//! SSE event carries its `id:` line). No protocol features: no positions, no history,
//! no auth, no heartbeats. It speaks just enough HTTP for the load generator:
//! `GET /sse`, `GET /ws` (upgrade), `POST /api/publish` (body `{"channel":…,"data":…}`) and
//! `GET /api/channels/<name>` (subscriber count), and `GET /snapshot` (an application's
//! answer to a client that must refetch, for the keyed-channel rows).

#![allow(
    clippy::unwrap_used,
    reason = "a benchmark tool: any failure should stop it loudly"
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::broadcast;

/// As long as resync's epochs (13 characters), so that both send as many bytes per event.
const EPOCH: &str = "baseline00000";

struct State {
    sse: broadcast::Sender<Bytes>,
    ws: broadcast::Sender<Bytes>,
    subscribers: AtomicU64,
    /// Each channel's last seq; numbering and sending happen under this lock.
    order: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Snapshots by (keys, value bytes), built once.
    snapshots: std::sync::Mutex<std::collections::HashMap<(u64, usize), Arc<str>>>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on http://{}", listener.local_addr()?);
    let state = Arc::new(State {
        sse: broadcast::channel(4096).0,
        ws: broadcast::channel(4096).0,
        subscribers: AtomicU64::new(0),
        order: std::sync::Mutex::default(),
        snapshots: std::sync::Mutex::default(),
    });
    loop {
        let (stream, _) = listener.accept().await?;
        let state = state.clone();
        tokio::spawn(async move {
            let _ = serve(stream, state).await;
        });
    }
}

async fn read_head(stream: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buffer = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buffer.extend_from_slice(&chunk[..read]);
        if let Some(end) = buffer.windows(4).position(|window| window == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
            return Ok((head, buffer[end + 4..].to_vec()));
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
    })
}

async fn serve(mut stream: TcpStream, state: Arc<State>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    loop {
        let (head, mut body) = read_head(&mut stream).await?;
        let target = head.split_whitespace().nth(1).unwrap_or("/").to_owned();
        let path = target.split('?').next().unwrap_or("/");
        if path.ends_with("/sse") {
            let receiver = state.sse.subscribe();
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache\r\ntransfer-encoding: identity\r\n\r\n")
                .await?;
            return stream_to(stream, receiver, &state).await;
        }
        if path.ends_with("/ws") {
            let key = header(&head, "sec-websocket-key").unwrap_or_default();
            let mut sha = sha1_smol::Sha1::new();
            sha.update(key.as_bytes());
            sha.update(b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11");
            let accept = base64::engine::general_purpose::STANDARD.encode(sha.digest().bytes());
            let response = format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-accept: {accept}\r\n\r\n"
            );
            stream.write_all(response.as_bytes()).await?;
            let receiver = state.ws.subscribe();
            return stream_to(stream, receiver, &state).await;
        }
        if path == "/snapshot" {
            let body = snapshot(&state, &target);
            respond(&mut stream, &body).await?;
            continue;
        }
        if path.starts_with("/api/channels/") {
            let body = format!(
                "{{\"subscribers\":{}}}",
                state.subscribers.load(Ordering::Relaxed)
            );
            respond(&mut stream, &body).await?;
            continue;
        }
        if path == "/api/publish" {
            let length: usize = header(&head, "content-length")
                .and_then(|value| value.parse().ok())
                .unwrap_or(0);
            while body.len() < length {
                let mut chunk = vec![0u8; length - body.len()];
                let read = stream.read(&mut chunk).await?;
                if read == 0 {
                    return Ok(());
                }
                body.extend_from_slice(&chunk[..read]);
            }
            let request: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
            // Numbered and sent under one lock, so that concurrent publishers' events reach
            // every socket in seq order (the load generator checks order; resync orders them
            // the same way).
            let seq = {
                let mut seqs = state.order.lock().unwrap();
                let channel = request["channel"].as_str().unwrap_or("c");
                let seq = seqs.entry(channel.to_owned()).or_insert(0);
                *seq += 1;
                let seq = *seq;
                // The same event frame resync sends, encoded once and shared by every socket.
                let frame = format!(
                    "{{\"type\":\"event\",\"channel\":\"{channel}\",\"epoch\":\"{EPOCH}\",\"seq\":{seq},\"data\":{}}}",
                    request["data"]
                );
                let _ = state.sse.send(Bytes::from(format!(
                    "id: {channel}:{EPOCH}:{seq}\ndata: {frame}\n\n"
                )));
                let _ = state.ws.send(Bytes::from(ws_text_frame(frame.as_bytes())));
                seq
            };
            respond(
                &mut stream,
                &format!("{{\"position\":{{\"epoch\":\"{EPOCH}\",\"seq\":{seq}}}}}"),
            )
            .await?;
            continue;
        }
        respond(&mut stream, "{}").await?;
    }
}

/// `GET /snapshot?keys=K&bytes=B`: what an application answers a client that must refetch
/// (the keyed-channel rows of issue 27): `K` entries shaped as a keyed channel's state
/// entries, each value a string of about `B` bytes, from memory.
fn snapshot(state: &State, target: &str) -> Arc<str> {
    let query = target.split_once('?').map_or("", |(_, query)| query);
    let field = |name: &str| {
        query.split('&').find_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            (key == name).then(|| value.parse::<u64>().ok())?
        })
    };
    let keys = field("keys").unwrap_or(1_000).min(1_000_000);
    let bytes = field("bytes").unwrap_or(64).min(65_536) as usize;
    let mut snapshots = state.snapshots.lock().unwrap();
    if snapshots.len() >= 16 {
        snapshots.clear();
    }
    snapshots
        .entry((keys, bytes))
        .or_insert_with(|| {
            let entries: Vec<String> = (0..keys)
                .map(|key| {
                    let mut value = format!("v{key}-");
                    value.extend(std::iter::repeat_n('x', bytes.saturating_sub(value.len())));
                    format!(
                        r#"{{"key":"k{key}","seq":{},"data":"{value}"}}"#,
                        1_000_000 + key
                    )
                })
                .collect();
            Arc::from(format!(r#"{{"entries":[{}]}}"#, entries.join(",")))
        })
        .clone()
}

fn ws_text_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 10);
    frame.push(0x81);
    match payload.len() {
        length if length < 126 => frame.push(length as u8),
        length if length <= u16::MAX as usize => {
            frame.push(126);
            frame.extend_from_slice(&(length as u16).to_be_bytes());
        }
        length => {
            frame.push(127);
            frame.extend_from_slice(&(length as u64).to_be_bytes());
        }
    }
    frame.extend_from_slice(payload);
    frame
}

async fn respond(stream: &mut TcpStream, body: &str) -> std::io::Result<()> {
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(response.as_bytes()).await
}

async fn stream_to(
    mut stream: TcpStream,
    mut receiver: broadcast::Receiver<Bytes>,
    state: &State,
) -> std::io::Result<()> {
    state.subscribers.fetch_add(1, Ordering::Relaxed);
    let (mut read_half, mut write_half) = stream.split();
    let mut discard = [0u8; 1024];
    let result = loop {
        tokio::select! {
            message = receiver.recv() => match message {
                Ok(bytes) => {
                    // Coalesce whatever else is queued into one write, as any tuned server does.
                    let mut batch = bytes.to_vec();
                    while batch.len() < 64 * 1024 {
                        match receiver.try_recv() {
                            Ok(more) => batch.extend_from_slice(&more),
                            Err(_) => break,
                        }
                    }
                    if let Err(error) = write_half.write_all(&batch).await {
                        break Err(error);
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => break Ok(()),
            },
            read = read_half.read(&mut discard) => match read {
                Ok(0) | Err(_) => break Ok(()),
                Ok(_) => {}
            },
        }
    };
    state.subscribers.fetch_sub(1, Ordering::Relaxed);
    result
}
