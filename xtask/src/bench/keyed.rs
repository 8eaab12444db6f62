//! The keyed-channel rows (issue 27): clients far behind a keyed channel catch up from its
//! state, against clients far behind a plain channel, which get a reset and refetch the
//! application's snapshot (bytes and time); publish throughput keyed against plain; and the
//! issue's scale (10,000 keys, 1,000,000 updates, a history of 10,000) on every broker and
//! transport.

use anyhow::Result;

use super::{Bench, DataDir, Redis, Server, ratio};

/// The brokers that keep keyed state.
const BROKERS: [&str; 3] = ["memory", "disk", "redis"];
const TRANSPORTS: [&str; 3] = ["ws", "sse", "poll"];
/// Keys of the catch-up rows, and the bytes of each value.
const KEYS: &str = "1000";
const VALUE_BYTES: &str = "64";

/// A server on `broker` whose `keyed` namespace is keyed (history: the default 10,000 events),
/// with what it needs kept alive beside it; its configuration file goes with it.
struct KeyedServer {
    server: Server,
    config: std::path::PathBuf,
    _data: DataDir,
    _redis: Option<Redis>,
}

impl Drop for KeyedServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.config);
    }
}

impl KeyedServer {
    /// The load generator's `keyed` arguments against this server: `mode` (keyed or plain),
    /// `subscribers` per transport on every transport, `keys`, `updates`.
    fn arguments(&self, mode: &str, subscribers: &str, keys: &str, updates: &str) -> Vec<String> {
        [
            "keyed",
            "--url",
            &self.server.url,
            "--publish-url",
            self.server.publish_url(),
            "--pid",
            &self.server.pid(),
            "--mode",
            mode,
            "--transports",
            "ws,sse,poll",
            "--subscribers",
            subscribers,
            "--keys",
            keys,
            "--value-bytes",
            VALUE_BYTES,
            "--updates",
            updates,
        ]
        .map(str::to_owned)
        .to_vec()
    }
}

fn keyed_server(bench: &Bench, broker: &str) -> Result<KeyedServer> {
    let data = DataDir::new()?;
    let config = std::path::PathBuf::from(format!("{}.toml", data.path()));
    std::fs::write(&config, "[namespaces.keyed]\nkeyed = true\n")?;
    let redis = (broker == "redis").then(Redis::start).transpose()?;
    let config_path = config.display().to_string();
    let mut arguments = vec![
        "--broker",
        broker,
        "--data-dir",
        data.path(),
        "--config",
        &config_path,
    ];
    if let Some(redis) = &redis {
        arguments.extend(["--redis-url", redis.url.as_str()]);
    }
    let server = bench.ours(&arguments)?;
    Ok(KeyedServer {
        server,
        config,
        _data: data,
        _redis: redis,
    })
}

/// One repetition of the catch-up and throughput rows: on each broker, a keyed channel and a
/// plain one, each on a fresh server, `subscribers` clients per transport.
pub(super) fn round(bench: &mut Bench, quick: bool) -> Result<()> {
    let subscribers = if quick { "1000" } else { "5000" };
    let updates = if quick { "20000" } else { "50000" };
    let snapshot = bench.baseline()?;
    let snapshot_pid = snapshot.pid();
    for broker in BROKERS {
        for mode in ["keyed", "plain"] {
            let keyed = keyed_server(bench, broker)?;
            let mut arguments = keyed.arguments(mode, subscribers, KEYS, updates);
            arguments.extend(
                [
                    "--snapshot-url",
                    &snapshot.url,
                    "--snapshot-pid",
                    &snapshot_pid,
                ]
                .map(str::to_owned),
            );
            bench.load(&format!("keyed/{broker}/{mode}"), &arguments)?;
        }
    }
    Ok(())
}

/// The scale, once: 10,000 keys, 1,000,000 updates (100,000 quick) through a history of
/// 10,000, then ten clients per transport away for all of it.
pub(super) fn scale_round(bench: &mut Bench, quick: bool) -> Result<()> {
    let updates = if quick { "100000" } else { "1000000" };
    for broker in BROKERS {
        let keyed = keyed_server(bench, broker)?;
        bench.load_for(
            &format!("keyed-scale/{broker}"),
            &keyed.arguments("keyed", "10", "10000", updates),
            1_800,
        )?;
    }
    Ok(())
}

fn transport_name(transport: &str) -> &'static str {
    match transport {
        "ws" => "WebSocket",
        "sse" => "SSE",
        _ => "long polling",
    }
}

/// The keyed-channel section of the report.
pub(super) fn section(bench: &Bench) -> String {
    let mut out = String::from("\n## Keyed channels: catch-up from the state (issue 27)\n\n");
    let subscribers = bench.median("keyed/memory/keyed", "subscribers");
    let updates = bench.median("keyed/memory/keyed", "updates");
    out.push_str(&format!(
        "A channel gets {updates:.0} updates over {KEYS} keys ({VALUE_BYTES}-byte values) through a history of \
         10,000 events; then {subscribers:.0} clients per transport come back at once with the channel's first \
         position, long gone. On a **keyed** channel they catch up from its state (1,000 entries in pages, then \
         live); on a **plain** one they get a `truncated` reset and refetch the application's snapshot of the \
         same 1,000 entries, answered by the bare baseline server from memory (the cheapest refetch an \
         application could give; a real one asks its database, whose CPU is not in these figures). Time: until \
         the last client is caught up. Bytes: what each client read (stream, plus snapshot when plain). Each \
         broker and mode on a fresh server. A row whose load generator's CPU share is above 1 is bounded by \
         the generator (long polling: it parses each reply as JSON).\n\n"
    ));
    out.push_str(
        "| broker | transport | keyed: until all caught up (s) | plain: reset + refetch (s) | time keyed/plain | keyed bytes per client | plain bytes per client | bytes keyed/plain | keyed server CPU s | plain server + snapshot CPU s | entries per keyed client | state reads / resets (keyed) | failed | loadgen CPU |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|---:|---:|\n",
    );
    for broker in BROKERS {
        let keyed = format!("keyed/{broker}/keyed");
        let plain = format!("keyed/{broker}/plain");
        for transport in TRANSPORTS {
            let field = |name: &str| format!("{transport}_{name}");
            let (keyed_seconds, plain_seconds) = (
                bench.median(&keyed, &field("seconds_until_all_caught_up")),
                bench.median(&plain, &field("seconds_until_all_caught_up")),
            );
            let (keyed_bytes, plain_bytes) = (
                bench.median(&keyed, &field("bytes_per_client")),
                bench.median(&plain, &field("bytes_per_client")),
            );
            out.push_str(&format!(
                "| {broker} | {} | {keyed_seconds:.2} | {plain_seconds:.2} | {} | {keyed_bytes:.0} | {plain_bytes:.0} | {} | {:.2} | {:.2} + {:.2} | {:.0}-{:.0} | {:.0} / {:.0} | {:.0} | {:.2} |\n",
                transport_name(transport),
                ratio(keyed_seconds, plain_seconds),
                ratio(keyed_bytes, plain_bytes),
                bench.median(&keyed, &field("server_cpu_seconds")),
                bench.median(&plain, &field("server_cpu_seconds")),
                bench.median(&plain, &field("snapshot_cpu_seconds")),
                bench.median(&keyed, &field("entries_fewest")),
                bench.median(&keyed, &field("entries_most")),
                bench.max(&keyed, &field("state_reads_most")),
                bench.max(&keyed, &field("resets")),
                bench.max(&keyed, &field("failed")) + bench.max(&plain, &field("failed")),
                bench.median(&keyed, &field("loadgen_cpu_share")),
            ));
        }
    }
    out.push_str(
        "\nPublish throughput of the fill (64 concurrent publishers, kept-alive HTTP, the API listener), keyed \
         against plain on the same broker (floor 0.8x):\n\n| broker | keyed publishes/s | plain publishes/s | ratio | keyed server CPU s per 1,000 | plain | loadgen CPU |\n|---|---:|---:|---:|---:|---:|---:|\n",
    );
    for broker in BROKERS {
        let keyed = format!("keyed/{broker}/keyed");
        let plain = format!("keyed/{broker}/plain");
        out.push_str(&format!(
            "| {broker} | {:.0} | {:.0} | {} | {:.3} | {:.3} | {:.2} |\n",
            bench.median(&keyed, "publishes_per_sec"),
            bench.median(&plain, "publishes_per_sec"),
            ratio(
                bench.median(&keyed, "publishes_per_sec"),
                bench.median(&plain, "publishes_per_sec")
            ),
            bench.median(&keyed, "publish_cpu_seconds_per_thousand"),
            bench.median(&plain, "publish_cpu_seconds_per_thousand"),
            bench.median(&keyed, "publish_loadgen_cpu_share"),
        ));
    }
    if bench.results.contains_key("keyed-scale/memory") {
        out.push_str(&format!(
            "\nAt the issue's scale (once): {:.0} updates over 10,000 keys through a history of 10,000, then ten \
             clients per transport away for all of it, each caught up from one state read:\n\n| broker | fill publishes/s | transport | until all caught up (s) | entries per client | state reads / resets | bytes per client | failed |\n|---|---:|---|---:|---|---|---:|---:|\n",
            bench.median("keyed-scale/memory", "updates"),
        ));
        for broker in BROKERS {
            let key = format!("keyed-scale/{broker}");
            for transport in TRANSPORTS {
                let field = |name: &str| format!("{transport}_{name}");
                out.push_str(&format!(
                    "| {broker} | {:.0} | {} | {:.2} | {:.0}-{:.0} | {:.0} / {:.0} | {:.0} | {:.0} |\n",
                    bench.median(&key, "publishes_per_sec"),
                    transport_name(transport),
                    bench.median(&key, &field("seconds_until_all_caught_up")),
                    bench.median(&key, &field("entries_fewest")),
                    bench.median(&key, &field("entries_most")),
                    bench.max(&key, &field("state_reads_most")),
                    bench.max(&key, &field("resets")),
                    bench.median(&key, &field("bytes_per_client")),
                    bench.max(&key, &field("failed")),
                ));
            }
        }
    }
    out
}

/// The floor row: keyed publish throughput at least 0.8x plain on every broker, and every
/// keyed client caught up from one state read with no reset.
pub(super) fn floor(bench: &Bench) -> String {
    let worst = BROKERS
        .iter()
        .map(|broker| {
            bench.median(&format!("keyed/{broker}/keyed"), "publishes_per_sec")
                / bench.median(&format!("keyed/{broker}/plain"), "publishes_per_sec")
        })
        .fold(f64::INFINITY, f64::min);
    let mut resets = 0.0;
    let mut failed = 0.0;
    for broker in BROKERS {
        for transport in TRANSPORTS {
            let key = format!("keyed/{broker}/keyed");
            resets += bench.max(&key, &format!("{transport}_resets"));
            failed += bench.max(&key, &format!("{transport}_failed"));
        }
    }
    format!(
        "| keyed publish throughput >= 0.8x plain on every broker; keyed catch-up with no reset (issue 27) | worst {worst:.2}x, resets {resets:.0}, failed {failed:.0} | {} |\n",
        super::verdict(worst >= 0.8 && resets == 0.0 && failed == 0.0)
    )
}

/// `cargo xtask bench keyed`: the keyed rows, three rounds (one with `--quick`) and the scale
/// run once; the section is printed, written to `target/bench/keyed.md`, and put in place of
/// the keyed section of `docs/benchmarks.md`.
pub(crate) fn only() -> Result<()> {
    let root = super::workspace_root();
    let mut bench = Bench::built(&root)?;
    let quick = std::env::args().any(|argument| argument == "--quick");
    for _ in 0..if quick { 1 } else { 3 } {
        round(&mut bench, quick)?;
    }
    scale_round(&mut bench, quick)?;
    let section = section(&bench);
    std::fs::create_dir_all(root.join("target/bench"))?;
    std::fs::write(root.join("target/bench/keyed.md"), &section)?;
    std::fs::write(
        root.join("target/bench/keyed.json"),
        serde_json::to_string_pretty(&bench.results)?,
    )?;
    println!("{section}\n{}", floor(&bench));
    Ok(())
}
