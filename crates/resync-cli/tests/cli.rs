//! The `resync` CLI against a real server: `subscribe` prints JSON lines, `publish` stores
//! events.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

/// A reference server with its data in `dir` and the tests' API key; it ends with the test
/// process.
fn server_in(dir: &std::path::Path) -> resync_server::RunningServer {
    let (server, _thread) = resync_server::start(resync_server::Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.join("data"),
        api_key: Some("cli-api-key-0123456789".to_owned()),
        workers: Some(1),
        ..resync_server::Settings::default()
    })
    .unwrap();
    server
}

#[test]
fn cli_subscribe_prints_what_cli_publish_sends() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = server_in(data_dir.path());
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

/// A `resync subscribe` process whose printed lines arrive on a channel.
struct Subscriber {
    child: std::process::Child,
    lines: std::sync::mpsc::Receiver<serde_json::Value>,
}

impl Subscriber {
    fn start(base: &str, arguments: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_resync"))
            .args(["--url", base, "subscribe"])
            .args(arguments)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if sender.send(serde_json::from_str(&line).unwrap()).is_err() {
                    break;
                }
            }
        });
        Self { child, lines }
    }

    /// The `n` values of the next `count` lines.
    fn next(&self, count: usize) -> Vec<u64> {
        (0..count)
            .map(|_| {
                let line = self
                    .lines
                    .recv_timeout(std::time::Duration::from_secs(30))
                    .expect("a line in time");
                line["data"]["n"].as_u64().unwrap()
            })
            .collect()
    }

    /// Waits for the process to end by itself, successfully.
    fn exits(mut self) {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "{status}");
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the subscriber did not exit"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_subscriber_with_a_state_file_continues_where_it_stopped_on_every_transport() {
    let data_dir = tempfile::tempdir().unwrap();
    let server = server_in(data_dir.path());
    let base = server.base_url();
    let state = data_dir.path().join("positions");
    let state = state.to_str().unwrap();
    let publish = |n: u64| -> String {
        let output = Command::new(env!("CARGO_BIN_EXE_resync"))
            .args([
                "--url",
                &base,
                "publish",
                "kept",
                &format!(r#"{{"n":{n}}}"#),
            ])
            .env("RESYNC_API_KEY", "cli-api-key-0123456789")
            .output()
            .unwrap();
        assert!(output.status.success());
        let reply: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        reply["position"]["epoch"].as_str().unwrap().to_owned()
    };
    let epoch = publish(1);
    for n in 2..=5 {
        publish(n);
    }
    // The first run starts at the beginning and stops after three lines.
    let since = format!("kept:{epoch}:0");
    let first = Subscriber::start(
        &base,
        &[
            "kept",
            "--since",
            &since,
            "--state-file",
            state,
            "--count",
            "3",
        ],
    );
    assert_eq!(first.next(3), [1, 2, 3]);
    first.exits();
    // The next run (over SSE) continues after 3, with what came meanwhile.
    publish(6);
    let second = Subscriber::start(
        &base,
        &[
            "kept",
            "--state-file",
            state,
            "--count",
            "3",
            "--transport",
            "sse",
        ],
    );
    assert_eq!(second.next(3), [4, 5, 6]);
    second.exits();
    // A run (over long polling) stopped by SIGTERM keeps the position of what it printed.
    let third = Subscriber::start(
        &base,
        &["kept", "--state-file", state, "--transport", "long-polling"],
    );
    publish(7);
    assert_eq!(third.next(1), [7]);
    let terminated = Command::new("kill")
        .args(["-TERM", &third.child.id().to_string()])
        .status()
        .unwrap();
    assert!(terminated.success());
    third.exits();
    publish(8);
    let fourth = Subscriber::start(
        &base,
        &[
            "kept",
            "--state-file",
            state,
            "--count",
            "1",
            "--transport",
            "websocket",
        ],
    );
    assert_eq!(
        fourth.next(1),
        [8],
        "nothing printed twice, nothing skipped"
    );
    fourth.exits();
    drop(server);
}
