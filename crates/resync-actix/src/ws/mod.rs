//! WebSocket: many channels over one socket, both directions, with heartbeats and close codes
//! that tell the client what to do next.

pub(crate) mod socket;

use std::sync::Arc;

use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use resync_broker::{
    Presence, PresenceEvent, PresenceLagged, PresenceWatch, Publish, SubscriptionError,
    SubscriptionItem,
};
use resync_protocol::bodies::UserCommand;
use resync_protocol::{
    Channel, ClientFrame, CloseCode, ErrorCode, IdempotencyKey, Member, PROTOCOL_VERSION, Payload,
    Position, PresenceRequest, RequestId, ServerFrame, UnsubscribeReason,
};
use tokio::time::Instant;
use tracing::Instrument;

use crate::Shared;
use crate::admission::{AdmissionGuard, TokenBucket};
use crate::auth::{Credentials, Identity, TokenSource};
use crate::channel_set::ChannelSet;
use crate::error::ApiError;
use crate::membership;
use crate::metrics::Transport;
use crate::permissions::{self, Action};
use crate::proxy::{Narrowing, ProxyRequest};
use crate::request::{admit, loggable_target, refusal};
use crate::users::UserInbox;
use socket::{Gone, Inbox, InboxError, Incoming, Outbox};

/// Ready items handled in one wake-up of a connection.
const MAX_BATCH: usize = 64;

/// Token refreshes a second one connection may ask for, sustained, and in a burst: a token
/// is refreshed every few minutes; each refresh is a signature check.
const REFRESHES_PER_SECOND: f64 = 1.0;
const REFRESH_BURST: u32 = 3;

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
    let identity = admitted.identity;
    let now = std::time::Instant::now();
    let client_id = format!("{:016x}", fastrand::u64(..));
    tracing::debug!(target: "resync::ws", %client_id, request = %loggable_target(&request), subject = ?identity.subject, "connected");
    // A user's connections hear the user commands sent from any instance (kick, unsubscribe).
    let user_commands = identity
        .subject
        .as_deref()
        .map(|user| Box::new(shared.users.register(&shared.broker, user)));
    let connection = Connection {
        user_commands,
        close_reason: None,
        messages: TokenBucket::new(
            shared.config.ws_messages_per_second,
            shared.config.ws_message_burst,
            now,
        ),
        publishes: TokenBucket::new(
            shared.config.ws_publishes_per_second,
            shared.config.ws_publish_burst,
            now,
        ),
        over_rate: 0,
        refusals: TokenBucket::new(
            shared.config.ws_messages_per_second,
            shared.config.ws_message_burst,
            now,
        ),
        refreshes: TokenBucket::new(REFRESHES_PER_SECOND, REFRESH_BURST, now),
        admitted: admitted.guard,
        token_subject: admitted.token_subject,
        narrowing: admitted.narrowing,
        address: admitted.address,
        shared,
        identity,
        outbox,
        subscriptions: ChannelSet::new(),
        presence: None,
        client_id,
        bad_frames: 0,
        refreshed: false,
    };
    // Everything the connection logs carries its client id (a debug span: free when debug
    // logging is off, so an idle connection holds nothing for it).
    let span =
        tracing::debug_span!(target: "resync::ws", "websocket", client_id = %connection.client_id);
    actix_web::rt::spawn(connection.run(messages).instrument(span));
    Ok(response)
}

struct Connection {
    /// The connection's place under the limits, with the channels it follows.
    admitted: AdmissionGuard,
    /// Messages the client may send (pings included).
    messages: TokenBucket,
    /// Publishes the client may send.
    publishes: TokenBucket,
    /// Messages in a row refused for the rate (the first of a run is answered).
    over_rate: u32,
    /// Refusals the connection may still earn: as many a second as it may send messages,
    /// and a burst. Past it, it closes: a flood that keeps just under a run of refusals is
    /// still a flood (issue 25, L4).
    refusals: TokenBucket,
    /// Token refreshes the connection may ask for, each a signature check, bad ones
    /// included (issue 25, item 12).
    refreshes: TokenBucket,
    shared: Arc<Shared>,
    identity: Identity,
    /// The subject of the token the connection was opened with (before the application
    /// mapped it): a refresh must be for the same.
    token_subject: Option<String>,
    /// What the application's proxy decided about this connection; a refresh keeps it.
    narrowing: Narrowing,
    /// The client's address, for its share of the proxy's calls.
    address: std::net::IpAddr,
    outbox: Outbox,
    subscriptions: ChannelSet,
    /// Presence memberships and join/leave watches; allocated on first use, so that a
    /// connection without presence pays one pointer for it.
    presence: Option<Box<ConnectionPresence>>,
    client_id: String,
    bad_frames: u32,
    /// Set by a `refresh`: the loop's expiry timer follows the new token.
    refreshed: bool,
    /// The user commands for this connection's user; `None` when anonymous.
    user_commands: Option<Box<UserInbox>>,
    /// The close reason an application gave (a user command), instead of the code's own.
    close_reason: Option<String>,
}

/// A connection's part in presence.
#[derive(Default)]
struct ConnectionPresence {
    /// Channels where this connection makes its identity a member, and what each membership
    /// holds of the connection's presence budget.
    memberships: Vec<(Channel, usize)>,
    /// Join/leave events of channels subscribed with `join_leave`.
    watches: tokio_stream::StreamMap<Channel, PresenceWatch>,
}

impl ConnectionPresence {
    fn is_member_of(&self, channel: &Channel) -> bool {
        self.memberships
            .iter()
            .any(|(member_of, _)| member_of == channel)
    }

    /// Forgets the membership of `channel`; what it held of the budget.
    fn forget_membership(&mut self, channel: &Channel) -> usize {
        let mut held = 0;
        self.memberships.retain(|(member_of, cost)| {
            let keep = member_of != channel;
            if !keep {
                held += cost;
            }
            keep
        });
        held
    }
}

/// What woke the connection loop.
enum Wake {
    Message(Option<Result<Incoming, InboxError>>),
    Item(Channel, Result<SubscriptionItem, SubscriptionError>),
    Presence(Channel, Result<PresenceEvent, PresenceLagged>),
    UserCommand(UserCommand),
    /// The ping clock ticked, or the server is shutting down.
    Ping,
    /// The silence deadline passed (it may have moved since: the loop looks again).
    Silence,
    Expired,
}

/// A subscription item on its way to the socket.
enum Outgoing {
    /// An event, whose frame (encoded once, shared by every subscriber) is written by
    /// reference: cloning the frame's `Bytes` per delivery was a contended atomic on the one
    /// reference count every subscriber of the event shares (8% of a 5,000-subscriber burst).
    Event(resync_broker::EncodedEvent),
    Text(String),
}

/// Why a `subscribe` failed: refused (its checks, the application's answer: an `error` reply),
/// or the broker could not resume it (a broker that is down closes the connection 4101).
enum SubscribeFailure {
    Refused(ApiError),
    Broker(ApiError),
}

impl From<ApiError> for SubscribeFailure {
    fn from(error: ApiError) -> Self {
        SubscribeFailure::Refused(error)
    }
}

/// Why the connection loop stopped, and the close code to send.
enum Ending {
    Close(CloseCode),
    /// The socket is gone or stuck; nothing can be sent.
    Gone,
}

impl Connection {
    async fn run(mut self, mut messages: Inbox) {
        let _guard = self.shared.metrics.connection(Transport::WebSocket);
        let ping_interval = self.shared.config.ping_interval;
        let mut ping = self.shared.clock(&self.shared.ws_ping);
        let mut last_heard = Instant::now();
        // Its own deadline, two intervals after the last frame heard: a client that went
        // silent leaves (and leaves its channels' members) then, not at the first ping tick
        // past it (issue 29, defect 5: up to three intervals). Messages only move
        // `last_heard`; the timer is moved when it fires early.
        let silence_limit = ping_interval * 2;
        let mut silence = Box::pin(tokio::time::sleep_until(last_heard + silence_limit));
        // Boxed, and only for tokens that expire: most connections hold no timer at all.
        let mut expiry = self
            .identity
            .remaining()
            .map(|remaining| Box::pin(tokio::time::sleep(remaining)));

        let connected = ServerFrame::Connected {
            client_id: self.client_id.clone(),
            ping_interval_ms: ping_interval.as_millis() as u64,
            protocol: PROTOCOL_VERSION,
            expires_at: unix_seconds(self.identity.expires_at),
        };
        let mut ending = self.send(connected.encode()).await.err();

        while ending.is_none() {
            // Biased, in this order: while events are ready, the clock branches are never
            // polled, so a burst does not register and unregister every connection with the
            // shared clocks on each wake-up.
            let wake = tokio::select! {
                biased;
                message = messages.next() => Wake::Message(message),
                Some((channel, item)) = self.subscriptions.next(), if !self.subscriptions.is_empty() => {
                    Wake::Item(channel, item)
                }
                Some((channel, event)) = async {
                    self.presence.as_mut()?.watches.next().await
                }, if self.presence.as_ref().is_some_and(|presence| !presence.watches.is_empty()) => {
                    Wake::Presence(channel, event)
                }
                Some(command) = async {
                    self.user_commands.as_mut()?.commands.recv().await
                }, if self.user_commands.is_some() => Wake::UserCommand(command),
                _ = ping.changed() => Wake::Ping,
                () = &mut silence => Wake::Silence,
                Some(()) = async { expiry.as_mut()?.await; Some(()) }, if expiry.is_some() => {
                    Wake::Expired
                }
            };
            ending = match wake {
                Wake::Message(message) => {
                    last_heard = Instant::now();
                    if self.messages.take(std::time::Instant::now()) {
                        self.over_rate = 0;
                        // Boxed: the rarely taken, deep request path would otherwise size every
                        // idle connection's task for its largest state.
                        Box::pin(self.on_message(message)).await.err()
                    } else {
                        Box::pin(self.over_message_rate(message)).await.err()
                    }
                }
                Wake::Item(channel, item) => self.on_items(channel, item).await.err(),
                Wake::Presence(channel, event) => {
                    Box::pin(self.on_presence_event(channel, event)).await.err()
                }
                Wake::UserCommand(command) => Box::pin(self.on_user_command(command)).await.err(),
                // Shutdown wakes the ping clock too (see `Resync::shutdown`).
                Wake::Ping if *self.shared.shutdown.borrow() => {
                    let spread = self.shared.config.shutdown_spread;
                    Box::pin(tokio::time::sleep(spread.mul_f64(fastrand::f64()))).await;
                    Some(Ending::Close(CloseCode::SHUTDOWN))
                }
                Wake::Ping => self.send(ServerFrame::Ping.encode()).await.err(),
                Wake::Silence => {
                    let deadline = last_heard + silence_limit;
                    if Instant::now() >= deadline {
                        Some(Ending::Close(CloseCode::HEARTBEAT_TIMEOUT))
                    } else {
                        silence.as_mut().reset(deadline);
                        None
                    }
                }
                Wake::Expired => Some(Ending::Close(CloseCode::TOKEN_EXPIRED)),
            };
            // A refresh moved the deadline.
            if std::mem::take(&mut self.refreshed) {
                expiry = self
                    .identity
                    .remaining()
                    .map(|remaining| Box::pin(tokio::time::sleep(remaining)));
            }
        }
        // Unsubscribe before the close handshake, so counts drop at once, and leave every
        // channel this connection is a member of.
        self.subscriptions.clear();
        if let Some(presence) = self.presence.take() {
            for (channel, _) in &presence.memberships {
                self.leave(channel).await;
            }
        }
        if let Some(Ending::Close(code)) = ending {
            tracing::debug!(target: "resync::ws", client_id = %self.client_id, code = code.0, "closing");
            // Boxed: a path taken once should not size the idle connection's task.
            let reason = self.close_reason.take();
            let close = self
                .outbox
                .close(code.0, reason.as_deref().unwrap_or(code.reason()));
            let _ = Box::pin(tokio::time::timeout(
                self.shared.config.write_timeout,
                close,
            ))
            .await;
        }
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
        let write_timeout = self.shared.config.write_timeout;
        match Box::pin(tokio::time::timeout(write_timeout, self.outbox.send(frame))).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(Gone)) => Err(Ending::Gone),
            Err(_elapsed) => {
                self.shared
                    .metrics
                    .slow_consumer_closed(Transport::WebSocket);
                self.outbox.abort();
                Err(Ending::Gone)
            }
        }
    }

    /// Sends an item, then every other item that is already waiting (up to a batch), so a
    /// burst wakes this task, and the socket writer behind it, once rather than per event.
    async fn on_items(
        &mut self,
        channel: Channel,
        item: Result<SubscriptionItem, SubscriptionError>,
    ) -> Result<(), Ending> {
        let mut next = Some((channel, item));
        let mut handled = 0;
        let mut delivered = 0;
        let mut result = Ok(());
        while let Some((channel, item)) = next.take() {
            result = match self.on_item(channel, item) {
                Ok(Outgoing::Event(event)) => {
                    delivered += 1;
                    self.send_text(event.frame()).await
                }
                Ok(Outgoing::Text(text)) => self.send_text(text.as_bytes()).await,
                Err(ending) => Err(ending),
            };
            handled += 1;
            if result.is_err() || handled > MAX_BATCH {
                break;
            }
            next = self.subscriptions.next_ready();
        }
        self.shared
            .metrics
            .delivered(Transport::WebSocket, delivered);
        result
    }

    /// What `item` becomes on the wire, or why the connection must end.
    fn on_item(
        &self,
        channel: Channel,
        item: Result<SubscriptionItem, SubscriptionError>,
    ) -> Result<Outgoing, Ending> {
        match item {
            Ok(SubscriptionItem::Event(event)) => Ok(Outgoing::Event(event)),
            Ok(SubscriptionItem::Reset { reason, position }) => {
                self.shared.metrics.reset(reason);
                Ok(Outgoing::Text(
                    ServerFrame::Reset {
                        channel,
                        reason,
                        position,
                    }
                    .encode(),
                ))
            }
            Err(SubscriptionError::Lagged { .. }) => {
                self.shared
                    .metrics
                    .slow_consumer_closed(Transport::WebSocket);
                Err(Ending::Close(CloseCode::SLOW_CONSUMER))
            }
            Err(SubscriptionError::Closed) => Err(Ending::Close(CloseCode::SHUTDOWN)),
            Err(SubscriptionError::Broker(error)) => {
                tracing::warn!(target: "resync::ws", client_id = %self.client_id, %channel, %error, "broker failed mid-stream");
                Err(Ending::Close(CloseCode::BROKER_UNAVAILABLE))
            }
        }
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
                tracing::debug!(target: "resync::ws", client_id = %self.client_id, %error, "framing error");
                Err(Ending::Close(CloseCode::PROTOCOL_ERROR))
            }
        }
    }

    /// A message past the connection's rate: dropped with a `rate_limited` error (the first
    /// of a run), and the connection closed (4100, try again later) if the client keeps on.
    async fn over_message_rate(
        &mut self,
        message: Option<Result<Incoming, InboxError>>,
    ) -> Result<(), Ending> {
        // Ends of the connection are never rate limited.
        if matches!(message, None | Some(Ok(Incoming::Close) | Err(_))) {
            return self.on_message(message).await;
        }
        self.over_rate += 1;
        if !self.refusals.take(std::time::Instant::now()) {
            return Err(Ending::Close(CloseCode::TRY_AGAIN_LATER));
        }
        if self.over_rate == 1 {
            let error = ServerFrame::Error {
                id: None,
                code: ErrorCode::RateLimited,
                message: format!(
                    "more than {} messages a second; messages are dropped",
                    self.shared.config.ws_messages_per_second
                ),
            };
            self.send(error.encode()).await?;
        }
        Ok(())
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
            } => {
                match self
                    .subscribe(id, channel, since, presence, join_leave)
                    .await
                {
                    Ok(reply) => self.send(reply.encode()).await,
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
            ClientFrame::Presence { id, channel } => {
                let members = match self.presence_of(&channel) {
                    Ok(presence) => presence.members(&channel).await.map_err(ApiError::from),
                    Err(error) => Err(error),
                };
                match members {
                    Ok(members) => {
                        for page in membership::list_pages(id, &channel, members) {
                            self.send(page.encode()).await?;
                        }
                        Ok(())
                    }
                    Err(error) => self.reply_error(id, error).await,
                }
            }
            ClientFrame::PresenceCount { id, channel } => {
                let count = match self.presence_of(&channel) {
                    Ok(presence) => presence
                        .member_count(&channel)
                        .await
                        .map_err(ApiError::from),
                    Err(error) => Err(error),
                };
                match count {
                    Ok(count) => {
                        let reply = ServerFrame::PresenceCount { id, channel, count };
                        self.send(reply.encode()).await
                    }
                    Err(error) => self.reply_error(id, error).await,
                }
            }
            ClientFrame::Unsubscribe { id, channel } => {
                if self.subscriptions.remove(&channel) {
                    self.admitted.unsubscribe(1);
                    self.stop_presence(&channel).await;
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
            ClientFrame::Publish { id, .. } if !self.publishes.take(std::time::Instant::now()) => {
                let error = ApiError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "more than {} publishes a second; not stored",
                        self.shared.config.ws_publishes_per_second
                    ),
                );
                self.reply_error(id, error).await
            }
            ClientFrame::Publish {
                id,
                channel,
                data,
                idempotency_key,
            } => match self.publish(channel.clone(), data, idempotency_key).await {
                Ok(position) => {
                    self.send(
                        ServerFrame::Published {
                            id,
                            channel,
                            position,
                        }
                        .encode(),
                    )
                    .await
                }
                Err(error) => self.reply_error(id, error).await,
            },
            ClientFrame::Pong => Ok(()),
        }
    }

    /// The broker's presence, if `identity` may see `channel`'s.
    fn presence_of(&self, channel: &Channel) -> Result<&dyn Presence, ApiError> {
        permissions::check(&self.shared, &self.identity, Action::SeePresence, channel)?;
        self.shared
            .broker
            .presence()
            .ok_or_else(membership::no_presence)
    }

    /// Puts a new token in force: the same subject, a new deadline, and the channels (and
    /// presence) it no longer allows ended with reason `permission`. A refused token changes
    /// nothing: the connection goes on until its current token expires.
    async fn refresh(&mut self, id: RequestId, token: String) -> Result<(), Ending> {
        // Each refresh is a signature check: rationed per connection and per address,
        // before it is made, whatever it turns out to be.
        let now = std::time::Instant::now();
        if !self.refreshes.take(now) || !self.shared.admission.take_refresh(self.address, now) {
            let error = ApiError::new(
                ErrorCode::RateLimited,
                "token refreshes asked too often; the current token stays in force",
            );
            return self.reply_error(id, error).await;
        }
        let credentials = Credentials {
            token: Some((token, TokenSource::Refresh)),
        };
        let mut identity = match self.shared.authorizer.authenticate(&credentials).await {
            Ok(identity) => identity,
            Err(error) => {
                self.shared.metrics.auth_failed();
                return self.reply_error(id, ApiError::from(error)).await;
            }
        };
        // Compared before the application's mapping: the token's own subject.
        if identity.subject != self.token_subject {
            let error = ApiError::new(
                ErrorCode::Forbidden,
                "a refreshed token must be for the connection's own subject",
            );
            return self.reply_error(id, error).await;
        }
        // What the application decided on connect stays decided.
        let mut narrowing = self.narrowing.clone();
        narrowing.apply(&mut identity);
        if let Some(proxy) = self
            .shared
            .proxy
            .as_ref()
            .filter(|proxy| proxy.asks_on_refresh())
        {
            let Some((token, _)) = credentials.token else {
                return Ok(());
            };
            let asked = ProxyRequest::Refresh {
                user: identity.subject.clone(),
                token,
            };
            match proxy.ask(&asked, self.address).await {
                Ok(Some(answer)) => {
                    narrowing.update(&answer);
                    narrowing.apply(&mut identity);
                }
                Ok(None) => {}
                Err(error) => return self.reply_error(id, error).await,
            }
        }
        self.narrowing = narrowing;
        self.identity = identity;
        self.refreshed = true;
        let shared = self.shared.clone();
        let allows = |identity: &Identity, action: Action, channel: &Channel| {
            permissions::allows(&shared, identity, action, channel)
        };
        let revoked: Vec<Channel> = self
            .subscriptions
            .channels()
            .filter(|channel| !allows(&self.identity, Action::Subscribe, channel))
            .cloned()
            .collect();
        for channel in revoked {
            self.end_subscription(channel, UnsubscribeReason::Permission)
                .await?;
        }
        // Presence the new token no longer allows: no more join/leave events, no membership.
        if let Some(presence) = self.presence.as_mut() {
            let unseen: Vec<Channel> = presence
                .watches
                .keys()
                .filter(|channel| !allows(&self.identity, Action::SeePresence, channel))
                .cloned()
                .collect();
            for channel in &unseen {
                presence.watches.remove(channel);
                self.admitted
                    .release_presence(membership::watch_cost(channel));
            }
        }
        let unseated: Vec<Channel> = self
            .presence
            .iter()
            .flat_map(|presence| presence.memberships.iter())
            .map(|(channel, _)| channel)
            .filter(|channel| !allows(&self.identity, Action::Appear, channel))
            .cloned()
            .collect();
        for channel in unseated {
            if let Some(presence) = self.presence.as_mut() {
                let held = presence.forget_membership(&channel);
                self.admitted.release_presence(held);
            }
            self.leave(&channel).await;
        }
        let expires_at = unix_seconds(self.identity.expires_at);
        self.send(ServerFrame::Refreshed { id, expires_at }.encode())
            .await
    }

    /// Applies a user command (from this instance's API or another's, through the broker).
    async fn on_user_command(&mut self, command: UserCommand) -> Result<(), Ending> {
        match command {
            UserCommand::Disconnect {
                reason, reconnect, ..
            } => {
                self.close_reason = Some(close_reason(&reason));
                Err(Ending::Close(if reconnect {
                    CloseCode::DISCONNECTED_RECONNECT
                } else {
                    CloseCode::DISCONNECTED
                }))
            }
            UserCommand::Unsubscribe { channel, .. } => {
                self.end_subscription(channel, UnsubscribeReason::Server)
                    .await
            }
        }
    }

    /// Ends a subscription from the server's side, telling the client why (`unsubscribed`
    /// with `id` 0).
    async fn end_subscription(
        &mut self,
        channel: Channel,
        reason: UnsubscribeReason,
    ) -> Result<(), Ending> {
        if !self.subscriptions.remove(&channel) {
            return Ok(());
        }
        self.admitted.unsubscribe(1);
        self.stop_presence(&channel).await;
        self.send(
            ServerFrame::Unsubscribed {
                id: 0,
                channel,
                reason: Some(reason),
            }
            .encode(),
        )
        .await
    }

    /// This connection's member id: its token's subject, or its own id when anonymous.
    fn member_id(&self) -> String {
        membership::member_id(&self.identity, &self.client_id)
    }

    /// Leaves `channel`'s members (if this connection is one) and stops its join/leave
    /// events.
    async fn stop_presence(&mut self, channel: &Channel) {
        let Some(presence) = self.presence.as_mut() else {
            return;
        };
        if presence.watches.remove(channel).is_some() {
            self.admitted
                .release_presence(membership::watch_cost(channel));
        }
        let was_member = presence.is_member_of(channel);
        let held = presence.forget_membership(channel);
        self.admitted.release_presence(held);
        if was_member {
            self.leave(channel).await;
        }
    }

    /// Removes this connection from `channel`'s members.
    async fn leave(&self, channel: &Channel) {
        let Some(presence) = self.shared.broker.presence() else {
            return;
        };
        if let Err(error) = presence
            .leave(channel, &self.member_id(), &self.client_id)
            .await
        {
            tracing::warn!(target: "resync::ws", client_id = %self.client_id, %channel, %error, "presence leave failed");
        }
    }

    /// Forwards a join or leave of a watched channel.
    async fn on_presence_event(
        &mut self,
        channel: Channel,
        event: Result<PresenceEvent, PresenceLagged>,
    ) -> Result<(), Ending> {
        let frames = membership::watcher_frames(&self.shared, channel, event)
            .await
            .unwrap_or_else(|(channel, why)| {
                vec![ServerFrame::Error {
                    id: None,
                    code: ErrorCode::Unavailable,
                    message: format!("{channel}: {why}"),
                }]
            });
        for frame in frames {
            self.send(frame.encode()).await?;
        }
        Ok(())
    }

    /// Checks a subscribe's presence options before anything is subscribed.
    fn check_presence_request(
        &self,
        channel: &Channel,
        request: Option<&PresenceRequest>,
        join_leave: bool,
    ) -> Result<Option<&dyn Presence>, ApiError> {
        membership::check(&self.shared, &self.identity, channel, request, join_leave)
    }

    /// Starts the subscribe's presence: the join/leave watch first (so the subscriber sees
    /// its own join), then the membership.
    async fn start_presence(
        &mut self,
        channel: &Channel,
        request: Option<PresenceRequest>,
        join_leave: bool,
    ) -> Result<(), ApiError> {
        let Some(presence) = self.shared.broker.presence() else {
            return Ok(());
        };
        // Held against the connection's presence budgets before anything is made.
        let member = request.as_ref().map(|request| Member {
            id: self.member_id(),
            info: request.info.clone().or_else(|| self.identity.info.clone()),
        });
        let member_cost = member
            .as_ref()
            .map_or(0, |member| membership::membership_cost(channel, member));
        let watch_cost = if join_leave {
            membership::watch_cost(channel)
        } else {
            0
        };
        self.admitted
            .hold_presence(member_cost + watch_cost)
            .map_err(refusal)?;
        let made = async {
            let watch = if join_leave {
                Some(presence.watch(channel).await?)
            } else {
                None
            };
            if let Some(member) = &member {
                presence.join(channel, member, &self.client_id).await?;
            }
            Ok::<_, ApiError>(watch)
        }
        .await;
        let watch = match made {
            Ok(watch) => watch,
            Err(error) => {
                self.admitted.release_presence(member_cost + watch_cost);
                return Err(error);
            }
        };
        let state = self.presence.get_or_insert_with(Box::default);
        if let Some(watch) = watch {
            state.watches.insert(channel.clone(), watch);
        }
        if member.is_some() {
            state.memberships.push((channel.clone(), member_cost));
        }
        Ok(())
    }

    /// Resumes `channel` and adds it to the connection; the reply goes out before any of its
    /// events, because the subscription's stream is only polled after this returns.
    async fn subscribe(
        &mut self,
        id: RequestId,
        channel: Channel,
        since: Option<Position>,
        presence: Option<PresenceRequest>,
        join_leave: bool,
    ) -> Result<ServerFrame, SubscribeFailure> {
        if self.subscriptions.contains(&channel) {
            return Err(ApiError::new(
                ErrorCode::AlreadySubscribed,
                format!("already subscribed to {channel}"),
            )
            .into());
        }
        if self.subscriptions.len() >= self.shared.config.max_channels_per_connection {
            return Err(ApiError::new(
                ErrorCode::TooManyChannels,
                format!(
                    "at most {} channels per connection",
                    self.shared.config.max_channels_per_connection
                ),
            )
            .into());
        }
        permissions::check(&self.shared, &self.identity, Action::Subscribe, &channel)?;
        self.check_presence_request(&channel, presence.as_ref(), join_leave)?;
        if let Some(proxy) = self
            .shared
            .proxy
            .as_ref()
            .filter(|proxy| proxy.asks_for(&channel))
        {
            let asked = ProxyRequest::Subscribe {
                user: self.identity.subject.clone(),
                channel: channel.clone(),
            };
            proxy.ask(&asked, self.address).await?;
        }
        self.admitted.subscribe(1).map_err(refusal)?;
        let recovery = match self.subscriptions.add(&self.shared, &channel, since).await {
            Ok(recovery) => recovery,
            Err(error) => {
                self.admitted.unsubscribe(1);
                return Err(SubscribeFailure::Broker(error));
            }
        };
        if let Err(error) = self.start_presence(&channel, presence, join_leave).await {
            self.subscriptions.remove(&channel);
            self.admitted.unsubscribe(1);
            return Err(SubscribeFailure::Broker(error));
        }
        Ok(ServerFrame::Subscribed {
            id,
            channel,
            recovery,
        })
    }

    async fn publish(
        &mut self,
        channel: Channel,
        data: Payload,
        idempotency_key: Option<IdempotencyKey>,
    ) -> Result<Position, ApiError> {
        permissions::check(&self.shared, &self.identity, Action::Publish, &channel)?;
        let mut data = data;
        if let Some(proxy) = self
            .shared
            .proxy
            .as_ref()
            .filter(|proxy| proxy.asks_for(&channel))
        {
            let asked = ProxyRequest::Publish {
                user: self.identity.subject.clone(),
                channel: channel.clone(),
                data: data.clone(),
            };
            // The application may rewrite what is stored.
            if let Some(rewritten) = proxy
                .ask(&asked, self.address)
                .await?
                .and_then(|answer| answer.data)
            {
                data = rewritten;
            }
        }
        // A publish that makes a channel makes lasting state: an address (and a user) may
        // make only so many. The position is asked first only once its budget is spent.
        let admission = &self.shared.admission;
        let user = self.identity.subject.as_deref();
        let now = std::time::Instant::now();
        if !admission.may_make_channel(self.address, user, now)
            && self.shared.broker.position(&channel).await?.seq.get() == 0
        {
            return Err(ApiError::new(
                ErrorCode::RateLimited,
                "this client makes new channels too fast; not stored",
            ));
        }
        let position = self
            .shared
            .publisher
            .send(
                Publish::new(channel, data)
                    .with_optional_idempotency_key(idempotency_key)
                    .from_client(),
            )
            .await?;
        if position.seq.get() == 1 {
            admission.made_channel(self.address, user, now);
        }
        Ok(position)
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
