//! The long-polling session: each reply carries the cursor for the next poll.

use std::collections::HashSet;

use resync_protocol::{Channel, ServerFrame};

use crate::connection::{ConnectFailure, Manager, SessionEnd};
use crate::{ConnectionState, Error, TransportKind};
use resync_protocol::bodies::PollReply;

enum Wake {
    Reply(std::result::Result<reqwest::Result<reqwest::Response>, tokio::time::error::Elapsed>),
    Changed,
    Publish(Option<crate::connection::PublishRequest>),
}

pub(crate) async fn run(manager: &mut Manager) -> std::result::Result<SessionEnd, ConnectFailure> {
    let mut connected = false;
    // Keyed channels whose state the last reply delivered in part (`state_after`).
    let mut state_after: Vec<String> = Vec::new();
    loop {
        let (channels, mut query) = manager.channel_query();
        let following: HashSet<Channel> = channels.into_iter().collect();
        query.push(("timeout", manager.config.poll_timeout.as_secs().to_string()));
        if !state_after.is_empty() {
            query.push(("state_after", state_after.join(",")));
        }
        let url = manager
            .url("poll", &query)
            .map_err(|error| ConnectFailure::Refused(error.to_string()))?;
        let mut request = manager.http.get(url);
        if let Some(token) = &manager.token {
            request = request.bearer_auth(token);
        }
        let deadline = manager.config.poll_timeout + manager.config.connect_timeout;
        let wake = tokio::select! {
            reply = tokio::time::timeout(deadline, request.send()) => Wake::Reply(reply),
            _ = manager.registry.changed.notified() => Wake::Changed,
            request = manager.publishes.recv() => Wake::Publish(request),
        };
        let response = match wake {
            Wake::Changed => {
                if manager.registry.closed().is_some() {
                    return Ok(SessionEnd::Shutdown);
                }
                // A new or dropped channel: poll again at once with the new set.
                continue;
            }
            Wake::Publish(None) => return Ok(SessionEnd::Shutdown),
            Wake::Publish(Some(request)) => {
                let _ = request
                    .reply
                    .send(Err(Error::PublishNeedsWebSocket("long polling")));
                continue;
            }
            Wake::Reply(Err(_)) => return lost(connected, "poll timed out"),
            Wake::Reply(Ok(Err(error))) => {
                return lost(connected, &crate::error::with_causes(&error));
            }
            Wake::Reply(Ok(Ok(response))) => response,
        };
        let status = response.status().as_u16();
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            let failure = Manager::failure_for_status(status, &body);
            if !connected {
                return Err(failure);
            }
            return Ok(match failure {
                ConnectFailure::Unauthorized(_) => SessionEnd::Unauthorized,
                other => SessionEnd::Lost(format!("{other:?}")),
            });
        }
        let reply: PollReply = match response.json().await {
            Ok(reply) => reply,
            Err(error) if connected => {
                return Ok(SessionEnd::Lost(crate::error::with_causes(&error)));
            }
            Err(error) => {
                return Err(ConnectFailure::Refused(format!(
                    "not a poll reply: {error}"
                )));
            }
        };
        if !connected {
            connected = true;
            manager.set_state(ConnectionState::Connected {
                transport: TransportKind::LongPolling,
            });
        }
        for reset in reply.resets {
            manager.registry.deliver_reset(reset).await;
        }
        for raw in reply.events {
            match ServerFrame::decode(raw.get().as_bytes()) {
                Ok(ServerFrame::Event(event)) => manager.registry.deliver_event(event).await,
                Ok(frame @ ServerFrame::State { .. }) => {
                    manager.registry.deliver_state(frame).await
                }
                other => tracing::warn!(target: "resync::client", ?other, "unexpected poll event"),
            }
        }
        state_after = reply.state_after;
        for notice in reply.unsubscribed {
            crate::sse::server_unsubscribed(manager, notice).await;
        }
        if let Some(notice) = &reply.disconnect {
            return Ok(crate::sse::disconnected(notice));
        }
        // Channels that started fresh learn their position from the cursor.
        for (channel, position) in reply.cursor.iter() {
            if following.contains(channel) && manager.registry.position(channel).is_none() {
                manager.registry.set_position(channel, position.clone());
            }
        }
    }
}

fn lost(connected: bool, reason: &str) -> std::result::Result<SessionEnd, ConnectFailure> {
    if connected {
        Ok(SessionEnd::Lost(reason.to_owned()))
    } else {
        Err(ConnectFailure::Lost(reason.to_owned()))
    }
}
