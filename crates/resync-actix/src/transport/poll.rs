//! Long polling (never short polling): a GET that answers at once when something is newer than
//! the client's cursor, and otherwise waits for the first event or a timeout.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use resync_broker::SubscriptionItem;
use resync_broker::{PresenceEvent, PresenceLagged};
use resync_protocol::bodies::{
    DisconnectNotice, PollNotices, PollPresence, PollReply, ResetNotice, UnsubscribedNotice,
};
use resync_protocol::{Channel, Cursor, ErrorCode, RecoveryOutcome};
use tokio_stream::StreamExt;

use crate::Shared;
use crate::channel_set::{ChannelSet, Since};
use crate::error::ApiError;
use crate::membership;
use crate::metrics::Transport;
use crate::poll_presence::{self, Lease};
use crate::probe::Departure;
use crate::request::{Admitted, admit_follower, cors_headers};
use crate::session::{self, Session, SessionEnd, SessionEvent};

pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let mut admitted = admit_follower(&shared, &request).await?;
    // A long-polling client is between two polls more often than in one: what its user was
    // told of late applies to its next polls too (issue 29, defect 3).
    let remembered = session::apply_remembered(&shared, &mut admitted);
    let Admitted {
        mut query,
        identity,
        address,
        guard: admitted,
        ..
    } = admitted;
    let mut notices = Notices {
        unsubscribed: remembered
            .unsubscribed
            .into_iter()
            .map(|channel| UnsubscribedNotice {
                channel,
                reason: resync_protocol::UnsubscribeReason::Server,
            })
            .collect(),
        disconnect: remembered.stay_away.map(|reason| DisconnectNotice {
            reason,
            reconnect: false,
        }),
        state_after: Vec::new(),
    };
    if notices.disconnect.is_some() {
        return Ok(notices_only(&shared, address, &query, notices, &request));
    }
    let mut lease = poll_presence::open(&shared, &request, &identity, &query).await?;
    let wait = query
        .timeout_seconds
        .map_or(shared.config.poll_timeout, Duration::from_secs)
        .min(shared.config.poll_timeout_max);
    let deadline = tokio::time::Instant::now() + wait;
    let departure = Departure::of(&request);
    // The reply's size: the configured most, and what the process's budget of bytes waiting
    // for clients has left for this address. With too little, wait for room (a client that
    // never reads cannot make the others' replies wait for ever: theirs are reserved
    // against their own address's share).
    let reply_max = shared.config.poll_max_bytes;
    let room = loop {
        let room = shared.replies.room(&shared.metrics, address, reply_max);
        if room >= MIN_REPLY_ROOM.min(reply_max) || tokio::time::Instant::now() >= deadline {
            break room;
        }
        tokio::select! {
            () = shared.replies.freed(deadline) => {}
            () = departure.wait() => return Ok(HttpResponse::NoContent().finish()),
        }
    };
    let mut batch = Batch::new(shared.config.poll_max_events, reply_max.min(room));
    if let Some(lease) = lease.as_mut() {
        for frame in std::mem::take(&mut lease.state.owed) {
            batch.push_presence_frame(frame);
        }
    }

    // A first poll that asks for the state opens its channels at once: the keyed ones from
    // their state, the others now.
    let cursor = match query.cursor.take() {
        None if !matches!(query.state, crate::request::StateWish::None) => Some(Since::Now),
        cursor => cursor,
    };
    let Some(since) = cursor else {
        // The first poll starts "now": answer at once with the current cursor, so that nothing
        // published before the next poll is missed.
        let _counted = shared.metrics.connection(Transport::Poll);
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
            &shared, address, batch, &cursor, lease, &notices, &request,
        ));
    };

    let (channels, outcomes) = ChannelSet::open(
        &shared,
        &query.channels,
        &since,
        &query.state,
        &query.state_after,
    )
    .await?;
    let mut session = Session::new(
        shared.clone(),
        identity,
        admitted,
        Transport::Poll,
        channels,
        departure,
    );
    // A channel the cursor does not name (an empty `cursor=`, a channel added to the poll)
    // starts now, like a first poll: the client needs its position at once, not after the
    // timeout. So does a state: it is ready.
    let mut starts_now = false;
    for (channel, outcome) in outcomes {
        starts_now |= matches!(
            outcome,
            RecoveryOutcome::Fresh { .. } | RecoveryOutcome::State { .. }
        );
        if let RecoveryOutcome::Reset { reason, position } = outcome {
            batch.resets.push(ResetNotice {
                channel,
                reason,
                position,
            });
        }
    }

    // Whatever is ready now (replays) goes out at once, while the reply has room; the cursor
    // carries the rest to the next poll.
    if batch.has_room() {
        session
            .take_ready(|channel, item| {
                batch.add(&shared, channel, item);
                batch.has_room()
            })
            .await
            .map_err(|error| ApiError::new(ErrorCode::Unavailable, error.to_string()))?;
    }

    if let Some(lease) = lease.as_mut() {
        take_ready_presence(&shared, lease, &mut batch).await;
    }

    if batch.is_empty() && !starts_now && batch.has_room() {
        let watching = lease
            .as_ref()
            .is_some_and(|lease| !lease.state.watches.is_empty());
        let mut superseded = lease.as_ref().map(|lease| Box::pin(lease.superseded()));
        loop {
            let wake = tokio::select! {
                wake = session.wake() => wake,
                Some((channel, event)) = async {
                    lease.as_mut()?.state.watches.next().await
                }, if watching => {
                    batch.push_presence(&shared, channel, event).await;
                    if let Some(lease) = lease.as_mut() {
                        take_ready_presence(&shared, lease, &mut batch).await;
                    }
                    break;
                }
                Some(()) = async { superseded.as_mut()?.await; Some(()) }, if superseded.is_some() => {
                    // A newer poll of this client took over the presence session: this one's
                    // client has most likely given up on it, so the frames it owes go with
                    // the newer one.
                    if let Some(lease) = lease.as_mut() {
                        lease.state.owed = batch.take_presence();
                    }
                    break;
                }
                _ = tokio::time::sleep_until(deadline) => break,
            };
            match session.understand(wake).await {
                Some(SessionEvent::Item(channel, item)) => {
                    batch.add(&shared, &channel, item);
                    while batch.has_room() {
                        let Some((channel, Ok(item))) = session.next_ready() else {
                            break;
                        };
                        batch.add(&shared, &channel, item);
                    }
                    break;
                }
                // Answered at once: an unsubscribe drops the channel from the next poll.
                Some(SessionEvent::Unsubscribed(channel)) => {
                    query.channels.retain(|held| *held != channel);
                    notices.unsubscribed.push(UnsubscribedNotice {
                        channel,
                        reason: resync_protocol::UnsubscribeReason::Server,
                    });
                    break;
                }
                Some(SessionEvent::End(SessionEnd::Disconnected { reason, reconnect })) => {
                    notices.disconnect = Some(DisconnectNotice { reason, reconnect });
                    break;
                }
                // Nobody is left to read the reply; the subscriptions go now.
                Some(SessionEvent::End(SessionEnd::Departed)) => {
                    return Ok(HttpResponse::NoContent().finish());
                }
                // A drain, an expiry, a lagging or failed subscription: answered with what
                // the poll has; the cursor carries the rest (or the next poll says why not).
                Some(SessionEvent::End(_)) => break,
                Some(
                    SessionEvent::Tick
                    | SessionEvent::Presence(_)
                    | SessionEvent::PresenceLagged { .. },
                )
                | None => {}
            }
        }
    }
    session.delivered(batch.events.len() as u64);
    let cursor = session.channels().cursor();
    notices.state_after = session.channels().state_progress();
    Ok(reply(
        &shared, address, batch, &cursor, lease, &notices, &request,
    ))
}

/// What a poll tells its client besides events: the channels the application unsubscribed
/// the user from, and a disconnect.
#[derive(Default)]
struct Notices {
    unsubscribed: Vec<UnsubscribedNotice>,
    disconnect: Option<DisconnectNotice>,
    /// Keyed channels whose state goes on in the next reply.
    state_after: Vec<String>,
}

/// The reply of a poll its user may no longer make: the disconnect, nothing else.
fn notices_only(
    shared: &Shared,
    address: std::net::IpAddr,
    query: &crate::request::QueryParams,
    notices: Notices,
    request: &HttpRequest,
) -> HttpResponse {
    let cursor = match &query.cursor {
        Some(Since::Cursor(cursor)) => cursor.clone(),
        _ => Cursor::new(),
    };
    reply(
        shared,
        address,
        Batch::new(0, 0),
        &cursor,
        None,
        &notices,
        request,
    )
}

/// Below this much room in the budget of bytes waiting for clients, a poll waits for room
/// rather than answer with nothing at once (which its client would poll again at once).
const MIN_REPLY_ROOM: usize = 64 * 1024;

/// One long-poll reply under construction, within its byte limit: events and presence
/// frames count alike, and what does not fit waits for the next poll (events by the
/// cursor, presence frames in the session).
struct Batch {
    /// Each event's channel and frame.
    events: Vec<(Channel, bytes::Bytes)>,
    event_bytes: usize,
    max_events: usize,
    /// The most bytes of events and presence frames in this reply (at least one item goes).
    max_bytes: usize,
    resets: Vec<ResetNotice>,
    /// Presence frames (join, leave, the list) for a poll with a presence session.
    presence: Vec<String>,
    presence_bytes: usize,
    /// Presence frames past the limit, owed to the next poll, oldest first.
    presence_later: Vec<String>,
}

impl Batch {
    fn new(max_events: usize, max_bytes: usize) -> Self {
        Self {
            events: Vec::new(),
            event_bytes: 0,
            max_events,
            max_bytes,
            resets: Vec::new(),
            presence: Vec::new(),
            presence_bytes: 0,
            presence_later: Vec::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.events.is_empty() && self.resets.is_empty() && self.presence.is_empty()
    }

    fn bytes(&self) -> usize {
        self.event_bytes + self.presence_bytes
    }

    /// Whether another item may join the reply.
    fn has_room(&self) -> bool {
        self.events.len() < self.max_events
            && self.bytes() < self.max_bytes
            && self.presence_later.is_empty()
    }

    /// Adds a presence frame, or keeps it for the next poll when the reply is full.
    fn push_presence_frame(&mut self, frame: String) {
        let fits = self.bytes() + frame.len() <= self.max_bytes;
        if self.presence_later.is_empty() && (fits || self.is_empty()) {
            self.presence_bytes += frame.len();
            self.presence.push(frame);
        } else {
            self.presence_later.push(frame);
        }
    }

    /// Every presence frame of the batch, this reply's and those for later, oldest first.
    fn take_presence(&mut self) -> Vec<String> {
        self.presence_bytes = 0;
        let mut frames = std::mem::take(&mut self.presence);
        frames.append(&mut self.presence_later);
        frames
    }

    async fn push_presence(
        &mut self,
        shared: &Shared,
        channel: Channel,
        event: Result<PresenceEvent, PresenceLagged>,
    ) {
        let frames = membership::watcher_frames(shared, channel, event)
            .await
            .unwrap_or_else(|(channel, why)| vec![membership::lagged_frame(&channel, &why)]);
        for frame in frames {
            self.push_presence_frame(frame.encode());
        }
    }

    fn add(&mut self, shared: &Shared, channel: &Channel, item: SubscriptionItem) {
        match item {
            SubscriptionItem::Event(event) => {
                self.event_bytes += event.frame().len();
                self.events.push((channel.clone(), event.frame().clone()));
            }
            SubscriptionItem::State {
                entries,
                position,
                more,
            } => {
                for frame in membership::state_frames(channel, entries, &position, more) {
                    let frame = bytes::Bytes::from(frame.encode());
                    self.event_bytes += frame.len();
                    self.events.push((channel.clone(), frame));
                }
            }
            SubscriptionItem::Reset { reason, position } => {
                shared.metrics.reset(reason);
                // The refetch a reset asks for covers the channel's earlier events of this
                // reply: every event left in a reply comes after its channel's resets.
                self.events.retain(|(earlier, _)| earlier != channel);
                self.event_bytes = self.events.iter().map(|(_, frame)| frame.len()).sum();
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
/// the client stands after it. Its bytes are reserved against the budget of bytes waiting
/// for clients until its body is gone; presence frames that did not fit stay owed.
fn reply(
    shared: &Shared,
    address: std::net::IpAddr,
    mut batch: Batch,
    cursor: &Cursor,
    mut session: Option<Lease>,
    notices: &Notices,
    request: &HttpRequest,
) -> HttpResponse {
    if let Some(session) = session.as_mut() {
        session.state.owed = std::mem::take(&mut batch.presence_later);
    }
    let body = PollReply::encode(
        batch.events.iter().map(|(_, frame)| &frame[..]),
        &batch.resets,
        cursor,
        session.as_ref().map(|session| PollPresence {
            session: session.id(),
            frames: &batch.presence,
        }),
        PollNotices {
            unsubscribed: &notices.unsubscribed,
            disconnect: notices.disconnect.as_ref(),
            state_after: &notices.state_after,
        },
    );
    let reservation = shared.replies.reserve(&shared.metrics, address, body.len());
    let mut response = HttpResponse::Ok();
    for (name, value) in cors_headers(request, &shared.config.allowed_origins) {
        response.insert_header((name, value));
    }
    response
        .insert_header((header::CONTENT_TYPE, "application/json"))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .body(crate::output::ReservedBody::new(
            bytes::Bytes::from(body),
            reservation,
        ))
}
