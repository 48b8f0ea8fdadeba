//! The broker boundary: where events are stored, deduplicated and routed to
//! the hubs that want them. The embedded broker ([`memory`]) keeps history
//! in this process; a NATS/JetStream broker fills the same contract so that
//! clients see the same behaviour from one process or many.

pub mod memory;
pub mod nats;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use switchboard_config::{Pattern, Topic};

use crate::data_protection::ErasureCounts;
use crate::event::{Cursor, Event, NewEvent};

/// Why the broker could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The event bus cannot be reached, or did not answer in time.
    #[error("the event bus is unavailable: {0}")]
    Unavailable(String),
    /// The event bus refused or lost a subscription: nothing would be
    /// delivered on it.
    #[error("the event bus refused the subscription to {subject}: {source}")]
    Subscribe {
        /// The NATS subject.
        subject: String,
        /// What NATS said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

/// Result of a publish.
#[derive(Debug, Clone)]
pub struct Published {
    /// The stored event (the original for a duplicate).
    pub event: Arc<Event>,
    /// True when the idempotency key was seen within the dedup window: `event`
    /// is the original and nothing was delivered again.
    pub duplicate: bool,
}

/// Why history could not resume exactly where a cursor pointed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapReason {
    /// Older than retention: events after it were purged.
    Expired,
    /// Not a position of this history (another epoch, or in the future).
    Unknown,
}

impl GapReason {
    /// The reason as it appears on the wire (`expired`, `unknown`).
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::Expired => "expired",
            GapReason::Unknown => "unknown",
        }
    }
}

/// One page of history.
#[derive(Debug)]
pub struct ReadBatch {
    /// Matching events, oldest first.
    pub events: Vec<Arc<Event>>,
    /// Set when the cursor could not be honoured; reading then started at the
    /// oldest retained event.
    pub gap: Option<GapReason>,
    /// Where the next page starts.
    pub next: Cursor,
    /// True when more events exist after `next`.
    pub more: bool,
    /// Set when the cursor was issued in another region and translated:
    /// what the client saw there, to be skipped wherever it turns up
    /// (later pages, live delivery).
    pub seen_elsewhere: Option<Arc<SeenElsewhere>>,
}

impl ReadBatch {
    /// An empty page that has read up to `next`.
    pub fn at(next: Cursor) -> Self {
        Self {
            events: Vec::new(),
            gap: None,
            next,
            more: false,
            seen_elsewhere: None,
        }
    }
}

/// What a client saw in another region's history: per origin region, the
/// newest origin sequence (events of one origin reach every region in
/// their origin order, so this names a prefix of each origin's events).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenElsewhere {
    /// (origin region, newest origin sequence seen).
    pub per_origin: Vec<(Box<str>, u64)>,
}

impl SeenElsewhere {
    /// Whether the client already saw `event`.
    pub fn saw(&self, event: &Event) -> bool {
        let Some(origin) = &event.origin else {
            return false;
        };
        self.per_origin
            .iter()
            .any(|(region, seq)| *region == origin.region && origin.seq <= *seq)
    }
}

/// The newest event per topic (a snapshot).
#[derive(Debug, Default)]
pub struct Latest {
    /// One event per topic, oldest first.
    pub events: Vec<Arc<Event>>,
    /// More topics matched than were returned.
    pub more: bool,
}

/// Keep the newest event of each topic, oldest first, at most `limit`
/// topics (`more` when there were others).
pub fn newest_per_topic(events: impl IntoIterator<Item = Arc<Event>>, limit: usize) -> Latest {
    let mut by_topic: std::collections::HashMap<Topic, Arc<Event>> =
        std::collections::HashMap::new();
    for e in events {
        match by_topic.get(&e.topic) {
            Some(held) if held.stored_at_ms > e.stored_at_ms => {}
            Some(held) if held.stored_at_ms == e.stored_at_ms && held.id.seq > e.id.seq => {}
            _ => {
                by_topic.insert(e.topic.clone(), e);
            }
        }
    }
    let mut events: Vec<Arc<Event>> = by_topic.into_values().collect();
    events.sort_by_key(|e| (e.stored_at_ms, e.id.seq));
    let more = events.len() > limit;
    if more {
        events.drain(..events.len() - limit);
    }
    Latest { events, more }
}

/// Which events a history read returns.
pub type Filter<'a> = &'a (dyn Fn(&Event) -> bool + Send + Sync);

#[async_trait]
/// Where events are stored, deduplicated and routed to the hubs that want them. Both brokers pass the same contract suite (`tests/contract.rs`).
pub trait Broker: Send + Sync + 'static {
    /// Store the event (or find the original for a repeated idempotency key)
    /// and route it to every interested hub.
    async fn publish(&self, event: NewEvent, retention: Duration)
    -> Result<Published, BrokerError>;

    /// Store several events, in this order, each standing alone (one
    /// refused does not stop the rest); the results come back in the same
    /// order. By default one after another; a broker that can have many
    /// acknowledgements in flight (JetStream) sends them all first.
    async fn publish_all(
        &self,
        events: Vec<(NewEvent, Duration)>,
    ) -> Vec<Result<Published, BrokerError>> {
        let mut results = Vec::with_capacity(events.len());
        for (event, retention) in events {
            results.push(self.publish(event, retention).await);
        }
        results
    }

    /// History of one tenant after `after` (from the oldest retained event
    /// when `None`), keeping events for which `filter` is true. `scope`
    /// names the patterns the filter keeps (empty: unknown), so a broker
    /// can read just those topics; `filter` still decides.
    async fn read(
        &self,
        tenant: &Arc<str>,
        after: Option<Cursor>,
        scope: &[Pattern],
        filter: Filter<'_>,
        limit: usize,
    ) -> Result<ReadBatch, BrokerError>;

    /// The newest retained event of each topic of `tenant` that `filter`
    /// keeps (`scope`: the patterns it keeps, as for [`Broker::read`]),
    /// oldest first; at most `limit` topics, `more` set when others exist.
    /// In cluster mode this is the last message per subject in the
    /// region's stream, not any gateway's memory.
    async fn latest(
        &self,
        tenant: &Arc<str>,
        scope: &[Pattern],
        filter: Filter<'_>,
        limit: usize,
    ) -> Result<Latest, BrokerError>;

    /// The cursor of the newest event of a tenant (seq 0 when there is none).
    fn head(&self, tenant: &Arc<str>) -> Cursor;

    /// A local subscription to a pattern is being added. Brokers count them
    /// and hold one upstream subscription per distinct (tenant, pattern)
    /// while the count is above zero. An error means nothing would be
    /// delivered: the count is not taken and the caller must not confirm
    /// the subscription.
    async fn subscribe(&self, tenant: &Arc<str>, pattern: &Pattern) -> Result<(), BrokerError>;

    /// A local subscription taken by a successful [`Broker::subscribe`] is
    /// gone. Giving back the last one drops the upstream subscription.
    async fn unsubscribe(&self, tenant: &Arc<str>, pattern: &Pattern);

    /// For a subscription to `pattern` just registered in the hub (which
    /// reported `registered_at`) and whose interest is in place: the
    /// sequence after which every matching event is delivered live. Events
    /// at or before it belong to replay.
    async fn live_from(
        &self,
        tenant: &Arc<str>,
        pattern: &Pattern,
        registered_at: u64,
    ) -> Result<u64, BrokerError>;

    /// Remove every retained event of `tenant` whose data subject is
    /// `subject` from history (every region's, in cluster mode) and from
    /// the idempotency records, and send `data.erased` notices to the
    /// connections subscribed to their topics. Idempotent: asking again
    /// erases what is left. `pace` is a pause between deletions.
    async fn erase(
        &self,
        tenant: &Arc<str>,
        subject: &str,
        pace: Duration,
    ) -> Result<ErasureCounts, BrokerError>;

    /// Refuse publishes for the subject with this
    /// [`subject_key`](crate::data_protection::subject_key) until `until_ms`
    /// (Unix ms; in the past: lift the block), on every gateway.
    async fn block_subject(&self, key: String, until_ms: i64) -> Result<(), BrokerError>;

    /// Whether publishes for this subject key are refused.
    fn subject_blocked(&self, key: &str) -> bool;

    /// Keep an erasure's record where every gateway finds it (cluster
    /// mode; the embedded broker's history dies with its process, so it
    /// keeps none).
    async fn record_erasure(
        &self,
        _job: &crate::data_protection::ErasureJob,
    ) -> Result<(), BrokerError> {
        Ok(())
    }

    /// Erasures left running by a gateway that stopped (no heartbeat for
    /// `stale`), each claimed by this gateway so that one resumes it.
    async fn claim_stale_erasures(
        &self,
        _stale: Duration,
    ) -> Vec<crate::data_protection::ErasureJob> {
        Vec::new()
    }

    /// Component name and whether it is healthy, for the health endpoint.
    fn health(&self) -> (&'static str, bool);
}

/// The `data.erased` notices for erased events: one per topic, listing the
/// ids, for the connections subscribed to it.
pub fn erased_notices(tenant: &Arc<str>, erased: &[Arc<Event>]) -> Vec<Event> {
    let mut by_topic: std::collections::BTreeMap<&str, (&Event, Vec<String>)> =
        std::collections::BTreeMap::new();
    for e in erased {
        by_topic
            .entry(e.topic.as_str())
            .or_insert_with(|| (e, Vec::new()))
            .1
            .push(e.id.to_string());
    }
    let now = time::OffsetDateTime::now_utc();
    by_topic
        .into_values()
        .map(|(first, ids)| {
            Event::notice(
                tenant.clone(),
                first.topic.clone(),
                first.region.clone(),
                crate::event::ERASED_NOTICE,
                &serde_json::json!({ "event_ids": ids }),
                now,
            )
        })
        .collect()
}
