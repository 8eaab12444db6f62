//! `presence`: N WebSocket connections join one channel, each as its own (anonymous) member,
//! while one watcher counts the joins; then the member count is asked for over the HTTP API,
//! then every member leaves. With `--presence off` the same connections subscribe without
//! presence: the baseline of the same run. Reported: the time until the watcher saw every
//! join (or the server counted every subscriber), the server's CPU and memory per member,
//! the count query's latency, the time until the count is 0 again, and how many leaves the
//! watcher saw (a watcher that falls behind a burst past its 256-event queue is sent the whole
//! list instead, in pages past 64 KiB, which counts for the joins it holds once its last page
//! is in: counting one page only left a Redis round of 10,000 members waiting for ever).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

use crate::{API_KEY, argument, cpu_seconds, number, percentile, pids, rss_kib, subscribers_on};

/// One connection: subscribes (as a member, or not), answers pings, counts joins and leaves
/// when it watches.
async fn connection(
    url: String,
    frame: String,
    joins: Arc<AtomicU64>,
    leaves: Arc<AtomicU64>,
) -> Result<()> {
    let (mut socket, _) = tokio_tungstenite::connect_async(&url).await?;
    socket.send(Message::text(frame)).await?;
    // Members of the whole list being received: a list past 64 KiB comes in pages, each but
    // the last marked `"more":true`.
    let mut listed = 0u64;
    while let Some(message) = socket.next().await {
        if let Message::Text(text) = message? {
            let bytes = text.as_bytes();
            if bytes.starts_with(br#"{"type":"join""#) {
                joins.fetch_add(1, Ordering::Relaxed);
            } else if bytes.starts_with(br#"{"type":"presence","id":0"#) {
                // The server sends the whole list to a watcher that fell behind a burst: it
                // stands for every join it holds.
                listed += memchr::memmem::find_iter(bytes, br#"{"id":"#).count() as u64;
                if memchr::memmem::find(bytes, br#""more":true"#).is_none() {
                    joins.fetch_max(listed, Ordering::Relaxed);
                    listed = 0;
                }
            } else if bytes.starts_with(br#"{"type":"leave""#) {
                leaves.fetch_add(1, Ordering::Relaxed);
            } else if bytes.starts_with(br#"{"type":"ping""#) {
                socket.send(Message::text(r#"{"type":"pong"}"#)).await?;
            }
        }
    }
    Ok(())
}

async fn wait_until(what: &str, deadline: Duration, done: impl Fn() -> bool) -> Result<Duration> {
    let started = Instant::now();
    while !done() {
        if started.elapsed() > deadline {
            bail!("{what} did not happen within {deadline:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(started.elapsed())
}

pub(crate) async fn presence(arguments: &[String], url: &str) -> Result<serde_json::Value> {
    let members = number(arguments, "--members", 10_000);
    let with_presence = argument(arguments, "--presence").is_none_or(|value| value != "off");
    let pid = *pids(arguments).first().context("--pid")?;
    // With the Redis broker: Redis's own memory per member is measured too.
    let redis_url = argument(arguments, "--redis-url");
    let channel = format!("room-{}", fastrand::u32(..));
    let ws_url = format!("{}/ws", url.replacen("http", "ws", 1));
    let http = reqwest::Client::new();
    let joins = Arc::new(AtomicU64::new(0));
    let leaves = Arc::new(AtomicU64::new(0));
    let watcher_frame = if with_presence {
        format!(r#"{{"type":"subscribe","id":1,"channel":"{channel}","join_leave":true}}"#)
    } else {
        format!(r#"{{"type":"subscribe","id":1,"channel":"{channel}"}}"#)
    };
    let watcher = tokio::spawn(connection(
        ws_url.clone(),
        watcher_frame,
        joins.clone(),
        leaves.clone(),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    while subscribers_on(&http, url, &channel).await < 1 {
        if Instant::now() > deadline {
            bail!("the watcher did not subscribe");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = rss_kib(pid);
    let redis_before = redis_url.as_deref().map(redis_used_memory).transpose()?;
    let cpu_before = cpu_seconds(pid);
    let started = Instant::now();
    let mut tasks = Vec::with_capacity(members as usize);
    let unused = Arc::new(AtomicU64::new(0));
    for index in 0..members {
        let frame = if with_presence {
            format!(
                r#"{{"type":"subscribe","id":1,"channel":"{channel}","presence":{{"info":{{"n":{index}}}}}}}"#
            )
        } else {
            format!(r#"{{"type":"subscribe","id":1,"channel":"{channel}"}}"#)
        };
        tasks.push(tokio::spawn(connection(
            ws_url.clone(),
            frame,
            unused.clone(),
            unused.clone(),
        )));
        if index % 200 == 199 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Joined: the watcher saw every join (presence) or the server counts every subscriber.
    let joined_in = if with_presence {
        wait_until("every join", Duration::from_secs(120), || {
            joins.load(Ordering::Relaxed) >= members
        })
        .await?;
        started.elapsed()
    } else {
        let deadline = Instant::now() + Duration::from_secs(120);
        while subscribers_on(&http, url, &channel).await < members + 1 {
            if Instant::now() > deadline {
                bail!("not every subscriber arrived");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        started.elapsed()
    };
    let cpu = cpu_seconds(pid) - cpu_before;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(pid);
    let redis_after = redis_url.as_deref().map(redis_used_memory).transpose()?;
    // The count query (presence), or the channel info (baseline), 200 times.
    let mut latencies = Vec::with_capacity(200);
    for _ in 0..200 {
        let path = if with_presence {
            format!("{url}/api/channels/{channel}/presence?only=count")
        } else {
            format!("{url}/api/channels/{channel}")
        };
        let asked = Instant::now();
        let response = http.get(path).bearer_auth(API_KEY).send().await?;
        let body: serde_json::Value = response.json().await?;
        latencies.push(asked.elapsed().as_micros() as u64);
        if with_presence && body["count"].as_u64() != Some(members) {
            bail!("the count says {}, not {members}", body["count"]);
        }
    }
    latencies.sort_unstable();
    let leaving = Instant::now();
    for task in &tasks {
        task.abort();
    }
    // Left: the count is 0 again (presence), or the server counts only the watcher. The
    // watcher's own leave events may lag in a burst this size (it is told to refetch the
    // list then): they are counted, not waited for.
    let left_in = if with_presence {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let body: serde_json::Value = http
                .get(format!("{url}/api/channels/{channel}/presence?only=count"))
                .bearer_auth(API_KEY)
                .send()
                .await?
                .json()
                .await?;
            if body["count"].as_u64() == Some(0) {
                break leaving.elapsed();
            }
            if Instant::now() > deadline {
                bail!("members left: the count is still {}", body["count"]);
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    } else {
        let deadline = Instant::now() + Duration::from_secs(120);
        while subscribers_on(&http, url, &channel).await > 1 {
            if Instant::now() > deadline {
                bail!("not every subscriber left");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        leaving.elapsed()
    };
    watcher.abort();
    Ok(serde_json::json!({
        "scenario": "presence",
        "presence": with_presence,
        "members": members,
        "joined_seconds": joined_in.as_secs_f64(),
        "left_seconds": left_in.as_secs_f64(),
        "leaves_seen_by_watcher": leaves.load(Ordering::Relaxed),
        "server_cpu_seconds": cpu,
        "bytes_per_member": (rss_after.saturating_sub(rss_before) * 1024) as f64 / members as f64,
        "redis_bytes_per_member": match (redis_before, redis_after) {
            (Some(before), Some(after)) => after.saturating_sub(before) as f64 / members as f64,
            _ => 0.0,
        },
        "query_p50_us": percentile(&latencies, 0.5),
        "query_p99_us": percentile(&latencies, 0.99),
    }))
}

/// Redis's `used_memory` (bytes), read with `INFO memory` over a plain socket.
fn redis_used_memory(url: &str) -> Result<u64> {
    use std::io::{Read, Write};
    let address = url
        .trim_start_matches("redis://")
        .trim_end_matches('/')
        .to_owned();
    let mut socket = std::net::TcpStream::connect(&address)
        .with_context(|| format!("connecting to Redis at {address}"))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.write_all(b"*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n")?;
    let mut reply = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        let read = socket.read(&mut chunk)?;
        if read == 0 {
            bail!("Redis closed the connection");
        }
        reply.extend_from_slice(&chunk[..read]);
        let text = String::from_utf8_lossy(&reply);
        // A bulk string: `$<length>\r\n<body>\r\n`.
        if let Some((header, body)) = text.split_once("\r\n") {
            let length: usize = header.trim_start_matches('$').parse()?;
            if body.len() >= length {
                let line = body
                    .lines()
                    .find_map(|line| line.strip_prefix("used_memory:"))
                    .context("INFO memory has no used_memory")?;
                return Ok(line.trim().parse()?);
            }
        }
    }
}
