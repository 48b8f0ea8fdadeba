//! The erase API: `POST /api/realtime/erase/` with
//! `{data_subject_id, tenant?, block_seconds?, lift_block?}` and a token
//! carrying the erase scope (or `platform`). Answers the erasure record:
//! what was erased in each region, whether every region was reached, and
//! until when publishes for the subject are refused.

use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::data_protection::ErasureState;
use crate::erasure::{EraseError, EraseRequest};
use crate::node::Node;
use crate::protocol::ErrorCode;

/// `POST /api/realtime/erase/`.
pub async fn erase(
    State(node): State<Arc<Node>>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(r) => return super::body_rejected(r),
    };
    let principal = match super::authenticate(&node, &headers, None, None).await {
        Ok(p) => p,
        Err(e) => return super::unauthorized(&node, "erase", &e),
    };
    let req: EraseRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return super::error_response(
                ErrorCode::MalformedBody,
                format!("expected {{\"data_subject_id\": ...}}: {e}"),
            );
        }
    };
    match node.erase(&principal, req).await {
        Ok(job) => {
            let status = match job.state {
                ErasureState::Partial => StatusCode::ACCEPTED,
                _ => StatusCode::OK,
            };
            let body = json!({
                "erasure_id": job.id,
                "tenant": job.tenant,
                "data_subject_id": job.data_subject_id,
                "state": job.state,
                "erased": job.erased,
                "blocked_until": job.blocked_until_ms.map(|ms| {
                    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                        .map(crate::protocol::format_time)
                        .unwrap_or_default()
                }),
            });
            (status, axum::Json(body)).into_response()
        }
        Err(e) => {
            node.metrics.error("erase");
            let code = match &e {
                EraseError::NotAllowed(_) | EraseError::WrongTenant => ErrorCode::Forbidden,
                EraseError::Invalid(_) => ErrorCode::InvalidRequest,
                EraseError::Broker(_) => ErrorCode::BusUnavailable,
            };
            super::error_response(code, e.to_string())
        }
    }
}
