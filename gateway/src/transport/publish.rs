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
    publish_values(node, principal, vec![body])
        .await
        .pop()
        .unwrap_or_else(missing)
}

type Item<T> = Result<T, (ErrorCode, String)>;

/// What one body holds: its events (each parsed or refused), or a refusal.
enum Planned<T> {
    One(Item<T>),
    Batch(Vec<Item<T>>),
    Refused(ErrorCode, String),
}

impl<T> Planned<T> {
    fn map<U>(self, mut f: impl FnMut(Item<T>) -> Item<U>) -> Planned<U> {
        match self {
            Planned::One(item) => Planned::One(f(item)),
            Planned::Batch(items) => Planned::Batch(items.into_iter().map(f).collect()),
            Planned::Refused(code, message) => Planned::Refused(code, message),
        }
    }
}

fn missing() -> Outcome {
    Outcome::Refused(
        ErrorCode::BusUnavailable,
        "no answer from the broker".into(),
    )
}

/// Publish several bodies (each an event or a batch), one outcome per
/// body, in order. Their events are handed to the broker together, in
/// order (in cluster mode all in flight to JetStream at once), and fanned
/// out as one burst (one wake-up per connection).
pub(crate) async fn publish_values(
    node: &Node,
    principal: &Principal,
    bodies: Vec<Value>,
) -> Vec<Outcome> {
    let mut requests = Vec::new();
    let plans: Vec<Planned<()>> = bodies
        .into_iter()
        .map(|body| {
            plan(body).map(|item| {
                item.map(|req| {
                    requests.push(req);
                })
            })
        })
        .collect();
    let mut published = crate::mailbox::hold_wakes(node.publish_many(principal, requests))
        .await
        .into_iter();
    // Each event stands alone: one refused event does not stop the rest.
    let outcomes: Vec<Planned<Published>> = plans
        .into_iter()
        .map(|p| {
            p.map(|item| {
                item.and_then(|()| match published.next() {
                    Some(Ok(p)) => Ok(p),
                    Some(Err(e)) => Err((error_code(&e), e.to_string())),
                    None => Err((
                        ErrorCode::BusUnavailable,
                        "no answer from the broker".into(),
                    )),
                })
            })
        })
        .collect();
    outcomes
        .into_iter()
        .map(|p| match p {
            Planned::Refused(code, message) => {
                node.metrics.error("publish");
                Outcome::Refused(code, message)
            }
            Planned::One(Ok(p)) => Outcome::One(p),
            Planned::One(Err((code, message))) => {
                node.metrics.error("publish");
                Outcome::Refused(code, message)
            }
            Planned::Batch(items) => Outcome::Batch(
                items
                    .into_iter()
                    .map(|item| match item {
                        Ok(p) => published_json(&p),
                        Err((code, message)) => {
                            node.metrics.error("publish");
                            error_json(code, message)
                        }
                    })
                    .collect(),
            ),
        })
        .collect()
}

fn plan(body: Value) -> Planned<PublishRequest> {
    match body {
        Value::Object(mut fields) => match fields.remove("events") {
            Some(Value::Array(items)) if items.len() > MAX_BATCH => Planned::Refused(
                ErrorCode::BatchTooLarge,
                format!("a batch holds at most {MAX_BATCH} events"),
            ),
            Some(Value::Array(items)) => Planned::Batch(items.into_iter().map(request).collect()),
            Some(_) => Planned::Refused(ErrorCode::MalformedBody, "'events' must be a list".into()),
            None => Planned::One(request(Value::Object(fields))),
        },
        _ => Planned::Refused(
            ErrorCode::MalformedBody,
            "the body must be a JSON object".into(),
        ),
    }
}

fn request(body: Value) -> Item<PublishRequest> {
    serde_json::from_value(body)
        .map_err(|e| (ErrorCode::MalformedBody, format!("invalid event: {e}")))
}

/// A refused event's entry in a batch's results (and a stream's answer).
pub(crate) fn error_json(code: ErrorCode, message: String) -> Value {
    json!({ "error": { "code": code, "message": message, "status": code.status().as_u16() } })
}
