//! A connection's channels: one [`ChannelSet`] per SSE stream, long poll or WebSocket holds
//! each channel's resumed subscription, and its cursor is read from them, so no transport
//! keeps positions of its own.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use actix_web::HttpRequest;
use futures_util::{FutureExt, Stream, StreamExt};
use resync_broker::{Subscription, SubscriptionError, SubscriptionItem, resume};
use resync_protocol::{Channel, Cursor, Position, RecoveryOutcome, ResetReason};
use tokio_stream::StreamMap;

use crate::Shared;
use crate::error::ApiError;

/// Where a client says it stands when it opens its channels.
#[derive(Debug)]
pub(crate) enum Since {
    /// Nothing said: every channel starts now.
    Now,
    /// A cursor (`cursor=`, or an SSE `Last-Event-ID`): channels it names resume from there,
    /// the others start now.
    Cursor(Cursor),
    /// A `Last-Event-ID` or `cursor=` that cannot be read: every channel starts now and is told it was
    /// reset (`bad_cursor`), because the client had a position and lost it. Failing the
    /// request instead would make a browser's `EventSource` give up silently.
    Unreadable,
}

impl Since {
    /// An SSE request's position: `cursor=` wins, then `Last-Event-ID`.
    pub(crate) fn of_stream(cursor: Option<Since>, request: &HttpRequest) -> Since {
        if let Some(since) = cursor {
            return since;
        }
        match request.headers().get("last-event-id") {
            None => Since::Now,
            Some(value) => match value.to_str().map(Cursor::parse) {
                Ok(Ok(cursor)) => Since::Cursor(cursor),
                _ => Since::Unreadable,
            },
        }
    }

    fn of(&self, channel: &Channel) -> Option<Position> {
        match self {
            Since::Cursor(cursor) => cursor.get(channel).cloned(),
            Since::Now | Since::Unreadable => None,
        }
    }
}

/// An item of one of the set's channels.
pub(crate) type ChannelItem = (Channel, Result<SubscriptionItem, SubscriptionError>);

/// How `channel` resumes: the server's options, keyed as its namespace says, from the state
/// when the client asked for it.
fn resume_options(shared: &Shared, channel: &Channel, state: bool) -> resync_broker::ResumeOptions {
    let keyed = shared
        .config
        .namespaces
        .get(channel.namespace())
        .is_some_and(|policy| policy.keyed);
    resync_broker::ResumeOptions {
        keyed,
        state: keyed && state,
        ..shared.config.resume
    }
}

/// A connection's resumed channels, and where the client stands in each.
pub(crate) struct ChannelSet {
    subscriptions: StreamMap<Channel, Subscription>,
}

impl ChannelSet {
    /// A set with no channel, for a WebSocket that subscribes one frame at a time. It holds
    /// no memory until a channel is added.
    pub(crate) fn new() -> Self {
        Self {
            subscriptions: StreamMap::new(),
        }
    }

    /// Resumes every channel from `since`, concurrently, counting each recovery outcome.
    /// Returns the set and each channel's outcome, in the order asked.
    pub(crate) async fn open(
        shared: &Arc<Shared>,
        channels: &[Channel],
        since: &Since,
        state: &crate::request::StateWish,
        state_after: &[(Channel, Position, resync_protocol::Key)],
    ) -> Result<(Self, Vec<(Channel, RecoveryOutcome)>), ApiError> {
        let opened = futures_util::future::join_all(channels.iter().map(|channel| async move {
            // From the state where the client asked (then the events after the older of its
            // position and the state's).
            let wants = state.wants(channel, since.of(channel).as_ref());
            let options = resume_options(shared, channel, wants);
            // A state an earlier reply delivered in part goes on where it stopped.
            if let Some((_, position, after)) = state_after
                .iter()
                .find(|(named, _, _)| named == channel)
                .filter(|_| options.keyed)
            {
                let subscription = resync_broker::resume_state(
                    shared.broker.clone(),
                    channel.clone(),
                    since.of(channel),
                    position.clone(),
                    after.clone(),
                    options,
                )
                .await?;
                let outcome = RecoveryOutcome::State {
                    position: position.clone(),
                };
                return Ok((outcome, subscription));
            }
            resume(
                shared.broker.clone(),
                channel.clone(),
                since.of(channel),
                options,
            )
            .await
        }))
        .await;
        // Exactly sized: a map grown by insertion would reserve four subscriptions' room.
        let mut subscriptions = StreamMap::with_capacity(opened.len());
        let mut outcomes = Vec::with_capacity(opened.len());
        for result in opened {
            let (outcome, subscription) = result?;
            let outcome = match outcome {
                RecoveryOutcome::Fresh { position } if matches!(since, Since::Unreadable) => {
                    RecoveryOutcome::Reset {
                        reason: ResetReason::BadCursor,
                        position,
                    }
                }
                other => other,
            };
            let channel = subscription.channel().clone();
            shared.metrics.recovery(&channel, &outcome);
            outcomes.push((channel.clone(), outcome));
            subscriptions.insert(channel, subscription);
        }
        Ok((Self { subscriptions }, outcomes))
    }

    /// Resumes one more channel from `since` (a WebSocket `subscribe`), counting its outcome.
    /// The caller checks first that the channel is not in the set.
    pub(crate) async fn add(
        &mut self,
        shared: &Arc<Shared>,
        channel: &Channel,
        start: crate::session::Start,
    ) -> Result<RecoveryOutcome, ApiError> {
        let (outcome, subscription) = resume(
            shared.broker.clone(),
            channel.clone(),
            start.since,
            resume_options(shared, channel, start.state),
        )
        .await?;
        shared.metrics.recovery(channel, &outcome);
        if self.subscriptions.capacity() == 0 {
            // Room for one: most connections follow one channel.
            self.subscriptions = StreamMap::with_capacity(1);
        }
        self.subscriptions.insert(channel.clone(), subscription);
        Ok(outcome)
    }

    /// The keyed channels whose state is part delivered, as `state_after=` entries
    /// (`channel|epoch:seq|key`).
    pub(crate) fn state_progress(&self) -> Vec<String> {
        self.subscriptions
            .iter()
            .filter_map(|(channel, subscription)| {
                let (position, after) = subscription.state_progress()?;
                Some(format!("{channel}|{position}|{after}"))
            })
            .collect()
    }

    /// Stops following `channel`; `false` if the set did not hold it.
    pub(crate) fn remove(&mut self, channel: &Channel) -> bool {
        self.subscriptions.remove(channel).is_some()
    }

    /// Stops following every channel.
    pub(crate) fn clear(&mut self) {
        self.subscriptions.clear();
    }

    pub(crate) fn contains(&self, channel: &Channel) -> bool {
        self.subscriptions.contains_key(channel)
    }

    pub(crate) fn len(&self) -> usize {
        self.subscriptions.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.subscriptions.is_empty()
    }

    /// The next item of any channel; `None` once no channel is left.
    pub(crate) async fn next(&mut self) -> Option<ChannelItem> {
        std::future::poll_fn(|context| self.poll_next_item(context)).await
    }

    /// The next item if one is ready now (`None` if none is, or no channel is left), for
    /// coalescing a burst into one write.
    pub(crate) fn next_ready(&mut self) -> Option<ChannelItem> {
        self.next().now_or_never().flatten()
    }

    /// Takes what each channel has ready now, replays included (a replay page may await the
    /// broker), channel by channel, handing each item to `add` until it says the reply is
    /// full. A lagged or ended channel is skipped; a broker failure ends the taking.
    pub(crate) async fn take_ready(
        &mut self,
        mut add: impl FnMut(&Channel, SubscriptionItem) -> bool,
    ) -> Result<(), SubscriptionError> {
        for (channel, subscription) in self.subscriptions.iter_mut() {
            loop {
                match subscription.try_next().await {
                    Some(Ok(item)) => {
                        if !add(channel, item) {
                            return Ok(());
                        }
                    }
                    Some(Err(SubscriptionError::Lagged { .. })) | None => break,
                    Some(Err(error)) => return Err(error),
                }
            }
        }
        Ok(())
    }

    /// The channels of the set.
    pub(crate) fn channels(&self) -> impl Iterator<Item = &Channel> {
        self.subscriptions.keys()
    }

    /// Where the client stands in every channel: each subscription's position, which moves
    /// as the set hands out items.
    pub(crate) fn cursor(&self) -> Cursor {
        self.subscriptions
            .iter()
            .filter(|(_, subscription)| !subscription.delivering_state())
            .map(|(channel, subscription)| (channel.clone(), subscription.position().clone()))
            .collect()
    }

    /// Appends the cursor's text to `out` (an SSE event's `id`), without building a cursor.
    pub(crate) fn write_cursor(&self, out: &mut Vec<u8>) {
        Cursor::write_entries(
            self.subscriptions
                .iter()
                .filter(|(_, subscription)| !subscription.delivering_state())
                .map(|(channel, subscription)| (channel, subscription.position())),
            out,
        );
    }

    /// Polls the subscriptions like `StreamMap` does, but polls a lone subscription directly:
    /// most connections follow one channel, and the map draws a random number per poll to be
    /// fair between its streams, which such a connection paid for every event.
    fn poll_next_item(&mut self, context: &mut Context<'_>) -> Poll<Option<ChannelItem>> {
        if self.subscriptions.len() == 1
            && let Some((channel, subscription)) = self.subscriptions.iter_mut().next()
        {
            match Pin::new(subscription).poll_next(context) {
                Poll::Ready(Some(item)) => return Poll::Ready(Some((channel.clone(), item))),
                // Ended: the map's own poll below removes it.
                Poll::Ready(None) => {}
                Poll::Pending => return Poll::Pending,
            }
        }
        self.subscriptions.poll_next_unpin(context)
    }
}
