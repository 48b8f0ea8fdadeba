//! The live console at `/console/`: a page that connects with a token,
//! subscribes to patterns, streams events with their metadata, publishes a
//! test event and shows presence. It is built on the JavaScript SDK
//! (`clients/js/src`), served beside it unchanged, so the console is also
//! the SDK's browser smoke test.
//!
//! Served when `console.enabled` says so (by default only in development
//! mode). In development mode `POST /console/token` mints development
//! tokens: the development secret is public anyway, so this adds no power,
//! and it is never served when keys are configured.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::auth::{DEV_SECRET, mint_hs256};
use crate::node::Node;
use crate::protocol::ErrorCode;

/// Lifetime of a development token minted by the console.
const DEV_TOKEN_SECONDS: u64 = 3600;

/// A file of the console or of the SDK, compiled into the binary.
struct Asset {
    path: &'static str,
    body: &'static str,
}

macro_rules! console {
    ($path:literal) => {
        Asset {
            path: $path,
            body: include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/console/", $path)),
        }
    };
}

macro_rules! sdk {
    ($path:literal) => {
        Asset {
            path: concat!("sdk/", $path),
            body: include_str!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../clients/js/src/",
                $path
            )),
        }
    };
}

/// Every file served under `/console/` (a test checks that the SDK's are all
/// of `clients/js/src`).
const ASSETS: &[Asset] = &[
    console!("index.html"),
    console!("console.js"),
    console!("console.css"),
    sdk!("index.js"),
    sdk!("client.js"),
    sdk!("backoff.js"),
    sdk!("dedup.js"),
    sdk!("emitter.js"),
    sdk!("errors.js"),
    sdk!("pattern.js"),
    sdk!("presence.js"),
    sdk!("shared.js"),
    sdk!("subscription.js"),
    sdk!("token.js"),
    sdk!("transports/types.js"),
    sdk!("transports/http.js"),
    sdk!("transports/websocket.js"),
    sdk!("transports/sse.js"),
    sdk!("transports/longpoll.js"),
];

/// The page's scripts, styles and connections come from this gateway only.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   connect-src 'self' ws: wss:; img-src 'self' data:; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// The console's routes, or none when it is not served.
pub fn router(node: &Node) -> Router<Arc<Node>> {
    if !node.config.console.served(node.verifier.dev_secret) {
        return Router::new();
    }
    Router::new()
        .route(
            "/console",
            get(|| async { axum::response::Redirect::permanent("/console/") }),
        )
        .route("/console/", get(|| async { asset("index.html") }))
        .route("/console/token", get(dev_mode).post(dev_token))
        .route(
            "/console/{*path}",
            get(|Path(p): Path<String>| async move { asset(&p) }),
        )
}

fn asset(path: &str) -> Response {
    let Some(a) = ASSETS.iter().find(|a| a.path == path) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let kind = match a.path.rsplit('.').next() {
        Some("html") => "text/html; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        _ => "text/javascript; charset=utf-8",
    };
    (
        [
            (header::CONTENT_TYPE, kind),
            (header::CONTENT_SECURITY_POLICY, CSP),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        a.body,
    )
        .into_response()
}

/// What the console asks for when it mints a development token.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    tenant: String,
    user: String,
    #[serde(default)]
    scopes: Vec<String>,
}

/// `GET /console/token`: 204 when the console can mint development tokens.
async fn dev_mode(State(node): State<Arc<Node>>) -> StatusCode {
    if node.verifier.dev_secret {
        StatusCode::NO_CONTENT
    } else {
        StatusCode::NOT_FOUND
    }
}

/// `POST /console/token`: a development token, in development mode only.
async fn dev_token(State(node): State<Arc<Node>>, body: Bytes) -> Response {
    if !node.verifier.dev_secret {
        return StatusCode::NOT_FOUND.into_response();
    }
    let req: TokenRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            return super::error_response(
                ErrorCode::MalformedBody,
                format!("expected {{\"tenant\", \"user\", \"scopes\"}}: {e}"),
            );
        }
    };
    let ttl = Duration::from_secs(DEV_TOKEN_SECONDS);
    match mint_hs256(DEV_SECRET, &req.tenant, &req.user, &req.scopes, ttl) {
        Ok(token) => {
            Json(json!({ "token": token, "expires_in": DEV_TOKEN_SECONDS })).into_response()
        }
        Err(e) => super::error_response(ErrorCode::InvalidRequest, e),
    }
}

#[cfg(test)]
mod tests {
    use super::ASSETS;

    /// Every SDK module is served, so the console's imports resolve.
    #[test]
    fn every_sdk_module_is_served() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../clients/js/src");
        let mut found = Vec::new();
        let mut dirs = vec![root.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).expect("clients/js/src") {
                let path = entry.expect("entry").path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "js") {
                    let rel = path.strip_prefix(&root).expect("under root");
                    found.push(format!("sdk/{}", rel.to_string_lossy().replace('\\', "/")));
                }
            }
        }
        found.sort();
        let mut served: Vec<String> = ASSETS
            .iter()
            .filter(|a| a.path.starts_with("sdk/"))
            .map(|a| a.path.to_owned())
            .collect();
        served.sort();
        assert_eq!(served, found);
    }
}
