//! The region's history stream: its configuration, creation and state,
//! and turning what it stores into events.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::Message;
use async_nats::jetstream::stream;
use switchboard_config::{HistoryConfig, NatsConfig};

use super::subject::Subjects;
use super::{NatsBroker, REQUEST_TIMEOUT, WireEvent, unavailable};
use crate::broker::BrokerError;
use crate::event::{Cursor, Event, NewEvent};

/// A stream epoch from its creation time: never 0 (0 marks foreign cursors).
pub(super) fn epoch_of(created: time::OffsetDateTime) -> u64 {
    let nanos = created.unix_timestamp_nanos() as u64;
    (nanos >> 8) | 1
}

impl NatsBroker {
    pub(super) fn epoch(&self) -> Result<u64, BrokerError> {
        match self.state.epoch.load(Ordering::Acquire) {
            0 => Err(unavailable("the history stream is not ready yet")),
            e => Ok(e),
        }
    }

    /// The newest stream sequence this process knows of.
    pub(super) fn head_seq(&self) -> u64 {
        self.state.head.load(Ordering::Acquire)
    }

    pub(super) fn note_head(&self, seq: u64) {
        self.state.head.fetch_max(seq, Ordering::AcqRel);
    }

    /// A handle on the region's stream, without asking NATS for its
    /// information: consumers, direct gets and deletes need only its name,
    /// and every request a resume saves is one fewer for JetStream's API
    /// during a reconnect storm.
    pub(super) async fn stream(&self) -> Result<stream::Stream<()>, BrokerError> {
        self.js
            .get_stream_no_info(&self.stream_name)
            .await
            .map_err(unavailable)
    }

    /// The stream's state as of a request sent after this call began (so
    /// it covers everything the caller did before, e.g. a subscription it
    /// flushed). Callers arriving together share one request.
    pub(super) async fn stream_state(&self) -> Result<stream::State, BrokerError> {
        let asked = tokio::time::Instant::now();
        let mut cached = self.info.lock().await;
        if let Some((sent, state)) = &*cached
            && *sent >= asked
        {
            return Ok(state.clone());
        }
        let sent = tokio::time::Instant::now();
        let info = Box::pin(tokio::time::timeout(REQUEST_TIMEOUT, async {
            self.stream().await?.get_info().await.map_err(unavailable)
        }))
        .await
        .map_err(unavailable)??;
        self.note_head(info.state.last_sequence);
        *cached = Some((sent, info.state.clone()));
        Ok(info.state)
    }

    /// Build an event from what the stream stored.
    pub(super) fn seal(
        &self,
        subject: &str,
        seq: u64,
        stored: time::OffsetDateTime,
        payload: &[u8],
        headers: Option<&HeaderMap>,
    ) -> Option<Event> {
        let epoch = self.state.epoch.load(Ordering::Acquire);
        let (origin, tenant, topic) = self.subjects.parse_event(subject)?;
        let traceparent = headers.and_then(header_traceparent);
        // Identity across regions: the origin region and the event's
        // sequence in the origin's stream.
        let origin_seq = if origin == self.subjects.region() {
            Some(seq)
        } else {
            headers.and_then(super::failover::sourced_sequence)
        };
        let origin_id = origin_seq.map(|s| crate::event::Origin {
            region: origin.as_str().into(),
            seq: s,
        });
        let wire: WireEvent = serde_json::from_slice(payload).ok()?;
        let region = wire
            .region
            .filter(|r| switchboard_config::valid_region(r))
            .unwrap_or(origin);
        let mut event = Event::seal(
            NewEvent {
                tenant: tenant.into(),
                topic,
                data: wire.data,
                region: region.into(),
                idempotency_key: wire.idempotency_key,
                gdpr_context: wire.gdpr_context,
                traceparent,
                message_type: wire.message_type,
                publisher: wire.publisher,
                resident: false,
            },
            Cursor { epoch, seq },
            stored,
        );
        event.origin = origin_id.map(Box::new);
        Some(event)
    }

    /// Build an event from a republished message (headers carry the stored
    /// subject, sequence and time).
    pub(super) fn seal_republished(&self, msg: &Message) -> Option<Event> {
        let headers = msg.headers.as_ref()?;
        let subject = headers.get("Nats-Subject")?.as_str();
        let seq: u64 = headers.get("Nats-Sequence")?.as_str().parse().ok()?;
        let stored = headers
            .get("Nats-Time-Stamp")
            .and_then(|t| {
                time::OffsetDateTime::parse(
                    t.as_str(),
                    &time::format_description::well_known::Rfc3339,
                )
                .ok()
            })
            .unwrap_or_else(time::OffsetDateTime::now_utc);
        self.seal(subject, seq, stored, &msg.payload, Some(headers))
    }

    pub(super) async fn get_stored(&self, seq: u64) -> Result<Option<Event>, BrokerError> {
        let stream = self.stream().await?;
        let msg = match tokio::time::timeout(REQUEST_TIMEOUT, stream.direct_get(seq)).await {
            Ok(Ok(m)) => m,
            Ok(Err(_)) => return Ok(None),
            Err(e) => return Err(unavailable(e)),
        };
        Ok(self.seal(
            &msg.subject,
            msg.sequence,
            msg.time,
            &msg.payload,
            Some(&msg.headers),
        ))
    }
}

pub(super) fn header_traceparent(headers: &HeaderMap) -> Option<String> {
    headers.get("traceparent").map(|v| v.as_str().to_owned())
}

pub(super) fn stream_config(
    nats: &NatsConfig,
    history: &HistoryConfig,
    subjects: &Subjects,
    region: &str,
) -> stream::Config {
    let sources: Vec<stream::Source> = nats
        .regions
        .iter()
        .filter(|r| r.as_str() != region)
        .map(|r| stream::Source {
            name: subjects.stream_name(r),
            filter_subject: Some(subjects.region_events(r)),
            ..Default::default()
        })
        .collect();
    stream::Config {
        name: subjects.stream_name(region),
        description: Some(format!("Switchboard history of region {region}")),
        subjects: vec![
            subjects.region_events(region),
            subjects.resident_events(region),
        ],
        sources: (!sources.is_empty()).then_some(sources),
        republish: Some(stream::Republish {
            source: ">".into(),
            destination: subjects.republish_destination(),
            headers_only: false,
        }),
        max_age: Duration::from_secs(history.retention_seconds),
        // JetStream refuses a dedup window longer than the retention.
        duplicate_window: Duration::from_secs(
            history
                .dedup_window_seconds
                .clamp(1, history.retention_seconds.max(1)),
        ),
        num_replicas: nats.stream_replicas,
        allow_direct: true,
        // Events with a shorter retention than the stream's carry Nats-TTL.
        allow_message_ttl: true,
        storage: stream::StorageType::File,
        placement: nats.placement_cluster.as_ref().map(|c| stream::Placement {
            cluster: Some(c.clone()),
            tags: Vec::new(),
        }),
        ..Default::default()
    }
}

/// Whether a stream definitely does not exist (not merely unreachable).
async fn stream_missing(broker: &NatsBroker, name: &str) -> bool {
    use async_nats::jetstream::ErrorCode;
    use async_nats::jetstream::context::GetStreamErrorKind;
    match tokio::time::timeout(REQUEST_TIMEOUT, broker.js.get_stream(name)).await {
        Ok(Err(e)) => matches!(
            e.kind(),
            GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND
        ),
        _ => false,
    }
}

/// The sources to configure now: every other region's stream, except those
/// that definitely do not exist yet and that the stream does not source
/// already. JetStream retries a source whose stream is missing with a
/// growing backoff (up to minutes), so a region started after this one
/// would wait that long for its first events to be sourced; instead such a
/// source is added the moment its stream appears ([`add_sources_later`]).
async fn sources_now(
    broker: &NatsBroker,
    config: &stream::Config,
) -> (Vec<stream::Source>, Vec<stream::Source>) {
    let current: Vec<String> =
        match tokio::time::timeout(REQUEST_TIMEOUT, broker.js.get_stream(&config.name)).await {
            Ok(Ok(s)) => s
                .cached_info()
                .config
                .sources
                .iter()
                .flatten()
                .map(|s| s.name.clone())
                .collect(),
            _ => Vec::new(),
        };
    let mut now = Vec::new();
    let mut later = Vec::new();
    for source in config.sources.iter().flatten() {
        if !current.contains(&source.name) && stream_missing(broker, &source.name).await {
            later.push(source.clone());
        } else {
            now.push(source.clone());
        }
    }
    (now, later)
}

/// Create or update the region's stream, retrying until NATS answers.
pub(super) async fn ensure_stream(broker: Arc<NatsBroker>, config: stream::Config) {
    let mut delay = Duration::from_millis(100);
    loop {
        let (now, later) = sources_now(&broker, &config).await;
        let applied = stream::Config {
            sources: (!now.is_empty()).then_some(now),
            ..config.clone()
        };
        let attempt = tokio::time::timeout(
            REQUEST_TIMEOUT,
            broker.js.create_or_update_stream(applied.clone()),
        )
        .await;
        match attempt {
            Ok(Ok(info)) => {
                broker
                    .state
                    .epoch
                    .store(epoch_of(info.created), Ordering::Release);
                broker.note_head(info.state.last_sequence);
                broker.state.stream_ready.store(true, Ordering::Release);
                tracing::info!(stream = %config.name, last_sequence = info.state.last_sequence, "history stream ready");
                if !later.is_empty() {
                    tokio::spawn(add_sources_later(broker.clone(), applied, later));
                }
                return;
            }
            Ok(Err(e)) => {
                tracing::warn!(stream = %config.name, error = %e, "cannot create the history stream yet")
            }
            Err(_) => tracing::warn!(stream = %config.name, "NATS not answering yet"),
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(2));
    }
}

/// Add each deferred source as soon as its region's stream exists.
async fn add_sources_later(
    broker: Arc<NatsBroker>,
    mut config: stream::Config,
    mut pending: Vec<stream::Source>,
) {
    let names: Vec<&str> = pending.iter().map(|s| s.name.as_str()).collect();
    tracing::info!(stream = %config.name, waiting_for = ?names, "sourcing other regions once their streams exist");
    while !pending.is_empty() {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut appeared = Vec::new();
        let mut still = Vec::new();
        for source in pending {
            if stream_missing(&broker, &source.name).await {
                still.push(source);
            } else {
                appeared.push(source);
            }
        }
        pending = still;
        if appeared.is_empty() {
            continue;
        }
        let mut sources = config.sources.clone().unwrap_or_default();
        sources.extend(appeared.iter().cloned());
        let updated = stream::Config {
            sources: Some(sources),
            ..config.clone()
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, broker.js.update_stream(updated.clone())).await
        {
            Ok(Ok(_)) => {
                tracing::info!(stream = %config.name, added = ?appeared.iter().map(|s| &s.name).collect::<Vec<_>>(), "now sourcing");
                config = updated;
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => "timed out".into(),
                };
                tracing::warn!(stream = %config.name, error = %why, "cannot add sources yet; retrying");
                pending.extend(appeared);
            }
        }
    }
}

/// Keep the known head fresh while connected, so that after a disconnect
/// the catch-up starts close to where live delivery stopped.
pub(super) async fn refresh_head(broker: std::sync::Weak<NatsBroker>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(b) = broker.upgrade() else { return };
        if b.state.connected.load(Ordering::Acquire) && b.state.stream_ready.load(Ordering::Acquire)
        {
            let _ = b.stream_state().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_stream_sources_the_other_regions_and_republishes_its_own() {
        let nats = NatsConfig {
            regions: vec!["eu".into(), "us".into(), "ap".into()],
            stream_replicas: 3,
            placement_cluster: Some("eu-nats".into()),
            ..NatsConfig::default()
        };
        let history = HistoryConfig {
            retention_seconds: 60,
            dedup_window_seconds: 600,
            ..HistoryConfig::default()
        };
        let subjects = Subjects::new("sb", "eu");
        let c = stream_config(&nats, &history, &subjects, "eu");
        assert_eq!(c.name, "SB_eu");
        assert_eq!(c.subjects, ["sb.ev.eu.>", "sb.ev.eu~local.>"]);
        assert!(c.allow_message_ttl);
        let sources: Vec<(String, Option<String>)> = c
            .sources
            .unwrap()
            .into_iter()
            .map(|s| (s.name, s.filter_subject))
            .collect();
        assert_eq!(
            sources,
            [
                ("SB_us".to_owned(), Some("sb.ev.us.>".to_owned())),
                ("SB_ap".to_owned(), Some("sb.ev.ap.>".to_owned())),
            ],
            "every other region, filtered to the events published there"
        );
        let republish = c.republish.unwrap();
        assert_eq!(republish.destination, "sb.rp.eu.>");
        assert!(!republish.headers_only);
        assert_eq!(c.max_age, Duration::from_secs(60));
        // JetStream refuses a dedup window longer than the retention.
        assert_eq!(c.duplicate_window, Duration::from_secs(60));
        assert_eq!(c.num_replicas, 3);
        assert!(c.allow_direct);
        assert_eq!(c.placement.unwrap().cluster.as_deref(), Some("eu-nats"));
        // One region alone sources nothing.
        let alone = stream_config(&NatsConfig::default(), &history, &subjects, "eu");
        assert!(alone.sources.is_none());
    }

    #[test]
    fn epochs_are_never_zero_and_follow_creation_time() {
        let t = time::macros::datetime!(2026-11-22 07:00:00 UTC);
        let e = epoch_of(t);
        assert_ne!(e, 0, "0 marks foreign cursors");
        assert_ne!(epoch_of(time::OffsetDateTime::UNIX_EPOCH), 0);
        assert!(epoch_of(t + Duration::from_secs(1)) > e);
        assert_eq!(epoch_of(t), e, "the same stream gives the same epoch");
    }
}
