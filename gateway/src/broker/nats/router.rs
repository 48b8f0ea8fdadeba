//! Live forwarding: the upstream subscriptions this gateway holds (one
//! per distinct tenant and pattern its connections want) and the one task
//! that routes what NATS delivers, and what a reconnect missed, to the hub.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use switchboard_config::Pattern;
use tokio::sync::mpsc;

use super::history::read_range;
use super::window::Window;
use super::{Interest, Live, NO_CATCH_UP, NatsBroker, REQUEST_TIMEOUT};
use crate::broker::{BrokerError, Filter};
use crate::event::{Cursor, Event};
use crate::hub::Hub;
use crate::mailbox;
use crate::metrics::Metrics;

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

/// The one task that routes NATS traffic (and catch-ups after a reconnect)
/// into the hub.
pub(super) async fn route_to_hub(
    broker: Arc<NatsBroker>,
    mut rx: mpsc::UnboundedReceiver<Live>,
    hub: Arc<Hub>,
    metrics: Arc<Metrics>,
) {
    let mut order = TopicOrder {
        last: HashMap::new(),
        pruned: Instant::now(),
    };
    let mut next = rx.recv().await;
    while let Some(item) = next.take() {
        match item {
            Live::Message(msg, window) => {
                // The messages that arrived together are one burst: each
                // connection is woken once for all of them.
                let mut other = None;
                mailbox::hold_wakes_sync(|| {
                    route_message(&broker, &hub, &metrics, &mut order, &msg, &window);
                    for _ in 1..BURST {
                        match rx.try_recv() {
                            Ok(Live::Message(msg, window)) => {
                                route_message(&broker, &hub, &metrics, &mut order, &msg, &window)
                            }
                            Ok(item) => {
                                other = Some(item);
                                break;
                            }
                            Err(_) => break,
                        }
                    }
                });
                next = match other {
                    Some(item) => Some(item),
                    None => rx.recv().await,
                };
                continue;
            }
            Live::Reconnected => {
                // Subscriptions were re-established by the client; what was
                // stored while we were away is read back from the stream.
                // Live messages wait in the channel meanwhile.
                let from = broker.state.resume_from.load(Ordering::Acquire);
                if from != NO_CATCH_UP {
                    catch_up_until_done(&broker, from, &hub, &metrics, &mut order).await;
                }
            }
        }
        next = rx.recv().await;
    }
}

/// Read back what was stored from `from` on, until it is routed or the
/// connection is lost again (the next reconnect starts over).
async fn catch_up_until_done(
    broker: &NatsBroker,
    from: u64,
    hub: &Hub,
    metrics: &Metrics,
    order: &mut TopicOrder,
) {
    loop {
        match catch_up(broker, from, hub, metrics, order).await {
            Ok(()) => {
                let _ = broker.state.resume_from.compare_exchange(
                    from,
                    NO_CATCH_UP,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                );
                return;
            }
            Err(_) if !broker.state.connected.load(Ordering::Acquire) => return,
            Err(e) => {
                tracing::warn!(error = %e, "catch-up after reconnect failed; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Most NATS messages routed as one burst.
const BURST: usize = 256;

/// Route one republished event into the hub (in its `bus.receive` span),
/// after noting it in the window of the subscription that delivered it.
fn route_message(
    broker: &NatsBroker,
    hub: &Hub,
    metrics: &Metrics,
    order: &mut TopicOrder,
    msg: &async_nats::Message,
    window: &Window,
) {
    let Some(event) = broker.seal_republished(msg) else {
        metrics.error("bus_message");
        tracing::warn!(subject = %msg.subject, "ignoring a malformed event from NATS");
        return;
    };
    broker.note_head(event.id.seq);
    let event = Arc::new(event);
    // Before the hub sees it: a subscriber registered from now on is told
    // a seam at or after it, and finds it in the window if it resumes.
    window.push(&event);
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
        crate::fanout::route(hub, metrics, &event);
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

impl NatsBroker {
    /// Take one local subscription to (tenant, pattern): the first one
    /// subscribes upstream and is in place on the server when this returns.
    pub(super) async fn add_interest(
        &self,
        tenant: &Arc<str>,
        pattern: &Pattern,
    ) -> Result<(), BrokerError> {
        let key = (tenant.clone(), pattern.clone());
        let mut interests = self.interests.lock().await;
        if let Some(i) = interests.get_mut(&key) {
            i.count += 1;
            return Ok(());
        }
        let subject = self.subjects.live_interest(tenant, pattern);
        let refused = |source: Box<dyn std::error::Error + Send + Sync>| BrokerError::Subscribe {
            subject: subject.clone(),
            source,
        };
        if let Some(reason) = self.permissions().await.and_then(|p| p.refusal(&subject)) {
            return Err(refused(reason.into()));
        }
        let subscriber = self
            .client
            .subscribe(subject.clone())
            .await
            .map_err(|e| refused(e.into()))?;
        // The server has the subscription before the caller reads the
        // stream position it will deliver from; if it cannot be told, the
        // subscription is not confirmed (dropping it unsubscribes).
        tokio::time::timeout(REQUEST_TIMEOUT, self.client.flush())
            .await
            .map_err(|_| refused("NATS did not confirm the subscription in time".into()))?
            .map_err(|e| refused(e.into()))?;
        let tx = self.live_tx.clone();
        let window = Arc::new(Window::new(self.windows.clone()));
        {
            // An event two overlapping patterns both match reaches the hub
            // through either subscription (two exact ones never overlap).
            let mut wildcards = self.wildcards.lock().unwrap_or_else(|e| e.into_inner());
            let overlapping: Vec<&Interest> = if pattern.is_exact() {
                wildcards
                    .iter()
                    .filter(|w| w.0 == *tenant && w.1.overlaps(pattern))
                    .filter_map(|w| interests.get(w))
                    .collect()
            } else {
                interests
                    .iter()
                    .filter(|(held, _)| held.0 == *tenant && held.1.overlaps(pattern))
                    .map(|(_, i)| i)
                    .collect()
            };
            for i in &overlapping {
                i.window.overlapped();
            }
            if !overlapping.is_empty() {
                window.overlapped();
            }
            if !pattern.is_exact() {
                wildcards.push(key.clone());
            }
        }
        let forwarded = window.clone();
        let forwarder = tokio::spawn(async move {
            let mut subscriber = subscriber;
            while let Some(msg) = subscriber.next().await {
                if tx.send(Live::Message(msg, forwarded.clone())).is_err() {
                    break;
                }
            }
        });
        interests.insert(
            key,
            Interest {
                count: 1,
                forwarder,
                since: Arc::default(),
                window,
            },
        );
        Ok(())
    }

    /// Give one local subscription back; the last one unsubscribes upstream.
    pub(super) async fn drop_interest(&self, tenant: &Arc<str>, pattern: &Pattern) {
        let key = (tenant.clone(), pattern.clone());
        let mut interests = self.interests.lock().await;
        if let Some(i) = interests.get_mut(&key) {
            i.count -= 1;
            if i.count == 0
                && let Some(i) = interests.remove(&key)
            {
                // Dropping the subscriber unsubscribes on NATS.
                i.forwarder.abort();
                if !pattern.is_exact() {
                    self.wildcards
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|w| *w != key);
                }
            }
        }
    }
}
