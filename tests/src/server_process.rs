//! The reference server as a separate process (the built `resync-server` binary), for tests
//! that kill servers.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// The binary `bin` of workspace package `package`, built first (once per test process, so
/// a test never runs a stale one). For binaries that `cargo test --workspace` does not build
/// itself (the examples'); see [`server_binary`] for the server's.
pub fn workspace_binary(package: &str, bin: &str) -> PathBuf {
    static BUILT: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let test_executable = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/<bin>
    let profile_directory = test_executable
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile directory")
        .to_path_buf();
    let mut built = BUILT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if !built.iter().any(|name| name == bin) {
        let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned()))
            .args(["build", "--quiet", "-p", package, "--bin", bin])
            .status()
            .expect("cargo build runs");
        assert!(status.success(), "building {bin} failed");
        built.push(bin.to_owned());
    }
    profile_directory.join(bin)
}

/// The `resync-server` binary. `cargo test --workspace` builds it (for the server's own
/// integration tests) with the workspace's features; building it again here with the
/// package's features would relink it on every run, so it is built only when missing.
pub fn server_binary() -> PathBuf {
    let test_executable = std::env::current_exe().expect("test executable path");
    let binary = test_executable
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile directory")
        .join("resync-server");
    if binary.exists() {
        return binary;
    }
    workspace_binary("resync-server", "resync-server")
}

/// Numbers the log files of one test process's servers.
static NEXT_LOG: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub struct ServerProcess {
    pub base_url: String,
    pub address: std::net::SocketAddr,
    /// The API listener's address, when started with `--api-listen`.
    pub api_address: Option<std::net::SocketAddr>,
    child: Child,
    /// Where the process's stderr goes: read back when a test fails, to say why.
    log: PathBuf,
    /// The disk broker's data directory, unless the test names one.
    _data_dir: Option<tempfile::TempDir>,
}

impl ServerProcess {
    /// Starts `count` instances with `shared` arguments (a broker's, say) and `extra` ones.
    pub fn start_many(count: usize, shared: &[String], extra: &[&str]) -> Vec<Self> {
        let arguments: Vec<&str> = shared
            .iter()
            .map(String::as_str)
            .chain(extra.iter().copied())
            .collect();
        (0..count).map(|_| Self::start(&arguments)).collect()
    }

    /// Starts the binary on a free port with `arguments` added.
    pub fn start(arguments: &[&str]) -> Self {
        Self::start_with_env(arguments, &[])
    }

    /// Starts the binary on a free port with `arguments` added and `RESYNC_*` settings in
    /// its environment (a setting this build does not know is ignored, not refused).
    pub fn start_with_env(arguments: &[&str], environment: &[(&str, &str)]) -> Self {
        let log = std::env::temp_dir().join(format!(
            "resync-server-{}-{}.log",
            std::process::id(),
            NEXT_LOG.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let stderr = std::fs::File::create(&log).expect("server log file");
        let data_dir = (!arguments.contains(&"--data-dir"))
            .then(|| tempfile::tempdir().expect("a data directory"));
        let data_dir_arguments: Vec<String> = match &data_dir {
            Some(dir) => vec![
                "--data-dir".to_owned(),
                dir.path().join("data").display().to_string(),
            ],
            None => Vec::new(),
        };
        let mut child = Command::new(server_binary())
            // A free port, unless the test names one (a new process of a deploy takes its
            // predecessor's).
            .args(if arguments.contains(&"--listen") {
                &[][..]
            } else {
                &["--listen", "127.0.0.1:0"][..]
            })
            .args(["--api-key", "test-api-key-0123456789"])
            .args(&data_dir_arguments)
            .args(if arguments.contains(&"--shutdown-spread-ms") {
                &[][..]
            } else {
                &["--shutdown-spread-ms", "100"][..]
            })
            // Every test client comes from 127.0.0.1: lift the per-address limits, as the
            // in-process test server does (tests/tests/hardening.rs sets its own).
            .args(if arguments.contains(&"--connections-per-ip-per-second") {
                &[][..]
            } else {
                &[
                    "--max-connections-per-ip",
                    "100000",
                    "--connections-per-ip-per-second",
                    "100000",
                    "--connection-burst-per-ip",
                    "100000",
                    "--max-subscriptions-per-ip",
                    "1000000",
                    "--max-connections-per-user",
                    "100000",
                    "--max-subscriptions-per-user",
                    "1000000",
                ][..]
            })
            .args(arguments)
            .envs(environment.iter().copied())
            .env(
                "RESYNC_LOG",
                std::env::var("RESYNC_TEST_SERVER_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("server binary starts");
        let mut line = String::new();
        let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
        stdout.read_line(&mut line).expect("listening line");
        let base_url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_owned();
        let address = base_url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .parse()
            .expect("address");
        let api_address = arguments.contains(&"--api-listen").then(|| {
            let mut line = String::new();
            stdout.read_line(&mut line).expect("api listening line");
            line.trim()
                .strip_prefix("api listening on http://")
                .unwrap_or_else(|| panic!("unexpected second line {line:?}"))
                .parse()
                .expect("api address")
        });
        Self {
            base_url,
            address,
            api_address,
            child,
            log,
            _data_dir: data_dir,
        }
    }

    /// Sends SIGTERM: the graceful shutdown of a deploy.
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "SIGTERM was not delivered");
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The process's resident memory, in KiB.
    pub fn rss_kib(&self) -> u64 {
        crate::attack::rss_kib(self.child.id())
    }

    /// `/metrics`, read over HTTP (from the API listener when there is one: plain HTTP even
    /// when the main listener serves TLS).
    pub async fn metrics(&self) -> String {
        let base = match self.api_address {
            Some(address) => format!("http://{address}"),
            None => self.base_url.clone(),
        };
        reqwest::get(format!("{base}/metrics"))
            .await
            .expect("metrics answer")
            .text()
            .await
            .expect("metrics text")
    }

    /// Whether the process still runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// How the process ended (or that it runs) and the end of its log: for failure messages.
    pub fn report(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(status)) => format!("exited: {status}"),
            Ok(None) => "still running".to_owned(),
            Err(error) => format!("status unknown: {error}"),
        };
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!("{status}; its log ends:\n{}", tail.join("\n"))
    }

    /// Waits for the process to exit, for at most `wait`; whether it did.
    pub fn wait_for_exit(&mut self, wait: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + wait;
        while std::time::Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    /// Kills the process at once (SIGKILL): no goodbye to its clients.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_file(&self.log);
    }
}
