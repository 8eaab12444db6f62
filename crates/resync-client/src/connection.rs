//! The connection task: connects, follows every registered channel, delivers updates, and
//! reconnects after failures according to the close-code table and the backoff.

use std::sync::Arc;
use std::time::Duration;

use resync_protocol::{Channel, CloseCode, IdempotencyKey, Payload, Position, ReconnectAdvice};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;

use crate::backoff::Backoff;
use crate::registry::Registry;
use crate::{ClientConfig, ConnectionState, Error, Result, TransportChoice, TransportKind};

/// Runs one session over a transport for the [`Manager`], which decides when and in which
/// order to try them. The transports implement the session; this module does not name them
/// (`transports.rs` does, above both), so they and it do not import each other.
pub(crate) trait Sessions {
    /// Connects over `kind` and follows the registered channels until the session ends.
    fn run<'a>(
        &'a self,
        kind: TransportKind,
        manager: &'a mut Manager,
    ) -> impl std::future::Future<Output = std::result::Result<SessionEnd, ConnectFailure>> + Send + 'a;
}

/// A publish waiting for a WebSocket connection.
pub(crate) struct PublishRequest {
    pub(crate) channel: Channel,
    pub(crate) data: Payload,
    pub(crate) idempotency_key: Option<IdempotencyKey>,
    pub(crate) reply: oneshot::Sender<Result<Position>>,
}

/// Why opening a connection failed.
#[derive(Debug)]
pub(crate) enum ConnectFailure {
    /// Something between us and the server refuses this transport: try the next one.
    Refused(String),
    /// The server could not be reached or broke off: back off and retry.
    Lost(String),
    /// The token was refused: refresh it, then retry.
    Unauthorized(String),
    /// The server refuses this client for good.
    Forbidden(String),
}

/// Why an established session ended.
#[derive(Debug)]
pub(crate) enum SessionEnd {
    /// The server closed with a code.
    Closed(CloseCode),
    /// The connection broke or went silent.
    Lost(String),
    /// The channel set changed and the transport needs a new request for it.
    Resubscribe,
    /// The server asked to reconnect after this long (SSE `retry:` at the end of a stream).
    RetryAfter(Duration),
    /// The token was refused mid-session.
    Unauthorized,
    /// The application closed the client.
    Shutdown,
}

pub(crate) struct Manager {
    pub(crate) config: ClientConfig,
    pub(crate) registry: Arc<Registry>,
    pub(crate) http: reqwest::Client,
    pub(crate) publishes: mpsc::Receiver<PublishRequest>,
    state: watch::Sender<ConnectionState>,
    backoff: Backoff,
    pub(crate) token: Option<String>,
    remembered: Option<TransportKind>,
    /// The TLS configuration of the WebSocket connector (the HTTP client has its own copy).
    pub(crate) tls: Arc<rustls::ClientConfig>,
    /// Why the last attempt failed or the last session ended, for the state.
    last_failure: Option<String>,
}

impl Manager {
    pub(crate) fn new(
        config: ClientConfig,
        registry: Arc<Registry>,
        state: watch::Sender<ConnectionState>,
        publishes: mpsc::Receiver<PublishRequest>,
    ) -> Result<Self> {
        let tls = crate::tls::client_config(&config.extra_roots)?;
        let http = reqwest::Client::builder()
            .connect_timeout(config.connect_timeout)
            .tcp_nodelay(true)
            .use_preconfigured_tls((*tls).clone())
            .build()
            .map_err(|error| Error::Tls(error.to_string()))?;
        Ok(Self {
            tls,
            last_failure: None,
            backoff: match config.rng_seed {
                Some(seed) => Backoff::with_seed(config.backoff, seed),
                None => Backoff::new(config.backoff),
            },
            token: config.token.clone(),
            http,
            config,
            registry,
            publishes,
            state,
            remembered: None,
        })
    }

    pub(crate) fn set_state(&self, state: ConnectionState) {
        self.state.send_replace(state);
    }

    /// The transports to try, in order.
    fn order(&self) -> Vec<TransportKind> {
        match self.config.transport {
            TransportChoice::Only(kind) => vec![kind],
            TransportChoice::Auto => {
                let mut order = vec![
                    TransportKind::WebSocket,
                    TransportKind::Sse,
                    TransportKind::LongPolling,
                ];
                if let Some(remembered) = self.remembered {
                    order.retain(|kind| *kind != remembered);
                    order.insert(0, remembered);
                }
                order
            }
        }
    }

    pub(crate) async fn refresh_token(&mut self) -> Result<()> {
        let Some(refresher) = self.config.refresher.clone() else {
            return Err(Error::Server {
                code: resync_protocol::ErrorCode::Unauthorized,
                message: "the server refused the token and there is no token refresher".to_owned(),
            });
        };
        match refresher().await {
            Ok(token) => {
                self.token = Some(token);
                Ok(())
            }
            Err(error) => Err(Error::Closed(format!("token refresh failed: {error}"))),
        }
    }

    pub(crate) async fn run(mut self, sessions: impl Sessions) {
        if self.token.is_none()
            && self.config.refresher.is_some()
            && self.refresh_token().await.is_err()
        {
            tracing::warn!(target: "resync::client", "initial token refresh failed; connecting without a token");
        }
        loop {
            if let Some(reason) = self.registry.closed() {
                return self.stop(reason, None).await;
            }
            // SSE and long polling need a channel to follow; WebSocket does not (publishes).
            if self.registry.snapshot().is_empty() && !self.wants_websocket_now() {
                tokio::select! {
                    _ = self.registry.changed.notified() => {}
                    request = self.publishes.recv() => {
                        if let Some(request) = request {
                            let _ = request.reply.send(Err(Error::PublishNeedsWebSocket("no transport yet")));
                        }
                    }
                }
                continue;
            }
            let delay = match self.connect_and_follow(&sessions).await {
                Ok(delay) => delay,
                Err(error) => {
                    let reason = error.to_string();
                    return self.stop(reason, Some(error)).await;
                }
            };
            if let Some(delay) = delay {
                let reason = self
                    .last_failure
                    .take()
                    .unwrap_or_else(|| "connection ended".to_owned());
                self.set_state(ConnectionState::Reconnecting {
                    attempt: self.backoff.attempt(),
                    delay,
                    reason,
                });
                self.wait(delay).await;
            }
        }
    }

    fn wants_websocket_now(&self) -> bool {
        matches!(self.order().first(), Some(TransportKind::WebSocket))
    }

    /// Waits `delay`, answering publishes that arrive meanwhile, unless the client is closed.
    async fn wait(&mut self, delay: Duration) {
        let deadline = Instant::now() + delay;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => return,
                _ = self.registry.changed.notified() => {
                    if self.registry.closed().is_some() {
                        return;
                    }
                }
            }
        }
    }

    /// Tries the transports in order and follows the channels over the first that connects.
    /// Returns the delay before the next attempt, or `None` to reconnect at once.
    async fn connect_and_follow(&mut self, sessions: &impl Sessions) -> Result<Option<Duration>> {
        let mut last_failure = None;
        for kind in self.order() {
            // SSE and long polling follow channels named in the request: with none registered
            // yet (a subscription registers when first polled), the server refuses them, and
            // the client would fall through to, and then remember, the last transport. A
            // refused WebSocket waits for a channel instead of skipping past SSE.
            if kind != TransportKind::WebSocket && self.registry.snapshot().is_empty() {
                // The WebSocket's own failure, if any, says more.
                last_failure.get_or_insert_with(|| "no channel to follow yet".to_owned());
                continue;
            }
            self.set_state(ConnectionState::Connecting { transport: kind });
            let started = Instant::now();
            let result = sessions.run(kind, self).await;
            match result {
                Ok(end) => {
                    if self.config.transport == TransportChoice::Auto {
                        self.remembered = Some(kind);
                    }
                    if started.elapsed() >= self.backoff.reset_after() {
                        self.backoff.reset();
                    }
                    tracing::debug!(target: "resync::client", transport = kind.as_str(), ?end, "session ended");
                    return self.after_session(end).await;
                }
                Err(ConnectFailure::Refused(reason)) => {
                    tracing::debug!(target: "resync::client", transport = kind.as_str(), %reason, "transport refused");
                    last_failure = Some(reason);
                }
                Err(ConnectFailure::Lost(reason)) => {
                    tracing::debug!(target: "resync::client", transport = kind.as_str(), %reason, "connect failed");
                    last_failure = Some(reason);
                    // The server is unreachable, not this transport: no point trying others.
                    break;
                }
                Err(ConnectFailure::Unauthorized(reason)) => {
                    tracing::debug!(target: "resync::client", %reason, "token refused");
                    self.last_failure = Some(format!("token refused: {reason}"));
                    self.refresh_token().await?;
                    return Ok(Some(self.backoff.next_delay()));
                }
                Err(ConnectFailure::Forbidden(reason)) => {
                    return Err(Error::Server {
                        code: resync_protocol::ErrorCode::Forbidden,
                        message: reason,
                    });
                }
            }
        }
        tracing::debug!(target: "resync::client", reason = ?last_failure, "no transport connected");
        self.last_failure = last_failure;
        Ok(Some(self.backoff.next_delay()))
    }

    async fn after_session(&mut self, end: SessionEnd) -> Result<Option<Duration>> {
        match end {
            SessionEnd::Shutdown => Err(Error::Closed(
                self.registry
                    .closed()
                    .unwrap_or_else(|| "closed".to_owned()),
            )),
            SessionEnd::Resubscribe => Ok(None),
            SessionEnd::RetryAfter(delay) => Ok(Some(
                delay.min(self.config.backoff.max) + self.backoff.soon() / 2,
            )),
            SessionEnd::Lost(reason) => {
                tracing::debug!(target: "resync::client", %reason, "connection lost");
                self.last_failure = Some(format!("connection lost: {reason}"));
                Ok(Some(self.backoff.next_delay()))
            }
            SessionEnd::Unauthorized => {
                self.refresh_token().await?;
                Ok(Some(self.backoff.soon()))
            }
            SessionEnd::Closed(code) => {
                self.last_failure = Some(format!("closed {} ({})", code.0, code.reason()));
                self.after_close(code).await
            }
        }
    }

    /// What the close-code table says to do after the server closed with `code`.
    async fn after_close(&mut self, code: resync_protocol::CloseCode) -> Result<Option<Duration>> {
        match code.advice() {
            ReconnectAdvice::Stop => Err(Error::Terminal(code)),
            ReconnectAdvice::Backoff { .. } => Ok(Some(self.backoff.next_delay())),
            ReconnectAdvice::Soon => Ok(Some(self.backoff.soon())),
            ReconnectAdvice::RefreshTokenThenReconnect => {
                self.refresh_token().await?;
                Ok(Some(self.backoff.soon()))
            }
        }
    }

    async fn stop(&mut self, reason: String, error: Option<Error>) {
        tracing::debug!(target: "resync::client", %reason, "client stopped");
        self.set_state(ConnectionState::Closed {
            reason: reason.clone(),
        });
        // One error for every subscription, those that come after included.
        let error = error.unwrap_or_else(|| Error::Closed(reason.clone()));
        self.registry.end_with(&reason, error.clone());
        self.registry.fail_all(error).await;
        self.publishes.close();
        while let Some(request) = self.publishes.recv().await {
            let _ = request.reply.send(Err(Error::Closed(reason.clone())));
        }
    }

    /// Builds `base + path` with the given query pairs (and the token for transports that
    /// cannot send headers is never put in the URL: every request carries a header).
    pub(crate) fn url(&self, path: &str, query: &[(&str, String)]) -> Result<reqwest::Url> {
        let mut url = self
            .config
            .base_url
            .join(path)
            .map_err(|error| Error::InvalidUrl(error.to_string()))?;
        if !query.is_empty() {
            let mut pairs = url.query_pairs_mut();
            for (name, value) in query {
                pairs.append_pair(name, value);
            }
        }
        Ok(url)
    }

    /// The `channel=` pairs for every followed channel, plus the cursor of known positions.
    pub(crate) fn channel_query(&self) -> (Vec<Channel>, Vec<(&'static str, String)>) {
        let channels: Vec<Channel> = self
            .registry
            .snapshot()
            .into_iter()
            .map(|(channel, _)| channel)
            .collect();
        let mut query: Vec<(&'static str, String)> = channels
            .iter()
            .map(|channel| ("channel", channel.to_string()))
            .collect();
        let cursor = self.registry.cursor();
        if !cursor.is_empty() {
            query.push(("cursor", cursor.to_string()));
        }
        let state: Vec<String> = channels
            .iter()
            .filter(|channel| self.registry.wants_state(channel))
            .map(Channel::to_string)
            .collect();
        if !state.is_empty() {
            query.push(("state", state.join(",")));
        }
        (channels, query)
    }

    /// Classifies an HTTP status of a refused request.
    pub(crate) fn failure_for_status(status: u16, body: &str) -> ConnectFailure {
        match status {
            401 => ConnectFailure::Unauthorized(body.to_owned()),
            403 if body.contains("\"forbidden\"") => ConnectFailure::Forbidden(body.to_owned()),
            429 | 500..=599 => ConnectFailure::Lost(format!("server answered {status}: {body}")),
            _ => ConnectFailure::Refused(format!("server answered {status}: {body}")),
        }
    }
}
