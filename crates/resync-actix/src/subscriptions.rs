//! Opening resumed subscriptions for a connection and turning them into streams.

use std::sync::Arc;

use resync_broker::{Subscription, resume};
use resync_protocol::{Channel, Cursor, RecoveryOutcome};

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
        shared.metrics.recovery(&outcome);
        subscriptions.push((outcome, subscription));
    }
    Ok(subscriptions)
}
