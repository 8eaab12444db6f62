//! The server's own HTTP API: publish, history, channel info, health, readiness and metrics.

use std::sync::Arc;

use actix_web::http::header;
use actix_web::{HttpRequest, HttpResponse, web};
use futures_util::StreamExt;
use resync_actix::{ApiError, Metrics, Publisher};
use resync_broker::{Broker, Publish, ReadOutcome};
use resync_protocol::bodies::{
    ChannelInfo, ChannelPresence, ChannelState, HistoryOutcome, HistoryReply, PublishReply,
    PublishRequest, UserCommand,
};
use resync_protocol::bodies::{DisconnectRequest, UnsubscribeRequest};
use resync_protocol::{Channel, ErrorCode, IdempotencyKey, Key, Position};
use serde::Deserialize;

/// What the API handlers share.
pub(crate) struct ApiState {
    pub(crate) api_key: String,
    pub(crate) publisher: Publisher,
    pub(crate) broker: Arc<dyn Broker>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_replay: usize,
}

pub(crate) fn configure(config: &mut web::ServiceConfig) {
    config
        .route("/healthz", web::get().to(healthz))
        .route("/readyz", web::get().to(readyz))
        .route("/metrics", web::get().to(metrics))
        .route("/api/publish", web::post().to(publish))
        .route("/api/history", web::get().to(history))
        .route("/api/channels/{channel}", web::get().to(channel_info))
        .route(
            "/api/channels/{channel}/presence",
            web::get().to(channel_presence),
        )
        .route(
            "/api/channels/{channel}/state",
            web::get().to(channel_state),
        )
        // Channel names may hold `/`: `a/b`, `a/b/presence` (a channel whose own name ends in
        // `/presence` is written with `%2F` there).
        .route("/api/channels/{tail:.*}", web::get().to(channel_tail))
        .route(
            "/api/users/{user}/disconnect",
            web::post().to(disconnect_user),
        )
        .route(
            "/api/users/{user}/unsubscribe",
            web::post().to(unsubscribe_user),
        );
}

/// The longest user id (token subject) the user commands take.
const MAX_USER_BYTES: usize = 256;

fn user_of(path: web::Path<String>) -> Result<String, ApiError> {
    let user = path.into_inner();
    if user.is_empty() || user.len() > MAX_USER_BYTES {
        return Err(ApiError::new(
            ErrorCode::BadRequest,
            format!("a user id is 1 to {MAX_USER_BYTES} bytes"),
        ));
    }
    Ok(user)
}

/// `POST /api/users/{user}/disconnect` (`{"reason":…,"reconnect":false}`, both optional):
/// closes the user's WebSocket connections (4005, or 4203 with `reconnect`) and SSE streams
/// (a `disconnect` event) on every instance, through the broker.
async fn disconnect_user(
    state: web::Data<ApiState>,
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    require_api_key(&state, &request)?;
    let user = user_of(path)?;
    let body = read_body(payload, state.max_body_bytes).await?;
    let body: DisconnectRequest = if body.is_empty() {
        DisconnectRequest::default()
    } else {
        serde_json::from_slice(&body).map_err(|error| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("malformed disconnect body: {error}"),
            )
        })?
    };
    let command = UserCommand::Disconnect {
        user,
        reason: body
            .reason
            .unwrap_or_else(|| "disconnected by the application".to_owned()),
        reconnect: body.reconnect,
    };
    send_user_command(&state, &command).await?;
    Ok(HttpResponse::Ok().json(command))
}

/// `POST /api/users/{user}/unsubscribe` (`{"channel":…}`): ends the user's subscriptions to
/// the channel on every instance (`unsubscribed` with reason `server`).
async fn unsubscribe_user(
    state: web::Data<ApiState>,
    request: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    require_api_key(&state, &request)?;
    let user = user_of(path)?;
    let body = read_body(payload, state.max_body_bytes).await?;
    let body: UnsubscribeRequest = serde_json::from_slice(&body).map_err(|error| {
        ApiError::new(
            ErrorCode::BadRequest,
            format!("malformed unsubscribe body: {error}"),
        )
    })?;
    let command = UserCommand::Unsubscribe {
        user,
        channel: body.channel,
    };
    send_user_command(&state, &command).await?;
    Ok(HttpResponse::Ok().json(command))
}

/// Hands `command` to every instance, through the broker's user-command bus.
async fn send_user_command(state: &ApiState, command: &UserCommand) -> Result<(), ApiError> {
    let bus = state.broker.user_commands().ok_or_else(|| {
        // Not a 503: retrying cannot help. The memory and Redis brokers carry them; a
        // broker of the application's own would need a `UserCommandBus`.
        ApiError::new(
            ErrorCode::BadRequest,
            "this server's broker carries no user commands",
        )
    })?;
    Ok(bus.send(command).await?)
}

/// Compares without an early exit, so response timing does not reveal how much matched.
fn constant_time_eq(left: &[u8], right: &[u8]) -> bool {
    if left.len() != right.len() {
        return false;
    }
    left.iter()
        .zip(right)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

fn require_api_key(state: &ApiState, request: &HttpRequest) -> Result<(), ApiError> {
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "))
        .or_else(|| {
            request
                .headers()
                .get("x-api-key")
                .and_then(|value| value.to_str().ok())
        });
    match given {
        Some(key) if constant_time_eq(key.trim().as_bytes(), state.api_key.as_bytes()) => Ok(()),
        Some(_) => Err(ApiError::new(ErrorCode::Unauthorized, "wrong API key")),
        None => Err(ApiError::new(
            ErrorCode::Unauthorized,
            "API key required: Authorization: Bearer <key> or X-Api-Key",
        )),
    }
}

async fn healthz() -> HttpResponse {
    HttpResponse::Ok().content_type("text/plain").body("ok\n")
}

async fn readyz(state: web::Data<ApiState>) -> HttpResponse {
    match state.broker.health().await {
        Ok(()) => HttpResponse::Ok()
            .content_type("text/plain")
            .body("ready\n"),
        Err(error) => HttpResponse::ServiceUnavailable()
            .content_type("text/plain")
            .body(format!("not ready: {error}\n")),
    }
}

async fn metrics(state: web::Data<ApiState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(Metrics::CONTENT_TYPE)
        .body(state.metrics.render())
}

/// Reads a body up to the limit, failing with 413 past it.
async fn read_body(mut payload: web::Payload, limit: usize) -> Result<web::BytesMut, ApiError> {
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk =
            chunk.map_err(|error| ApiError::new(ErrorCode::BadRequest, error.to_string()))?;
        if body.len() + chunk.len() > limit {
            return Err(ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!("body is larger than {limit} bytes"),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn publish(
    state: web::Data<ApiState>,
    request: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    require_api_key(&state, &request)?;
    let body = read_body(payload, state.max_body_bytes).await?;
    // One parse: the channel, the key and the data are validated as the body is read.
    let body: PublishRequest = serde_json::from_slice(&body).map_err(|error| {
        // A bad channel name keeps its own code (the message is the protocol crate's own
        // `Error::InvalidChannel`, raised while the body is read).
        let code = if error.to_string().starts_with("invalid channel name") {
            ErrorCode::InvalidChannel
        } else {
            ErrorCode::BadRequest
        };
        ApiError::new(code, format!("malformed publish body: {error}"))
    })?;
    let header_key = request
        .headers()
        .get("idempotency-key")
        .map(|value| {
            value
                .to_str()
                .map_err(|_| ApiError::new(ErrorCode::BadRequest, "Idempotency-Key is not text"))
                .and_then(|key| Ok(IdempotencyKey::new(key)?))
        })
        .transpose()?;
    let channel = body.channel;
    let position = state
        .publisher
        .send(
            Publish::new(channel.clone(), body.data)
                .with_optional_idempotency_key(body.idempotency_key.or(header_key))
                .with_key(body.key),
        )
        .await?;
    Ok(HttpResponse::Ok().json(PublishReply { channel, position }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HistoryQuery {
    channel: String,
    since: Option<String>,
    limit: Option<usize>,
}

async fn history(
    state: web::Data<ApiState>,
    request: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    require_api_key(&state, &request)?;
    let query: HistoryQuery = serde_urlencoded_from(request.query_string())?;
    let channel = Channel::new(&query.channel)?;
    let limit = query.limit.unwrap_or(100).min(state.max_replay);
    let since = match query.since {
        Some(since) => since.parse::<Position>()?,
        None => Position::start_of(state.broker.position(&channel).await?.epoch),
    };
    let body = match state.broker.read_since(&channel, &since, limit).await? {
        ReadOutcome::Replayed { events, latest } => {
            HistoryReply::encode_replayed(events.iter().map(|event| &event.frame()[..]), &latest)
        }
        ReadOutcome::UpToDate { latest } => json_bytes(&HistoryReply {
            outcome: HistoryOutcome::UpToDate,
            reason: None,
            events: Vec::new(),
            latest,
        }),
        ReadOutcome::Reset { reason, latest } => json_bytes(&HistoryReply {
            outcome: HistoryOutcome::Reset,
            reason: Some(reason),
            events: Vec::new(),
            latest,
        }),
    };
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(body))
}

/// A body of validated names and enums: serializing cannot fail.
fn json_bytes(body: &impl serde::Serialize) -> Vec<u8> {
    serde_json::to_vec(body).unwrap_or_default()
}

fn serde_urlencoded_from<T: serde::de::DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    web::Query::<T>::from_query(query)
        .map(web::Query::into_inner)
        .map_err(|error| ApiError::new(ErrorCode::BadRequest, error.to_string()))
}

async fn channel_info(
    state: web::Data<ApiState>,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_api_key(&state, &request)?;
    let channel = Channel::new(path.into_inner())?;
    let position = state.broker.position(&channel).await?;
    let subscribers = state.broker.subscriber_count(&channel);
    Ok(HttpResponse::Ok().json(ChannelInfo {
        channel,
        position,
        subscribers,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PresenceQuery {
    /// `count`: only the number of members.
    #[serde(default)]
    only: Option<String>,
}

/// `GET /api/channels/{channel}/presence` (`?only=count` for the count alone): the channel's
/// members on every instance. The API key sees every channel.
/// `GET /api/channels/{tail}` for a channel whose name holds `/`: its info, or with a
/// `/presence` suffix its presence.
async fn channel_tail(
    state: web::Data<ApiState>,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let tail = path.into_inner();
    if let Some(channel) = tail.strip_suffix("/presence") {
        return channel_presence(state, request, web::Path::from(channel.to_owned())).await;
    }
    if let Some(channel) = tail.strip_suffix("/state") {
        return channel_state(state, request, web::Path::from(channel.to_owned())).await;
    }
    channel_info(state, request, web::Path::from(tail)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StateQuery {
    /// The page after this key (the previous page's `next`).
    after: Option<String>,
    /// At most this many entries (default and most 1,000).
    limit: Option<usize>,
}

/// The most bytes of entries in one state reply: a longer page ends early, with `next`.
const STATE_REPLY_BYTES: usize = 1024 * 1024;

/// `GET /api/channels/{channel}/state?after=&limit=`: a page of a keyed channel's state, with
/// the position to follow from (docs/protocol.md, section 14).
async fn channel_state(
    state: web::Data<ApiState>,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_api_key(&state, &request)?;
    let query: StateQuery = serde_urlencoded_from(request.query_string())?;
    let channel = Channel::new(path.into_inner())?;
    let after = query.after.map(Key::new).transpose()?;
    let limit = query.limit.unwrap_or(1_000).clamp(1, 1_000);
    let keyed = state.broker.keyed_state().ok_or_else(|| {
        ApiError::new(
            ErrorCode::BadRequest,
            "this server's broker keeps no keyed state",
        )
    })?;
    let page = keyed.state_page(&channel, after.as_ref(), limit).await?;
    let mut entries = Vec::with_capacity(page.entries.len());
    let mut bytes = 0;
    let mut cut = false;
    for entry in page.entries {
        let size =
            entry.key.as_str().len() + entry.data.as_ref().map_or(4, |data| data.as_str().len());
        if !entries.is_empty() && bytes + size > STATE_REPLY_BYTES {
            cut = true;
            break;
        }
        bytes += size;
        entries.push(entry);
    }
    let next = if cut {
        entries.last().map(|entry| entry.key.clone())
    } else {
        page.next
    };
    Ok(HttpResponse::Ok().json(ChannelState {
        channel,
        entries,
        position: page.position,
        next,
    }))
}

/// Any path the server does not serve: a `404` with the JSON body every error has.
pub(crate) async fn not_found(request: HttpRequest) -> HttpResponse {
    actix_web::ResponseError::error_response(&ApiError::new(
        ErrorCode::NotFound,
        format!("no such endpoint: {} {}", request.method(), request.path()),
    ))
}

async fn channel_presence(
    state: web::Data<ApiState>,
    request: HttpRequest,
    path: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    require_api_key(&state, &request)?;
    let query: PresenceQuery = serde_urlencoded_from(request.query_string())?;
    let channel = Channel::new(path.into_inner())?;
    let presence = state.broker.presence().ok_or_else(|| {
        ApiError::new(
            ErrorCode::BadRequest,
            "this server's broker keeps no presence",
        )
    })?;
    let body = match query.only.as_deref() {
        Some("count") => ChannelPresence {
            count: presence.member_count(&channel).await?,
            channel,
            members: None,
        },
        None => {
            let members = presence.members(&channel).await?;
            ChannelPresence {
                count: members.len() as u64,
                channel,
                members: Some(members),
            }
        }
        Some(other) => {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                format!("unknown only={other:?}; use only=count"),
            ));
        }
    };
    Ok(HttpResponse::Ok().json(body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_key_comparison_is_exact() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
