//! An in-process OTLP trace receiver speaking both OTLP/gRPC and OTLP/HTTP
//! (protobuf) (no collector binary exists on the test machines): gateways
//! export to it and tests read the spans back, with their attribute types
//! and the headers each export came with.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::HeaderMap;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// An attribute value as it arrived, type included.
#[derive(Debug, Clone, PartialEq)]
pub enum Attr {
    Str(String),
    Int(i64),
    Bool(bool),
    Double(f64),
    Other(String),
}

impl std::fmt::Display for Attr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attr::Str(s) | Attr::Other(s) => f.write_str(s),
            Attr::Int(i) => write!(f, "{i}"),
            Attr::Bool(b) => write!(f, "{b}"),
            Attr::Double(d) => write!(f, "{d}"),
        }
    }
}

/// Which door an export came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Via {
    Grpc,
    Http,
}

/// One received span, flattened.
#[derive(Debug, Clone)]
pub struct Span {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// Attribute values as text (for equality checks on values).
    pub attributes: HashMap<String, String>,
    /// Attribute values with their OTLP type.
    pub typed: HashMap<String, Attr>,
    /// Resource attributes of the process that exported it.
    pub resource: HashMap<String, String>,
    pub via: Via,
    /// Headers (gRPC metadata) of the export request that carried it.
    pub headers: HashMap<String, String>,
    /// The HTTP path it was posted to (`""` for gRPC).
    pub path: String,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn typed(kvs: &[KeyValue]) -> HashMap<String, Attr> {
    kvs.iter()
        .map(|kv| {
            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(AnyValue::StringValue(s)) => Attr::Str(s.clone()),
                Some(AnyValue::IntValue(i)) => Attr::Int(*i),
                Some(AnyValue::BoolValue(b)) => Attr::Bool(*b),
                Some(AnyValue::DoubleValue(d)) => Attr::Double(*d),
                other => Attr::Other(format!("{other:?}")),
            };
            (kv.key.clone(), v)
        })
        .collect()
}

fn text(attrs: &HashMap<String, Attr>) -> HashMap<String, String> {
    attrs
        .iter()
        .map(|(k, v)| (k.clone(), v.to_string()))
        .collect()
}

#[derive(Clone, Default)]
struct Sink(Arc<Mutex<Vec<Span>>>);

impl Sink {
    fn take(
        &self,
        req: ExportTraceServiceRequest,
        via: Via,
        headers: HashMap<String, String>,
        path: &str,
    ) {
        let mut out = self.0.lock().unwrap();
        for rs in req.resource_spans {
            let resource = rs
                .resource
                .map(|r| text(&typed(&r.attributes)))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let t = typed(&s.attributes);
                    out.push(Span {
                        name: s.name,
                        trace_id: hex(&s.trace_id),
                        span_id: hex(&s.span_id),
                        parent_span_id: hex(&s.parent_span_id),
                        attributes: text(&t),
                        typed: t,
                        resource: resource.clone(),
                        via,
                        headers: headers.clone(),
                        path: path.to_owned(),
                    });
                }
            }
        }
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let headers = request
            .metadata()
            .clone()
            .into_headers()
            .iter()
            .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
            .collect();
        self.take(request.into_inner(), Via::Grpc, headers, "");
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

async fn http_export(
    axum::extract::State(sink): axum::extract::State<Sink>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let is_protobuf = headers
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-protobuf"));
    if !is_protobuf {
        return (
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "protobuf only",
        )
            .into_response();
    }
    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            "not an ExportTraceServiceRequest",
        )
            .into_response();
    };
    let headers = headers
        .iter()
        .filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned())))
        .collect();
    sink.take(req, Via::Http, headers, uri.path());
    (
        [("content-type", "application/x-protobuf")],
        ExportTraceServiceResponse {
            partial_success: None,
        }
        .encode_to_vec(),
    )
        .into_response()
}

pub struct Receiver {
    /// The OTLP/gRPC listener.
    pub addr: SocketAddr,
    /// The OTLP/HTTP listener (any path is accepted and recorded).
    pub http_addr: SocketAddr,
    spans: Arc<Mutex<Vec<Span>>>,
}

impl Receiver {
    pub async fn start() -> Self {
        let sink = Sink::default();
        let spans = sink.0.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(sink.clone()))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
        );
        let http = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let http_addr = http.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(axum::routing::post(http_export))
            .with_state(sink);
        tokio::spawn(async move { axum::serve(http, app).await });
        Self {
            addr,
            http_addr,
            spans,
        }
    }

    /// The OTLP/gRPC endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The OTLP/HTTP base endpoint (exporters append `/v1/traces`).
    pub fn http_endpoint(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    pub fn spans(&self) -> Vec<Span> {
        self.spans.lock().unwrap().clone()
    }
}
