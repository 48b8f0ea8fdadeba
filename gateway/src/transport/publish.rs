//! The publish API for backends: `POST /api/realtime/publish/`.
//!
//! Body: one event `{event_type, data, company_id | tenant, region?,
//! gdpr_context?, idempotency_key?}` or a batch `{"events": [...]}`.
//! Answer: `{event_id, cursor, duplicate, timestamp}` (or `{"results": [...]}`
//! for a batch, one entry per event, in order).

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};
use tracing::Instrument;

use crate::broker::Published;
use crate::node::{Node, PublishError, PublishRequest};
use crate::protocol::ErrorCode;

/// Most events in one batch.
pub const MAX_BATCH: usize = 1000;

fn published_json(p: &Published) -> Value {
    json!({
        "event_id": p.event.id.to_string(),
        "cursor": p.event.id.to_string(),
        "event_type": p.event.topic.as_str(),
        "duplicate": p.duplicate,
        "timestamp": crate::protocol::now_rfc3339(),
    })
}

pub(crate) fn error_code(e: &PublishError) -> ErrorCode {
    match e {
        PublishError::NotPublisher | PublishError::WrongTenant(_) | PublishError::Denied(_) => {
            ErrorCode::Forbidden
        }
        PublishError::InvalidTenant(_)
        | PublishError::InvalidCompanyId(_)
        | PublishError::InvalidRegion(_)
        | PublishError::InvalidMessageType(_)
        | PublishError::InvalidGdprContext(_) => ErrorCode::InvalidRequest,
        PublishError::SubjectErased => ErrorCode::DataSubjectErased,
        PublishError::NotResident { .. } => ErrorCode::ResidencyViolation,
        PublishError::InvalidTopic(_) => ErrorCode::InvalidTopic,
        PublishError::TooLarge { .. } => ErrorCode::MessageTooLarge,
        PublishError::Broker(_) => ErrorCode::BusUnavailable,
    }
}

/// `POST /api/realtime/publish/`: one event or a batch.
pub async fn publish(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => {
            node.metrics.error("publish");
            return super::body_rejected(r);
        }
    };
    let span = tracing::info_span!(
        "publish",
        otel.kind = "server",
        http.route = "/api/realtime/publish/",
        http.response.status_code = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    // The caller's W3C trace context, when it sent one.
    let traceparent = headers.get("traceparent").and_then(|v| v.to_str().ok());
    crate::telemetry::adopt(&span, traceparent);
    if let Some(id) = crate::telemetry::trace_id(&span) {
        span.record("trace_id", id);
    }
    let response = publish_inner(node, headers, body)
        .instrument(span.clone())
        .await;
    span.record(
        "http.response.status_code",
        i64::from(response.status().as_u16()),
    );
    response
}

async fn publish_inner(node: Arc<Node>, headers: HeaderMap, body: Bytes) -> Response {
    let principal = match super::authenticate(&node, &headers, None, None).await {
        Ok(p) => p,
        Err(e) => return super::unauthorized(&node, "publish", &e),
    };
    let body: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            node.metrics.error("publish");
            return super::error_response(
                ErrorCode::MalformedBody,
                format!("body is not JSON: {e}"),
            );
        }
    };
    let batch = match body.get("events") {
        Some(Value::Array(items)) => Some(items.clone()),
        Some(_) => {
            return super::error_response(ErrorCode::MalformedBody, "'events' must be a list");
        }
        None => None,
    };
    match batch {
        None => match one(&node, &principal, body).await {
            Ok(p) => {
                let status = if p.duplicate {
                    StatusCode::OK
                } else {
                    StatusCode::CREATED
                };
                (status, axum::Json(published_json(&p))).into_response()
            }
            Err((code, message)) => {
                node.metrics.error("publish");
                super::error_response(code, message)
            }
        },
        Some(items) if items.len() > MAX_BATCH => super::error_response(
            ErrorCode::BatchTooLarge,
            format!("a batch holds at most {MAX_BATCH} events"),
        ),
        Some(items) => {
            // Each event stands alone: one refused event does not stop the rest.
            let mut results = Vec::with_capacity(items.len());
            for item in items {
                results.push(match one(&node, &principal, item).await {
                    Ok(p) => published_json(&p),
                    Err((code, message)) => {
                        node.metrics.error("publish");
                        json!({ "error": { "code": code, "message": message, "status": code.status().as_u16() } })
                    }
                });
            }
            (StatusCode::OK, axum::Json(json!({ "results": results }))).into_response()
        }
    }
}

async fn one(
    node: &Node,
    principal: &crate::auth::Principal,
    body: Value,
) -> Result<Published, (ErrorCode, String)> {
    let req: PublishRequest = serde_json::from_value(body)
        .map_err(|e| (ErrorCode::MalformedBody, format!("invalid event: {e}")))?;
    node.publish(principal, req)
        .await
        .map_err(|e| (error_code(&e), e.to_string()))
}
