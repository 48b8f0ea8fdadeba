//! Prometheus metrics. Names follow the seed's (`websocket.connected`,
//! `event.published`, `event.delivered`, `event.dropped`, …) with the
//! `switchboard_` prefix; labels only take values from fixed sets, never
//! tenant names, topics or user input.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

/// The exemplar label set of the delivery-latency histogram: the trace id
/// of a sampled event, so a latency spike links to its trace.
pub type TraceExemplar = Vec<(&'static str, String)>;

/// The two text formats `/metrics` speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpositionFormat {
    /// OpenMetrics 1.0 text (with exemplars); what Prometheus asks for.
    OpenMetrics,
    /// Prometheus text 0.0.4, for scrapers that do not ask for OpenMetrics.
    PrometheusText,
}

impl ExpositionFormat {
    /// OpenMetrics when the `Accept` header lists it (with a non-zero
    /// quality), Prometheus text 0.0.4 otherwise.
    pub fn negotiate(accept: &str) -> Self {
        let wants_openmetrics = accept.split(',').any(|item| {
            let mut parts = item.split(';').map(str::trim);
            let media = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            media.eq_ignore_ascii_case("application/openmetrics-text") && !refused
        });
        if wants_openmetrics {
            Self::OpenMetrics
        } else {
            Self::PrometheusText
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Self::OpenMetrics => "application/openmetrics-text; version=1.0.0; charset=utf-8",
            Self::PrometheusText => "text/plain; version=0.0.4; charset=utf-8",
        }
    }
}

pub struct Metrics {
    registry: Registry,
    pub connections_active: Gauge,
    pub connections_opened: Counter,
    pub connections_closed: Family<Labels, Counter>,
    pub connections_rejected: Family<Labels, Counter>,
    pub subscriptions_active: Gauge,
    pub events_published: Counter,
    pub events_deduplicated: Counter,
    pub events_delivered: Counter,
    pub events_dropped: Family<Labels, Counter>,
    pub errors: Family<Labels, Counter>,
    pub resumes: Family<Labels, Counter>,
    pub longpoll_requests: Counter,
    pub sse_active: Gauge,
    pub policy_reloads: Family<Labels, Counter>,
    pub fanout_seconds: Histogram,
    pub nats_connected: Gauge,
    pub nats_reconnects: Counter,
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
            events_published: Counter::default(),
            events_deduplicated: Counter::default(),
            events_delivered: Counter::default(),
            events_dropped: Family::default(),
            errors: Family::default(),
            resumes: Family::default(),
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
        Self { registry: r, ..m }
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&vec![("kind", kind)]).inc();
    }

    pub fn dropped(&self, reason: &'static str, n: u64) {
        self.events_dropped
            .get_or_create(&vec![("reason", reason)])
            .inc_by(n);
    }

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

    pub fn render(&self, format: ExpositionFormat) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        match format {
            ExpositionFormat::OpenMetrics => out,
            ExpositionFormat::PrometheusText => openmetrics_to_prometheus_text(&out),
        }
    }
}

/// Rewrite the OpenMetrics text `prometheus-client` writes as Prometheus text
/// 0.0.4: counter families are named with their `_total` suffix, `# UNIT`
/// and `# EOF` go, exemplars are cut off the samples, and types 0.0.4 lacks
/// become `untyped` (or `gauge` for `info`).
pub fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    // A family's HELP comes before its TYPE; hold it until the type says
    // whether the name needs `_total`.
    let mut help: Option<(&str, &str)> = None;
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, text) = rest.split_once(' ').unwrap_or((rest, ""));
            help = Some((name, text));
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap_or((rest, "unknown"));
            let (name, kind) = match kind {
                "counter" => (format!("{name}_total"), "counter"),
                "gauge" | "histogram" | "summary" => (name.to_owned(), kind),
                "info" => (format!("{name}_info"), "gauge"),
                _ => (name.to_owned(), "untyped"),
            };
            if let Some((_, text)) = help.take() {
                out.push_str(&format!("# HELP {name} {}\n", unescape_help(text)));
            }
            out.push_str(&format!("# TYPE {name} {kind}\n"));
        } else if line.starts_with('#') {
            // # UNIT, # EOF: not in 0.0.4.
        } else if !line.is_empty() {
            out.push_str(strip_exemplar(line));
            out.push('\n');
        }
    }
    out
}

/// OpenMetrics escapes `"` in HELP text; 0.0.4 does not.
fn unescape_help(text: &str) -> std::borrow::Cow<'_, str> {
    if text.contains("\\\"") {
        text.replace("\\\"", "\"").into()
    } else {
        text.into()
    }
}

/// A sample line without its ` # {…} value` exemplar.
fn strip_exemplar(line: &str) -> &str {
    // Skip the label set (quoted values may hold anything) before looking
    // for the exemplar marker.
    let bytes = line.as_bytes();
    let mut i = line.find(['{', ' ']).unwrap_or(line.len());
    if bytes.get(i) == Some(&b'{') {
        let mut quoted = false;
        while i < bytes.len() {
            match bytes[i] {
                b'\\' if quoted => i += 1,
                b'"' => quoted = !quoted,
                b'}' if !quoted => break,
                _ => {}
            }
            i += 1;
        }
    }
    match line.get(i..).and_then(|rest| rest.find(" # ")) {
        Some(at) => &line[..i + at],
        None => line,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_follows_the_accept_header() {
        let prometheus = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";
        assert_eq!(
            ExpositionFormat::negotiate(prometheus),
            ExpositionFormat::OpenMetrics
        );
        for accept in [
            "",
            "*/*",
            "text/plain",
            "text/plain;version=0.0.4",
            "application/openmetrics-text;q=0",
        ] {
            assert_eq!(
                ExpositionFormat::negotiate(accept),
                ExpositionFormat::PrometheusText,
                "{accept}"
            );
        }
    }

    #[test]
    fn prometheus_text_names_counters_with_total_and_drops_openmetrics_only_parts() {
        let m = Metrics::new(None);
        m.connections_opened.inc();
        m.delivery_latency(0.003, Some("4bf92f3577b34da6a3ce929d0e0e4736".into()));
        let om = m.render(ExpositionFormat::OpenMetrics);
        assert!(om.contains("# TYPE switchboard_websocket_connected counter"));
        assert!(om.contains("trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\""));
        assert!(om.trim_end().ends_with("# EOF"));

        let text = m.render(ExpositionFormat::PrometheusText);
        assert!(text.contains("# TYPE switchboard_websocket_connected_total counter\n"));
        assert!(text.contains("# HELP switchboard_websocket_connected_total "));
        assert!(text.contains("\nswitchboard_websocket_connected_total 1\n"));
        assert!(text.contains("# TYPE switchboard_delivery_latency_seconds histogram\n"));
        assert!(text.contains("switchboard_delivery_latency_seconds_count 1\n"));
        assert!(
            !text.contains("# EOF") && !text.contains("trace_id"),
            "{text}"
        );
        // Every sample belongs to a declared family.
        let declared: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter_map(|l| l.split(' ').next())
            .collect();
        for sample in text.lines().filter(|l| !l.starts_with('#')) {
            let name = sample.split(['{', ' ']).next().unwrap_or("");
            assert!(
                declared.iter().any(|d| name == *d
                    || ["_bucket", "_sum", "_count"]
                        .iter()
                        .any(|s| name.strip_suffix(s) == Some(*d))),
                "{sample} has no family"
            );
        }
    }

    #[test]
    fn exemplars_are_cut_after_the_label_set_only() {
        assert_eq!(
            strip_exemplar(r#"a_bucket{le="1",x="q # {z}"} 3 # {trace_id="ab"} 0.5"#),
            r#"a_bucket{le="1",x="q # {z}"} 3"#
        );
        assert_eq!(strip_exemplar("a_total 3 # {t=\"x\"} 1"), "a_total 3");
        assert_eq!(strip_exemplar("a_total 3"), "a_total 3");
    }
}
