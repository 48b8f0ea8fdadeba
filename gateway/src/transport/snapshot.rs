//! Snapshots: `GET /api/realtime/snapshot/?topics=a.*,b&company_id=&region=`.
//!
//! The newest retained event of each topic the patterns match (the last
//! value), for a client refreshing its state (seed 002's snapshot refresh,
//! class C's fallback). In cluster mode it is read from the region's
//! JetStream stream (last message per subject), so every gateway answers
//! the same. The answer's `cursor` continues after it: a long-poll or SSE
//! stream from that cursor misses nothing published since.

use std::sync::Arc;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use serde::Deserialize;
use serde_json::json;

use crate::node::Node;
use crate::protocol::{ErrorCode, now_rfc3339};

/// Most topics in one answer.
pub const MAX_TOPICS: usize = 1000;

#[derive(Debug, Deserialize)]
/// Query parameters of a snapshot.
pub struct SnapshotParams {
    topics: Option<String>,
    company_id: Option<String>,
    token: Option<String>,
    region: Option<String>,
    limit: Option<String>,
}

/// `GET /api/realtime/snapshot/`.
pub async fn snapshot(
    State(node): State<Arc<Node>>,
    super::JsonQuery(params): super::JsonQuery<SnapshotParams>,
    headers: HeaderMap,
) -> Response {
    match snapshot_inner(&node, params, &headers).await {
        Ok(r) | Err(r) => r,
    }
}

async fn snapshot_inner(
    node: &Arc<Node>,
    params: SnapshotParams,
    headers: &HeaderMap,
) -> Result<Response, Response> {
    let principal = super::authenticate(
        node,
        headers,
        params.token.as_deref(),
        params.company_id.as_deref(),
    )
    .await
    .map_err(|e| super::unauthorized(node, "snapshot", &e))?;
    let limit = match params.limit.as_deref().map(str::parse::<usize>) {
        None => MAX_TOPICS,
        Some(Ok(n)) if (1..=MAX_TOPICS).contains(&n) => n,
        Some(_) => {
            node.metrics.error("snapshot");
            return Err(super::error_response(
                ErrorCode::InvalidQuery,
                format!("limit must be a whole number from 1 to {MAX_TOPICS}"),
            ));
        }
    };
    let session = super::open_http_session(
        node,
        &principal,
        params.topics.as_deref(),
        params.region,
        1,
        false,
    )
    .await
    .inspect_err(|_| node.metrics.error("snapshot"))?;
    let latest = session.snapshot(None, limit).await;
    let cursor = session.live_cursor();
    session.close().await;
    let latest = latest.map_err(|e| {
        node.metrics.error("history");
        super::error_response(ErrorCode::HistoryUnavailable, e)
    })?;
    Ok(super::longpoll::events_answer(
        &latest.events,
        &json!({
            "cursor": cursor.to_string(),
            "has_more": latest.more,
            "timestamp": now_rfc3339(),
        }),
    ))
}
