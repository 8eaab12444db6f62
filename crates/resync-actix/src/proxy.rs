//! The application's backend in the loop: on connect, subscribe, client publish and refresh,
//! resync can ask the application (an [`AppProxy`], such as `HttpProxy` with the `proxy`
//! feature) and follow its answer: allow, deny with a reason, attach an identity, rewrite the
//! published data.
//!
//! Never on the delivery path: only a connection's own requests wait for their answer. Every
//! call has a deadline and a bounded number of calls are in flight at once, of which one
//! client address may hold only a share ([`ProxyOptions::max_in_flight`] / 8, at least one):
//! past either, a call fails as a timeout would, so one address cannot take the slots of
//! everyone else. A failed call follows the failure policy: closed by default, and refused
//! as `unavailable` ("try again later"), never as `forbidden`: an SSE client is told to
//! retry, not to give up for good. What the application answered on connect (and refresh)
//! stays the connection's rules until it answers otherwise (`Narrowing`).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use resync_protocol::{Channel, ErrorCode, Payload};

use crate::auth::{ChannelPattern, Identity};
use crate::error::ApiError;

pub use resync_protocol::bodies::{ProxyAnswer, ProxyRequest};

/// A call to the application failed (no answer in time, an error status, an unreadable answer).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the application's proxy failed: {0}")]
pub struct ProxyError(pub String);

/// The application's side of the proxy.
#[async_trait]
pub trait AppProxy: Send + Sync + 'static {
    /// Answers one request.
    async fn ask(&self, request: &ProxyRequest) -> Result<ProxyAnswer, ProxyError>;
}

/// What is proxied, and what a failed call means.
#[derive(Clone, Debug)]
pub struct ProxyOptions {
    /// Ask on every connect. Defaults to false.
    pub connect: bool,
    /// Ask on every WebSocket refresh. Defaults to false.
    pub refresh: bool,
    /// Namespaces whose subscribes and client publishes are asked about. Defaults to none.
    pub namespaces: HashSet<String>,
    /// The deadline of one call. Defaults to 1 second.
    pub timeout: Duration,
    /// Calls in flight at once; past it, a call fails as a timeout would. One client address
    /// may hold an eighth of them (at least one). Defaults to 64.
    pub max_in_flight: usize,
    /// Let requests through when a call fails (`true`), or refuse them (`false`, the
    /// default: an outage of the application's backend must not open its channels).
    pub fail_open: bool,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            connect: false,
            refresh: false,
            namespaces: HashSet::new(),
            timeout: Duration::from_secs(1),
            max_in_flight: 64,
            fail_open: false,
        }
    }
}

/// The proxy as the transports use it.
pub(crate) struct ProxyGate {
    proxy: Arc<dyn AppProxy>,
    options: ProxyOptions,
    in_flight: tokio::sync::Semaphore,
    /// Calls in flight by client address, each at most `address_share`.
    by_address: std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>,
    address_share: usize,
}

/// A call's place in its address's share, given back when dropped.
struct AddressSlot<'a> {
    gate: &'a ProxyGate,
    address: std::net::IpAddr,
}

impl Drop for AddressSlot<'_> {
    fn drop(&mut self) {
        let mut by_address = self.gate.lock_addresses();
        if let Some(count) = by_address.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                by_address.remove(&self.address);
            }
        }
    }
}

impl ProxyGate {
    pub(crate) fn new(proxy: Arc<dyn AppProxy>, options: ProxyOptions) -> Self {
        let slots = options.max_in_flight.max(1);
        Self {
            in_flight: tokio::sync::Semaphore::new(slots),
            by_address: std::sync::Mutex::default(),
            address_share: (slots / 8).max(1),
            proxy,
            options,
        }
    }

    fn lock_addresses(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<std::net::IpAddr, usize>> {
        self.by_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A place in `address`'s share of the calls, or `None` when it holds its share.
    fn address_slot(&self, address: std::net::IpAddr) -> Option<AddressSlot<'_>> {
        let mut by_address = self.lock_addresses();
        let count = by_address.entry(address).or_default();
        if *count >= self.address_share {
            return None;
        }
        *count += 1;
        Some(AddressSlot {
            gate: self,
            address,
        })
    }

    pub(crate) fn asks_on_connect(&self) -> bool {
        self.options.connect
    }

    pub(crate) fn asks_on_refresh(&self) -> bool {
        self.options.refresh
    }

    pub(crate) fn asks_for(&self, channel: &Channel) -> bool {
        self.options.namespaces.contains(channel.namespace())
    }

    /// Asks the application within the deadline, for a client at `address`. `Ok(None)`:
    /// let through without an answer (a failed call under `fail_open`); a denial, or a failed
    /// call under `fail_closed`, is the error to give the client.
    pub(crate) async fn ask(
        &self,
        request: &ProxyRequest,
        address: std::net::IpAddr,
    ) -> Result<Option<ProxyAnswer>, ApiError> {
        let outcome = match self.address_slot(address) {
            None => Err(ProxyError(format!(
                "this address has {} calls to the application in flight",
                self.address_share
            ))),
            Some(_slot) => {
                let call = async {
                    let _permit = self
                        .in_flight
                        .acquire()
                        .await
                        .map_err(|_| ProxyError("closed".to_owned()))?;
                    self.proxy.ask(request).await
                };
                match tokio::time::timeout(self.options.timeout, call).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(ProxyError(format!(
                        "no answer within {:?}",
                        self.options.timeout
                    ))),
                }
            }
        };
        match outcome {
            Ok(answer) => match &answer.deny {
                Some(reason) => Err(ApiError::new(ErrorCode::Forbidden, reason.clone())),
                None => Ok(Some(answer)),
            },
            Err(error) => {
                tracing::debug!(target: "resync::proxy", %error, "proxy call failed");
                if self.options.fail_open {
                    Ok(None)
                } else {
                    // Fail closed, as "later": the application did not say no, and an SSE
                    // client given a 403 would never come back.
                    Err(ApiError::new(
                        ErrorCode::Unavailable,
                        "refused for now: the application could not be asked (try again later)",
                    ))
                }
            }
        }
    }
}

/// What the application answered about a connection (on connect, then on each refresh): its
/// user and rules, which replace the token's for as long as the connection lives, a refresh
/// with the same token included.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Narrowing {
    user: Option<String>,
    subscribe: Option<Vec<String>>,
    publish: Option<Vec<String>>,
    info: Option<Payload>,
}

impl Narrowing {
    /// Adds what `answer` says; what it leaves out stays as it was.
    pub(crate) fn update(&mut self, answer: &ProxyAnswer) {
        if answer.user.is_some() {
            self.user.clone_from(&answer.user);
        }
        if answer.subscribe.is_some() {
            self.subscribe.clone_from(&answer.subscribe);
        }
        if answer.publish.is_some() {
            self.publish.clone_from(&answer.publish);
        }
        if answer.info.is_some() {
            self.info.clone_from(&answer.info);
        }
    }

    /// Puts the application's rules in force on `identity` (read from a token).
    pub(crate) fn apply(&self, identity: &mut Identity) {
        if let Some(user) = &self.user {
            identity.subject = Some(user.clone());
        }
        if let Some(patterns) = &self.subscribe {
            identity.subscribe = patterns.iter().map(ChannelPattern::new).collect();
        }
        if let Some(patterns) = &self.publish {
            identity.publish = patterns.iter().map(ChannelPattern::new).collect();
        }
        if let Some(info) = &self.info {
            identity.info = Some(info.clone());
        }
    }
}

/// An [`AppProxy`] that POSTs each request as JSON to `url` and reads the answer's JSON
/// (`{}` to allow, `{"deny":"why"}`, `{"user":…}`, `{"data":…}`); a non-2xx status or an
/// unreadable answer is a failure.
#[cfg(feature = "proxy")]
#[derive(Debug)]
pub struct HttpProxy {
    url: String,
    http: reqwest::Client,
}

#[cfg(feature = "proxy")]
impl HttpProxy {
    /// A proxy posting to `url`.
    pub fn new(url: impl Into<String>) -> Result<Self, ProxyError> {
        let http = reqwest::Client::builder()
            .build()
            .map_err(|error| ProxyError(error.to_string()))?;
        Ok(Self {
            url: url.into(),
            http,
        })
    }
}

/// The largest answer read from the application, in bytes.
#[cfg(feature = "proxy")]
const MAX_ANSWER_BYTES: usize = 256 * 1024;

#[cfg(feature = "proxy")]
#[async_trait]
impl AppProxy for HttpProxy {
    async fn ask(&self, request: &ProxyRequest) -> Result<ProxyAnswer, ProxyError> {
        let mut response = self
            .http
            .post(&self.url)
            .json(request)
            .send()
            .await
            .map_err(|error| ProxyError(error.to_string()))?;
        if !response.status().is_success() {
            return Err(ProxyError(format!("answered {}", response.status())));
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|error| ProxyError(error.to_string()))?
        {
            if body.len() + chunk.len() > MAX_ANSWER_BYTES {
                return Err(ProxyError(format!(
                    "answer larger than {MAX_ANSWER_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        serde_json::from_slice(&body)
            .map_err(|error| ProxyError(format!("unreadable answer: {error}")))
    }
}
