//! The README's quick start, run as written: the server command, `curl -N` subscribe, `curl`
//! publish with the key, the resume with `Last-Event-ID`, `--help`, and the CLI lines (issue
//! 13, defect 1). The commands are read from README.md itself, so an edit that breaks one
//! breaks this test.
//!
//! They run against 127.0.0.1:8080, as written. Only when that port is taken (another
//! server on this machine) are they pointed at a free one: the address in the commands and
//! `RESYNC_LISTEN` / `RESYNC_URL` change, nothing else.

#![allow(clippy::unwrap_used, reason = "tests fail loudly on any error")]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

const README_ADDRESS: &str = "127.0.0.1:8080";

/// Every command line of the README's `sh` blocks, trailing `  # comments` removed.
fn readme_commands() -> Vec<String> {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("README.md");
    let mut commands = Vec::new();
    let mut in_shell_block = false;
    for line in readme.lines() {
        match line.trim() {
            "```sh" => in_shell_block = true,
            "```" => in_shell_block = false,
            command if in_shell_block && !command.is_empty() => {
                let command = command.split("  #").next().unwrap_or(command).trim_end();
                commands.push(command.to_owned());
            }
            _ => {}
        }
    }
    commands
}

/// The README command that starts with `prefix`.
fn command(prefix: &str) -> String {
    readme_commands()
        .into_iter()
        .find(|command| command.starts_with(prefix))
        .unwrap_or_else(|| panic!("the README has no command starting with {prefix:?}"))
}

/// A command run by bash in its own process group, so that `cargo run` and the program it
/// started end together.
struct Shell {
    child: Child,
    stdout: Receiver<String>,
}

impl Shell {
    fn spawn(command: &str, address: &str) -> Shell {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
        let cargo_directory = std::path::Path::new(&cargo)
            .parent()
            .map(|directory| directory.display().to_string())
            .unwrap_or_default();
        let path = format!(
            "{cargo_directory}:{}",
            std::env::var("PATH").unwrap_or_default()
        );
        let mut child = Command::new("bash")
            .args(["-c", command])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
            .env("PATH", path)
            .env("RESYNC_LISTEN", address)
            // The quick start's data directory, empty for this run (the README's own
            // `./resync-data` would hold a previous run's history).
            .env("RESYNC_DATA_DIR", data_dir())
            .env("RESYNC_URL", format!("http://{address}"))
            .env("RESYNC_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("bash runs");
        let (sender, stdout) = channel();
        let out = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if sender.send(line).is_err() {
                    return;
                }
            }
        });
        // Drained, so a chatty stderr (cargo's progress) never blocks the child.
        let mut err = child.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            let mut sink = Vec::new();
            let _ = err.read_to_end(&mut sink);
        });
        Shell { child, stdout }
    }

    /// Waits for a stdout line that `matches`; every line up to it, the match last.
    fn lines_until(&self, what: &str, matches: impl Fn(&str) -> bool) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.stdout.recv_timeout(left) {
                Ok(line) => {
                    let found = matches(&line);
                    lines.push(line);
                    if found {
                        return lines;
                    }
                }
                Err(error) => panic!("no {what} on stdout (saw {lines:?}): {error}"),
            }
        }
    }

    /// Waits for a stdout line that `matches`, returning it.
    fn line(&self, what: &str, matches: impl Fn(&str) -> bool) -> String {
        self.lines_until(what, matches).pop().unwrap_or_default()
    }

    /// Stops it as Ctrl-C would (SIGINT to its process group) and waits for it to end.
    fn interrupt(mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-INT", "--", &group]).status();
        let _ = self.child.wait();
    }

    /// Runs to the end, returning (success, stdout).
    fn finish(mut self) -> (bool, String) {
        let status = self.child.wait().expect("wait");
        let output: Vec<String> = self.stdout.iter().collect();
        (status.success(), output.join("\n"))
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.wait();
    }
}

/// One data directory for the whole test (both server runs share it), removed at the end.
fn data_dir() -> std::path::PathBuf {
    static DIR: std::sync::OnceLock<tempfile::TempDir> = std::sync::OnceLock::new();
    DIR.get_or_init(|| tempfile::tempdir().expect("a temporary directory"))
        .path()
        .join("data")
}

/// 127.0.0.1:8080 when free, else a free port.
fn address() -> String {
    match std::net::TcpListener::bind(README_ADDRESS) {
        Ok(_) => README_ADDRESS.to_owned(),
        Err(_) => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
            let address = listener.local_addr().expect("address").to_string();
            eprintln!("readme test: {README_ADDRESS} is taken; running the commands on {address}");
            address
        }
    }
}

#[test]
fn defect_1_13_the_readme_quick_start_runs_as_written() {
    let address = address();
    let on = |command: String| command.replace(README_ADDRESS, &address);

    let (ok, help) =
        Shell::spawn(&command("cargo run -p resync-server -- --help"), &address).finish();
    assert!(ok, "--help failed");
    assert!(
        help.contains("--demo") && help.contains("RESYNC_LOG"),
        "{help}"
    );

    let server = Shell::spawn(
        &command("RESYNC_API_KEY=dev-key cargo run -p resync-server"),
        &address,
    );
    server.line("the listening line", |line| {
        line.starts_with("listening on ")
    });

    let subscriber = Shell::spawn(&on(command("curl -N 'http")), &address);
    subscriber.line("the opening event", |line| line == "event: subscribed");
    let publish = on(command("curl -X POST"));
    let (ok, reply) = Shell::spawn(&publish, &address).finish();
    assert!(ok && reply.contains("\"position\""), "publish: {reply}");
    let lines = subscriber.lines_until("the published event", |line| {
        line.contains("\"title\":\"hello\"")
    });
    let event = lines.last().cloned().unwrap_or_default();
    assert!(event.contains("\"seq\":1"), "{event}");
    // "The event shows up with an `id:` cursor": the line before its data.
    let that_id = lines
        .iter()
        .rev()
        .find_map(|line| line.strip_prefix("id: "))
        .expect("an id line")
        .to_owned();
    assert!(
        that_id.starts_with("news:") && that_id.ends_with(":1"),
        "{that_id}"
    );
    drop(subscriber);

    // Stop curl, publish again, and resume: exactly the missed event comes back.
    let (ok, second) = Shell::spawn(&publish, &address).finish();
    assert!(ok && second.contains("\"seq\":2"), "{second}");
    let resume =
        on(command("curl -N -H 'Last-Event-ID: <that id>'")).replace("<that id>", &that_id);
    let resumed = Shell::spawn(&resume, &address);
    let first = resumed.line("the missed event", |line| {
        line.starts_with("data: {\"type\":\"event\"")
    });
    assert!(
        first.contains("\"seq\":2"),
        "only the missed event: {first}"
    );
    drop(resumed);

    // "The same holds across a restart": stop the server, start it again, publish, and the
    // resume from the same id gets the missed events, with no reset.
    server.interrupt();
    let server = Shell::spawn(
        &command("RESYNC_API_KEY=dev-key cargo run -p resync-server"),
        &address,
    );
    server.line("the listening line after the restart", |line| {
        line.starts_with("listening on ")
    });
    let (ok, third) = Shell::spawn(&publish, &address).finish();
    assert!(ok && third.contains("\"seq\":3"), "the seqs go on: {third}");
    let resumed = Shell::spawn(&resume, &address);
    let lines = resumed.lines_until("the missed events after the restart", |line| {
        line.contains("\"seq\":3")
    });
    assert!(
        !lines.iter().any(|line| line == "event: reset"),
        "a restart reset the client: {lines:?}"
    );
    assert!(
        lines.iter().any(|line| line.contains("\"seq\":2")),
        "{lines:?}"
    );
    drop(resumed);

    // The CLI lines.
    let follower = Shell::spawn(
        &command("cargo run -p resync-cli -- subscribe news"),
        &address,
    );
    let cli_publish = command("RESYNC_API_KEY=dev-key cargo run -p resync-cli -- publish");
    let deadline = Instant::now() + Duration::from_secs(120);
    let printed = loop {
        // Published until the follower, which subscribes from now, prints one.
        let (ok, output) = Shell::spawn(&cli_publish, &address).finish();
        assert!(ok, "cli publish: {output}");
        if let Ok(line) = follower.stdout.recv_timeout(Duration::from_secs(2)) {
            break line;
        }
        assert!(
            Instant::now() < deadline,
            "the CLI follower printed nothing"
        );
    };
    let printed: serde_json::Value = serde_json::from_str(&printed).expect("a JSON line");
    assert_eq!(printed["channel"], "news");
    assert_eq!(printed["data"]["title"], "hi");
    drop(follower);
    drop(server);
}
