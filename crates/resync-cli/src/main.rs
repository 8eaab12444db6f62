//! `resync`: follow and publish from the command line.
//!
//! ```sh
//! resync subscribe news orders            # JSON lines, keeps following across reconnects
//! resync subscribe --state-file pos news  # a restart continues where the last run stopped
//! resync publish news '{"title":"hi"}'    # needs RESYNC_API_KEY
//! ```

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand, ValueEnum};
use futures_util::StreamExt;
use futures_util::stream::SelectAll;
use resync_client::{
    Client, ConnectionState, FileStore, PositionStore, TransportChoice, TransportKind, Update,
};
use resync_protocol::bodies::PublishRequest;
use resync_protocol::{Channel, Cursor, IdempotencyKey, Key, Payload};

/// Follow and publish resync channels from the command line.
#[derive(Parser)]
#[command(name = "resync", version, about)]
struct Cli {
    /// The server's base URL.
    #[arg(
        long,
        global = true,
        env = "RESYNC_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    url: String,
    /// A PEM certificate (a private CA, or the server's self-signed certificate) to trust for
    /// https:// and wss:// besides the public web's roots.
    #[arg(long, global = true, env = "RESYNC_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Prints every event of the channels as a JSON line, following across reconnects.
    /// Connection changes go to stderr.
    Subscribe {
        /// Channels to follow.
        #[arg(required = true)]
        channels: Vec<String>,
        /// Resume from a cursor (`channel:epoch:seq,…`, as printed in each line's `cursor`).
        /// Beats `--state-file` for the channels it names.
        #[arg(long)]
        since: Option<String>,
        /// Keep each channel's position in this file as lines are printed, and start from it:
        /// a restarted `resync subscribe` continues where the last one stopped (after Ctrl-C
        /// or SIGTERM with nothing repeated; after a kill, at most the line being printed again).
        #[arg(long)]
        state_file: Option<std::path::PathBuf>,
        /// Client token (JWT), if the server requires one.
        #[arg(long, env = "RESYNC_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Transport to use.
        #[arg(long, value_enum, default_value = "auto")]
        transport: TransportArg,
        /// Exit after this many events (default: follow forever).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Publishes one event through the HTTP API and prints its position.
    Publish {
        /// The channel.
        channel: String,
        /// The event's JSON data.
        data: String,
        /// The server's API key.
        #[arg(long, env = "RESYNC_API_KEY", hide_env_values = true)]
        api_key: String,
        /// Makes a retry of this publish land once.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// On a keyed channel, the key the event sets (`null` data deletes it).
        #[arg(long)]
        key: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum TransportArg {
    Auto,
    Websocket,
    Sse,
    LongPolling,
}

impl From<TransportArg> for TransportChoice {
    fn from(argument: TransportArg) -> Self {
        match argument {
            TransportArg::Auto => TransportChoice::Auto,
            TransportArg::Websocket => TransportChoice::Only(TransportKind::WebSocket),
            TransportArg::Sse => TransportChoice::Only(TransportKind::Sse),
            TransportArg::LongPolling => TransportChoice::Only(TransportKind::LongPolling),
        }
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let cli = Cli::parse();
    let ca_cert = match &cli.ca_cert {
        Some(path) => Some(
            std::fs::read(path).with_context(|| format!("reading --ca-cert {}", path.display()))?,
        ),
        None => None,
    };
    let ca_cert = ca_cert.as_deref();
    match cli.command {
        Command::Subscribe {
            channels,
            since,
            state_file,
            token,
            transport,
            count,
        } => {
            let options = SubscribeOptions {
                since,
                state_file,
                token,
                transport: transport.into(),
                count,
            };
            subscribe(&cli.url, ca_cert, channels, options).await
        }
        Command::Publish {
            channel,
            data,
            api_key,
            idempotency_key,
            key,
        } => {
            let body = PublishRequest {
                channel: Channel::new(&channel).context("the channel name")?,
                data: Payload::from_json(&data).context("the data must be JSON")?,
                idempotency_key: idempotency_key
                    .map(IdempotencyKey::new)
                    .transpose()
                    .context("the idempotency key")?,
                key: key.map(Key::new).transpose().context("the key")?,
            };
            publish(&cli.url, ca_cert, &body, &api_key).await
        }
    }
}

/// How `resync subscribe` follows.
struct SubscribeOptions {
    since: Option<String>,
    state_file: Option<std::path::PathBuf>,
    token: Option<String>,
    transport: TransportChoice,
    count: Option<u64>,
}

async fn subscribe(
    url: &str,
    ca_cert: Option<&[u8]>,
    channels: Vec<String>,
    options: SubscribeOptions,
) -> Result<()> {
    let SubscribeOptions {
        since,
        state_file,
        token,
        transport,
        count,
    } = options;
    let cursor = match since {
        Some(text) => Cursor::parse(&text).context("reading --since")?,
        None => Cursor::new(),
    };
    let mut builder = Client::builder(url).transport(transport);
    let mut positions = cursor.clone();
    if let Some(path) = state_file {
        let store = FileStore::open(&path).context("opening --state-file")?;
        for name in &channels {
            if let Ok(channel) = Channel::new(name)
                && positions.get(&channel).is_none()
                && let Some(position) = store.load(&channel)
            {
                positions.set(channel, position);
            }
        }
        builder = builder.position_store(std::sync::Arc::new(store));
    }
    if let Some(pem) = ca_cert {
        builder = builder.add_root_certificates_pem(pem);
    }
    if let Some(token) = token {
        builder = builder.token(token);
    }
    let client = builder.build().context("starting the client")?;
    let mut state = client.state();
    tokio::spawn(async move {
        while state.changed().await.is_ok() {
            let now = state.borrow_and_update().clone();
            eprintln!("resync: {}", describe(&now));
        }
    });
    let mut streams = SelectAll::new();
    for name in channels {
        let channel = Channel::new(&name).with_context(|| format!("channel {name:?}"))?;
        let mut subscription = client.subscribe(channel.clone());
        if let Some(position) = cursor.get(&channel) {
            subscription = subscription.since(position.clone());
        }
        streams.push(subscription);
    }
    let mut seen = 0u64;
    let stop = stop_signal();
    tokio::pin!(stop);
    loop {
        let update = tokio::select! {
            update = streams.next() => update,
            // Stopped: the subscriptions are dropped below, which keeps the positions of the
            // lines printed.
            () = &mut stop => break,
        };
        let Some(update) = update else { break };
        let line = match update? {
            Update::Event(event) => {
                positions.set(event.channel.clone(), event.position.clone());
                seen += 1;
                serde_json::json!({
                    "channel": event.channel,
                    "epoch": event.position.epoch,
                    "seq": event.position.seq,
                    "data": serde_json::from_str::<serde_json::Value>(event.data.as_str())?,
                    "cursor": positions.to_string(),
                })
            }
            Update::Reset { reason, position } => serde_json::json!({
                "type": "reset",
                "reason": reason,
                "position": position,
            }),
            // A keyed channel's state, a page a line: what a follower starts over from.
            Update::State {
                entries,
                position,
                more,
            } => serde_json::json!({
                "type": "state",
                "entries": entries,
                "position": position,
                "more": more,
            }),
            // Subscriptions here do not ask for members; printed if a later one does.
            Update::Members(members) => serde_json::json!({
                "type": "members",
                "members": members,
            }),
        };
        println!("{line}");
        if count.is_some_and(|count| seen >= count) {
            break;
        }
    }
    drop(streams);
    client.close();
    Ok(())
}

/// Ctrl-C or SIGTERM.
async fn stop_signal() {
    #[cfg(unix)]
    {
        let terminate = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut signal) => {
                    signal.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            () = terminate => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

fn describe(state: &ConnectionState) -> String {
    match state {
        ConnectionState::Connecting { transport } => {
            format!("connecting over {}", transport.as_str())
        }
        ConnectionState::Connected { transport } => {
            format!("connected over {}", transport.as_str())
        }
        ConnectionState::Reconnecting {
            attempt,
            delay,
            reason,
        } => {
            format!(
                "warning: {reason}; reconnecting in {:.1}s (attempt {})",
                delay.as_secs_f64(),
                attempt + 1
            )
        }
        ConnectionState::Closed { reason } => format!("closed: {reason}"),
    }
}

async fn publish(
    url: &str,
    ca_cert: Option<&[u8]>,
    body: &PublishRequest,
    api_key: &str,
) -> Result<()> {
    let endpoint = format!("{}/api/publish", url.trim_end_matches('/'));
    let mut http = reqwest::Client::builder().timeout(Duration::from_secs(10));
    if let Some(pem) = ca_cert {
        for certificate in
            reqwest::Certificate::from_pem_bundle(pem).context("reading --ca-cert")?
        {
            http = http.add_root_certificate(certificate);
        }
    }
    let response = http
        .build()?
        .post(&endpoint)
        .bearer_auth(api_key)
        .json(body)
        .send()
        .await
        .with_context(|| format!("posting to {endpoint}"))?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        bail!("publish failed ({status}): {text}");
    }
    println!("{text}");
    Ok(())
}
