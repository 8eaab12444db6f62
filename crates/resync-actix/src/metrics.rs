//! Counters of what the transports do, rendered in the Prometheus text format.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use resync_protocol::RecoveryOutcome;

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

const OUTCOMES: [&str; 4] = ["fresh", "replayed", "up_to_date", "reset"];

/// Counters shared by every connection. All methods are lock-free.
#[derive(Debug, Default)]
pub struct Metrics {
    open: [AtomicU64; 3],
    opened: [AtomicU64; 3],
    delivered: [AtomicU64; 3],
    slow_consumer_closes: [AtomicU64; 3],
    published: AtomicU64,
    publish_failures: AtomicU64,
    recoveries: [AtomicU64; 4],
    auth_failures: AtomicU64,
}

/// Decrements the open-connection gauge when a connection ends, however it ends.
#[derive(Debug)]
pub struct ConnectionGuard {
    metrics: Arc<Metrics>,
    transport: Transport,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.metrics.open[self.transport.index()].fetch_sub(1, Ordering::Relaxed);
    }
}

impl Metrics {
    /// Counts a new connection; the returned guard counts its end.
    pub fn connection(self: &Arc<Self>, transport: Transport) -> ConnectionGuard {
        self.open[transport.index()].fetch_add(1, Ordering::Relaxed);
        self.opened[transport.index()].fetch_add(1, Ordering::Relaxed);
        ConnectionGuard {
            metrics: self.clone(),
            transport,
        }
    }

    /// Connections open now on `transport`.
    pub fn open_connections(&self, transport: Transport) -> u64 {
        self.open[transport.index()].load(Ordering::Relaxed)
    }

    /// Counts events written to clients.
    pub fn delivered(&self, transport: Transport, count: u64) {
        self.delivered[transport.index()].fetch_add(count, Ordering::Relaxed);
    }

    /// Counts a connection closed because its client read too slowly.
    pub fn slow_consumer_closed(&self, transport: Transport) {
        self.slow_consumer_closes[transport.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a stored publish.
    pub fn published(&self) {
        self.published.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a publish the broker refused.
    pub fn publish_failed(&self) {
        self.publish_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts how a subscription started.
    pub fn recovery(&self, outcome: &RecoveryOutcome) {
        let index = match outcome {
            RecoveryOutcome::Fresh { .. } => 0,
            RecoveryOutcome::Replayed { .. } => 1,
            RecoveryOutcome::UpToDate => 2,
            RecoveryOutcome::Reset { .. } => 3,
        };
        self.recoveries[index].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts refused credentials.
    pub fn auth_failed(&self) {
        self.auth_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The counters in the Prometheus text exposition format.
    pub fn render_prometheus(&self) -> String {
        let mut out = String::new();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let mut per_transport = |name: &str, kind: &str, help: &str, values: &[AtomicU64; 3]| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for transport in Transport::ALL {
                let _ = writeln!(
                    out,
                    "{name}{{transport=\"{}\"}} {}",
                    transport.as_str(),
                    load(&values[transport.index()])
                );
            }
        };
        per_transport(
            "resync_connections",
            "gauge",
            "Open client connections.",
            &self.open,
        );
        per_transport(
            "resync_connections_total",
            "counter",
            "Client connections opened.",
            &self.opened,
        );
        per_transport(
            "resync_events_delivered_total",
            "counter",
            "Events written to clients.",
            &self.delivered,
        );
        per_transport(
            "resync_slow_consumer_closes_total",
            "counter",
            "Connections closed because the client read too slowly.",
            &self.slow_consumer_closes,
        );
        let _ = writeln!(
            out,
            "# HELP resync_events_published_total Events stored by publishes.\n# TYPE resync_events_published_total counter\nresync_events_published_total {}",
            load(&self.published)
        );
        let _ = writeln!(
            out,
            "# HELP resync_publish_failures_total Publishes the broker could not store.\n# TYPE resync_publish_failures_total counter\nresync_publish_failures_total {}",
            load(&self.publish_failures)
        );
        let _ = writeln!(
            out,
            "# HELP resync_subscriptions_total Subscriptions started, by recovery outcome.\n# TYPE resync_subscriptions_total counter"
        );
        for (index, outcome) in OUTCOMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "resync_subscriptions_total{{outcome=\"{outcome}\"}} {}",
                load(&self.recoveries[index])
            );
        }
        let _ = writeln!(
            out,
            "# HELP resync_auth_failures_total Requests refused for bad credentials.\n# TYPE resync_auth_failures_total counter\nresync_auth_failures_total {}",
            load(&self.auth_failures)
        );
        out
    }
}
