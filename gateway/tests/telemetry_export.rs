//! OTLP export through the real binary, as users start it: both protocols
//! (gRPC and HTTP/protobuf), configured by the config file and by the
//! OpenTelemetry SDK environment, under a burst of publishes, with what is
//! still queued flushed at SIGTERM. Spans carry typed attributes, and the
//! delivery-latency histogram's exemplars name sampled traces.

mod common;

use std::collections::HashSet;

use common::nats::*;
use common::otlp::{Attr, Receiver, Span, Via};
use common::*;
use futures_util::StreamExt;
use serde_json::json;

/// Integer span attributes the gateway records (any of them arriving as a
/// string is a defect: backends cannot compare them as numbers).
const INTEGER_ATTRIBUTES: &[&str] = &[
    "connections",
    "http.response.status_code",
    "close_code",
    "conn",
    "patterns",
];

const EVENTS: usize = 300;

struct Case {
    service: &'static str,
    via: Option<Via>,
    yaml: String,
    env: Vec<(&'static str, String)>,
}

fn cases(r: &Receiver) -> Vec<Case> {
    // Nothing listens here: a setting that wins over it must be in force.
    let dead = format!("http://127.0.0.1:{}", free_port());
    // Only a full batch or the shutdown flush sends spans: what is left
    // after the last full batch proves the flush.
    let bsp = ("OTEL_BSP_SCHEDULE_DELAY", "600000".to_owned());
    vec![
        Case {
            service: "file-grpc",
            via: Some(Via::Grpc),
            yaml: format!(
                "telemetry:\n  otlp_endpoint: \"{}\"\n  otlp_protocol: grpc\n  sampling_ratio: 1.0\n  service_name: file-grpc\n",
                r.endpoint()
            ),
            env: vec![bsp.clone()],
        },
        Case {
            service: "file-http",
            via: Some(Via::Http),
            yaml: format!(
                "telemetry:\n  otlp_endpoint: \"{}\"\n  otlp_protocol: http_protobuf\n  sampling_ratio: 1.0\n  service_name: file-http\n  otlp_headers:\n    x-api-key: from-file\n",
                r.http_endpoint()
            ),
            env: vec![bsp.clone()],
        },
        Case {
            service: "env-grpc",
            via: Some(Via::Grpc),
            // The file says HTTP to a dead port and samples nothing; the
            // environment wins.
            yaml: format!(
                "telemetry:\n  otlp_endpoint: \"{dead}\"\n  otlp_protocol: http_protobuf\n  sampling_ratio: 0.0\n"
            ),
            env: vec![
                bsp.clone(),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", r.endpoint()),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
                ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio".into()),
                ("OTEL_TRACES_SAMPLER_ARG", "1.0".into()),
                ("OTEL_SERVICE_NAME", "env-grpc".into()),
                (
                    "OTEL_RESOURCE_ATTRIBUTES",
                    "deployment.environment=ci,team=real%20time".into(),
                ),
                ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=s%3Dcret".into()),
            ],
        },
        Case {
            service: "env-http",
            via: Some(Via::Http),
            yaml: String::new(),
            env: vec![
                bsp.clone(),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc".into()),
                ("OTEL_EXPORTER_OTLP_ENDPOINT", dead.clone()),
                // Signal-specific wins over generic; its URL is used as is.
                ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf".into()),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                    format!("{}/custom/traces", r.http_endpoint()),
                ),
                ("OTEL_TRACES_SAMPLER", "always_on".into()),
                ("OTEL_RESOURCE_ATTRIBUTES", "service.name=env-http".into()),
                (
                    "OTEL_EXPORTER_OTLP_TRACES_HEADERS",
                    "x-api-key=traces".into(),
                ),
            ],
        },
        Case {
            service: "disabled",
            via: None,
            yaml: format!(
                "telemetry:\n  otlp_endpoint: \"{}\"\n  sampling_ratio: 1.0\n  service_name: disabled\n",
                r.endpoint()
            ),
            env: vec![bsp, ("OTEL_SDK_DISABLED", "true".into())],
        },
    ]
}

fn of<'a>(spans: &'a [Span], service: &str, name: &str) -> Vec<&'a Span> {
    spans
        .iter()
        .filter(|s| {
            s.name == name && s.resource.get("service.name").map(String::as_str) == Some(service)
        })
        .collect()
}

#[tokio::test]
async fn both_otlp_protocols_export_from_file_and_environment_and_flush_at_shutdown() {
    let dir = TempDir::new("otlp");
    let receiver = Receiver::start().await;
    let mut gateways = Vec::new();
    for case in cases(&receiver) {
        let env: Vec<(&str, &str)> = case
            .env
            .iter()
            .map(|(k, v)| (*k, v.as_str()))
            .chain([("RUST_LOG", "warn")])
            .collect();
        let gw = GatewayProc::start_with_env(&dir, case.service, &case.yaml, &env);
        gateways.push((case, gw));
    }
    let http = reqwest::Client::new();
    let publisher = token("acme", &["publish"]);
    let mut exemplars = Vec::new();
    for (case, gw) in &gateways {
        gw.wait_ready().await;
        let mut client = Client::connect(&gw.ws(&format!("token={}", token("acme", &[])))).await;
        client.recv_type("connection.established").await;
        client.subscribe(&["load.*"]).await;
        // A burst: publishes 8 at a time.
        let base = gw.http();
        futures_util::stream::iter(0..EVENTS)
            .map(|n| {
                let (http, base, publisher) = (http.clone(), base.clone(), publisher.clone());
                async move {
                    let r = http
                        .post(format!("{base}/api/realtime/publish/"))
                        .bearer_auth(&publisher)
                        .json(&json!({"event_type": "load.tick", "data": {"n": n}}))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(r.status(), 201);
                }
            })
            .buffer_unordered(8)
            .collect::<Vec<()>>()
            .await;
        assert_eq!(
            client.events(EVENTS).await.len(),
            EVENTS,
            "{}",
            case.service
        );
        if case.via.is_some() {
            // Exemplars (OpenMetrics) name a sampled trace.
            let om = http
                .get(format!("{}/metrics", gw.admin()))
                .header("accept", "application/openmetrics-text; version=1.0.0")
                .send()
                .await
                .unwrap()
                .text()
                .await
                .unwrap();
            let exemplar = om
                .lines()
                .filter(|l| l.starts_with("switchboard_delivery_latency_seconds_bucket"))
                .find_map(|l| {
                    l.split_once("# {trace_id=\"")
                        .map(|(_, r)| r[..32].to_owned())
                })
                .unwrap_or_else(|| panic!("no exemplar for {}: {om}", case.service));
            assert!(
                exemplar.bytes().all(|b| b.is_ascii_hexdigit()),
                "{exemplar}"
            );
            // Checked after shutdown against the exported fan-out spans.
            exemplars.push((case.service, exemplar));
        }
    }
    for (case, gw) in &mut gateways {
        let status = gw.terminate().await;
        assert!(
            status.success(),
            "{}: {status:?}\n{}",
            case.service,
            gw.log()
        );
    }
    // Every span left by the time the processes exited.
    let spans = receiver.spans();
    for (case, _) in &gateways {
        let fanouts = of(&spans, case.service, "fanout");
        let publishes = of(&spans, case.service, "publish");
        let Some(via) = case.via else {
            assert!(
                spans
                    .iter()
                    .all(|s| s.resource.get("service.name").map(String::as_str)
                        != Some(case.service)),
                "OTEL_SDK_DISABLED exported spans"
            );
            continue;
        };
        assert_eq!(fanouts.len(), EVENTS, "{}: fan-out spans", case.service);
        assert_eq!(publishes.len(), EVENTS, "{}: publish spans", case.service);
        assert!(
            fanouts.iter().chain(&publishes).all(|s| s.via == via),
            "{}",
            case.service
        );
        // Typed attributes.
        assert!(
            fanouts
                .iter()
                .all(|s| s.typed["connections"] == Attr::Int(1))
        );
        assert!(
            publishes
                .iter()
                .all(|s| s.typed["http.response.status_code"] == Attr::Int(201))
        );
        let (_, exemplar) = exemplars.iter().find(|(s, _)| *s == case.service).unwrap();
        assert!(
            fanouts.iter().any(|s| &s.trace_id == exemplar),
            "{}: exemplar {exemplar} names no exported trace",
            case.service
        );
    }
    for s in &spans {
        for key in INTEGER_ATTRIBUTES {
            if let Some(v) = s.typed.get(*key) {
                assert!(matches!(v, Attr::Int(_)), "{}.{key} is {v:?}", s.name);
            }
        }
    }
    // Headers, resource attributes and the signal-specific URL.
    let env_grpc = of(&spans, "env-grpc", "fanout");
    assert!(
        env_grpc
            .iter()
            .all(|s| s.headers.get("x-api-key").map(String::as_str) == Some("s=cret"))
    );
    assert_eq!(env_grpc[0].resource["deployment.environment"], "ci");
    assert_eq!(env_grpc[0].resource["team"], "real time");
    let file_http = of(&spans, "file-http", "fanout");
    assert!(file_http.iter().all(|s| s.path == "/v1/traces"));
    assert!(
        file_http
            .iter()
            .all(|s| s.headers.get("x-api-key").map(String::as_str) == Some("from-file"))
    );
    let env_http = of(&spans, "env-http", "fanout");
    assert!(env_http.iter().all(|s| s.path == "/custom/traces"));
    assert!(
        env_http
            .iter()
            .all(|s| s.headers.get("x-api-key").map(String::as_str) == Some("traces"))
    );
    let services: HashSet<&str> = spans
        .iter()
        .filter_map(|s| s.resource.get("service.name").map(String::as_str))
        .collect();
    assert_eq!(
        services,
        HashSet::from(["file-grpc", "file-http", "env-grpc", "env-http"])
    );
}
