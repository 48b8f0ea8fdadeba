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

use crate::auth::Principal;
use crate::broker::Published;
use crate::node::{Node, PublishError, PublishRequest};
use crate::protocol::ErrorCode;

/// Most events in one batch.
pub const MAX_BATCH: usize = 1000;

pub(crate) fn published_json(p: &Published) -> Value {
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
    match publish_value(&node, &principal, body).await {
        Outcome::One(p) => {
            let status = if p.duplicate {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            (status, axum::Json(published_json(&p))).into_response()
        }
        Outcome::Batch(results) => {
            (StatusCode::OK, axum::Json(json!({ "results": results }))).into_response()
        }
        Outcome::Refused(code, message) => super::error_response(code, message),
    }
}

/// What one publish body (one event or a batch) came to.
pub(crate) enum Outcome {
    /// One event, published (or a duplicate of one).
    One(Published),
    /// A batch: one answer per event, in order (published or an error).
    Batch(Vec<Value>),
    /// Nothing was published.
    Refused(ErrorCode, String),
}

/// Publish one body: an event or `{"events": [...]}`. A batch's events are
/// fanned out as one burst (one wake-up per connection).
pub(crate) async fn publish_value(node: &Node, principal: &Principal, body: Value) -> Outcome {
    let items = match body {
        Value::Object(mut fields) => match fields.remove("events") {
            Some(Value::Array(items)) => items,
            Some(_) => {
                node.metrics.error("publish");
                return Outcome::Refused(
                    ErrorCode::MalformedBody,
                    "'events' must be a list".into(),
                );
            }
            None => {
                return match one(node, principal, Value::Object(fields)).await {
                    Ok(p) => Outcome::One(p),
                    Err((code, message)) => {
                        node.metrics.error("publish");
                        Outcome::Refused(code, message)
                    }
                };
            }
        },
        _ => {
            node.metrics.error("publish");
            return Outcome::Refused(
                ErrorCode::MalformedBody,
                "the body must be a JSON object".into(),
            );
        }
    };
    if items.len() > MAX_BATCH {
        node.metrics.error("publish");
        return Outcome::Refused(
            ErrorCode::BatchTooLarge,
            format!("a batch holds at most {MAX_BATCH} events"),
        );
    }
    // Each event stands alone: one refused event does not stop the rest.
    let results = crate::mailbox::hold_wakes(async {
        let mut results = Vec::with_capacity(items.len());
        for item in items {
            results.push(match one(node, principal, item).await {
                Ok(p) => published_json(&p),
                Err((code, message)) => {
                    node.metrics.error("publish");
                    error_json(code, message)
                }
            });
        }
        results
    })
    .await;
    Outcome::Batch(results)
}

/// A refused event's entry in a batch's results (and a stream's answer).
pub(crate) fn error_json(code: ErrorCode, message: String) -> Value {
    json!({ "error": { "code": code, "message": message, "status": code.status().as_u16() } })
}

async fn one(
    node: &Node,
    principal: &Principal,
    body: Value,
) -> Result<Published, (ErrorCode, String)> {
    let req: PublishRequest = serde_json::from_value(body)
        .map_err(|e| (ErrorCode::MalformedBody, format!("invalid event: {e}")))?;
    node.publish(principal, req)
        .await
        .map_err(|e| (error_code(&e), e.to_string()))
}
