//! Server-Sent Events: one GET follows one or more channels; a browser's own `EventSource`
//! resumes the whole stream by itself through `Last-Event-ID`.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse};
use bytes::Bytes;
use resync_broker::SubscriptionItem;
use resync_protocol::bodies::{
    DisconnectNotice, PresenceLaggedNotice, ResetNotice, SseOpening, UnsubscribedNotice,
};
use resync_protocol::sse::{SseFrame, encode_comment};
use resync_protocol::{Channel, ErrorCode, RecoveryOutcome, ServerFrame};

use crate::Shared;
use crate::channel_set::{ChannelSet, Since};
use crate::error::ApiError;
use crate::metrics::Transport;
use crate::probe::Departure;
use crate::request::{Admitted, admit_follower, cors_headers, loggable_target};
use crate::session::{self, Session, SessionEnd, SessionEvent};

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
    let mut response = stream_response(shared, request);
    if *shared.shutdown.borrow() {
        response.force_close();
    }
    response.body(body)
}

async fn open_stream(
    shared: &Arc<Shared>,
    request: &HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let shared = shared.clone();
    let mut admitted = admit_follower(&shared, request).await?;
    let session::Remembered {
        stay_away,
        unsubscribed,
    } = session::apply_remembered(&shared, &mut admitted);
    let Admitted {
        query,
        identity,
        guard: admitted,
        ..
    } = admitted;
    if let Some(reason) = stay_away {
        // The user was told not to come back (a bare `EventSource` comes back whatever it
        // is told): told again, with the hour-long `retry:`.
        let mut body = Vec::new();
        encode_end(
            &shared.config,
            &SessionEnd::Disconnected {
                reason,
                reconnect: false,
            },
            &mut body,
        );
        return Ok(stream_response(&shared, request).body(body));
    }

    let since = Since::of_stream(query.cursor, request);
    session::check_presence(
        &shared,
        &identity,
        &query.channels,
        query.presence.as_ref(),
        query.join_leave,
    )?;
    let (channels, outcomes) =
        ChannelSet::open(&shared, &query.channels, &since, &query.state, &[]).await?;
    // The member's info: the request's, or its token's (which the session does not keep).
    let member = query.presence.clone().map(|mut request| {
        if request.info.is_none() {
            request.info = identity.info.clone();
        }
        request
    });
    let mut session = Session::new(
        shared.clone(),
        identity,
        admitted,
        Transport::Sse,
        channels,
        Departure::of(request),
    );
    session
        .start_presence_of_all(&query.channels, member.as_ref(), query.join_leave)
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
    let id = session.channels().cursor().to_string();
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
    // Channels the user was unsubscribed from a moment ago are not followed: said at once.
    for channel in unsubscribed {
        encode_unsubscribed(channel, &mut first_chunk);
    }
    let ended = session.channels().is_empty();
    if ended {
        first_chunk.extend_from_slice(format!("retry: {STAY_AWAY_RETRY_MS}\n\n").as_bytes());
    }

    let state = StreamState {
        session,
        first_chunk: Some(Bytes::from(first_chunk)),
        ended,
        full: false,
    };
    let body = futures_util::stream::unfold(state, |mut state| async move {
        let chunk = state.next_chunk().await?;
        Some((Ok::<_, std::convert::Infallible>(chunk), state))
    });
    Ok(stream_response(&shared, request)
        // Tells nginx not to buffer the stream.
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(body))
}

/// A `200 text/event-stream` with the request's CORS headers, its body to come.
fn stream_response(shared: &Shared, request: &HttpRequest) -> actix_web::HttpResponseBuilder {
    let mut response = HttpResponse::Ok();
    for (name, value) in cors_headers(request, &shared.config.allowed_origins) {
        response.insert_header((name, value));
    }
    response
        .insert_header((header::CONTENT_TYPE, "text/event-stream"))
        .insert_header((header::CACHE_CONTROL, "no-cache, no-transform"));
    response
}

/// The `retry:` of a stream whose user was told not to come back (a bare `EventSource`
/// reconnects whatever it is told; this makes it wait an hour).
const STAY_AWAY_RETRY_MS: u64 = 3_600_000;

/// An SSE stream: its session, encoded.
struct StreamState {
    session: Session,
    first_chunk: Option<Bytes>,
    ended: bool,
    /// The last chunk stopped at the size limit with more events ready: the next poll hands
    /// control back once, so actix-http writes that chunk before copying in another rather
    /// than growing its buffer to hold both.
    full: bool,
}

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
        let event = self.session.next().await;
        let mut chunk = Vec::new();
        match event {
            SessionEvent::Item(channel, item) => {
                // 1 KiB: a few events, and small enough for the allocator's per-thread cache,
                // so the common one-event chunk reuses memory just freed instead of taking a
                // fresh 8 KiB block per event. A burst gets its full size at once.
                chunk.reserve(1024);
                let mut delivered = 0;
                let mut next = Some((channel, Ok(item)));
                // Coalesce whatever else is ready into the same write.
                while let Some((channel, item)) = next.take() {
                    match item {
                        Ok(item) => delivered += self.encode_item(&channel, item, &mut chunk),
                        Err(error) => {
                            let end = self.session.item_failed(&channel, error);
                            self.end(&end, &mut chunk);
                            break;
                        }
                    }
                    if chunk.len() >= MAX_CHUNK_BYTES {
                        self.full = true;
                        break;
                    }
                    next = self.session.next_ready();
                    if next.is_some() && chunk.capacity() < MAX_CHUNK_BYTES {
                        chunk.reserve(crate::write_size::burst_room(chunk.len()));
                    }
                }
                self.session.delivered(delivered);
            }
            SessionEvent::Presence(frames) => {
                // The data is the WebSocket frame's JSON.
                for frame in frames {
                    let name = match &frame {
                        ServerFrame::Join { .. } => "join",
                        ServerFrame::Leave { .. } => "leave",
                        _ => "presence",
                    };
                    SseFrame {
                        id: None,
                        event: Some(name),
                        data: &frame.encode(),
                        retry_ms: None,
                    }
                    .encode_into(&mut chunk);
                }
            }
            SessionEvent::PresenceLagged { channel, message } => {
                // The client must fetch the list again.
                SseFrame {
                    id: None,
                    event: Some("presence_lagged"),
                    data: &PresenceLaggedNotice { channel, message }.to_json(),
                    retry_ms: None,
                }
                .encode_into(&mut chunk);
            }
            SessionEvent::Tick => {
                // The comment keeps proxies from closing an idle stream; the `ping` event lets a
                // browser client, which cannot see comments, notice a stream gone silent.
                chunk = encode_comment("ping");
                SseFrame {
                    id: None,
                    event: Some("ping"),
                    data: "{}",
                    retry_ms: None,
                }
                .encode_into(&mut chunk);
            }
            SessionEvent::Unsubscribed(channel) => {
                encode_unsubscribed(channel, &mut chunk);
                // A stream cannot take new channels: with none left, it stays away.
                if self.session.channels().is_empty() {
                    chunk.extend_from_slice(format!("retry: {STAY_AWAY_RETRY_MS}\n\n").as_bytes());
                    self.ended = true;
                }
            }
            SessionEvent::End(end) => self.end(&end, &mut chunk),
        }
        if chunk.is_empty() {
            return None;
        }
        Some(Bytes::from(chunk))
    }

    /// Ends the stream, telling the client why in what it still reads.
    fn end(&mut self, end: &SessionEnd, chunk: &mut Vec<u8>) {
        self.ended = true;
        encode_end(self.session.config(), end, chunk);
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
                self.session.channels().write_cursor(chunk);
                chunk.extend_from_slice(b"\ndata: ");
                chunk.extend_from_slice(event.frame());
                chunk.extend_from_slice(b"\n\n");
                1
            }
            SubscriptionItem::State {
                entries,
                position,
                more,
            } => {
                // The WebSocket's `state` frames as the data of `state` events; the last one
                // carries the cursor, which stands at the state's position from then on.
                let frames = crate::membership::state_frames(channel, entries, &position, more);
                let last = frames.len() - 1;
                for (index, frame) in frames.into_iter().enumerate() {
                    let id = (index == last && !more)
                        .then(|| self.session.channels().cursor().to_string());
                    SseFrame {
                        id: id.as_deref(),
                        event: Some("state"),
                        data: &frame.encode(),
                        retry_ms: None,
                    }
                    .encode_into(chunk);
                }
                0
            }
            SubscriptionItem::Reset { reason, position } => {
                self.session.reset(reason);
                let data = ResetNotice {
                    channel: channel.clone(),
                    reason,
                    position,
                }
                .to_json();
                SseFrame {
                    id: Some(&self.session.channels().cursor().to_string()),
                    event: Some("reset"),
                    data: &data,
                    retry_ms: None,
                }
                .encode_into(chunk);
                0
            }
        }
    }
}

fn encode_unsubscribed(channel: Channel, chunk: &mut Vec<u8>) {
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
    .encode_into(chunk);
}

/// The last words of a stream that ends for `end`: a `retry:` hint for when to come back
/// (`EventSource` comes back after any end), after a `disconnect` event when the application
/// ended it.
fn encode_end(config: &crate::TransportConfig, end: &SessionEnd, chunk: &mut Vec<u8>) {
    let retry_ms = match end {
        // Spread the reconnects too.
        SessionEnd::Shutdown => Some(fastrand::u64(0..=1_000)),
        SessionEnd::SlowConsumer | SessionEnd::BrokerFailed => Some(config.sse_retry_ms),
        SessionEnd::Disconnected { reason, reconnect } => {
            // A bare `EventSource` reconnects by itself whatever it is told: one told to stay
            // away is given a retry of an hour; the browser client closes on the event.
            let data = DisconnectNotice {
                reason: reason.clone(),
                reconnect: *reconnect,
            }
            .to_json();
            SseFrame {
                id: None,
                event: Some("disconnect"),
                data: &data,
                retry_ms: None,
            }
            .encode_into(chunk);
            Some(if *reconnect {
                config.sse_retry_ms
            } else {
                STAY_AWAY_RETRY_MS
            })
        }
        // The client must come back with a new token; nobody is left to read a departure.
        SessionEnd::Expired | SessionEnd::Departed => None,
    };
    if let Some(retry_ms) = retry_ms {
        chunk.extend_from_slice(format!("retry: {retry_ms}\n\n").as_bytes());
    }
}
