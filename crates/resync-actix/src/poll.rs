//! Long polling (never short polling): a GET that answers at once when something is newer than
//! the client's cursor, and otherwise waits for the first event or a timeout.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use resync_broker::SubscriptionItem;
use resync_protocol::bodies::{PollReply, ResetNotice};
use resync_protocol::{Channel, Cursor, ErrorCode, RecoveryOutcome};

use crate::Shared;
use crate::channel_set::{ChannelSet, Since};
use crate::error::ApiError;
use crate::metrics::Transport;
use crate::probe::{ConnectionProbe, client_gone};
use crate::request::{Admitted, admit_follower, cors_headers};

pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let Admitted {
        query,
        identity,
        guard: _admitted,
    } = admit_follower(&shared, &request).await?;
    let _guard = shared.metrics.connection(Transport::Poll);

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
            &Batch::new(),
            &cursor,
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
    let mut batch = Batch::new();
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

    if batch.is_empty() && !starts_now {
        let mut shutdown = shared.shutdown.subscribe();
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
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.wait_for(|shutting_down| *shutting_down) => {}
            _ = client_gone(ConnectionProbe::of(&request)) => {
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
}

impl Batch {
    fn new() -> Self {
        Self {
            bytes: 0,
            events: Vec::new(),
            resets: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.resets.is_empty()
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

/// The reply ([`PollReply`]), assembled from pre-encoded event frames; `cursor` is where
/// the client stands after it.
fn reply(
    batch: &Batch,
    cursor: &Cursor,
    cors: Vec<(actix_web::http::header::HeaderName, String)>,
) -> HttpResponse {
    let body = PollReply::encode(
        batch.events.iter().map(|(_, frame)| &frame[..]),
        &batch.resets,
        cursor,
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
