//! Erasure in cluster mode: finding a data subject's events in every
//! region's stream and erasing them there (JetStream's secure delete
//! overwrites the stored message), the subjects blocked afterwards and the
//! erasure records, both in one key-value bucket every gateway watches, and
//! the `data.erased` notices sent to each region's gateways.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{consumer, kv};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use super::region_stream::epoch_of;
use super::{NatsBroker, REQUEST_TIMEOUT, WireEvent, unavailable};
use crate::broker::BrokerError;
use crate::data_protection::{ErasureCounts, ErasureJob, ErasureState, GdprContext};
use crate::event::{Cursor, Event, NewEvent};
use crate::hub::Hub;

/// Keys of the erasure bucket: `block.<subject key>` (value: Unix ms until
/// which publishes are refused) and `job.<erasure id>` (an erasure record).
const BLOCK: &str = "block.";
const JOB: &str = "job.";

/// The erasure bucket's name for a subject prefix.
pub(super) fn bucket_name(prefix: &str) -> String {
    format!("{}_ERASURE", prefix.to_uppercase())
}

/// The notices of one region: the ids its stream gave the erased events,
/// by topic.
#[derive(Debug, Serialize, Deserialize)]
struct Notices {
    tenant: String,
    topics: BTreeMap<String, Vec<String>>,
}

/// Tries of one region's erasure in one pass before it counts as unreachable.
const ERASE_ATTEMPTS: u32 = 3;

impl NatsBroker {
    /// Create (or open) the erasure bucket, then keep the block list in
    /// step with it. Retries until NATS answers.
    pub(super) async fn watch_erasures(self: Arc<Self>, replicas: usize) {
        let mut delay = Duration::from_millis(100);
        let store = loop {
            let created = tokio::time::timeout(
                REQUEST_TIMEOUT,
                self.js.create_key_value(kv::Config {
                    bucket: bucket_name(self.subjects.prefix()),
                    description: "Switchboard erasure records and blocked data subjects".into(),
                    history: 1,
                    num_replicas: replicas,
                    storage: async_nats::jetstream::stream::StorageType::File,
                    ..Default::default()
                }),
            )
            .await;
            match created {
                Ok(Ok(s)) => break s,
                Ok(Err(e)) => tracing::warn!(error = %e, "cannot open the erasure bucket yet"),
                Err(_) => tracing::warn!("NATS not answering for the erasure bucket yet"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(2));
        };
        let _ = self.erasures.set(store.clone());
        loop {
            match store.watch_with_history(format!("{BLOCK}>")).await {
                Ok(mut watch) => {
                    while let Some(entry) = watch.next().await {
                        let Ok(entry) = entry else { break };
                        let Some(key) = entry.key.strip_prefix(BLOCK) else {
                            continue;
                        };
                        let until = match entry.operation {
                            kv::Operation::Put => std::str::from_utf8(&entry.value)
                                .ok()
                                .and_then(|v| v.parse().ok())
                                .unwrap_or(0),
                            _ => 0,
                        };
                        self.blocked.set(key.to_owned(), until);
                    }
                }
                Err(e) => tracing::warn!(error = %e, "cannot watch blocked data subjects"),
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    pub(super) fn erasure_bucket(&self) -> Result<&kv::Store, BrokerError> {
        self.erasures
            .get()
            .ok_or_else(|| unavailable("the erasure bucket is not ready yet"))
    }

    /// Block (or lift) a subject on every gateway.
    pub(super) async fn put_block(&self, key: String, until_ms: i64) -> Result<(), BrokerError> {
        let store = self.erasure_bucket()?;
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            store.put(format!("{BLOCK}{key}"), until_ms.to_string().into()),
        )
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        self.blocked.set(key, until_ms);
        Ok(())
    }

    /// Store an erasure record.
    pub(super) async fn put_job(&self, job: &ErasureJob) -> Result<(), BrokerError> {
        let store = self.erasure_bucket()?;
        let body = serde_json::to_vec(job).map_err(unavailable)?;
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            store.put(format!("{JOB}{}", job.id), body.into()),
        )
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        Ok(())
    }

    /// Running erasures whose gateway went quiet, claimed by a
    /// compare-and-set on their record (one gateway wins each).
    pub(super) async fn claim_stale(&self, stale: Duration) -> Vec<ErasureJob> {
        let Ok(store) = self.erasure_bucket() else {
            return Vec::new();
        };
        let Ok(Ok(mut keys)) = tokio::time::timeout(REQUEST_TIMEOUT, store.keys()).await else {
            return Vec::new();
        };
        let mut names = Vec::new();
        while let Ok(Some(Ok(k))) = tokio::time::timeout(REQUEST_TIMEOUT, keys.next()).await {
            if k.starts_with(JOB) {
                names.push(k);
            }
        }
        let now = crate::data_protection::now_ms();
        let mut claimed = Vec::new();
        for key in names {
            let Ok(Some(entry)) = store.entry(key.clone()).await else {
                continue;
            };
            let Ok(mut job) = serde_json::from_slice::<ErasureJob>(&entry.value) else {
                continue;
            };
            if job.state != ErasureState::Running
                || now - job.heartbeat_ms < stale.as_millis() as i64
            {
                continue;
            }
            job.heartbeat_ms = now;
            job.resumed += 1;
            let Ok(body) = serde_json::to_vec(&job) else {
                continue;
            };
            if store
                .update(&key, body.into(), entry.revision)
                .await
                .is_ok()
            {
                claimed.push(job);
            }
        }
        claimed
    }

    /// Erase the subject's events of `tenant` from every region's stream.
    /// Two passes: an event that was being sourced from one region to
    /// another during the first is found by the second.
    pub(super) async fn erase_everywhere(
        &self,
        tenant: &Arc<str>,
        subject: &str,
        pace: Duration,
    ) -> ErasureCounts {
        let mut counts = ErasureCounts::default();
        for pass in 0..2 {
            let mut unreachable = Vec::new();
            for region in &self.regions {
                // A transient failure (a request lost between clusters) is
                // tried again before the region is reported unreachable.
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    match self.erase_in(region, tenant, subject, pace).await {
                        Ok(n) => *counts.regions.entry(region.clone()).or_default() += n,
                        Err(e) if attempt < ERASE_ATTEMPTS => {
                            tracing::info!(region, pass, attempt, error = %e, "erasing in this region's stream failed; trying again");
                            tokio::time::sleep(Duration::from_millis(200 * attempt as u64)).await;
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(region, pass, error = %e, "cannot erase in this region's stream");
                            unreachable.push(region.clone());
                        }
                    }
                    break;
                }
            }
            counts.unreachable = unreachable;
        }
        counts
    }

    /// Erase in one region's stream; returns how many events were erased
    /// and tells that region's gateways which ids are gone.
    async fn erase_in(
        &self,
        region: &str,
        tenant: &Arc<str>,
        subject: &str,
        pace: Duration,
    ) -> Result<u64, BrokerError> {
        self.tails.forget(tenant);
        self.forget_windows(tenant).await;
        let stream = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.js.get_stream(self.subjects.stream_name(region)),
        )
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        let epoch = epoch_of(stream.cached_info().created);
        let reader = tokio::time::timeout(
            REQUEST_TIMEOUT,
            stream.create_consumer(consumer::pull::Config {
                filter_subject: self.subjects.tenant_history(tenant),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                memory_storage: true,
                num_replicas: 1,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            }),
        )
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        let mut found: Vec<(u64, Event)> = Vec::new();
        let read = self
            .read_subject_events(&reader, region, tenant, subject, epoch, &mut found)
            .await;
        let name = reader.cached_info().name.clone();
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.delete_consumer(&name)).await;
        read?;
        let mut erased = Vec::new();
        for (seq, stub) in found {
            // Secure delete: the stored message is overwritten, not only
            // unlinked. Gone already (another erasure, expiry): not counted.
            let deleted = tokio::time::timeout(REQUEST_TIMEOUT, stream.delete_message(seq))
                .await
                .map_err(unavailable)?;
            if let Ok(true) = deleted {
                erased.push(Arc::new(stub));
            }
            if !pace.is_zero() {
                tokio::time::sleep(pace).await;
            }
        }
        // A copy read while the messages were being deleted may hold some.
        self.tails.forget(tenant);
        self.forget_windows(tenant).await;
        if !erased.is_empty() {
            let notices = Notices {
                tenant: tenant.to_string(),
                topics: erased.iter().fold(BTreeMap::new(), |mut m, e| {
                    m.entry(e.topic.as_str().to_owned())
                        .or_insert_with(Vec::new)
                        .push(e.id.to_string());
                    m
                }),
            };
            let body = serde_json::to_vec(&notices).map_err(unavailable)?;
            let _ = self
                .client
                .publish(self.subjects.erased_notices(region, tenant), body.into())
                .await;
        }
        Ok(erased.len() as u64)
    }
}

impl NatsBroker {
    /// Read every stored event of `tenant` through `reader` (a consumer on
    /// `region`'s stream) and keep the positions of `subject`'s.
    async fn read_subject_events(
        &self,
        reader: &consumer::Consumer<consumer::pull::Config>,
        region: &str,
        tenant: &Arc<str>,
        subject: &str,
        epoch: u64,
        found: &mut Vec<(u64, Event)>,
    ) -> Result<(), BrokerError> {
        let mut pending = reader.cached_info().num_pending;
        let mut refused = 0;
        'pull: while pending > 0 {
            let mut batch = reader
                .fetch()
                .max_messages(512)
                .expires(Duration::from_secs(2))
                .messages()
                .await
                .map_err(unavailable)?;
            let mut got = 0;
            while let Some(msg) = tokio::time::timeout(REQUEST_TIMEOUT, batch.next())
                .await
                .map_err(unavailable)?
            {
                let msg = match msg {
                    Ok(m) => m,
                    // The consumer lives in `region`'s cluster, maybe not
                    // reachable from here yet (see `pull_again_after`).
                    Err(e) => match super::history::pull_again_after(got, &mut refused) {
                        Some(wait) => {
                            tracing::debug!(region, attempt = refused, error = %e, "pull refused; pulling again");
                            tokio::time::sleep(wait).await;
                            continue 'pull;
                        }
                        None => return Err(unavailable(e)),
                    },
                };
                got += 1;
                let Ok(info) = msg.info() else { continue };
                let (seq, left) = (info.stream_sequence, info.pending);
                pending = left;
                let Ok(wire) = serde_json::from_slice::<WireEvent>(&msg.payload) else {
                    continue;
                };
                if GdprContext::subject_of(wire.gdpr_context.as_ref()).as_deref() != Some(subject) {
                    continue;
                }
                if let Some((_, _, topic)) = self.subjects.parse_event(&msg.subject) {
                    let stub = NewEvent::new(
                        tenant.clone(),
                        topic,
                        serde_json::Value::Null,
                        region.into(),
                    );
                    found.push((
                        seq,
                        Event::seal(stub, Cursor { epoch, seq }, time::OffsetDateTime::now_utc()),
                    ));
                }
            }
            if got == 0 {
                break;
            }
        }
        Ok(())
    }
}

/// Deliver the `data.erased` notices meant for this region's connections.
pub(super) async fn forward_notices(broker: Arc<NatsBroker>, hub: Arc<Hub>) {
    let subject = broker.subjects.erased_notices_here();
    loop {
        match broker.client.subscribe(subject.clone()).await {
            Ok(mut sub) => {
                while let Some(msg) = sub.next().await {
                    let Ok(n) = serde_json::from_slice::<Notices>(&msg.payload) else {
                        continue;
                    };
                    if broker
                        .subjects
                        .erased_notices(broker.subjects.region(), &n.tenant)
                        != msg.subject.as_str()
                    {
                        continue; // a tenant that does not match its subject
                    }
                    let tenant: Arc<str> = n.tenant.into();
                    // Its recent history changed: no resume may be answered
                    // from a copy read before.
                    broker.tails.forget(&tenant);
                    broker.forget_windows(&tenant).await;
                    let now = time::OffsetDateTime::now_utc();
                    for (topic, ids) in n.topics {
                        let Ok(topic) = switchboard_config::Topic::parse(&topic) else {
                            continue;
                        };
                        let notice = Event::notice(
                            tenant.clone(),
                            topic,
                            broker.subjects.region().into(),
                            crate::event::ERASED_NOTICE,
                            &serde_json::json!({ "event_ids": ids }),
                            now,
                        );
                        hub.dispatch(&Arc::new(notice));
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot subscribe to erasure notices"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}
