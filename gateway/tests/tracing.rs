//! One trace from publish to delivery, across processes and regions: real
//! gateway processes on a real two-region NATS supercluster export OTLP to
//! an in-process receiver.

mod common;

use std::time::Duration;

use common::nats::*;
use common::otlp::{Attr, Receiver, Span};
use common::*;
use serde_json::json;

fn find<'a>(spans: &'a [Span], name: &str, region: &str) -> Option<&'a Span> {
    spans.iter().find(|s| {
        s.name == name && s.resource.get("switchboard.region").map(String::as_str) == Some(region)
    })
}

#[tokio::test]
async fn a_publish_in_one_region_and_its_delivery_in_another_are_one_trace() {
    let dir = TempDir::new("trace");
    let receiver = Receiver::start().await;
    let clusters = supercluster(&dir, &["eu", "us"]).await;
    let gw = |name: &str, region: &str, c: &Cluster, tenant_labels: bool| {
        let yaml = format!(
            "{}  placement_cluster: {region}\ntelemetry:\n  otlp_endpoint: \"{}\"\n  sampling_ratio: 1.0\n  tenant_labels: {tenant_labels}\n",
            nats_yaml(region, &c.urls(), &["eu", "us"], 3),
            receiver.endpoint()
        );
        // Logs at warn only: spans must be exported whatever the log level.
        GatewayProc::start_with_env(
            &dir,
            name,
            &yaml,
            &[("OTEL_BSP_SCHEDULE_DELAY", "100"), ("RUST_LOG", "warn")],
        )
    };
    let gw_eu = gw("gw-eu", "eu", &clusters[0], false);
    let gw_us = gw("gw-us", "us", &clusters[1], true);
    gw_eu.wait_ready().await;
    gw_us.wait_ready().await;

    let mut client = Client::connect(&gw_us.ws(&format!("token={}", token("acme", &[])))).await;
    client.recv_type("connection.established").await;
    client.subscribe(&["x.*"]).await;

    // The caller's own trace context.
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let caller_span = "00f067aa0ba902b7";
    let publisher_token = token("acme", &["publish"]);
    let r = reqwest::Client::new()
        .post(format!("{}/api/realtime/publish/", gw_eu.http()))
        .bearer_auth(&publisher_token)
        .header("traceparent", format!("00-{trace_id}-{caller_span}-01"))
        .json(&json!({"event_type": "x.traced", "data": {"secret": "SECRET-PAYLOAD"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let got = tokio::time::timeout(Duration::from_secs(30), client.events(1))
        .await
        .expect("delivered in us");
    assert_eq!(got[0]["metadata"]["region"], "eu");

    let mut spans = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while find(&spans, "fanout", "us").is_none() || find(&spans, "publish", "eu").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "spans never arrived: {:#?}",
            receiver.spans()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        spans = receiver
            .spans()
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .collect();
    }
    let publish = find(&spans, "publish", "eu").unwrap();
    let bus_publish = find(&spans, "bus.publish", "eu").expect("bus.publish span");
    let receive = find(&spans, "bus.receive", "us").expect("bus.receive span");
    let fanout = find(&spans, "fanout", "us").unwrap();
    // One trace with correct parent links, across processes and regions.
    assert_eq!(
        publish.parent_span_id, caller_span,
        "the caller's traceparent is honoured"
    );
    assert_eq!(bus_publish.parent_span_id, publish.span_id);
    assert_eq!(
        receive.parent_span_id, bus_publish.span_id,
        "context travelled in NATS headers"
    );
    assert_eq!(fanout.parent_span_id, receive.span_id);
    // Attributes: region, event type, connections reached; tenant only where enabled.
    assert_eq!(fanout.attributes["event_type"], "x.traced");
    assert_eq!(fanout.attributes["region"], "eu");
    // Typed: a backend can query `connections > 1000` (a u64 field would
    // arrive as the string "1").
    assert_eq!(fanout.typed["connections"], Attr::Int(1));
    assert_eq!(
        fanout.attributes.get("tenant").map(String::as_str),
        Some("acme")
    );
    assert!(
        !bus_publish.attributes.contains_key("tenant"),
        "tenant labels are off in eu"
    );
    assert_eq!(fanout.resource["service.name"], "switchboard-gateway");
    // Never a payload or a token in any attribute.
    for s in receiver.spans() {
        for v in s.attributes.values().chain(s.resource.values()) {
            assert!(
                !v.contains("SECRET-PAYLOAD") && !v.contains(&publisher_token),
                "{s:?}"
            );
        }
    }
    // Exactly one fan-out span per event per process (not one per connection).
    assert_eq!(spans.iter().filter(|s| s.name == "fanout").count(), 1);
}
