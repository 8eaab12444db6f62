//! Errors of this crate, and their mapping to HTTP responses.
//!
//! This is the only place in resync that turns errors into HTTP status codes.

use actix_web::http::StatusCode;
use actix_web::{HttpResponse, ResponseError};
use resync_protocol::{ErrorBody, ErrorCode};

/// An error answered to an HTTP request, as `{"code": …, "message": …}`.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    /// The stable error code.
    pub code: ErrorCode,
    /// A human-readable explanation.
    pub message: String,
}

/// `Result` with [`ApiError`] as the default error type.
pub type Result<T, E = ApiError> = std::result::Result<T, E>;

impl ApiError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    /// The JSON body.
    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

/// The `Retry-After` of 503 and 429 answers, in seconds.
pub const RETRY_AFTER_SECONDS: u64 = 1;

/// The HTTP status for each error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
        ErrorCode::UnknownChannel | ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::KeyedStateFull => StatusCode::CONFLICT,
        ErrorCode::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::RateLimited | ErrorCode::TooManyChannels => StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        status_of(self.code)
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let mut response = HttpResponse::build(status);
        // "Try again later" says when: clients (and proxies) wait at least this long.
        if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
            response.insert_header((actix_web::http::header::RETRY_AFTER, RETRY_AFTER_SECONDS));
        }
        response.json(self.body())
    }
}

impl From<resync_broker::Error> for ApiError {
    fn from(error: resync_broker::Error) -> Self {
        match error {
            resync_broker::Error::TooManyChannels { .. } => {
                ApiError::new(ErrorCode::TooManyChannels, error.to_string())
            }
            resync_broker::Error::KeyedStateFull(_) => {
                ApiError::new(ErrorCode::KeyedStateFull, error.to_string())
            }
            resync_broker::Error::Unsupported(_) => {
                ApiError::new(ErrorCode::BadRequest, error.to_string())
            }
            other => ApiError::new(ErrorCode::Unavailable, other.to_string()),
        }
    }
}

impl From<resync_protocol::Error> for ApiError {
    fn from(error: resync_protocol::Error) -> Self {
        use resync_protocol::Error as Protocol;
        let code = match &error {
            Protocol::InvalidChannel(_) => ErrorCode::InvalidChannel,
            Protocol::InvalidCursor(_) | Protocol::InvalidEpoch(_) => ErrorCode::BadCursor,
            Protocol::InvalidPayload(_) => ErrorCode::InvalidPayload,
            _ => ErrorCode::BadRequest,
        };
        ApiError::new(code, error.to_string())
    }
}
