//! A Redis Cluster of the test's own: three primaries, each with a replica, on free loopback
//! ports (`redis-server --cluster-enabled yes`, joined by `redis-cli --cluster create`), so a
//! test can kill a primary and watch its replica take over.

use crate::redis_server::{end, wait_for};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// One node: its port and its process, while it runs.
struct Node {
    port: u16,
    child: Option<Child>,
}

pub struct RedisCluster {
    directory: PathBuf,
    nodes: Vec<Node>,
}

fn free_port() -> u16 {
    // Cluster nodes also listen on port + 10000 (the cluster bus): pick ports below 55536
    // whose bus port is free too.
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|listener| listener.local_addr())
            .map(|address| address.port())
            .expect("a free port");
        if port < 55_536 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

/// `count` free ports, none another's cluster-bus port (a port just probed is free again
/// until a node binds it, so the next probe may return it too).
fn distinct_ports(count: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::with_capacity(count);
    while ports.len() < count {
        let port = free_port();
        let clashes = ports
            .iter()
            .any(|&taken| taken == port || taken + 10_000 == port || port + 10_000 == taken);
        if !clashes {
            ports.push(port);
        }
    }
    ports
}

/// Runs `redis-cli` against `port` and returns what it printed.
pub fn cli(port: u16, arguments: &[&str]) -> String {
    let output = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(arguments)
        .output()
        .expect("redis-cli is installed (.ci/run installs it)");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

impl RedisCluster {
    /// Starts six nodes and makes them a cluster of three primaries with a replica each,
    /// returning once every node sees every slot served.
    pub fn start() -> Self {
        let directory = std::env::temp_dir().join(format!(
            "resync-redis-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        let mut cluster = Self {
            directory,
            nodes: distinct_ports(6)
                .into_iter()
                .map(|port| Node { port, child: None })
                .collect(),
        };
        for index in 0..cluster.nodes.len() {
            cluster.launch(index);
        }
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli is installed");
        assert!(created.success(), "redis-cli --cluster create failed");
        cluster.wait_until_healthy();
        cluster
    }

    fn launch(&mut self, index: usize) {
        let port = self.nodes[index].port;
        let directory = self.directory.join(port.to_string());
        std::fs::create_dir_all(&directory).expect("redis node directory");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "1000",
                // A replica stopped for a while by a test still takes over.
                "--cluster-replica-validity-factor",
                "0",
                // The other shards go on serving while one has no primary (docs/scaling.md).
                "--cluster-require-full-coverage",
                "no",
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--dir",
                directory.to_str().expect("utf-8 temp path"),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (.ci/run installs it)");
        self.nodes[index].child = Some(child);
        wait_for(&format!("redis-server listening on {port}"), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
    }

    /// Waits until every running node says the cluster is ok, knows every running node,
    /// and every replica's link to its primary is up.
    pub fn wait_until_healthy(&self) {
        let running: Vec<u16> = self.running_ports();
        wait_for("a healthy redis cluster", || {
            running.iter().all(|&port| {
                let info = cli(port, &["cluster", "info"]);
                let replication = cli(port, &["info", "replication"]);
                info.contains("cluster_state:ok")
                    && info.contains("cluster_slots_ok:16384")
                    && (replication.contains("role:master")
                        || replication.contains("master_link_status:up"))
            })
        });
    }

    fn running_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|node| node.child.is_some())
            .map(|node| node.port)
            .collect()
    }

    /// Seed URLs of every node.
    pub fn seeds(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|node| format!("redis://127.0.0.1:{}/", node.port))
            .collect()
    }

    /// The port of the primary that serves `key` now.
    pub fn primary_of(&self, key: &str) -> u16 {
        let any = self.running_ports()[0];
        let slot: u16 = cli(any, &["cluster", "keyslot", key])
            .trim()
            .parse()
            .expect("CLUSTER KEYSLOT answers a number");
        let nodes = cli(any, &["cluster", "nodes"]);
        for line in nodes.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.len() < 9 || !fields[2].contains("master") || fields[2].contains("fail") {
                continue;
            }
            let serves = fields[8..].iter().any(|range| match range.split_once('-') {
                Some((low, high)) => {
                    low.parse::<u16>().is_ok_and(|low| low <= slot)
                        && high.parse::<u16>().is_ok_and(|high| slot <= high)
                }
                None => range.parse::<u16>() == Ok(slot),
            });
            if serves {
                let address = fields[1].split('@').next().expect("host:port@bus");
                return address
                    .rsplit(':')
                    .next()
                    .and_then(|port| port.parse().ok())
                    .expect("a port");
            }
        }
        panic!("no primary serves slot {slot}:\n{nodes}");
    }

    /// The port of the replica of the primary on `primary`.
    pub fn replica_of(&self, primary: u16) -> u16 {
        let any = self.running_ports()[0];
        let nodes = cli(any, &["cluster", "nodes"]);
        let port_of = |fields: &[&str]| -> u16 {
            fields[1]
                .split('@')
                .next()
                .and_then(|address| address.rsplit(':').next())
                .and_then(|port| port.parse().ok())
                .expect("a node address")
        };
        let lines: Vec<Vec<&str>> = nodes
            .lines()
            .map(|line| line.split_whitespace().collect())
            .filter(|fields: &Vec<&str>| fields.len() >= 8)
            .collect();
        let primary_id = lines
            .iter()
            .find(|fields| port_of(fields) == primary)
            .map(|fields| fields[0])
            .expect("the primary is a node of the cluster");
        lines
            .iter()
            .find(|fields| fields[3] == primary_id)
            .map(|fields| port_of(fields))
            .expect("the primary has a replica")
    }

    /// Waits until the replica on `replica` has everything its primary on `primary` wrote.
    pub fn wait_replicated(&self, primary: u16, replica: u16) {
        let offset = |port: u16, field: &str| -> Option<u64> {
            cli(port, &["info", "replication"])
                .lines()
                .find_map(|line| line.strip_prefix(field))
                .and_then(|value| value.trim().parse().ok())
        };
        wait_for("the replica caught up with its primary", || {
            let written = offset(primary, "master_repl_offset:");
            written.is_some() && offset(replica, "slave_repl_offset:") == written
        });
    }

    /// Stops the node on `port` with SIGSTOP (it keeps its sockets and answers nothing, so
    /// it misses what its primary writes meanwhile), or lets it go on with SIGCONT.
    pub fn signal(&self, port: u16, signal: &str) {
        let node = self
            .nodes
            .iter()
            .find(|node| node.port == port)
            .expect("a node of this cluster");
        crate::redis_server::signal(node.child.as_ref().expect("a running node"), signal);
    }

    /// How many times the running nodes ran `command`, summed.
    pub fn command_calls(&self, command: &str) -> u64 {
        self.running_ports()
            .into_iter()
            .map(|port| crate::redis_server::command_calls(port, command))
            .sum()
    }

    /// The reference server's arguments for this cluster.
    pub fn server_arguments(&self) -> Vec<String> {
        vec![
            "--broker".to_owned(),
            "redis".to_owned(),
            "--redis-cluster-nodes".to_owned(),
            self.seeds().join(","),
        ]
    }

    /// Kills every node (an outage of the whole cluster).
    pub fn stop_all(&mut self) {
        let ports: Vec<u16> = self.running_ports();
        for port in ports {
            self.kill(port);
        }
    }

    /// Stops every node and starts it again, with its data or empty (keeping the cluster's
    /// configuration either way), and waits until the cluster is healthy.
    pub fn restart_all(&mut self, keep_data: bool) {
        self.stop_all();
        for index in 0..self.nodes.len() {
            if self.nodes[index].child.is_none() {
                if !keep_data {
                    let directory = self.directory.join(self.nodes[index].port.to_string());
                    let _ = std::fs::remove_dir_all(directory.join("appendonlydir"));
                    let _ = std::fs::remove_file(directory.join("dump.rdb"));
                }
                self.launch(index);
            }
        }
        self.wait_until_healthy();
    }

    /// Kills the node on `port` with SIGKILL (its clients see their connections drop).
    pub fn kill(&mut self, port: u16) {
        let node = self
            .nodes
            .iter_mut()
            .find(|node| node.port == port)
            .expect("a node of this cluster");
        end(node.child.take());
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            end(node.child.take());
        }
        let _ = std::fs::remove_dir_all(&self.directory);
    }
}
