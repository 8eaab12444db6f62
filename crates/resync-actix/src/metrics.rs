//! What the transports do, as Prometheus / OpenMetrics metrics (`prometheus-client`).
//!
//! Every label set is bounded: transports and recovery outcomes and reset reasons are enums,
//! and namespaces are labelled by name only for the first [`MAX_NAMESPACE_LABELS`] seen (the
//! rest count under `_other`), so a client that invents channel names cannot grow the
//! exposition. The hot paths (a delivery, a publish) touch pre-created counters: no lock, no
//! label lookup.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use resync_protocol::{Channel, RecoveryOutcome, ResetReason};

/// The three transports, as metric labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// WebSocket.
    WebSocket,
    /// Server-Sent Events.
    Sse,
    /// Long polling.
    Poll,
}

impl Transport {
    const ALL: [Transport; 3] = [Transport::WebSocket, Transport::Sse, Transport::Poll];

    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::Sse => "sse",
            Transport::Poll => "poll",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Namespaces labelled by name; later ones count under `_other`.
pub const MAX_NAMESPACE_LABELS: usize = 64;

const OUTCOMES: [&str; 5] = ["fresh", "replayed", "up_to_date", "reset", "state"];

const REASONS: [ResetReason; 6] = [
    ResetReason::EpochChanged,
    ResetReason::Truncated,
    ResetReason::TooFarBehind,
    ResetReason::PositionAhead,
    ResetReason::BadCursor,
    ResetReason::Unknown,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TransportLabel {
    transport: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct NamespaceLabel {
    namespace: String,
}

/// Per-transport instruments, created once so the hot path needs no label lookup.
#[derive(Debug)]
struct PerTransport<M> {
    by_transport: [M; 3],
}

impl<M: Clone + Default> PerTransport<M>
where
    Family<TransportLabel, M>: prometheus_client::metrics::TypedMetric,
{
    fn new(family: &Family<TransportLabel, M>) -> Self {
        Self {
            by_transport: Transport::ALL.map(|transport| {
                family
                    .get_or_create(&TransportLabel {
                        transport: transport.as_str(),
                    })
                    .clone()
            }),
        }
    }

    fn get(&self, transport: Transport) -> &M {
        &self.by_transport[transport.index()]
    }
}

/// The metrics of every connection: read them with [`Metrics::render`]; only this crate
/// changes them.
pub struct Metrics {
    registry: Registry,
    open: PerTransport<Gauge>,
    opened: PerTransport<Counter>,
    delivered: PerTransport<Counter>,
    slow_consumer_closes: PerTransport<Counter>,
    published: Counter,
    publish_failures: Counter,
    publishes_held: Counter,
    publishes_waiting: Gauge,
    publishes_refused_busy: Counter,
    publish_seconds: Histogram,
    recoveries: [Counter; 5],
    resets: [Counter; 6],
    replayed: Histogram,
    auth_failures: Counter,
    sockets_open: Gauge,
    sockets_refused: [Counter; 2],
    header_timeouts: Counter,
    requests_held: Counter,
    queued_bytes: Gauge,
    queued_bytes_budget: std::sync::atomic::AtomicI64,
    namespace_published: Family<NamespaceLabel, Counter>,
    namespace_subscriptions: Family<NamespaceLabel, Counter>,
    /// Namespaces that have a label of their own.
    namespaces: Mutex<HashMap<String, ()>>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let transport_family = |registry: &mut Registry, name: &str, help: &str| {
            let family = Family::<TransportLabel, Counter>::default();
            registry.register(name, help, family.clone());
            PerTransport::new(&family)
        };
        let open_family = Family::<TransportLabel, Gauge>::default();
        registry.register(
            "resync_open_connections",
            "Client connections open now",
            open_family.clone(),
        );
        let opened = transport_family(
            &mut registry,
            "resync_connections",
            "Client connections opened",
        );
        let delivered = transport_family(
            &mut registry,
            "resync_events_delivered",
            "Events written to clients",
        );
        let slow_consumer_closes = transport_family(
            &mut registry,
            "resync_slow_consumer_closes",
            "Connections closed because the client took too little of what was sent",
        );
        let published = Counter::default();
        registry.register(
            "resync_events_published",
            "Events stored by publishes",
            published.clone(),
        );
        let publish_failures = Counter::default();
        registry.register(
            "resync_publish_failures",
            "Publishes the broker could not store",
            publish_failures.clone(),
        );
        let publishes_held = Counter::default();
        registry.register(
            "resync_publishes_held",
            "Publishes held back while a large share of subscribers lagged (the server was behind)",
            publishes_held.clone(),
        );
        let publishes_waiting = Gauge::default();
        registry.register(
            "resync_publishes_waiting",
            "Publishes being held back right now, the server being behind",
            publishes_waiting.clone(),
        );
        let publishes_refused_busy = Counter::default();
        registry.register(
            "resync_publishes_refused_busy",
            "Publishes refused (503) after being held back for the longest hold",
            publishes_refused_busy.clone(),
        );
        // 100 us to ~3.3 s.
        let publish_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "resync_publish_duration_seconds",
            "Time from a publish request to its stored position",
            publish_seconds.clone(),
        );
        let outcome_family = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "resync_subscriptions",
            "Subscriptions started, by recovery outcome",
            outcome_family.clone(),
        );
        let recoveries = OUTCOMES.map(|outcome| {
            outcome_family
                .get_or_create(&OutcomeLabel { outcome })
                .clone()
        });
        let reason_family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "resync_resets",
            "Resets sent to clients (at resume time and mid-stream), by reason",
            reason_family.clone(),
        );
        let resets = REASONS.map(|reason| {
            reason_family
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .clone()
        });
        // 1 to 16,384 events.
        let replayed = Histogram::new(exponential_buckets(1.0, 2.0, 15));
        registry.register(
            "resync_replayed_events",
            "Events replayed to one resuming subscription",
            replayed.clone(),
        );
        let auth_failures = Counter::default();
        registry.register(
            "resync_auth_failures",
            "Requests refused for bad or missing credentials",
            auth_failures.clone(),
        );
        let sockets_open = Gauge::default();
        registry.register(
            "resync_sockets_open",
            "Sockets the edge holds (every accepted connection, whatever it carries)",
            sockets_open.clone(),
        );
        let refused_family = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "resync_sockets_refused",
            "Sockets closed at accept: the server's socket cap, or their address's cap or rate",
            refused_family.clone(),
        );
        let sockets_refused = ["server_full", "address"].map(|reason| {
            refused_family
                .get_or_create(&ReasonLabel { reason })
                .clone()
        });
        let header_timeouts = Counter::default();
        registry.register(
            "resync_header_timeouts",
            "Connections closed for not completing a request head within the header deadline",
            header_timeouts.clone(),
        );
        let requests_held = Counter::default();
        registry.register(
            "resync_pipelined_requests_held",
            "Times a connection's next request was held back until the response before it ended",
            requests_held.clone(),
        );
        let queued_bytes = Gauge::default();
        registry.register(
            "resync_queued_bytes",
            "Bytes of responses waiting for clients' sockets, over the process",
            queued_bytes.clone(),
        );
        let namespace_published = Family::<NamespaceLabel, Counter>::default();
        registry.register(
            "resync_namespace_events_published",
            "Events stored, by channel namespace (the first 64 namespaces; the rest as _other)",
            namespace_published.clone(),
        );
        let namespace_subscriptions = Family::<NamespaceLabel, Counter>::default();
        registry.register(
            "resync_namespace_subscriptions",
            "Subscriptions started, by channel namespace (the first 64; the rest as _other)",
            namespace_subscriptions.clone(),
        );
        Self {
            open: PerTransport::new(&open_family),
            registry,
            opened,
            delivered,
            slow_consumer_closes,
            published,
            publish_failures,
            publishes_held,
            publishes_waiting,
            publishes_refused_busy,
            publish_seconds,
            recoveries,
            resets,
            replayed,
            auth_failures,
            sockets_open,
            sockets_refused,
            header_timeouts,
            requests_held,
            queued_bytes,
            queued_bytes_budget: std::sync::atomic::AtomicI64::new(i64::MAX),
            namespace_published,
            namespace_subscriptions,
            namespaces: Mutex::new(HashMap::new()),
        }
    }
}

/// A publish being held back; counted until dropped (however its wait ends).
pub(crate) struct WaitingPublish(Gauge);

impl Drop for WaitingPublish {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Decrements the open-connection gauge when a connection ends, however it ends.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    transport: Transport,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.open.get(self.transport).dec();
    }
}

impl Metrics {
    /// Counts a new connection; the returned guard counts its end.
    pub(crate) fn connection(self: &Arc<Self>, transport: Transport) -> ConnectionGuard {
        self.open.get(transport).inc();
        self.opened.get(transport).inc();
        ConnectionGuard {
            metrics: self.clone(),
            transport,
        }
    }

    /// Counts a connection opened on `transport` whose owner counts its end itself
    /// ([`connection_closed`](Self::connection_closed)): a session, which has a `Drop` of its
    /// own, and so needs no guard (and no second handle on the metrics) for it.
    pub(crate) fn connection_opened(&self, transport: Transport) {
        self.open.get(transport).inc();
        self.opened.get(transport).inc();
    }

    /// Counts the end of a connection counted by [`connection_opened`](Self::connection_opened).
    pub(crate) fn connection_closed(&self, transport: Transport) {
        self.open.get(transport).dec();
    }

    /// Connections open now on `transport`.
    pub fn open_connections(&self, transport: Transport) -> u64 {
        u64::try_from(self.open.get(transport).get()).unwrap_or(0)
    }

    /// Events published since start.
    pub fn events_published(&self) -> u64 {
        self.published.get()
    }

    /// Events delivered since start, on every transport.
    pub fn events_delivered(&self) -> u64 {
        Transport::ALL
            .iter()
            .map(|transport| self.delivered.get(*transport).get())
            .sum()
    }

    /// Counts events written to clients.
    pub(crate) fn delivered(&self, transport: Transport, count: u64) {
        if count > 0 {
            self.delivered.get(transport).inc_by(count);
        }
    }

    /// Counts a connection closed because its client read too slowly.
    pub(crate) fn slow_consumer_closed(&self, transport: Transport) {
        self.slow_consumer_closes.get(transport).inc();
    }

    /// Counts a stored publish and how long it took.
    pub(crate) fn published(&self, channel: &Channel, took: Duration) {
        self.published.inc();
        self.publish_seconds.observe(took.as_secs_f64());
        self.namespace_published
            .get_or_create(&self.namespace_label(channel))
            .inc();
    }

    /// Counts a publish the broker refused.
    pub(crate) fn publish_failed(&self) {
        self.publish_failures.inc();
    }

    /// Counts a publish held back because the server was behind; `refused` when it was then
    /// turned away.
    pub(crate) fn publish_held(&self, refused: bool) {
        self.publishes_held.inc();
        if refused {
            self.publishes_refused_busy.inc();
        }
    }

    /// Counts a publish held back from now until the returned guard is dropped.
    pub(crate) fn publish_waiting(&self) -> WaitingPublish {
        self.publishes_waiting.inc();
        WaitingPublish(self.publishes_waiting.clone())
    }

    /// Publishes held back since start because the server was behind.
    pub fn publishes_held(&self) -> u64 {
        self.publishes_held.get()
    }

    /// Counts how a subscription started.
    pub(crate) fn recovery(&self, channel: &Channel, outcome: &RecoveryOutcome) {
        let index = match outcome {
            RecoveryOutcome::Fresh { .. } => 0,
            RecoveryOutcome::Replayed { count } => {
                self.replayed.observe(*count as f64);
                1
            }
            RecoveryOutcome::UpToDate => 2,
            RecoveryOutcome::Reset { reason, .. } => {
                self.reset(*reason);
                3
            }
            RecoveryOutcome::State { .. } => 4,
        };
        self.recoveries[index].inc();
        self.namespace_subscriptions
            .get_or_create(&self.namespace_label(channel))
            .inc();
    }

    /// Counts a reset sent mid-stream (resume-time resets count in [`Self::recovery`]).
    pub(crate) fn reset(&self, reason: ResetReason) {
        let index = REASONS
            .iter()
            .position(|known| *known == reason)
            .unwrap_or(REASONS.len() - 1);
        self.resets[index].inc();
    }

    /// Counts refused credentials.
    pub(crate) fn auth_failed(&self) {
        self.auth_failures.inc();
    }

    pub(crate) fn socket_opened(&self) {
        self.sockets_open.inc();
    }

    pub(crate) fn socket_closed(&self) {
        self.sockets_open.dec();
    }

    /// Sockets the edge holds now.
    pub fn sockets_open(&self) -> u64 {
        u64::try_from(self.sockets_open.get()).unwrap_or(0)
    }

    pub(crate) fn socket_refused(&self, refusal: &crate::admission::Refusal) {
        let index = match refusal {
            crate::admission::Refusal::ServerFull => 0,
            _ => 1,
        };
        self.sockets_refused[index].inc();
    }

    pub(crate) fn header_timed_out(&self) {
        self.header_timeouts.inc();
    }

    pub(crate) fn request_held(&self) {
        self.requests_held.inc();
    }

    pub(crate) fn set_queued_bytes_budget(&self, budget: usize) {
        self.queued_bytes_budget.store(
            i64::try_from(budget).unwrap_or(i64::MAX),
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    pub(crate) fn queued_bytes_add(&self, bytes: usize) {
        if bytes > 0 {
            self.queued_bytes
                .inc_by(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    pub(crate) fn queued_bytes_sub(&self, bytes: usize) {
        if bytes > 0 {
            self.queued_bytes
                .dec_by(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
    }

    /// Bytes of responses waiting for clients now, over the process.
    pub fn queued_bytes(&self) -> u64 {
        u64::try_from(self.queued_bytes.get()).unwrap_or(0)
    }

    /// The process's budget of bytes waiting for clients.
    pub(crate) fn queued_bytes_budget(&self) -> usize {
        usize::try_from(
            self.queued_bytes_budget
                .load(std::sync::atomic::Ordering::Relaxed),
        )
        .unwrap_or(usize::MAX)
    }

    /// Whether the bytes waiting for clients are past the process's budget.
    pub(crate) fn queued_bytes_over(&self) -> bool {
        self.queued_bytes.get()
            >= self
                .queued_bytes_budget
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn namespace_label(&self, channel: &Channel) -> NamespaceLabel {
        let namespace = channel.namespace();
        let mut namespaces = self
            .namespaces
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let known = namespaces.contains_key(namespace);
        if known || namespaces.len() < MAX_NAMESPACE_LABELS {
            if !known {
                namespaces.insert(namespace.to_owned(), ());
            }
            NamespaceLabel {
                namespace: namespace.to_owned(),
            }
        } else {
            NamespaceLabel {
                namespace: "_other".to_owned(),
            }
        }
    }

    /// Every metric in the OpenMetrics text format (which Prometheus scrapes as well).
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The content type of [`render`](Self::render)'s text.
    pub const CONTENT_TYPE: &'static str =
        "application/openmetrics-text; version=1.0.0; charset=utf-8";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_two_families_share_a_name_and_namespace_labels_are_bounded() {
        let metrics = Metrics::default();
        for index in 0..(MAX_NAMESPACE_LABELS + 10) {
            let channel = Channel::new(format!("ns{index}:room")).unwrap();
            metrics.published(&channel, Duration::from_millis(1));
        }
        let text = metrics.render();
        let labelled = text
            .lines()
            .filter(|line| line.starts_with("resync_namespace_events_published_total{"))
            .count();
        assert_eq!(labelled, MAX_NAMESPACE_LABELS + 1, "64 names and _other");
        assert!(text.contains("resync_namespace_events_published_total{namespace=\"_other\"} 10"));
        // OpenMetrics: a family's name is declared once (a gauge and a counter that shared
        // `resync_connections` broke strict parsers).
        let mut declared: Vec<&str> = text
            .lines()
            .filter_map(|line| line.strip_prefix("# TYPE "))
            .filter_map(|line| line.split_whitespace().next())
            .collect();
        let count = declared.len();
        declared.sort_unstable();
        declared.dedup();
        assert_eq!(declared.len(), count, "{text}");
        assert!(text.ends_with("# EOF\n"));
    }
}
