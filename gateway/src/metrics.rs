//! Prometheus metrics. Names follow the seed's (`websocket.connected`,
//! `event.published`, `event.delivered`, `event.dropped`, …) with the
//! `switchboard_` prefix; labels only take values from fixed sets, never
//! tenant names, topics or user input.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(&'static str, &'static str)>;

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
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
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

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}
