//! What every connection of one [`Resync`](crate::Resync) shares: the broker, the limits,
//! the settings, the counters, the shutdown signal and the heartbeat clocks.

use std::sync::Arc;

use resync_broker::Broker;
use tokio::sync::watch;

use crate::{Authorizer, Metrics, Publisher, TransportConfig, admission};

/// What every connection shares.
pub(crate) struct Shared {
    /// Connection caps and per-address budgets.
    pub(crate) admission: Arc<admission::Admission>,
    pub(crate) broker: Arc<dyn Broker>,
    /// The one publish path (counts and times every publish), for client publishes too.
    pub(crate) publisher: Publisher,
    pub(crate) authorizer: Arc<dyn Authorizer>,
    pub(crate) config: TransportConfig,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shutdown: watch::Sender<bool>,
    /// Woken once when the shutdown begins, for idle connections (the edge).
    pub(crate) shutdown_notice: Arc<tokio::sync::Notify>,
    /// Shared heartbeat clocks, so that idle connections hold no timer of their own.
    pub(crate) sse_heartbeat: Ticker,
    pub(crate) ws_ping: Ticker,
    /// Long-polling clients' presence sessions.
    pub(crate) poll_sessions: crate::poll_presence::PollSessions,
    /// Each user's connections, for the user commands.
    pub(crate) users: Arc<crate::users::UserConnections>,
    /// The application's backend, when it is asked.
    pub(crate) proxy: Option<crate::proxy::ProxyGate>,
    /// Long-poll replies' share of the bytes waiting for clients.
    pub(crate) replies: Arc<crate::output::ReplyBudget>,
}

impl Shared {
    /// Ticks of `clock`, which also wake the receiver when the server shuts down (see
    /// [`Resync::shutdown`](crate::Resync::shutdown)); already pending if shutdown came first, so a connection
    /// admitted just before it does not miss it.
    pub(crate) fn clock(&self, clock: &Ticker) -> watch::Receiver<u64> {
        let mut ticks = clock.subscribe();
        if *self.shutdown.borrow() {
            ticks.mark_changed();
        }
        ticks
    }
}

/// A clock shared by every connection: one task ticks, connections wait on a `watch`.
pub(crate) struct Ticker {
    period: std::time::Duration,
    ticks: watch::Sender<u64>,
    started: std::sync::Once,
}

impl Ticker {
    pub(crate) fn new(period: std::time::Duration) -> Self {
        Self {
            period,
            ticks: watch::channel(0).0,
            started: std::sync::Once::new(),
        }
    }

    /// Wakes every receiver now, as a tick would.
    pub(crate) fn wake_all(&self) {
        self.ticks
            .send_modify(|count| *count = count.wrapping_add(1));
    }

    /// A receiver of ticks; the ticking task starts with the first subscriber, on the runtime
    /// of the worker that serves it (it stops with the server).
    pub(crate) fn subscribe(&self) -> watch::Receiver<u64> {
        self.started.call_once(|| {
            let ticks = self.ticks.clone();
            let period = self.period;
            actix_web::rt::spawn(async move {
                let mut interval =
                    tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    interval.tick().await;
                    ticks.send_modify(|count| *count = count.wrapping_add(1));
                }
            });
        });
        let mut receiver = self.ticks.subscribe();
        receiver.mark_unchanged();
        receiver
    }
}
