//! `loadgen failover`: how long delivery stops when a Redis primary dies. One SSE subscriber
//! per channel and one publisher per channel (a publish every `--interval-ms`, retried every
//! 20 ms while refused) run for `--seconds`; the caller kills a primary meanwhile. For each
//! channel the longest wait between two deliveries is kept; channels whose longest wait is
//! ten intervals or more stalled, and their waits are the time from the death until delivery
//! resumed. Subscribers come back from their last event, so `delivered` against
//! `acknowledged` (less what resets told them to refetch) says nothing was lost.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::{API_KEY, argument, number, percentile};

/// What one channel's subscriber saw.
#[derive(Default)]
struct Seen {
    arrivals: Vec<Instant>,
    resets: u64,
}

/// Reads `channel`'s SSE stream from `base` until `until`, noting when each event arrived;
/// if the stream ends it comes back from its last event (`Last-Event-ID`), as a browser does.
async fn follow(base: String, channel: String, seen: Arc<Mutex<Seen>>, until: Instant) {
    let address = base.trim_start_matches("http://").to_owned();
    let mut last_id: Option<String> = None;
    while Instant::now() < until {
        let Ok(mut stream) = TcpStream::connect(&address).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let resume = last_id
            .as_ref()
            .map(|id| format!("last-event-id: {id}\r\n"))
            .unwrap_or_default();
        let request = format!(
            "GET /sse?channel={channel} HTTP/1.1\r\nhost: {address}\r\naccept: text/event-stream\r\n{resume}\r\n"
        );
        if stream.write_all(request.as_bytes()).await.is_err() {
            continue;
        }
        let mut buffer = Vec::with_capacity(4096);
        loop {
            let left = until.saturating_duration_since(Instant::now());
            let read = match tokio::time::timeout(left, stream.read_buf(&mut buffer)).await {
                Ok(Ok(read)) if read > 0 => read,
                Ok(_) => break,
                Err(_) => return,
            };
            let _ = read;
            while let Some(end) = memchr::memmem::find(&buffer, b"\n\n") {
                let event = &buffer[..end];
                if let Some(id) = String::from_utf8_lossy(event)
                    .lines()
                    .find_map(|line| line.strip_prefix("id:"))
                {
                    last_id = Some(id.trim().to_owned());
                }
                let mut seen = seen.lock().unwrap();
                if memchr::memmem::find(event, b"\"seq\":").is_some()
                    && memchr::memmem::find(event, b"event: reset").is_none()
                {
                    seen.arrivals.push(Instant::now());
                } else if memchr::memmem::find(event, b"reset").is_some() {
                    seen.resets += 1;
                }
                drop(seen);
                buffer.drain(..end + 2);
            }
        }
    }
}

/// Publishes to `channel` every `interval` until `until`, each publish retried every 20 ms
/// until acknowledged.
async fn publish_steadily(
    http: reqwest::Client,
    base: String,
    channel: String,
    interval: Duration,
    until: Instant,
) -> u64 {
    let mut acknowledged = 0;
    while Instant::now() < until {
        loop {
            let response = http
                .post(format!("{base}/api/publish"))
                .bearer_auth(API_KEY)
                .json(&serde_json::json!({
                    "channel": channel,
                    "data": acknowledged,
                    // A retry of a publish whose answer was lost is not stored twice.
                    "idempotency_key": format!("{channel}-{acknowledged}"),
                }))
                .timeout(Duration::from_secs(2))
                .send()
                .await;
            if response.is_ok_and(|response| response.status().is_success()) {
                acknowledged += 1;
                break;
            }
            if Instant::now() >= until {
                return acknowledged;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(interval).await;
    }
    acknowledged
}

pub(crate) async fn run(arguments: &[String], url: &str) -> Result<serde_json::Value> {
    let channels = number(arguments, "--channels", 60) as usize;
    let interval = Duration::from_millis(number(arguments, "--interval-ms", 100));
    let seconds = number(arguments, "--seconds", 20);
    let publish_url = argument(arguments, "--publish-url").unwrap_or_else(|| url.to_owned());
    let prefix = format!("failover-{}", fastrand::u32(..));
    let until = Instant::now() + Duration::from_secs(seconds);
    let http = reqwest::Client::new();
    let mut followers = Vec::new();
    let mut seen = Vec::new();
    for index in 0..channels {
        let channel = format!("{prefix}-{index}");
        let record = Arc::new(Mutex::new(Seen::default()));
        seen.push(record.clone());
        followers.push(tokio::spawn(follow(url.to_owned(), channel, record, until)));
    }
    // Subscribers first, so that the first publishes reach them.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let publishers: Vec<_> = (0..channels)
        .map(|index| {
            tokio::spawn(publish_steadily(
                http.clone(),
                publish_url.clone(),
                format!("{prefix}-{index}"),
                interval,
                until,
            ))
        })
        .collect();
    let mut acknowledged = 0;
    for publisher in publishers {
        acknowledged += publisher.await.context("publisher")?;
    }
    for follower in followers {
        follower.await.context("follower")?;
    }
    let mut stalls = Vec::new();
    let mut delivered = 0;
    let mut resets = 0;
    for record in &seen {
        let record = record.lock().unwrap();
        delivered += record.arrivals.len() as u64;
        resets += record.resets;
        let longest = record
            .arrivals
            .windows(2)
            .map(|pair| pair[1] - pair[0])
            .max()
            .unwrap_or_default();
        if longest >= interval * 10 {
            stalls.push(longest.as_millis() as u64);
        }
    }
    stalls.sort_unstable();
    Ok(serde_json::json!({
        "scenario": "failover",
        "channels": channels,
        "stalled_channels": stalls.len(),
        "stall_p50_ms": percentile(&stalls, 0.5),
        "stall_p99_ms": percentile(&stalls, 0.99),
        "stall_max_ms": stalls.last().copied().unwrap_or(0),
        "acknowledged": acknowledged,
        "delivered": delivered,
        "resets": resets,
    }))
}
