//! The cluster broker: NATS core for interest-based routing, JetStream for
//! history, dedup and cursors. See docs/architecture.md for the layout.
//!
//! - Publishing stores the event in this region's stream
//!   (`<p>.ev.<region>.<tenant>.<topic>`, dedup by `Nats-Msg-Id`).
//! - Each region's stream sources the other regions' streams, so it holds
//!   every event visible in the region in one order: its sequence is the
//!   cursor, valid on every gateway of the region.
//! - The stream republishes what it stores (with its sequence) to
//!   `<p>.rp.<region>.…`; a gateway subscribes there once per distinct
//!   (tenant, pattern) its own connections want, so NATS only sends it what
//!   it has subscribers for.
//!
//! The module by concern: `region_stream` (the region's stream: configuration,
//! creation, state, turning stored messages into events), `router`
//! (upstream subscriptions and the task that routes what NATS delivers to
//! the hub), `history` (reading history pages), `permissions` (whether
//! this account may subscribe to a subject) and [`subject`] (the subject
//! scheme).

mod erasure;
mod failover;
mod history;
mod permissions;
mod tail;
mod window;

use permissions::SubscribePermissions;
mod region_stream;
mod router;
pub mod subject;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_nats::{HeaderMap, Message};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_config::{HistoryConfig, NatsConfig, Pattern};
use tokio::sync::{Mutex, mpsc};

use super::{Broker, BrokerError, Filter, GapReason, Latest, Published, ReadBatch};
use crate::event::{Cursor, Event, NewEvent};
use crate::hub::Hub;
use crate::metrics::Metrics;
use history::read_range;
use subject::Subjects;

/// The body of a stored event. Backends publishing directly on NATS send
/// this (only `data` is required).
#[derive(Debug, Serialize, Deserialize)]
pub struct WireEvent {
    #[serde(default)]
    /// The event's data.
    pub data: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The region it was published in (default: the stream's).
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Deduplication key.
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Data-protection context.
    pub gdpr_context: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// Seed 004's message type.
    pub message_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    /// The client user who published it.
    pub publisher: Option<String>,
}

/// Shared state of the broker and its background tasks.
struct State {
    connected: AtomicBool,
    stream_ready: AtomicBool,
    /// Epoch of the region's stream (from its creation time); 0 until known.
    epoch: AtomicU64,
    /// Newest stream sequence known to this process.
    head: AtomicU64,
    /// Where live delivery stopped when the connection was lost
    /// ([`NO_CATCH_UP`]: none pending); the catch-up after reconnecting
    /// starts there.
    resume_from: AtomicU64,
    /// The account's permissions must be asked again (set at each connect).
    permissions_stale: AtomicBool,
}

enum Live {
    /// A message of an upstream subscription, with that subscription's
    /// window.
    Message(Message, Arc<window::Window>),
    /// The connection came back: deliver what was stored meanwhile.
    Reconnected,
}

struct Interest {
    count: usize,
    forwarder: tokio::task::JoinHandle<()>,
    /// The stream's head as read once after the upstream subscription was
    /// in place: everything stored later reaches this gateway live (or in
    /// the catch-up after a reconnect), so later subscribers to the same
    /// pattern need no request of their own to find the seam.
    since: Arc<tokio::sync::OnceCell<u64>>,
    /// What the subscription delivered lately.
    window: Arc<window::Window>,
}

/// The cluster broker: NATS routing, JetStream history (see the module docs).
pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    stream_name: String,
    history: HistoryConfig,
    state: Arc<State>,
    interests: Mutex<HashMap<(Arc<str>, Pattern), Interest>>,
    /// The wildcard patterns among `interests` (changed under its lock).
    wildcards: std::sync::Mutex<Vec<(Arc<str>, Pattern)>>,
    live_tx: mpsc::UnboundedSender<Live>,
    /// The last stream info and when its request was sent: concurrent
    /// callers share one request (a reconnect storm would otherwise send one
    /// per client).
    info: Mutex<Option<(tokio::time::Instant, stream::State)>>,
    /// History reads in flight at once: a reconnect storm queues here
    /// instead of timing out together against JetStream.
    reads: tokio::sync::Semaphore,
    /// What this account may subscribe to, as last read from the server.
    permissions: Mutex<Option<Arc<SubscribePermissions>>>,
    /// Every region (whose streams an erasure visits).
    regions: Vec<String>,
    /// The erasure bucket, once open.
    erasures: std::sync::OnceLock<async_nats::jetstream::kv::Store>,
    /// Blocked data subjects, as the erasure bucket says.
    blocked: crate::data_protection::Blocklist,
    /// Tenants' recent history, read once for resumes arriving together.
    tails: tail::Tails,
    /// What each upstream subscription delivered lately.
    windows: Arc<window::Windows>,
    metrics: Arc<Metrics>,
}

/// History reads one gateway runs against JetStream at a time.
const CONCURRENT_READS: usize = 32;

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// A stream epoch from its creation time: never 0 (0 marks foreign cursors).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// `resume_from` when no catch-up is pending.
const NO_CATCH_UP: u64 = u64::MAX;

impl NatsBroker {
    /// The NATS connection (presence shares it).
    pub fn client(&self) -> async_nats::Client {
        self.client.clone()
    }

    /// Connect (in the background when NATS is not reachable yet), make sure
    /// the region's stream exists, and start routing into `hub`.
    pub async fn start(
        config: &NatsConfig,
        history: HistoryConfig,
        region: &str,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Self>> {
        use anyhow::Context;
        let state = Arc::new(State {
            connected: AtomicBool::new(false),
            stream_ready: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            head: AtomicU64::new(0),
            resume_from: AtomicU64::new(NO_CATCH_UP),
            permissions_stale: AtomicBool::new(true),
        });
        let (live_tx, live_rx) = mpsc::unbounded_channel();
        let windows = Arc::new(window::Windows::default());
        let mut options = async_nats::ConnectOptions::new()
            .name(format!("switchboard-{region}"))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(3))
            .reconnect_delay_callback(|attempts| {
                Duration::from_millis((100 * attempts as u64).min(2000))
            });
        {
            let state = state.clone();
            let live_tx = live_tx.clone();
            let metrics = metrics.clone();
            let windows = windows.clone();
            options = options.event_callback(move |event| {
                let state = state.clone();
                let live_tx = live_tx.clone();
                let metrics = metrics.clone();
                let windows = windows.clone();
                async move {
                    if matches!(
                        event,
                        async_nats::Event::Connected
                            | async_nats::Event::Disconnected
                            | async_nats::Event::SlowConsumer(_)
                    ) {
                        // Messages may have been missed: what the upstream
                        // subscriptions delivered has a hole.
                        windows.broken();
                    }
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("connected to NATS");
                            metrics.nats_connected.set(1);
                            state.permissions_stale.store(true, Ordering::Release);
                            if !state.connected.swap(true, Ordering::AcqRel) {
                                let _ = live_tx.send(Live::Reconnected);
                            }
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("disconnected from NATS; reconnecting");
                            metrics.nats_connected.set(0);
                            metrics.nats_reconnects.inc();
                            state.connected.store(false, Ordering::Release);
                            let head = state.head.load(Ordering::Acquire);
                            let _ = state.resume_from.compare_exchange(
                                NO_CATCH_UP,
                                head,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            );
                        }
                        async_nats::Event::ServerError(e) => {
                            // A refusal the permission check did not foresee
                            // (permissions changed since they were read).
                            tracing::error!(error = %e, "NATS refused a request");
                            metrics.error("nats");
                            state.permissions_stale.store(true, Ordering::Release);
                        }
                        other => tracing::info!(event = %other, "NATS event"),
                    }
                }
            });
        }
        if let Some(path) = &config.credentials_file {
            options = options
                .credentials_file(path)
                .await
                .with_context(|| format!("reading NATS credentials {}", path.display()))?;
        }
        if let Some(path) = &config.nkey_seed_file {
            let seed = std::fs::read_to_string(path)
                .with_context(|| format!("reading NKey seed {}", path.display()))?;
            options = options.nkey(seed.trim().to_owned());
        }
        if let Some(path) = &config.token_file {
            let token = std::fs::read_to_string(path)
                .with_context(|| format!("reading NATS token {}", path.display()))?;
            options = options.token(token.trim().to_owned());
        }
        if let (Some(user), Some(path)) = (&config.user, &config.password_file) {
            let password = std::fs::read_to_string(path)
                .with_context(|| format!("reading NATS password {}", path.display()))?;
            options = options.user_and_password(user.clone(), password.trim().to_owned());
        }
        if let Some(tls) = &config.tls {
            if let Some(ca) = &tls.ca_file {
                options = options.add_root_certificates(ca.clone());
            }
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                options = options.add_client_certificate(cert.clone(), key.clone());
            }
            options = options.require_tls(tls.required);
        }
        let urls: Vec<async_nats::ServerAddr> = config
            .urls
            .iter()
            .map(|u| u.parse())
            .collect::<Result<_, _>>()
            .context("parsing nats.urls")?;
        let client = options
            .connect(urls.as_slice())
            .await
            .context("connecting to NATS")?;
        let js = match &config.jetstream_domain {
            Some(domain) => jetstream::with_domain(client.clone(), domain),
            None => jetstream::new(client.clone()),
        };
        let subjects = Subjects::new(&config.subject_prefix, region);
        let broker = Arc::new(Self {
            stream_name: subjects.stream_name(region),
            client,
            js,
            subjects,
            history,
            state,
            interests: Mutex::new(HashMap::new()),
            wildcards: std::sync::Mutex::default(),
            live_tx,
            info: Mutex::new(None),
            reads: tokio::sync::Semaphore::new(CONCURRENT_READS),
            permissions: Mutex::new(None),
            regions: if config.regions.is_empty() {
                vec![region.to_owned()]
            } else {
                config.regions.clone()
            },
            erasures: std::sync::OnceLock::new(),
            blocked: crate::data_protection::Blocklist::default(),
            tails: tail::Tails::default(),
            windows,
            metrics: metrics.clone(),
        });
        tokio::spawn(broker.clone().watch_erasures(config.stream_replicas));
        tokio::spawn(erasure::forward_notices(broker.clone(), hub.clone()));
        tokio::spawn(region_stream::ensure_stream(
            broker.clone(),
            region_stream::stream_config(config, &broker.history, &broker.subjects, region),
        ));
        tokio::spawn(router::route_to_hub(
            broker.clone(),
            live_rx,
            hub,
            metrics.clone(),
        ));
        tokio::spawn(region_stream::refresh_head(Arc::downgrade(&broker)));
        Ok(broker)
    }
}

impl NatsBroker {
    /// The account's subscribe permissions (read again after each connect);
    /// `None` when the server cannot tell (then NATS alone decides).
    async fn permissions(&self) -> Option<Arc<SubscribePermissions>> {
        let mut cached = self.permissions.lock().await;
        if cached.is_none() || self.state.permissions_stale.swap(false, Ordering::AcqRel) {
            let asked = tokio::time::timeout(
                REQUEST_TIMEOUT,
                self.client.request("$SYS.REQ.USER.INFO", "".into()),
            )
            .await;
            *cached = match asked {
                Ok(Ok(msg)) => serde_json::from_slice::<Value>(&msg.payload)
                    .ok()
                    .and_then(|v| SubscribePermissions::from_user_info(&v))
                    .map(Arc::new),
                _ => None,
            };
            if cached.is_none() {
                tracing::debug!("the NATS server did not tell this account's permissions");
            }
        }
        cached.clone()
    }
}

impl NatsBroker {
    fn count_read(&self, path: &'static str) {
        self.metrics
            .history_reads
            .get_or_create(&vec![("path", path)])
            .inc();
    }

    /// The first page for a cursor translated from another region: from
    /// the earliest event the client may not have seen, without those it
    /// saw there.
    async fn read_translated(
        &self,
        tenant: &Arc<str>,
        scope: &[Pattern],
        filter: Filter<'_>,
        limit: usize,
        plan: failover::Plan,
    ) -> Result<ReadBatch, BrokerError> {
        let epoch = self.epoch()?;
        let seen = Arc::new(plan.seen);
        let unseen = |e: &Event| !seen.saw(e) && filter(e);
        let mut batch = read_range(
            self,
            Some(tenant),
            scope,
            Cursor {
                epoch,
                seq: plan.after,
            },
            &unseen,
            limit,
            plan.until,
        )
        .await?;
        batch.seen_elsewhere = Some(seen);
        Ok(batch)
    }
}

impl NatsBroker {
    /// What is sent to JetStream for `new`: subject, headers and body.
    fn outgoing(
        &self,
        new: &NewEvent,
        retention: Duration,
    ) -> Result<(String, HeaderMap, Vec<u8>), BrokerError> {
        let subject = self.subjects.event(&new.tenant, &new.topic, new.resident);
        let mut headers = HeaderMap::new();
        if let Some(key) = &new.idempotency_key {
            // Per tenant: the same key from two tenants is two events. A
            // hash, so the stream's dedup records hold no key a publisher
            // may have built from personal data.
            headers.insert(
                "Nats-Msg-Id",
                crate::data_protection::subject_key(&new.tenant, key).as_str(),
            );
        }
        if retention < Duration::from_secs(self.history.retention_seconds) {
            // Per-message TTL: JetStream removes it (in every region's
            // stream, the header travels with sourced copies).
            headers.insert("Nats-TTL", retention.as_secs().max(1).to_string().as_str());
        }
        if let Some(tp) = &new.traceparent {
            headers.insert("traceparent", tp.as_str());
        }
        let wire = WireEvent {
            data: new.data.clone(),
            region: Some(new.region.to_string()),
            idempotency_key: new.idempotency_key.clone(),
            gdpr_context: new.gdpr_context.clone(),
            message_type: new.message_type.clone(),
            publisher: new.publisher.clone(),
        };
        let payload = serde_json::to_vec(&wire).map_err(unavailable)?;
        Ok((subject, headers, payload))
    }

    /// Hand `new` to the NATS connection (in call order); the returned
    /// future is JetStream's acknowledgement.
    async fn send(
        &self,
        new: &NewEvent,
        retention: Duration,
    ) -> Result<(u64, jetstream::context::PublishAckFuture), BrokerError> {
        let epoch = self.epoch()?;
        let (subject, headers, payload) = self.outgoing(new, retention)?;
        let ack = tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.js
                .publish_with_headers(subject, headers, payload.into()),
        )
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        Ok((epoch, ack))
    }

    /// The stored event, once JetStream acknowledged it (the original one
    /// for a repeated idempotency key).
    async fn stored(
        &self,
        new: NewEvent,
        epoch: u64,
        ack: jetstream::publish::PublishAck,
    ) -> Result<Published, BrokerError> {
        self.note_head(ack.sequence);
        if ack.duplicate
            && let Some(original) = self.get_stored(ack.sequence).await?
        {
            return Ok(Published {
                event: Arc::new(original),
                duplicate: true,
            });
        }
        let mut event = Event::seal(
            new,
            Cursor {
                epoch,
                seq: ack.sequence,
            },
            time::OffsetDateTime::now_utc(),
        );
        event.origin = Some(Box::new(crate::event::Origin {
            region: self.subjects.region().into(),
            seq: ack.sequence,
        }));
        Ok(Published {
            event: Arc::new(event),
            duplicate: ack.duplicate,
        })
    }
}

#[async_trait]
impl Broker for NatsBroker {
    async fn publish(&self, new: NewEvent, retention: Duration) -> Result<Published, BrokerError> {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let (epoch, ack) = self.send(&new, retention).await?;
        let ack = tokio::time::timeout_at(deadline, ack)
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        self.stored(new, epoch, ack).await
    }

    /// All sent before any acknowledgement is awaited: one round trip to
    /// JetStream for the lot instead of one per event. The NATS connection
    /// keeps the order they are sent in, so the stream stores them in it.
    async fn publish_all(
        &self,
        events: Vec<(NewEvent, Duration)>,
    ) -> Vec<Result<Published, BrokerError>> {
        let mut in_flight = Vec::with_capacity(events.len());
        for (new, retention) in events {
            let sent = self.send(&new, retention).await;
            in_flight.push((new, sent));
        }
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        let mut results = Vec::with_capacity(in_flight.len());
        for (new, sent) in in_flight {
            results.push(match sent {
                Err(e) => Err(e),
                Ok((epoch, ack)) => match tokio::time::timeout_at(deadline, ack).await {
                    Ok(Ok(ack)) => self.stored(new, epoch, ack).await,
                    Ok(Err(e)) => Err(unavailable(e)),
                    Err(e) => Err(unavailable(e)),
                },
            });
        }
        results
    }

    async fn read(
        &self,
        tenant: &Arc<str>,
        after: Option<Cursor>,
        scope: &[Pattern],
        filter: Filter<'_>,
        limit: usize,
    ) -> Result<ReadBatch, BrokerError> {
        let epoch = self.epoch()?;
        if let Some(c) = after
            && c.epoch == epoch
            && c.seq <= self.head_seq()
            && let Some(batch) = self.read_windows(tenant, scope, c, filter, limit).await
        {
            // A pattern this gateway already routes: everything it
            // delivered after the cursor is here.
            self.count_read("window");
            return Ok(batch);
        }
        if let Some(c) = after
            && c.epoch == epoch
            && c.seq <= self.head_seq()
            && self.head_seq() - c.seq <= tail::SPAN
            && let Some(batch) = self.read_recent(tenant, scope, c.seq, filter, limit).await
        {
            // The usual resume in a storm: the shared copy already reaches
            // back to the cursor, so the stream's state is not asked for.
            self.count_read("shared");
            return batch;
        }
        let state = self.stream_state().await?;
        let oldest = state.first_sequence.saturating_sub(1);
        let (start, gap) = match after {
            None => (oldest, None),
            Some(c) if c.epoch != epoch && c != Cursor::FOREIGN => {
                let _permit = self.reads.acquire().await.map_err(unavailable)?;
                match Box::pin(self.translate(tenant, c)).await? {
                    failover::Translation::Mapped(plan) => {
                        self.count_read("own");
                        return Box::pin(self.read_translated(tenant, scope, filter, limit, plan))
                            .await;
                    }
                    failover::Translation::Expired => (oldest, Some(GapReason::Expired)),
                    failover::Translation::Unknown => (oldest, Some(GapReason::Unknown)),
                }
            }
            Some(c) if c.epoch != epoch || c.seq > state.last_sequence => {
                (oldest, Some(GapReason::Unknown))
            }
            Some(c) if c.seq < oldest => (oldest, Some(GapReason::Expired)),
            Some(c) => (c.seq, None),
        };
        if gap.is_none()
            && after.is_some()
            && state.last_sequence.saturating_sub(start) <= tail::SPAN
        {
            // A recent cursor (the usual resume): answered from the
            // tenant's recent range, read once for everyone resuming.
            self.count_read("shared");
            return self
                .read_tail(tenant, scope, start, state.last_sequence, filter, limit)
                .await;
        }
        let _permit = self.reads.acquire().await.map_err(unavailable)?;
        self.count_read("own");
        // The JetStream reads are boxed where they are awaited, so the
        // future of a resume that needs none (most of a storm's) stays under
        // a kilobyte: 10,000 resumes in flight once held 6 KiB each, and a
        // fresh gateway page-faulted that memory in.
        let mut batch = Box::pin(read_range(
            self,
            Some(tenant),
            scope,
            Cursor { epoch, seq: start },
            filter,
            limit,
            state.last_sequence,
        ))
        .await?;
        batch.gap = gap;
        Ok(batch)
    }

    async fn latest(
        &self,
        tenant: &Arc<str>,
        scope: &[Pattern],
        filter: Filter<'_>,
        limit: usize,
    ) -> Result<Latest, BrokerError> {
        let _permit = self.reads.acquire().await.map_err(unavailable)?;
        let state = self.stream_state().await?;
        history::read_latest(self, tenant, scope, filter, limit, state.last_sequence).await
    }

    fn head(&self, _tenant: &Arc<str>) -> Cursor {
        Cursor {
            epoch: self.state.epoch.load(Ordering::Acquire),
            seq: self.state.head.load(Ordering::Acquire),
        }
    }

    async fn live_from(
        &self,
        tenant: &Arc<str>,
        pattern: &Pattern,
        _registered_at: u64,
    ) -> Result<u64, BrokerError> {
        // Every event stored after the interest's first head read reaches
        // this gateway, and every one routed to the hub before the
        // registration was noted in the head first: past both, an event
        // comes live. (Too high is safe: the replay reads up to it.)
        let interest = self
            .interests
            .lock()
            .await
            .get(&(tenant.clone(), pattern.clone()))
            .map(|i| (i.since.clone(), i.window.clone()));
        let Some((since, window)) = interest else {
            return Ok(self.stream_state().await?.last_sequence);
        };
        let first = *since
            .get_or_try_init(|| async {
                Ok::<_, BrokerError>(self.stream_state().await?.last_sequence)
            })
            .await?;
        window.begin(self.epoch()?, first);
        // With the subscription's window whole, the seam is the newest
        // event it delivered: everything up to it is in the window (for a
        // resume), everything after it is still to come. Otherwise the
        // newest position known here, which the window must then reach
        // before it answers a resume.
        let seam = match window.seam() {
            Some(last) => last.max(first),
            None => first.max(self.head_seq()),
        };
        window.promise(seam);
        Ok(seam)
    }

    async fn subscribe(&self, tenant: &Arc<str>, pattern: &Pattern) -> Result<(), BrokerError> {
        self.add_interest(tenant, pattern).await
    }

    async fn unsubscribe(&self, tenant: &Arc<str>, pattern: &Pattern) {
        self.drop_interest(tenant, pattern).await;
    }

    async fn erase(
        &self,
        tenant: &Arc<str>,
        subject: &str,
        pace: Duration,
    ) -> Result<crate::data_protection::ErasureCounts, BrokerError> {
        Ok(self.erase_everywhere(tenant, subject, pace).await)
    }

    async fn block_subject(&self, key: String, until_ms: i64) -> Result<(), BrokerError> {
        self.put_block(key, until_ms).await
    }

    fn subject_blocked(&self, key: &str) -> bool {
        self.blocked.blocked(key)
    }

    async fn record_erasure(
        &self,
        job: &crate::data_protection::ErasureJob,
    ) -> Result<(), BrokerError> {
        self.put_job(job).await
    }

    async fn claim_stale_erasures(
        &self,
        stale: Duration,
    ) -> Vec<crate::data_protection::ErasureJob> {
        self.claim_stale(stale).await
    }

    fn health(&self) -> (&'static str, bool) {
        (
            "event_bus",
            self.state.connected.load(Ordering::Acquire)
                && self.state.stream_ready.load(Ordering::Acquire),
        )
    }
}
