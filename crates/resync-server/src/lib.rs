//! The resync reference server as a library: settings, the HTTP API, and [`start`], which
//! runs the server on its own thread (for tests and embedding). The `resync-server` binary is
//! a thin `main` around [`run`].

mod api;
mod assets;
mod listener;
mod memory;
mod settings;
mod tls;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::body::MessageBody;
use actix_web::dev::{ServerHandle, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::middleware::{Next, from_fn};
use actix_web::{App, HttpResponse, web};
use anyhow::{Context, Result};
use resync_actix::{AllowAllSubscribers, ChannelPattern, JwtAuthorizer, NamespacePolicy, Resync};
use resync_broker::{Broker, MemoryBroker, Retention};
use resync_broker_disk::{DiskBroker, Durability};
use resync_broker_redis::RedisBroker;
use tracing::Instrument;

pub use settings::{Args, BrokerKind, DurabilityKind, LogFormat, NamespaceSettings, Settings};

fn generate_api_key() -> Result<String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes)
        .map_err(|error| anyhow::anyhow!("no randomness for the API key: {error}"))?;
    Ok(bytes.iter().map(|byte| format!("{byte:02x}")).collect())
}

/// The shortest API key accepted outside the demo, and the fewest different bytes in it: the
/// key publishes to every channel, and a short or uniform one is guessed.
const MIN_API_KEY_BYTES: usize = 16;
const MIN_API_KEY_DISTINCT_BYTES: usize = 6;

/// Refuses an API key that is easy to guess, except with `--demo`, whose openness is the
/// point (the README's `dev-key`): then it is only a warning.
fn check_api_key(key: &str, demo: bool) -> Result<()> {
    let distinct = resync_actix::distinct_bytes(key.as_bytes());
    if key.len() >= MIN_API_KEY_BYTES && distinct >= MIN_API_KEY_DISTINCT_BYTES {
        return Ok(());
    }
    let why = format!(
        "the API key has {} bytes, {distinct} of them different; at least {MIN_API_KEY_BYTES} \
         bytes with {MIN_API_KEY_DISTINCT_BYTES} different ones are required (for example the \
         output of `openssl rand -hex 24`), or leave it unset for a generated one",
        key.len()
    );
    if demo {
        tracing::warn!("{why}; accepted because the demo is on");
        return Ok(());
    }
    anyhow::bail!("refusing the API key (--api-key, RESYNC_API_KEY, api_key): {why}")
}

/// Channel patterns from settings; empty entries (`--anonymous-subscribe ""`) mean none.
fn patterns(patterns: &[String]) -> Vec<ChannelPattern> {
    patterns
        .iter()
        .filter(|pattern| !pattern.is_empty())
        .map(ChannelPattern::new)
        .collect()
}

/// A server that is bound and running.
#[derive(Clone, Debug)]
pub struct RunningServer {
    /// The addresses it listens on.
    pub addresses: Vec<std::net::SocketAddr>,
    /// The transports, for shutdown and metrics.
    pub resync: Resync,
    /// The in-memory broker, when it is the backend (for its own figures: channels, history
    /// bytes); `None` on Redis.
    pub memory_broker: Option<MemoryBroker>,
    /// The API key for publishing.
    pub api_key: String,
    /// Whether it serves TLS.
    pub tls: bool,
    /// The address of the API's own listener (`--api-listen`), if it has one.
    pub api_address: Option<std::net::SocketAddr>,
    handle: ServerHandle,
    api_handle: Option<ServerHandle>,
}

impl RunningServer {
    /// The first listening address as `http://host:port` (`https://` with TLS).
    pub fn base_url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addresses[0])
    }

    /// A handle that stops the server.
    pub fn handle(&self) -> ServerHandle {
        self.handle.clone()
    }
}

/// Opens the disk broker, waiting up to `data_dir_wait_secs` while another process holds the
/// data directory: in a deploy the next process may start while the previous one drains.
fn open_waiting(
    builder: &resync_broker_disk::DiskBrokerBuilder,
    settings: &Settings,
) -> std::result::Result<DiskBroker, resync_broker_disk::OpenError> {
    let deadline = Instant::now() + Duration::from_secs(settings.data_dir_wait_secs);
    let mut told = false;
    loop {
        match builder.clone().open() {
            Err(resync_broker_disk::OpenError::InUse { .. }) if Instant::now() < deadline => {
                if !told {
                    tracing::warn!(
                        data_dir = %settings.data_dir.display(),
                        wait_secs = settings.data_dir_wait_secs,
                        "the data directory is in use by another process (a previous one still draining?); waiting for it"
                    );
                    told = true;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// Binds the server; it serves once the returned future is awaited.
/// Must be called inside an actix runtime.
pub fn bind(settings: &Settings) -> Result<(RunningServer, actix_server::Server)> {
    let api_key = match &settings.api_key {
        Some(key) if !key.is_empty() => {
            check_api_key(key, settings.demo)?;
            key.clone()
        }
        _ => {
            let key = generate_api_key()?;
            tracing::warn!(api_key = %key, "no API key configured (RESYNC_API_KEY); generated one for this run");
            key
        }
    };
    let retention = Retention::default()
        .with_max_events(settings.history_size)
        .with_max_age(Some(Duration::from_secs(settings.history_max_age_secs)))
        .with_max_bytes(Some(settings.history_max_bytes_per_channel));
    // A namespace's own history size or age, over the server-wide retention.
    let namespace_retention: Vec<(String, Retention)> = settings
        .namespaces
        .iter()
        .filter(|(_, namespace)| {
            namespace.history_size.is_some() || namespace.history_max_age_secs.is_some()
        })
        .map(|(name, namespace)| {
            let mut own = retention;
            if let Some(size) = namespace.history_size {
                own = own.with_max_events(size);
            }
            if let Some(age) = namespace.history_max_age_secs {
                own = own.with_max_age(Some(Duration::from_secs(age)));
            }
            (name.clone(), own)
        })
        .collect();
    if settings.max_channels_per_connection > resync_protocol::MAX_CURSOR_CHANNELS {
        anyhow::bail!(
            "max_channels_per_connection is {}; the most is {} (a cursor holds at most that many channels)",
            settings.max_channels_per_connection,
            resync_protocol::MAX_CURSOR_CHANNELS
        );
    }
    // Everything a setting can get wrong is checked before the store is opened (or made).
    let token_authorizer = token_authorizer(settings)?;
    let tls = match (&settings.tls_cert, &settings.tls_key) {
        (Some(cert), Some(key)) => Some(Arc::new(tls::server_config(cert, key)?)),
        (None, None) => None,
        _ => anyhow::bail!("TLS needs both a certificate (--tls-cert) and a key (--tls-key)"),
    };
    let keyed_limits = resync_broker::KeyedLimits {
        max_keys: settings.keyed_max_keys.max(1),
        max_bytes: settings.keyed_max_bytes.max(1),
        key_ttl: settings
            .keyed_key_ttl_secs
            .map(|secs| Duration::from_secs(secs.max(1))),
        tombstone_ttl: Duration::from_secs(settings.keyed_tombstone_ttl_secs.max(1)),
    };
    let (broker, memory_broker): (Arc<dyn Broker>, _) = match settings.broker {
        BrokerKind::Memory => {
            let mut memory = MemoryBroker::builder();
            for (name, own) in &namespace_retention {
                memory = memory.namespace_retention(name.clone(), *own);
            }
            let memory = memory
                .retention(retention)
                .max_history_bytes(Some(settings.history_max_bytes))
                .max_channels(settings.max_channels.max(1))
                .keyed_limits(keyed_limits)
                .subscriber_queue(settings.subscriber_queue)
                .build();
            (Arc::new(memory.clone()), Some(memory))
        }
        BrokerKind::Disk => {
            let durability = match settings.durability {
                DurabilityKind::Always => Durability::Always,
                DurabilityKind::Periodic => {
                    Durability::Periodic(Duration::from_millis(settings.sync_interval_ms.max(1)))
                }
                DurabilityKind::Never => Durability::Never,
            };
            let mut disk = DiskBroker::builder(settings.data_dir.clone());
            for (name, own) in &namespace_retention {
                disk = disk.namespace_retention(name.clone(), *own);
            }
            if let Some(boot) = &settings.boot_id {
                disk = disk.boot_id(boot.clone());
            }
            let disk = disk
                .retention(retention)
                .durability(durability)
                .max_history_bytes(Some(settings.store_max_bytes))
                .max_channels(settings.max_channels.max(1))
                .keyed_limits(keyed_limits)
                .subscriber_queue(settings.subscriber_queue);
            let disk = open_waiting(&disk, settings).with_context(|| {
                format!("opening the disk broker in {}", settings.data_dir.display())
            })?;
            (Arc::new(disk), None)
        }
        BrokerKind::Redis => (
            Arc::new(
                namespace_retention
                    .iter()
                    .fold(
                        if settings.redis_cluster_nodes.is_empty() {
                            RedisBroker::builder(settings.redis_url.clone())
                        } else {
                            RedisBroker::cluster_builder(settings.redis_cluster_nodes.clone())
                        },
                        |builder, (name, own)| builder.namespace_retention(name.clone(), *own),
                    )
                    .key_prefix(settings.redis_prefix.clone())
                    .presence_ttl(Duration::from_secs(settings.presence_ttl_secs.max(1)))
                    .pool_size(settings.redis_pool_size)
                    .retention(retention)
                    .keyed_limits(keyed_limits)
                    .subscriber_queue(settings.subscriber_queue)
                    .build()
                    .context("configuring the redis broker")?,
            ),
            None,
        ),
    };
    let mut config = settings.transport_config();
    config.namespaces = settings
        .namespaces
        .iter()
        .map(|(name, namespace)| {
            let policy = NamespacePolicy {
                anonymous_subscribe: namespace.anonymous_subscribe,
                anonymous_publish: namespace.anonymous_publish,
                client_publish: namespace.client_publish,
                presence: namespace.presence,
                join_leave: namespace.join_leave,
                keyed: namespace.keyed.unwrap_or(false),
            };
            (name.clone(), policy)
        })
        .collect();
    let mut builder = Resync::builder_shared(broker.clone()).config(config);
    if let Some(url) = &settings.proxy_url {
        let options = resync_actix::proxy::ProxyOptions {
            connect: settings.proxy_connect,
            refresh: settings.proxy_refresh,
            namespaces: settings
                .namespaces
                .iter()
                .filter(|(_, namespace)| namespace.proxy == Some(true))
                .map(|(name, _)| name.clone())
                .collect(),
            timeout: Duration::from_millis(settings.proxy_timeout_ms.max(1)),
            max_in_flight: settings.proxy_max_in_flight.max(1),
            fail_open: settings.proxy_fail_open,
        };
        let proxy = resync_actix::proxy::HttpProxy::new(url.clone())
            .context("setting up the application proxy (--proxy-url)")?;
        builder = builder.proxy(proxy, options);
    }
    // The demo page's chat publishes anonymously; nothing else does unless configured.
    let mut anonymous_publish = settings.anonymous_publish.clone();
    // A namespace open to anonymous clients lets them past authentication (its rules decide
    // per channel after that).
    // Unset: everyone may subscribe without a token when no token key is configured; with
    // one, a request without a token is a 401, as `docs/protocol.md` says.
    let has_token_keys = settings.jwt_secret.is_some()
        || !settings.jwt_public_keys.is_empty()
        || settings.jwks_url.is_some();
    let mut anonymous_subscribe = match &settings.anonymous_subscribe {
        Some(patterns) => patterns.clone(),
        None if has_token_keys => Vec::new(),
        None => vec!["*".to_owned()],
    };
    let everything = |patterns: &[String]| patterns.iter().any(|pattern| pattern == "*");
    for (name, namespace) in &settings.namespaces {
        if namespace.anonymous_subscribe == Some(true) && !everything(&anonymous_subscribe) {
            anonymous_subscribe.push(format!("{name}:*"));
        }
        if namespace.anonymous_publish == Some(true) && !everything(&anonymous_publish) {
            anonymous_publish.push(format!("{name}:*"));
        }
    }
    if settings.demo && !anonymous_publish.iter().any(|pattern| pattern == "demo:*") {
        anonymous_publish.push("demo:*".to_owned());
    }
    let max_token_lifetime = settings.max_token_lifetime_secs.map(Duration::from_secs);
    let builder = match token_authorizer {
        Some(authorizer) => builder.authorizer(
            authorizer
                .max_token_lifetime(max_token_lifetime)
                .anonymous_subscribe(patterns(&anonymous_subscribe))
                .anonymous_publish(patterns(&anonymous_publish)),
        ),
        None if patterns(&anonymous_subscribe) == [ChannelPattern::new("*")]
            && anonymous_publish.is_empty() =>
        {
            builder.authorizer(AllowAllSubscribers)
        }
        // Anonymous patterns without token keys: a JWT authorizer that no token can pass.
        None => builder.authorizer(
            JwtAuthorizer::with_public_keys([])
                .anonymous_subscribe(patterns(&anonymous_subscribe))
                .anonymous_publish(patterns(&anonymous_publish)),
        ),
    };
    let resync = builder.build();
    let state = web::Data::new(api::ApiState {
        api_key: api_key.clone(),
        publisher: resync.publisher(),
        broker,
        metrics: resync.metrics().clone(),
        max_body_bytes: settings.max_body_bytes,
        max_replay: settings.max_replay,
    });

    let edge = resync.edge();
    let header_timeout = Duration::from_secs(settings.request_header_timeout_secs.max(1));
    // The API's own listener: one worker thread that holds no client connections, so a
    // publish is read, stored and answered without waiting for a worker busy writing a burst
    // to thousands of sockets (issue 17: p50 38 ms under load against 0.2 ms idle).
    let api_server = match settings.api_listen {
        Some(address) => {
            let api_state = state.clone();
            let socket = listener::tcp_listener(address)
                .with_context(|| format!("binding the API listener {address}"))?;
            let address = socket.local_addr().ok();
            let builder = actix_server::Server::build()
                .disable_signals()
                .shutdown_timeout(settings.shutdown_timeout_secs)
                .workers(1);
            let builder = listener::listen(
                builder,
                listener::Listener {
                    name: "resync-api",
                    socket,
                    tls: None,
                    header_timeout,
                },
                edge.clone(),
                move || {
                    App::new()
                        .app_data(api_state.clone())
                        .wrap(from_fn(request_log))
                        .wrap(from_fn(resync_actix::edge::track))
                        .configure(api::configure)
                        .default_service(web::to(api::not_found))
                },
            )
            .context("serving the API listener")?;
            Some((address, builder.run()))
        }
        None => None,
    };

    let traffic = web::Data::new(Traffic::default());
    let app_traffic = traffic.clone();
    let app_resync = resync.clone();
    let demo = settings.demo;
    let make_app = move || {
        let resync = app_resync.clone();
        let mut app = App::new()
            .app_data(state.clone())
            .app_data(app_traffic.clone())
            .wrap(from_fn(request_log))
            // Outermost: every response, errors included, is held to the edge's bounds.
            .wrap(from_fn(resync_actix::edge::track))
            .configure(|config| assets::configure(config, demo));
        if !demo {
            // Without the demo, `/` says what the server offers instead of a 404.
            app = app.route("/", web::get().to(index));
        }
        app.route("/help", web::get().to(index))
            .configure(api::configure)
            .configure(move |config| resync.configure(config))
            .default_service(web::to(api::not_found))
    };
    let serves_tls = tls.is_some();
    let socket = listener::tcp_listener(settings.listen)
        .with_context(|| format!("binding {}", settings.listen))?;
    let addresses = vec![
        socket
            .local_addr()
            .with_context(|| format!("binding {}", settings.listen))?,
    ];
    let builder = actix_server::Server::build()
        .disable_signals()
        .shutdown_timeout(settings.shutdown_timeout_secs)
        .workers(
            settings
                .workers
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, usize::from)),
        );
    let builder = listener::listen(
        builder,
        listener::Listener {
            name: "resync",
            socket,
            tls,
            header_timeout,
        },
        edge,
        make_app,
    )
    .with_context(|| format!("serving {}", settings.listen))?;
    let server = builder.run();
    if settings.demo {
        let publisher = resync.publisher();
        actix_web::rt::spawn(demo_ticker(publisher));
    }
    if settings.log_summary_secs > 0 {
        actix_web::rt::spawn(log_summaries(
            resync.metrics().clone(),
            traffic.into_inner(),
            Duration::from_secs(settings.log_summary_secs),
        ));
    }
    let (api_address, api_handle) = match api_server {
        Some((address, api)) => {
            let handle = api.handle();
            actix_web::rt::spawn(async move {
                if let Err(error) = api.await {
                    tracing::error!(%error, "the API listener failed");
                }
            });
            (address, Some(handle))
        }
        None => (None, None),
    };
    let running = RunningServer {
        addresses,
        resync,
        memory_broker,
        api_key,
        tls: serves_tls,
        api_address,
        handle: server.handle(),
        api_handle,
    };
    Ok((running, server))
}

/// What the demo page's live feed shows.
#[derive(serde::Serialize)]
struct DemoTick {
    /// Ticks since the server started.
    tick: u64,
    /// When, in seconds since the Unix epoch.
    at: u64,
}

/// Publishes a tick on `demo:ticker` every two seconds, so the demo page shows a live feed.
async fn demo_ticker(publisher: resync_actix::Publisher) {
    let Ok(channel) = resync_protocol::Channel::new("demo:ticker") else {
        return;
    };
    let mut interval = tokio::time::interval(Duration::from_secs(2));
    let mut tick = 0u64;
    loop {
        interval.tick().await;
        tick += 1;
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_secs());
        if let Err(error) = publisher.publish(&channel, &DemoTick { tick, at }).await {
            tracing::debug!(%error, "demo tick not published");
        }
    }
}

/// Requests answered, for the periodic summary (per-request lines are debug).
#[derive(Debug, Default)]
struct Traffic {
    requests: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

/// One info line per period with what happened in it, instead of a line per request,
/// publish and subscribe (a load test once wrote ~100 MB of those). Silent while idle.
async fn log_summaries(
    metrics: Arc<resync_actix::Metrics>,
    traffic: Arc<Traffic>,
    period: Duration,
) {
    use resync_actix::Transport;
    use std::sync::atomic::Ordering;
    let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    let (mut published, mut delivered) = (metrics.events_published(), metrics.events_delivered());
    loop {
        interval.tick().await;
        let requests = traffic.requests.swap(0, Ordering::Relaxed);
        let failed = traffic.failed.swap(0, Ordering::Relaxed);
        let (now_published, now_delivered) =
            (metrics.events_published(), metrics.events_delivered());
        let open = [Transport::WebSocket, Transport::Sse, Transport::Poll]
            .map(|transport| metrics.open_connections(transport));
        let busy = requests > 0 || now_published > published || open.iter().any(|count| *count > 0);
        if busy {
            tracing::info!(
                period_secs = period.as_secs(),
                websocket = open[0],
                sse = open[1],
                poll = open[2],
                published = now_published - published,
                delivered = now_delivered - delivered,
                requests,
                failed_requests = failed,
                "traffic"
            );
        }
        (published, delivered) = (now_published, now_delivered);
    }
}

/// Stops accepting connections at once, tells every connected client to reconnect (spread
/// over the shutdown spread), and returns when the last connection has closed or the
/// shutdown timeout has passed.
///
/// The listener closes first so that a client coming back meets a refused connection, a
/// network error that `EventSource` and every resync client retry, rather than an answer from
/// a process on its way out (a non-200 answer would close an `EventSource` for good).
pub async fn drain_then_stop(resync: Resync, handle: ServerHandle) {
    // The stop command is sent now; workers then drain their connections (at most the
    // shutdown timeout) while the spread closes them. The transports learn of the drain in
    // the same poll, before the accept thread has closed the listener.
    let stopped = handle.stop(true);
    resync.shutdown();
    stopped.await;
    // Only now: closing the broker ends subscriptions, which would cut streams still
    // waiting for their moment in the spread.
    resync.broker().close().await;
}

/// Runs the server until a signal stops it.
pub async fn run(settings: Settings) -> Result<()> {
    let shutdown_signal = shutdown_signal();
    let (running, server) = bind(&settings)?;
    memory::start_trimming();
    tracing::info!(addresses = ?running.addresses, broker = ?settings.broker, "resync-server listening");
    // The address on its own line, for scripts and tests that start the server on port 0.
    let scheme = if running.tls { "https" } else { "http" };
    for address in &running.addresses {
        println!("listening on {scheme}://{address}");
    }
    if let Some(address) = running.api_address {
        tracing::info!(%address, "HTTP API listening on its own worker");
        println!("api listening on http://{address}");
    }
    actix_web::rt::spawn(async move {
        shutdown_signal.await;
        tracing::info!("shutting down: listener closed, telling clients to reconnect");
        // The API listener last: on a broker that outlives the process, publishes keep
        // working while clients drain (on the memory broker they are refused from the start
        // of the drain: `Publisher::send`).
        let api_handle = running.api_handle.clone();
        drain_then_stop(running.resync, running.handle).await;
        if let Some(api) = api_handle {
            api.stop(true).await;
        }
    });
    server.await.context("server failed")?;
    tracing::info!("stopped");
    Ok(())
}

/// Starts a server on its own thread and returns once it listens: for tests and embedding.
pub fn start(settings: Settings) -> Result<(RunningServer, std::thread::JoinHandle<()>)> {
    let (sender, receiver) = std::sync::mpsc::channel();
    let thread = std::thread::spawn(move || {
        actix_web::rt::System::new().block_on(async move {
            match bind(&settings) {
                Ok((running, server)) => {
                    let _ = sender.send(Ok(running));
                    if let Err(error) = server.await {
                        tracing::error!(%error, "test server failed");
                    }
                }
                Err(error) => {
                    let _ = sender.send(Err(error));
                }
            }
        });
    });
    let server = receiver
        .recv()
        .context("server thread died while starting")??;
    Ok((server, thread))
}

/// Completes at SIGTERM or Ctrl-C. Installed before the server says it listens: a signal that
/// came before the handler would end the process the default way, with no drain.
fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    #[cfg(unix)]
    let terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate());
    async move {
        #[cfg(unix)]
        match terminate {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = terminate.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the server");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
        #[cfg(not(unix))]
        let _ = tokio::signal::ctrl_c().await;
    }
}

async fn index() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain; charset=utf-8").body(
        "resync-server\n\n\
         GET  /sse?channel=NAME         Server-Sent Events\n\
         GET  /ws                       WebSocket\n\
         GET  /poll?channel=NAME        long polling\n\
         POST /api/publish              {\"channel\":…,\"data\":…} with Authorization: Bearer <API key>\n\
         GET  /api/history?channel=NAME&since=EPOCH:SEQ\n\
         GET  /api/channels/NAME  /api/channels/NAME/presence\n\
         POST /api/users/USER/disconnect  /api/users/USER/unsubscribe\n\
         GET  /healthz /readyz /metrics\n",
    )
}

/// Gives every request an id (kept from `X-Request-Id` when the client sent one), returns it
/// in the response, and logs one line per request with tokens redacted from the query.
async fn request_log(
    request: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    static REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    let request_id = request
        .headers()
        .get(&REQUEST_ID)
        .and_then(|value| value.to_str().ok())
        .filter(|value| value.len() <= 64 && value.bytes().all(|byte| byte.is_ascii_graphic()))
        .map_or_else(|| format!("{:016x}", fastrand_u64()), str::to_owned);
    let method = request.method().clone();
    let query = request.query_string();
    let target = if query.is_empty() {
        request.path().to_owned()
    } else {
        format!("{}?{}", request.path(), resync_actix::redact_query(query))
    };
    let started = Instant::now();
    let span = tracing::info_span!("request", request_id = %request_id);
    // Attached to the future, not entered across its awaits: an entered guard would mark
    // whatever else runs on this worker meanwhile as part of this request.
    async move {
        let mut response = next.call(request).await?;
        if let Ok(value) = HeaderValue::from_str(&request_id) {
            response.headers_mut().insert(REQUEST_ID.clone(), value);
        }
        log_response(&response, &method, &target, started);
        Ok(response)
    }
    .instrument(span)
    .await
}

/// Counts the request and logs its outcome: a client's mistakes (4xx) at debug, or one
/// client could fill the log; the server's own failures as warnings.
fn log_response<B>(
    response: &ServiceResponse<B>,
    method: &actix_web::http::Method,
    target: &str,
    started: Instant,
) {
    let status = response.status().as_u16();
    let failed = response.status().is_client_error() || response.status().is_server_error();
    if let Some(traffic) = response.request().app_data::<web::Data<Traffic>>() {
        traffic
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if failed {
            traffic
                .failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let elapsed_ms = started.elapsed().as_millis() as u64;
    if failed {
        let reason = response
            .response()
            .error()
            .map(ToString::to_string)
            .unwrap_or_default();
        if response.status().is_server_error() {
            tracing::warn!(%method, %target, status, elapsed_ms, error = %reason, "request failed");
        } else {
            tracing::debug!(%method, %target, status, elapsed_ms, error = %reason, "request refused");
        }
    } else {
        tracing::debug!(%method, %target, status, elapsed_ms, "request");
    }
}

fn fastrand_u64() -> u64 {
    let mut bytes = [0u8; 8];
    // Request ids need uniqueness, not secrecy; fall back to the clock if randomness fails.
    if getrandom::fill(&mut bytes).is_err() {
        return Instant::now().elapsed().as_nanos() as u64 ^ u64::from(std::process::id());
    }
    u64::from_le_bytes(bytes)
}

/// The token verifier the settings ask for: an HS256 secret, PEM public keys and a JWKS URL,
/// any of them together, with the `iss` and `aud` checks; `None` when no key is configured.
fn token_authorizer(settings: &Settings) -> Result<Option<JwtAuthorizer>> {
    let mut authorizer = match &settings.jwt_secret {
        Some(secret) => JwtAuthorizer::new(secret.as_bytes().to_vec())
            .context("refusing the JWT secret (--jwt-secret, RESYNC_JWT_SECRET, jwt_secret)")?,
        None => JwtAuthorizer::with_public_keys([]),
    };
    for path in &settings.jwt_public_keys {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the JWT public key {}", path.display()))?;
        let key = resync_actix::jwt::VerifyingKey::from_pem(&pem, None)
            .with_context(|| format!("reading the JWT public key {}", path.display()))?;
        authorizer = authorizer.public_key(key);
    }
    if let Some(url) = &settings.jwks_url {
        let mut config = resync_actix::jwks::JwksConfig::new(url.clone());
        config.cache = Duration::from_secs(settings.jwks_cache_secs.max(1));
        config.min_refetch = Duration::from_millis(settings.jwks_min_refetch_ms);
        authorizer = authorizer
            .jwks(resync_actix::jwks::Jwks::new(config).context("setting up the JWKS client")?);
    }
    if settings.jwt_secret.is_none()
        && settings.jwt_public_keys.is_empty()
        && settings.jwks_url.is_none()
    {
        return Ok(None);
    }
    Ok(Some(authorizer.expect(resync_actix::jwt::Expectations {
        issuer: settings.jwt_issuer.clone(),
        audience: settings.jwt_audience.clone(),
    })))
}
