//! The HTTP surface: `app(node)` is what clients reach (WebSocket, SSE,
//! long-poll, publish, the seed health answer); `admin_app(node)` is the
//! admin listener (`/metrics`, `/healthz`, `/readyz`), kept off the client
//! port. `run` serves both until a drain completes.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use serde_json::json;
use switchboard_config::{Readiness, ReadyState};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::metrics::ExpositionFormat;
use crate::node::{Drain, Node};
use crate::protocol::now_rfc3339;
use crate::transport::{erase, longpoll, publish, publish_stream, snapshot, sse, ws};

/// The public router: WebSocket, SSE, long-poll, publish, health.
pub fn app(node: Arc<Node>) -> Router {
    let body_limit = crate::transport::max_publish_body(&node);
    let socketio = if node.config.socketio.enabled {
        crate::transport::socketio::router(
            crate::transport::socketio::gateway::engine(&node),
            "/socket.io",
        )
    } else {
        Router::new()
    };
    Router::new()
        .merge(socketio)
        .merge(crate::transport::console::router(&node))
        .route("/ws", get(ws::upgrade))
        .route("/ws/", get(ws::upgrade))
        .route("/api/realtime/poll/", get(longpoll::poll))
        .route("/api/realtime/poll", get(longpoll::poll))
        .route("/api/events/poll", get(longpoll::seed002_poll))
        .route("/api/realtime/sse/", get(sse::stream))
        .route("/api/realtime/sse", get(sse::stream))
        .route("/api/realtime/snapshot/", get(snapshot::snapshot))
        .route("/api/realtime/snapshot", get(snapshot::snapshot))
        .route("/api/realtime/publish/", post(publish::publish))
        .route("/api/realtime/publish", post(publish::publish))
        .route("/api/realtime/publish/stream", get(publish_stream::upgrade))
        .route("/api/realtime/erase/", post(erase::erase))
        .route("/api/realtime/erase", post(erase::erase))
        .route("/api/realtime/health/", get(health))
        .route("/api/realtime/health", get(health))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(cors(&node.config.allowed_origins))
        .with_state(node)
}

/// The admin listener's routes: metrics and probes, never exposed to clients.
pub fn admin_app(node: Arc<Node>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(node)
}

fn cors(allowed: &[String]) -> CorsLayer {
    let origins = if allowed.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(allowed.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(origins)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::HeaderName::from_static("last-event-id"),
        ])
        .max_age(Duration::from_secs(600))
}

async fn health(State(node): State<Arc<Node>>) -> Response {
    let (bus_name, bus_ok) = node.broker.health();
    let status = if !bus_ok {
        "unhealthy"
    } else if node.draining() {
        "draining"
    } else {
        "healthy"
    };
    let code = if bus_ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let state = |ok: bool| if ok { "healthy" } else { "unhealthy" };
    (
        code,
        Json(json!({
            "status": status,
            "components": {
                bus_name: state(bus_ok),
                "history": state(bus_ok),
                "policy": "healthy",
            },
            "region": &*node.region,
            "connections": node.connection_count(),
            "timestamp": now_rfc3339(),
        })),
    )
        .into_response()
}

async fn healthz() -> &'static str {
    "ok"
}

/// 200 only when taking clients; the body names the state and the policy
/// bundle in force (the operator's `PolicyApplied` reads it).
async fn readyz(State(node): State<Arc<Node>>) -> Response {
    let state = if node.draining() {
        ReadyState::Draining
    } else if !node.broker.health().1 {
        ReadyState::EventBusUnavailable
    } else {
        ReadyState::Ready
    };
    let code = match state {
        ReadyState::Ready => StatusCode::OK,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let body = Readiness {
        state,
        policy: node.policy_digest(),
    };
    (code, Json(body)).into_response()
}

/// Prometheus text 0.0.4 unless the scraper asks for OpenMetrics (as
/// Prometheus does by default), which also carries exemplars.
async fn metrics(State(node): State<Arc<Node>>, headers: header::HeaderMap) -> Response {
    let accept = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = ExpositionFormat::negotiate(accept);
    (
        [(header::CONTENT_TYPE, format.content_type())],
        node.metrics.render(format),
    )
        .into_response()
}

/// Listen on `address` (`host:port`, the first address it resolves to)
/// with room for `backlog` connections the kernel has completed but the
/// gateway has not yet accepted. The standard library's listeners use 128:
/// a reconnect storm (a gateway's clients all arriving at another) fills
/// that in a moment, and every handshake past it is dropped and retried by
/// the client's kernel a second or more later.
pub async fn bind(address: &str, backlog: u32) -> std::io::Result<tokio::net::TcpListener> {
    let mut last = None;
    for addr in tokio::net::lookup_host(address).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        // As the standard library does: a restarted gateway may listen again
        // while its previous connections are in TIME_WAIT.
        socket.set_reuseaddr(true)?;
        match socket.bind(addr) {
            Ok(()) => return socket.listen(backlog),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{address} resolves to no address"),
        )
    }))
}

/// Serve until `stop` resolves, then drain: readiness turns false, new
/// connections are refused, open ones are told to reconnect spread over the
/// drain period, and the server returns once they are gone (or a grace
/// period after the drain period). The admin listener, when given, answers
/// until then (readiness is 503 during the drain).
pub async fn run(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    admin: Option<tokio::net::TcpListener>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let admin = admin.map(|l| {
        let app = admin_app(node.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, app).await {
                tracing::error!(error = %e, "admin listener failed");
            }
        })
    });
    let served = serve_clients(node, listener, stop).await;
    if let Some(task) = admin {
        task.abort();
    }
    served
}

async fn serve_clients(
    node: Arc<Node>,
    listener: tokio::net::TcpListener,
    stop: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let period = Duration::from_secs(node.config.drain_seconds);
    let drained = {
        let node = node.clone();
        async move {
            stop.await;
            tracing::info!(
                connections = node.connection_count(),
                drain_seconds = period.as_secs(),
                "draining"
            );
            node.start_drain(Drain {
                started: tokio::time::Instant::now(),
                period,
            });
            let deadline = tokio::time::Instant::now() + period + Duration::from_secs(5);
            while node.connection_count() > 0 && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tracing::info!(left = node.connection_count(), "drain complete");
        }
    };
    // No Nagle: the gateway batches its own writes, and a frame held back
    // waiting for an ACK (delayed up to 40 ms) is latency for nothing.
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "cannot set TCP_NODELAY");
        }
    });
    node.overload.start();
    axum::serve(
        listener,
        app(node).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(drained)
    .await
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
