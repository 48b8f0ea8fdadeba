//! Logs, traces and trace-context propagation.
//!
//! Logs go to stderr (text or JSON). Traces are exported over OTLP (gRPC or
//! HTTP/protobuf) when an endpoint is configured, in the config file or by
//! the OpenTelemetry SDK environment variables ([`TraceExport::resolve`]
//! says which wins). The W3C `traceparent` travels with every event: from
//! the publish request, through NATS headers, to the fan-out on every
//! gateway, so one publish and its deliveries in every region are one trace.

use std::collections::{BTreeMap, HashMap};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::resource::TelemetryResourceDetector;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use switchboard_config::{GatewayConfig, LogFormat, OtlpProtocol, TelemetryConfig};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::Layer;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] (or drop)
/// flushes what is still queued.
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Export every span still queued and stop the exporter. Called at the
    /// end of the drain; runs on a blocking thread because the batch
    /// processor waits for its own export thread.
    pub async fn shutdown(mut self) {
        if let Some(p) = self.provider.take() {
            let _ = tokio::task::spawn_blocking(move || {
                if let Err(e) = p.force_flush() {
                    tracing::warn!(error = %e, "flushing spans at shutdown");
                }
                let _ = p.shutdown();
            })
            .await;
        }
    }
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.force_flush();
            let _ = p.shutdown();
        }
    }
}

/// A configuration problem in telemetry settings (file or environment).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum TelemetryError {
    /// A setting with a value this gateway does not support.
    #[error("{name}={value:?} is not supported: {expected}")]
    Unsupported {
        /// The setting (an environment variable or config key).
        name: &'static str,
        /// The value given.
        value: String,
        /// What is supported.
        expected: &'static str,
    },
}

/// How new traces are sampled (the OpenTelemetry `OTEL_TRACES_SAMPLER` set).
#[derive(Debug, Clone, PartialEq)]
pub enum SamplerSpec {
    /// Every trace.
    AlwaysOn,
    /// No trace.
    AlwaysOff,
    /// A fraction of trace ids, 0 to 1.
    Ratio(f64),
    /// Follow a caller's sampling decision; use the inner sampler for roots.
    ParentBased(Box<SamplerSpec>),
}

impl SamplerSpec {
    fn build(&self) -> Sampler {
        match self {
            Self::AlwaysOn => Sampler::AlwaysOn,
            Self::AlwaysOff => Sampler::AlwaysOff,
            Self::Ratio(r) => Sampler::TraceIdRatioBased(*r),
            Self::ParentBased(root) => Sampler::ParentBased(Box::new(root.build())),
        }
    }
}

/// Where and how spans are exported: the config file's `telemetry` section
/// with the OpenTelemetry SDK environment applied.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceExport {
    /// OTLP transport.
    pub protocol: OtlpProtocol,
    /// The gRPC endpoint, or the full OTLP/HTTP traces URL.
    pub endpoint: String,
    /// Headers sent with every export (e.g. an API key).
    pub headers: BTreeMap<String, String>,
    /// How traces are sampled.
    pub sampler: SamplerSpec,
    /// `service.name`.
    pub service_name: String,
    /// More resource attributes.
    pub resource: BTreeMap<String, String>,
}

impl TraceExport {
    /// Resolve the export settings; `None` when nothing is to be exported.
    ///
    /// Precedence: the environment wins over the config file (the variables
    /// are what a platform, or the OpenTelemetry Operator, injects per
    /// deployment), and a signal-specific variable
    /// (`OTEL_EXPORTER_OTLP_TRACES_*`) over the generic one
    /// (`OTEL_EXPORTER_OTLP_*`). `OTEL_SDK_DISABLED=true` or
    /// `OTEL_TRACES_EXPORTER=none` turn export off whatever else is set.
    pub fn resolve(
        config: &TelemetryConfig,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Option<Self>, TelemetryError> {
        let env = |name: &str| {
            env(name)
                .map(|v| v.trim().to_owned())
                .filter(|v| !v.is_empty())
        };
        if env("OTEL_SDK_DISABLED").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
            return Ok(None);
        }
        match env("OTEL_TRACES_EXPORTER").as_deref() {
            None | Some("otlp") => {}
            Some("none") => return Ok(None),
            Some(other) => {
                return Err(TelemetryError::Unsupported {
                    name: "OTEL_TRACES_EXPORTER",
                    value: other.to_owned(),
                    expected: "otlp or none",
                });
            }
        }
        let protocol = match (
            env("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                .map(|v| ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", v)),
            env("OTEL_EXPORTER_OTLP_PROTOCOL").map(|v| ("OTEL_EXPORTER_OTLP_PROTOCOL", v)),
        ) {
            (Some((name, v)), _) | (None, Some((name, v))) => parse_protocol(name, &v)?,
            (None, None) => config.otlp_protocol,
        };
        let endpoint = if let Some(url) = env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") {
            // The signal-specific URL is used as given.
            url
        } else if let Some(base) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
            signal_url(protocol, &base)
        } else if let Some(base) = config.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
            signal_url(protocol, base)
        } else {
            return Ok(None);
        };
        let mut headers = config.otlp_headers.clone();
        for name in [
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
        ] {
            if let Some(list) = env(name) {
                headers.extend(key_values(&list));
            }
        }
        let mut resource = config.resource.clone();
        if let Some(list) = env("OTEL_RESOURCE_ATTRIBUTES") {
            resource.extend(key_values(&list));
        }
        let service_name = env("OTEL_SERVICE_NAME")
            .or_else(|| resource.remove("service.name"))
            .unwrap_or_else(|| config.service_name.clone());
        resource.remove("service.name");
        let arg = env("OTEL_TRACES_SAMPLER_ARG");
        let ratio = |default: f64| -> Result<f64, TelemetryError> {
            match &arg {
                None => Ok(default),
                Some(v) => v
                    .parse::<f64>()
                    .ok()
                    .filter(|r| (0.0..=1.0).contains(r))
                    .ok_or_else(|| TelemetryError::Unsupported {
                        name: "OTEL_TRACES_SAMPLER_ARG",
                        value: v.clone(),
                        expected: "a number from 0 to 1",
                    }),
            }
        };
        let sampler = match env("OTEL_TRACES_SAMPLER").as_deref() {
            // Not set: the config file's ratio under the caller's decision
            // (OTEL_TRACES_SAMPLER_ARG alone still sets the ratio).
            None => SamplerSpec::ParentBased(Box::new(SamplerSpec::Ratio(ratio(
                config.sampling_ratio,
            )?))),
            Some("always_on") => SamplerSpec::AlwaysOn,
            Some("always_off") => SamplerSpec::AlwaysOff,
            Some("traceidratio") => SamplerSpec::Ratio(ratio(1.0)?),
            Some("parentbased_always_on") => {
                SamplerSpec::ParentBased(Box::new(SamplerSpec::AlwaysOn))
            }
            Some("parentbased_always_off") => {
                SamplerSpec::ParentBased(Box::new(SamplerSpec::AlwaysOff))
            }
            Some("parentbased_traceidratio") => {
                SamplerSpec::ParentBased(Box::new(SamplerSpec::Ratio(ratio(1.0)?)))
            }
            Some(other) => {
                return Err(TelemetryError::Unsupported {
                    name: "OTEL_TRACES_SAMPLER",
                    value: other.to_owned(),
                    expected: "always_on, always_off, traceidratio, parentbased_always_on, \
                               parentbased_always_off or parentbased_traceidratio",
                });
            }
        };
        Ok(Some(Self {
            protocol,
            endpoint,
            headers,
            sampler,
            service_name,
            resource,
        }))
    }
}

fn parse_protocol(name: &'static str, value: &str) -> Result<OtlpProtocol, TelemetryError> {
    match value {
        "grpc" => Ok(OtlpProtocol::Grpc),
        "http/protobuf" => Ok(OtlpProtocol::HttpProtobuf),
        other => Err(TelemetryError::Unsupported {
            name,
            value: other.to_owned(),
            expected: "grpc or http/protobuf",
        }),
    }
}

/// The traces URL for a base endpoint: OTLP/HTTP appends `/v1/traces`
/// (unless it is there already); gRPC uses the endpoint as it is.
fn signal_url(protocol: OtlpProtocol, base: &str) -> String {
    match protocol {
        OtlpProtocol::Grpc => base.to_owned(),
        OtlpProtocol::HttpProtobuf if base.ends_with("/v1/traces") => base.to_owned(),
        OtlpProtocol::HttpProtobuf => format!("{}/v1/traces", base.trim_end_matches('/')),
    }
}

/// `key1=value1,key2=value2` with percent-encoded values (the format of
/// `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_RESOURCE_ATTRIBUTES`); malformed
/// entries are skipped.
fn key_values(list: &str) -> impl Iterator<Item = (String, String)> + '_ {
    list.split(',').filter_map(|item| {
        let (k, v) = item.split_once('=')?;
        let k = k.trim();
        let v = percent_encoding::percent_decode_str(v.trim())
            .decode_utf8()
            .ok()?;
        (!k.is_empty()).then(|| (k.to_owned(), v.into_owned()))
    })
}

fn provider(config: &GatewayConfig) -> anyhow::Result<Option<SdkTracerProvider>> {
    let Some(export) = TraceExport::resolve(&config.telemetry, |name| std::env::var(name).ok())?
    else {
        return Ok(None);
    };
    let exporter = match export.protocol {
        OtlpProtocol::Grpc => {
            let mut metadata = tonic::metadata::MetadataMap::new();
            for (k, v) in &export.headers {
                if let (Ok(k), Ok(v)) = (
                    tonic::metadata::MetadataKey::from_bytes(k.as_bytes()),
                    tonic::metadata::MetadataValue::try_from(v.as_str()),
                ) {
                    metadata.insert(k, v);
                }
            }
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(export.endpoint.clone())
                .with_metadata(metadata)
                .build()?
        }
        // The batch processor exports from its own thread, outside the
        // Tokio runtime: the exporter uses reqwest's blocking client there.
        OtlpProtocol::HttpProtobuf => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(export.endpoint.clone())
            .with_headers(export.headers.clone().into_iter().collect())
            .build()?,
    };
    let mut attributes = vec![KeyValue::new("switchboard.region", config.region.clone())];
    if let Some(pod) = std::env::var("POD_NAME")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .filter(|p| !p.is_empty())
    {
        attributes.push(KeyValue::new("k8s.pod.name", pod));
    }
    attributes.extend(
        export
            .resource
            .iter()
            .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
    );
    // Built from the resolved settings only (the SDK's own environment
    // detector would apply OTEL_RESOURCE_ATTRIBUTES a second time).
    let resource = opentelemetry_sdk::Resource::builder_empty()
        .with_detector(Box::new(TelemetryResourceDetector))
        .with_service_name(export.service_name.clone())
        .with_attributes(attributes)
        .build();
    tracing::debug!(endpoint = %export.endpoint, protocol = ?export.protocol, "exporting traces");
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(export.sampler.build())
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

/// The trace id of a span whose trace is sampled (exported), for exemplars.
pub fn sampled_trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    (sc.is_valid() && sc.is_sampled()).then(|| sc.trace_id().to_string())
}

/// The trace id of a span, for log lines (`None` when not traced).
pub fn trace_id(span: &tracing::Span) -> Option<String> {
    use opentelemetry::trace::TraceContextExt;
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(
        config: &TelemetryConfig,
        vars: &[(&str, &str)],
    ) -> Result<Option<TraceExport>, TelemetryError> {
        let vars: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        TraceExport::resolve(config, |n| vars.get(n).cloned())
    }

    fn with_endpoint(endpoint: &str, protocol: OtlpProtocol) -> TelemetryConfig {
        TelemetryConfig {
            otlp_endpoint: Some(endpoint.into()),
            otlp_protocol: protocol,
            ..TelemetryConfig::default()
        }
    }

    #[test]
    fn nothing_is_exported_without_an_endpoint_or_when_disabled() {
        assert_eq!(resolve(&TelemetryConfig::default(), &[]), Ok(None));
        let c = with_endpoint("http://c:4317", OtlpProtocol::Grpc);
        assert!(resolve(&c, &[]).unwrap().is_some());
        assert_eq!(resolve(&c, &[("OTEL_SDK_DISABLED", "true")]), Ok(None));
        assert_eq!(resolve(&c, &[("OTEL_SDK_DISABLED", "TRUE")]), Ok(None));
        assert!(
            resolve(&c, &[("OTEL_SDK_DISABLED", "false")])
                .unwrap()
                .is_some()
        );
        assert_eq!(resolve(&c, &[("OTEL_TRACES_EXPORTER", "none")]), Ok(None));
        assert!(resolve(&c, &[("OTEL_TRACES_EXPORTER", "zipkin")]).is_err());
    }

    #[test]
    fn environment_wins_over_the_file_and_signal_specific_over_generic() {
        let c = with_endpoint("http://file:4317", OtlpProtocol::Grpc);
        let e = resolve(&c, &[]).unwrap().unwrap();
        assert_eq!(
            (e.protocol, e.endpoint.as_str()),
            (OtlpProtocol::Grpc, "http://file:4317")
        );

        let e = resolve(
            &c,
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318/"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.protocol, OtlpProtocol::HttpProtobuf);
        assert_eq!(e.endpoint, "http://generic:4318/v1/traces");

        let e = resolve(
            &c,
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc"),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://generic:4318"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://traces:4317"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (e.protocol, e.endpoint.as_str()),
            (OtlpProtocol::Grpc, "http://traces:4317")
        );

        // The signal-specific URL is used exactly as given.
        let e = resolve(
            &TelemetryConfig::default(),
            &[
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"),
                ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "http://t:4318/custom"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.endpoint, "http://t:4318/custom");
        assert!(resolve(&c, &[("OTEL_EXPORTER_OTLP_PROTOCOL", "http/json")]).is_err());
    }

    #[test]
    fn headers_and_resource_attributes_merge_with_percent_decoding() {
        let mut c = with_endpoint("http://c:4317", OtlpProtocol::Grpc);
        c.otlp_headers.insert("x-file".into(), "1".into());
        c.otlp_headers.insert("x-both".into(), "file".into());
        c.resource.insert("team".into(), "file".into());
        let e = resolve(
            &c,
            &[
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-both=env,api-key=a%20b%3Dc"),
                ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "x-both=traces"),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "team=env, deployment.environment=prod,service.name=from-attrs,bad",
                ),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.headers["x-file"], "1");
        assert_eq!(e.headers["x-both"], "traces");
        assert_eq!(e.headers["api-key"], "a b=c");
        assert_eq!(e.resource["team"], "env");
        assert_eq!(e.resource["deployment.environment"], "prod");
        assert!(!e.resource.contains_key("service.name"));
        assert_eq!(e.service_name, "from-attrs");
        let e = resolve(
            &c,
            &[
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=from-attrs"),
                ("OTEL_SERVICE_NAME", "from-name"),
            ],
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.service_name, "from-name");
    }

    #[test]
    fn samplers_follow_the_sdk_names() {
        let c = with_endpoint("http://c:4317", OtlpProtocol::Grpc);
        let sampler = |vars: &[(&str, &str)]| resolve(&c, vars).map(|e| e.unwrap().sampler);
        let pb = |s| SamplerSpec::ParentBased(Box::new(s));
        assert_eq!(sampler(&[]), Ok(pb(SamplerSpec::Ratio(0.1))));
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER_ARG", "0.5")]),
            Ok(pb(SamplerSpec::Ratio(0.5)))
        );
        assert_eq!(
            sampler(&[
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio"),
                ("OTEL_TRACES_SAMPLER_ARG", "0.25")
            ]),
            Ok(pb(SamplerSpec::Ratio(0.25)))
        );
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "traceidratio")]),
            Ok(SamplerSpec::Ratio(1.0))
        );
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "always_off")]),
            Ok(SamplerSpec::AlwaysOff)
        );
        assert_eq!(
            sampler(&[("OTEL_TRACES_SAMPLER", "parentbased_always_on")]),
            Ok(pb(SamplerSpec::AlwaysOn))
        );
        assert!(sampler(&[("OTEL_TRACES_SAMPLER", "jaeger_remote")]).is_err());
        assert!(sampler(&[("OTEL_TRACES_SAMPLER_ARG", "2")]).is_err());
    }
}
