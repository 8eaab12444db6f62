//! WebSocket: many channels over one socket, both directions, with heartbeats and close codes
//! that tell the client what to do next.

pub(crate) mod socket;

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use resync_broker::SubscriptionItem;
use resync_protocol::{
    Channel, ClientFrame, CloseCode, ErrorCode, PROTOCOL_VERSION, RequestId, ServerFrame,
    UnsubscribeReason,
};
use tokio::time::Instant;
use tracing::Instrument;

use crate::Shared;
use crate::channel_set::ChannelSet;
use crate::error::ApiError;
use crate::membership;
use crate::metrics::Transport;
use crate::request::{admit, loggable_target};
use crate::session::{
    self, MessageVerdict, Remembered, RequestRates, Session, SessionEnd, SessionEvent,
    SubscribeFailure,
};
use socket::{Gone, Inbox, InboxError, Incoming, Outbox};

/// Ready items handled in one wake-up of a connection.
const MAX_BATCH: usize = 64;

/// Malformed frames in a row after which the connection is closed (4000).
const MAX_CONSECUTIVE_BAD_FRAMES: u32 = 10;

pub(crate) async fn handle(
    shared: Arc<Shared>,
    request: HttpRequest,
    body: web::Payload,
) -> Result<HttpResponse, ApiError> {
    // A WebSocket sees its client leave by itself: the connection's second descriptor goes.
    crate::probe::ConnectionProbe::release(&request);
    // Credentials are checked before the upgrade: a bad token gets a plain 401, no socket.
    let admitted = match admit(&shared, &request).await {
        Ok(admitted) => Some(admitted),
        // At the connection limit (not shutting down): upgrade and close with 1013, "try
        // again later", which every WebSocket client reads; an HTTP status it cannot.
        Err(error) if error.code == ErrorCode::Unavailable && !*shared.shutdown.borrow() => None,
        Err(error) => return Err(error),
    };
    let (response, mut outbox, messages) =
        socket::accept(&request, body, shared.config.max_message_bytes).map_err(|error| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("websocket handshake failed: {error}"),
            )
        })?;
    let Some(admitted) = admitted else {
        drop(messages);
        let code = CloseCode::SERVER_FULL;
        let write_timeout = shared.config.write_timeout;
        actix_web::rt::spawn(async move {
            let _ = tokio::time::timeout(write_timeout, outbox.close(code.0, code.reason())).await;
        });
        return Ok(response);
    };
    let now = std::time::Instant::now();
    let remembered = Remembered::of(&shared, &admitted.identity);
    let mut session = Session::new(
        shared.clone(),
        admitted.identity,
        admitted.guard,
        Transport::WebSocket,
        ChannelSet::new(),
        // A WebSocket learns of its client's departure from the socket.
        crate::probe::Departure::Unknown,
    );
    // What a refresh in place must keep: the token's own subject, the application's word.
    session.keep_for_refresh(admitted.token_subject, admitted.narrowing);
    tracing::debug!(target: "resync::ws", client_id = %session.client_id(), request = %loggable_target(&request), subject = ?session.identity().subject, "connected");
    let connection = Connection {
        close_reason: None,
        rates: RequestRates::new(&shared.config, now),
        address: admitted.address,
        session,
        outbox,
        bad_frames: 0,
    };
    // Everything the connection logs carries its client id (a debug span: free when debug
    // logging is off, so an idle connection holds nothing for it).
    let span = tracing::debug_span!(target: "resync::ws", "websocket", client_id = %connection.session.client_id());
    actix_web::rt::spawn(
        connection
            .run(messages, remembered.stay_away)
            .instrument(span),
    );
    Ok(response)
}

struct Connection {
    /// What the connection is: channels, presence, user commands, expiry, limits.
    session: Session,
    /// The rates its client's messages, publishes and refreshes are held to.
    rates: RequestRates,
    /// The client's address, for its share of the proxy's calls.
    address: std::net::IpAddr,
    outbox: Outbox,
    bad_frames: u32,
    /// The close reason an application gave (a user command), instead of the code's own.
    close_reason: Option<String>,
}

/// What woke the connection loop.
enum Wake {
    Message(Option<Result<Incoming, InboxError>>),
    Session(session::Wake),
    /// The silence deadline passed (it may have moved since: the loop looks again).
    Silence,
}

/// Why the connection loop stopped, and the close code to send.
enum Ending {
    Close(CloseCode),
    /// The socket is gone or stuck; nothing can be sent.
    Gone,
}

impl Connection {
    /// Serves the connection until it ends; `stay_away` when its user was told not to come
    /// back a moment ago: told again, and closed, as soon as it is open.
    async fn run(mut self, mut messages: Inbox, stay_away: Option<String>) {
        let ping_interval = self.session.config().ping_interval;
        let mut last_heard = Instant::now();
        // Its own deadline, two intervals after the last frame heard: a client that went
        // silent leaves (and leaves its channels' members) then, not at the first ping tick
        // past it (issue 29, defect 5: up to three intervals). Messages only move
        // `last_heard`; the timer is moved when it fires early.
        let silence_limit = ping_interval * 2;
        let mut silence = Box::pin(tokio::time::sleep_until(last_heard + silence_limit));

        let connected = ServerFrame::Connected {
            client_id: self.session.client_id().to_string(),
            ping_interval_ms: ping_interval.as_millis() as u64,
            protocol: PROTOCOL_VERSION,
            expires_at: unix_seconds(self.session.identity().expires_at),
        };
        let mut ending = self.send(connected.encode()).await.err();
        if let Some(reason) = stay_away
            && ending.is_none()
        {
            ending = Some(self.end(SessionEnd::Disconnected {
                reason,
                reconnect: false,
            }));
        }

        while ending.is_none() {
            // Biased: client frames first, then the session (items before its clocks).
            let wake = tokio::select! {
                biased;
                message = messages.next() => Wake::Message(message),
                wake = self.session.wake() => Wake::Session(wake),
                () = &mut silence => Wake::Silence,
            };
            ending = match wake {
                Wake::Message(message) => {
                    last_heard = Instant::now();
                    // Ends of the connection are never rate limited.
                    let ends = matches!(message, None | Some(Ok(Incoming::Close) | Err(_)));
                    let now = std::time::Instant::now();
                    match self.rates.message(self.session.config(), now) {
                        // Boxed: the rarely taken, deep request path would otherwise size every
                        // idle connection's task for its largest state.
                        MessageVerdict::Take => Box::pin(self.on_message(message)).await.err(),
                        _ if ends => Box::pin(self.on_message(message)).await.err(),
                        MessageVerdict::Drop(None) => None,
                        MessageVerdict::Drop(Some(error)) => {
                            let error = ServerFrame::Error {
                                id: None,
                                code: error.code,
                                message: error.message,
                            };
                            self.send(error.encode()).await.err()
                        }
                        MessageVerdict::Close => Some(Ending::Close(CloseCode::TRY_AGAIN_LATER)),
                    }
                }
                // Items and heartbeats inline; boxed, the rare paths, which would otherwise
                // size every idle connection's task.
                Wake::Session(wake) => match self.session.understand_at_once(wake) {
                    Ok(SessionEvent::Item(channel, item)) => {
                        self.on_items(channel, item).await.err()
                    }
                    Ok(SessionEvent::Tick) => self.send(ServerFrame::Ping.encode()).await.err(),
                    Ok(event) => Box::pin(self.on_event(event)).await.err(),
                    Err(wake) => Box::pin(self.on_session(wake)).await.err(),
                },
                Wake::Silence => {
                    let deadline = last_heard + silence_limit;
                    if Instant::now() >= deadline {
                        Some(Ending::Close(CloseCode::HEARTBEAT_TIMEOUT))
                    } else {
                        silence.as_mut().reset(deadline);
                        None
                    }
                }
            };
        }
        // Unsubscribe and leave before the close handshake, so counts drop at once.
        self.session.finish().await;
        if let Some(Ending::Close(code)) = ending {
            tracing::debug!(target: "resync::ws", client_id = %self.session.client_id(), code = code.0, "closing");
            // Boxed: a path taken once should not size the idle connection's task.
            let reason = self.close_reason.take();
            let close = self
                .outbox
                .close(code.0, reason.as_deref().unwrap_or(code.reason()));
            let _ = Box::pin(tokio::time::timeout(
                self.session.config().write_timeout,
                close,
            ))
            .await;
        }
    }

    /// What the session says, on this wire.
    async fn on_session(&mut self, wake: session::Wake) -> Result<(), Ending> {
        match self.session.understand(wake).await {
            Some(event) => self.on_event(event).await,
            None => Ok(()),
        }
    }

    /// A session event, on this wire.
    async fn on_event(&mut self, event: SessionEvent) -> Result<(), Ending> {
        match event {
            SessionEvent::Item(channel, item) => self.on_items(channel, item).await,
            SessionEvent::Presence(frames) => {
                for frame in frames {
                    self.send(frame.encode()).await?;
                }
                Ok(())
            }
            SessionEvent::PresenceLagged { channel, message } => {
                let error = membership::lagged_frame(&channel, &message);
                self.send(error.encode()).await
            }
            SessionEvent::Unsubscribed(channel) => {
                self.send(
                    ServerFrame::Unsubscribed {
                        id: 0,
                        channel,
                        reason: Some(UnsubscribeReason::Server),
                    }
                    .encode(),
                )
                .await
            }
            SessionEvent::Tick => self.send(ServerFrame::Ping.encode()).await,
            SessionEvent::End(end) => Err(self.end(end)),
        }
    }

    /// The close that says `end` on this wire.
    fn end(&mut self, end: SessionEnd) -> Ending {
        Ending::Close(match end {
            SessionEnd::Shutdown => CloseCode::SHUTDOWN,
            SessionEnd::SlowConsumer => CloseCode::SLOW_CONSUMER,
            SessionEnd::BrokerFailed => CloseCode::BROKER_UNAVAILABLE,
            SessionEnd::Disconnected { reason, reconnect } => {
                self.close_reason = Some(close_reason(&reason));
                if reconnect {
                    CloseCode::DISCONNECTED_RECONNECT
                } else {
                    CloseCode::DISCONNECTED
                }
            }
            SessionEnd::Expired => CloseCode::TOKEN_EXPIRED,
            SessionEnd::Departed => return Ending::Gone,
        })
    }

    async fn send(&mut self, text: String) -> Result<(), Ending> {
        self.send_text(text.as_bytes()).await
    }

    /// Sends one text message (see [`write`](Self::write)).
    async fn send_text(&mut self, text: &[u8]) -> Result<(), Ending> {
        self.write(socket::Outgoing::Text(text)).await
    }

    /// The one timed write path: every frame of the connection goes through it. A write that
    /// outlasts the write timeout marks a stuck client: its queued frames are dropped and the
    /// connection ends (the kernel then drops the socket, see `on_connect`). The timer is set
    /// only when the socket's queue is full.
    async fn write(&mut self, frame: socket::Outgoing<'_>) -> Result<(), Ending> {
        match self.outbox.try_send(frame) {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(Gone) => return Err(Ending::Gone),
        }
        let write_timeout = self.session.config().write_timeout;
        match Box::pin(tokio::time::timeout(write_timeout, self.outbox.send(frame))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Gone)) => Err(Ending::Gone),
            Err(_elapsed) => {
                self.session
                    .shared()
                    .metrics
                    .slow_consumer_closed(Transport::WebSocket);
                self.outbox.abort();
                Err(Ending::Gone)
            }
        }
    }

    /// Sends an item, then every other item that is already waiting (up to a batch), so a
    /// burst wakes this task, and the socket writer behind it, once rather than per event.
    async fn on_items(&mut self, channel: Channel, item: SubscriptionItem) -> Result<(), Ending> {
        let mut next = Some((channel, Ok(item)));
        let mut handled = 0;
        let mut delivered = 0;
        let mut result = Ok(());
        while let Some((channel, item)) = next.take() {
            result = match item {
                Ok(SubscriptionItem::Event(event)) => {
                    delivered += 1;
                    self.send_text(event.frame()).await
                }
                Ok(SubscriptionItem::Reset { reason, position }) => {
                    self.session.reset(reason);
                    let reset = ServerFrame::Reset {
                        channel,
                        reason,
                        position,
                    };
                    self.send(reset.encode()).await
                }
                Ok(SubscriptionItem::State {
                    entries,
                    position,
                    more,
                }) => {
                    let mut sent = Ok(());
                    for frame in membership::state_frames(&channel, entries, &position, more) {
                        sent = self.send(frame.encode()).await;
                        if sent.is_err() {
                            break;
                        }
                    }
                    sent
                }
                Err(error) => {
                    let end = self.session.item_failed(&channel, error);
                    Err(self.end(end))
                }
            };
            handled += 1;
            if result.is_err() || handled > MAX_BATCH {
                break;
            }
            next = self.session.next_ready();
        }
        self.session.delivered(delivered);
        result
    }

    async fn on_message(
        &mut self,
        message: Option<Result<Incoming, InboxError>>,
    ) -> Result<(), Ending> {
        match message {
            None => Err(Ending::Gone),
            Some(Ok(Incoming::Text(text))) => {
                if std::str::from_utf8(&text).is_err() {
                    // RFC 6455: a text message that is not UTF-8 fails the connection.
                    return Err(Ending::Close(CloseCode::PROTOCOL_VIOLATION));
                }
                self.on_frame(&text).await
            }
            Some(Ok(Incoming::Binary)) => {
                self.bad_frame(
                    None,
                    ErrorCode::MalformedFrame,
                    "binary messages are not part of the protocol".to_owned(),
                )
                .await
            }
            // Timed like every write: a client that pings and never reads cannot hold the
            // connection past the write timeout.
            Some(Ok(Incoming::Ping(bytes))) => self.write(socket::Outgoing::Pong(&bytes)).await,
            Some(Ok(Incoming::Pong)) => Ok(()),
            Some(Ok(Incoming::Close)) => Err(Ending::Close(CloseCode::NORMAL)),
            Some(Err(InboxError::TooBig)) => Err(Ending::Close(CloseCode::MESSAGE_TOO_BIG)),
            Some(Err(InboxError::Io(_))) => Err(Ending::Gone),
            Some(Err(error)) => {
                tracing::debug!(target: "resync::ws", client_id = %self.session.client_id(), %error, "framing error");
                Err(Ending::Close(CloseCode::PROTOCOL_ERROR))
            }
        }
    }

    async fn bad_frame(
        &mut self,
        id: Option<RequestId>,
        code: ErrorCode,
        message: String,
    ) -> Result<(), Ending> {
        self.bad_frames += 1;
        self.send(ServerFrame::Error { id, code, message }.encode())
            .await?;
        if self.bad_frames >= MAX_CONSECUTIVE_BAD_FRAMES {
            return Err(Ending::Close(CloseCode::PROTOCOL_VIOLATION));
        }
        Ok(())
    }

    async fn reply_error(&mut self, id: RequestId, error: ApiError) -> Result<(), Ending> {
        self.send(
            ServerFrame::Error {
                id: Some(id),
                code: error.code,
                message: error.message,
            }
            .encode(),
        )
        .await
    }

    async fn on_frame(&mut self, bytes: &[u8]) -> Result<(), Ending> {
        let frame = match ClientFrame::decode_request(bytes) {
            Ok(frame) => frame,
            Err(refused) => {
                // The error answers the request when its `id` could be read, with the code
                // of what is wrong (a channel's name, a position), as SSE and the API say it.
                let code = match &refused.error {
                    resync_protocol::Error::MalformedFrame(_) => ErrorCode::MalformedFrame,
                    other => ApiError::from(other.clone()).code,
                };
                return self
                    .bad_frame(refused.id, code, refused.error.to_string())
                    .await;
            }
        };
        self.bad_frames = 0;
        match frame {
            ClientFrame::Subscribe {
                id,
                channel,
                since,
                presence,
                join_leave,
                state,
            } => {
                let start = crate::session::Start { since, state };
                match self
                    .session
                    .subscribe(&channel, start, presence, join_leave, self.address)
                    .await
                {
                    Ok(recovery) => {
                        let reply = ServerFrame::Subscribed {
                            id,
                            channel,
                            recovery,
                        };
                        self.send(reply.encode()).await
                    }
                    // The broker cannot serve a resume now: the same advice as a broker that
                    // fails mid-stream (reconnect with backoff, resume), rather than an error
                    // a client would take as final for the channel.
                    Err(SubscribeFailure::Broker(error))
                        if error.code == ErrorCode::Unavailable =>
                    {
                        Err(Ending::Close(CloseCode::BROKER_UNAVAILABLE))
                    }
                    Err(SubscribeFailure::Broker(error) | SubscribeFailure::Refused(error)) => {
                        self.reply_error(id, error).await
                    }
                }
            }
            ClientFrame::Refresh { id, token } => Box::pin(self.refresh(id, token)).await,
            ClientFrame::Presence { id, channel } => match self.session.members(&channel).await {
                Ok(members) => {
                    for page in membership::list_pages(id, &channel, members) {
                        self.send(page.encode()).await?;
                    }
                    Ok(())
                }
                Err(error) => self.reply_error(id, error).await,
            },
            ClientFrame::PresenceCount { id, channel } => {
                match self.session.member_count(&channel).await {
                    Ok(count) => {
                        let reply = ServerFrame::PresenceCount { id, channel, count };
                        self.send(reply.encode()).await
                    }
                    Err(error) => self.reply_error(id, error).await,
                }
            }
            ClientFrame::Unsubscribe { id, channel } => {
                if self.session.unsubscribe(&channel).await {
                    self.send(
                        ServerFrame::Unsubscribed {
                            id,
                            channel,
                            reason: None,
                        }
                        .encode(),
                    )
                    .await
                } else {
                    let error = ApiError::new(
                        ErrorCode::NotSubscribed,
                        format!("not subscribed to {channel}"),
                    );
                    self.reply_error(id, error).await
                }
            }
            ClientFrame::Publish {
                id,
                channel,
                data,
                idempotency_key,
            } => {
                let now = std::time::Instant::now();
                if let Err(error) = self.rates.publish(self.session.config(), now) {
                    return self.reply_error(id, error).await;
                }
                let published = self
                    .session
                    .publish(channel.clone(), data, idempotency_key, self.address)
                    .await;
                match published {
                    Ok(position) => {
                        let reply = ServerFrame::Published {
                            id,
                            channel,
                            position,
                        };
                        self.send(reply.encode()).await
                    }
                    Err(error) => self.reply_error(id, error).await,
                }
            }
            ClientFrame::Pong => Ok(()),
        }
    }

    /// Puts a new token in force (see [`Session::refresh`]); rationed per connection and per
    /// address before it is checked, whatever it turns out to be: each is a signature check.
    async fn refresh(&mut self, id: RequestId, token: String) -> Result<(), Ending> {
        let now = std::time::Instant::now();
        if let Err(error) = self.rates.refresh(self.session.shared(), self.address, now) {
            return self.reply_error(id, error).await;
        }
        let refreshed = match self.session.refresh(token, self.address).await {
            Ok(refreshed) => refreshed,
            Err(error) => return self.reply_error(id, error).await,
        };
        for channel in refreshed.revoked {
            let ended = ServerFrame::Unsubscribed {
                id: 0,
                channel,
                reason: Some(UnsubscribeReason::Permission),
            };
            self.send(ended.encode()).await?;
        }
        let expires_at = unix_seconds(refreshed.expires_at);
        self.send(ServerFrame::Refreshed { id, expires_at }.encode())
            .await
    }
}

/// A time as seconds since the Unix epoch, as frames carry it.
fn unix_seconds(at: Option<std::time::SystemTime>) -> Option<u64> {
    at.and_then(|at| at.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|since| since.as_secs())
}

/// An application's reason as a WebSocket close reason: at most 123 bytes, cut at a character.
fn close_reason(reason: &str) -> String {
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].to_owned()
}
