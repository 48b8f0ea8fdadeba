//! The embedded broker: per-tenant in-memory history with retention and
//! idempotency-key dedup, routing straight into this process's hub.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use dashmap::DashMap;
use switchboard_config::{HistoryConfig, Pattern};

use super::{Broker, BrokerError, Filter, GapReason, Latest, Published, ReadBatch};
use crate::data_protection::{Blocklist, ErasureCounts};
use crate::event::{Cursor, Event, NewEvent};
use crate::hub::Hub;
use crate::metrics::Metrics;

/// The embedded broker: per-tenant history in this process, routed straight to its hub.
pub struct MemoryBroker {
    epoch: u64,
    region: Arc<str>,
    config: HistoryConfig,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
    tenants: DashMap<Arc<str>, Arc<Mutex<TenantLog>>>,
    blocked: Blocklist,
}

/// A stored event and when it stops being replayable.
struct Stored {
    expires: Instant,
    event: Arc<Event>,
}

#[derive(Default)]
struct TenantLog {
    /// Sequence of the newest event (0 when none yet).
    head: u64,
    /// Retained events, by sequence.
    events: VecDeque<Stored>,
    /// Sequence of the newest event ever purged from the front.
    purged: u64,
    /// Events that expired while older ones were still retained (a shorter
    /// `retention_days`), stripped of their data: a resume from before one
    /// of them that would have delivered it is told `expired`.
    tombstones: Vec<Arc<Event>>,
    /// The earliest expiry among `events`.
    next_expiry: Option<Instant>,
    dedup: HashMap<String, Arc<Event>>,
    dedup_order: VecDeque<(Instant, String)>,
}

impl TenantLog {
    fn prune(&mut self, now: Instant, max: usize, window: Duration) {
        while let Some(front) = self.events.front() {
            if self.events.len() > max || front.expires <= now {
                self.purged = front.event.id.seq;
                self.events.pop_front();
            } else {
                break;
            }
        }
        if self.next_expiry.is_some_and(|at| at <= now) {
            let mut kept = VecDeque::with_capacity(self.events.len());
            for s in self.events.drain(..) {
                if s.expires <= now {
                    self.tombstones.push(Arc::new(tombstone(&s.event)));
                } else {
                    kept.push_back(s);
                }
            }
            self.events = kept;
        }
        self.next_expiry = self.events.iter().map(|s| s.expires).min();
        let purged = self.purged;
        self.tombstones.retain(|t| t.id.seq > purged);
        while let Some((at, _)) = self.dedup_order.front() {
            if now.duration_since(*at) <= window {
                break;
            }
            if let Some((_, key)) = self.dedup_order.pop_front() {
                self.dedup.remove(&key);
            }
        }
    }

    /// Index of the first retained event after `seq`.
    fn after(&self, seq: u64) -> usize {
        self.events.partition_point(|s| s.event.id.seq <= seq)
    }
}

/// What remains of an expired event: where it was, and on which topic.
fn tombstone(e: &Event) -> Event {
    Event::seal(
        NewEvent::new(
            e.tenant.clone(),
            e.topic.clone(),
            serde_json::Value::Null,
            e.region.clone(),
        ),
        e.id,
        time::OffsetDateTime::now_utc(),
    )
}

impl MemoryBroker {
    /// A broker of `region` keeping `config`'s history and routing into `hub`.
    pub fn new(
        region: Arc<str>,
        config: HistoryConfig,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            region,
            // A fresh epoch per process: cursors from a previous run are
            // reported as unknown instead of pointing at unrelated events.
            epoch: rand::random::<u32>() as u64 | 1,
            config,
            hub,
            metrics,
            tenants: DashMap::new(),
            blocked: Blocklist::default(),
        }
    }

    fn log(&self, tenant: &Arc<str>) -> Arc<Mutex<TenantLog>> {
        if let Some(l) = self.tenants.get(tenant) {
            return l.clone();
        }
        self.tenants.entry(tenant.clone()).or_default().clone()
    }

    /// Drop what retention and the size bound no longer keep.
    fn prune(&self, log: &mut TenantLog) {
        log.prune(
            Instant::now(),
            self.config.max_events_per_tenant,
            Duration::from_secs(self.config.dedup_window_seconds),
        );
    }

    fn retention(&self) -> Duration {
        Duration::from_secs(self.config.retention_seconds)
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    async fn publish(&self, new: NewEvent, retention: Duration) -> Result<Published, BrokerError> {
        let log = self.log(&new.tenant);
        let now = Instant::now();
        // The lock orders a tenant's events: sequence, store and fan-out
        // happen together, so connections see them in publish order. It is
        // never held across an await.
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        self.prune(&mut log);
        if let Some(key) = &new.idempotency_key
            && let Some(original) = log.dedup.get(key)
        {
            return Ok(Published {
                event: original.clone(),
                duplicate: true,
            });
        }
        log.head += 1;
        let id = Cursor {
            epoch: self.epoch,
            seq: log.head,
        };
        let key = new.idempotency_key.clone();
        let event = Arc::new(Event::seal(new, id, time::OffsetDateTime::now_utc()));
        if let Some(key) = key {
            log.dedup.insert(key.clone(), event.clone());
            log.dedup_order.push_back((now, key));
        }
        let expires = now + retention.min(self.retention());
        log.next_expiry = Some(log.next_expiry.map_or(expires, |at| at.min(expires)));
        log.events.push_back(Stored {
            expires,
            event: event.clone(),
        });
        if log.events.len() > self.config.max_events_per_tenant
            && let Some(old) = log.events.pop_front()
        {
            log.purged = old.event.id.seq;
        }
        crate::fanout::route(&self.hub, &self.metrics, &event);
        Ok(Published {
            event,
            duplicate: false,
        })
    }

    async fn read(
        &self,
        tenant: &Arc<str>,
        after: Option<Cursor>,
        _scope: &[Pattern],
        filter: Filter<'_>,
        limit: usize,
    ) -> Result<ReadBatch, BrokerError> {
        let log = self.log(tenant);
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        self.prune(&mut log);
        let (start, gap) = match after {
            None => (log.purged, None),
            Some(c) if c.epoch != self.epoch || c.seq > log.head => {
                (log.purged, Some(GapReason::Unknown))
            }
            Some(c) if c.seq < log.purged => (log.purged, Some(GapReason::Expired)),
            // An event after the cursor that this reader would have
            // received expired already.
            Some(c) if log.tombstones.iter().any(|t| t.id.seq > c.seq && filter(t)) => {
                (c.seq, Some(GapReason::Expired))
            }
            Some(c) => (c.seq, None),
        };
        let mut events = Vec::new();
        let mut next = start;
        let mut more = false;
        for ev in log.events.range(log.after(start)..).map(|s| &s.event) {
            if events.len() == limit {
                more = true;
                break;
            }
            next = ev.id.seq;
            if filter(ev) {
                events.push(ev.clone());
            }
        }
        Ok(ReadBatch {
            events,
            gap,
            next: Cursor {
                epoch: self.epoch,
                seq: next,
            },
            more,
            seen_elsewhere: None,
        })
    }

    async fn latest(
        &self,
        tenant: &Arc<str>,
        _scope: &[Pattern],
        filter: Filter<'_>,
        limit: usize,
    ) -> Result<Latest, BrokerError> {
        let log = self.log(tenant);
        let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
        self.prune(&mut log);
        let kept: Vec<Arc<Event>> = log
            .events
            .iter()
            .filter(|s| filter(&s.event))
            .map(|s| s.event.clone())
            .collect();
        Ok(super::newest_per_topic(kept, limit))
    }

    fn head(&self, tenant: &Arc<str>) -> Cursor {
        let seq = self
            .tenants
            .get(tenant)
            .map_or(0, |l| l.lock().unwrap_or_else(|e| e.into_inner()).head);
        Cursor {
            epoch: self.epoch,
            seq,
        }
    }

    async fn subscribe(&self, _tenant: &Arc<str>, _pattern: &Pattern) -> Result<(), BrokerError> {
        // Every event is routed to the local hub already.
        Ok(())
    }

    async fn unsubscribe(&self, _tenant: &Arc<str>, _pattern: &Pattern) {}

    async fn live_from(
        &self,
        _tenant: &Arc<str>,
        _pattern: &Pattern,
        registered_at: u64,
    ) -> Result<u64, BrokerError> {
        // Registration and fan-out are ordered by the hub's lock: exact.
        Ok(registered_at)
    }

    async fn erase(
        &self,
        tenant: &Arc<str>,
        subject: &str,
        _pace: Duration,
    ) -> Result<ErasureCounts, BrokerError> {
        let mut erased: Vec<Arc<Event>> = Vec::new();
        let mut dedup_records = 0;
        if let Some(log) = self.tenants.get(tenant).map(|l| l.clone()) {
            let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
            let is_subject = |e: &Event| e.data_subject.as_deref() == Some(subject);
            let mut kept = VecDeque::with_capacity(log.events.len());
            for s in log.events.drain(..) {
                if is_subject(&s.event) {
                    erased.push(s.event);
                } else {
                    kept.push_back(s);
                }
            }
            log.events = kept;
            // Idempotency records of events already gone from history too.
            let before = log.dedup.len();
            log.dedup.retain(|_, e| !is_subject(e));
            dedup_records = (before - log.dedup.len()) as u64;
            log.next_expiry = log.events.iter().map(|s| s.expires).min();
        }
        for notice in super::erased_notices(tenant, &erased) {
            self.hub.dispatch(&Arc::new(notice));
        }
        Ok(ErasureCounts {
            regions: [(self.region.to_string(), erased.len() as u64)]
                .into_iter()
                .collect(),
            dedup_records,
            unreachable: Vec::new(),
        })
    }

    async fn block_subject(&self, key: String, until_ms: i64) -> Result<(), BrokerError> {
        self.blocked.set(key, until_ms);
        Ok(())
    }

    fn subject_blocked(&self, key: &str) -> bool {
        self.blocked.blocked(key)
    }

    fn health(&self) -> (&'static str, bool) {
        ("event_bus", true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_config::Topic;

    fn broker(max: usize) -> MemoryBroker {
        let metrics = Arc::new(Metrics::default());
        MemoryBroker::new(
            "r".into(),
            HistoryConfig {
                max_events_per_tenant: max,
                ..HistoryConfig::default()
            },
            Arc::new(Hub::default()),
            metrics,
        )
    }

    fn new(tenant: &str, topic: &str, key: Option<&str>) -> NewEvent {
        NewEvent {
            tenant: tenant.into(),
            topic: Topic::parse(topic).unwrap(),
            data: serde_json::json!({}),
            region: "r".into(),
            idempotency_key: key.map(Into::into),
            gdpr_context: None,
            traceparent: None,
            message_type: None,
            publisher: None,
            resident: false,
        }
    }

    const DAY: Duration = Duration::from_secs(86400);

    #[tokio::test]
    async fn read_after_cursor_dedup_and_gaps() {
        let b = broker(3);
        let t: Arc<str> = "t".into();
        let all: Filter = &|_| true;
        let first = b.publish(new("t", "a.b", Some("k")), DAY).await.unwrap();
        let again = b.publish(new("t", "a.b", Some("k")), DAY).await.unwrap();
        assert!(again.duplicate);
        assert_eq!(again.event.id, first.event.id);
        // Same key, other tenant: not a duplicate.
        assert!(
            !b.publish(new("u", "a.b", Some("k")), DAY)
                .await
                .unwrap()
                .duplicate
        );
        for _ in 0..2 {
            b.publish(new("t", "a.c", None), DAY).await.unwrap();
        }
        let r = b
            .read(&t, Some(first.event.id), &[], all, 10)
            .await
            .unwrap();
        assert_eq!(r.gap, None);
        assert_eq!(
            r.events.iter().map(|e| e.id.seq).collect::<Vec<_>>(),
            [2, 3]
        );
        // Two more push seq 1 and 2 out of a 3-event history.
        for _ in 0..2 {
            b.publish(new("t", "a.c", None), DAY).await.unwrap();
        }
        let r = b
            .read(&t, Some(first.event.id), &[], all, 10)
            .await
            .unwrap();
        assert_eq!(r.gap, Some(GapReason::Expired));
        assert_eq!(
            r.events.iter().map(|e| e.id.seq).collect::<Vec<_>>(),
            [3, 4, 5]
        );
        let foreign = Cursor {
            epoch: b.epoch + 2,
            seq: 1,
        };
        let r = b.read(&t, Some(foreign), &[], all, 10).await.unwrap();
        assert_eq!(r.gap, Some(GapReason::Unknown));
        let future = Cursor {
            epoch: b.epoch,
            seq: 99,
        };
        assert_eq!(
            b.read(&t, Some(future), &[], all, 10).await.unwrap().gap,
            Some(GapReason::Unknown)
        );
        let r = b.read(&t, None, &[], all, 2).await.unwrap();
        assert!(r.more);
        assert_eq!(r.next.seq, 4);
    }
}
