//! The `resync` CLI against a real server: `subscribe` prints JSON lines, `publish` stores
//! events.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

#[test]
fn cli_subscribe_prints_what_cli_publish_sends() {
    let data_dir = tempfile::tempdir().unwrap();
    let (server, _thread) = resync_server::start(resync_server::Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.path().join("data"),
        api_key: Some("cli-api-key-0123456789".to_owned()),
        workers: Some(1),
        ..resync_server::Settings::default()
    })
    .unwrap();
    let base = server.base_url();

    let publish = |data: &str| {
        let output = Command::new(env!("CARGO_BIN_EXE_resync"))
            .args(["--url", &base, "publish", "cli", data])
            .env("RESYNC_API_KEY", "cli-api-key-0123456789")
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    };
    // Published before the subscriber starts: it resumes from seq 0 of the channel's epoch.
    let first = publish(r#"{"n":1}"#);
    let position: serde_json::Value = serde_json::from_str(&first).unwrap();
    let epoch = position["position"]["epoch"].as_str().unwrap().to_owned();

    let mut subscriber = Command::new(env!("CARGO_BIN_EXE_resync"))
        .args([
            "--url",
            &base,
            "subscribe",
            "cli",
            "--count",
            "2",
            "--since",
            &format!("cli:{epoch}:0"),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    publish(r#"{"n":2}"#);
    let lines: Vec<serde_json::Value> = BufReader::new(subscriber.stdout.take().unwrap())
        .lines()
        .map(|line| serde_json::from_str(&line.unwrap()).unwrap())
        .collect();
    assert!(subscriber.wait().unwrap().success());
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["data"]["n"], 1);
    assert_eq!(lines[1]["data"]["n"], 2);
    assert_eq!(lines[1]["seq"], 2);
    assert_eq!(lines[1]["cursor"], format!("cli:{epoch}:2"));
    // The server thread ends with the test process.
    drop(server);
}

#[test]
fn cli_help_describes_the_cli() {
    let output = Command::new(env!("CARGO_BIN_EXE_resync"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8(output.stdout).unwrap();
    assert!(
        help.contains("subscribe") && help.contains("publish"),
        "{help}"
    );
    assert!(
        !help.contains("reference server"),
        "the server's description is not the CLI's: {help}"
    );
}
