//! `keyed`: clients far behind a channel come back at once (issue 27). On a keyed channel
//! they catch up from its state (the latest event of each key, in pages, then live: no
//! reset); on a plain channel they get a `truncated` reset and refetch the application's
//! snapshot of as many entries, which the bare baseline server answers from memory (the
//! cheapest refetch an application could give: a real one asks its database).
//!
//! The run first fills the channel (`--updates` publishes over `--keys` keys, from
//! `--publishers` concurrent backends: the publish throughput row), then for each of
//! `--transports` opens `--subscribers` clients at once, each with the channel's first
//! position, and times them until every one is caught up. Reported per transport (fields
//! `<transport>_…`): that time, the bytes each client read (its stream, plus the snapshot on
//! a plain channel), the state entries and state reads each saw, how many saw a reset, and
//! the CPU of the server, of the snapshot server and of the generator itself.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{
    argument, client_frame, cpu_seconds, is_reset, number, pids, publish_request, send_request,
    ws_connect, ws_frame_at,
};

/// What one client read until it was caught up.
#[derive(Default)]
struct Caught {
    bytes: u64,
    /// State entries received, over every page.
    entries: u64,
    /// Whole states read (a last page).
    states: u64,
    reset: bool,
}

impl Caught {
    /// Takes one server frame (JSON); answers whether the client is now caught up: after the
    /// last state page on a keyed channel, after the reset on a plain one (its refetch then
    /// follows).
    fn frame(&mut self, frame: &[u8], keyed: bool) -> Result<bool> {
        if frame.starts_with(br#"{"type":"state""#) {
            let entries = memchr::memmem::find_iter(frame, br#"{"key":""#).count();
            let more = memchr::memmem::find(frame, br#""more":true"#).is_some();
            return Ok(self.state_page(entries, more, keyed));
        } else if is_reset(frame) {
            self.reset = true;
            return Ok(!keyed);
        } else if frame.starts_with(br#"{"type":"error""#) {
            bail!("error frame: {}", String::from_utf8_lossy(frame));
        }
        Ok(false)
    }

    /// Takes a state page of `entries`; answers whether the client is now caught up.
    fn state_page(&mut self, entries: usize, more: bool, keyed: bool) -> bool {
        self.entries += entries as u64;
        if !more {
            self.states += 1;
        }
        keyed && !more
    }
}

/// The `POST /api/publish` body of update `n`: key `k<n mod keys>` on a keyed channel, a
/// string of about `value_bytes` as its data.
fn update(channel: &str, keyed: bool, n: u64, keys: u64, value_bytes: usize) -> serde_json::Value {
    let mut data = format!("v{n}-");
    data.extend(std::iter::repeat_n(
        'x',
        value_bytes.saturating_sub(data.len()),
    ));
    if keyed {
        serde_json::json!({"channel": channel, "key": format!("k{}", n % keys), "data": data})
    } else {
        serde_json::json!({"channel": channel, "data": data})
    }
}

/// Where a client comes back from: the channel, its first position, and what it needs.
#[derive(Clone)]
struct Place {
    url: String,
    channel: String,
    epoch: String,
    seq: u64,
    keyed: bool,
    /// The application's snapshot, refetched after a reset (a plain channel).
    snapshot: Option<String>,
}

pub(crate) async fn run(arguments: &[String], url: &str) -> Result<serde_json::Value> {
    let keyed = argument(arguments, "--mode").as_deref() != Some("plain");
    let transports = argument(arguments, "--transports").unwrap_or_else(|| "ws,sse,poll".into());
    let subscribers = number(arguments, "--subscribers", 5_000) as usize;
    let keys = number(arguments, "--keys", 1_000).max(1);
    let updates = number(arguments, "--updates", 50_000);
    let value_bytes = number(arguments, "--value-bytes", 64) as usize;
    let publishers = number(arguments, "--publishers", 64).max(1);
    let publish_url = argument(arguments, "--publish-url").unwrap_or_else(|| url.to_owned());
    let snapshot_url = argument(arguments, "--snapshot-url");
    let snapshot_pid: Option<u32> =
        argument(arguments, "--snapshot-pid").and_then(|pid| pid.parse().ok());
    if !keyed && snapshot_url.is_none() {
        bail!("--mode plain needs --snapshot-url: the application a reset client refetches from");
    }
    let server_pids = pids(arguments);
    let server_cpu = || server_pids.iter().map(|pid| cpu_seconds(*pid)).sum::<f64>();
    let own_cpu = || cpu_seconds(std::process::id());
    let channel = format!(
        "{}:c{}",
        if keyed { "keyed" } else { "plain" },
        fastrand::u32(..)
    );
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(publishers as usize)
        .build()?;

    // The clients' place: the first update, long gone from the history by the fill's end.
    let first = publish_request(
        &http,
        &publish_url,
        &update(&channel, keyed, 0, keys, value_bytes),
    )
    .await?;
    let epoch = first["position"]["epoch"]
        .as_str()
        .context("the first publish's epoch")?
        .to_owned();
    let seq = first["position"]["seq"]
        .as_u64()
        .context("the first publish's seq")?;

    let (cpu_before, own_before, started) = (server_cpu(), own_cpu(), Instant::now());
    let next = Arc::new(AtomicU64::new(1));
    let fillers: Vec<_> = (0..publishers)
        .map(|_| {
            let (http, publish_url, channel, next) = (
                http.clone(),
                publish_url.clone(),
                channel.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n > updates {
                        return Ok::<_, anyhow::Error>(());
                    }
                    let body = update(&channel, keyed, n, keys, value_bytes);
                    publish_request(&http, &publish_url, &body).await?;
                }
            })
        })
        .collect();
    for filler in fillers {
        filler.await??;
    }
    let fill_seconds = started.elapsed().as_secs_f64();
    let mut result = serde_json::json!({
        "scenario": "keyed",
        "mode": if keyed { "keyed" } else { "plain" },
        "keys": keys,
        "updates": updates,
        "subscribers": subscribers,
        "publishes_per_sec": updates as f64 / fill_seconds,
        "publish_cpu_seconds_per_thousand": (server_cpu() - cpu_before) / updates.max(1) as f64 * 1e3,
        "publish_loadgen_cpu_share": (own_cpu() - own_before) / fill_seconds,
    });

    let place = Place {
        url: url.to_owned(),
        channel,
        epoch,
        seq,
        keyed,
        snapshot: snapshot_url
            .map(|base| format!("{base}/snapshot?keys={keys}&bytes={value_bytes}")),
    };
    let reader = reqwest::Client::builder()
        .pool_max_idle_per_host(subscribers)
        .build()?;
    for transport in transports.split(',') {
        let snapshot_before = snapshot_pid.map_or(0.0, cpu_seconds);
        let (cpu_before, own_before, started) = (server_cpu(), own_cpu(), Instant::now());
        let mut clients = Vec::with_capacity(subscribers);
        for index in 0..subscribers {
            let (place, reader, transport) = (place.clone(), reader.clone(), transport.to_owned());
            clients.push(tokio::spawn(async move {
                let caught = catch_up(&transport, &place, &reader).await;
                (caught, Instant::now())
            }));
            // Paced a little so the listen backlog never overflows.
            if index % 200 == 199 {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let (mut done, mut failed, mut bytes, mut resets, mut last) =
            (0u64, 0u64, 0u64, 0u64, started);
        let (mut fewest, mut most, mut states_most) = (u64::MAX, 0u64, 0u64);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
        for client in clients {
            match tokio::time::timeout_at(deadline, client).await {
                Ok(Ok((Ok(caught), finished))) => {
                    done += 1;
                    bytes += caught.bytes;
                    resets += u64::from(caught.reset);
                    fewest = fewest.min(caught.entries);
                    most = most.max(caught.entries);
                    states_most = states_most.max(caught.states);
                    last = last.max(finished);
                }
                Ok(Ok((Err(error), _))) => {
                    failed += 1;
                    if failed <= 3 {
                        eprintln!("loadgen: keyed {transport} client failed: {error:#}");
                    }
                }
                Ok(Err(_)) | Err(_) => failed += 1,
            }
        }
        let seconds = last.duration_since(started).as_secs_f64();
        let fields = serde_json::json!({
            "seconds_until_all_caught_up": seconds,
            "bytes_per_client": bytes as f64 / done.max(1) as f64,
            "entries_fewest": if done == 0 { 0 } else { fewest },
            "entries_most": most,
            "state_reads_most": states_most,
            "resets": resets,
            "failed": failed,
            "server_cpu_seconds": server_cpu() - cpu_before,
            "snapshot_cpu_seconds": snapshot_pid.map_or(0.0, cpu_seconds) - snapshot_before,
            "loadgen_cpu_share": (own_cpu() - own_before) / started.elapsed().as_secs_f64(),
        });
        if let (Some(into), Some(fields)) = (result.as_object_mut(), fields.as_object()) {
            for (name, value) in fields {
                into.insert(format!("{transport}_{name}"), value.clone());
            }
        }
    }
    Ok(result)
}

/// One client back at `place` on `transport`, until it is caught up.
async fn catch_up(transport: &str, place: &Place, reader: &reqwest::Client) -> Result<Caught> {
    let mut caught = match transport {
        "ws" => over_websocket(place).await?,
        "sse" => over_sse(place).await?,
        "poll" => over_polling(place, reader).await?,
        other => bail!("unknown transport {other:?}"),
    };
    if caught.reset
        && let Some(snapshot) = &place.snapshot
    {
        let body = reader.get(snapshot).send().await?.bytes().await?;
        caught.bytes += body.len() as u64;
    }
    Ok(caught)
}

async fn over_websocket(place: &Place) -> Result<Caught> {
    let (mut stream, mut buffer) = ws_connect(&place.url, "/ws").await?;
    let subscribe = format!(
        r#"{{"type":"subscribe","id":1,"channel":"{}","since":{{"epoch":"{}","seq":{}}}}}"#,
        place.channel, place.epoch, place.seq
    );
    stream
        .write_all(&client_frame(1, subscribe.as_bytes()))
        .await?;
    let mut caught = Caught {
        bytes: buffer.len() as u64,
        ..Caught::default()
    };
    loop {
        let mut start = 0;
        while let Some((opcode, header, length)) = ws_frame_at(&buffer[start..]) {
            let payload = &buffer[start + header..start + header + length];
            match opcode {
                1 if caught.frame(payload, place.keyed)? => return Ok(caught),
                8 => bail!("closed before it was caught up"),
                _ => {}
            }
            start += header + length;
        }
        buffer.drain(..start);
        buffer.reserve(64 * 1024);
        let read = stream.read_buf(&mut buffer).await?;
        if read == 0 {
            bail!("ended before it was caught up");
        }
        caught.bytes += read as u64;
    }
}

async fn over_sse(place: &Place) -> Result<Caught> {
    let address = place.url.trim_start_matches("http://").to_owned();
    let Place {
        channel,
        epoch,
        seq,
        ..
    } = place;
    let request = format!(
        "GET /sse?channel={channel} HTTP/1.1\r\nhost: {address}\r\naccept: text/event-stream\r\n\
         last-event-id: {channel}:{epoch}:{seq}\r\n\r\n"
    );
    let mut stream = send_request(&address, &request).await?;
    let mut caught = Caught::default();
    // What was read, and the stream's body from it: the response is chunked (the chunk
    // headers fall anywhere, inside an event too), so the body is taken out of its chunks
    // before events are looked for.
    let mut raw = Vec::with_capacity(64 * 1024);
    let mut body = Vec::with_capacity(64 * 1024);
    let mut head_read = false;
    loop {
        raw.reserve(64 * 1024);
        let read = stream.read_buf(&mut raw).await?;
        if read == 0 {
            bail!("ended before it was caught up");
        }
        caught.bytes += read as u64;
        if !head_read {
            let Some(end) = memchr::memmem::find(&raw, b"\r\n\r\n") else {
                continue;
            };
            if !raw.starts_with(b"HTTP/1.1 200") {
                bail!("refused: {}", String::from_utf8_lossy(&raw[..end.min(64)]));
            }
            raw.drain(..end + 4);
            head_read = true;
        }
        dechunk(&mut raw, &mut body)?;
        let mut start = 0;
        while let Some(end) = memchr::memmem::find(&body[start..], b"\n\n") {
            let event = &body[start..start + end];
            start += end + 2;
            // The frame is the event's `data:` line.
            let Some(at) = memchr::memmem::find(event, b"data: ") else {
                continue;
            };
            let data = &event[at + 6..];
            let data = &data[..memchr::memchr(b'\n', data).unwrap_or(data.len())];
            if caught.frame(data, place.keyed)? {
                return Ok(caught);
            }
        }
        body.drain(..start);
    }
}

/// Moves every whole chunk of `raw` (HTTP/1.1 chunked transfer coding) into `body`.
fn dechunk(raw: &mut Vec<u8>, body: &mut Vec<u8>) -> Result<()> {
    let mut at = 0;
    while let Some(line) = memchr::memmem::find(&raw[at..], b"\r\n") {
        let size = std::str::from_utf8(&raw[at..at + line])?;
        let size = usize::from_str_radix(size.split(';').next().unwrap_or("").trim(), 16)
            .with_context(|| format!("chunk size {size:?}"))?;
        let data = at + line + 2;
        if raw.len() < data + size + 2 {
            break;
        }
        body.extend_from_slice(&raw[data..data + size]);
        at = data + size + 2;
    }
    raw.drain(..at);
    Ok(())
}

async fn over_polling(place: &Place, reader: &reqwest::Client) -> Result<Caught> {
    let mut caught = Caught::default();
    let mut cursor = format!("{}:{}:{}", place.channel, place.epoch, place.seq);
    let mut state_after = String::new();
    for _ in 0..1_000 {
        let mut query = vec![
            ("channel", place.channel.clone()),
            ("cursor", cursor.clone()),
            ("timeout", "1".to_owned()),
        ];
        if !state_after.is_empty() {
            query.push(("state_after", state_after.clone()));
        }
        let response = reader
            .get(format!("{}/poll", place.url))
            .query(&query)
            .send()
            .await?;
        if !response.status().is_success() {
            bail!("poll answered {}", response.status());
        }
        let body = response.bytes().await?;
        caught.bytes += body.len() as u64;
        let reply: serde_json::Value = serde_json::from_slice(&body)?;
        let mut done = false;
        for frame in reply["events"].as_array().into_iter().flatten() {
            if frame["type"] == "state" {
                let entries = frame["entries"].as_array().map_or(0, Vec::len);
                let more = frame["more"].as_bool().unwrap_or(false);
                done |= caught.state_page(entries, more, place.keyed);
            }
        }
        if reply["resets"]
            .as_array()
            .is_some_and(|resets| !resets.is_empty())
        {
            caught.reset = true;
            done |= !place.keyed;
        }
        if done {
            return Ok(caught);
        }
        cursor = reply["cursor"].as_str().context("cursor")?.to_owned();
        state_after = reply["state_after"]
            .as_array()
            .map(|list| {
                list.iter()
                    .filter_map(serde_json::Value::as_str)
                    .collect::<Vec<_>>()
                    .join(",")
            })
            .unwrap_or_default();
    }
    bail!("not caught up after 1,000 polls")
}
