//! The streaming publish API for high-rate backends:
//! `GET /api/realtime/publish/stream` upgraded to a WebSocket.
//!
//! A backend authenticates once (a publisher token, as for `POST
//! /api/realtime/publish/`) and then sends any number of text frames
//! without waiting for answers. Each frame is one publish body (one event,
//! or `{"events": [...]}`), optionally with a `ref` of the backend's
//! choosing; each gets one answer frame, in order, with the same `ref`: the
//! HTTP API's answer (`event_id`, `cursor`, `duplicate`, ... or `results`)
//! or `{"error": {code, message, status}}`. Events of one stream are stored
//! in the order their frames were sent.
//!
//! The frames that arrived together are published as one burst (fanned out
//! with one wake-up per connection) and answered with one write: no
//! request, header parsing or token check per event.

use std::sync::Arc;

use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::HeaderMap;
use axum::response::Response;
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{Map, Value, json};
use tokio::time::sleep_until;
use tokio_stream::wrappers::WatchStream;

use super::publish::{Outcome, error_json, publish_values, published_json};
use crate::auth::{Principal, SCOPE_PUBLISH};
use crate::node::Node;
use crate::protocol::{Close, ErrorCode};
use crate::transport::ws::deadline_for_expiry;

/// Most frames published as one burst.
const BURST: usize = 256;

/// `?token=` for clients that cannot set an `Authorization` header.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StreamParams {
    /// The publisher token, when not sent as `Authorization: Bearer`.
    pub token: Option<String>,
}

/// `GET /api/realtime/publish/stream`: check the token, then serve the stream.
pub async fn upgrade(
    State(node): State<Arc<Node>>,
    super::JsonQuery(params): super::JsonQuery<StreamParams>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let principal = match super::authenticate(&node, &headers, params.token.as_deref(), None).await
    {
        Ok(p) => p,
        Err(e) => return super::unauthorized(&node, "publish_stream", &e),
    };
    if !principal.has_scope(SCOPE_PUBLISH) {
        node.metrics.error("publish");
        return super::error_response(
            ErrorCode::Forbidden,
            "this token may not publish (it needs the publish scope)",
        );
    }
    if node.draining() {
        return super::error_response(
            ErrorCode::Draining,
            "this gateway is draining; connect to another one",
        );
    }
    // A frame may carry a batch: the HTTP API's body limit.
    let max = super::max_publish_body(&node);
    ws.max_message_size(max)
        .max_frame_size(max)
        .on_upgrade(move |socket| serve(node, principal, socket))
}

async fn serve(node: Arc<Node>, principal: Principal, mut socket: WebSocket) {
    tracing::info!(tenant = %principal.tenant, "publish stream opened");
    let close = run(&node, &principal, &mut socket).await;
    if let Some((close, reason)) = close {
        let frame = Message::Close(Some(CloseFrame {
            code: close.code(),
            reason: reason.into(),
        }));
        let goodbye = async {
            socket.send(frame).await?;
            while let Some(Ok(_)) = socket.next().await {}
            Ok::<_, axum::Error>(())
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), goodbye).await;
    }
    tracing::info!(tenant = %principal.tenant, "publish stream closed");
}

/// Serve frames until the backend leaves (None) or the stream must close.
async fn run(
    node: &Node,
    principal: &Principal,
    socket: &mut WebSocket,
) -> Option<(Close, &'static str)> {
    let expiry = sleep_until(deadline_for_expiry(principal.expires_at));
    tokio::pin!(expiry);
    let mut control = WatchStream::from_changes(node.control());
    loop {
        let first = tokio::select! {
            biased;
            () = &mut expiry => return Some((Close::Unauthorized, "token expired")),
            Some(()) = control.next() => {
                if node.draining() {
                    return Some((Close::ServiceRestart, "this gateway is draining; reconnect"));
                }
                continue;
            }
            frame = socket.next() => frame,
        };
        let mut burst = Vec::new();
        let mut frame = first;
        let mut leaving = None;
        loop {
            match frame {
                None | Some(Ok(Message::Close(_))) => {
                    leaving = Some(None);
                    break;
                }
                Some(Err(e)) => {
                    leaving = Some(super::ws::is_capacity_error(&e).then_some((
                        Close::MessageTooBig,
                        "frame larger than the publish body limit",
                    )));
                    break;
                }
                Some(Ok(Message::Text(text))) => burst.push(Body::Text(text.to_string())),
                Some(Ok(Message::Binary(bytes))) => burst.push(Body::Binary(bytes.to_vec())),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            }
            if burst.len() >= BURST {
                break;
            }
            // Whatever else has arrived already joins the burst.
            match socket.next().now_or_never() {
                Some(next) => frame = next,
                None => break,
            }
        }
        if !burst.is_empty() {
            for a in answers(node, principal, burst).await {
                if socket.feed(Message::Text(a.into())).await.is_err() {
                    return None;
                }
            }
            if socket.flush().await.is_err() {
                return None;
            }
        }
        if let Some(leaving) = leaving {
            return leaving;
        }
    }
}

/// One frame as received.
enum Body {
    Text(String),
    Binary(Vec<u8>),
}

/// Publish a burst of frames (their events all in flight together, in
/// order) and build one answer frame per frame.
async fn answers(node: &Node, principal: &Principal, burst: Vec<Body>) -> Vec<String> {
    let mut references = Vec::with_capacity(burst.len());
    let mut bodies = Vec::with_capacity(burst.len());
    for body in burst {
        let parsed: Result<Value, _> = match &body {
            Body::Text(t) => serde_json::from_str(t),
            Body::Binary(b) => serde_json::from_slice(b),
        };
        match parsed {
            Ok(mut value) => {
                let reference = value
                    .as_object_mut()
                    .and_then(|o| o.remove("ref"))
                    .unwrap_or(Value::Null);
                references.push(Ok(reference));
                bodies.push(value);
            }
            Err(e) => {
                node.metrics.error("publish");
                references.push(Err(format!("frame is not JSON: {e}")));
            }
        }
    }
    let mut outcomes = publish_values(node, principal, bodies).await.into_iter();
    references
        .into_iter()
        .map(|reference| {
            let mut out = Map::new();
            match reference {
                Err(why) => {
                    out.insert("ref".into(), Value::Null);
                    merge(&mut out, error_json(ErrorCode::MalformedBody, why));
                }
                Ok(reference) => {
                    out.insert("ref".into(), reference);
                    merge(
                        &mut out,
                        match outcomes.next() {
                            Some(Outcome::One(p)) => published_json(&p),
                            Some(Outcome::Batch(results)) => json!({ "results": results }),
                            Some(Outcome::Refused(code, message)) => error_json(code, message),
                            None => error_json(
                                ErrorCode::BusUnavailable,
                                "no answer from the broker".into(),
                            ),
                        },
                    );
                }
            }
            Value::Object(out).to_string()
        })
        .collect()
}

fn merge(out: &mut Map<String, Value>, answer: Value) {
    if let Value::Object(fields) = answer {
        out.extend(fields);
    }
}
