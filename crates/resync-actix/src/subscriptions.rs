//! Opening resumed subscriptions for a connection and turning them into streams.

use std::pin::Pin;
use std::sync::Arc;

use futures_util::Stream;
use resync_broker::{Subscription, SubscriptionError, SubscriptionItem, resume};
use resync_protocol::{Channel, Cursor, RecoveryOutcome};

use crate::Shared;
use crate::error::ApiError;

/// One channel's items, ending after the first error.
pub(crate) type ItemStream =
    Pin<Box<dyn Stream<Item = Result<SubscriptionItem, SubscriptionError>> + Send>>;

pub(crate) fn into_stream(subscription: Subscription) -> ItemStream {
    Box::pin(futures_util::stream::unfold(
        Some(subscription),
        |state| async move {
            let mut subscription = state?;
            match subscription.next().await {
                Ok(item) => Some((Ok(item), Some(subscription))),
                Err(error) => Some((Err(error), None)),
            }
        },
    ))
}

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
        shared.metrics.recovery(&outcome);
        subscriptions.push((outcome, subscription));
    }
    Ok(subscriptions)
}
