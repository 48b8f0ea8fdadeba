//! A subscriber session: one WebSocket connection, SSE stream or long-poll
//! request. It owns the connection's subscriptions in the hub, its outbound
//! queue, and the replay logic that joins history to live delivery.
//!
//! The seam between replay and live: when a pattern is registered, the hub
//! returns `since`, the sequence of the last event dispatched for the tenant.
//! Every later matching event reaches the queue live; replay sends only
//! events at or before `since` of every pattern that matches them. So no
//! event is sent twice and none falls between the two.
//!
//! A resume raises `since` to the client's cursor when the cursor is newer:
//! in cluster mode a client can bring a cursor from a gateway that routed
//! an event before this one did, and that event must not come again live.

mod resume;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use switchboard_config::policy::Denied;
use switchboard_config::{Pattern, Topic};

use crate::auth::Principal;
use crate::event::{Cursor, Event, EventKind, USER_CHANNEL_PREFIX};
use crate::mailbox::{Mailbox, Overflowed, Wake};
use crate::node::{Admission, Node};
use crate::protocol::ErrorCode;

pub use resume::{ResumeSink, Resumed};

/// How a subscription's events are framed on a WebSocket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Form {
    /// Seed 001's `{"type":"event","data":<envelope>}`.
    #[default]
    Native,
    /// Seed 004's `{"type","channel","payload","timestamp"}`.
    Channel,
}

/// One subscription of a session.
#[derive(Debug)]
struct Sub {
    pattern: Pattern,
    /// Events after this sequence are delivered live. Raised (never
    /// lowered) by a resume from a newer cursor, which runs on `&self`.
    since: AtomicU64,
    form: Form,
    /// The user's own channel, held without being asked for: not counted
    /// against the limit or in `subscriptions_active`, never listed back.
    implicit: bool,
}

impl Sub {
    fn since(&self) -> u64 {
        self.since.load(Ordering::Relaxed)
    }
}

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
    #[error("{0:?} is not a presence topic (presence:<resource>, or class presence in the policy)")]
    /// Presence on a topic that has none.
    NotPresence(String),
    #[error("presence info must be a JSON object of at most {max} bytes (got {0})", max = crate::presence::MAX_INFO_BYTES)]
    /// Member info that is not an object or too large.
    BadInfo(usize),
}

impl SubscribeError {
    /// The error code every transport reports this refusal with.
    pub fn code(&self) -> ErrorCode {
        match self {
            SubscribeError::Invalid(..) | SubscribeError::NotPresence(_) => ErrorCode::InvalidTopic,
            SubscribeError::BadInfo(_) => ErrorCode::MalformedMessage,
            SubscribeError::Denied(_) => ErrorCode::TopicNotAllowed,
            SubscribeError::TooMany(_) => ErrorCode::TooManySubscriptions,
            SubscribeError::Unavailable(_) => ErrorCode::BusUnavailable,
        }
    }
}

/// The presence topics a session takes part in. Most sessions have none:
/// they keep one empty pointer (two empty lists took 48 bytes of every
/// open connection's state).
#[derive(Default)]
struct PresenceTopics(Option<Box<PresenceLists>>);

#[derive(Default)]
struct PresenceLists {
    /// Presence topics observed (subscribed exactly).
    observed: Vec<Topic>,
    /// Presence topics this connection joined as a member.
    joined: Vec<Topic>,
}

impl PresenceTopics {
    fn observed(&self) -> &[Topic] {
        self.0.as_ref().map_or(&[], |l| &l.observed)
    }

    fn joined(&self) -> &[Topic] {
        self.0.as_ref().map_or(&[], |l| &l.joined)
    }

    fn lists(&mut self) -> &mut PresenceLists {
        self.0.get_or_insert_with(Box::default)
    }

    /// Stop observing `raw`; the topic when it was observed.
    fn remove_observed(&mut self, raw: &str) -> Option<Topic> {
        let lists = self.0.as_mut()?;
        let i = lists.observed.iter().position(|t| t.as_str() == raw)?;
        Some(lists.observed.swap_remove(i))
    }

    /// Stop being a member of `raw`; the topic when it was joined.
    fn remove_joined(&mut self, raw: &str) -> Option<Topic> {
        let lists = self.0.as_mut()?;
        let i = lists.joined.iter().position(|t| t.as_str() == raw)?;
        Some(lists.joined.swap_remove(i))
    }

    /// Everything, leaving nothing.
    fn take(&mut self) -> PresenceLists {
        self.0.take().map(|l| *l).unwrap_or_default()
    }
}

/// One subscriber (a WebSocket, an SSE stream, a long-poll request): its subscriptions, its queue, the seam and the resume.
pub struct Session {
    /// The node it belongs to.
    pub node: Arc<Node>,
    /// Its connection slot.
    pub admission: Admission,
    /// Where the hub queues its live events.
    pub mailbox: Arc<Mailbox>,
    /// Subscribed patterns with their `since` sequence.
    subs: Vec<Sub>,
    /// Some subscription asked for seed 004's `channel` form.
    any_channel_form: bool,
    /// Whether presence notices reach this session (WebSocket and SSE, not
    /// long-poll, which answers with stored events only).
    observes_presence: bool,
    /// Presence topics observed and joined.
    presence: PresenceTopics,
    /// The largest `since`: later events are always delivered live.
    max_since: AtomicU64,
    /// The newest cursor a resume honoured (0: none): the client holds
    /// everything its resumed subscriptions matched up to it, so where it
    /// stands is never older (see [`Session::live_cursor`]).
    resumed_through: AtomicU64,
    /// What the client saw in another region before it failed over here
    /// (set by a resume from that region's cursor): never delivered again,
    /// by replay or live.
    seen_elsewhere: std::sync::OnceLock<Arc<crate::broker::SeenElsewhere>>,
    /// The private channel's events a late hold caught up on (sent before
    /// live delivery began): never replayed again. Boxed: almost no
    /// connection has one.
    own_caught_up: Option<Box<CaughtUp>>,
}

/// The range of the private channel's events a catch-up sent.
#[derive(Debug)]
struct CaughtUp {
    /// Sent: its events of sequence after this one...
    after: u64,
    /// ...up to and including this one.
    through: u64,
}

impl Session {
    /// A session of `principal` (only `region`'s events when set) with a queue of `queue` events.
    pub fn new(
        node: Arc<Node>,
        admission: Admission,
        principal: &Principal,
        region: Option<Arc<str>>,
        queue: usize,
    ) -> Self {
        Self {
            node,
            admission,
            mailbox: Arc::new(Mailbox::new(queue, region, principal.user.clone())),
            subs: Vec::new(),
            any_channel_form: false,
            observes_presence: true,
            presence: PresenceTopics::default(),
            max_since: AtomicU64::new(0),
            resumed_through: AtomicU64::new(0),
            seen_elsewhere: std::sync::OnceLock::new(),
            own_caught_up: None,
        }
    }

    /// Presence notices do not reach this session (long-poll).
    pub fn without_presence(mut self) -> Self {
        self.observes_presence = false;
        self
    }

    /// Subscribe the session to its user's private channel (`user:<id>`),
    /// beyond the subscription limit. False when the user id cannot name a
    /// topic (e.g. it holds a `.`) or the broker refused.
    pub async fn subscribe_own_channel(&mut self) -> bool {
        let own = format!("{USER_CHANNEL_PREFIX}{}", self.user());
        if Topic::parse(&own).is_err() {
            return false;
        }
        let (ok, _) = self.subscribe_as(&[own], Form::Native, true, true).await;
        !ok.is_empty()
    }

    /// The verified tenant.
    pub fn tenant(&self) -> &Arc<str> {
        self.admission.tenant()
    }

    /// The user the session belongs to.
    pub fn user(&self) -> &str {
        &self.mailbox.user
    }

    /// The patterns the client asked for and holds (not its implicit own channel).
    pub fn patterns(&self) -> impl Iterator<Item = &Pattern> {
        self.subs.iter().filter(|s| !s.implicit).map(|s| &s.pattern)
    }

    /// The WebSocket frame of `event` for this session: seed 004's form when
    /// a pattern subscribed in that form matches it, seed 001's otherwise.
    /// The implicit own channel speaks the form the client speaks: seed
    /// 004's once it subscribed anything in that form.
    pub fn frame_for(&self, event: &Event) -> axum::extract::ws::Utf8Bytes {
        if self.any_channel_form
            && self
                .subs
                .iter()
                .any(|s| (s.form == Form::Channel || s.implicit) && s.pattern.matches(&event.topic))
        {
            event.channel_frame()
        } else {
            event.frame.clone()
        }
    }

    /// How many patterns the client asked for and holds.
    pub fn subscription_count(&self) -> usize {
        self.subs.iter().filter(|s| !s.implicit).count()
    }

    /// Subscribe to each requested pattern that is valid and allowed.
    /// Returns the patterns now subscribed (including ones already held) and
    /// the refusals.
    pub async fn subscribe(
        &mut self,
        requested: &[String],
        form: Form,
    ) -> (Vec<Pattern>, Vec<SubscribeError>) {
        self.subscribe_as(requested, form, false, true).await
    }

    /// `subscribe`, holding the patterns implicitly (the own channel) or not,
    /// and starting to observe presence topics at once or not (a joining
    /// member is observed after it joined, so its sync includes itself).
    async fn subscribe_as(
        &mut self,
        requested: &[String],
        form: Form,
        implicit: bool,
        observe: bool,
    ) -> (Vec<Pattern>, Vec<SubscribeError>) {
        let max = match self.node.limits(self.tenant()) {
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
            if let Some(held) = self.subs.iter_mut().find(|s| s.pattern == pattern) {
                held.form = form;
                if held.implicit && !implicit {
                    // Asked for now: the client holds it like any other.
                    held.implicit = false;
                    self.node.metrics.subscriptions_active.inc();
                }
                self.any_channel_form |= form == Form::Channel;
                ok.push(pattern);
                continue;
            }
            if let Err(d) = self.check(&pattern) {
                errors.push(SubscribeError::Denied(d));
                continue;
            }
            if !implicit && self.subscription_count() >= max as usize {
                errors.push(SubscribeError::TooMany(max));
                continue;
            }
            // Upstream first: a subscription the broker cannot serve is
            // refused, never confirmed.
            if let Err(e) = self.node.broker.subscribe(self.tenant(), &pattern).await {
                tracing::warn!(pattern = %pattern, error = %e, "subscription refused by the broker");
                errors.push(SubscribeError::Unavailable(e.to_string()));
                continue;
            }
            let registered_at = self.node.hub.register(
                self.tenant(),
                self.admission.id,
                &pattern,
                self.mailbox.clone(),
            );
            let since = match self
                .node
                .broker
                .live_from(self.tenant(), &pattern, registered_at)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    self.node
                        .hub
                        .unregister(self.tenant(), self.admission.id, &pattern);
                    self.node.broker.unsubscribe(self.tenant(), &pattern).await;
                    errors.push(SubscribeError::Unavailable(e.to_string()));
                    continue;
                }
            };
            if !implicit {
                self.node.metrics.subscriptions_active.inc();
            }
            self.subs.push(Sub {
                pattern: pattern.clone(),
                since: AtomicU64::new(since),
                form,
                implicit,
            });
            self.any_channel_form |= form == Form::Channel;
            self.max_since.fetch_max(since, Ordering::Relaxed);
            if observe {
                self.observe(&pattern);
            }
            ok.push(pattern);
        }
        (ok, errors)
    }

    fn key(&self, topic: &Topic) -> crate::presence::Key {
        (self.tenant().clone(), topic.clone())
    }

    /// A presence topic subscribed exactly starts the presence notices.
    fn observe(&mut self, pattern: &Pattern) {
        if !self.observes_presence || !pattern.is_exact() {
            return;
        }
        let Ok(topic) = Topic::parse(pattern.as_str()) else {
            return;
        };
        if !self.node.policy().is_presence(self.tenant(), &topic) {
            return;
        }
        let cap = self
            .node
            .limits(self.tenant())
            .map_or(self.node.config.limits.max_presence_members, |l| {
                l.max_presence_members
            });
        self.node.presence.observe(
            self.key(&topic),
            self.admission.id,
            self.mailbox.clone(),
            cap,
        );
        self.presence.lists().observed.push(topic);
    }

    /// Join a presence topic as a member (subscribing to it first, so the
    /// member sees the others); joining again replaces `info`.
    pub async fn presence_join(
        &mut self,
        raw: &str,
        info: Option<serde_json::Value>,
        form: Form,
    ) -> Result<Pattern, SubscribeError> {
        let topic = Topic::parse(raw)
            .map_err(|e| SubscribeError::Invalid(raw.chars().take(300).collect(), e.to_string()))?;
        if !self.node.policy().is_presence(self.tenant(), &topic) {
            return Err(SubscribeError::NotPresence(topic.to_string()));
        }
        if let Some(info) = &info {
            let size = info.to_string().len();
            if !info.is_object() || size > crate::presence::MAX_INFO_BYTES {
                return Err(SubscribeError::BadInfo(size));
            }
        }
        let (ok, errors) = self
            .subscribe_as(&[raw.to_owned()], form, false, false)
            .await;
        let Some(pattern) = ok.into_iter().next() else {
            return Err(errors
                .into_iter()
                .next()
                .unwrap_or(SubscribeError::NotPresence(topic.to_string())));
        };
        let user: Arc<str> = self.mailbox.user.clone();
        self.node
            .presence
            .join(self.key(&topic), self.admission.id, user, info);
        if !self.presence.observed().contains(&topic) {
            self.observe(&pattern);
        }
        if !self.presence.joined().contains(&topic) {
            self.presence.lists().joined.push(topic);
        }
        Ok(pattern)
    }

    /// Leave a presence topic (still subscribed to it); false when not a member.
    pub fn presence_leave(&mut self, raw: &str) -> bool {
        let Some(topic) = self.presence.remove_joined(raw) else {
            return false;
        };
        self.node
            .presence
            .leave(&self.key(&topic), self.admission.id);
        true
    }

    /// A member's heartbeat; false when not a member of `raw`.
    pub fn presence_heartbeat(&self, raw: &str) -> bool {
        self.presence
            .joined()
            .iter()
            .find(|t| t.as_str() == raw)
            .is_some_and(|t| {
                self.node
                    .presence
                    .heartbeat(&self.key(t), self.admission.id)
            })
    }

    /// Stop presence for a topic no longer subscribed.
    fn unobserve(&mut self, pattern: &Pattern) {
        let conn = self.admission.id;
        if let Some(topic) = self.presence.remove_joined(pattern.as_str()) {
            self.node.presence.leave(&self.key(&topic), conn);
        }
        if let Some(topic) = self.presence.remove_observed(pattern.as_str()) {
            self.node.presence.unobserve(&self.key(&topic), conn);
        }
    }

    /// May this session hold `pattern`? Its own user channel always; another
    /// user's never (named: refused here; through a wildcard: the hub and
    /// history never deliver it); everything else as the policy says.
    fn check(&self, pattern: &Pattern) -> Result<(), Denied> {
        match pattern.literal_prefix().and_then(private_owner_token) {
            Some(owner) if owner == self.user() => Ok(()),
            Some(_) => Err(Denied::NotAllowed(pattern.to_string())),
            None => self.node.policy().check_subscribe(self.tenant(), pattern),
        }
    }

    /// Drop subscriptions; returns the ones that were held.
    pub async fn unsubscribe(&mut self, patterns: &[Pattern]) -> Vec<Pattern> {
        let mut removed = Vec::new();
        for pattern in patterns {
            if let Some(i) = self.subs.iter().position(|s| s.pattern == *pattern) {
                let sub = self.subs.swap_remove(i);
                // Unsubscribing a presence topic also leaves it.
                let _ = self.presence_leave(pattern.as_str());
                self.unobserve(pattern);
                self.release(&sub).await;
                removed.push(pattern.clone());
            }
        }
        removed
    }

    async fn release(&self, sub: &Sub) {
        let pattern = &sub.pattern;
        if !sub.implicit {
            self.node.metrics.subscriptions_active.dec();
        }
        self.node
            .hub
            .unregister(self.tenant(), self.admission.id, pattern);
        self.node.broker.unsubscribe(self.tenant(), pattern).await;
    }

    /// Should this event, taken from the live queue, be delivered? An event
    /// at or before the `since` of every pattern matching it belongs to
    /// replay (it can reach the queue live in cluster mode, while a new
    /// subscription was being set up).
    pub fn wants_live(&self, event: &Event) -> bool {
        if event.kind == EventKind::Presence {
            return true;
        }
        if self.saw_elsewhere(event) {
            return false;
        }
        event.id.seq > self.max_since.load(Ordering::Relaxed)
            || self
                .subs
                .iter()
                .any(|s| event.id.seq > s.since() && s.pattern.matches(&event.topic))
    }

    /// Whether the client saw `event` in another region before failing
    /// over here.
    fn saw_elsewhere(&self, event: &Event) -> bool {
        self.seen_elsewhere.get().is_some_and(|s| s.saw(event))
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

    /// [`Session::next_live`], or a control signal (the policy or the
    /// drain state changed), whichever comes first.
    pub async fn next_live_or_control(&self) -> Result<Wake, Overflowed> {
        loop {
            match self.mailbox.take_or_control().await? {
                Wake::Event(event) if !self.wants_live(&event) => {}
                wake => return Ok(wake),
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
            self.subs
                .iter()
                .filter_map(|s| self.check(&s.pattern).err().map(|d| (s.pattern.clone(), d)))
                .collect()
        };
        let patterns: Vec<Pattern> = revoked.iter().map(|(p, _)| p.clone()).collect();
        self.unsubscribe(&patterns).await;
        revoked
    }

    /// The cursor a client can resume from when it has seen nothing yet:
    /// everything after it will reach it. Never older than the cursor a
    /// resume honoured: a client that brought it from a gateway ahead of
    /// this one would otherwise be told to go back, and get again what it
    /// has.
    pub fn live_cursor(&self) -> Cursor {
        let head = self.node.broker.head(self.tenant());
        let since = self.subs.iter().map(Sub::since).min().unwrap_or(head.seq);
        Cursor {
            epoch: head.epoch,
            seq: since.max(self.resumed_through.load(Ordering::Relaxed)),
        }
    }

    /// Unsubscribe everything; called when the session ends.
    pub async fn close(mut self) {
        let all: Vec<Pattern> = self.subs.iter().map(|s| s.pattern.clone()).collect();
        self.unsubscribe(&all).await;
    }
}

/// The user whose channel a first topic token names (`user:<id>`).
fn private_owner_token(token: &str) -> Option<&str> {
    token
        .strip_prefix(USER_CHANNEL_PREFIX)
        .filter(|id| !id.is_empty())
}

impl Drop for Session {
    fn drop(&mut self) {
        // A session dropped without `close` (a cancelled request) still
        // leaves the hub and presence at once, and gives its broker
        // interest back.
        let conn = self.admission.id;
        let tenant = self.tenant().clone();
        let presence = self.presence.take();
        for topic in presence.joined {
            self.node.presence.leave(&(tenant.clone(), topic), conn);
        }
        for topic in presence.observed {
            self.node.presence.unobserve(&(tenant.clone(), topic), conn);
        }
        let subs: Vec<Sub> = self.subs.drain(..).collect();
        if subs.is_empty() {
            return;
        }
        for s in &subs {
            if !s.implicit {
                self.node.metrics.subscriptions_active.dec();
            }
            self.node
                .hub
                .unregister(&tenant, self.admission.id, &s.pattern);
        }
        let patterns: Vec<Pattern> = subs.into_iter().map(|s| s.pattern).collect();
        let broker = self.node.broker.clone();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                for p in &patterns {
                    broker.unsubscribe(&tenant, p).await;
                }
            });
        }
    }
}
