//! A subscriber session: one WebSocket connection, SSE stream or long-poll
//! request. It owns the connection's subscriptions in the hub, its outbound
//! queue, and the replay logic that joins history to live delivery.
//!
//! The seam between replay and live: when a pattern is registered, the hub
//! returns `since`, the sequence of the last event dispatched for the tenant.
//! Every later matching event reaches the queue live; replay sends only
//! events at or before `since` of every pattern that matches them. So no
//! event is sent twice and none falls between the two.

mod resume;

use std::sync::Arc;

use switchboard_config::Pattern;
use switchboard_config::policy::Denied;

use crate::event::{Cursor, Event};
use crate::mailbox::{Mailbox, Overflowed};
use crate::node::{Admission, Node};
use crate::protocol::ErrorCode;

pub use resume::{ResumeSink, Resumed};

/// Why one requested pattern was not subscribed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("invalid topic {0:?}: {1}")]
    /// The pattern does not parse (the pattern, why).
    Invalid(String, String),
    #[error("{0}")]
    /// The policy does not allow it.
    Denied(Denied),
    #[error("subscription limit of {0} per connection reached")]
    /// The connection holds its maximum.
    TooMany(u32),
    #[error("{0}")]
    /// The broker cannot serve it.
    Unavailable(String),
}

impl SubscribeError {
    /// The error code every transport reports this refusal with.
    pub fn code(&self) -> ErrorCode {
        match self {
            SubscribeError::Invalid(..) => ErrorCode::InvalidTopic,
            SubscribeError::Denied(_) => ErrorCode::TopicNotAllowed,
            SubscribeError::TooMany(_) => ErrorCode::TooManySubscriptions,
            SubscribeError::Unavailable(_) => ErrorCode::BusUnavailable,
        }
    }
}

/// One subscriber (a WebSocket, an SSE stream, a long-poll request): its subscriptions, its queue, the seam and the resume.
pub struct Session {
    /// The node it belongs to.
    pub node: Arc<Node>,
    /// Its connection slot.
    pub admission: Admission,
    /// The verified tenant.
    pub tenant: Arc<str>,
    /// Where the hub queues its live events.
    pub mailbox: Arc<Mailbox>,
    /// Subscribed patterns with their `since` sequence.
    subs: Vec<(Pattern, u64)>,
    /// The largest `since`: later events are always delivered live.
    max_since: u64,
}

impl Session {
    /// A session of `tenant` (only `region`'s events when set) with a queue of `queue` events.
    pub fn new(
        node: Arc<Node>,
        admission: Admission,
        tenant: Arc<str>,
        region: Option<Arc<str>>,
        queue: usize,
    ) -> Self {
        Self {
            node,
            admission,
            tenant,
            mailbox: Arc::new(Mailbox::new(queue, region)),
            subs: Vec::new(),
            max_since: 0,
        }
    }

    /// The patterns held.
    pub fn patterns(&self) -> impl Iterator<Item = &Pattern> {
        self.subs.iter().map(|(p, _)| p)
    }

    /// How many patterns are held.
    pub fn subscription_count(&self) -> usize {
        self.subs.len()
    }

    /// Subscribe to each requested pattern that is valid and allowed.
    /// Returns the patterns now subscribed (including ones already held) and
    /// the refusals.
    pub async fn subscribe(&mut self, requested: &[String]) -> (Vec<Pattern>, Vec<SubscribeError>) {
        let max = match self.node.limits(&self.tenant) {
            Ok(l) => l.max_subscriptions_per_connection,
            Err(d) => {
                return (
                    Vec::new(),
                    requested
                        .iter()
                        .map(|_| SubscribeError::Denied(d.clone()))
                        .collect(),
                );
            }
        };
        let mut ok = Vec::new();
        let mut errors = Vec::new();
        // Exact growth: most connections hold a handful of patterns for hours.
        self.subs.reserve_exact(
            requested
                .len()
                .min((max as usize).saturating_sub(self.subs.len())),
        );
        for raw in requested {
            let pattern = match Pattern::parse(raw) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(SubscribeError::Invalid(
                        raw.chars().take(300).collect(),
                        e.to_string(),
                    ));
                    continue;
                }
            };
            if self.subs.iter().any(|(p, _)| *p == pattern) {
                ok.push(pattern);
                continue;
            }
            if let Err(d) = self.node.policy().check_subscribe(&self.tenant, &pattern) {
                errors.push(SubscribeError::Denied(d));
                continue;
            }
            if self.subs.len() >= max as usize {
                errors.push(SubscribeError::TooMany(max));
                continue;
            }
            // Upstream first: a subscription the broker cannot serve is
            // refused, never confirmed.
            if let Err(e) = self.node.broker.subscribe(&self.tenant, &pattern).await {
                tracing::warn!(pattern = %pattern, error = %e, "subscription refused by the broker");
                errors.push(SubscribeError::Unavailable(e.to_string()));
                continue;
            }
            let registered_at = self.node.hub.register(
                &self.tenant,
                self.admission.id,
                &pattern,
                self.mailbox.clone(),
            );
            let since = match self
                .node
                .broker
                .live_from(&self.tenant, registered_at)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    self.node
                        .hub
                        .unregister(&self.tenant, self.admission.id, &pattern);
                    self.node.broker.unsubscribe(&self.tenant, &pattern).await;
                    errors.push(SubscribeError::Unavailable(e.to_string()));
                    continue;
                }
            };
            self.node.metrics.subscriptions_active.inc();
            self.subs.push((pattern.clone(), since));
            self.max_since = self.max_since.max(since);
            ok.push(pattern);
        }
        (ok, errors)
    }

    /// Drop subscriptions; returns the ones that were held.
    pub async fn unsubscribe(&mut self, patterns: &[Pattern]) -> Vec<Pattern> {
        let mut removed = Vec::new();
        for pattern in patterns {
            if let Some(i) = self.subs.iter().position(|(p, _)| p == pattern) {
                self.subs.swap_remove(i);
                self.release(pattern).await;
                removed.push(pattern.clone());
            }
        }
        removed
    }

    async fn release(&self, pattern: &Pattern) {
        self.node.metrics.subscriptions_active.dec();
        self.node
            .hub
            .unregister(&self.tenant, self.admission.id, pattern);
        self.node.broker.unsubscribe(&self.tenant, pattern).await;
    }

    /// Should this event, taken from the live queue, be delivered? An event
    /// at or before the `since` of every pattern matching it belongs to
    /// replay (it can reach the queue live in cluster mode, while a new
    /// subscription was being set up).
    pub fn wants_live(&self, event: &Event) -> bool {
        event.id.seq > self.max_since
            || self
                .subs
                .iter()
                .any(|(p, since)| event.id.seq > *since && p.matches(&event.topic))
    }

    /// The next live event to deliver (cancel-safe); an error once the
    /// connection overflowed its queue (a slow consumer, to be closed).
    pub async fn next_live(&self) -> Result<Arc<Event>, Overflowed> {
        loop {
            let event = self.mailbox.take().await?;
            if self.wants_live(&event) {
                return Ok(event);
            }
        }
    }

    /// The next live event already queued, without waiting.
    pub fn try_next_live(&self) -> Result<Option<Arc<Event>>, Overflowed> {
        while let Some(event) = self.mailbox.try_take()? {
            if self.wants_live(&event) {
                return Ok(Some(event));
            }
        }
        Ok(None)
    }

    /// Re-check every subscription against the current policy; returns the
    /// ones the policy no longer allows, already unsubscribed.
    pub async fn enforce_policy(&mut self) -> Vec<(Pattern, Denied)> {
        let revoked: Vec<(Pattern, Denied)> = {
            let policy = self.node.policy();
            self.subs
                .iter()
                .filter_map(|(p, _)| {
                    policy
                        .check_subscribe(&self.tenant, p)
                        .err()
                        .map(|d| (p.clone(), d))
                })
                .collect()
        };
        let patterns: Vec<Pattern> = revoked.iter().map(|(p, _)| p.clone()).collect();
        self.unsubscribe(&patterns).await;
        revoked
    }

    /// The cursor a client can resume from when it has seen nothing yet:
    /// everything after it will reach it.
    pub fn live_cursor(&self) -> Cursor {
        let head = self.node.broker.head(&self.tenant);
        let since = self.subs.iter().map(|(_, s)| *s).min().unwrap_or(head.seq);
        Cursor {
            epoch: head.epoch,
            seq: since,
        }
    }

    /// Unsubscribe everything; called when the session ends.
    pub async fn close(mut self) {
        let all: Vec<Pattern> = self.subs.iter().map(|(p, _)| p.clone()).collect();
        self.unsubscribe(&all).await;
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // A session dropped without `close` (a cancelled request) still
        // leaves the hub at once, and gives its broker interest back.
        let patterns: Vec<Pattern> = self.subs.drain(..).map(|(p, _)| p).collect();
        if patterns.is_empty() {
            return;
        }
        for p in &patterns {
            self.node.metrics.subscriptions_active.dec();
            self.node.hub.unregister(&self.tenant, self.admission.id, p);
        }
        let broker = self.node.broker.clone();
        let tenant = self.tenant.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for p in &patterns {
                    broker.unsubscribe(&tenant, p).await;
                }
            });
        }
    }
}
