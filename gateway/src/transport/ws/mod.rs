//! The WebSocket transport: upgrade, authentication, and the per-connection
//! state machine of the native protocol.
//!
//! One task per connection `select!`s over: the mailbox (events from the hub,
//! written in batches; also the slow-consumer verdict and the signal that
//! the policy or the drain state changed), frames from the client, and one
//! timer (heartbeat, idle timeout, token expiry and drain deadline share
//! it). Everything it waits on lives across loop turns, so a delivery costs
//! one wake-up and one poll of each; the rarely used request handlers and
//! the one-off steps of the start are boxed so they do not inflate the
//! state every idle connection keeps (a test holds the task to its size
//! class; see docs/benchmarks.md).

//!
//! The module: upgrade, parameters and the Origin check here;
//! `connection` (the loop and the batched writer), `handlers` (what
//! each client message does), `timers` (deadlines and the rate limit).

mod connection;
mod handlers;
mod read;
mod socket;
pub(crate) mod timers;

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use tracing::Instrument;

use crate::event::Cursor;
use crate::node::Node;
use crate::protocol::{Close, ErrorCode};
use crate::session::Session;
use connection::Connection;
use socket::{Handshake, Socket};
use switchboard_config::gateway::MAX_WRITE_DELAY_MS;
pub(crate) use timers::deadline_for_expiry;

#[derive(Debug, Deserialize)]
/// Query parameters of the WebSocket upgrade.
pub struct WsParams {
    token: Option<String>,
    company_id: Option<String>,
    /// Extension: resume the first subscriptions from this cursor.
    cursor: Option<String>,
    /// Extension: only events from this region.
    region: Option<String>,
    /// Extension: milliseconds this connection's events may be held to
    /// write them together (at most 1,000; the gateway's
    /// `websocket.write_delay_ms` when that is longer).
    write_delay_ms: Option<u16>,
}

/// What a request says about the page that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin<'a> {
    /// No `Origin` header: not a browser (browsers always send one on a
    /// WebSocket upgrade).
    Absent,
    /// One visible-ASCII `Origin`.
    One(&'a str),
    /// Several `Origin` headers, or one that is not visible ASCII: never a
    /// browser's, and never checked by guessing which one counts.
    Malformed,
}

impl<'a> Origin<'a> {
    /// The `Origin` of a request's headers.
    pub fn of(headers: &'a HeaderMap) -> Self {
        let mut values = headers.get_all(axum::http::header::ORIGIN).iter();
        match (values.next(), values.next()) {
            (None, _) => Origin::Absent,
            (Some(_), Some(_)) => Origin::Malformed,
            (Some(v), None) => match v.to_str() {
                Ok(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic()) => Origin::One(s),
                _ => Origin::Malformed,
            },
        }
    }
}

/// Is this `Origin` allowed to open a WebSocket?
pub fn origin_allowed(allowed: &[String], origin: Origin<'_>) -> bool {
    let any = allowed.iter().any(|a| a == "*");
    match origin {
        Origin::Absent => true,
        Origin::One(o) => any || allowed.iter().any(|a| a.eq_ignore_ascii_case(o)),
        Origin::Malformed => false,
    }
}

/// `GET /ws`: check the Origin and the token, then serve the connection.
pub(crate) async fn upgrade(
    State(node): State<Arc<Node>>,
    super::JsonQuery(params): super::JsonQuery<WsParams>,
    headers: HeaderMap,
    peer: super::Peer,
    ws: Handshake,
) -> Response {
    if !origin_allowed(&node.config.allowed_origins, Origin::of(&headers)) {
        node.metrics
            .connections_rejected
            .get_or_create(&vec![("reason", "origin")])
            .inc();
        return super::error_response(ErrorCode::OriginNotAllowed, "origin not allowed");
    }
    if node.draining() {
        node.metrics
            .connections_rejected
            .get_or_create(&vec![("reason", "draining")])
            .inc();
        return super::error_response(
            ErrorCode::Draining,
            "this gateway is draining; connect to another one",
        );
    }
    let region = match super::region_filter(params.region) {
        Ok(r) => r,
        Err(why) => return super::error_response(ErrorCode::InvalidQuery, why),
    };
    let write_delay_ms = match params.write_delay_ms {
        Some(ms) if u64::from(ms) > MAX_WRITE_DELAY_MS => {
            return super::error_response(
                ErrorCode::InvalidQuery,
                format!("write_delay_ms must be at most {MAX_WRITE_DELAY_MS}"),
            );
        }
        // The operator's delay is a floor: a client may wait longer, not less.
        requested => requested
            .map_or(0, u64::from)
            .max(node.config.websocket.write_delay_ms),
    };
    // Browsers only see close codes: a refusal completes the upgrade, then
    // closes with 1013. Checked before the token (no work for a storm).
    let overloaded = node
        .overload
        .check_connect(super::client_address(&node, &headers, &peer))
        .err();
    let auth = match overloaded {
        Some(refusal) => Err(refusal),
        None => Ok(super::authenticate(
            &node,
            &headers,
            params.token.as_deref(),
            params.company_id.as_deref(),
        )
        .await),
    };
    let max = connection::clamp_u32(node.config.limits.max_message_bytes);
    ws.accept(max, move |socket| {
        let span = tracing::info_span!(
            "ws.connection",
            otel.kind = "server",
            conn = tracing::field::Empty,
            tenant = tracing::field::Empty,
            close_code = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        if let Some(id) = crate::telemetry::trace_id(&span) {
            span.record("trace_id", id);
        }
        async move {
            let checked = auth.and_then(|a| match a {
                Ok(p) => node.overload.check_tenant(&p.tenant).map(|()| Ok(p)),
                Err(e) => Ok(Err(e)),
            });
            let auth = match checked {
                Ok(a) => a,
                Err(refusal) => {
                    node.metrics
                        .connections_rejected
                        .get_or_create(&vec![("reason", refusal.label())])
                        .inc();
                    return reject(socket, Close::TryAgainLater, refusal.message()).await;
                }
            };
            let principal = match auth {
                Ok(p) => p,
                Err(e) => {
                    tracing::info!(reason = %e, "websocket rejected: unauthorized");
                    node.metrics
                        .connections_rejected
                        .get_or_create(&vec![("reason", "unauthorized")])
                        .inc();
                    node.metrics.error("auth");
                    return reject(socket, Close::Unauthorized, &e.to_string()).await;
                }
            };
            let admission = match node.admit(&principal) {
                Ok(a) => a,
                Err(close) => {
                    node.metrics
                        .connections_rejected
                        .get_or_create(&vec![("reason", close.label())])
                        .inc();
                    return reject(socket, close, close.reason()).await;
                }
            };
            let session = Session::new(
                node.clone(),
                admission,
                &principal,
                region,
                node.config.limits.outbound_queue,
            );
            let cursor = params.cursor.as_deref().map(Cursor::parse_lenient);
            let span = tracing::Span::current();
            span.record(
                "conn",
                i64::try_from(session.admission.id).unwrap_or(i64::MAX),
            );
            if node.metrics.tenant_labels() {
                span.record("tenant", &*principal.tenant);
            }
            tracing::info!("authenticated");
            // Its own task: the upgrade future (request data, the auth
            // result) is freed now instead of living as long as the
            // connection.
            // Not instrumented as a whole: the span is entered around the
            // handlers, not on every poll of the delivery path.
            let conn = Connection::open(session, principal, cursor, socket, span);
            tokio::spawn(conn.with_write_delay(write_delay_ms).run());
        }
        .instrument(span.clone())
    })
}

async fn reject(mut socket: Socket, close: Close, detail: &str) {
    tracing::Span::current().record("close_code", i64::from(close.code()));
    let reason: String = format!("{}: {detail}", close.reason())
        .chars()
        .take(120)
        .collect();
    let _ = socket.close(close.code(), &reason).await;
}

/// Did the read fail because a frame or message exceeded the size limit?
/// Is it a message over the size limit? (axum's WebSocket, the streaming
/// publish endpoint.)
pub(crate) fn is_capacity_error(e: &axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    matches!(
        std::error::Error::source(e).and_then(|s| s.downcast_ref::<Error>()),
        Some(Error::Capacity(_))
    )
}
