//! The Redis Cluster rows (issue 28): publishes through one Redis against a cluster of three
//! primaries, fan-out over two instances on each, Redis connections per instance, and the
//! time from a primary's death until delivery resumes.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use super::{Bench, REDIS_BURST, Redis, ratio};

/// A Redis Cluster of `primaries`, each with `replicas`, on free loopback ports.
pub(super) struct Cluster {
    nodes: Vec<(u16, Child)>,
    directory: PathBuf,
}

fn free_port() -> Result<u16> {
    // A node also listens on its port + 10000 (the cluster bus).
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        if port < 55_536 && std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return Ok(port);
        }
    }
}

fn cli(port: u16, arguments: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(arguments)
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).into_owned())
        .unwrap_or_default()
}

/// CPU seconds a process has used (utime + stime of `/proc/<pid>/stat`).
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

impl Cluster {
    pub(super) fn start(primaries: usize, replicas: usize) -> Result<Self> {
        let directory = std::env::temp_dir().join(format!("resync-bench-cluster-{}", free_port()?));
        // Nodes join the cluster value as they start, so a failure ends those already running.
        let mut cluster = Self {
            nodes: Vec::new(),
            directory: directory.clone(),
        };
        let mut ports: Vec<u16> = Vec::new();
        while ports.len() < primaries * (1 + replicas) {
            // A port just probed is free again until a node binds it: no repeats.
            let port = free_port()?;
            if !ports
                .iter()
                .any(|&taken| taken == port || taken + 10_000 == port || port + 10_000 == taken)
            {
                ports.push(port);
            }
        }
        for port in ports {
            let node_directory = directory.join(port.to_string());
            std::fs::create_dir_all(&node_directory)?;
            let child = super::redis_server(
                port,
                &node_directory,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "1000",
                    "--cluster-config-file",
                    "nodes.conf",
                ],
            )?;
            cluster.nodes.push((port, child));
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|(port, _)| format!("127.0.0.1:{port}"))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .context("redis-cli --cluster create")?;
        if !created.success() {
            bail!("redis-cli --cluster create failed");
        }
        cluster.wait_healthy()?;
        Ok(cluster)
    }

    fn wait_healthy(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !self.nodes.iter().all(|(port, child)| {
            child.id() == 0 || {
                let info = cli(*port, &["cluster", "info"]);
                info.contains("cluster_state:ok") && info.contains("cluster_slots_ok:16384")
            }
        }) {
            if Instant::now() > deadline {
                bail!("the cluster did not become healthy");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub(super) fn seeds(&self) -> String {
        self.nodes
            .iter()
            .map(|(port, _)| format!("redis://127.0.0.1:{port}/"))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn cpu(&self) -> f64 {
        self.nodes
            .iter()
            .map(|(_, child)| cpu_seconds(child.id()))
            .sum()
    }

    /// The process id of a node that is a primary now.
    fn a_primary(&self) -> Option<u32> {
        self.nodes
            .iter()
            .find(|(port, _)| cli(*port, &["info", "replication"]).contains("role:master"))
            .map(|(_, child)| child.id())
    }

    /// Clients connected to the cluster's nodes (each node's own `redis-cli` excluded).
    fn clients(&self) -> u64 {
        self.nodes
            .iter()
            .map(|(port, _)| connected_clients(*port).saturating_sub(1))
            .sum()
    }
}

fn connected_clients(port: u16) -> u64 {
    cli(port, &["info", "clients"])
        .lines()
        .find_map(|line| line.strip_prefix("connected_clients:"))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.nodes {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}

/// Where a row's instances keep their channels.
enum Store {
    One(Redis),
    Cluster(Cluster),
}

impl Store {
    fn arguments(&self) -> Vec<String> {
        match self {
            Store::One(redis) => vec![
                "--broker".into(),
                "redis".into(),
                "--redis-url".into(),
                redis.url.clone(),
            ],
            Store::Cluster(cluster) => vec![
                "--broker".into(),
                "redis".into(),
                "--redis-cluster-nodes".into(),
                cluster.seeds(),
            ],
        }
    }

    fn cpu(&self) -> f64 {
        match self {
            Store::One(redis) => cpu_seconds(redis.child.id()),
            Store::Cluster(cluster) => cluster.cpu(),
        }
    }

    fn clients(&self) -> u64 {
        match self {
            Store::One(redis) => {
                let port: u16 = redis
                    .url
                    .trim_start_matches("redis://127.0.0.1:")
                    .trim_end_matches('/')
                    .parse()
                    .unwrap_or(0);
                connected_clients(port).saturating_sub(1)
            }
            Store::Cluster(cluster) => cluster.clients(),
        }
    }
}

/// One sample of each row, on one Redis (`one`) and on a cluster of three primaries
/// (`three`).
pub(super) fn round(bench: &mut Bench) -> Result<()> {
    for (label, store) in [
        ("one", Store::One(Redis::start()?)),
        ("three", Store::Cluster(Cluster::start(3, 0)?)),
    ] {
        let arguments = store.arguments();
        let mut with_workers: Vec<&str> = arguments.iter().map(String::as_str).collect();
        with_workers.extend(["--workers", "1"]);

        // Publishes/s from 64 publishers over 1,000 channels, through one instance's API
        // listener; what Redis spent on them.
        let server = bench.ours(&with_workers)?;
        let redis_cpu = store.cpu();
        bench.load(
            &format!("cluster/publish/{label}"),
            &[
                "publishes",
                "--url",
                server.publish_url(),
                "--pid",
                &server.pid(),
                "--publishers",
                "64",
                "--publishes",
                "40000",
                "--channels",
                "1000",
            ],
        )?;
        let spent = store.cpu() - redis_cpu;
        bench.annotate(
            &format!("cluster/publish/{label}"),
            "redis_cpu_seconds",
            Value::from(spent),
        );
        drop(server);

        // Fan-out to 5,000 WebSocket subscribers over two instances of one worker each.
        let first = bench.ours(&with_workers)?;
        let second = bench.ours(&with_workers)?;
        let idle = store.clients();
        let pids = format!("{},{}", first.pid(), second.pid());
        bench.load(
            &format!("cluster/fanout/{label}"),
            &[
                "fanout",
                "--url",
                &first.url,
                "--publish-url",
                first.publish_url(),
                "--extra-url",
                &second.url,
                "--pid",
                &pids,
                "--transport",
                "ws",
                "--subscribers",
                "5000",
                "--burst",
                REDIS_BURST,
                "--latency-seconds",
                "3",
            ],
        )?;
        let busy = store.clients();
        bench.record(
            &format!("cluster/connections/{label}"),
            serde_json::json!({
                "per_instance_idle": idle as f64 / 2.0,
                "per_instance_after_fanout": busy as f64 / 2.0,
            }),
        );
    }
    Ok(())
}

/// One sample of the failover row: an instance on a cluster of three primaries with a
/// replica each, 60 channels followed over SSE and published to every 100 ms; 6 s in, a
/// primary is killed (`kill -9`) and its replica takes over (node timeout 1 s).
pub(super) fn failover_round(bench: &mut Bench) -> Result<()> {
    let cluster = Cluster::start(3, 1)?;
    let seeds = cluster.seeds();
    let server = bench.ours(&["--broker", "redis", "--redis-cluster-nodes", &seeds])?;
    let victim = cluster.a_primary().context("no primary")?;
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(6));
        Command::new("kill")
            .args(["-KILL", &victim.to_string()])
            .status()
    });
    bench.load(
        "cluster/failover",
        &[
            "failover",
            "--url",
            &server.url,
            "--publish-url",
            server.publish_url(),
            "--channels",
            "60",
            "--interval-ms",
            "100",
            "--seconds",
            "20",
        ],
    )?;
    let killed = killer
        .join()
        .map_err(|_| anyhow::anyhow!("the killer thread panicked"))?
        .context("kill")?;
    if !killed.success() {
        bail!("the primary was not killed");
    }
    Ok(())
}

/// The report's lines for the cluster rows.
pub(super) fn section(bench: &Bench) -> String {
    let mut text = String::new();
    let publishes =
        |label: &str| bench.median(&format!("cluster/publish/{label}"), "publishes_per_sec");
    let redis_cpu =
        |label: &str| bench.median(&format!("cluster/publish/{label}"), "redis_cpu_seconds");
    let server_cpu = |label: &str| {
        bench.median(
            &format!("cluster/publish/{label}"),
            "cpu_seconds_per_thousand",
        )
    };
    let loadgen = |key: &str| bench.median(key, "loadgen_cpu_share");
    text.push_str(&format!(
        "| publishes/s, 64 publishers over 1,000 channels through one instance's API listener: one Redis vs a cluster of three primaries | {:.0} ({}) vs {:.0} ({}): {}; Redis CPU {:.2} vs {:.2} s in all, instance CPU {:.3} vs {:.3} s per thousand, generator {:.2} vs {:.2} of a core |\n",
        publishes("one"),
        bench.spread("cluster/publish/one", "publishes_per_sec"),
        publishes("three"),
        bench.spread("cluster/publish/three", "publishes_per_sec"),
        ratio(publishes("three"), publishes("one")),
        redis_cpu("one"),
        redis_cpu("three"),
        server_cpu("one"),
        server_cpu("three"),
        loadgen("cluster/publish/one"),
        loadgen("cluster/publish/three"),
    ));
    let deliveries =
        |label: &str| bench.median(&format!("cluster/fanout/{label}"), "deliveries_per_sec");
    text.push_str(&format!(
        "| fan-out to 5,000 WebSocket subscribers over two instances (one worker each), bursts of {REDIS_BURST}: a cluster of three primaries vs one Redis | {:.0} ({}) vs {:.0} ({}): {}; lost {:.0} vs {:.0}; CPU per million {:.3} vs {:.3} s; generator {:.2} vs {:.2} of a core |\n",
        deliveries("three"),
        bench.spread("cluster/fanout/three", "deliveries_per_sec"),
        deliveries("one"),
        bench.spread("cluster/fanout/one", "deliveries_per_sec"),
        ratio(deliveries("three"), deliveries("one")),
        bench.median("cluster/fanout/three", "lost_events"),
        bench.median("cluster/fanout/one", "lost_events"),
        bench.median("cluster/fanout/three", "cpu_seconds_per_million"),
        bench.median("cluster/fanout/one", "cpu_seconds_per_million"),
        loadgen("cluster/fanout/three"),
        loadgen("cluster/fanout/one"),
    ));
    text.push_str(&format!(
        "| a primary killed (`kill -9`) under 60 channels published every 100 ms and followed over SSE, cluster node timeout 1 s: the longest wait for a delivery on the {:.0} channels of its shard | p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; resets {:.0}; acknowledged {:.0}, delivered {:.0} |\n",
        bench.median("cluster/failover", "stalled_channels"),
        bench.median("cluster/failover", "stall_p50_ms"),
        bench.median("cluster/failover", "stall_p99_ms"),
        bench.median("cluster/failover", "stall_max_ms"),
        bench.median("cluster/failover", "resets"),
        bench.median("cluster/failover", "acknowledged"),
        bench.median("cluster/failover", "delivered"),
    ));
    text.push_str(&format!(
        "| Redis connections per instance, idle / after the fan-out | one Redis {:.0} / {:.0}; cluster of three primaries {:.0} / {:.0} |\n",
        bench.median("cluster/connections/one", "per_instance_idle"),
        bench.median("cluster/connections/one", "per_instance_after_fanout"),
        bench.median("cluster/connections/three", "per_instance_idle"),
        bench.median("cluster/connections/three", "per_instance_after_fanout"),
    ));
    text
}

/// `cargo xtask bench cluster`: three rounds of the cluster rows, printed (and written to
/// `target/bench/cluster.md`).
pub(crate) fn only() -> Result<()> {
    let root = super::workspace_root();
    let mut bench = Bench::built(&root)?;
    for _ in 0..3 {
        round(&mut bench)?;
        failover_round(&mut bench)?;
    }
    let section = format!(
        "| row | figures |\n|---|---|\n{}\n| floor | figure | status |\n|---|---|---|\n{}",
        section(&bench),
        floor(&bench)
    );
    std::fs::create_dir_all(root.join("target/bench"))?;
    std::fs::write(root.join("target/bench/cluster.md"), &section)?;
    println!("{section}");
    Ok(())
}

/// The floor row: fan-out on the cluster at least 0.9x one Redis, nothing lost.
pub(super) fn floor(bench: &Bench) -> String {
    let fanout = bench.median("cluster/fanout/three", "deliveries_per_sec")
        / bench.median("cluster/fanout/one", "deliveries_per_sec");
    let lost = bench.max("cluster/fanout/three", "lost_events");
    format!(
        "| Redis Cluster fan-out >= 0.9x one Redis, 0 lost (issue 28) | {fanout:.2}x, lost {lost:.0} | {} |\n",
        super::verdict(fanout >= 0.9 && lost == 0.0)
    )
}
