//! Issue 25, "safe on the internet again": the defects of the edge (every socket before,
//! between and under its requests), each seen from outside with a raw client, and named after
//! its item (`item_N_…`). The server runs as its own process, configured through `RESYNC_*`
//! variables, so its memory is its own and each test runs unchanged against any build.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::time::Duration;

use resync_tests::attack::{address, closed_within, connect_from, get_on, metric};
use resync_tests::certificate::TestCertificate;
use resync_tests::server_process::ServerProcess;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Per-address limits that one test address can reach (the process fixture lifts them
/// unless the connection rate is given).
const ADDRESS_LIMITS: [&str; 6] = [
    "--max-connections-per-ip",
    "20",
    "--connections-per-ip-per-second",
    "1000",
    "--connection-burst-per-ip",
    "1000",
];

#[tokio::test]
async fn item_1_a_keep_alive_request_dripped_a_byte_at_a_time_is_closed_on_both_listeners() {
    let server = ServerProcess::start_with_env(
        &["--api-listen", "127.0.0.1:0"],
        &[("RESYNC_REQUEST_HEADER_TIMEOUT_SECS", "2")],
    );
    for (listener, target) in [
        ("main", server.address),
        ("api", server.api_address.unwrap()),
    ] {
        let mut stream = TcpStream::connect(target).await.unwrap();
        assert_eq!(
            get_on(&mut stream, "/healthz").await,
            Some(200),
            "{listener}"
        );
        // The next request's head, one byte every 300 ms, never finished: a slowloris that
        // passed the first request's deadline.
        let drip = b"GET /healthz HTTP/1.1\r\nX-Drip: "
            .iter()
            .chain(std::iter::repeat(&b'a'))
            .take(100);
        let mut closed = false;
        let mut dripped = 0;
        for byte in drip {
            if stream.write_all(&[*byte]).await.is_err() {
                closed = true;
                break;
            }
            dripped += 1;
            if closed_within(&mut stream, Duration::from_millis(300)).await {
                closed = true;
                break;
            }
        }
        assert!(
            closed,
            "{listener}: still open after {dripped} bytes dripped over 30 s (header deadline 2 s)"
        );
    }
}

#[tokio::test]
async fn item_1_every_socket_counts_against_its_address_from_accept_on_both_listeners() {
    let mut arguments = ADDRESS_LIMITS.to_vec();
    arguments.extend(["--api-listen", "127.0.0.1:0"]);
    let server = ServerProcess::start(&arguments);
    for (index, (listener, target)) in [
        ("main", server.address),
        ("api", server.api_address.unwrap()),
    ]
    .into_iter()
    .enumerate()
    {
        // One address opens 60 keep-alive connections, one request each, and keeps them: only
        // its first 36 sockets may exist at all, whatever they carry (its 20 connections,
        // and the margin of 16 in which a client past its streams is still told why).
        let attacker = address(10 + index as u32);
        let mut held = Vec::new();
        let mut answered = 0;
        for _ in 0..60 {
            let Ok(mut stream) = connect_from(attacker, target).await else {
                continue;
            };
            if get_on(&mut stream, "/healthz").await == Some(200) {
                answered += 1;
            }
            held.push(stream);
        }
        assert_eq!(
            answered, 36,
            "{listener}: one address had {answered} keep-alive connections answered"
        );
        // Another address is served meanwhile.
        let mut other = connect_from(address(20 + index as u32), target)
            .await
            .unwrap();
        assert_eq!(
            get_on(&mut other, "/healthz").await,
            Some(200),
            "{listener}"
        );
        drop(held);
    }
}

#[tokio::test]
async fn item_2_idle_tls_handshakes_from_one_address_leave_https_answering() {
    let certificate = TestCertificate::new();
    let cert = certificate.cert_path.to_string_lossy().into_owned();
    let key = certificate.key_path.to_string_lossy().into_owned();
    let server = ServerProcess::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--workers",
        "1",
        "--api-listen",
        "127.0.0.1:0",
    ]);
    assert!(server.base_url.starts_with("https://"));
    // 600 TCP connections from one address that never start their handshake, reopened as the
    // server drops them, for as long as the test runs.
    let target = server.address;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let (held_sender, mut held) = tokio::sync::watch::channel(0usize);
    let flood = tokio::spawn(async move {
        let mut sockets: Vec<TcpStream> = Vec::new();
        while !*stopped.borrow() {
            // Open, with nothing to read: still holding a place.
            sockets.retain(|socket| {
                let mut byte = [0u8; 1];
                socket
                    .try_read(&mut byte)
                    .is_err_and(|error| error.kind() == std::io::ErrorKind::WouldBlock)
            });
            while sockets.len() < 600 {
                match connect_from(address(30), target).await {
                    Ok(socket) => sockets.push(socket),
                    Err(_) => break,
                }
            }
            held_sender.send_replace(sockets.len());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    held.wait_for(|count| *count >= 600).await.unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(certificate.pem.as_bytes()).unwrap())
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap();
    let mut answered = 0;
    for _ in 0..4 {
        let response = https
            .get(format!("{}/healthz", server.base_url))
            .send()
            .await;
        if response.is_ok_and(|response| response.status().is_success()) {
            answered += 1;
        }
    }
    stop.send_replace(true);
    flood.await.unwrap();
    assert_eq!(
        answered, 4,
        "https requests answered beside the handshake flood"
    );
}

#[tokio::test]
async fn item_3_pipelined_requests_on_connections_that_never_read_cost_a_bound() {
    let server = ServerProcess::start(&[]);
    let before = server.rss_kib();
    // 20 connections from one address, each pipelining GETs of the 30 KB browser client and
    // never reading a response. The client sets a small receive buffer so its window closes.
    let request = b"GET /client/resync.js HTTP/1.1\r\nHost: test\r\n\r\n";
    let mut attackers = Vec::new();
    for _ in 0..20 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        socket
            .bind(std::net::SocketAddr::new(address(40), 0))
            .unwrap();
        let mut stream = socket.connect(server.address).await.unwrap();
        attackers.push(tokio::spawn(async move {
            // 64 KiB of requests (about 1,400): what the kernel's buffers take without the
            // server reading; then the connection is held open.
            let burst: Vec<u8> = request.repeat(65_536 / request.len());
            let _ = stream.write_all(&burst).await;
            stream
        }));
    }
    let mut streams = Vec::new();
    for attacker in attackers {
        streams.push(attacker.await.unwrap());
    }
    // The server either holds the pipelined requests back (and says so), or decodes them and
    // grows: whichever comes first.
    let limit_kib = 48 * 1024;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let grown = server.rss_kib().saturating_sub(before);
        assert!(
            grown < limit_kib,
            "the server grew by {grown} KiB for 20 connections pipelining requests"
        );
        let held = metric(
            &server.metrics().await,
            "resync_pipelined_requests_held_total",
        )
        .unwrap_or(0);
        if held >= 20 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "pipelined requests were neither held back nor refused ({held} held)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = server.rss_kib().saturating_sub(before);
    assert!(grown < limit_kib, "grew by {grown} KiB");
    drop(streams);
}

#[tokio::test]
async fn item_9_a_tls_sse_client_that_leaves_is_seen_at_once() {
    let certificate = TestCertificate::new();
    let cert = certificate.cert_path.to_string_lossy().into_owned();
    let key = certificate.key_path.to_string_lossy().into_owned();
    // No heartbeat for ten minutes: only the connection itself can tell.
    let server = ServerProcess::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--sse-heartbeat-secs",
        "600",
        "--api-listen",
        "127.0.0.1:0",
    ]);
    let connector = resync_tests::attack::tls_connector(&certificate.pem);
    let tcp = TcpStream::connect(server.address).await.unwrap();
    let mut tls = connector
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /sse?channel=tls-leaves HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let open = |metrics: &str| metric(metrics, "resync_open_connections{transport=\"sse\"}");
    wait_for(
        &server,
        |metrics| open(metrics) == Some(1),
        "the stream opens",
    )
    .await;
    // A polite goodbye, as browsers say it: TLS close_notify, then the end of the stream.
    tls.shutdown().await.unwrap();
    wait_for(
        &server,
        |metrics| open(metrics) == Some(0),
        "the server sees the TLS client leave without a heartbeat",
    )
    .await;
    drop(tls);
}

#[tokio::test]
async fn item_9_a_tls_client_that_stops_reading_is_dropped_by_the_write_deadline() {
    let certificate = TestCertificate::new();
    let cert = certificate.cert_path.to_string_lossy().into_owned();
    let key = certificate.key_path.to_string_lossy().into_owned();
    let server = ServerProcess::start(&[
        "--tls-cert",
        &cert,
        "--tls-key",
        &key,
        "--write-timeout-secs",
        "1",
        "--api-listen",
        "127.0.0.1:0",
    ]);
    let connector = resync_tests::attack::tls_connector(&certificate.pem);
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(server.address).await.unwrap();
    let mut tls = connector
        .connect("127.0.0.1".try_into().unwrap(), tcp)
        .await
        .unwrap();
    tls.write_all(b"GET /sse?channel=tls-stuck HTTP/1.1\r\nHost: test\r\n\r\n")
        .await
        .unwrap();
    let open = |metrics: &str| metric(metrics, "resync_open_connections{transport=\"sse\"}");
    wait_for(
        &server,
        |metrics| open(metrics) == Some(1),
        "the stream opens",
    )
    .await;
    // Events the client never reads: its window closes, what the server sent stays
    // unacknowledged, and the kernel's deadline (twice the write timeout) ends it.
    let http = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(certificate.pem.as_bytes()).unwrap())
        .build()
        .unwrap();
    let big = "x".repeat(60_000);
    for _ in 0..40 {
        let response = http
            .post(format!("{}/api/publish", server.base_url))
            .bearer_auth("test-api-key-0123456789")
            .json(&serde_json::json!({ "channel": "tls-stuck", "data": big }))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_success());
    }
    wait_for(
        &server,
        |metrics| open(metrics) == Some(0),
        "the stuck TLS client is dropped",
    )
    .await;
    drop(tls);
}

/// Polls `/metrics` until `done` says so (30 s at most).
async fn wait_for(server: &ServerProcess, done: impl Fn(&str) -> bool, what: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = server.metrics().await;
        if done(&metrics) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn l3_a_one_byte_close_payload_or_a_non_utf8_close_reason_closes_1002() {
    use resync_tests::raw_ws::{RawEnd, RawWs};
    let server = ServerProcess::start(&[]);
    let mut non_utf8 = 1000u16.to_be_bytes().to_vec();
    non_utf8.extend_from_slice(&[0xC3, 0x28]);
    for (case, frame) in [
        (
            "a close payload of one byte",
            RawWs::frame(0x88, 1, &[0x03]),
        ),
        (
            "a close reason that is not UTF-8",
            RawWs::frame(0x88, 4, &non_utf8),
        ),
    ] {
        let mut client = RawWs::connect(server.address, "").await.unwrap();
        client.send(&frame).await.unwrap();
        assert_eq!(
            client.close_code(Duration::from_secs(10)).await,
            RawEnd::Closed(1002),
            "{case}"
        );
    }
}

#[tokio::test]
async fn l4_a_message_flood_that_keeps_under_a_run_of_refusals_is_closed() {
    use resync_tests::raw_ws::{RawEnd, RawWs};
    let server =
        ServerProcess::start(&["--ws-messages-per-second", "20", "--ws-message-burst", "20"]);
    let mut client = RawWs::connect(server.address, "").await.unwrap();
    // Three times the rate, for up to 15 s: every third message gets a token, so refusals
    // never run past the burst in a row, while two of every three are refused.
    let pong = RawWs::frame(0x81, 15, br#"{"type":"pong"}"#);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut end = RawEnd::Silent;
    while tokio::time::Instant::now() < deadline {
        if client.send(&pong).await.is_err() {
            end = client.close_code(Duration::from_secs(5)).await;
            break;
        }
        end = client.close_code(Duration::from_millis(16)).await;
        if end != RawEnd::Silent {
            break;
        }
    }
    assert_eq!(end, RawEnd::Closed(4100), "the flood was never closed");
}
