//! What every transport reads from a request: channels, cursor, credentials, and the origin
//! check for cookie credentials.

use std::sync::Arc;

use actix_web::HttpRequest;
use actix_web::http::header;
use resync_protocol::{Channel, Cursor, ErrorCode};

use crate::Shared;
use crate::admission::{AdmissionGuard, Refusal};
use crate::auth::{AuthError, Credentials, Identity, TokenSource};
use crate::channel_set::Since;
use crate::error::ApiError;
use crate::proxy::{Narrowing, ProxyRequest};

/// Query parameters besides `channel` that a request may carry (cache busters, tracking).
const MAX_OTHER_PARAMETERS: usize = 32;

/// The query parameters the transports understand.
#[derive(Debug, Default)]
pub(crate) struct QueryParams {
    /// `channel=a&channel=b` and `channels=a,b`, in order, without duplicates.
    pub(crate) channels: Vec<Channel>,
    /// `cursor=…`: read, or unreadable. An unreadable cursor is not refused: its channels
    /// start now with a `bad_cursor` reset, as a client that lost its place must be told (the
    /// reset rules of every transport).
    pub(crate) cursor: Option<Since>,
    /// `token=…`.
    pub(crate) token: Option<String>,
    /// `timeout=…` in seconds (long polling).
    pub(crate) timeout_seconds: Option<u64>,
    /// `presence=…` (SSE, long polling): appear among the channels' members, with this JSON info (empty:
    /// none).
    pub(crate) presence: Option<resync_protocol::PresenceRequest>,
    /// `join_leave=1` (SSE, long polling): be told of joins and leaves.
    pub(crate) join_leave: bool,
    /// `presence_session=…` (long polling): the presence session of the client's last poll.
    pub(crate) presence_session: Option<String>,
    /// `state=` (SSE, long polling): which keyed channels start from their state.
    pub(crate) state: StateWish,
    /// `state_after=channel|epoch:seq|key,…` (long polling): keyed channels whose state an
    /// earlier reply delivered in part, to go on with.
    pub(crate) state_after: Vec<(Channel, resync_protocol::Position, resync_protocol::Key)>,
}

/// Which keyed channels of an SSE stream or a poll start from their state.
#[derive(Debug, Default)]
pub(crate) enum StateWish {
    /// None (no `state=`).
    #[default]
    None,
    /// `state=1`: those the cursor does not name (a client with nothing yet). A reconnect
    /// with its cursor (a bare `EventSource` keeps its URL) reads no state again.
    Unnamed,
    /// `state=a,b`: these, even where the cursor names them (a keyed subscription joining a
    /// channel the connection follows; the events after the cursor's position follow too).
    Channels(Vec<Channel>),
}

impl StateWish {
    fn parse(value: &str, max_channels: usize) -> Result<Self, ApiError> {
        if matches!(value, "1" | "true") {
            return Ok(StateWish::Unnamed);
        }
        let mut channels = Vec::new();
        for name in value.split(',').filter(|name| !name.is_empty()) {
            if channels.len() == max_channels {
                return Err(ApiError::new(
                    ErrorCode::TooManyChannels,
                    format!("at most {max_channels} channels per connection"),
                ));
            }
            channels.push(Channel::new(name)?);
        }
        Ok(StateWish::Channels(channels))
    }

    /// Whether `channel`, at `since` in the client's cursor, starts from its state.
    pub(crate) fn wants(
        &self,
        channel: &Channel,
        since: Option<&resync_protocol::Position>,
    ) -> bool {
        match self {
            StateWish::None => false,
            StateWish::Unnamed => since.is_none(),
            StateWish::Channels(channels) => channels.contains(channel),
        }
    }
}

/// One `state_after=` entry: `channel|epoch:seq|key`.
fn parse_state_after(
    entry: &str,
) -> Result<(Channel, resync_protocol::Position, resync_protocol::Key), ApiError> {
    let bad = || {
        ApiError::new(
            ErrorCode::BadRequest,
            "state_after entries are channel|epoch:seq|key, as a reply's state_after gives them",
        )
    };
    let mut parts = entry.split('|');
    let (Some(channel), Some(position), Some(key), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    Ok((
        Channel::new(channel)?,
        position.parse().map_err(|_| bad())?,
        resync_protocol::Key::new(key)?,
    ))
}

impl QueryParams {
    pub(crate) fn parse(query: &str, max_channels: usize) -> Result<Self, ApiError> {
        let too_many = || {
            ApiError::new(
                ErrorCode::TooManyChannels,
                format!("at most {max_channels} channels per connection"),
            )
        };
        // Read pair by pair and stop at the limit: a query naming 10,000 channels costs the
        // first few, not all of them. Cache busters and the like are ignored, but count.
        let max_pairs = max_channels.saturating_add(MAX_OTHER_PARAMETERS);
        let mut params = QueryParams::default();
        for (index, (name, value)) in form_urlencoded::parse(query.as_bytes()).enumerate() {
            if index >= max_pairs {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!("at most {max_pairs} query parameters"),
                ));
            }
            match name.as_ref() {
                "channel" => params.push_channel(&value)?,
                "channels" => {
                    for name in value.split(',').filter(|name| !name.is_empty()) {
                        params.push_channel(name)?;
                        if params.channels.len() > max_channels {
                            return Err(too_many());
                        }
                    }
                }
                "cursor" => {
                    params.cursor = Some(match Cursor::parse(&value) {
                        Ok(cursor) => Since::Cursor(cursor),
                        Err(_) => Since::Unreadable,
                    });
                }
                "token" => params.token = Some(value.into_owned()),
                "presence" => {
                    let info = if value.is_empty() {
                        None
                    } else {
                        Some(resync_protocol::Payload::from_json(value.into_owned())?)
                    };
                    params.presence = Some(resync_protocol::PresenceRequest { info });
                }
                "join_leave" => params.join_leave = matches!(value.as_ref(), "1" | "true"),
                "state" => params.state = StateWish::parse(&value, max_channels)?,
                "state_after" => {
                    for entry in value.split(',').filter(|entry| !entry.is_empty()) {
                        params.state_after.push(parse_state_after(entry)?);
                        if params.state_after.len() > max_channels {
                            return Err(too_many());
                        }
                    }
                }
                "presence_session" => params.presence_session = Some(value.into_owned()),
                "timeout" => {
                    params.timeout_seconds = Some(value.parse().map_err(|_| {
                        ApiError::new(
                            ErrorCode::BadRequest,
                            "timeout must be a whole number of seconds",
                        )
                    })?);
                }
                _ => {}
            }
            if params.channels.len() > max_channels {
                return Err(too_many());
            }
        }
        Ok(params)
    }

    fn push_channel(&mut self, name: &str) -> Result<(), ApiError> {
        let channel = Channel::new(name)?;
        if !self.channels.contains(&channel) {
            self.channels.push(channel);
        }
        Ok(())
    }

    pub(crate) fn require_channels(&self) -> Result<(), ApiError> {
        if self.channels.is_empty() {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "name at least one channel: ?channel=a&channel=b or ?channels=a,b",
            ));
        }
        Ok(())
    }
}

/// Reads the request's token: `Authorization: Bearer`, then the cookie, then `?token=`.
pub(crate) fn credentials(
    request: &HttpRequest,
    query_token: Option<&str>,
    cookie_name: &str,
) -> Credentials {
    if let Some(value) = request.headers().get(header::AUTHORIZATION)
        && let Ok(value) = value.to_str()
        && let Some(token) = value.strip_prefix("Bearer ")
    {
        return Credentials {
            token: Some((token.trim().to_owned(), TokenSource::Header)),
        };
    }
    if let Some(cookie) = request.cookie(cookie_name) {
        return Credentials {
            token: Some((cookie.value().to_owned(), TokenSource::Cookie)),
        };
    }
    Credentials {
        token: query_token.map(|token| (token.to_owned(), TokenSource::Query)),
    }
}

/// Refuses cookie-authenticated requests from other sites' pages (cross-site WebSocket
/// hijacking and its SSE equivalent): the `Origin`, when present, must be this server's own or
/// on the allow-list.
fn check_origin(
    request: &HttpRequest,
    credentials: &Credentials,
    allowed: &[String],
    public_origin: Option<&str>,
) -> Result<(), ApiError> {
    if !matches!(credentials.token, Some((_, TokenSource::Cookie))) {
        return Ok(());
    }
    let Some(origin) = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|value| value.to_str().ok())
    else {
        return Ok(());
    };
    if allowed.iter().any(|allowed| allowed == origin) {
        return Ok(());
    }
    // The server's own origin: as configured (behind a proxy), else this connection's scheme
    // and `Host`. Never from `X-Forwarded-Host`, which any client can send.
    let own_origin = match public_origin {
        Some(configured) => configured.to_owned(),
        None => {
            let secure = crate::edge::EdgeConnection::of(request)
                .map_or_else(|| request.app_config().secure(), |edge| edge.secure());
            let scheme = if secure { "https" } else { "http" };
            let host = request
                .headers()
                .get(header::HOST)
                .and_then(|value| value.to_str().ok())
                .unwrap_or_default();
            format!("{scheme}://{host}")
        }
    };
    if origin.eq_ignore_ascii_case(&own_origin) {
        return Ok(());
    }
    Err(ApiError::new(
        ErrorCode::Forbidden,
        format!("origin {origin} may not use cookie credentials here"),
    ))
}

/// Authenticates the request, with the origin check, counting failures.
pub(crate) async fn authenticate(
    shared: &Arc<Shared>,
    request: &HttpRequest,
    query: &QueryParams,
) -> Result<Identity, ApiError> {
    let credentials = credentials(request, query.token.as_deref(), &shared.config.token_cookie);
    let result = match check_origin(
        request,
        &credentials,
        &shared.config.allowed_origins,
        shared.config.public_origin.as_deref(),
    ) {
        Ok(()) => shared
            .authorizer
            .authenticate(&credentials)
            .await
            .map_err(ApiError::from),
        Err(error) => Err(error),
    };
    if result.is_err() {
        shared.metrics.auth_failed();
    }
    result
}

impl From<AuthError> for ApiError {
    fn from(error: AuthError) -> Self {
        match error {
            AuthError::Unauthorized(message) => ApiError::new(ErrorCode::Unauthorized, message),
            AuthError::Forbidden(message) => ApiError::new(ErrorCode::Forbidden, message),
        }
    }
}

/// The common start of every transport's request: refuse during shutdown, read the query,
/// authenticate. Credentials are checked here, before any upgrade or stream: a bad token
/// gets a plain 401.
pub(crate) async fn admit(
    shared: &Arc<Shared>,
    request: &HttpRequest,
) -> Result<Admitted, ApiError> {
    if *shared.shutdown.borrow() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "server is shutting down; reconnect",
        ));
    }
    // Before anything costly: a flood is refused in O(1), before parsing or authentication.
    let address = shared.admission.address_of(request);
    let guard = shared
        .admission
        .enter(address, std::time::Instant::now())
        .map_err(refusal)?;
    let query = QueryParams::parse(
        request.query_string(),
        shared.config.max_channels_per_connection,
    )?;
    let mut identity = authenticate(shared, request, &query).await?;
    let token_subject = identity.subject.clone();
    let mut narrowing = Narrowing::default();
    if let Some(proxy) = shared
        .proxy
        .as_ref()
        .filter(|proxy| proxy.asks_on_connect())
    {
        let token = credentials(request, query.token.as_deref(), &shared.config.token_cookie)
            .token
            .map(|(token, _)| token);
        let asked = ProxyRequest::Connect {
            user: identity.subject.clone(),
            token,
        };
        if let Some(answer) = proxy.ask(&asked, address).await? {
            narrowing.update(&answer);
            narrowing.apply(&mut identity);
        }
    }
    let mut guard = guard;
    guard
        .identify(identity.subject.as_deref())
        .map_err(refusal)?;
    Ok(Admitted {
        query,
        identity,
        token_subject,
        narrowing,
        address,
        guard,
    })
}

/// A request let in: what it asked for, who it is, and its place under the limits.
pub(crate) struct Admitted {
    pub(crate) query: QueryParams,
    pub(crate) identity: Identity,
    /// The subject of the token the client brought, before the application mapped it: a
    /// refresh must bring a token of the same subject.
    pub(crate) token_subject: Option<String>,
    /// What the application's proxy decided about the connection, kept across refreshes.
    pub(crate) narrowing: Narrowing,
    /// The client's address (behind trusted proxies: the forwarded one).
    pub(crate) address: std::net::IpAddr,
    pub(crate) guard: AdmissionGuard,
}

/// The error for a refusal: 503 (try again later) when the server is full, 429
/// `rate_limited` when one address asks for too much.
pub(crate) fn refusal(refusal: Refusal) -> ApiError {
    match refusal {
        Refusal::ServerFull => ApiError::new(
            ErrorCode::Unavailable,
            "the server is at its connection limit; try again later",
        ),
        Refusal::TooMuchFromAddress(why) | Refusal::TooMuchForUser(why) => {
            ApiError::new(ErrorCode::RateLimited, why)
        }
    }
}

/// The start of an SSE or long-poll request: [`admit`], then require channels and authorize
/// every one of them.
pub(crate) async fn admit_follower(
    shared: &Arc<Shared>,
    request: &HttpRequest,
) -> Result<Admitted, ApiError> {
    let mut admitted = admit(shared, request).await?;
    admitted.query.require_channels()?;
    authorize_subscriptions(shared, &admitted.identity, &admitted.query.channels)?;
    if let Some(proxy) = &shared.proxy {
        for channel in &admitted.query.channels {
            if proxy.asks_for(channel) {
                let asked = ProxyRequest::Subscribe {
                    user: admitted.identity.subject.clone(),
                    channel: channel.clone(),
                };
                proxy.ask(&asked, admitted.address).await?;
            }
        }
    }
    admitted
        .guard
        .subscribe(admitted.query.channels.len())
        .map_err(refusal)?;
    Ok(admitted)
}

/// Fails unless `identity` may subscribe to every channel.
pub(crate) fn authorize_subscriptions(
    shared: &Shared,
    identity: &Identity,
    channels: &[Channel],
) -> Result<(), ApiError> {
    for channel in channels {
        crate::permissions::check(
            shared,
            identity,
            crate::permissions::Action::Subscribe,
            channel,
        )?;
    }
    Ok(())
}

/// CORS headers for an SSE or long-poll response, so pages on other origins can follow
/// channels: an allow-listed origin is echoed with credentials allowed (cookies); any other
/// origin gets `*`, which browsers honour only for requests without credentials.
pub(crate) fn cors_headers(
    request: &HttpRequest,
    allowed: &[String],
) -> Vec<(header::HeaderName, String)> {
    let Some(origin) = request
        .headers()
        .get(header::ORIGIN)
        .and_then(|value| value.to_str().ok())
    else {
        return Vec::new();
    };
    if allowed.iter().any(|allowed| allowed == origin) {
        vec![
            (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.to_owned()),
            (header::ACCESS_CONTROL_ALLOW_CREDENTIALS, "true".to_owned()),
            (header::VARY, "Origin".to_owned()),
        ]
    } else {
        vec![(header::ACCESS_CONTROL_ALLOW_ORIGIN, "*".to_owned())]
    }
}

/// The headers a page on another origin may send with SSE and long-poll requests.
const PREFLIGHT_HEADERS: &str = "Authorization, Last-Event-ID, Cache-Control, X-Request-Id";

/// Answers a CORS preflight (`OPTIONS`) of an SSE or long-poll request: the same origin rules
/// as [`cors_headers`], `GET` only, and the headers those requests may carry.
pub(crate) async fn preflight(
    shared: Arc<Shared>,
    request: HttpRequest,
) -> actix_web::HttpResponse {
    let mut response = actix_web::HttpResponse::NoContent();
    for (name, value) in cors_headers(&request, &shared.config.allowed_origins) {
        response.insert_header((name, value));
    }
    response
        .insert_header((header::ACCESS_CONTROL_ALLOW_METHODS, "GET, OPTIONS"))
        .insert_header((header::ACCESS_CONTROL_ALLOW_HEADERS, PREFLIGHT_HEADERS))
        .insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"))
        .finish()
}

/// The request's path and query for logs, with any token redacted.
pub(crate) fn loggable_target(request: &HttpRequest) -> String {
    let query = request.query_string();
    if query.is_empty() {
        request.path().to_owned()
    } else {
        format!("{}?{}", request.path(), crate::auth::redact_query(query))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defect_9_11_a_query_naming_thousands_of_channels_stops_at_the_limit() {
        // Channel 200 is not even a valid name: parsing must have stopped at 129.
        let query: Vec<String> = (0..10_000)
            .map(|index| {
                if index == 200 {
                    "channel=not%20valid".to_owned()
                } else {
                    format!("channel=c{index}")
                }
            })
            .collect();
        let error = QueryParams::parse(&query.join("&"), 128).unwrap_err();
        assert_eq!(error.code, ErrorCode::TooManyChannels, "{error:?}");
        let listed = format!(
            "channels={}",
            (0..10_000)
                .map(|index| format!("c{index}"))
                .collect::<Vec<_>>()
                .join(",")
        );
        assert_eq!(
            QueryParams::parse(&listed, 128).unwrap_err().code,
            ErrorCode::TooManyChannels
        );
        // Junk parameters count too.
        let junk: Vec<String> = (0..1_000).map(|index| format!("x{index}=1")).collect();
        assert_eq!(
            QueryParams::parse(&junk.join("&"), 128).unwrap_err().code,
            ErrorCode::BadRequest
        );
        // Within the limits, everything is read.
        let fine = QueryParams::parse("channel=a&channels=b,c&timeout=5&_=123", 128).unwrap();
        assert_eq!(fine.channels.len(), 3);
        assert_eq!(fine.timeout_seconds, Some(5));
    }
}
