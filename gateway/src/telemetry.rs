//! Logs, traces and trace-context propagation.
//!
//! Logs go to stderr (text or JSON). Traces are exported over OTLP (gRPC or
//! HTTP) when an endpoint is configured (or `OTEL_EXPORTER_OTLP_ENDPOINT` is
//! set). The W3C `traceparent` travels with every event: from the publish
//! request, through NATS headers, to the fan-out on every gateway, so one
//! publish and its deliveries in every region are one trace.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use switchboard_config::{GatewayConfig, LogFormat, OtlpProtocol};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the tracer provider alive; flushes spans on drop.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

fn provider(config: &GatewayConfig) -> anyhow::Result<Option<SdkTracerProvider>> {
    let t = &config.telemetry;
    let Some(endpoint) = t
        .otlp_endpoint
        .clone()
        .or_else(|| env("OTEL_EXPORTER_OTLP_ENDPOINT"))
    else {
        return Ok(None);
    };
    let headers: HashMap<String, String> = t.otlp_headers.clone().into_iter().collect();
    let exporter = match t.otlp_protocol {
        OtlpProtocol::Grpc => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            for (k, v) in &headers {
                if let (Ok(k), Ok(v)) = (
                    tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
                    tonic::metadata::MetadataValue::try_from(v.as_str()),
                ) {
                    metadata.insert(k, v);
                }
            }
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_metadata(metadata)
                .build()?
        }
        OtlpProtocol::HttpProtobuf => {
            let url = if endpoint.ends_with("/v1/traces") {
                endpoint
            } else {
                format!("{}/v1/traces", endpoint.trim_end_matches('/'))
            };
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(url)
                .with_headers(headers)
                .build()?
        }
    };
    let ratio = env("OTEL_TRACES_SAMPLER_ARG")
        .and_then(|v| v.parse().ok())
        .unwrap_or(t.sampling_ratio);
    let service = env("OTEL_SERVICE_NAME").unwrap_or_else(|| t.service_name.clone());
    let mut attributes = vec![KeyValue::new("switchboard.region", config.region.clone())];
    if let Some(pod) = env("POD_NAME").or_else(|| env("HOSTNAME")) {
        attributes.push(KeyValue::new("k8s.pod.name", pod));
    }
    attributes.extend(
        t.resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
    );
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(service)
        .with_attributes(attributes)
        .build();
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ratio,
            ))))
            .with_resource(resource)
            .build(),
    ))
}

/// Install logging (and tracing export when configured) for this process.
pub fn init(config: &GatewayConfig) -> anyhow::Result<Telemetry> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let provider = provider(config)?;
    // Spans are exported whatever the log level (RUST_LOG only filters logs).
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("switchboard-gateway"))
            // No busy/idle time per span: it reads the clock and updates the
            // span on every poll of every connection task.
            .with_tracked_inactivity(false)
            .with_filter(
                tracing_subscriber::filter::Targets::new()
                    .with_target("switchboard_gateway", tracing::Level::INFO),
            )
    });
    let registry = tracing_subscriber::registry().with(otel);
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match config.log_format {
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_filter(filter),
            )
            .try_init()?,
        LogFormat::Text => registry.with(fmt.with_filter(filter)).try_init()?,
    }
    Ok(Telemetry { provider })
}

struct Carrier<'a>(&'a mut HashMap<String, String>);

impl Injector for Carrier<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

struct Source<'a>(&'a HashMap<String, String>);

impl Extractor for Source<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// The `traceparent` of a span, when it is part of a sampled trace.
pub fn traceparent(span: &tracing::Span) -> Option<String> {
    let cx = span.context();
    let mut map = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut Carrier(&mut map));
    map.remove("traceparent")
}

/// The context a `traceparent` (from HTTP or NATS headers) names.
pub fn context_from(traceparent: Option<&str>) -> Context {
    let mut map = HashMap::new();
    if let Some(tp) = traceparent {
        map.insert("traceparent".to_owned(), tp.to_owned());
    }
    TraceContextPropagator::new().extract(&Source(&map))
}

/// Make `span` a child of the remote context in `traceparent`, if any.
pub fn adopt(span: &tracing::Span, traceparent: Option<&str>) {
    if traceparent.is_some() {
        let _ = span.set_parent(context_from(traceparent));
    }
}

/// The trace id of a span, for log lines (`None` when not traced).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}
