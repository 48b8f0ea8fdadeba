//! The ways clients reach the gateway: WebSocket (native protocol), SSE and
//! long-polling for subscribers, and the HTTP publish API for backends.

pub mod console;
pub mod erase;
pub mod longpoll;
pub mod publish;
pub mod publish_stream;
pub mod snapshot;
pub mod socketio;
pub mod sse;
pub mod ws;

use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use std::sync::Arc;

use crate::auth::{AuthError, Principal};
use crate::node::Node;
use crate::protocol::{Close, ErrorCode, ServerMessage};
use crate::session::Session;

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
    let mut principal = node.verifier.verify(token).await?;
    crate::auth::check_company(&principal, company_id)?;
    principal.tenant = node.hub.shared_tenant(principal.tenant);
    Ok(principal)
}

/// Query parameters whose parse errors (a duplicate, a bad value) are
/// answered in the gateway's JSON error shape, not axum's plain text.
pub struct JsonQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for JsonQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(v)) => Ok(Self(v)),
            Err(r) => Err(error_response(ErrorCode::InvalidQuery, r.body_text())),
        }
    }
}

/// A request body refused before the handler saw it (too large, unreadable),
/// in the JSON error shape.
pub fn body_rejected(r: axum::extract::rejection::BytesRejection) -> Response {
    let code = if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ErrorCode::BodyTooLarge
    } else {
        ErrorCode::MalformedBody
    };
    error_response(code, r.body_text())
}

/// The TCP peer of a request, when the server recorded it (the client
/// listener does; routers served without connect info give none).
pub type Peer = Option<axum::Extension<axum::extract::ConnectInfo<std::net::SocketAddr>>>;

/// The client's address: the configured header's, else the TCP peer's.
pub fn client_address(node: &Node, headers: &HeaderMap, peer: &Peer) -> Option<std::net::IpAddr> {
    let ip = peer.as_ref().map(|p| p.0.0.ip());
    node.overload.client_address(headers, ip)
}

/// A new connection refused for its rate or for load, over HTTP: 429
/// `connect_rate_limited` or 503 `overloaded`, with `Retry-After`.
pub fn overload_response(node: &Node, refusal: crate::overload::Refusal) -> Response {
    node.metrics
        .connections_rejected
        .get_or_create(&vec![("reason", refusal.label())])
        .inc();
    let code = match refusal {
        crate::overload::Refusal::Saturated => ErrorCode::Overloaded,
        _ => ErrorCode::ConnectRateLimited,
    };
    let mut response = error_response(code, refusal.message());
    response.headers_mut().insert(
        header::RETRY_AFTER,
        axum::http::HeaderValue::from(node.overload.retry_after()),
    );
    response
}

/// The largest publish body (HTTP) or frame (stream): room for a batch.
pub fn max_publish_body(node: &Node) -> usize {
    (node.config.limits.max_message_bytes as usize).saturating_mul(4) + 64 * 1024
}

/// A JSON error response with the code's status:
/// `{"error": {"code", "message"}, "timestamp"}`.
pub fn error_response(code: ErrorCode, message: impl ToString) -> Response {
    (
        code.status(),
        axum::Json(json!({
            "error": { "code": code, "message": message.to_string() },
            "timestamp": crate::protocol::now_rfc3339(),
        })),
    )
        .into_response()
}

/// A request refused for its token, on an HTTP transport: logged and
/// counted the same as a refused WebSocket, answered 401.
pub fn unauthorized(node: &Node, transport: &'static str, e: &AuthError) -> Response {
    tracing::info!(transport, reason = %e, "request rejected: unauthorized");
    node.metrics.error("auth");
    auth_error_response(e)
}

/// 401 for a refused token, with `WWW-Authenticate: Bearer`.
pub fn auth_error_response(e: &AuthError) -> Response {
    let mut r = error_response(ErrorCode::Unauthorized, e);
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

/// Open the session of an HTTP subscriber (long-poll or SSE): the topics
/// are required, the connection is admitted, and every topic must be
/// subscribed, or the request is answered with why not. `presence`:
/// whether presence notices reach it (SSE, not long-poll).
pub async fn open_http_session(
    node: &Arc<Node>,
    principal: &Principal,
    topics: Option<&str>,
    region: Option<String>,
    queue: usize,
    presence: bool,
) -> Result<Session, Response> {
    let topics = split_topics(topics);
    if topics.is_empty() {
        return Err(error_response(
            ErrorCode::InvalidTopic,
            "'topics' is required: a comma-separated list",
        ));
    }
    let admission = node
        .admit(principal)
        .map_err(|close| error_response(refusal_code(close), close.reason()))?;
    let region =
        region_filter(region).map_err(|why| error_response(ErrorCode::InvalidQuery, why))?;
    let mut session = Session::new(node.clone(), admission, principal, region, queue);
    if !presence {
        session = session.without_presence();
    }
    let (_, errors) = session
        .subscribe(&topics, crate::session::Form::Native)
        .await;
    if let Some(e) = errors.first() {
        return Err(error_response(e.code(), e));
    }
    Ok(session)
}

/// A subscriber's `region` parameter: only that region's events. A name
/// that cannot be a region is refused (ignoring it would deliver every
/// region's events to a client that asked for one).
/// The refusal is answered `400 invalid_query`.
pub fn region_filter(param: Option<String>) -> Result<Option<Arc<str>>, String> {
    match param {
        None => Ok(None),
        Some(r) if switchboard_config::valid_region(&r) => Ok(Some(r.into())),
        Some(r) => Err(format!(
            "region {:?}: {}",
            r.chars().take(64).collect::<String>(),
            switchboard_config::REGION_RULE
        )),
    }
}

/// The HTTP error code of an admission refusal.
pub fn refusal_code(close: Close) -> ErrorCode {
    match close {
        Close::ServiceRestart => ErrorCode::Draining,
        Close::Forbidden => ErrorCode::Forbidden,
        Close::NotResident => ErrorCode::ResidencyViolation,
        Close::Unauthorized => ErrorCode::Unauthorized,
        _ => ErrorCode::TooManyConnections,
    }
}

/// What a policy change means for one subscriber, the same on every
/// transport.
pub enum PolicyChange {
    /// Nothing this subscriber holds changed.
    Unchanged,
    /// Some patterns were withdrawn (already unsubscribed): tell the client.
    Revoked(ServerMessage),
    /// The tenant has no policy here any more: tell the client, then end
    /// (WebSocket: close 4003; SSE: an `error` event `forbidden`;
    /// long-poll: 403 `forbidden`).
    TenantRemoved(ServerMessage),
}

/// Re-check a subscriber against the policy now in force.
pub async fn policy_changed(session: &mut Session) -> PolicyChange {
    if session.node.limits(session.tenant()).is_err() {
        return PolicyChange::TenantRemoved(ServerMessage::SubscriptionRevoked {
            topics: session.patterns().map(|p| p.as_str().to_owned()).collect(),
            reason: TENANT_REMOVED.into(),
        });
    }
    let revoked = session.enforce_policy().await;
    match revoked.first() {
        None => PolicyChange::Unchanged,
        Some((_, why)) => PolicyChange::Revoked(ServerMessage::SubscriptionRevoked {
            reason: why.to_string(),
            topics: revoked.iter().map(|(p, _)| p.as_str().to_owned()).collect(),
        }),
    }
}

/// Why a subscriber whose tenant lost its policy is ended.
pub const TENANT_REMOVED: &str = "the tenant no longer has a policy on this gateway";
