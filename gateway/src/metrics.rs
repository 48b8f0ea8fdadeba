//! Prometheus metrics. Names follow the seed's (`websocket.connected`,
//! `event.published`, `event.delivered`, `event.dropped`, …) with the
//! `switchboard_` prefix; labels only take values from fixed sets, never
//! tenant names, topics or user input.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use switchboard_exposition::ExpositionFormat;

type Labels = Vec<(&'static str, &'static str)>;

/// The exemplar label set of the delivery-latency histogram: the trace id
/// of a sampled event, so a latency spike links to its trace.
pub type TraceExemplar = Vec<(&'static str, String)>;

/// The gateway's Prometheus metrics (`docs/observability.md` lists them).
pub struct Metrics {
    registry: Registry,
    /// Open WebSocket connections.
    pub connections_active: Gauge,
    /// WebSocket connections accepted.
    pub connections_opened: Counter,
    /// WebSocket connections closed, by reason.
    pub connections_closed: Family<Labels, Counter>,
    /// Upgrades refused, by reason.
    pub connections_rejected: Family<Labels, Counter>,
    /// Subscriptions held, every transport.
    pub subscriptions_active: Gauge,
    /// Other gateways heard over NATS (presence heartbeats).
    pub presence_gateways: Gauge,
    /// Events stored.
    pub events_published: Counter,
    /// Publishes answered with an existing event (repeated idempotency key).
    pub events_deduplicated: Counter,
    /// Events written to clients.
    pub events_delivered: Counter,
    /// Events not delivered, by reason.
    pub events_dropped: Family<Labels, Counter>,
    /// Errors, by kind.
    pub errors: Family<Labels, Counter>,
    /// Resumes from a cursor, by outcome (`replayed`, `gap`).
    pub resumes: Family<Labels, Counter>,
    /// History pages answered in cluster mode, by how: `window` (from what
    /// the gateway received live on the subscription), `own` (a JetStream
    /// read of its own), `shared` (from a tenant's recent range read once
    /// for resumes arriving together), `shared_read` (a read into it).
    pub history_reads: Family<Labels, Counter>,
    /// Long-poll requests.
    pub longpoll_requests: Counter,
    /// Open SSE streams.
    pub sse_active: Gauge,
    /// Policy reloads, by result.
    pub policy_reloads: Family<Labels, Counter>,
    /// Time to fan one event out in this process.
    pub fanout_seconds: Histogram,
    /// 1 while connected to NATS.
    pub nats_connected: Gauge,
    /// Connections to NATS lost.
    pub nats_reconnects: Counter,
    /// Time from publish to the write to a client, with trace exemplars.
    pub delivery_latency: HistogramWithExemplars<TraceExemplar>,
    tenant_delivered: Family<Vec<(&'static str, String)>, Counter>,
    /// `Some(cap)` when tenant labels are enabled.
    tenant_cap: Option<usize>,
    tenants_seen: std::sync::Mutex<std::collections::HashSet<String>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Metrics {
    /// `tenant_cap`: `Some(n)` labels per-tenant metrics for at most `n`
    /// tenants (the rest are `other`); `None` keeps tenants out of metrics.
    pub fn new(tenant_cap: Option<usize>) -> Self {
        let mut r = Registry::with_prefix("switchboard");
        let m = Self {
            connections_active: Gauge::default(),
            connections_opened: Counter::default(),
            connections_closed: Family::default(),
            connections_rejected: Family::default(),
            subscriptions_active: Gauge::default(),
            presence_gateways: Gauge::default(),
            events_published: Counter::default(),
            events_deduplicated: Counter::default(),
            events_delivered: Counter::default(),
            events_dropped: Family::default(),
            errors: Family::default(),
            resumes: Family::default(),
            history_reads: Family::default(),
            longpoll_requests: Counter::default(),
            sse_active: Gauge::default(),
            policy_reloads: Family::default(),
            fanout_seconds: Histogram::new(exponential_buckets(0.000_01, 4.0, 10)),
            nats_connected: Gauge::default(),
            nats_reconnects: Counter::default(),
            delivery_latency: HistogramWithExemplars::new(exponential_buckets(0.000_25, 2.0, 16)),
            tenant_delivered: Family::default(),
            tenant_cap,
            tenants_seen: Default::default(),
            registry: Registry::default(),
        };
        r.register(
            "websocket_active",
            "WebSocket connections open now",
            m.connections_active.clone(),
        );
        r.register(
            "websocket_connected",
            "WebSocket connections established",
            m.connections_opened.clone(),
        );
        r.register(
            "websocket_disconnected",
            "WebSocket connections closed, by close reason",
            m.connections_closed.clone(),
        );
        r.register(
            "websocket_rejected",
            "Connection attempts refused before or at the upgrade, by reason",
            m.connections_rejected.clone(),
        );
        r.register(
            "subscriptions_active",
            "Subscriptions held by connections of this process",
            m.subscriptions_active.clone(),
        );
        r.register(
            "presence_gateways",
            "Other gateways this one hears presence heartbeats from (cluster mode)",
            m.presence_gateways.clone(),
        );
        r.register(
            "event_published",
            "Events stored and routed (duplicates not counted)",
            m.events_published.clone(),
        );
        r.register(
            "event_deduplicated",
            "Publishes answered with an earlier event because the idempotency key repeated",
            m.events_deduplicated.clone(),
        );
        r.register(
            "event_delivered",
            "Events queued to a connection, long-poll or stream",
            m.events_delivered.clone(),
        );
        r.register(
            "event_dropped",
            "Events not delivered, by reason (no_subscribers, slow_consumer)",
            m.events_dropped.clone(),
        );
        r.register("errors", "Errors by kind", m.errors.clone());
        r.register(
            "resume",
            "Cursor resumptions by outcome (replayed, gap)",
            m.resumes.clone(),
        );
        r.register(
            "history_reads",
            "History pages in cluster mode by path (window, own, shared, shared_read)",
            m.history_reads.clone(),
        );
        r.register(
            "longpoll_requests",
            "Long-poll requests answered",
            m.longpoll_requests.clone(),
        );
        r.register("sse_active", "SSE streams open now", m.sse_active.clone());
        r.register(
            "policy_reloads",
            "Policy bundle reloads by result",
            m.policy_reloads.clone(),
        );
        r.register(
            "fanout_duration_seconds",
            "Time to route one event to this process's connections",
            m.fanout_seconds.clone(),
        );
        r.register(
            "nats_connected",
            "1 while connected to NATS (cluster mode)",
            m.nats_connected.clone(),
        );
        r.register(
            "nats_disconnects",
            "Times the NATS connection was lost",
            m.nats_reconnects.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "From storing an event to routing it to this process's connections (publish-to-deliver)",
            m.delivery_latency.clone(),
        );
        if m.tenant_cap.is_some() {
            r.register(
                "tenant_events_delivered",
                "Deliveries per tenant (enabled by telemetry.tenant_labels, capped)",
                m.tenant_delivered.clone(),
            );
        }
        // Known label values exist from the start (at 0), so dashboards and
        // alerts read "none" rather than "no data". In cluster mode an event
        // nobody subscribes to never reaches a gateway (NATS routes by
        // interest), so `no_subscribers` stays 0 there.
        for reason in ["no_subscribers", "slow_consumer"] {
            m.dropped(reason, 0);
        }
        Self { registry: r, ..m }
    }

    /// Count an error of `kind`.
    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&vec![("kind", kind)]).inc();
    }

    /// Count `n` events not delivered for `reason`.
    pub fn dropped(&self, reason: &'static str, n: u64) {
        self.events_dropped
            .get_or_create(&vec![("reason", reason)])
            .inc_by(n);
    }

    /// Whether per-tenant labels are on (they are capped in number).
    pub fn tenant_labels(&self) -> bool {
        self.tenant_cap.is_some()
    }

    /// Count deliveries for a tenant, when tenant labels are on.
    pub fn tenant_delivered(&self, tenant: &str, n: u64) {
        let Some(cap) = self.tenant_cap else { return };
        if n == 0 {
            return;
        }
        let label = {
            let mut seen = self.tenants_seen.lock().unwrap_or_else(|e| e.into_inner());
            if seen.contains(tenant) || (seen.len() < cap && seen.insert(tenant.to_owned())) {
                tenant.to_owned()
            } else {
                "other".to_owned()
            }
        };
        self.tenant_delivered
            .get_or_create(&vec![("tenant", label)])
            .inc_by(n);
    }

    /// Record one publish-to-deliver latency, with the event's trace id as
    /// the exemplar when its trace is sampled.
    pub fn delivery_latency(&self, seconds: f64, trace_id: Option<String>) {
        self.delivery_latency
            .observe(seconds, trace_id.map(|id| vec![("trace_id", id)]), None);
    }

    /// The exposition text in `format`.
    pub fn render(&self, format: ExpositionFormat) -> String {
        switchboard_exposition::encode(&self.registry, format)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_formats_carry_the_same_samples_and_only_openmetrics_the_exemplars() {
        let m = Metrics::new(None);
        m.connections_opened.inc();
        m.delivery_latency(0.003, Some("4bf92f3577b34da6a3ce929d0e0e4736".into()));
        m.delivery_latency(0.003, None);
        let om = m.render(ExpositionFormat::OpenMetrics);
        assert!(om.contains("# TYPE switchboard_websocket_connected counter"));
        assert!(om.contains("trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\""));
        let text = m.render(ExpositionFormat::PrometheusText);
        assert!(text.contains("\nswitchboard_websocket_connected_total 1\n"));
        assert!(text.contains("switchboard_delivery_latency_seconds_count 2\n"));
        assert!(!text.contains("trace_id"), "{text}");
    }
}
