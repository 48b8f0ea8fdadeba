//! The node: what one gateway process is. It owns the hub (local
//! subscriptions), the broker (storage and routing), the verifier, the live
//! policy, the metrics and the drain state, and it admits connections.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use dashmap::DashMap;
use serde_json::Value;
use switchboard_config::policy::{Denied, EffectiveLimits};
use switchboard_config::{GatewayConfig, PolicyBundle, Topic};
use tokio::sync::watch;
use tracing::Instrument;

use crate::auth::{Principal, SCOPE_PLATFORM, SCOPE_PUBLISH, Verifier};
use crate::broker::{Broker, BrokerError, Published};
use crate::event::NewEvent;
use crate::hub::{ConnId, Hub};
use crate::metrics::Metrics;
use crate::protocol::Close;

/// A drain in progress: connections leave at spread-out times within it.
#[derive(Debug, Clone, Copy)]
pub struct Drain {
    /// When the drain began.
    pub started: tokio::time::Instant,
    /// How long connections have to leave.
    pub period: Duration,
}

impl Drain {
    /// When connection `id` should be told to reconnect: spread evenly over
    /// the drain period so a rolling deploy causes no reconnect storm.
    pub fn deadline_for(&self, id: ConnId) -> tokio::time::Instant {
        let ms = self.period.as_millis() as u64;
        let offset = if ms == 0 {
            0
        } else {
            id.wrapping_mul(0x9E37_79B9_7F4A_7C15) % ms
        };
        self.started + Duration::from_millis(offset)
    }
}

/// How a gateway reaches the others in cluster mode.
#[derive(Clone)]
pub struct ClusterLink {
    /// The NATS connection.
    pub client: async_nats::Client,
    /// The subject prefix of this deployment.
    pub prefix: String,
    /// Replicas of the streams and buckets it creates.
    pub replicas: usize,
}

/// One gateway process: it admits connections and publishes (see the module docs).
pub struct Node {
    /// The configuration it runs with.
    pub config: GatewayConfig,
    /// Its region.
    pub region: Arc<str>,
    /// Verifies clients' tokens.
    pub verifier: Verifier,
    /// Storage and routing of events.
    pub broker: Arc<dyn Broker>,
    /// This process's subscriptions.
    pub hub: Arc<Hub>,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Who is on which presence topic.
    pub presence: Arc<crate::presence::Presence>,
    /// The NATS connection of cluster mode, for the parts that talk to
    /// other gateways directly (Socket.IO forwarding and recovery); set
    /// once at start-up, unset in the embedded mode.
    pub cluster: std::sync::OnceLock<ClusterLink>,
    /// Connect-rate limits and load shedding.
    pub overload: Arc<crate::overload::Overload>,
    /// The tenant policy in force; changed only through `set_policy`.
    policy: watch::Sender<Arc<PolicyBundle>>,
    /// Set once a drain starts; only through `start_drain`.
    drain: watch::Sender<Option<Drain>>,
    /// Ticks whenever the policy or the drain state changed: one watch a
    /// Socket.IO connection or a publish stream keeps instead of two.
    /// Private with the two above, so no change can skip the tick.
    control: watch::Sender<()>,
    /// The WebSocket connections' mailboxes, signalled with the tick
    /// instead of each connection keeping a watch (see
    /// [`Mailbox::signal_control`](crate::mailbox::Mailbox::signal_control));
    /// an entry leaves with its connection's [`Admission`].
    control_targets: DashMap<ConnId, Weak<crate::mailbox::Mailbox>>,
    next_conn: AtomicU64,
    connections: AtomicU64,
    tenant_connections: DashMap<Arc<str>, u64>,
}

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("token lacks the '{SCOPE_PUBLISH}' scope")]
    /// The token lacks the `publish` scope.
    NotPublisher,
    #[error("tenant {0:?} is not the token's tenant (only platform tokens may choose)")]
    /// Another tenant than the token's (only platform tokens may name one).
    WrongTenant(String),
    #[error("invalid tenant {0:?}")]
    /// A tenant name that is not valid.
    InvalidTenant(String),
    #[error("company_id must be a string or a number, not {0}")]
    /// A `company_id` that is neither a string nor a number.
    InvalidCompanyId(&'static str),
    #[error("invalid message type {0:?}: 1 to {MAX_MESSAGE_TYPE_LEN} characters")]
    /// A seed 004 message type that is empty or too long.
    InvalidMessageType(String),
    #[error("invalid event_type: {0}")]
    /// An `event_type` that is not a valid topic.
    InvalidTopic(String),
    #[error("{0}")]
    /// The tenant's policy does not allow publishing this topic.
    Denied(#[from] Denied),
    #[error("invalid region {0:?}: {rule}", rule = switchboard_config::REGION_RULE)]
    /// A `region` outside `[A-Za-z0-9_-]{1,64}`.
    InvalidRegion(String),
    /// The event (data, context, key and type together) is over the limit.
    #[error("event is {size} bytes, the limit is {limit}")]
    TooLarge {
        /// Its size in bytes.
        size: usize,
        /// The tenant's limit in bytes.
        limit: u64,
    },
    #[error("{0}")]
    /// A `gdpr_context` that cannot be honoured.
    InvalidGdprContext(#[from] crate::data_protection::GdprError),
    #[error("the data subject's data was erased: publishing for it is blocked")]
    /// The event's data subject was erased and is blocked.
    SubjectErased,
    #[error("tenant {tenant:?} may not store data in region {region:?} (policy residency)")]
    /// The tenant is pinned to other regions.
    NotResident {
        /// The tenant.
        tenant: String,
        /// This gateway's region.
        region: String,
    },
    #[error(transparent)]
    /// The broker could not store it.
    Broker(#[from] BrokerError),
}

/// A publish request, after parsing the HTTP body.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct PublishRequest {
    /// The topic (seed 004: `channel`).
    #[serde(alias = "channel")]
    pub event_type: String,
    #[serde(default, alias = "payload")]
    /// The payload (seed 004: `payload`).
    pub data: Value,
    #[serde(default, alias = "type")]
    /// Seed 004's message type (`entity:created`), given to connections
    /// subscribed in the `channel` form (`type` in seed 004's body).
    pub message_type: Option<String>,
    #[serde(default)]
    /// Seed 001's tenant field (string or number); must be the token's.
    pub company_id: Option<Value>,
    #[serde(default)]
    /// The tenant (platform tokens only, for another tenant).
    pub tenant: Option<String>,
    #[serde(default)]
    /// The region to tag it with (default: the gateway's).
    pub region: Option<String>,
    #[serde(default)]
    /// Data-protection context.
    pub gdpr_context: Option<Value>,
    #[serde(default)]
    /// Deduplication key.
    pub idempotency_key: Option<String>,
}

/// Held while a connection is open; gives its slot back on drop.
pub struct Admission {
    node: Arc<Node>,
    tenant: Arc<str>,
    /// The connection's id.
    pub id: ConnId,
}

impl Admission {
    /// The tenant whose slot this is.
    pub fn tenant(&self) -> &Arc<str> {
        &self.tenant
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.node.connections.fetch_sub(1, Ordering::AcqRel);
        self.node.control_targets.remove(&self.id);
        if let Some(mut n) = self.node.tenant_connections.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
        }
    }
}

impl Node {
    /// A node from its parts (see `startup::build`).
    pub fn new(
        config: GatewayConfig,
        verifier: Verifier,
        broker: Arc<dyn Broker>,
        hub: Arc<Hub>,
        metrics: Arc<Metrics>,
        policy: PolicyBundle,
    ) -> Arc<Self> {
        Arc::new(Self {
            presence: crate::presence::Presence::new(config.region.as_str().into()),
            cluster: std::sync::OnceLock::new(),
            overload: Arc::new(crate::overload::Overload::new(&config.overload)),
            region: config.region.as_str().into(),
            config,
            verifier,
            broker,
            hub,
            metrics,
            policy: watch::channel(Arc::new(policy)).0,
            drain: watch::channel(None).0,
            control: watch::channel(()).0,
            control_targets: DashMap::new(),
            next_conn: AtomicU64::new(1),
            connections: AtomicU64::new(0),
            tenant_connections: DashMap::new(),
        })
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<PolicyBundle> {
        self.policy.borrow().clone()
    }

    /// [`PolicyBundle::digest`] of the policy in force.
    pub fn policy_digest(&self) -> String {
        self.policy().digest()
    }

    /// Follows policy changes.
    pub fn policy_changes(&self) -> watch::Receiver<Arc<PolicyBundle>> {
        self.policy.subscribe()
    }

    /// The drain under way, if any.
    pub fn drain_state(&self) -> Option<Drain> {
        *self.drain.borrow()
    }

    /// Ticks on every policy change and when a drain starts.
    pub fn control(&self) -> watch::Receiver<()> {
        self.control.subscribe()
    }

    /// Signal `mailbox` (connection `id`) on every policy change and when
    /// a drain starts, until the connection's admission is dropped. Call
    /// it before reading the policy and the drain state: no change can
    /// then fall between the read and the first signal.
    pub fn signal_control_to(&self, id: ConnId, mailbox: &Arc<crate::mailbox::Mailbox>) {
        self.control_targets.insert(id, Arc::downgrade(mailbox));
    }

    /// Put a new policy in force; every connection re-checks its
    /// subscriptions.
    pub fn set_policy(&self, policy: PolicyBundle) {
        self.policy.send_replace(Arc::new(policy));
        self.tick_control();
    }

    /// Start draining: connections leave at spread-out times within it.
    pub fn start_drain(&self, drain: Drain) {
        self.drain.send_replace(Some(drain));
        self.tick_control();
    }

    fn tick_control(&self) {
        self.control.send_replace(());
        for target in &self.control_targets {
            if let Some(mailbox) = target.value().upgrade() {
                mailbox.signal_control();
            }
        }
    }

    /// A fresh connection id.
    pub fn next_id(&self) -> ConnId {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Whether a drain has started.
    pub fn draining(&self) -> bool {
        self.drain.borrow().is_some()
    }

    /// Resolves once a drain has started.
    pub async fn drained(&self) {
        let mut rx = self.drain.subscribe();
        let _ = rx.wait_for(Option::is_some).await.map(|_| ());
    }

    /// Connections open now.
    pub fn connection_count(&self) -> u64 {
        self.connections.load(Ordering::Acquire)
    }

    /// The limits of `tenant` under the policy in force.
    pub fn limits(&self, tenant: &str) -> Result<EffectiveLimits, Denied> {
        self.policy.borrow().limits(tenant, &self.config.limits)
    }

    /// Take a connection slot for a principal, or say which close applies.
    pub fn admit(self: &Arc<Self>, principal: &Principal) -> Result<Admission, Close> {
        if self.draining() {
            return Err(Close::ServiceRestart);
        }
        let limits = self
            .limits(&principal.tenant)
            .map_err(|_| Close::Forbidden)?;
        if !self
            .policy
            .borrow()
            .resident_in(&principal.tenant, &self.region)
        {
            return Err(Close::NotResident);
        }
        if self.connections.fetch_add(1, Ordering::AcqRel) >= self.config.limits.max_connections {
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Close::TooManyConnections);
        }
        let mut count = self
            .tenant_connections
            .entry(principal.tenant.clone())
            .or_insert(0);
        if limits.max_connections.is_some_and(|max| *count >= max) {
            drop(count);
            self.connections.fetch_sub(1, Ordering::AcqRel);
            return Err(Close::TooManyConnections);
        }
        *count += 1;
        drop(count);
        Ok(Admission {
            node: self.clone(),
            tenant: principal.tenant.clone(),
            id: self.next_id(),
        })
    }

    /// Publish on behalf of a verified publisher.
    pub async fn publish(
        &self,
        principal: &Principal,
        req: PublishRequest,
    ) -> Result<Published, PublishError> {
        let event = self.backend_event(principal, req)?;
        self.store(event).await
    }

    /// Check a backend's event: the publisher's scope, the tenant it may
    /// publish to, then everything `prepare` checks.
    fn backend_event(
        &self,
        principal: &Principal,
        req: PublishRequest,
    ) -> Result<Prepared, PublishError> {
        if !principal.has_scope(SCOPE_PUBLISH) {
            return Err(PublishError::NotPublisher);
        }
        let tenant = resolve_tenant(principal, &req, principal.has_scope(SCOPE_PLATFORM))?;
        self.prepare(tenant, req, None)
    }

    /// Publish from a client connection: on the principal's own tenant,
    /// under the policy's client allowlist, stamped with its user.
    pub async fn publish_from_client(
        &self,
        principal: &Principal,
        req: PublishRequest,
    ) -> Result<Published, PublishError> {
        let tenant = resolve_tenant(principal, &req, false)?;
        let event = self.prepare(tenant, req, Some(principal.user.to_string()))?;
        self.store(event).await
    }

    /// Publish several events on behalf of a verified publisher, in this
    /// order, each standing alone: the results come back in the same
    /// order. In cluster mode they are all in flight to JetStream at once.
    pub async fn publish_many(
        &self,
        principal: &Principal,
        reqs: Vec<PublishRequest>,
    ) -> Vec<Result<Published, PublishError>> {
        let mut results: Vec<Option<Result<Published, PublishError>>> = Vec::new();
        let mut spans = Vec::new();
        let mut events = Vec::new();
        for req in reqs {
            match self.backend_event(principal, req) {
                Ok(p) => {
                    events.push((p.event, p.retention));
                    spans.push(p.span);
                    results.push(None);
                }
                Err(e) => results.push(Some(Err(e))),
            }
        }
        let mut stored = self.broker.publish_all(events).await.into_iter().zip(spans);
        results
            .into_iter()
            .map(|r| match r {
                Some(refused) => refused,
                None => match stored.next() {
                    Some((Ok(published), span)) => Ok(self.stored(published, &span)),
                    Some((Err(e), _)) => Err(e.into()),
                    None => Err(PublishError::Broker(BrokerError::Unavailable(
                        "the broker answered fewer events than it was given".into(),
                    ))),
                },
            })
            .collect()
    }

    /// Store a checked event.
    async fn store(&self, p: Prepared) -> Result<Published, PublishError> {
        let published = self
            .broker
            .publish(p.event, p.retention)
            .instrument(p.span.clone())
            .await?;
        Ok(self.stored(published, &p.span))
    }

    /// Check and size an event of `tenant` (published by the client user
    /// `publisher`, or by a backend when `None`): what the broker stores.
    fn prepare(
        &self,
        tenant: Arc<str>,
        req: PublishRequest,
        publisher: Option<String>,
    ) -> Result<Prepared, PublishError> {
        let topic =
            Topic::parse(&req.event_type).map_err(|e| PublishError::InvalidTopic(e.to_string()))?;
        if let Some(t) = &req.message_type
            && (t.is_empty() || t.len() > MAX_MESSAGE_TYPE_LEN)
        {
            return Err(PublishError::InvalidMessageType(
                t.chars().take(80).collect(),
            ));
        }
        let gdpr = crate::data_protection::GdprContext::parse(req.gdpr_context.as_ref())?;
        let (limits, retention, resident) = {
            let policy = self.policy.borrow();
            match &publisher {
                None => policy.check_publish(&tenant, &topic)?,
                Some(_) => policy.check_client_publish(&tenant, &topic)?,
            }
            if !policy.resident_in(&tenant, &self.region) {
                return Err(PublishError::NotResident {
                    tenant: tenant.to_string(),
                    region: self.region.to_string(),
                });
            }
            let tenant_policy = policy.tenant(&tenant).ok();
            let retention = crate::data_protection::retention(
                gdpr.retention_days,
                tenant_policy.and_then(|p| p.max_retention_days),
                tenant_policy.and_then(|p| p.history_retention_seconds),
                self.config.history.retention_seconds,
                self.config.data_protection.retention_day_seconds,
            );
            (
                policy.limits(&tenant, &self.config.limits)?,
                retention,
                policy.pinned(&tenant),
            )
        };
        if let Some(subject) = &gdpr.data_subject
            && self
                .broker
                .subject_blocked(&crate::data_protection::subject_key(&tenant, subject))
        {
            return Err(PublishError::SubjectErased);
        }
        // The whole stored event counts, not only `data`: a large
        // gdpr_context or idempotency key is kept in history and fanned out
        // just the same.
        let size = req.data.to_string().len()
            + req.gdpr_context.as_ref().map_or(0, |g| g.to_string().len())
            + req.idempotency_key.as_ref().map_or(0, String::len)
            + req.event_type.len()
            + req.message_type.as_ref().map_or(0, String::len);
        if size as u64 > limits.max_message_bytes {
            return Err(PublishError::TooLarge {
                size,
                limit: limits.max_message_bytes,
            });
        }
        let region = match req.region {
            Some(r) if switchboard_config::valid_region(&r) => r.into(),
            Some(r) => return Err(PublishError::InvalidRegion(r)),
            _ => self.region.clone(),
        };
        let span = tracing::info_span!(
            "bus.publish",
            otel.kind = "producer",
            event_type = %topic,
            region = %region,
            tenant = tracing::field::Empty,
            event_id = tracing::field::Empty,
            duplicate = tracing::field::Empty,
        );
        if self.metrics.tenant_labels() {
            span.record("tenant", &*tenant);
        }
        let traceparent = crate::telemetry::traceparent(&span);
        Ok(Prepared {
            event: NewEvent {
                tenant,
                topic,
                data: req.data,
                region,
                idempotency_key: req.idempotency_key.filter(|k| !k.is_empty()),
                gdpr_context: req.gdpr_context,
                traceparent,
                message_type: req.message_type,
                publisher,
                resident,
            },
            retention,
            span,
        })
    }

    /// Count and trace an event the broker stored.
    fn stored(&self, published: Published, span: &tracing::Span) -> Published {
        span.record("event_id", tracing::field::display(&published.event.id));
        span.record("duplicate", published.duplicate);
        // Counted here, once for every broker (cluster mode counted none).
        if published.duplicate {
            self.metrics.events_deduplicated.inc();
        } else {
            self.metrics.events_published.inc();
        }
        tracing::debug!(
            event_id = %published.event.id,
            event_type = %published.event.topic,
            duplicate = published.duplicate,
            "event published"
        );
        published
    }
}

/// An event checked and ready for the broker, with its `bus.publish` span.
struct Prepared {
    event: NewEvent,
    retention: Duration,
    span: tracing::Span,
}

/// Longest seed 004 message type accepted.
pub const MAX_MESSAGE_TYPE_LEN: usize = 64;

/// The tenant a publish is for: the token's, or one it names when
/// `may_choose` (platform tokens).
fn resolve_tenant(
    principal: &Principal,
    req: &PublishRequest,
    may_choose: bool,
) -> Result<Arc<str>, PublishError> {
    // Seed 001 sends company_id as a number or a string; anything else
    // is a mistake to report, not to ignore (ignoring it would publish
    // to the caller's own tenant while the caller meant another).
    let company = match &req.company_id {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Number(n)) => Some(n.to_string()),
        Some(other) => {
            return Err(PublishError::InvalidCompanyId(match other {
                Value::Bool(_) => "a boolean",
                Value::Array(_) => "a list",
                _ => "an object",
            }));
        }
    };
    match req.tenant.clone().or(company) {
        None => Ok(principal.tenant.clone()),
        Some(t) if *t == *principal.tenant => Ok(principal.tenant.clone()),
        Some(t) if may_choose => {
            if !switchboard_config::policy::valid_tenant(&t) {
                return Err(PublishError::InvalidTenant(t));
            }
            Ok(t.into())
        }
        Some(t) => Err(PublishError::WrongTenant(t)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mailbox::{Mailbox, Wake};

    #[tokio::test]
    async fn control_reaches_a_connection_until_its_admission_is_dropped() {
        let mut config = GatewayConfig::default();
        config.auth.hs256_secret = Some("s".repeat(32));
        let node = crate::startup::build(config)
            .await
            .expect("an embedded node");
        let principal = Principal {
            tenant: "acme".into(),
            user: "u1".into(),
            scopes: Default::default(),
            expires_at: u64::MAX,
        };
        let admission = node.admit(&principal).expect("admitted");
        let mailbox = Arc::new(Mailbox::new(8, None, "u1".into()));
        node.signal_control_to(admission.id, &mailbox);

        node.start_drain(Drain {
            started: tokio::time::Instant::now(),
            period: std::time::Duration::from_secs(30),
        });
        assert!(matches!(mailbox.take_or_control().await, Ok(Wake::Control)));

        // The connection's slot is given back: it is signalled no more, and
        // the node keeps nothing of it.
        drop(admission);
        assert!(node.control_targets.is_empty());
        node.start_drain(Drain {
            started: tokio::time::Instant::now(),
            period: std::time::Duration::from_secs(30),
        });
        assert!(mailbox.try_take().unwrap().is_none());
        let woke = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            mailbox.take_or_control(),
        )
        .await;
        assert!(woke.is_err(), "no signal after the admission was dropped");
    }
}
