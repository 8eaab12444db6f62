//! Issue 13, "the first hour of a new user": each test is named after the defect it proves
//! fixed (`defect_N_…`).

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use resync_tests::{JWT_SECRET, TestServer, WsClient};

#[tokio::test]
async fn defect_5_without_the_demo_the_root_serves_no_demo_page() {
    let plain = TestServer::start(|settings| settings.demo = false);
    let root = plain.http.get(plain.url("/")).send().await.unwrap();
    assert_eq!(root.status().as_u16(), 200);
    let text = root.text().await.unwrap();
    assert!(!text.contains("<html"), "no demo page: {text}");
    assert!(text.contains("/sse"), "says what the server offers: {text}");

    let demo = TestServer::start(|settings| settings.demo = true);
    let page = demo.http.get(demo.url("/")).send().await.unwrap();
    assert!(page.text().await.unwrap().contains("<html"));
}

#[tokio::test]
async fn defect_6_a_websocket_upgrade_without_a_token_gets_401_when_anonymous_clients_may_do_nothing()
 {
    let server = TestServer::start(|settings| {
        settings.jwt_secret = Some(JWT_SECRET.into());
        settings.anonymous_subscribe = Some(vec![]);
    });
    assert_eq!(WsClient::connect(&server.ws_url("")).await.err(), Some(401));
    assert_eq!(
        resync_tests::raw_ws::RawWs::connect(server.server.addresses[0], "")
            .await
            .err(),
        Some(401)
    );
}

#[tokio::test]
async fn defect_7_logs_at_the_default_level_are_plain_text_and_summarised_not_per_request() {
    use std::io::Read;
    use std::process::{Command, Stdio};

    let data_dir = tempfile::tempdir().unwrap();
    let mut server = Command::new(resync_tests::server_process::server_binary())
        .arg("--data-dir")
        .arg(data_dir.path().join("data"))
        .args([
            "--listen",
            "127.0.0.1:0",
            "--api-key",
            "log-api-key-0123456789",
            "--log-summary-secs",
            "1",
        ])
        .env_remove("RESYNC_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(server.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();
    let http = reqwest::Client::new();
    for n in 0..50 {
        let published = http
            .post(format!("{base}/api/publish"))
            .bearer_auth("log-api-key-0123456789")
            .json(&serde_json::json!({ "channel": "logged", "data": n }))
            .send()
            .await
            .unwrap();
        assert!(published.status().is_success());
        let polled = http
            .get(format!("{base}/poll?channel=logged"))
            .send()
            .await
            .unwrap();
        assert!(polled.status().is_success());
    }
    // Past one summary period.
    tokio::time::sleep(std::time::Duration::from_millis(1_500)).await;
    let _ = server.kill();
    let _ = server.wait();
    let mut log = String::new();
    server
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        !log.contains('\u{1b}'),
        "no colour codes when stderr is not a terminal:\n{log}"
    );
    let lines = log.lines().count();
    // 100 requests: at most the start lines, the key warning and a summary or two.
    assert!(lines < 10, "{lines} lines for 100 requests:\n{log}");
    assert!(
        log.lines()
            .any(|line| line.contains("traffic") && line.contains("published=50")),
        "a periodic summary at info:\n{log}"
    );
}

#[tokio::test]
async fn defect_8_metrics_are_openmetrics_with_resets_by_reason_latency_and_namespaces() {
    let server = TestServer::start(|settings| settings.history_size = 2);
    let first = server.publish("chat:room", serde_json::json!(1)).await;
    server.publish_many("chat:room", 2..6).await;
    // A resume from seq 1 after history kept only 2: a truncated reset.
    let mut client = resync_tests::SseClient::connect(
        &server,
        "?channel=chat:room",
        Some(&format!("chat:room:{}:{}", first.epoch, first.seq)),
    )
    .await;
    client.next_event().await.unwrap();
    let response = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/openmetrics-text"),
        "{:?}",
        response.headers()
    );
    let text = response.text().await.unwrap();
    assert!(text.ends_with("# EOF\n"));
    assert!(
        text.contains("resync_resets_total{reason=\"truncated\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("resync_publish_duration_seconds_count 5"),
        "{text}"
    );
    assert!(
        text.contains("resync_namespace_events_published_total{namespace=\"chat\"} 5"),
        "{text}"
    );
    assert!(
        text.contains("resync_open_connections{transport=\"sse\"} 1"),
        "{text}"
    );
    // The gauge and the counter of connections no longer share a name.
    assert!(!text.contains("# TYPE resync_connections gauge"), "{text}");
}
