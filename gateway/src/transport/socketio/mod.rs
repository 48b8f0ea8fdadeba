//! The Socket.IO endpoint (`/socket.io/`): Engine.IO v4 and Socket.IO v5,
//! the protocol of `socket.io-client` 3.x and 4.x, so seed 002's clients
//! connect unchanged (docs/socketio.md).
//!
//! Layers, each its own module: [`engine`] (sessions, polling and WebSocket
//! transports, the upgrade, heartbeats, forwarding between processes),
//! [`packet`] (the Socket.IO codec and binary attachments), [`socket`] (one
//! connection's namespaces and replies), [`gateway`] (seed 002's events on
//! the gateway's topics, presence, direct messages and recovery) with
//! [`recovery`] (where a disconnected client's rooms wait for it).

pub mod engine;
pub mod gateway;
pub mod packet;
pub mod recovery;
pub mod socket;

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::any;

use engine::{Engine, Handshake, Reply};

/// The routes of one Engine.IO endpoint at `path` (`/socket.io`).
pub fn router<S>(engine: Arc<Engine>, path: &str) -> Router<S> {
    let with_slash = format!("{}/", path.trim_end_matches('/'));
    Router::new()
        .route(path.trim_end_matches('/'), any(handle))
        .route(&with_slash, any(handle))
        .with_state(engine)
}

fn text(reply: Reply) -> Response {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::BAD_REQUEST);
    let content_type = if reply.status == 200 {
        "text/plain; charset=UTF-8"
    } else {
        "application/json"
    };
    let mut r = (status, reply.body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// Every request of the endpoint: checks `EIO` and `transport`, then
/// routes to the handshake, a poll, a push or a WebSocket.
async fn handle(State(engine): State<Arc<Engine>>, request: Request) -> Response {
    let (mut parts, body) = request.into_parts();
    let query: Vec<(String, String)> = parts
        .uri
        .query()
        .and_then(|q| serde_urlencoded::from_str(q).ok())
        .unwrap_or_default();
    let handshake = Handshake {
        query,
        headers: parts.headers.clone(),
    };
    if handshake.param("EIO") != Some("4") {
        return text(Reply::error(400, 5, "Unsupported protocol version"));
    }
    let sid = handshake.param("sid").map(str::to_owned);
    match handshake.param("transport") {
        Some("websocket") => {
            use axum::extract::FromRequestParts;
            let Ok(ws) = WebSocketUpgrade::from_request_parts(&mut parts, &()).await else {
                return text(Reply::error(400, 3, "Bad request: not a WebSocket upgrade"));
            };
            if sid.is_none() && !engine.accepting() {
                return text(Reply::error(
                    503,
                    3,
                    "Not accepting new sessions: connect to another server",
                ));
            }
            if let Some(sid) = &sid
                && !engine.reaches(sid)
            {
                return text(Reply::error(400, 1, "Session ID unknown"));
            }
            if let Some(sid) = &sid {
                engine.upgrade_asked(sid);
            }
            let max = engine.config().max_payload + 64;
            ws.read_buffer_size(256)
                .write_buffer_size(8 * 1024)
                .max_message_size(max)
                .max_frame_size(max)
                .on_upgrade(move |socket| async move {
                    engine.serve_websocket(socket, sid, handshake).await;
                })
        }
        Some("polling") => match (parts.method.clone(), sid) {
            (Method::GET, None) => text(engine.handshake_polling(handshake)),
            (Method::GET, Some(sid)) => text(engine.poll(&sid).await),
            (Method::POST, Some(sid)) => {
                let limit = engine.config().max_payload;
                match axum::body::to_bytes(Body::new(body), limit.saturating_add(1)).await {
                    Ok(b) if b.len() <= limit => text(engine.push(&sid, b).await),
                    _ => {
                        engine.refuse_oversized(&sid);
                        text(Reply::error(413, 3, "Payload too large"))
                    }
                }
            }
            _ => text(Reply::error(400, 2, "Bad handshake method")),
        },
        _ => text(Reply::error(400, 0, "Transport unknown")),
    }
}
