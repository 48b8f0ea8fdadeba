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

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use async_nats::{HeaderMap, Message};
use async_trait::async_trait;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use switchboard_config::{HistoryConfig, NatsConfig, Pattern};
use tokio::sync::{Mutex, mpsc};

use super::subject::Subjects;
use super::{Broker, BrokerError, Filter, GapReason, Published, ReadBatch};
use crate::event::{Cursor, Event, NewEvent};
use crate::hub::Hub;
use crate::metrics::Metrics;

/// The body of a stored event. Backends publishing directly on NATS send
/// this (only `data` is required).
#[derive(Debug, Serialize, Deserialize)]
pub struct WireEvent {
    #[serde(default)]
    pub data: Value,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gdpr_context: Option<Value>,
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
}

enum Live {
    Message(Message),
    /// The connection came back: deliver what was stored meanwhile.
    Reconnected,
}

struct Interest {
    count: usize,
    forwarder: tokio::task::JoinHandle<()>,
}

pub struct NatsBroker {
    client: async_nats::Client,
    js: jetstream::Context,
    subjects: Subjects,
    stream_name: String,
    history: HistoryConfig,
    state: Arc<State>,
    interests: Mutex<HashMap<(Arc<str>, Pattern), Interest>>,
    live_tx: mpsc::UnboundedSender<Live>,
    /// The last stream info and when its request was sent: concurrent
    /// callers share one request (a reconnect storm would otherwise send one
    /// per client).
    info: Mutex<Option<(tokio::time::Instant, stream::State)>>,
    /// History reads in flight at once: a reconnect storm queues here
    /// instead of timing out together against JetStream.
    reads: tokio::sync::Semaphore,
}

/// History reads one gateway runs against JetStream at a time.
const CONCURRENT_READS: usize = 32;

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(e.to_string())
}

/// A stream epoch from its creation time: never 0 (0 marks foreign cursors).
fn epoch_of(created: time::OffsetDateTime) -> u64 {
    let nanos = created.unix_timestamp_nanos() as u64;
    (nanos >> 8) | 1
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// `resume_from` when no catch-up is pending.
const NO_CATCH_UP: u64 = u64::MAX;

impl NatsBroker {
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
        });
        let (live_tx, live_rx) = mpsc::unbounded_channel();
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
            options = options.event_callback(move |event| {
                let state = state.clone();
                let live_tx = live_tx.clone();
                let metrics = metrics.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("connected to NATS");
                            metrics.nats_connected.set(1);
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
            live_tx,
            info: Mutex::new(None),
            reads: tokio::sync::Semaphore::new(CONCURRENT_READS),
        });
        tokio::spawn(ensure_stream(
            broker.clone(),
            stream_config(config, &broker.history, &broker.subjects, region),
        ));
        tokio::spawn(dispatch(broker.clone(), live_rx, hub, metrics.clone()));
        tokio::spawn(refresh_head(Arc::downgrade(&broker)));
        Ok(broker)
    }

    fn epoch(&self) -> Result<u64, BrokerError> {
        match self.state.epoch.load(Ordering::Acquire) {
            0 => Err(unavailable("the history stream is not ready yet")),
            e => Ok(e),
        }
    }

    fn note_head(&self, seq: u64) {
        self.state.head.fetch_max(seq, Ordering::AcqRel);
    }

    async fn stream(&self) -> Result<stream::Stream, BrokerError> {
        tokio::time::timeout(REQUEST_TIMEOUT, self.js.get_stream(&self.stream_name))
            .await
            .map_err(unavailable)?
            .map_err(unavailable)
    }

    /// The stream's state as of a request sent after this call began (so
    /// it covers everything the caller did before, e.g. a subscription it
    /// flushed). Callers arriving together share one request.
    async fn stream_state(&self) -> Result<stream::State, BrokerError> {
        let asked = tokio::time::Instant::now();
        let mut cached = self.info.lock().await;
        if let Some((sent, state)) = &*cached
            && *sent >= asked
        {
            return Ok(state.clone());
        }
        let sent = tokio::time::Instant::now();
        let info = tokio::time::timeout(REQUEST_TIMEOUT, self.stream().await?.get_info())
            .await
            .map_err(unavailable)?
            .map_err(unavailable)?;
        self.note_head(info.state.last_sequence);
        *cached = Some((sent, info.state.clone()));
        Ok(info.state)
    }

    /// Build an event from what the stream stored.
    fn seal(
        &self,
        subject: &str,
        seq: u64,
        stored: time::OffsetDateTime,
        payload: &[u8],
        traceparent: Option<String>,
    ) -> Option<Event> {
        let epoch = self.state.epoch.load(Ordering::Acquire);
        let (origin, tenant, topic) = self.subjects.parse_event(subject)?;
        let wire: WireEvent = serde_json::from_slice(payload).ok()?;
        let region = wire
            .region
            .filter(|r| crate::node::valid_region(r))
            .unwrap_or(origin);
        Some(Event::seal(
            NewEvent {
                tenant: tenant.into(),
                topic,
                data: wire.data,
                region: region.into(),
                idempotency_key: wire.idempotency_key,
                gdpr_context: wire.gdpr_context,
                traceparent,
            },
            Cursor { epoch, seq },
            stored,
        ))
    }

    /// Build an event from a republished message (headers carry the stored
    /// subject, sequence and time).
    fn seal_republished(&self, msg: &Message) -> Option<Event> {
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
        let traceparent = headers.get("traceparent").map(|v| v.as_str().to_owned());
        self.seal(subject, seq, stored, &msg.payload, traceparent)
    }

    async fn get_stored(&self, seq: u64) -> Result<Option<Event>, BrokerError> {
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
            header_traceparent(&msg.headers),
        ))
    }
}

fn header_traceparent(headers: &HeaderMap) -> Option<String> {
    headers.get("traceparent").map(|v| v.as_str().to_owned())
}

fn stream_config(
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
        subjects: vec![subjects.region_events(region)],
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
        storage: stream::StorageType::File,
        placement: nats.placement_cluster.as_ref().map(|c| stream::Placement {
            cluster: Some(c.clone()),
            tags: Vec::new(),
        }),
        ..Default::default()
    }
}

/// Create or update the region's stream, retrying until NATS answers.
async fn ensure_stream(broker: Arc<NatsBroker>, config: stream::Config) {
    let mut delay = Duration::from_millis(100);
    loop {
        let attempt = tokio::time::timeout(
            REQUEST_TIMEOUT,
            broker.js.create_or_update_stream(config.clone()),
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

/// Keep the known head fresh while connected, so that after a disconnect
/// the catch-up starts close to where live delivery stopped.
async fn refresh_head(broker: std::sync::Weak<NatsBroker>) {
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let Some(b) = broker.upgrade() else { return };
        if b.state.connected.load(Ordering::Acquire) && b.state.stream_ready.load(Ordering::Acquire)
        {
            let _ = b.stream_state().await;
        }
    }
}

/// Remembers the newest sequence routed per (tenant, topic) for a while, so
/// that an event matched by two of this process's subscriptions (or seen
/// both live and in a catch-up) is routed once, and never behind a newer
/// event of its topic.
struct TopicOrder {
    last: HashMap<(Arc<str>, String), (u64, Instant)>,
    pruned: Instant,
}

const ORDER_MEMORY: Duration = Duration::from_secs(600);

impl TopicOrder {
    fn admit(&mut self, event: &Event) -> bool {
        let now = Instant::now();
        if now.duration_since(self.pruned) > Duration::from_secs(30) {
            self.last
                .retain(|_, (_, at)| now.duration_since(*at) < ORDER_MEMORY);
            self.pruned = now;
        }
        let key = (event.tenant.clone(), event.topic.as_str().to_owned());
        match self.last.get_mut(&key) {
            Some((seq, at)) if *seq >= event.id.seq => {
                *at = now;
                false
            }
            Some(entry) => {
                *entry = (event.id.seq, now);
                true
            }
            None => {
                self.last.insert(key, (event.id.seq, now));
                true
            }
        }
    }
}

/// The one task that routes NATS traffic into the hub.
async fn dispatch(
    broker: Arc<NatsBroker>,
    mut rx: mpsc::UnboundedReceiver<Live>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
) {
    let mut order = TopicOrder {
        last: HashMap::new(),
        pruned: Instant::now(),
    };
    while let Some(item) = rx.recv().await {
        match item {
            Live::Message(msg) => {
                let Some(event) = broker.seal_republished(&msg) else {
                    metrics.error("bus_message");
                    tracing::warn!(subject = %msg.subject, "ignoring a malformed event from NATS");
                    continue;
                };
                broker.note_head(event.id.seq);
                if order.admit(&event) {
                    let span = tracing::info_span!(
                        "bus.receive",
                        otel.kind = "consumer",
                        event_type = %event.topic,
                        event_id = %event.id,
                        region = %event.region,
                    );
                    crate::telemetry::adopt(&span, event.traceparent.as_deref());
                    let _entered = span.enter();
                    crate::fanout::route(&hub, &metrics, &Arc::new(event));
                }
            }
            Live::Reconnected => {
                // Subscriptions were re-established by the client; what was
                // stored while we were away is read back from the stream.
                // Live messages wait in the channel meanwhile.
                let from = broker.state.resume_from.load(Ordering::Acquire);
                if from == NO_CATCH_UP {
                    continue;
                }
                loop {
                    match catch_up(&broker, from, &hub, &metrics, &mut order).await {
                        Ok(()) => {
                            let _ = broker.state.resume_from.compare_exchange(
                                from,
                                NO_CATCH_UP,
                                Ordering::AcqRel,
                                Ordering::Acquire,
                            );
                            break;
                        }
                        // Lost again: the next reconnect starts over.
                        Err(_) if !broker.state.connected.load(Ordering::Acquire) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "catch-up after reconnect failed; retrying");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        }
    }
}

async fn catch_up(
    broker: &NatsBroker,
    from: u64,
    hub: &Hub,
    metrics: &Metrics,
    order: &mut TopicOrder,
) -> Result<(), BrokerError> {
    let state = broker.stream_state().await?;
    if state.last_sequence <= from {
        return Ok(());
    }
    let mut routed = 0u64;
    let all: Filter = &|_| true;
    let mut after = Cursor {
        epoch: broker.epoch()?,
        seq: from,
    };
    loop {
        let batch = read_range(broker, None, &[], after, all, 1000, state.last_sequence).await?;
        for event in batch.events {
            if order.admit(&event) {
                crate::fanout::route(hub, metrics, &event);
                routed += 1;
            }
        }
        if !batch.more || batch.next.seq >= state.last_sequence {
            break;
        }
        after = batch.next;
    }
    tracing::info!(
        from,
        to = state.last_sequence,
        routed,
        "caught up after reconnect"
    );
    Ok(())
}

/// Read stored events after `after` (up to `until`), optionally for one tenant.
async fn read_range(
    broker: &NatsBroker,
    tenant: Option<&str>,
    scope: &[Pattern],
    after: Cursor,
    filter: Filter<'_>,
    limit: usize,
    until: u64,
) -> Result<ReadBatch, BrokerError> {
    let mut out = ReadBatch {
        events: Vec::new(),
        gap: None,
        next: after,
        more: false,
    };
    if after.seq >= until {
        return Ok(out);
    }
    let stream = broker.stream().await?;
    let filter_subject = match tenant {
        Some(t) => broker.subjects.tenant_history(t),
        None => broker.subjects.all_events(),
    };
    // Read only the subjects of the patterns asked for, when NATS can take
    // them as consumer filters (no two may overlap): a resuming client then
    // reads its own topics, not its whole tenant's history.
    let scoped = match tenant {
        Some(t) if disjoint(scope) => scope
            .iter()
            .map(|p| broker.subjects.pattern_history(t, p))
            .collect(),
        _ => Vec::new(),
    };
    let (single, several) = match scoped.len() {
        0 => (filter_subject.clone(), Vec::new()),
        1 => (scoped[0].clone(), Vec::new()),
        _ => (String::new(), scoped),
    };
    // An ephemeral pull consumer in memory, without acks, deleted after
    // this read: three requests (create, fetch, delete) however long the
    // range, and nothing left behind when a reconnect storm runs thousands.
    let created = tokio::time::timeout(
        REQUEST_TIMEOUT,
        stream.create_consumer(consumer::pull::Config {
            filter_subject: single,
            filter_subjects: several,
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: after.seq + 1,
            },
            ack_policy: consumer::AckPolicy::None,
            memory_storage: true,
            num_replicas: 1,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        }),
    )
    .await;
    let mut consumer = match created {
        Ok(Ok(c)) => c,
        // Creating a consumer needs the JetStream meta leader, which may be
        // on the far side of a partition; the stream's own replicas still
        // answer direct gets.
        failed => {
            let reason = match failed {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".into(),
            };
            tracing::debug!(reason, "reading history with direct gets");
            return read_direct(broker, &stream, &filter_subject, out, filter, limit, until).await;
        }
    };
    let pending = consumer.cached_info().num_pending;
    let result = if pending == 0 {
        Ok(())
    } else {
        fetch_range(broker, &mut consumer, after, &mut out, filter, limit, until).await
    };
    let name = consumer.cached_info().name.clone();
    tokio::spawn(async move {
        let _ = tokio::time::timeout(REQUEST_TIMEOUT, stream.delete_consumer(&name)).await;
    });
    result.map(|()| out)
}

/// Pull the consumer's messages (in no-wait batches) into `out` until the
/// range, the limit or the pending messages end.
async fn fetch_range(
    broker: &NatsBroker,
    consumer: &mut consumer::Consumer<consumer::pull::Config>,
    after: Cursor,
    out: &mut ReadBatch,
    filter: Filter<'_>,
    limit: usize,
    until: u64,
) -> Result<(), BrokerError> {
    const BATCH: usize = 256;
    let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
    loop {
        let mut messages =
            tokio::time::timeout_at(deadline, consumer.fetch().max_messages(BATCH).messages())
                .await
                .map_err(unavailable)?
                .map_err(unavailable)?;
        let mut got = 0;
        loop {
            let next = tokio::time::timeout_at(deadline, messages.next()).await;
            let msg = match next {
                Ok(Some(Ok(m))) => m,
                Ok(Some(Err(e))) => return Err(unavailable(e)),
                Ok(None) => break,
                // Slow (an overloaded server): hand over what arrived and
                // let the caller continue from there; nothing at all is an
                // error, never a silently short history.
                Err(_) if out.next.seq > after.seq => {
                    out.more = true;
                    return Ok(());
                }
                Err(_) => return Err(unavailable("history read timed out")),
            };
            got += 1;
            let Ok(info) = msg.info() else { continue };
            let (seq, pending, published) = (info.stream_sequence, info.pending, info.published);
            if seq > until {
                return Ok(());
            }
            out.next.seq = seq;
            if let Some(event) = broker.seal(
                &msg.subject,
                seq,
                published,
                &msg.payload,
                msg.headers
                    .as_ref()
                    .and_then(|h| h.get("traceparent"))
                    .map(|v| v.as_str().to_owned()),
            ) && filter(&event)
            {
                out.events.push(Arc::new(event));
            }
            if pending == 0 || seq >= until {
                return Ok(());
            }
            if out.events.len() >= limit {
                out.more = true;
                return Ok(());
            }
        }
        if got == 0 {
            // Nothing more to fetch: the filtered range is exhausted.
            return Ok(());
        }
    }
}

/// Patterns NATS accepts together as consumer filters: one pattern, or a
/// few distinct exact topics (which cannot overlap).
fn disjoint(scope: &[Pattern]) -> bool {
    const MAX_FILTERS: usize = 16;
    match scope {
        [] => false,
        [_] => true,
        _ => {
            scope.len() <= MAX_FILTERS
                && scope.iter().all(Pattern::is_exact)
                && scope
                    .iter()
                    .enumerate()
                    .all(|(i, p)| scope[..i].iter().all(|q| q != p))
        }
    }
}

/// History read one message at a time with direct gets (no consumer).
async fn read_direct(
    broker: &NatsBroker,
    stream: &stream::Stream,
    subject: &str,
    mut out: ReadBatch,
    filter: Filter<'_>,
    limit: usize,
    until: u64,
) -> Result<ReadBatch, BrokerError> {
    let mut seq = out.next.seq + 1;
    while seq <= until {
        let got = tokio::time::timeout(
            REQUEST_TIMEOUT,
            stream.direct_get_next_for_subject(subject, Some(seq)),
        )
        .await
        .map_err(unavailable)?;
        let msg = match got {
            Ok(m) => m,
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(unavailable(e)),
        };
        if msg.sequence > until {
            break;
        }
        out.next.seq = msg.sequence;
        seq = msg.sequence + 1;
        if let Some(event) = broker.seal(
            &msg.subject,
            msg.sequence,
            msg.time,
            &msg.payload,
            header_traceparent(&msg.headers),
        ) && filter(&event)
        {
            out.events.push(Arc::new(event));
            if out.events.len() >= limit {
                out.more = msg.sequence < until;
                break;
            }
        }
    }
    Ok(out)
}

#[async_trait]
impl Broker for NatsBroker {
    async fn publish(&self, new: NewEvent, _retention: Duration) -> Result<Published, BrokerError> {
        let epoch = self.epoch()?;
        let subject = self.subjects.event(&new.tenant, &new.topic);
        let mut headers = HeaderMap::new();
        if let Some(key) = &new.idempotency_key {
            // Per tenant: the same key from two tenants is two events.
            headers.insert("Nats-Msg-Id", format!("{}:{key}", new.tenant).as_str());
        }
        if let Some(tp) = &new.traceparent {
            headers.insert("traceparent", tp.as_str());
        }
        let wire = WireEvent {
            data: new.data.clone(),
            region: Some(new.region.to_string()),
            idempotency_key: new.idempotency_key.clone(),
            gdpr_context: new.gdpr_context.clone(),
        };
        let payload = serde_json::to_vec(&wire).map_err(unavailable)?;
        let ack = tokio::time::timeout(REQUEST_TIMEOUT, async {
            self.js
                .publish_with_headers(subject, headers, payload.into())
                .await?
                .await
        })
        .await
        .map_err(unavailable)?
        .map_err(unavailable)?;
        self.note_head(ack.sequence);
        if ack.duplicate
            && let Some(original) = self.get_stored(ack.sequence).await?
        {
            return Ok(Published {
                event: Arc::new(original),
                duplicate: true,
            });
        }
        let event = Event::seal(
            new,
            Cursor {
                epoch,
                seq: ack.sequence,
            },
            time::OffsetDateTime::now_utc(),
        );
        Ok(Published {
            event: Arc::new(event),
            duplicate: ack.duplicate,
        })
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
        let _permit = self.reads.acquire().await.map_err(unavailable)?;
        let state = self.stream_state().await?;
        let oldest = state.first_sequence.saturating_sub(1);
        let (start, gap) = match after {
            None => (oldest, None),
            Some(c) if c.epoch != epoch || c.seq > state.last_sequence => {
                (oldest, Some(GapReason::Unknown))
            }
            Some(c) if c.seq < oldest => (oldest, Some(GapReason::Expired)),
            Some(c) => (c.seq, None),
        };
        let mut batch = read_range(
            self,
            Some(tenant),
            scope,
            Cursor { epoch, seq: start },
            filter,
            limit,
            state.last_sequence,
        )
        .await?;
        batch.gap = gap;
        Ok(batch)
    }

    fn head(&self, _tenant: &Arc<str>) -> Cursor {
        Cursor {
            epoch: self.state.epoch.load(Ordering::Acquire),
            seq: self.state.head.load(Ordering::Acquire),
        }
    }

    async fn live_from(&self, _tenant: &Arc<str>, _registered_at: u64) -> Result<u64, BrokerError> {
        Ok(self.stream_state().await?.last_sequence)
    }

    async fn interest(&self, tenant: &Arc<str>, pattern: &Pattern, wanted: bool) {
        let key = (tenant.clone(), pattern.clone());
        let mut interests = self.interests.lock().await;
        if wanted {
            if let Some(i) = interests.get_mut(&key) {
                i.count += 1;
                return;
            }
            let subject = self.subjects.live_interest(tenant, pattern);
            let subscriber = match self.client.subscribe(subject.clone()).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!(subject, error = %e, "cannot subscribe on NATS");
                    return;
                }
            };
            // Make sure the server has the subscription before the caller
            // reads the stream position it will deliver from.
            let _ = tokio::time::timeout(REQUEST_TIMEOUT, self.client.flush()).await;
            let tx = self.live_tx.clone();
            let forwarder = tokio::spawn(async move {
                let mut subscriber = subscriber;
                while let Some(msg) = subscriber.next().await {
                    if tx.send(Live::Message(msg)).is_err() {
                        break;
                    }
                }
            });
            interests.insert(
                key,
                Interest {
                    count: 1,
                    forwarder,
                },
            );
        } else if let Some(i) = interests.get_mut(&key) {
            i.count -= 1;
            if i.count == 0
                && let Some(i) = interests.remove(&key)
            {
                // Dropping the subscriber unsubscribes on NATS.
                i.forwarder.abort();
            }
        }
    }

    fn health(&self) -> (&'static str, bool) {
        (
            "event_bus",
            self.state.connected.load(Ordering::Acquire)
                && self.state.stream_ready.load(Ordering::Acquire),
        )
    }
}
