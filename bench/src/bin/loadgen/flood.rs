//! `flood`: legitimate subscribers receive a steady stream while bounded floods run beside
//! them, each from its own loopback address (127.0.0.0/8 is all loopback on Linux), so the
//! server's per-address limits meet them as they would meet attackers on the internet:
//!
//! - **oversized frames**: WebSocket frames declaring 2^40 bytes, their payload streamed on;
//! - **anonymous publishing**: WebSockets publishing to the legitimate channel without rights;
//! - **channel spraying**: SSE requests naming 128 never-published channels each;
//! - **connection flood**: idle connections opened until the server refuses them (its cap);
//! - **ping floods**: WebSockets that send pings as fast as they can and never read;
//! - and the floods of issue 25 (`edge_floods.rs`): keep-alive drip, TLS handshake stall,
//!   pipelining non-readers, long-poll presence, non-reading polls from four addresses, a
//!   refresh-signature flood and proxy-slot hogging against a slow backend.
//!
//! Every flood task stops at the end of the run and each of its connections has a deadline.
//! Reported: events lost by the legitimate subscribers (must be 0), their latency, the
//! server's peak RSS and its RSS before and after the floods, the legitimate checks beside
//! the floods (`/healthz`, `https://…/healthz`, a proxied subscribe), and what each flood
//! achieved (how far the server let it go).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;

use crate::edge_floods;
use crate::{
    Progress, Tally, argument, cpu_seconds, number, open_subscribers, percentile, pids, publish,
    wait_subscribed,
};

/// What the floods did, counted as they went.
#[derive(Default)]
struct FloodCounts {
    /// Oversized frames answered with close 1009.
    oversized_closed_1009: AtomicU64,
    /// Payload bytes written after an oversized header before the close arrived (the most
    /// the server could have taken; most of it sat in socket buffers).
    oversized_bytes_written: AtomicU64,
    /// Anonymous publish frames sent, and errors answered to them.
    anonymous_publishes: AtomicU64,
    anonymous_errors: AtomicU64,
    /// Spraying requests answered with a stream that follows the channels, and refused.
    spray_followed: AtomicU64,
    spray_refused: AtomicU64,
    /// Idle flood connections that got in, and that were refused (cap or address limits).
    flood_admitted: AtomicU64,
    flood_refused: AtomicU64,
    /// Ping-flooding connections the server closed.
    pingers_reaped: AtomicU64,
}

/// A loopback address of flood number `index`: 127.0.<index / 250>.<2 + index % 250>.
fn flood_address(index: u32) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(
        127,
        0,
        (index / 250) as u8,
        2 + (index % 250) as u8,
    ))
}

async fn connect_from(source: IpAddr, server: SocketAddr) -> Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    Ok(tokio::time::timeout(Duration::from_secs(5), socket.connect(server)).await??)
}

/// Reads an HTTP response head (up to the blank line) and returns it.
async fn read_head(stream: &mut TcpStream) -> Result<String> {
    let mut head = Vec::with_capacity(512);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 {
            bail!("response head too long");
        }
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte)).await??;
        if read == 0 {
            bail!("closed during the response head");
        }
        head.push(byte[0]);
    }
    Ok(String::from_utf8_lossy(&head).into_owned())
}

/// A WebSocket upgrade from `source`; the stream after the 101, or why not.
async fn upgrade(source: IpAddr, server: SocketAddr, query: &str) -> Result<TcpStream> {
    let mut stream = connect_from(source, server).await?;
    let request = format!(
        "GET /ws{query} HTTP/1.1\r\nHost: {server}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await?;
    let head = read_head(&mut stream).await?;
    if !head.starts_with("HTTP/1.1 101") {
        bail!("upgrade refused: {}", head.lines().next().unwrap_or(""));
    }
    Ok(stream)
}

/// A masked client frame (mask 0, so the payload reads as written).
fn client_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = vec![0x80 | opcode];
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

/// Frames declaring 2^40 bytes, then payload until the server's close arrives (at most
/// 1 MiB each).
async fn oversized(
    source: IpAddr,
    server: SocketAddr,
    counts: Arc<FloodCounts>,
    stop: watch::Receiver<bool>,
) {
    let chunk = vec![b'x'; 16 * 1024];
    while !*stop.borrow() {
        let Ok(stream) = upgrade(source, server, "").await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (mut reader, mut writer) = stream.into_split();
        let mut header = vec![0x81, 0x80 | 127];
        header.extend_from_slice(&(1u64 << 40).to_be_bytes());
        header.extend_from_slice(&[0, 0, 0, 0]);
        if writer.write_all(&header).await.is_err() {
            continue;
        }
        let mut closed = Box::pin(async move {
            tokio::time::timeout(Duration::from_secs(5), close_code(&mut reader))
                .await
                .ok()
                .flatten()
                == Some(1009)
        });
        let mut sent = 0u64;
        let got_1009 = loop {
            tokio::select! {
                got = &mut closed => break got,
                written = writer.write_all(&chunk), if sent < 1 << 20 => {
                    if written.is_err() {
                        break (&mut closed).await;
                    }
                    sent += chunk.len() as u64;
                }
            }
        };
        counts
            .oversized_bytes_written
            .fetch_add(sent, Ordering::Relaxed);
        if got_1009 {
            counts.oversized_closed_1009.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads server frames until a close frame, and returns its code (`None` if the stream ends
/// first).
async fn close_code(reader: &mut (impl AsyncReadExt + Unpin)) -> Option<u16> {
    loop {
        let mut head = [0u8; 2];
        reader.read_exact(&mut head).await.ok()?;
        let length = match head[1] & 0x7F {
            126 => u64::from(reader.read_u16().await.ok()?),
            127 => reader.read_u64().await.ok()?,
            short => u64::from(short),
        };
        let mut payload = vec![0u8; usize::try_from(length).ok()?.min(1 << 20)];
        reader.read_exact(&mut payload).await.ok()?;
        if head[0] & 0x0F == 8 {
            return Some(u16::from_be_bytes([*payload.first()?, *payload.get(1)?]));
        }
    }
}

/// An anonymous WebSocket that publishes to the legitimate channel as fast as it can write.
async fn anonymous_publisher(
    source: IpAddr,
    server: SocketAddr,
    channel: String,
    counts: Arc<FloodCounts>,
    stop: watch::Receiver<bool>,
) {
    while !*stop.borrow() {
        let Ok(stream) = upgrade(source, server, "").await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let (mut reader, mut writer) = stream.into_split();
        let reading = {
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut buffer = vec![0u8; 16 * 1024];
                loop {
                    match tokio::time::timeout(Duration::from_secs(5), reader.read(&mut buffer))
                        .await
                    {
                        Ok(Ok(read)) if read > 0 => {
                            let errors =
                                memchr::memmem::find_iter(&buffer[..read], b"\"type\":\"error\"")
                                    .count();
                            counts
                                .anonymous_errors
                                .fetch_add(errors as u64, Ordering::Relaxed);
                        }
                        _ => break,
                    }
                }
            })
        };
        let mut id = 0u64;
        while !*stop.borrow() {
            id += 1;
            let text = format!(
                r#"{{"type":"publish","id":{id},"channel":"{channel}","data":{{"forged":true}}}}"#
            );
            match tokio::time::timeout(
                Duration::from_secs(2),
                writer.write_all(&client_frame(1, text.as_bytes())),
            )
            .await
            {
                Ok(Ok(())) => {
                    counts.anonymous_publishes.fetch_add(1, Ordering::Relaxed);
                }
                _ => break,
            }
            if id.is_multiple_of(64) {
                tokio::task::yield_now().await;
            }
        }
        reading.abort();
    }
}

/// SSE requests naming 128 never-published channels each, held open (a few at a time).
async fn sprayer(
    source: IpAddr,
    server: SocketAddr,
    counts: Arc<FloodCounts>,
    stop: watch::Receiver<bool>,
) {
    let mut held = std::collections::VecDeque::new();
    while !*stop.borrow() {
        let Ok(mut stream) = connect_from(source, server).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let channels: Vec<String> = (0..128)
            .map(|_| format!("spray-{:x}", fastrand::u64(..)))
            .collect();
        let request = format!(
            "GET /sse?channels={} HTTP/1.1\r\nHost: {server}\r\nAccept: text/event-stream\r\n\r\n",
            channels.join(",")
        );
        if stream.write_all(request.as_bytes()).await.is_err() {
            continue;
        }
        // The first event says whether the channels are followed or the request refused.
        let mut answer = Vec::with_capacity(8192);
        let deadline = Instant::now() + Duration::from_secs(3);
        let followed = loop {
            if memchr::memmem::find(&answer, b"event: subscribed").is_some() {
                break true;
            }
            if answer.len() > 64 * 1024 || Instant::now() > deadline {
                break false;
            }
            let mut chunk = [0u8; 4096];
            match tokio::time::timeout_at(deadline.into(), stream.read(&mut chunk)).await {
                Ok(Ok(read)) if read > 0 => answer.extend_from_slice(&chunk[..read]),
                _ => break false,
            }
        };
        if followed {
            counts.spray_followed.fetch_add(1, Ordering::Relaxed);
            held.push_back(stream);
            if held.len() > 50 {
                held.pop_front();
            }
        } else {
            counts.spray_refused.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Idle WebSockets from many addresses until the server refuses: its cap, with the healthy
/// traffic beside it. Refused upgrades pause before trying again.
async fn connection_flood(
    first_address: u32,
    addresses: u32,
    per_address: u32,
    server: SocketAddr,
    counts: Arc<FloodCounts>,
    stop: watch::Receiver<bool>,
) {
    let mut held = Vec::new();
    'outer: for address in first_address..first_address + addresses {
        let source = flood_address(address);
        for _ in 0..per_address {
            if *stop.borrow() {
                break 'outer;
            }
            match upgrade(source, server, "").await {
                Ok(stream) => {
                    // A server at its cap upgrades and then closes 1013: read briefly.
                    let mut stream = stream;
                    let mut byte = [0u8; 4];
                    match tokio::time::timeout(Duration::from_millis(20), stream.read(&mut byte))
                        .await
                    {
                        Ok(Ok(read)) if read >= 2 && byte[0] == 0x88 => {
                            counts.flood_refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                        Ok(Ok(0) | Err(_)) => {
                            counts.flood_refused.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            counts.flood_admitted.fetch_add(1, Ordering::Relaxed);
                            held.push(stream);
                        }
                    }
                }
                Err(_) => {
                    counts.flood_refused.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
    let mut stop = stop;
    let _ = stop.wait_for(|stopped| *stopped).await;
    drop(held);
}

/// A WebSocket that sends pings as fast as it can and never reads.
async fn pinger(
    source: IpAddr,
    server: SocketAddr,
    counts: Arc<FloodCounts>,
    stop: watch::Receiver<bool>,
) {
    let ping = client_frame(9, &[b'p'; 125]).repeat(64);
    while !*stop.borrow() {
        let Ok(mut stream) = upgrade(source, server, "").await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            if *stop.borrow() {
                return;
            }
            // A write that cannot finish means the server stopped reading us: it has given
            // up on this connection (or will, at its write deadline).
            match tokio::time::timeout(Duration::from_secs(30), stream.write_all(&ping)).await {
                Ok(Ok(())) => tokio::task::yield_now().await,
                _ => {
                    counts.pingers_reaped.fetch_add(1, Ordering::Relaxed);
                    break;
                }
            }
        }
    }
}

/// Peak resident memory of a process (`VmHWM`), in KiB.
fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmHWM:"))
                .and_then(|line| line.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The floods' runtime. Dropped, it ends what a flood left running without waiting for it,
/// which (unlike a plain drop of a runtime) an async context allows.
struct AttackRuntime(Option<tokio::runtime::Runtime>);

impl AttackRuntime {
    fn spawn<F>(&self, future: F) -> tokio::task::JoinHandle<F::Output>
    where
        F: std::future::Future + Send + 'static,
        F::Output: Send + 'static,
    {
        match &self.0 {
            Some(runtime) => runtime.spawn(future),
            None => tokio::spawn(future),
        }
    }
}

impl Drop for AttackRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

pub(crate) async fn flood(arguments: &[String], url: &str) -> Result<serde_json::Value> {
    let subscribers = number(arguments, "--subscribers", 150) as usize;
    let seconds = number(arguments, "--seconds", 10);
    let rate = number(arguments, "--rate", 50).max(1);
    let with_floods = argument(arguments, "--floods").is_none_or(|value| value != "off");
    // `--only drip,refresher`: just those floods (to find which one costs what).
    let only: Option<Vec<String>> =
        argument(arguments, "--only").map(|names| names.split(',').map(str::to_owned).collect());
    let runs = |name: &str| {
        only.as_ref()
            .is_none_or(|only| only.iter().any(|chosen| chosen == name))
    };
    let server_pid = pids(arguments).first().copied().context("--pid")?;
    let server: SocketAddr = url
        .trim_start_matches("http://")
        .parse()
        .context("--url must be http://<ip>:<port>")?;
    let channel = format!("steady-{}", fastrand::u32(..));
    let http = reqwest::Client::new();
    let tally = Arc::new(Tally::default());
    let expected = rate * seconds;
    let bases = [url.to_owned()];
    let tasks = open_subscribers(
        &bases,
        "ws",
        subscribers,
        |_| channel.clone(),
        &tally,
        expected,
        |_| Progress::default(),
    )
    .await;
    wait_subscribed(&http, &bases, &channel, subscribers as u64).await?;

    let counts = Arc::new(FloodCounts::default());
    let edge = Arc::new(edge_floods::EdgeCounts::default());
    let (stop_sender, stop) = watch::channel(false);
    let mut floods = Vec::new();
    // The floods run on a runtime of their own, one thread: an attacker is another machine,
    // and the legitimate clients' latency must not be queued behind thousands of the
    // floods' tasks in the generator (both still share the machine's cores with the server).
    let attack = AttackRuntime(Some(
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("loadgen-flood")
            .enable_all()
            .build()
            .context("the floods' runtime")?,
    ));
    let rss_start_kib = crate::rss_kib(server_pid);
    // Legitimate checks beside the floods, in both runs.
    let tls = argument(arguments, "--tls-url")
        .zip(argument(arguments, "--tls-ca"))
        .and_then(|(url, ca)| Some((url, std::fs::read(ca).ok()?)));
    if let Some((tls_url, ca)) = tls.clone() {
        floods.push(tokio::spawn(edge_floods::tls_health(
            tls_url,
            ca,
            edge.clone(),
            stop.clone(),
        )));
    }
    let proxied = argument(arguments, "--proxy-port").and_then(|port| port.parse::<u16>().ok());
    if let Some(port) = proxied {
        floods.push(tokio::spawn(edge_floods::slow_backend(port, stop.clone())));
        floods.push(tokio::spawn(edge_floods::proxy_legit(
            server,
            edge.clone(),
            stop.clone(),
        )));
    }
    if with_floods {
        // Issue 25's floods, each from addresses of its own.
        if runs("drip") {
            floods.push(attack.spawn(edge_floods::drip(
                flood_address(40),
                server,
                200,
                edge.clone(),
                stop.clone(),
            )));
        }
        if let Some((tls_url, _)) = tls.as_ref().filter(|_| runs("tls_stall")) {
            let tls_server: SocketAddr = tls_url
                .trim_start_matches("https://")
                .parse()
                .context("--tls-url must be https://<ip>:<port>")?;
            floods.push(attack.spawn(edge_floods::tls_stall(
                flood_address(41),
                tls_server,
                600,
                edge.clone(),
                stop.clone(),
            )));
        }
        if runs("pipeliner") {
            floods.push(attack.spawn(edge_floods::pipeliner(
                flood_address(42),
                server,
                50,
                edge.clone(),
                stop.clone(),
            )));
        }
        let crowd: Vec<String> = (0..8).map(|index| format!("crowd:{index}")).collect();
        if runs("presence") {
            floods.push(attack.spawn(edge_floods::presence_crowd(
                vec![flood_address(43), flood_address(44)],
                server,
                crowd.clone(),
                100,
                stop.clone(),
            )));
            floods.push(attack.spawn(edge_floods::presence_poller(
                flood_address(45),
                server,
                crowd,
                edge.clone(),
                stop.clone(),
            )));
        }
        let heavy = format!("heavy-{}", fastrand::u32(..));
        let heavy_epoch = if runs("heavy_poller") {
            edge_floods::heavy_channel(&http, url, &heavy).await
        } else {
            None
        };
        if let Some(epoch) = heavy_epoch {
            for index in 0..4 {
                floods.push(attack.spawn(edge_floods::heavy_poller(
                    flood_address(46 + index),
                    server,
                    heavy.clone(),
                    epoch.clone(),
                    250,
                    edge.clone(),
                    stop.clone(),
                )));
            }
        }
        if runs("refresher") {
            floods.push(attack.spawn(edge_floods::refresher(
                flood_address(50),
                server,
                50,
                edge.clone(),
                stop.clone(),
            )));
        }
        if proxied.is_some() && runs("proxy_hog") {
            floods.push(attack.spawn(edge_floods::proxy_hog(
                flood_address(51),
                server,
                edge.clone(),
                stop.clone(),
            )));
        }
        for index in 0..2 {
            if runs("oversized") {
                floods.push(attack.spawn(oversized(
                    flood_address(index),
                    server,
                    counts.clone(),
                    stop.clone(),
                )));
            }
            if runs("anonymous_publisher") {
                floods.push(attack.spawn(anonymous_publisher(
                    flood_address(10 + index),
                    server,
                    channel.clone(),
                    counts.clone(),
                    stop.clone(),
                )));
            }
            if runs("sprayer") {
                floods.push(attack.spawn(sprayer(
                    flood_address(20 + index),
                    server,
                    counts.clone(),
                    stop.clone(),
                )));
            }
            if runs("pinger") {
                floods.push(attack.spawn(pinger(
                    flood_address(30 + index),
                    server,
                    counts.clone(),
                    stop.clone(),
                )));
            }
        }
        // Up to 4,500 idle connections from 30 addresses, 150 each (within an address's
        // burst): past the run's global cap.
        if runs("connection_flood") {
            floods.push(attack.spawn(connection_flood(
                100,
                30,
                150,
                server,
                counts.clone(),
                stop.clone(),
            )));
        }
        // Let the floods reach their limits before measuring.
        tokio::time::sleep(Duration::from_secs(2)).await;
    }

    let cpu_before = cpu_seconds(server_pid);
    // The generator's own CPU over the same window: on a small machine the floods' CPU is
    // taken from the server's, and the figures say how much.
    let own_cpu_before = cpu_seconds(std::process::id());
    let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    let mut published = 0u64;
    let mut publish_failures = 0u64;
    let mut health_ms = Vec::new();
    let started = Instant::now();
    while published < expected {
        ticker.tick().await;
        match publish(&http, url, &channel).await {
            Ok(()) => published += 1,
            Err(_) => publish_failures += 1,
        }
        if published.is_multiple_of(rate) {
            let asked = Instant::now();
            let healthy = http
                .get(format!("{url}/healthz"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .is_ok_and(|response| response.status().is_success());
            health_ms.push(if healthy {
                asked.elapsed().as_secs_f64() * 1000.0
            } else {
                5000.0
            });
        }
        if started.elapsed() > Duration::from_secs(seconds * 3 + 30) {
            bail!("publishing {expected} events at {rate}/s took too long");
        }
    }
    // Give the last events time to arrive.
    let deadline = Instant::now() + Duration::from_secs(10);
    while tally.finished.load(Ordering::Relaxed) < subscribers as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu = cpu_seconds(server_pid) - cpu_before;
    let own_cpu = cpu_seconds(std::process::id()) - own_cpu_before;
    let window_seconds = started.elapsed().as_secs_f64();
    let _ = stop_sender.send(true);
    for flood in floods {
        let _ = tokio::time::timeout(Duration::from_secs(10), flood).await;
    }
    drop(attack);
    // The floods' sockets are gone: wait for the server to see them go, then read what it
    // still holds.
    let settle = Instant::now() + Duration::from_secs(30);
    while Instant::now() < settle {
        let sockets = crate::server_metric(&http, url, "resync_sockets_open").await;
        if sockets.is_some_and(|sockets| sockets <= subscribers as u64 + 20) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The allocator gives freed memory back every 2 s (resync-server's memory.rs): the
    // lowest of 5 s of samples.
    let mut rss_after_kib = crate::rss_kib(server_pid);
    let sampled = Instant::now() + Duration::from_secs(5);
    while Instant::now() < sampled {
        tokio::time::sleep(Duration::from_millis(200)).await;
        rss_after_kib = rss_after_kib.min(crate::rss_kib(server_pid));
    }
    let delivered = tally.delivered.load(Ordering::Relaxed);
    let lost = (published * subscribers as u64).saturating_sub(delivered);
    let mut latencies = std::mem::take(&mut *tally.latencies.lock().unwrap());
    latencies.sort_unstable();
    health_ms.sort_by(f64::total_cmp);
    for task in tasks {
        task.abort();
    }
    let count = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
    Ok(serde_json::json!({
        "scenario": "flood",
        "floods": with_floods,
        "subscribers": subscribers,
        "published": published,
        "publish_failures": publish_failures,
        "lost": lost,
        "latency_p50_us": percentile(&latencies, 0.5),
        "latency_p99_us": percentile(&latencies, 0.99),
        "health_max_ms": health_ms.last().copied().unwrap_or(0.0),
        "server_peak_rss_kib": peak_rss_kib(server_pid),
        "server_cpu_seconds": cpu,
        "loadgen_cpu_seconds": own_cpu,
        "window_seconds": window_seconds,
        "oversized_closed_1009": count(&counts.oversized_closed_1009),
        "oversized_bytes_written": count(&counts.oversized_bytes_written),
        "anonymous_publishes": count(&counts.anonymous_publishes),
        "anonymous_errors": count(&counts.anonymous_errors),
        "spray_followed": count(&counts.spray_followed),
        "spray_refused": count(&counts.spray_refused),
        "flood_admitted": count(&counts.flood_admitted),
        "flood_refused": count(&counts.flood_refused),
        "pingers_reaped": count(&counts.pingers_reaped),
        "server_rss_start_kib": rss_start_kib,
        "server_rss_after_kib": rss_after_kib,
        "drips_closed": count(&edge.drips_closed),
        "tls_stalls_closed": count(&edge.tls_stalls_closed),
        "tls_health_ok": count(&edge.tls_health_ok),
        "tls_health_failed": count(&edge.tls_health_failed),
        "pipelines_opened": count(&edge.pipelines_opened),
        "presence_polls": count(&edge.presence_polls),
        "presence_reply_max_bytes": count(&edge.presence_reply_max_bytes),
        "heavy_polls": count(&edge.heavy_polls),
        "refreshes_sent": count(&edge.refreshes_sent),
        "refreshes_rationed": count(&edge.refreshes_rationed),
        "proxy_hogs": count(&edge.proxy_hogs),
        "proxy_legit_allowed": count(&edge.proxy_legit_allowed),
        "proxy_legit_refused": count(&edge.proxy_legit_refused),
        "proxy_legit_server_full": count(&edge.proxy_legit_server_full),
    }))
}
