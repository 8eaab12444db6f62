//! What every transport reads from a request: channels, cursor, credentials, and the origin
//! check for cookie credentials.

use std::sync::Arc;

use actix_web::HttpRequest;
use actix_web::http::header;
use resync_protocol::{Channel, Cursor, ErrorCode};

use crate::Shared;
use crate::auth::{AuthError, Credentials, Identity, TokenSource};
use crate::error::ApiError;

/// The query parameters the transports understand.
#[derive(Debug, Default)]
pub(crate) struct QueryParams {
    /// `channel=a&channel=b` and `channels=a,b`, in order, without duplicates.
    pub(crate) channels: Vec<Channel>,
    /// `cursor=…`, parsed.
    pub(crate) cursor: Option<Cursor>,
    /// `token=…`.
    pub(crate) token: Option<String>,
    /// `timeout=…` in seconds (long polling).
    pub(crate) timeout_seconds: Option<u64>,
}

impl QueryParams {
    pub(crate) fn parse(query: &str, max_channels: usize) -> Result<Self, ApiError> {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_str(query).map_err(|error| {
            ApiError::new(
                ErrorCode::BadRequest,
                format!("unreadable query string: {error}"),
            )
        })?;
        let mut params = QueryParams::default();
        for (name, value) in pairs {
            match name.as_str() {
                "channel" => params.push_channel(&value)?,
                "channels" => {
                    for name in value.split(',').filter(|name| !name.is_empty()) {
                        params.push_channel(name)?;
                    }
                }
                "cursor" => {
                    params.cursor = Some(Cursor::parse(&value)?);
                }
                "token" => params.token = Some(value),
                "timeout" => {
                    params.timeout_seconds = Some(value.parse().map_err(|_| {
                        ApiError::new(
                            ErrorCode::BadRequest,
                            "timeout must be a whole number of seconds",
                        )
                    })?);
                }
                // Cache busters and the like are ignored, as browsers and proxies add them.
                _ => {}
            }
        }
        if params.channels.len() > max_channels {
            return Err(ApiError::new(
                ErrorCode::TooManyChannels,
                format!("at most {max_channels} channels per connection"),
            ));
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
    let origin_host = origin.split_once("://").map_or(origin, |(_, host)| host);
    let own_host = request.connection_info().host().to_owned();
    if origin_host == own_host {
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
    let result = match check_origin(request, &credentials, &shared.config.allowed_origins) {
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
) -> Result<(QueryParams, Identity), ApiError> {
    if *shared.shutdown.borrow() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "server is shutting down; reconnect",
        ));
    }
    let query = QueryParams::parse(
        request.query_string(),
        shared.config.max_channels_per_connection,
    )?;
    let identity = authenticate(shared, request, &query).await?;
    Ok((query, identity))
}

/// The start of an SSE or long-poll request: [`admit`], then require channels and authorize
/// every one of them.
pub(crate) async fn admit_follower(
    shared: &Arc<Shared>,
    request: &HttpRequest,
) -> Result<(QueryParams, Identity), ApiError> {
    let (query, identity) = admit(shared, request).await?;
    query.require_channels()?;
    authorize_subscriptions(shared, &identity, &query.channels)?;
    Ok((query, identity))
}

/// Fails unless `identity` may subscribe to every channel.
pub(crate) fn authorize_subscriptions(
    shared: &Shared,
    identity: &Identity,
    channels: &[Channel],
) -> Result<(), ApiError> {
    match channels
        .iter()
        .find(|channel| !shared.authorizer.can_subscribe(identity, channel))
    {
        Some(channel) => Err(ApiError::new(
            ErrorCode::Forbidden,
            format!("not allowed to subscribe to {channel}"),
        )),
        None => Ok(()),
    }
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
