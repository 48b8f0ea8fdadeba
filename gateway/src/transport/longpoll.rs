//! Long-polling: `GET /api/realtime/poll/?topics=a,b&cursor=&timeout=&company_id=`.
//!
//! With a cursor, answers at once with what is stored after it. Otherwise
//! (or when nothing is), waits up to `timeout` seconds (default 30, max 60)
//! for the first matching event. The answer always carries a `cursor` that
//! resumes exactly after what it returned, even when it returned nothing.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use crate::event::{Cursor, Event, EventKind};
use crate::node::Node;
use crate::protocol::{ErrorCode, now_rfc3339};
use crate::session::ResumeSink;

/// A replay gathered into the answer (at most [`MAX_EVENTS`]).
struct Collect(Vec<Arc<Event>>);

impl ResumeSink for Collect {
    async fn gap(&mut self, _: crate::broker::GapReason, _: &str) -> bool {
        true // reported in the answer's `resume_gap`
    }

    async fn event(&mut self, event: &Arc<Event>) -> bool {
        self.0.push(event.clone());
        true
    }
}

/// Most events in one answer.
pub const MAX_EVENTS: usize = 500;

#[derive(Debug, Deserialize)]
/// Query parameters of a long-poll.
pub struct PollParams {
    topics: Option<String>,
    cursor: Option<String>,
    timeout: Option<String>,
    company_id: Option<String>,
    token: Option<String>,
    region: Option<String>,
}

/// `GET /api/realtime/poll/`.
pub async fn poll(
    State(node): State<Arc<Node>>,
    super::JsonQuery(params): super::JsonQuery<PollParams>,
    headers: HeaderMap,
) -> Response {
    node.metrics.longpoll_requests.inc();
    if node.overload.saturated() {
        return super::overload_response(&node, crate::overload::Refusal::Saturated);
    }
    match poll_inner(&node, params, &headers).await {
        Ok(r) => r,
        Err(r) => {
            node.metrics.error("longpoll");
            r
        }
    }
}

async fn poll_inner(
    node: &Arc<Node>,
    params: PollParams,
    headers: &HeaderMap,
) -> Result<Response, Response> {
    let principal = super::authenticate(
        node,
        headers,
        params.token.as_deref(),
        params.company_id.as_deref(),
    )
    .await
    .map_err(|e| super::unauthorized(node, "longpoll", &e))?;
    let timeout = match params.timeout.as_deref().map(str::parse::<f64>) {
        None => 30.0,
        Some(Ok(t)) if t.is_finite() && t >= 0.0 => t.min(60.0),
        Some(_) => {
            return Err(super::error_response(
                ErrorCode::InvalidTimeout,
                "timeout must be a number of seconds between 0 and 60",
            ));
        }
    };
    let cursor_param = params.cursor.as_deref().filter(|c| !c.is_empty());
    let cursor = cursor_param.map(Cursor::parse_lenient);
    let mut session = super::open_http_session(
        node,
        &principal,
        params.topics.as_deref(),
        params.region,
        MAX_EVENTS,
        false,
    )
    .await?;

    let mut sink = Collect(Vec::new());
    let mut gap = None;
    let mut has_more = false;
    if let Some(c) = cursor {
        let r = session
            .resume(c, None, MAX_EVENTS, &mut sink)
            .await
            .map_err(|e| super::error_response(ErrorCode::HistoryUnavailable, e))?;
        gap = r.gap.map(|g| g.as_str());
        has_more = r.truncated;
    }
    let mut events = sink.0;
    if events.is_empty() && !has_more {
        let mut policy = node.policy_changes();
        let mut policy_changed = false;
        let wait = async {
            // A request that overflowed just answers with what it has: the
            // client's next poll resumes from the cursor.
            // Notices (`data.erased`) are live-only messages of the
            // streaming transports: an answer carries stored events only.
            while let Ok(first) = session.next_live().await {
                if first.kind != EventKind::Stored {
                    continue;
                }
                events.push(first);
                while events.len() < MAX_EVENTS {
                    match session.try_next_live() {
                        Ok(Some(e)) if e.kind != EventKind::Stored => {}
                        Ok(Some(e)) => events.push(e),
                        _ => break,
                    }
                }
                break;
            }
        };
        tokio::select! {
            _ = wait => {}
            _ = tokio::time::sleep(Duration::from_secs_f64(timeout)) => {}
            _ = node.drained() => {}
            Ok(()) = policy.changed() => policy_changed = true,
        }
        // Live events only: the resume counted what it replayed.
        node.metrics.events_delivered.inc_by(events.len() as u64);
        // The same as the streaming transports: a tenant without a policy
        // is refused; withdrawn patterns end the wait (the next poll is
        // told which).
        if policy_changed
            && let super::PolicyChange::TenantRemoved(_) = super::policy_changed(&mut session).await
        {
            session.close().await;
            return Err(super::error_response(
                ErrorCode::Forbidden,
                super::TENANT_REMOVED,
            ));
        }
    }
    let next = events
        .last()
        .map_or_else(|| session.live_cursor(), |e| e.id);
    session.close().await;
    let mut tail = json!({
        "cursor": next.to_string(),
        "timestamp": now_rfc3339(),
        "has_more": has_more,
    });
    if let (Some(reason), Some(obj)) = (gap, tail.as_object_mut()) {
        obj.insert(
            "resume_gap".into(),
            json!({ "reason": reason, "requested": cursor_param.unwrap_or_default().chars().take(64).collect::<String>() }),
        );
    }
    Ok(events_answer(&events, &tail))
}

/// `{"events": [...], <tail's fields>}` with status 200. Envelopes are
/// already JSON: spliced in rather than re-encoded.
pub(super) fn events_answer(events: &[Arc<Event>], tail: &serde_json::Value) -> Response {
    let tail = tail.to_string();
    let mut body = String::with_capacity(
        events.iter().map(|e| e.envelope.len() + 1).sum::<usize>() + tail.len() + 16,
    );
    body.push_str(r#"{"events":["#);
    for (i, e) in events.iter().enumerate() {
        if i > 0 {
            body.push(',');
        }
        body.push_str(&e.envelope);
    }
    body.push(']');
    if tail.len() > 2 {
        body.push(',');
        body.push_str(&tail[1..]);
    } else {
        body.push('}');
    }
    (
        StatusCode::OK,
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Most events in one answer of seed 002's poll.
pub const SEED002_MAX_LIMIT: usize = 500;

#[derive(Debug, Deserialize)]
/// Query parameters of seed 002's poll.
pub struct Seed002Params {
    #[serde(rename = "lastEventId")]
    last_event_id: Option<String>,
    limit: Option<String>,
    topics: Option<String>,
    token: Option<String>,
}

/// `GET /api/events/poll?lastEventId=&limit=` with `X-Tenant-ID` (seed 002's
/// class B fallback): the events after `lastEventId`, answered at once as
/// `{events, hasMore, nextEventId}`. Without `topics`, every topic the
/// tenant's policy lets it subscribe to.
pub async fn seed002_poll(
    State(node): State<Arc<Node>>,
    super::JsonQuery(params): super::JsonQuery<Seed002Params>,
    headers: HeaderMap,
) -> Response {
    node.metrics.longpoll_requests.inc();
    match seed002_inner(&node, params, &headers).await {
        Ok(r) => r,
        Err(r) => {
            node.metrics.error("longpoll");
            r
        }
    }
}

async fn seed002_inner(
    node: &Arc<Node>,
    params: Seed002Params,
    headers: &HeaderMap,
) -> Result<Response, Response> {
    let tenant_header = match headers.get_all("x-tenant-id").iter().collect::<Vec<_>>()[..] {
        [] => None,
        [one] => Some(one.to_str().map_err(|_| {
            super::error_response(
                ErrorCode::InvalidRequest,
                "X-Tenant-ID must be visible ASCII",
            )
        })?),
        _ => {
            return Err(super::error_response(
                ErrorCode::InvalidRequest,
                "X-Tenant-ID given more than once",
            ));
        }
    };
    let principal = super::authenticate(node, headers, params.token.as_deref(), tenant_header)
        .await
        .map_err(|e| super::unauthorized(node, "longpoll", &e))?;
    let limit = match params.limit.as_deref().map(str::parse::<usize>) {
        None => 100,
        Some(Ok(n)) if (1..=SEED002_MAX_LIMIT).contains(&n) => n,
        Some(_) => {
            return Err(super::error_response(
                ErrorCode::InvalidQuery,
                format!("limit must be a whole number from 1 to {SEED002_MAX_LIMIT}"),
            ));
        }
    };
    let topics = match params.topics {
        Some(t) => t,
        None => node
            .policy()
            .subscribable(&principal.tenant)
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(","),
    };
    let session =
        super::open_http_session(node, &principal, Some(&topics), None, limit, false).await?;
    let mut sink = Collect(Vec::new());
    let mut has_more = false;
    if let Some(c) = params.last_event_id.as_deref().filter(|c| !c.is_empty()) {
        let r = session
            .resume(Cursor::parse_lenient(c), None, limit, &mut sink)
            .await
            .map_err(|e| super::error_response(ErrorCode::HistoryUnavailable, e))?;
        has_more = r.truncated;
    }
    let events = sink.0;
    let next = events
        .last()
        .map_or_else(|| session.live_cursor(), |e| e.id);
    session.close().await;
    Ok(events_answer(
        &events,
        &json!({ "hasMore": has_more, "nextEventId": next.to_string() }),
    ))
}
