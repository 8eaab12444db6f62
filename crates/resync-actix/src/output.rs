//! Bytes waiting for clients, over the process: the budget
//! ([`TransportConfig::queued_bytes_budget`](crate::TransportConfig)) that the edge's output
//! bounds and the long-poll replies share, and each client address's share of it.
//!
//! A long-poll reply is built whole before its first byte is written, so it is reserved here
//! first: it may hold what the process's budget has left, and at most an eighth of the budget
//! per address (at least two replies' worth). A poll that finds no room waits for room, up to
//! its timeout; its client is then told nothing new, and polls again. The reservation lasts
//! as long as the reply's body, so a thousand clients that never read pin the budget, not a
//! megabyte each (issue 25, item 5).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use actix_web::body::{BodySize, MessageBody};
use bytes::Bytes;

use crate::Metrics;

/// Each address's share of the replies' budget, and what the process holds of it.
#[derive(Default)]
pub(crate) struct ReplyBudget {
    by_address: Mutex<HashMap<IpAddr, usize>>,
    freed: tokio::sync::Notify,
}

impl ReplyBudget {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.by_address
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many bytes a reply for `address` may hold now.
    pub(crate) fn room(&self, metrics: &Metrics, address: IpAddr, reply_max: usize) -> usize {
        let budget = metrics.queued_bytes_budget();
        let left =
            budget.saturating_sub(usize::try_from(metrics.queued_bytes()).unwrap_or(usize::MAX));
        let share = (budget / 8).max(2 * reply_max);
        let held = self.lock().get(&address).copied().unwrap_or(0);
        left.min(share.saturating_sub(held))
    }

    /// Waits until some reply's reservation is given back (or `deadline`).
    pub(crate) async fn freed(&self, deadline: tokio::time::Instant) {
        let _ = tokio::time::timeout_at(deadline, self.freed.notified()).await;
    }

    /// Holds `bytes` for a reply to `address` until the reservation is dropped.
    pub(crate) fn reserve(
        self: &Arc<Self>,
        metrics: &Arc<Metrics>,
        address: IpAddr,
        bytes: usize,
    ) -> Reservation {
        *self.lock().entry(address).or_default() += bytes;
        metrics.queued_bytes_add(bytes);
        Reservation {
            budget: self.clone(),
            metrics: metrics.clone(),
            address,
            bytes,
        }
    }
}

/// A reply's hold on the budget, given back when dropped (the body written or abandoned).
pub(crate) struct Reservation {
    budget: Arc<ReplyBudget>,
    metrics: Arc<Metrics>,
    address: IpAddr,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        {
            let mut by_address = self.budget.lock();
            if let Some(held) = by_address.get_mut(&self.address) {
                *held = held.saturating_sub(self.bytes);
                if *held == 0 {
                    by_address.remove(&self.address);
                }
            }
        }
        self.metrics.queued_bytes_sub(self.bytes);
        self.budget.freed.notify_waiters();
    }
}

/// A reply body that holds its reservation until it is dropped.
pub(crate) struct ReservedBody {
    bytes: Option<Bytes>,
    _reservation: Reservation,
}

impl ReservedBody {
    pub(crate) fn new(bytes: Bytes, reservation: Reservation) -> Self {
        Self {
            bytes: Some(bytes),
            _reservation: reservation,
        }
    }
}

impl MessageBody for ReservedBody {
    type Error = std::convert::Infallible;

    fn size(&self) -> BodySize {
        match &self.bytes {
            Some(bytes) => BodySize::Sized(bytes.len() as u64),
            None => BodySize::Sized(0),
        }
    }

    fn poll_next(
        self: Pin<&mut Self>,
        _context: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Self::Error>>> {
        Poll::Ready(self.get_mut().bytes.take().map(Ok))
    }
}
