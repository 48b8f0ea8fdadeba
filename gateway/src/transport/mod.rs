//! The ways clients reach the gateway: WebSocket (native protocol), SSE and
//! long-polling for subscribers, and the HTTP publish API for backends.

pub mod longpoll;
pub mod publish;
pub mod sse;
pub mod ws;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::auth::{AuthError, Principal};
use crate::node::Node;

/// The bearer token of a request: `Authorization: Bearer` wins over `?token=`.
pub fn bearer<'a>(headers: &'a HeaderMap, query: Option<&'a str>) -> Option<&'a str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim)
        .or(query)
        .filter(|t| !t.is_empty())
}

/// Verify the request's token and its optional `company_id`.
pub async fn authenticate(
    node: &Node,
    headers: &HeaderMap,
    query_token: Option<&str>,
    company_id: Option<&str>,
) -> Result<Principal, AuthError> {
    let token = bearer(headers, query_token).ok_or(AuthError::Missing)?;
    let principal = node.verifier.verify(token).await?;
    crate::auth::check_company(&principal, company_id)?;
    Ok(principal)
}

/// A JSON error response: `{"error": {"code", "message"}, "timestamp"}`.
pub fn error_response(status: StatusCode, code: &str, message: impl ToString) -> Response {
    (
        status,
        axum::Json(json!({
            "error": { "code": code, "message": message.to_string() },
            "timestamp": crate::protocol::now_rfc3339(),
        })),
    )
        .into_response()
}

pub fn auth_error_response(e: &AuthError) -> Response {
    let mut r = error_response(StatusCode::UNAUTHORIZED, "unauthorized", e);
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        header::HeaderValue::from_static("Bearer"),
    );
    r
}

/// Split a comma-separated `topics` parameter.
pub fn split_topics(topics: Option<&str>) -> Vec<String> {
    topics
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect()
}
