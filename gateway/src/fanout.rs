//! Routing one stored event into this process's hub, with its metrics.

use std::sync::Arc;
use std::time::Instant;

use crate::event::Event;
use crate::hub::Hub;
use crate::metrics::Metrics;

pub fn route(hub: &Hub, metrics: &Metrics, event: &Arc<Event>) {
    let started = Instant::now();
    let out = hub.dispatch(event);
    metrics.events_delivered.inc_by(out.delivered);
    if out.overflowed > 0 {
        metrics.dropped("slow_consumer", out.overflowed);
    }
    if out.delivered == 0 && out.overflowed == 0 {
        metrics.dropped("no_subscribers", 1);
    }
    metrics
        .fanout_seconds
        .observe(started.elapsed().as_secs_f64());
}
