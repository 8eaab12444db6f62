//! Snapshot plus events: load the state, follow the channel from the state's position, and
//! reload on every reset.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use resync_protocol::{Channel, Event, Position, ResetReason};
use tokio::sync::mpsc;

use crate::{Client, Error, Result, Update};

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
}

/// The stream returned by [`Client::subscribe_with_snapshot`].
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
    let task = tokio::spawn(async move {
        let mut after_reset = None;
        loop {
            let (state, position) = match fetch().await {
                Ok(snapshot) => snapshot,
                Err(error) => {
                    let _ = sender.send(Err(Error::Snapshot(error))).await;
                    return;
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
            after_reset = loop {
                match subscription.next().await {
                    Some(Ok(Update::Event(event))) => {
                        if sender.send(Ok(SnapshotUpdate::Event(event))).await.is_err() {
                            return;
                        }
                    }
                    Some(Ok(Update::Reset { reason, .. })) => break Some(reason),
                    Some(Err(error)) => {
                        let _ = sender.send(Err(error)).await;
                        return;
                    }
                    None => return,
                }
            };
            drop(subscription);
        }
    });
    SnapshotStream { receiver, task }
}
