//! Snapshot plus events: load the state, follow the channel from the state's position, and
//! reload on every reset.
//!
//! Refetches wait the client's backoff whenever the last snapshot did not lead to a single
//! event (its fetch failed, or a reset came straight after it). During a rolling deploy the
//! snapshot can come from the old, draining process while the live connection reaches the new
//! one; without the wait, every snapshot would meet an `epoch_changed` reset at once and the
//! helper would refetch in a tight loop.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use resync_protocol::{Channel, Event, Position, ResetReason};
use tokio::sync::mpsc;

use crate::{Backoff, Client, Result, Update};

/// An item of [`Client::subscribe_with_snapshot`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotUpdate<S> {
    /// A fresh snapshot: replace the local state with it. The first item, and again after
    /// every reset.
    Snapshot {
        /// The state.
        state: S,
        /// The position the state reflects; events after it follow.
        position: Position,
        /// `None` for the first snapshot, else the reset that made it necessary.
        after_reset: Option<ResetReason>,
    },
    /// The next event after the snapshot: apply it to the local state.
    Event(Event),
    /// Fetching a snapshot failed; the helper tries again after `retry_in` (the client's
    /// backoff) and the stream goes on. Keep the state you have until the next `Snapshot`.
    FetchFailed {
        /// What the fetch function returned.
        error: String,
        /// How long until the next attempt.
        retry_in: std::time::Duration,
    },
}

/// The stream returned by [`Client::subscribe_with_snapshot`].
#[derive(Debug)]
pub struct SnapshotStream<S> {
    receiver: mpsc::Receiver<Result<SnapshotUpdate<S>>>,
    task: tokio::task::JoinHandle<()>,
}

impl<S> Stream for SnapshotStream<S> {
    type Item = Result<SnapshotUpdate<S>>;

    fn poll_next(self: Pin<&mut Self>, context: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().receiver.poll_recv(context)
    }
}

impl<S> Drop for SnapshotStream<S> {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub(crate) fn start<S, F, Fut>(client: Client, channel: Channel, fetch: F) -> SnapshotStream<S>
where
    S: Send + 'static,
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = std::result::Result<(S, Position), String>> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(64);
    let mut backoff = Backoff::new(client.backoff_config());
    let task = tokio::spawn(async move {
        let mut after_reset = None;
        loop {
            let (state, position) = match fetch().await {
                Ok(snapshot) => snapshot,
                Err(error) => {
                    let retry_in = backoff.next_delay();
                    let failed = SnapshotUpdate::FetchFailed { error, retry_in };
                    if sender.send(Ok(failed)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(retry_in).await;
                    continue;
                }
            };
            let snapshot = SnapshotUpdate::Snapshot {
                state,
                position: position.clone(),
                after_reset,
            };
            if sender.send(Ok(snapshot)).await.is_err() {
                return;
            }
            // Follow from exactly the snapshot's position: nothing between is lost.
            let mut subscription = client.subscribe(channel.clone()).since(position);
            let mut followed = false;
            after_reset = loop {
                match subscription.next().await {
                    Some(Ok(Update::Event(event))) => {
                        followed = true;
                        if sender.send(Ok(SnapshotUpdate::Event(event))).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Update::Reset { reason, .. })) => break Some(reason),
                    // A keyed channel's state replaces the snapshot's: as after a reset, the
                    // application's snapshot is loaded again.
                    Some(Ok(Update::State { .. })) => break Some(ResetReason::Truncated),
                    // This subscription does not ask for members.
                    Some(Ok(Update::Members(_))) => {}
                    Some(Err(error)) => {
                        let _ = sender.send(Err(error)).await;
                        return;
                    }
                    None => return,
                }
            };
            drop(subscription);
            if followed {
                backoff.reset();
            } else {
                // The snapshot was stale on arrival: wait before the next one.
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    });
    SnapshotStream { receiver, task }
}
