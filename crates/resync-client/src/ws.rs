//! The WebSocket session: subscribe frames with positions, events, publishes, heartbeats.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use resync_protocol::{Channel, ClientFrame, CloseCode, Position, RequestId, ServerFrame};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use crate::connection::{ConnectFailure, Manager, PublishRequest, SessionEnd};
use crate::registry::MembersChange;
use crate::{ConnectionState, Error, Result, TransportKind, Update};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

enum Wake {
    Message(Option<std::result::Result<Message, WsError>>),
    Silent,
    Changed,
    Publish(Option<PublishRequest>),
    /// Time to refresh the token in place, ahead of its expiry.
    Refresh,
}

pub(crate) async fn run(manager: &mut Manager) -> std::result::Result<SessionEnd, ConnectFailure> {
    let mut socket = connect(manager).await?;
    let (ping_interval, expires_at) =
        match tokio::time::timeout(manager.config.connect_timeout, socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => match ServerFrame::decode(text.as_bytes()) {
                Ok(ServerFrame::Connected {
                    ping_interval_ms,
                    expires_at,
                    ..
                }) => (Duration::from_millis(ping_interval_ms), expires_at),
                other => {
                    return Err(ConnectFailure::Refused(format!(
                        "expected a connected frame, got {other:?}"
                    )));
                }
            },
            Ok(Some(Ok(Message::Close(close)))) => {
                let code = close.map_or(CloseCode::ABNORMAL, |close| {
                    CloseCode(u16::from(close.code))
                });
                return Ok(SessionEnd::Closed(code));
            }
            Ok(other) => {
                return Err(ConnectFailure::Lost(format!(
                    "no connected frame: {other:?}"
                )));
            }
            Err(_) => {
                return Err(ConnectFailure::Lost(
                    "no connected frame in time".to_owned(),
                ));
            }
        };
    manager.set_state(ConnectionState::Connected {
        transport: TransportKind::WebSocket,
    });
    let mut session = Session {
        next_id: 0,
        channels: HashMap::new(),
        subscribe_requests: HashMap::new(),
        member_pages: HashMap::new(),
        publishes: HashMap::new(),
        refresh_at: None,
        refresh_request: None,
    };
    session.schedule_refresh(manager, expires_at);
    let end = session.follow(manager, &mut socket, ping_interval).await;
    for (_, reply) in session.publishes.drain() {
        let _ = reply.send(Err(Error::Closed(
            "connection lost before the reply; retry with an idempotency key".to_owned(),
        )));
    }
    if matches!(end, SessionEnd::Shutdown) {
        let _ = socket
            .close(Some(tokio_tungstenite::tungstenite::protocol::CloseFrame {
                code: CloseCode::NORMAL.0.into(),
                reason: "done".into(),
            }))
            .await;
    }
    Ok(end)
}

async fn connect(manager: &Manager) -> std::result::Result<Socket, ConnectFailure> {
    let mut url = manager
        .url("ws", &[])
        .map_err(|error| ConnectFailure::Refused(error.to_string()))?;
    let scheme = if url.scheme() == "https" { "wss" } else { "ws" };
    url.set_scheme(scheme)
        .map_err(|()| ConnectFailure::Refused("cannot make a websocket url".to_owned()))?;
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|error| ConnectFailure::Refused(error.to_string()))?;
    if let Some(token) = &manager.token
        && let Ok(value) = HeaderValue::from_str(&format!("Bearer {token}"))
    {
        request.headers_mut().insert("authorization", value);
    }
    match tokio::time::timeout(
        manager.config.connect_timeout,
        tokio_tungstenite::connect_async_tls_with_config(
            request,
            None,
            true,
            Some(tokio_tungstenite::Connector::Rustls(manager.tls.clone())),
        ),
    )
    .await
    {
        Err(_) => Err(ConnectFailure::Lost(
            "websocket connect timed out".to_owned(),
        )),
        Ok(Ok((socket, _))) => Ok(socket),
        Ok(Err(WsError::Http(response))) => {
            let status = response.status().as_u16();
            let body = response
                .body()
                .as_ref()
                .map(|body| String::from_utf8_lossy(body).into_owned())
                .unwrap_or_default();
            Err(Manager::failure_for_status(status, &body))
        }
        Ok(Err(WsError::Io(error))) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
            Err(ConnectFailure::Lost(crate::error::with_causes(&error)))
        }
        // Anything else during the handshake (a proxy cutting the upgrade, a garbled reply)
        // means this path does not carry WebSockets: let the next transport try.
        Ok(Err(error)) => Err(ConnectFailure::Refused(crate::error::with_causes(&error))),
    }
}

struct Session {
    next_id: RequestId,
    /// The channels this session subscribed to, with the registration each was for.
    channels: HashMap<Channel, u64>,
    subscribe_requests: HashMap<RequestId, Channel>,
    publishes: HashMap<RequestId, oneshot::Sender<Result<Position>>>,
    /// When to refresh the token in place (with a token refresher and a token that expires).
    refresh_at: Option<tokio::time::Instant>,
    /// The `refresh` awaiting its reply.
    refresh_request: Option<RequestId>,
    /// Member lists arriving in pages (`presence` frames with `more`), by channel, until
    /// their last page.
    member_pages: HashMap<Channel, Vec<resync_protocol::Member>>,
}

/// The longest a token is refreshed ahead of its expiry.
const MAX_REFRESH_LEAD: Duration = Duration::from_secs(60);

impl Session {
    /// Plans the next in-place refresh for a token expiring at `expires_at` (Unix seconds):
    /// when 15-25% of its time is left (at most a minute ahead), the jitter spreading the
    /// refreshes of many clients whose tokens were issued together.
    fn schedule_refresh(&mut self, manager: &Manager, expires_at: Option<u64>) {
        self.refresh_at = None;
        let (Some(expires_at), Some(_)) = (expires_at, manager.config.refresher.as_ref()) else {
            return;
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let remaining = Duration::from_secs(expires_at).saturating_sub(now);
        let lead = remaining
            .mul_f64(0.15 + 0.10 * fastrand::f64())
            .min(MAX_REFRESH_LEAD);
        self.refresh_at = Some(tokio::time::Instant::now() + remaining.saturating_sub(lead));
    }

    /// Asks the refresher for a token and sends it in a `refresh` frame.
    async fn refresh(
        &mut self,
        manager: &mut Manager,
        socket: &mut Socket,
    ) -> std::result::Result<(), SessionEnd> {
        self.refresh_at = None;
        if let Err(error) = manager.refresh_token().await {
            // The connection goes on until its token expires; the reconnect tries again.
            tracing::warn!(target: "resync::client", %error, "token refresh failed");
            return Ok(());
        }
        let Some(token) = manager.token.clone() else {
            return Ok(());
        };
        let id = self.request_id();
        self.refresh_request = Some(id);
        Self::send(socket, &ClientFrame::Refresh { id, token }).await
    }

    fn request_id(&mut self) -> RequestId {
        self.next_id += 1;
        self.next_id
    }

    async fn send(socket: &mut Socket, frame: &ClientFrame) -> std::result::Result<(), SessionEnd> {
        socket
            .send(Message::text(frame.encode()))
            .await
            .map_err(|error| SessionEnd::Lost(error.to_string()))
    }

    /// Subscribes to channels the registry has and the session lacks, and unsubscribes from
    /// those it dropped.
    async fn sync_channels(
        &mut self,
        manager: &Manager,
        socket: &mut Socket,
    ) -> std::result::Result<(), SessionEnd> {
        let wanted = manager.registry.wanted();
        let wanted_names: HashSet<Channel> = wanted
            .iter()
            .map(|(channel, _, _)| channel.clone())
            .collect();
        for (channel, since, generation) in wanted {
            match self.channels.insert(channel.clone(), generation) {
                Some(subscribed) if subscribed == generation => continue,
                // Dropped and followed again before this session noticed: subscribe anew, from
                // the new registration's position (its reset or replay must not be missed).
                Some(_) => {
                    let id = self.request_id();
                    Self::send(
                        socket,
                        &ClientFrame::Unsubscribe {
                            id,
                            channel: channel.clone(),
                        },
                    )
                    .await?;
                }
                None => {}
            }
            let id = self.request_id();
            self.subscribe_requests.insert(id, channel.clone());
            let wish = manager.registry.presence_wish(&channel);
            let state = manager.registry.wants_state(&channel);
            let subscribe = ClientFrame::Subscribe {
                id,
                channel,
                since,
                presence: wish.appear,
                join_leave: wish.track,
                state,
            };
            Self::send(socket, &subscribe).await?;
        }
        let gone: Vec<Channel> = self
            .channels
            .keys()
            .filter(|channel| !wanted_names.contains(*channel))
            .cloned()
            .collect();
        for channel in gone {
            self.channels.remove(&channel);
            let id = self.request_id();
            Self::send(socket, &ClientFrame::Unsubscribe { id, channel }).await?;
        }
        Ok(())
    }

    async fn follow(
        &mut self,
        manager: &mut Manager,
        socket: &mut Socket,
        ping_interval: Duration,
    ) -> SessionEnd {
        if let Err(end) = self.sync_channels(manager, socket).await {
            return end;
        }
        // The server pings every interval; silence for longer (plus grace) means the
        // connection is dead even if TCP has not noticed.
        let silence_limit = ping_interval + manager.config.heartbeat_grace;
        loop {
            let wake = tokio::select! {
                message = tokio::time::timeout(silence_limit, socket.next()) => match message {
                    Ok(message) => Wake::Message(message),
                    Err(_) => Wake::Silent,
                },
                _ = manager.registry.changed.notified() => Wake::Changed,
                request = manager.publishes.recv() => Wake::Publish(request),
                () = async {
                    match self.refresh_at {
                        Some(at) => tokio::time::sleep_until(at).await,
                        None => std::future::pending().await,
                    }
                } => Wake::Refresh,
            };
            let result = match wake {
                Wake::Silent => Err(SessionEnd::Lost(format!(
                    "no message for {silence_limit:?}"
                ))),
                Wake::Message(None) => Err(SessionEnd::Lost("connection closed".to_owned())),
                Wake::Message(Some(Err(error))) => {
                    Err(SessionEnd::Lost(crate::error::with_causes(&error)))
                }
                Wake::Message(Some(Ok(Message::Close(close)))) => {
                    let code = close.map_or(CloseCode::ABNORMAL, |close| {
                        CloseCode(u16::from(close.code))
                    });
                    Err(SessionEnd::Closed(code))
                }
                Wake::Message(Some(Ok(Message::Text(text)))) => {
                    self.on_frame(manager, socket, text.as_bytes()).await
                }
                Wake::Message(Some(Ok(_))) => Ok(()),
                Wake::Changed => {
                    if manager.registry.closed().is_some() {
                        Err(SessionEnd::Shutdown)
                    } else {
                        self.sync_channels(manager, socket).await
                    }
                }
                Wake::Refresh => self.refresh(manager, socket).await,
                Wake::Publish(None) => Err(SessionEnd::Shutdown),
                Wake::Publish(Some(request)) => {
                    let id = self.request_id();
                    let frame = ClientFrame::Publish {
                        id,
                        channel: request.channel,
                        data: request.data,
                        idempotency_key: request.idempotency_key,
                    };
                    self.publishes.insert(id, request.reply);
                    Self::send(socket, &frame).await
                }
            };
            if let Err(end) = result {
                return end;
            }
        }
    }

    async fn on_frame(
        &mut self,
        manager: &Manager,
        socket: &mut Socket,
        bytes: &[u8],
    ) -> std::result::Result<(), SessionEnd> {
        let frame = match ServerFrame::decode(bytes) {
            Ok(frame) => frame,
            Err(error) => {
                tracing::warn!(target: "resync::client", %error, "unreadable frame from server");
                return Ok(());
            }
        };
        match frame {
            ServerFrame::Event(event) => manager.registry.deliver_event(event).await,
            ServerFrame::Subscribed {
                id,
                channel,
                recovery,
            } => {
                self.subscribe_requests.remove(&id);
                manager.registry.apply_recovery(&channel, recovery).await;
                // The list once subscribed; the joins and leaves that follow change it.
                if manager.registry.presence_wish(&channel).track {
                    let id = self.request_id();
                    Self::send(socket, &ClientFrame::Presence { id, channel }).await?;
                }
            }
            ServerFrame::Presence {
                channel,
                members,
                more,
                ..
            } => {
                // A long list comes in pages: it replaces the one held once it is whole.
                let mut list = self.member_pages.remove(&channel).unwrap_or_default();
                list.extend(members);
                if more {
                    self.member_pages.insert(channel, list);
                } else {
                    manager
                        .registry
                        .members_changed(&channel, MembersChange::All(list))
                        .await;
                }
            }
            frame @ ServerFrame::State { .. } => manager.registry.deliver_state(frame).await,
            ServerFrame::Join { channel, member } => {
                manager
                    .registry
                    .members_changed(&channel, MembersChange::Join(member))
                    .await;
            }
            ServerFrame::Leave { channel, member } => {
                manager
                    .registry
                    .members_changed(&channel, MembersChange::Leave(member))
                    .await;
            }
            ServerFrame::Reset {
                channel,
                reason,
                position,
            } => {
                manager
                    .registry
                    .deliver(&channel, Update::Reset { reason, position })
                    .await;
            }
            ServerFrame::Published { id, position, .. } => {
                if let Some(reply) = self.publishes.remove(&id) {
                    let _ = reply.send(Ok(position));
                }
            }
            ServerFrame::Error {
                id: Some(id),
                code,
                message,
            } if self.refresh_request == Some(id) => {
                // The new token was refused: this connection goes on until its current token
                // expires (close 4300), and the reconnect asks the refresher again.
                self.refresh_request = None;
                tracing::warn!(target: "resync::client", ?code, %message, "token refresh refused");
            }
            ServerFrame::Error {
                id: Some(id),
                code,
                message,
            } => {
                let error = Error::Server { code, message };
                if let Some(reply) = self.publishes.remove(&id) {
                    let _ = reply.send(Err(error));
                } else if let Some(channel) = self.subscribe_requests.remove(&id) {
                    self.channels.remove(&channel);
                    manager.registry.fail(&channel, error).await;
                }
            }
            ServerFrame::Error {
                id: None,
                code,
                message,
            } => {
                tracing::warn!(target: "resync::client", ?code, %message, "server reported an error");
            }
            ServerFrame::Ping => Self::send(socket, &ClientFrame::Pong).await?,
            ServerFrame::Refreshed { id, expires_at } => {
                if self.refresh_request == Some(id) {
                    self.refresh_request = None;
                    self.schedule_refresh(manager, expires_at);
                }
            }
            // The server ended a subscription (a refreshed token no longer allows it, or the
            // application unsubscribed the user): the subscription ends with the reason and is
            // not taken up again.
            ServerFrame::Unsubscribed {
                channel,
                reason: Some(reason),
                ..
            } => {
                self.channels.remove(&channel);
                let error = Error::Server {
                    code: resync_protocol::ErrorCode::Forbidden,
                    message: format!("the server ended the subscription to {channel}: {reason:?}"),
                };
                manager.registry.fail(&channel, error).await;
            }
            ServerFrame::Connected { .. }
            | ServerFrame::Unsubscribed { reason: None, .. }
            | ServerFrame::PresenceCount { .. } => {}
        }
        Ok(())
    }
}
