//! The operator's Prometheus metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

pub use switchboard_exposition::ExpositionFormat;

type Labels = Vec<(&'static str, &'static str)>;

/// The kinds the operator reconciles (the `kind` label's values).
pub const KINDS: [&str; 2] = ["RealtimeGateway", "TopicPolicy"];

pub struct Metrics {
    registry: Registry,
    pub reconciles: Family<Labels, Counter>,
    pub failures: Family<Labels, Counter>,
    pub duration: Family<Labels, Histogram>,
    pub leader: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("switchboard_operator");
        let reconciles = Family::<Labels, Counter>::default();
        let failures = Family::<Labels, Counter>::default();
        let duration = Family::<Labels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        let leader = Gauge::default();
        registry.register("reconciles", "Reconciliations by kind", reconciles.clone());
        registry.register(
            "reconcile_failures",
            "Failed reconciliations by kind",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconciliation time by kind",
            duration.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica holds the leader lease",
            leader.clone(),
        );
        // Every kind's series exists from the start (at 0), so rates and
        // alerts see "no failures" rather than "no data".
        for kind in KINDS {
            let _ = reconciles.get_or_create(&vec![("kind", kind)]);
            let _ = failures.get_or_create(&vec![("kind", kind)]);
        }
        Self {
            registry,
            reconciles,
            failures,
            duration,
            leader,
        }
    }
}

impl Metrics {
    pub fn render(&self, format: ExpositionFormat) -> String {
        switchboard_exposition::encode(&self.registry, format)
    }
}
