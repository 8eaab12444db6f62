//! A `redis-server` of the test's own, on a free port, that the test can stop and restart
//! (keeping its data in an append-only file, or starting empty).

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    pub port: u16,
    directory: PathBuf,
    child: Option<Child>,
    /// The primary this server replicates, if it is a replica.
    replica_of: Option<u16>,
}

/// Waits for `condition`, checking every 20 ms, failing the test with `what` after 60 s.
pub(crate) fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < deadline, "{what} within 60 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Sends `signal` (`-STOP`, `-CONT`) to `child`.
pub(crate) fn signal(child: &Child, signal: &str) {
    let pid = child.id();
    let sent = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("kill runs");
    assert!(sent.success(), "kill {signal} {pid}");
}

/// Kills `child`, if any, and waits for it.
pub(crate) fn end(child: Option<Child>) {
    if let Some(mut child) = child {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// How many times the Redis on `port` ran `command` (`INFO commandstats`).
pub(crate) fn command_calls(port: u16, command: &str) -> u64 {
    crate::redis_cluster::cli(port, &["info", "commandstats"])
        .lines()
        .find_map(|line| line.strip_prefix(&format!("cmdstat_{command}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().expect("a count of calls"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|address| address.port())
        .expect("a free port")
}

impl RedisServer {
    /// Starts a server with an append-only file (fsync on every write), so a restart keeps
    /// the data.
    pub fn start() -> Self {
        Self::start_replicating(None)
    }

    /// Starts a replica of `primary` and waits until its link to it is up.
    pub fn start_replica_of(primary: &RedisServer) -> Self {
        let replica = Self::start_replicating(Some(primary.port));
        wait_for("the replica linked to its primary", || {
            replica
                .cli(&["info", "replication"])
                .contains("master_link_status:up")
        });
        replica
    }

    fn start_replicating(replica_of: Option<u16>) -> Self {
        let port = free_port();
        let directory =
            std::env::temp_dir().join(format!("resync-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&directory).expect("redis data directory");
        let mut server = Self {
            port,
            directory,
            child: None,
            replica_of,
        };
        server.launch();
        server
    }

    /// Runs `redis-cli` against this server and returns what it printed.
    pub fn cli(&self, arguments: &[&str]) -> String {
        crate::redis_cluster::cli(self.port, arguments)
    }

    /// How many times this server ran `command` (`xrange`, `publish`).
    pub fn command_calls(&self, command: &str) -> u64 {
        command_calls(self.port, command)
    }

    /// Sends `signal` (`-STOP`, `-CONT`) to the server's process.
    pub fn signal(&self, signal: &str) {
        self::signal(self.child.as_ref().expect("a running server"), signal);
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn launch(&mut self) {
        let replicating = self
            .replica_of
            .map(|primary| {
                vec![
                    "--replicaof".to_owned(),
                    "127.0.0.1".to_owned(),
                    primary.to_string(),
                ]
            })
            .unwrap_or_default();
        let child = Command::new("redis-server")
            .args(&replicating)
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                self.directory.to_str().expect("utf-8 temp path"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        self.child = Some(child);
        let port = self.port;
        wait_for(&format!("redis-server listening on {port}"), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Kills the server (its clients see their connections drop).
    pub fn stop(&mut self) {
        end(self.child.take());
    }

    /// Starts it again with the data it had.
    pub fn restart_keeping_data(&mut self) {
        self.stop();
        self.launch();
    }

    /// Starts it again empty, as if its data were lost.
    pub fn restart_empty(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.directory);
        std::fs::create_dir_all(&self.directory).expect("redis data directory");
        self.launch();
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}
