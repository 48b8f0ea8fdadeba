//! The error codes of every transport: carried in WebSocket `error`
//! messages, SSE `error` events and HTTP error bodies.

use axum::http::StatusCode;
use serde::Serialize;

/// A machine-readable error code (`snake_case` on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// Not JSON, or a known type with wrong fields.
    MalformedMessage,
    /// A `type` this gateway does not know.
    UnknownMessageType,
    /// A binary WebSocket frame.
    BinaryNotSupported,
    /// A pattern or topic that does not parse, or none given.
    InvalidTopic,
    /// The tenant's policy does not allow the pattern.
    TopicNotAllowed,
    /// The connection holds its maximum of subscriptions.
    TooManySubscriptions,
    /// A message or event over the tenant's size limit.
    MessageTooLarge,
    /// `auth.refresh` with a token that is invalid or for someone else.
    AuthRefreshFailed,
    /// The token's `exp` passed; the connection ends.
    TokenExpired,
    /// The event bus (NATS) could not take the request.
    BusUnavailable,
    /// History could not be read.
    HistoryUnavailable,
    /// Token missing or refused.
    Unauthorized,
    /// The tenant has no policy here, or the token may not do this.
    Forbidden,
    /// The connection limit of the tenant or the process is reached.
    TooManyConnections,
    /// The gateway drains: connect to another one.
    Draining,
    /// The page's `Origin` is not allowed to open a WebSocket.
    OriginNotAllowed,
    /// A duplicate or unparsable query parameter.
    InvalidQuery,
    /// A long-poll `timeout` that is not a number of seconds.
    InvalidTimeout,
    /// A publish field with a wrong type or value.
    InvalidRequest,
    /// A request body that is not the JSON expected.
    MalformedBody,
    /// A request body over the gateway's body limit.
    BodyTooLarge,
    /// A publish batch with more events than allowed.
    BatchTooLarge,
    /// New connections arrive faster than the source address's or the
    /// tenant's connect rate allows: retry after `Retry-After`.
    ConnectRateLimited,
    /// The process is saturated and sheds new connections: retry after
    /// `Retry-After` (possibly on another gateway).
    Overloaded,
    /// The event names a data subject whose data was erased: publishing
    /// for it is blocked for a while (see docs/data-protection.md).
    DataSubjectErased,
    /// The tenant's data may not live in this gateway's region (its
    /// policy's `residency`): connect to or publish in one of its regions.
    ResidencyViolation,
}

impl ErrorCode {
    /// Every code, for tests and docs.
    pub const ALL: [ErrorCode; 26] = [
        ErrorCode::MalformedMessage,
        ErrorCode::UnknownMessageType,
        ErrorCode::BinaryNotSupported,
        ErrorCode::InvalidTopic,
        ErrorCode::TopicNotAllowed,
        ErrorCode::TooManySubscriptions,
        ErrorCode::MessageTooLarge,
        ErrorCode::AuthRefreshFailed,
        ErrorCode::TokenExpired,
        ErrorCode::BusUnavailable,
        ErrorCode::HistoryUnavailable,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::TooManyConnections,
        ErrorCode::Draining,
        ErrorCode::OriginNotAllowed,
        ErrorCode::InvalidQuery,
        ErrorCode::InvalidTimeout,
        ErrorCode::InvalidRequest,
        ErrorCode::MalformedBody,
        ErrorCode::BodyTooLarge,
        ErrorCode::BatchTooLarge,
        ErrorCode::ConnectRateLimited,
        ErrorCode::Overloaded,
        ErrorCode::DataSubjectErased,
        ErrorCode::ResidencyViolation,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::MalformedMessage => "malformed_message",
            ErrorCode::UnknownMessageType => "unknown_message_type",
            ErrorCode::BinaryNotSupported => "binary_not_supported",
            ErrorCode::InvalidTopic => "invalid_topic",
            ErrorCode::TopicNotAllowed => "topic_not_allowed",
            ErrorCode::TooManySubscriptions => "too_many_subscriptions",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::AuthRefreshFailed => "auth_refresh_failed",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::BusUnavailable => "bus_unavailable",
            ErrorCode::HistoryUnavailable => "history_unavailable",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::TooManyConnections => "too_many_connections",
            ErrorCode::Draining => "draining",
            ErrorCode::OriginNotAllowed => "origin_not_allowed",
            ErrorCode::InvalidQuery => "invalid_query",
            ErrorCode::InvalidTimeout => "invalid_timeout",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::MalformedBody => "malformed_body",
            ErrorCode::BodyTooLarge => "body_too_large",
            ErrorCode::BatchTooLarge => "batch_too_large",
            ErrorCode::ConnectRateLimited => "connect_rate_limited",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::DataSubjectErased => "data_subject_erased",
            ErrorCode::ResidencyViolation => "residency_violation",
        }
    }

    /// The HTTP status an HTTP transport answers this code with.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorCode::MalformedMessage
            | ErrorCode::UnknownMessageType
            | ErrorCode::BinaryNotSupported
            | ErrorCode::InvalidTopic
            | ErrorCode::TooManySubscriptions
            | ErrorCode::InvalidQuery
            | ErrorCode::InvalidTimeout
            | ErrorCode::InvalidRequest
            | ErrorCode::MalformedBody => StatusCode::BAD_REQUEST,
            ErrorCode::Unauthorized | ErrorCode::TokenExpired | ErrorCode::AuthRefreshFailed => {
                StatusCode::UNAUTHORIZED
            }
            ErrorCode::TopicNotAllowed
            | ErrorCode::Forbidden
            | ErrorCode::OriginNotAllowed
            | ErrorCode::DataSubjectErased
            | ErrorCode::ResidencyViolation => StatusCode::FORBIDDEN,
            ErrorCode::MessageTooLarge | ErrorCode::BodyTooLarge | ErrorCode::BatchTooLarge => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ErrorCode::TooManyConnections | ErrorCode::ConnectRateLimited => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ErrorCode::BusUnavailable
            | ErrorCode::HistoryUnavailable
            | ErrorCode::Draining
            | ErrorCode::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_name_is_the_serde_name_and_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json, code.as_str());
            assert!(seen.insert(code.as_str()), "{code} twice");
            assert!(code.status().is_client_error() || code.status().is_server_error());
        }
    }
}
