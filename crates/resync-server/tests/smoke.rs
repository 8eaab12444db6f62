//! Smoke test of the built binary, as a new user would try it: start it, follow a channel with
//! `curl -N`, publish with `curl`, see the event; then SIGTERM stops it within its deadline.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server process, killed if the test ends early (a failed assertion), so a failing run
/// leaves no server behind.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn binary_serves_curl_subscribers_and_stops_on_sigterm() {
    // A new user's first start: an empty data directory for the default (disk) broker.
    let data_dir = tempfile::tempdir().unwrap();
    let mut server = Server(
        Command::new(env!("CARGO_BIN_EXE_resync-server"))
            .arg("--data-dir")
            .arg(data_dir.path().join("data"))
            .args([
                "--listen",
                "127.0.0.1:0",
                "--api-key",
                "smoke-api-key-0123456789",
                "--shutdown-timeout-secs",
                "5",
            ])
            .env("RESYNC_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut stdout = BufReader::new(server.0.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let base = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap()
        .to_owned();

    let mut curl = Command::new("curl")
        .args([
            "-sN",
            "--max-time",
            "10",
            &format!("{base}/sse?channel=smoke"),
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("curl is installed (.ci/run installs it)");
    // Wait until the stream is open, i.e. curl is subscribed.
    let info = format!("{base}/api/channels/smoke");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let output = Command::new("curl")
            .args([
                "-s",
                "-H",
                "Authorization: Bearer smoke-api-key-0123456789",
                &info,
            ])
            .output()
            .unwrap();
        if String::from_utf8_lossy(&output.stdout).contains("\"subscribers\":1") {
            break;
        }
        assert!(Instant::now() < deadline, "curl never subscribed");
        std::thread::sleep(Duration::from_millis(50));
    }
    let published = Command::new("curl")
        .args([
            "-s",
            "-X",
            "POST",
            "-H",
            "Authorization: Bearer smoke-api-key-0123456789",
            "-d",
            r#"{"channel":"smoke","data":{"hello":"world"}}"#,
            &format!("{base}/api/publish"),
        ])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&published.stdout).contains("\"seq\":1"));

    // SIGTERM: the server tells clients to reconnect and exits within its deadline.
    let stopped_at = Instant::now();
    Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap();
    let status = server.0.wait().unwrap();
    assert!(status.success(), "{status}");
    assert!(
        stopped_at.elapsed() < Duration::from_secs(8),
        "stopped within the deadline"
    );

    let mut received = String::new();
    curl.stdout
        .take()
        .unwrap()
        .read_to_string(&mut received)
        .unwrap();
    curl.wait().unwrap();
    assert!(
        received.contains(r#""data":{"hello":"world"}"#),
        "curl got: {received}"
    );
    assert!(
        received.contains("retry:"),
        "the stream ended with a retry hint: {received}"
    );
}
