//! Server-Sent Events: `GET /api/realtime/sse/?topics=a,b&cursor=&token=&company_id=`.
//!
//! Each event is one SSE message whose `id:` is the event id, so the
//! browser's automatic reconnect sends it back as `Last-Event-ID` and the
//! stream resumes where it stopped. Control messages are named SSE events
//! whose data is the message's data object (`resume.gap`, `reconnect` with
//! the cursor, `subscription.revoked`, `error`); keep-alive comments flow
//! every 15 s.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use tokio::sync::mpsc;

use super::PolicyChange;
use crate::broker::GapReason;
use crate::event::{Cursor, Event, EventKind};
use crate::node::Node;
use crate::protocol::{ErrorCode, ReconnectReason, ServerMessage};
use crate::session::{ResumeSink, Session};

/// SSE messages queued between the session and the response body: each
/// holds a formatted event, so a resuming stream holds at most this many
/// besides what the socket takes.
const SSE_BUFFER: usize = 8;

#[derive(Debug, Deserialize)]
/// Query parameters of an SSE stream.
pub struct SseParams {
    topics: Option<String>,
    cursor: Option<String>,
    company_id: Option<String>,
    token: Option<String>,
    region: Option<String>,
}

fn event_message(e: &Event) -> SseEvent {
    match e.kind {
        EventKind::Stored => SseEvent::default().id(e.id.to_string()).data(&*e.envelope),
        // A presence notice: a named event without an id (it is not a
        // position to resume from).
        EventKind::Presence => SseEvent::default()
            .event(e.message_type.as_deref().unwrap_or("presence"))
            .data(&*e.envelope),
    }
}

/// A control message as a named SSE event (`event:` is the message type,
/// `data:` its data object).
fn control(m: &ServerMessage) -> SseEvent {
    SseEvent::default()
        .event(m.sse_name())
        .data(m.data(time::OffsetDateTime::now_utc()))
}

/// A replay fed into the stream's bounded channel: when the client reads
/// slowly the channel fills and the replay waits.
struct ChannelSink<'a> {
    tx: &'a mpsc::Sender<SseEvent>,
}

impl ResumeSink for ChannelSink<'_> {
    async fn gap(&mut self, reason: GapReason, requested: &str) -> bool {
        let m = ServerMessage::ResumeGap {
            reason,
            requested: requested.to_owned(),
            request_id: None,
        };
        self.tx.send(control(&m)).await.is_ok()
    }

    async fn event(&mut self, event: &Arc<Event>) -> bool {
        self.tx.send(event_message(event)).await.is_ok()
    }
}

/// `GET /api/realtime/sse/`.
pub async fn stream(
    State(node): State<Arc<Node>>,
    super::JsonQuery(params): super::JsonQuery<SseParams>,
    headers: HeaderMap,
    peer: super::Peer,
) -> Response {
    let address = super::client_address(&node, &headers, &peer);
    if let Err(refusal) = node.overload.check_connect(address) {
        return super::overload_response(&node, refusal);
    }
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
    if let Err(refusal) = node.overload.check_tenant(&principal.tenant) {
        return super::overload_response(&node, refusal);
    }
    let session = match super::open_http_session(
        &node,
        &principal,
        params.topics.as_deref(),
        params.region,
        node.config.limits.outbound_queue,
        true,
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

    let (tx, rx) = mpsc::channel::<SseEvent>(SSE_BUFFER);
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
/// queue overflows, the tenant loses its policy or the gateway drains.
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
    // Every event of the subscriptions up to this one was sent: where a
    // client told to reconnect resumes.
    let mut sent_up_to: Option<Cursor> = None;
    if let Some(raw) = raw_cursor {
        let c = Cursor::parse_lenient(&raw);
        match session
            .resume(c, None, usize::MAX, &mut ChannelSink { tx: &tx })
            .await
        {
            Ok(r) if r.stopped => {
                finish(&node, session).await;
                return;
            }
            Ok(r) => sent_up_to = r.last,
            Err(e) => {
                let m = ServerMessage::error(ErrorCode::HistoryUnavailable, e.to_string(), None);
                let _ = tx.send(control(&m)).await;
            }
        }
    }
    let resume_cursor =
        |session: &Session, sent: Option<Cursor>| sent.unwrap_or_else(|| session.live_cursor());
    let mut policy = node.policy_changes();
    let expiry = tokio::time::sleep(Duration::from_secs(
        expires_at
            .saturating_sub(jsonwebtoken::get_current_timestamp())
            .min(365 * 24 * 3600),
    ));
    tokio::pin!(expiry);
    let drain = {
        // Streams leave at spread-out times within the drain, as WebSockets do.
        let (node, conn) = (node.clone(), session.admission.id);
        async move {
            node.drained().await;
            if let Some(d) = node.drain_state() {
                tokio::time::sleep_until(d.deadline_for(conn)).await;
            }
        }
    };
    tokio::pin!(drain);
    loop {
        tokio::select! {
            biased;
            _ = tx.closed() => break,
            ev = session.next_live() => match ev {
                Ok(e) => {
                    if tx.send(event_message(&e)).await.is_err() { break }
                    if sent_up_to.is_none_or(|s| s.seq < e.id.seq) {
                        sent_up_to = Some(e.id);
                    }
                }
                Err(_overflowed) => {
                    let m = ServerMessage::Reconnect {
                        reason: ReconnectReason::SlowConsumer,
                        cursor: resume_cursor(&session, sent_up_to),
                    };
                    let _ = tx.try_send(control(&m));
                    break;
                }
            },
            _ = &mut expiry => {
                let m = ServerMessage::error(ErrorCode::TokenExpired, "token expired", None);
                let _ = tx.send(control(&m)).await;
                break;
            }
            Ok(()) = policy.changed() => match super::policy_changed(&mut session).await {
                PolicyChange::Unchanged => {}
                PolicyChange::Revoked(m) => {
                    let _ = tx.send(control(&m)).await;
                }
                PolicyChange::TenantRemoved(m) => {
                    let _ = tx.send(control(&m)).await;
                    let end = ServerMessage::error(ErrorCode::Forbidden, super::TENANT_REMOVED, None);
                    let _ = tx.send(control(&end)).await;
                    break;
                }
            },
            () = &mut drain => {
                let m = ServerMessage::Reconnect {
                    reason: ReconnectReason::Draining,
                    cursor: resume_cursor(&session, sent_up_to),
                };
                let _ = tx.send(control(&m)).await;
                break;
            }
        }
    }
    finish(&node, session).await;
}

async fn finish(node: &Node, session: Session) {
    node.metrics.sse_active.dec();
    session.close().await;
}
