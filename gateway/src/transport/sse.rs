//! Server-Sent Events: `GET /api/realtime/sse/?topics=a,b&cursor=&token=&company_id=`.
//!
//! Each event is one SSE message whose `id:` is the event id, so the
//! browser's automatic reconnect sends it back as `Last-Event-ID` and the
//! stream resumes where it stopped. Control messages are named SSE events
//! (`resume.gap`, `reconnect`); keep-alive comments flow every 15 s.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;

use crate::event::{Cursor, Event};
use crate::node::Node;
use crate::protocol::now_rfc3339;
use crate::session::Session;

#[derive(Debug, Deserialize)]
pub struct SseParams {
    topics: Option<String>,
    cursor: Option<String>,
    company_id: Option<String>,
    token: Option<String>,
    region: Option<String>,
}

fn event_message(e: &Event) -> SseEvent {
    SseEvent::default().id(e.id.to_string()).data(&*e.envelope)
}

fn control(name: &str, data: serde_json::Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}

pub async fn stream(
    State(node): State<Arc<Node>>,
    super::JsonQuery(params): super::JsonQuery<SseParams>,
    headers: HeaderMap,
) -> Response {
    let principal = match super::authenticate(
        &node,
        &headers,
        params.token.as_deref(),
        params.company_id.as_deref(),
    )
    .await
    {
        Ok(p) => p,
        Err(e) => return super::unauthorized(&node, "sse", &e),
    };
    let session = match super::open_http_session(
        &node,
        &principal,
        params.topics.as_deref(),
        params.region,
        node.config.limits.outbound_queue,
    )
    .await
    {
        Ok(s) => s,
        Err(r) => return r,
    };
    // `Last-Event-ID` (a browser reconnecting) wins over `?cursor=`.
    let raw_cursor = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .or(params.cursor)
        .filter(|c| !c.is_empty());

    let (tx, rx) = mpsc::channel::<SseEvent>(64);
    tokio::spawn(pump(session, raw_cursor, principal.expires_at, tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    let keepalive = Duration::from_secs(node.config.heartbeat.sse_keepalive_seconds.max(1));
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(keepalive).text("keep-alive"))
        .into_response()
}

/// Feed one SSE stream until the client leaves, the token expires, the
/// queue overflows or the gateway drains.
async fn pump(
    mut session: Session,
    raw_cursor: Option<String>,
    expires_at: u64,
    tx: mpsc::Sender<SseEvent>,
) {
    let node = session.node.clone();
    node.metrics.sse_active.inc();
    let _ = tx
        .send(
            SseEvent::default()
                .retry(Duration::from_secs(3))
                .comment("switchboard"),
        )
        .await;
    if let Some(raw) = raw_cursor {
        let mut out = Vec::new();
        let c = Cursor::parse_lenient(&raw);
        let gap = match session
            .replay(c, None, usize::MAX, |e| {
                out.push(event_message(e));
                true
            })
            .await
        {
            Ok(r) => r.gap.map(|g| g.as_str()),
            Err(_) => Some("unavailable"),
        };
        if let Some(reason) = gap {
            node.metrics
                .resumes
                .get_or_create(&vec![("outcome", "gap")])
                .inc();
            let _ = tx.send(control("resume.gap", json!({ "reason": reason, "requested": raw.chars().take(64).collect::<String>(), "timestamp": now_rfc3339() }))).await;
        } else {
            node.metrics
                .resumes
                .get_or_create(&vec![("outcome", "replayed")])
                .inc();
        }
        node.metrics.events_delivered.inc_by(out.len() as u64);
        for m in out {
            if tx.send(m).await.is_err() {
                break;
            }
        }
    }
    let mut policy = node.policy_changes();
    let expiry = tokio::time::sleep(Duration::from_secs(
        expires_at.saturating_sub(jsonwebtoken::get_current_timestamp()),
    ));
    tokio::pin!(expiry);
    loop {
        tokio::select! {
            biased;
            _ = tx.closed() => break,
            ev = session.next_live() => match ev {
                Ok(e) => if tx.send(event_message(&e)).await.is_err() { break },
                Err(_overflowed) => {
                    let _ = tx.try_send(control("reconnect", json!({ "reason": "slow consumer", "cursor": session.live_cursor().to_string() })));
                    break;
                }
            },
            _ = &mut expiry => {
                let _ = tx.send(control("error", json!({ "code": "token_expired", "message": "token expired", "timestamp": now_rfc3339() }))).await;
                break;
            }
            Ok(()) = policy.changed() => {
                if node.limits(&session.tenant).is_err() {
                    break;
                }
                let revoked = session.enforce_policy().await;
                if !revoked.is_empty() {
                    let topics: Vec<&str> = revoked.iter().map(|(p, _)| p.as_str()).collect();
                    let _ = tx.send(control("subscription.revoked", json!({ "topics": topics, "reason": revoked[0].1.to_string() }))).await;
                }
            }
            _ = node.drained() => {
                let _ = tx.send(control("reconnect", json!({ "reason": "draining", "timestamp": now_rfc3339() }))).await;
                break;
            }
        }
    }
    node.metrics.sse_active.dec();
    session.close().await;
}
