//! Opening resumed subscriptions for a connection and turning them into streams.

use std::sync::Arc;

use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::{Stream, StreamExt};
use resync_broker::{Subscription, SubscriptionError, SubscriptionItem, resume};
use resync_protocol::{Channel, Cursor, RecoveryOutcome};
use tokio_stream::StreamMap;

use crate::Shared;
use crate::error::ApiError;

/// Resumes every channel from its position in `cursor` (from now, for channels the cursor
/// lacks), concurrently, counting the outcomes.
pub(crate) async fn open_all(
    shared: &Arc<Shared>,
    channels: &[Channel],
    cursor: Option<&Cursor>,
) -> Result<Vec<(RecoveryOutcome, Subscription)>, ApiError> {
    let opened = futures_util::future::join_all(channels.iter().map(|channel| {
        let since = cursor.and_then(|cursor| cursor.get(channel)).cloned();
        resume(
            shared.broker.clone(),
            channel.clone(),
            since,
            shared.config.resume,
        )
    }))
    .await;
    let mut subscriptions = Vec::with_capacity(opened.len());
    for result in opened {
        let (outcome, subscription) = result?;
        shared.metrics.recovery(subscription.channel(), &outcome);
        subscriptions.push((outcome, subscription));
    }
    Ok(subscriptions)
}

/// A connection's subscriptions, keyed by channel.
pub(crate) type Subscriptions = StreamMap<Channel, Subscription>;

/// An item of one of a connection's subscriptions.
pub(crate) type ChannelItem = (Channel, Result<SubscriptionItem, SubscriptionError>);

/// The next item of any of `subscriptions`, as `StreamMap::next` gives it; `None` once none
/// is left.
pub(crate) async fn next_item(subscriptions: &mut Subscriptions) -> Option<ChannelItem> {
    std::future::poll_fn(|context| poll_next_item(subscriptions, context)).await
}

/// Polls `subscriptions` like `StreamMap` does, but polls a lone subscription directly: most
/// connections follow one channel, and the map draws a random number per poll to be fair
/// between its streams, which such a connection paid for every event.
fn poll_next_item(
    subscriptions: &mut Subscriptions,
    context: &mut Context<'_>,
) -> Poll<Option<ChannelItem>> {
    if subscriptions.len() == 1 {
        if let Some((channel, subscription)) = subscriptions.iter_mut().next() {
            match Pin::new(subscription).poll_next(context) {
                Poll::Ready(Some(item)) => return Poll::Ready(Some((channel.clone(), item))),
                // Ended: the map's own poll below removes it.
                Poll::Ready(None) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
    }
    subscriptions.poll_next_unpin(context)
}
