//! The SSE session: one GET for every channel, resumed with the cursor of known positions.

use std::collections::HashSet;
use std::time::Duration;

use futures_util::StreamExt;
use resync_protocol::bodies::{DisconnectNotice, ResetNotice, SseOpening, UnsubscribedNotice};
use resync_protocol::sse::{SseMessage, SseParser};
use resync_protocol::{Channel, CloseCode, ServerFrame};

use crate::connection::{ConnectFailure, Manager, SessionEnd};
use crate::{ConnectionState, Error, TransportKind};

enum Wake {
    Chunk(Option<reqwest::Result<bytes::Bytes>>),
    Silent,
    Changed,
    Publish(Option<crate::connection::PublishRequest>),
}

/// The registrations a stream serves: a channel followed again (a new registration) needs a
/// new stream from its new position, as much as an added or dropped one.
fn registrations(manager: &Manager) -> HashSet<(Channel, u64)> {
    manager
        .registry
        .wanted()
        .into_iter()
        .map(|(channel, _, generation)| (channel, generation))
        .collect()
}

pub(crate) async fn run(manager: &mut Manager) -> std::result::Result<SessionEnd, ConnectFailure> {
    // Read before the query, so a registration that changes in between shows as a change.
    let following = registrations(manager);
    let (_channels, query) = manager.channel_query();
    let url = manager
        .url("sse", &query)
        .map_err(|error| ConnectFailure::Refused(error.to_string()))?;
    let mut request = manager.http.get(url).header("accept", "text/event-stream");
    if let Some(token) = &manager.token {
        request = request.bearer_auth(token);
    }
    let response = match tokio::time::timeout(manager.config.connect_timeout, request.send()).await
    {
        Err(_) => return Err(ConnectFailure::Lost("sse connect timed out".to_owned())),
        Ok(Err(error)) => return Err(ConnectFailure::Lost(crate::error::with_causes(&error))),
        Ok(Ok(response)) => response,
    };
    let status = response.status().as_u16();
    if status != 200 {
        let body = response.text().await.unwrap_or_default();
        return Err(Manager::failure_for_status(status, &body));
    }
    let is_event_stream = response
        .headers()
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .is_some_and(|value| value.starts_with("text/event-stream"));
    if !is_event_stream {
        return Err(ConnectFailure::Refused(
            "the answer is not an event stream".to_owned(),
        ));
    }
    manager.set_state(ConnectionState::Connected {
        transport: TransportKind::Sse,
    });
    let mut body = response.bytes_stream();
    let mut parser = SseParser::new();
    let mut retry = Duration::from_secs(1);
    loop {
        let wake = tokio::select! {
            chunk = tokio::time::timeout(manager.config.sse_idle_timeout, body.next()) => match chunk {
                Ok(chunk) => Wake::Chunk(chunk),
                Err(_) => Wake::Silent,
            },
            _ = manager.registry.changed.notified() => Wake::Changed,
            request = manager.publishes.recv() => Wake::Publish(request),
        };
        match wake {
            Wake::Silent => return Ok(SessionEnd::Lost("sse stream went silent".to_owned())),
            Wake::Chunk(None) => return Ok(SessionEnd::RetryAfter(retry)),
            Wake::Chunk(Some(Err(error))) => {
                return Ok(SessionEnd::Lost(crate::error::with_causes(&error)));
            }
            Wake::Chunk(Some(Ok(bytes))) => {
                let messages = match parser.feed(&bytes) {
                    Ok(messages) => messages,
                    Err(error) => return Ok(SessionEnd::Lost(crate::error::with_causes(&error))),
                };
                for message in messages {
                    if let Some(retry_ms) = message.retry_ms {
                        retry = Duration::from_millis(retry_ms);
                    }
                    if let Some(end) = on_message(manager, message).await {
                        return Ok(end);
                    }
                }
            }
            Wake::Changed => {
                if manager.registry.closed().is_some() {
                    return Ok(SessionEnd::Shutdown);
                }
                if registrations(manager) != following {
                    return Ok(SessionEnd::Resubscribe);
                }
            }
            Wake::Publish(None) => return Ok(SessionEnd::Shutdown),
            Wake::Publish(Some(request)) => {
                let _ = request.reply.send(Err(Error::PublishNeedsWebSocket("sse")));
            }
        }
    }
}

/// Applies one SSE message; `Some` when it ends the session (the application disconnected
/// the user: the same meaning as the WebSocket's close 4005 or 4203).
async fn on_message(manager: &Manager, message: SseMessage) -> Option<SessionEnd> {
    match message.event.as_str() {
        "message" => match ServerFrame::decode(message.data.as_bytes()) {
            Ok(ServerFrame::Event(event)) => manager.registry.deliver_event(event).await,
            other => tracing::warn!(target: "resync::client", ?other, "unexpected sse message"),
        },
        "subscribed" => match serde_json::from_str::<SseOpening>(&message.data) {
            Ok(opening) => {
                for (channel, outcome) in opening.channels {
                    manager.registry.apply_recovery(&channel, outcome).await;
                }
            }
            Err(error) => {
                tracing::warn!(target: "resync::client", %error, "unreadable subscribed event")
            }
        },
        "state" => match ServerFrame::decode(message.data.as_bytes()) {
            Ok(frame @ ServerFrame::State { .. }) => manager.registry.deliver_state(frame).await,
            other => tracing::warn!(target: "resync::client", ?other, "unexpected sse state"),
        },
        "reset" => match serde_json::from_str::<ResetNotice>(&message.data) {
            Ok(reset) => manager.registry.deliver_reset(reset).await,
            Err(error) => {
                tracing::warn!(target: "resync::client", %error, "unreadable reset event")
            }
        },
        "unsubscribed" => match serde_json::from_str::<UnsubscribedNotice>(&message.data) {
            Ok(notice) => server_unsubscribed(manager, notice).await,
            Err(error) => {
                tracing::warn!(target: "resync::client", %error, "unreadable unsubscribed event")
            }
        },
        "disconnect" => match serde_json::from_str::<DisconnectNotice>(&message.data) {
            Ok(notice) => return Some(disconnected(&notice)),
            Err(error) => {
                tracing::warn!(target: "resync::client", %error, "unreadable disconnect event")
            }
        },
        _ => {}
    }
    None
}

/// The server ended a subscription (the application unsubscribed the user): the
/// subscription ends with why, as on WebSocket.
pub(crate) async fn server_unsubscribed(manager: &Manager, notice: UnsubscribedNotice) {
    let error = Error::Server {
        code: resync_protocol::ErrorCode::Forbidden,
        message: format!(
            "the server ended the subscription to {}: {:?}",
            notice.channel, notice.reason
        ),
    };
    manager.registry.fail(&notice.channel, error).await;
}

/// The application disconnected the user: the session ends as the WebSocket's close code
/// says (4005: do not come back; 4203: come back soon).
pub(crate) fn disconnected(notice: &DisconnectNotice) -> SessionEnd {
    SessionEnd::Closed(if notice.reconnect {
        CloseCode::DISCONNECTED_RECONNECT
    } else {
        CloseCode::DISCONNECTED
    })
}
