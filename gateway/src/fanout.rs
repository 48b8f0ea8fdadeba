//! Routing one stored event into this process's hub, with its span and
//! metrics: one span per event per process (never per connection).

use std::sync::Arc;
use std::time::Instant;

use crate::event::Event;
use crate::hub::Hub;
use crate::metrics::Metrics;

/// Offer `event` to every local session whose patterns match, in a span, with metrics.
pub fn route(hub: &Hub, metrics: &Metrics, event: &Arc<Event>) {
    let span = tracing::info_span!(
        "fanout",
        otel.kind = "internal",
        event_type = %event.topic,
        event_id = %event.id,
        region = %event.region,
        tenant = tracing::field::Empty,
        connections = tracing::field::Empty,
    );
    // Inside a publish or a bus receive, the span is their child; otherwise
    // it continues the publisher's trace.
    if tracing::Span::current().is_none() {
        crate::telemetry::adopt(&span, event.traceparent.as_deref());
    }
    let _entered = span.enter();
    if metrics.tenant_labels() {
        span.record("tenant", &*event.tenant);
    }
    let started = Instant::now();
    let out = hub.dispatch(event);
    // i64, not u64: tracing-opentelemetry exports u64 fields as strings.
    span.record(
        "connections",
        i64::try_from(out.delivered).unwrap_or(i64::MAX),
    );
    metrics.events_delivered.inc_by(out.delivered);
    metrics.tenant_delivered(&event.tenant, out.delivered);
    if out.overflowed > 0 {
        metrics.dropped("slow_consumer", out.overflowed);
    }
    if out.delivered == 0 && out.overflowed == 0 {
        metrics.dropped("no_subscribers", 1);
    }
    metrics
        .fanout_seconds
        .observe(started.elapsed().as_secs_f64());
    let now_ms = (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64;
    metrics.delivery_latency(
        (now_ms - event.stored_at_ms).max(0) as f64 / 1000.0,
        crate::telemetry::sampled_trace_id(&span),
    );
}
