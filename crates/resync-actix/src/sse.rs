//! Server-Sent Events: one GET follows one or more channels; a browser's own `EventSource`
//! resumes the whole stream by itself through `Last-Event-ID`.

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::StreamExt;
use resync_broker::{PresenceEvent, PresenceLagged, PresenceWatch};
use resync_broker::{SubscriptionError, SubscriptionItem};
use resync_protocol::bodies::{
    DisconnectNotice, PresenceLaggedNotice, ResetNotice, SseOpening, UnsubscribedNotice,
};
use resync_protocol::sse::{SseFrame, encode_comment};
use resync_protocol::{Channel, ErrorCode, RecoveryOutcome, ServerFrame};
use tokio::sync::watch;

use crate::Shared;
use crate::channel_set::{ChannelSet, Since};
use crate::error::ApiError;
use crate::membership::{self, Memberships};
use crate::metrics::{ConnectionGuard, Transport};
use crate::probe::Departure;
use crate::request::{Admitted, admit_follower, cors_headers, loggable_target};
use crate::users::UserInbox;
use resync_protocol::bodies::UserCommand;

/// At most about this many bytes of ready events are coalesced into one write.
const MAX_CHUNK_BYTES: usize = crate::write_size::WRITE_BYTES;

pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    match open_stream(&shared, &request).await {
        // A non-200 answer closes an `EventSource` for good (WHATWG HTML, "fail the
        // connection"), so "try again later" is a stream that says when, then ends.
        Err(error) if error.code == ErrorCode::Unavailable => {
            let retry_ms = shared.config.sse_retry_ms + fastrand::u64(0..=1_000);
            Ok(retry_later(&shared, &request, &error, retry_ms))
        }
        // One address asking too much waits longer.
        Err(error) if error.code == ErrorCode::RateLimited => {
            let retry_ms = 5_000 + fastrand::u64(0..=5_000);
            Ok(retry_later(&shared, &request, &error, retry_ms))
        }
        other => other,
    }
}

/// A stream that only says when to come back: during shutdown (on a connection of its own, so
/// the retry meets the closed listener or the next process), while the broker is down, at the
/// connection limits.
fn retry_later(
    shared: &Shared,
    request: &HttpRequest,
    error: &ApiError,
    retry_ms: u64,
) -> HttpResponse {
    let mut body = encode_comment(&format!("unavailable: {}", error.message));
    body.extend_from_slice(format!("retry: {retry_ms}\n\n").as_bytes());
    let mut response = HttpResponse::Ok();
    for (name, value) in cors_headers(request, &shared.config.allowed_origins) {
        response.insert_header((name, value));
    }
    if *shared.shutdown.borrow() {
        response.force_close();
    }
    response
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache, no-transform"))
        .body(body)
}

async fn open_stream(
    shared: &Arc<Shared>,
    request: &HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let shared = shared.clone();
    let Admitted {
        query,
        identity,
        guard: mut admitted,
        ..
    } = admit_follower(&shared, request).await?;

    let since = Since::of_stream(query.cursor, request);
    for channel in &query.channels {
        membership::check(
            &shared,
            &identity,
            channel,
            query.presence.as_ref(),
            query.join_leave,
        )?;
    }
    let (channels, outcomes) = ChannelSet::open(&shared, &query.channels, &since).await?;
    let presence = start_presence(
        &shared,
        &identity,
        &query.channels,
        query.presence,
        query.join_leave,
        &mut admitted,
    )
    .await?;
    tracing::debug!(target: "resync::sse", request = %loggable_target(request), channels = outcomes.len(), "stream opened");

    // Resets found now also go out as `reset` events, right after the opening: a client
    // that listens only for `reset` (as a browser page written from the docs does) must see
    // the refetch it owes after a deploy or a truncation.
    let mut resets = Vec::new();
    for (channel, outcome) in &outcomes {
        if let &RecoveryOutcome::Reset {
            reason,
            ref position,
        } = outcome
        {
            resets.push(
                ResetNotice {
                    channel: channel.clone(),
                    reason,
                    position: position.clone(),
                }
                .to_json(),
            );
        }
    }
    let opening = SseOpening {
        channels: outcomes.into_iter().collect(),
    };
    // Validated names and enums: serializing cannot fail.
    let opening = serde_json::to_string(&opening).unwrap_or_default();
    let id = channels.cursor().to_string();
    let mut first_chunk = encode_comment("resync");
    SseFrame {
        id: Some(&id),
        event: Some("subscribed"),
        data: &opening,
        retry_ms: Some(shared.config.sse_retry_ms),
    }
    .encode_into(&mut first_chunk);
    for reset in &resets {
        SseFrame {
            id: Some(&id),
            event: Some("reset"),
            data: reset,
            retry_ms: None,
        }
        .encode_into(&mut first_chunk);
    }

    let cors = cors_headers(request, &shared.config.allowed_origins);
    let user_commands = identity
        .subject
        .as_deref()
        .map(|user| Box::new(shared.users.register(&shared.broker, user)));
    let state = StreamState {
        user_commands,
        admitted,
        guard: shared.metrics.connection(Transport::Sse),
        ends: ends(identity.remaining(), Departure::of(request)),
        heartbeat: shared.clock(&shared.sse_heartbeat),
        shared,
        channels,
        presence,
        first_chunk: Some(Bytes::from(first_chunk)),
        ended: false,
        full: false,
    };
    let body = futures_util::stream::unfold(state, |mut state| async move {
        let chunk = state.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), state))
    });
    let mut response = HttpResponse::Ok();
    for (name, value) in cors {
        response.insert_header((name, value));
    }
    Ok(response
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache, no-transform"))
        // Tells nginx not to buffer the stream.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// A stream's part in presence: it leaves its channels when dropped.
struct StreamPresence {
    watches: tokio_stream::StreamMap<Channel, PresenceWatch>,
    #[allow(dead_code, reason = "held for its Drop, which leaves the channels")]
    memberships: Memberships,
}

/// Joins the stream's channels (with `presence=`) and watches their joins and leaves (with
/// `join_leave=1`); every request was checked by `membership::check` already.
async fn start_presence(
    shared: &Arc<Shared>,
    identity: &crate::auth::Identity,
    channels: &[Channel],
    member: Option<resync_protocol::PresenceRequest>,
    join_leave: bool,
    admitted: &mut crate::admission::AdmissionGuard,
) -> Result<Option<Box<StreamPresence>>, ApiError> {
    let Some(presence) = shared.broker.presence() else {
        return Ok(None);
    };
    if member.is_none() && !join_leave {
        return Ok(None);
    }
    let connection = format!("{:016x}", fastrand::u64(..));
    let mut state = StreamPresence {
        watches: tokio_stream::StreamMap::new(),
        memberships: Memberships::new(
            shared.broker.clone(),
            membership::member_id(identity, &connection),
            connection,
        ),
    };
    membership::watch_and_join(
        presence,
        identity,
        channels,
        member.as_ref(),
        join_leave,
        &mut state.memberships,
        &mut state.watches,
        admitted,
    )
    .await?;
    Ok(Some(Box::new(state)))
}

/// What woke a waiting stream.
enum Wake {
    Item(Option<(Channel, Result<SubscriptionItem, SubscriptionError>)>),
    Presence(Channel, Result<PresenceEvent, PresenceLagged>),
    UserCommand(UserCommand),
    Heartbeat,
    Shutdown,
    Expired,
    Gone,
}

/// The `retry:` of a stream whose user was told not to come back (a bare `EventSource`
/// reconnects whatever it is told; this makes it wait an hour).
const STAY_AWAY_RETRY_MS: u64 = 3_600_000;

struct StreamState {
    shared: Arc<Shared>,
    /// The stream's place under the connection limits, released when it ends.
    admitted: crate::admission::AdmissionGuard,
    #[allow(
        dead_code,
        reason = "held for its Drop, which counts the connection's end"
    )]
    guard: ConnectionGuard,
    channels: ChannelSet,
    /// Presence memberships and join/leave watches, when the stream asked for them.
    presence: Option<Box<StreamPresence>>,
    /// The user commands for the stream's user; `None` when anonymous.
    user_commands: Option<Box<UserInbox>>,
    /// Completes when the token expires or the client goes away; kept across chunks, so the
    /// per-event path does not set up timers or socket interest again.
    ends: Option<Ending>,
    heartbeat: watch::Receiver<u64>,
    first_chunk: Option<Bytes>,
    ended: bool,
    /// The last chunk stopped at the size limit with more events ready: the next poll hands
    /// control back once, so actix-http writes that chunk before copying in another rather
    /// than growing its buffer to hold both.
    full: bool,
}

/// Waits for whichever ends the stream first: token expiry or the client's departure. `None`
/// when neither can happen (no expiry, no way to see a departure), so such a stream
/// allocates nothing for it.
fn ends(expiry: Option<Duration>, departure: Departure) -> Option<Ending> {
    match (expiry, departure.is_known()) {
        (None, false) => None,
        (Some(remaining), false) => Some(Box::pin(async move {
            tokio::time::sleep(remaining).await;
            Wake::Expired
        })),
        (None, true) => Some(Box::pin(async move {
            departure.wait().await;
            Wake::Gone
        })),
        (Some(remaining), true) => Some(Box::pin(async move {
            tokio::select! {
                _ = tokio::time::sleep(remaining) => Wake::Expired,
                _ = departure.wait() => Wake::Gone,
            }
        })),
    }
}

/// What ends a stream besides its channels: see [`ends`].
type Ending = std::pin::Pin<Box<dyn std::future::Future<Output = Wake>>>;

impl StreamState {
    /// The next bytes to write, or `None` to end the stream.
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first_chunk.take() {
            return Some(first);
        }
        if self.ended {
            return None;
        }
        if std::mem::take(&mut self.full) {
            tokio::task::yield_now().await;
        }
        // Biased: while events are ready, the other branches are never polled, so a burst
        // does not register and unregister every stream with the shared clock on each chunk.
        let wake = tokio::select! {
            biased;
            item = self.channels.next() => Wake::Item(item),
            Some((channel, event)) = async {
                self.presence.as_mut()?.watches.next().await
            }, if self.presence.as_ref().is_some_and(|presence| !presence.watches.is_empty()) => {
                Wake::Presence(channel, event)
            }
            Some(command) = async {
                self.user_commands.as_mut()?.commands.recv().await
            }, if self.user_commands.is_some() => Wake::UserCommand(command),
            // Shutdown wakes the heartbeat clock too (see `Resync::shutdown`).
            _ = self.heartbeat.changed() => {
                if *self.shared.shutdown.borrow() {
                    Wake::Shutdown
                } else {
                    Wake::Heartbeat
                }
            }
            end = async {
                match &mut self.ends {
                    Some(ends) => ends.await,
                    None => std::future::pending().await,
                }
            } => end,
        };
        match wake {
            Wake::Item(item) => {
                // 1 KiB: a few events, and small enough for the allocator's per-thread cache,
                // so the common one-event chunk reuses memory just freed instead of taking a
                // fresh 8 KiB block per event. A burst gets its full size at once.
                let mut chunk = Vec::with_capacity(1024);
                let mut delivered = 0;
                let mut next = item;
                // Coalesce whatever else is ready into the same write.
                loop {
                    match next {
                        Some((channel, Ok(item))) => {
                            delivered += self.encode_item(&channel, item, &mut chunk);
                        }
                        Some((_, Err(SubscriptionError::Lagged { .. }))) => {
                            self.shared.metrics.slow_consumer_closed(Transport::Sse);
                            self.end_with_retry(&mut chunk, self.shared.config.sse_retry_ms);
                            break;
                        }
                        Some((channel, Err(error))) => {
                            tracing::warn!(target: "resync::sse", %channel, %error, "subscription ended");
                            self.end_with_retry(&mut chunk, self.shared.config.sse_retry_ms);
                            break;
                        }
                        None => {
                            self.ended = true;
                            break;
                        }
                    }
                    if chunk.len() >= MAX_CHUNK_BYTES {
                        self.full = true;
                        break;
                    }
                    match self.channels.next_ready() {
                        Some(item) => {
                            if chunk.capacity() < MAX_CHUNK_BYTES {
                                chunk.reserve(crate::write_size::burst_room(chunk.len()));
                            }
                            next = Some(item);
                        }
                        None => break,
                    }
                }
                self.shared.metrics.delivered(Transport::Sse, delivered);
                Some(Bytes::from(chunk))
            }
            Wake::Presence(channel, event) => {
                // The data is the WebSocket frame's JSON; a lag tells the client to fetch
                // the list again.
                let events = match membership::watcher_frames(&self.shared, channel, event).await {
                    Ok(frames) => frames
                        .into_iter()
                        .map(|frame| {
                            let name = match &frame {
                                ServerFrame::Join { .. } => "join",
                                ServerFrame::Leave { .. } => "leave",
                                _ => "presence",
                            };
                            (name, frame.encode())
                        })
                        .collect(),
                    Err((channel, message)) => vec![(
                        "presence_lagged",
                        PresenceLaggedNotice { channel, message }.to_json(),
                    )],
                };
                let mut chunk = Vec::new();
                for (name, data) in &events {
                    SseFrame {
                        id: None,
                        event: Some(name),
                        data,
                        retry_ms: None,
                    }
                    .encode_into(&mut chunk);
                }
                Some(Bytes::from(chunk))
            }
            Wake::Heartbeat => {
                // The comment keeps proxies from closing an idle stream; the `ping` event lets a
                // browser client, which cannot see comments, notice a stream gone silent.
                let mut chunk = encode_comment("ping");
                SseFrame {
                    id: None,
                    event: Some("ping"),
                    data: "{}",
                    retry_ms: None,
                }
                .encode_into(&mut chunk);
                Some(Bytes::from(chunk))
            }
            Wake::UserCommand(command) => {
                let mut chunk = Vec::new();
                match command {
                    // A `disconnect` event, then the end. A bare `EventSource` reconnects
                    // by itself whatever it is told: one told to stay away is given a retry
                    // of an hour; the browser client closes on the event.
                    UserCommand::Disconnect {
                        reason, reconnect, ..
                    } => {
                        let data = DisconnectNotice {
                            reason: reason.clone(),
                            reconnect,
                        }
                        .to_json();
                        SseFrame {
                            id: None,
                            event: Some("disconnect"),
                            data: &data,
                            retry_ms: None,
                        }
                        .encode_into(&mut chunk);
                        let retry_ms = if reconnect {
                            self.shared.config.sse_retry_ms
                        } else {
                            STAY_AWAY_RETRY_MS
                        };
                        self.end_with_retry(&mut chunk, retry_ms);
                    }
                    UserCommand::Unsubscribe { channel, .. } => {
                        if self.channels.remove(&channel) {
                            // Its place in the budgets goes with it, as on every transport.
                            self.admitted.unsubscribe(1);
                            let data = UnsubscribedNotice {
                                channel,
                                reason: resync_protocol::UnsubscribeReason::Server,
                            }
                            .to_json();
                            SseFrame {
                                id: None,
                                event: Some("unsubscribed"),
                                data: &data,
                                retry_ms: None,
                            }
                            .encode_into(&mut chunk);
                            if self.channels.is_empty() {
                                self.end_with_retry(&mut chunk, STAY_AWAY_RETRY_MS);
                            }
                        }
                    }
                }
                Some(Bytes::from(chunk))
            }
            Wake::Shutdown => {
                let spread = self.shared.config.shutdown_spread;
                tokio::time::sleep(spread.mul_f64(fastrand::f64())).await;
                let mut chunk = Vec::new();
                // Spread the reconnects too.
                self.end_with_retry(&mut chunk, fastrand::u64(0..=1_000));
                Some(Bytes::from(chunk))
            }
            Wake::Gone => {
                self.ended = true;
                None
            }
            Wake::Expired => {
                // The token expired: end the stream; the client must come back with a new one.
                self.ended = true;
                None
            }
        }
    }

    /// Appends one item and returns how many events it delivered.
    fn encode_item(
        &mut self,
        channel: &Channel,
        item: SubscriptionItem,
        chunk: &mut Vec<u8>,
    ) -> u64 {
        match item {
            SubscriptionItem::Event(event) => {
                // The hot path, written out: an event frame is one line of JSON and a cursor
                // has no line breaks, so the generic encoder's line splitting is not needed.
                chunk.extend_from_slice(b"id: ");
                // The set's cursor has moved to this event already.
                self.channels.write_cursor(chunk);
                chunk.extend_from_slice(b"\ndata: ");
                chunk.extend_from_slice(event.frame());
                chunk.extend_from_slice(b"\n\n");
                1
            }
            SubscriptionItem::Reset { reason, position } => {
                self.shared.metrics.reset(reason);
                let data = ResetNotice {
                    channel: channel.clone(),
                    reason,
                    position,
                }
                .to_json();
                SseFrame {
                    id: Some(&self.channels.cursor().to_string()),
                    event: Some("reset"),
                    data: &data,
                    retry_ms: None,
                }
                .encode_into(chunk);
                0
            }
        }
    }

    fn end_with_retry(&mut self, chunk: &mut Vec<u8>, retry_ms: u64) {
        chunk.extend_from_slice(format!("retry: {retry_ms}\n\n").as_bytes());
        self.ended = true;
    }
}
