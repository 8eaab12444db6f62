//! Long polling (never short polling): a GET that answers at once when something is newer than
//! the client's cursor, and otherwise waits for the first event or a timeout.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use resync_broker::SubscriptionItem;
use resync_broker::{PresenceEvent, PresenceLagged};
use resync_protocol::bodies::{PollPresence, PollReply, ResetNotice};
use resync_protocol::{Channel, Cursor, ErrorCode, RecoveryOutcome, ServerFrame};
use tokio_stream::StreamExt;

use crate::Shared;
use crate::channel_set::{ChannelSet, Since};
use crate::error::ApiError;
use crate::membership;
use crate::metrics::Transport;
use crate::poll_presence::{self, Lease};
use crate::probe::Departure;
use crate::request::{Admitted, admit_follower, cors_headers};

pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let Admitted {
        query,
        identity,
        guard: _admitted,
        ..
    } = admit_follower(&shared, &request).await?;
    let _guard = shared.metrics.connection(Transport::Poll);
    let mut session = poll_presence::open(&shared, &request, &identity, &query).await?;
    let mut batch = Batch::new();
    if let Some(session) = session.as_mut() {
        batch.presence = std::mem::take(&mut session.state.owed);
    }

    let Some(cursor) = query.cursor else {
        // The first poll starts "now": answer at once with the current cursor, so that nothing
        // published before the next poll is missed.
        let positions = futures_util::future::join_all(
            query
                .channels
                .iter()
                .map(|channel| shared.broker.position(channel)),
        )
        .await;
        let mut cursor = Cursor::new();
        for (channel, position) in query.channels.iter().zip(positions) {
            cursor.set(channel.clone(), position?);
        }
        return Ok(reply(
            &batch,
            &cursor,
            session.as_ref(),
            cors_headers(&request, &shared.config.allowed_origins),
        ));
    };

    let wait = query
        .timeout_seconds
        .map_or(shared.config.poll_timeout, Duration::from_secs)
        .min(shared.config.poll_timeout_max)
        .min(identity.remaining().unwrap_or(Duration::MAX));
    let (mut channels, outcomes) =
        ChannelSet::open(&shared, &query.channels, &Since::Cursor(cursor)).await?;
    // A channel the cursor does not name (an empty `cursor=`, a channel added to the poll)
    // starts now, like a first poll: the client needs its position at once, not after the
    // timeout.
    let mut starts_now = false;
    for (channel, outcome) in outcomes {
        starts_now |= matches!(outcome, RecoveryOutcome::Fresh { .. });
        if let RecoveryOutcome::Reset { reason, position } = outcome {
            batch.resets.push(ResetNotice {
                channel,
                reason,
                position,
            });
        }
    }

    // Whatever is ready now (replays) goes out at once.
    let max_events = shared.config.poll_max_events;
    let max_bytes = shared.config.poll_max_bytes;
    channels
        .take_ready(|channel, item| {
            batch.add(&shared, channel, item);
            batch.events.len() < max_events && batch.bytes < max_bytes
        })
        .await
        .map_err(|error| ApiError::new(ErrorCode::Unavailable, error.to_string()))?;

    if let Some(session) = session.as_mut() {
        take_ready_presence(&shared, session, &mut batch).await;
    }

    if batch.is_empty() && !starts_now {
        let mut shutdown = shared.shutdown.subscribe();
        let watching = session
            .as_ref()
            .is_some_and(|session| !session.state.watches.is_empty());
        let superseded = session.as_ref().map(Lease::superseded);
        let departure = Departure::of(&request);
        tokio::select! {
            first = channels.next() => {
                let mut next = first;
                while let Some((channel, Ok(item))) = next {
                    batch.add(&shared, &channel, item);
                    if batch.events.len() >= max_events || batch.bytes >= max_bytes {
                        break;
                    }
                    next = channels.next_ready();
                }
            }
            Some((channel, event)) = async {
                session.as_mut()?.state.watches.next().await
            }, if watching => {
                batch.push_presence(&shared, channel, event).await;
                if let Some(session) = session.as_mut() {
                    take_ready_presence(&shared, session, &mut batch).await;
                }
            }
            () = async {
                match superseded {
                    Some(superseded) => superseded.await,
                    None => std::future::pending().await,
                }
            } => {
                // A newer poll of this client took over the session: this one's client has
                // most likely given up on it, so the frames it owes go with the newer one.
                if let Some(session) = session.as_mut() {
                    session.state.owed = std::mem::take(&mut batch.presence);
                }
            }
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|shutting_down| *shutting_down) => {}
            _ = departure.wait() => {
                // Nobody is left to read the reply; free the subscriptions now.
                return Ok(HttpResponse::NoContent().finish());
            }
        }
    }
    shared
        .metrics
        .delivered(Transport::Poll, batch.events.len() as u64);
    Ok(reply(
        &batch,
        &channels.cursor(),
        session.as_ref(),
        cors_headers(&request, &shared.config.allowed_origins),
    ))
}

/// One long-poll reply under construction.
struct Batch {
    /// Each event's channel and frame.
    events: Vec<(Channel, bytes::Bytes)>,
    /// The frames' bytes: a reply stops growing past `poll_max_bytes` (the cursor carries
    /// the rest to the next poll), so one poll of a channel of large events cannot make the
    /// server build a reply of tens of megabytes.
    bytes: usize,
    resets: Vec<ResetNotice>,
    /// Presence frames (join, leave, the list) for a poll with a presence session.
    presence: Vec<String>,
}

impl Batch {
    fn new() -> Self {
        Self {
            bytes: 0,
            events: Vec::new(),
            resets: Vec::new(),
            presence: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.resets.is_empty() && self.presence.is_empty()
    }

    async fn push_presence(
        &mut self,
        shared: &Shared,
        channel: Channel,
        event: Result<PresenceEvent, PresenceLagged>,
    ) {
        let frame = membership::watcher_frame(shared, channel, event)
            .await
            .unwrap_or_else(|(channel, why)| ServerFrame::Error {
                id: None,
                code: ErrorCode::Unavailable,
                message: format!("{channel}: {why}"),
            });
        self.presence.push(frame.encode());
    }

    fn add(&mut self, shared: &Shared, channel: &Channel, item: SubscriptionItem) {
        match item {
            SubscriptionItem::Event(event) => {
                self.bytes += event.frame().len();
                self.events.push((channel.clone(), event.frame().clone()));
            }
            SubscriptionItem::Reset { reason, position } => {
                shared.metrics.reset(reason);
                // The refetch a reset asks for covers the channel's earlier events of this
                // reply: every event left in a reply comes after its channel's resets.
                self.events.retain(|(earlier, _)| earlier != channel);
                self.bytes = self.events.iter().map(|(_, frame)| frame.len()).sum();
                self.resets.push(ResetNotice {
                    channel: channel.clone(),
                    reason,
                    position,
                });
            }
        }
    }
}

/// Adds the join/leave events the session's watches hold now, without waiting.
async fn take_ready_presence(shared: &Shared, session: &mut Lease, batch: &mut Batch) {
    use futures_util::FutureExt;
    while let Some(Some((channel, event))) = session.state.watches.next().now_or_never() {
        batch.push_presence(shared, channel, event).await;
    }
}

/// The reply ([`PollReply`]), assembled from pre-encoded event frames; `cursor` is where
/// the client stands after it.
fn reply(
    batch: &Batch,
    cursor: &Cursor,
    session: Option<&Lease>,
    cors: Vec<(actix_web::http::header::HeaderName, String)>,
) -> HttpResponse {
    let body = PollReply::encode(
        batch.events.iter().map(|(_, frame)| &frame[..]),
        &batch.resets,
        cursor,
        session.map(|session| PollPresence {
            session: session.id(),
            frames: &batch.presence,
        }),
    );
    let mut response = HttpResponse::Ok();
    for (name, value) in cors {
        response.insert_header((name, value));
    }
    response
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(body)
}
