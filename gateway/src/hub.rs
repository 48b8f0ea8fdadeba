//! This process's subscriptions: which local connection wants which pattern,
//! per tenant, and the fan-out of one event to them.
//!
//! Each tenant has its own index, so no pattern of one tenant can ever match
//! an event of another. The index is read-locked once per event (not per
//! delivery); subscribing takes the write lock briefly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use dashmap::DashMap;
use switchboard_config::Pattern;

use crate::event::{Event, EventKind};
use crate::mailbox::{Mailbox, Offered};

/// A connection's id within one process.
pub type ConnId = u64;

/// One connection's mailbox, as the hub holds it.
pub type Subscriber = Arc<Mailbox>;

type Subscribers = HashMap<ConnId, Subscriber>;

#[derive(Default)]
struct TenantIndex {
    /// Sequence of the last event dispatched for this tenant.
    last_seq: AtomicU64,
    subs: RwLock<Subs>,
}

#[derive(Default)]
struct Subs {
    exact: HashMap<Box<str>, Subscribers>,
    wild: HashMap<Pattern, Subscribers>,
}

/// Outcome of one fan-out.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Fanout {
    /// Sessions the event was queued for.
    pub delivered: u64,
    /// Sessions whose queue overflowed (slow consumers, now closing).
    pub overflowed: u64,
}

#[derive(Default)]
/// This process's subscriptions, per tenant, and the fan-out of an event to them.
pub struct Hub {
    tenants: DashMap<Arc<str>, Arc<TenantIndex>>,
}

impl Hub {
    fn index(&self, tenant: &Arc<str>) -> Arc<TenantIndex> {
        if let Some(i) = self.tenants.get(tenant) {
            return i.clone();
        }
        self.tenants.entry(tenant.clone()).or_default().clone()
    }

    /// The hub's own copy of a tenant's name, when it has one: every
    /// connection of the tenant then shares one allocation instead of
    /// keeping its own (`tenant` itself otherwise).
    pub fn shared_tenant(&self, tenant: Arc<str>) -> Arc<str> {
        match self.tenants.get(&tenant) {
            Some(entry) => entry.key().clone(),
            None => tenant,
        }
    }

    /// Add a subscription; returns the sequence of the last event dispatched
    /// for the tenant (every later matching event reaches the subscriber).
    pub fn register(
        &self,
        tenant: &Arc<str>,
        conn: ConnId,
        pattern: &Pattern,
        sub: Subscriber,
    ) -> u64 {
        let index = self.index(tenant);
        let mut subs = index.subs.write().unwrap_or_else(|e| e.into_inner());
        let map = if pattern.is_exact() {
            subs.exact.entry(pattern.as_str().into()).or_default()
        } else {
            subs.wild.entry(pattern.clone()).or_default()
        };
        map.insert(conn, sub);
        index.last_seq.load(Ordering::Acquire)
    }

    /// Remove one subscription.
    pub fn unregister(&self, tenant: &Arc<str>, conn: ConnId, pattern: &Pattern) {
        let Some(index) = self.tenants.get(tenant).map(|i| i.clone()) else {
            return;
        };
        let mut subs = index.subs.write().unwrap_or_else(|e| e.into_inner());
        let emptied = |map: &mut Subscribers| map.remove(&conn).is_some() && map.is_empty();
        if pattern.is_exact() {
            let key = pattern.as_str();
            if subs.exact.get_mut(key).is_some_and(emptied) {
                subs.exact.remove(key);
            }
        } else if subs.wild.get_mut(pattern).is_some_and(emptied) {
            subs.wild.remove(pattern);
        }
    }

    /// The sequence of the last event dispatched for a tenant.
    pub fn last_seq(&self, tenant: &Arc<str>) -> u64 {
        self.tenants
            .get(tenant)
            .map_or(0, |i| i.last_seq.load(Ordering::Acquire))
    }

    /// Deliver one event to every local connection whose subscriptions match
    /// it, exactly once per connection however many of its patterns match.
    /// Never waits: a full queue marks its connection as a slow consumer.
    ///
    /// Callers dispatch a tenant's events one at a time, in sequence order.
    pub fn dispatch(&self, event: &Arc<Event>) -> Fanout {
        let index = self.index(&event.tenant);
        let subs = index.subs.read().unwrap_or_else(|e| e.into_inner());
        // A notice has no position in history: it must not move the seam
        // between replay and live delivery.
        if event.kind == EventKind::Stored {
            index.last_seq.store(event.id.seq, Ordering::Release);
        }

        let exact = subs.exact.get(event.topic.as_str());
        let mut wild = subs
            .wild
            .iter()
            .filter(|(p, _)| p.matches(&event.topic))
            .map(|(_, s)| s);
        let mut out = Fanout::default();
        match (exact, wild.next(), wild.next()) {
            (None, None, _) => {}
            (Some(only), None, _) | (None, Some(only), None) => {
                for sub in only.values() {
                    offer(sub, event, &mut out);
                }
            }
            (first, second, third) => {
                let mut targets: Vec<(ConnId, &Subscriber)> = first
                    .into_iter()
                    .chain(second)
                    .chain(third)
                    .chain(wild)
                    .flat_map(|m| m.iter().map(|(id, s)| (*id, s)))
                    .collect();
                targets.sort_unstable_by_key(|(id, _)| *id);
                targets.dedup_by_key(|(id, _)| *id);
                for (_, sub) in targets {
                    offer(sub, event, &mut out);
                }
            }
        }
        out
    }

    /// Local subscriptions of a tenant (for metrics and tests).
    pub fn subscription_count(&self, tenant: &Arc<str>) -> usize {
        self.tenants.get(tenant).map_or(0, |i| {
            let s = i.subs.read().unwrap_or_else(|e| e.into_inner());
            s.exact
                .values()
                .chain(s.wild.values())
                .map(|m| m.len())
                .sum()
        })
    }
}

fn offer(sub: &Subscriber, event: &Arc<Event>, out: &mut Fanout) {
    if !sub.may_receive(event) {
        return;
    }
    match sub.offer(event) {
        Offered::Queued => out.delivered += 1,
        Offered::Overflowed | Offered::Dropped => out.overflowed += 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(tenant: &str, topic: &str, seq: u64) -> Arc<Event> {
        crate::event::test_event(tenant, topic, seq)
    }

    fn sub(cap: usize) -> (Subscriber, Subscriber) {
        let m = Arc::new(Mailbox::new(cap, None, "u".into()));
        (m.clone(), m)
    }

    #[test]
    fn overlapping_patterns_deliver_once_and_tenants_are_separate() {
        let hub = Hub::default();
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let (s1, r1) = sub(16);
        for p in ["deal.stage.updated", "deal.*", "deal.stage.*", "*"] {
            hub.register(&a, 1, &Pattern::parse(p).unwrap(), s1.clone());
        }
        let (s2, r2) = sub(16);
        hub.register(&b, 2, &Pattern::parse("*").unwrap(), s2);
        let out = hub.dispatch(&event("a", "deal.stage.updated", 1));
        assert_eq!(out.delivered, 1);
        assert_eq!(r1.try_take().unwrap().unwrap().id.seq, 1);
        assert!(r1.try_take().unwrap().is_none());
        assert!(
            r2.try_take().unwrap().is_none(),
            "tenant b must not see tenant a's event"
        );
        assert_eq!(hub.last_seq(&a), 1);
        assert_eq!(hub.last_seq(&b), 0);
    }

    #[test]
    fn connections_of_a_tenant_share_the_hubs_copy_of_its_name() {
        let hub = Hub::default();
        let first: Arc<str> = "acme".into();
        let (s, _r) = sub(1);
        hub.register(&first, 1, &Pattern::parse("x").unwrap(), s);
        let later = hub.shared_tenant("acme".into());
        assert!(
            Arc::ptr_eq(&later, &first),
            "a second copy of the name is kept"
        );
        // A tenant the hub does not know keeps its own, and the hub's
        // copies never cross tenants.
        let other: Arc<str> = "globex".into();
        let kept = hub.shared_tenant(other.clone());
        assert!(Arc::ptr_eq(&kept, &other));
        assert_eq!(&*hub.shared_tenant("acmf".into()), "acmf");
    }

    #[test]
    fn full_queue_kicks_only_that_connection() {
        let hub = Hub::default();
        let a: Arc<str> = "a".into();
        let p = Pattern::parse("x").unwrap();
        let (slow, _keep) = sub(1);
        let (fast, fast_rx) = sub(8);
        hub.register(&a, 1, &p, slow.clone());
        hub.register(&a, 2, &p, fast);
        for seq in 1..=3 {
            hub.dispatch(&event("a", "x", seq));
        }
        assert!(slow.overflowed());
        let got: Vec<u64> = std::iter::from_fn(|| fast_rx.try_take().ok().flatten())
            .map(|e| e.id.seq)
            .collect();
        assert_eq!(got, vec![1, 2, 3]);
    }

    #[test]
    fn unregister_removes_only_that_connection() {
        let hub = Hub::default();
        let a: Arc<str> = "a".into();
        let p = Pattern::parse("x.*").unwrap();
        let (s, _r) = sub(1);
        hub.register(&a, 1, &p, s.clone());
        hub.register(&a, 2, &p, s);
        hub.unregister(&a, 1, &p);
        assert_eq!(hub.subscription_count(&a), 1);
        hub.unregister(&a, 2, &p);
        assert_eq!(hub.subscription_count(&a), 0);
    }
}
