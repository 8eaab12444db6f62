//! Issue 26: on the disk broker a deploy (SIGTERM, a new process on the same port and data
//! directory) and a crash (`kill -9`) lose nothing and reset no one, on every transport; a
//! power cut that took acknowledged publishes turns into resets, never into reused seqs.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use resync_client::{ConnectionState, TransportChoice, TransportKind};
use resync_protocol::{Channel, Position};
use resync_tests::server_process::ServerProcess;
use resync_tests::{TEST_API_KEY, collect_seqs, fast_client};

const EVENTS: u64 = 600;

fn disk_server(data_dir: &str, listen: &str, extra: &[&str]) -> ServerProcess {
    let mut arguments = vec![
        "--broker",
        "disk",
        "--data-dir",
        data_dir,
        "--listen",
        listen,
    ];
    arguments.extend_from_slice(extra);
    ServerProcess::start(&arguments)
}

/// Publishes `n` until the server acknowledges it (a refused or failed publish is retried
/// with the same idempotency key, as a backend would, so none is stored twice).
async fn publish_until_acknowledged(
    http: &reqwest::Client,
    base: &str,
    channel: &str,
    n: u64,
) -> Position {
    loop {
        let sent = http
            .post(format!("{base}/api/publish"))
            .bearer_auth(TEST_API_KEY)
            .json(&serde_json::json!({"channel": channel, "data": {"n": n}, "idempotency_key": format!("n-{n}")}))
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        if let Ok(response) = sent
            && response.status().is_success()
        {
            let body: serde_json::Value = response.json().await.expect("a publish answer");
            return serde_json::from_value(body["position"].clone()).expect("a position");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Counts the connections a client makes (its first and every reconnect).
fn count_connections(client: &resync_client::Client) -> Arc<AtomicU64> {
    let count = Arc::new(AtomicU64::new(0));
    let mut state = client.state();
    let counted = count.clone();
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            if matches!(*state.borrow(), ConnectionState::Connected { .. }) {
                counted.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    count
}

async fn wait_until(acknowledged: &AtomicU64, at_least: u64) {
    while acknowledged.load(Ordering::Relaxed) < at_least {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_26_a_deploy_and_a_kill_on_the_disk_broker_lose_nothing_and_reset_no_one() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data_dir = dir.path().join("data");
    let data_dir = data_dir.to_str().expect("a UTF-8 path");
    let mut server = disk_server(data_dir, "127.0.0.1:0", &[]);
    let address = server.address.to_string();
    let base = server.base_url.clone();
    let channel = "orders:deploy";
    let http = reqwest::Client::new();
    let start = resync_tests::channel_position(&http, &base, TEST_API_KEY, channel).await;

    let mut readers = Vec::new();
    let mut clients = Vec::new();
    for kind in [
        TransportKind::WebSocket,
        TransportKind::Sse,
        TransportKind::LongPolling,
    ] {
        let client = fast_client(&base, TransportChoice::Only(kind));
        let connections = count_connections(&client);
        let subscription = client
            .subscribe(Channel::new(channel).expect("valid"))
            .since(start.clone());
        let label = format!("{kind:?}");
        readers.push(tokio::spawn(async move {
            collect_seqs(subscription, EVENTS, &label).await
        }));
        clients.push((kind, client, connections));
    }

    let acknowledged = Arc::new(AtomicU64::new(0));
    let publisher = {
        let acknowledged = acknowledged.clone();
        let base = base.clone();
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut positions = Vec::new();
            for n in 1..=EVENTS {
                positions.push(publish_until_acknowledged(&http, &base, channel, n).await);
                acknowledged.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            positions
        })
    };

    // A deploy: SIGTERM while the backend publishes, then a new process on the same port and
    // data directory.
    wait_until(&acknowledged, EVENTS / 3).await;
    server.terminate();
    assert!(
        server.wait_for_exit(Duration::from_secs(20)),
        "the first process did not exit: {}",
        server.report()
    );
    let mut server = disk_server(data_dir, &address, &[]);
    // A crash: kill -9, then a new process.
    wait_until(&acknowledged, 2 * EVENTS / 3).await;
    server.kill();
    let server = disk_server(data_dir, &address, &[]);

    let positions = publisher.await.expect("the publisher finishes");
    let seqs: Vec<u64> = positions
        .iter()
        .map(|position| position.seq.get())
        .collect();
    assert_eq!(
        seqs,
        (1..=EVENTS).collect::<Vec<_>>(),
        "each publish stored once, in order"
    );
    assert!(
        positions
            .iter()
            .all(|position| position.epoch == start.epoch),
        "the epoch outlived both restarts"
    );
    for reader in readers {
        // collect_seqs fails on any reset.
        let seen = reader.await.expect("a reader finishes");
        assert_eq!(
            seen,
            (1..=EVENTS).collect::<Vec<_>>(),
            "every event exactly once, in order"
        );
    }
    for (kind, _client, connections) in &clients {
        let connections = connections.load(Ordering::Relaxed);
        assert!(
            connections >= 3,
            "{kind:?} connected {connections} times: the restarts did not cut it"
        );
    }
    drop(server);
}

/// What a power cut does to a store under `--durability periodic`: the disk keeps an older
/// state than the process acknowledged. The test copies the data directory (what the disk
/// had), publishes more, kills the process, puts the copy back, and starts a new process in
/// "another boot".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_26_after_a_power_cut_clients_behind_the_lost_tail_get_a_reset_never_reused_seqs() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().join("data");
    let synced = dir.path().join("synced");
    let data_dir = data.to_str().expect("a UTF-8 path");
    let channel = "orders:power";
    let http = reqwest::Client::new();
    let mut server = disk_server(
        data_dir,
        "127.0.0.1:0",
        &["--boot-id", "boot-1", "--sync-interval-ms", "3600000"],
    );
    let address = server.address.to_string();
    let base = server.base_url.clone();
    for n in 1..=10 {
        publish_until_acknowledged(&http, &base, channel, n).await;
    }
    copy_tree(&data, &synced);
    let mut last = None;
    for n in 11..=20 {
        last = Some(publish_until_acknowledged(&http, &base, channel, n).await);
    }
    let last = last.expect("published");
    server.kill();
    std::fs::remove_dir_all(&data).expect("the data directory goes");
    std::fs::rename(&synced, &data).expect("what the disk kept comes back");
    let server = disk_server(data_dir, &address, &["--boot-id", "boot-2"]);

    for since in [
        last.clone(),
        Position::new(last.epoch.clone(), resync_protocol::Seq::new(5)),
    ] {
        let history: serde_json::Value = http
            .get(format!(
                "{base}/api/history?channel={channel}&since={}:{}",
                since.epoch,
                since.seq.get()
            ))
            .bearer_auth(TEST_API_KEY)
            .send()
            .await
            .expect("history answers")
            .json()
            .await
            .expect("json");
        assert_eq!(
            history["outcome"], "reset",
            "a client at {since:?}: {history}"
        );
        assert_eq!(history["reason"], "epoch_changed", "{history}");
        // An SSE client resuming from there is told the same.
        let last_event_id = format!("{channel}:{}:{}", since.epoch, since.seq.get());
        let mut sse = resync_tests::SseClient::connect_to(
            &base,
            &format!("?channel={channel}"),
            Some(&last_event_id),
        )
        .await;
        assert_eq!(
            sse.next_event().await.expect("an event").event,
            "subscribed"
        );
        let reset = sse.next_event().await.expect("an event");
        assert_eq!(reset.event, "reset", "{reset:?}");
    }
    let next = publish_until_acknowledged(&http, &base, channel, 21).await;
    assert_ne!(
        next.epoch, last.epoch,
        "the seqs of the lost tail are never given out again in its epoch"
    );
    drop(server);
}

fn copy_tree(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("a directory");
    for entry in std::fs::read_dir(from).expect("readable") {
        let entry = entry.expect("an entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a type").is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copied");
        }
    }
}

/// One process per data directory: a second one is refused with a plain message, or, in a
/// deploy, waits while the previous one drains and then takes over its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issue_26_a_second_process_on_a_data_directory_waits_for_the_first_or_is_refused_plainly() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let data = dir.path().join("data");
    let data_dir = data.to_str().expect("a UTF-8 path").to_owned();
    let mut first = disk_server(&data_dir, "127.0.0.1:0", &[]);
    let http = reqwest::Client::new();
    let published = publish_until_acknowledged(&http, &first.base_url, "orders:lock", 1).await;

    let refused = std::process::Command::new(resync_tests::server_process::server_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_dir,
            "--data-dir-wait-secs",
            "0",
        ])
        .env("RESYNC_API_KEY", TEST_API_KEY)
        .output()
        .expect("the server runs");
    assert!(
        !refused.status.success(),
        "a second process on the same data directory started"
    );
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("in use by another process"), "{stderr}");

    // A deploy that starts the next process before the previous one has gone.
    let log = dir.path().join("second.log");
    let mut second = std::process::Command::new(resync_tests::server_process::server_binary())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            &data_dir,
            "--data-dir-wait-secs",
            "60",
        ])
        .env("RESYNC_API_KEY", TEST_API_KEY)
        .env("RESYNC_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(&log).expect("a log file"))
        .spawn()
        .expect("the server runs");
    // It says it waits, and does: the first process still holds the directory.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("waiting for it")
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the second process never said it waits"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(first.is_running());
    first.terminate();
    assert!(
        first.wait_for_exit(Duration::from_secs(30)),
        "{}",
        first.report()
    );
    let stdout = second.stdout.take().expect("stdout");
    let line = tokio::task::spawn_blocking(move || {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
    })
    .await
    .expect("read")
    .expect("the listening line");
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .expect("listening")
        .to_owned();
    let position = resync_tests::channel_position(&http, &base, TEST_API_KEY, "orders:lock").await;
    let _ = second.kill();
    let _ = second.wait();
    assert_eq!(
        position, published,
        "the second process took over the history"
    );
}
