//! Presence: who is on a topic (seed 004's `presence:{resource}`, seed
//! 002's class A), the same on one process and across gateways.
//!
//! Every gateway keeps its own members (per connection) and, for each
//! presence topic one of its connections observes, a *view*: the members
//! of every gateway, keyed by (gateway, user), each entry versioned by the
//! gateway that owns it. A change to this gateway's members is applied to
//! its own view and, in cluster mode, sent to the others ([`cluster`]);
//! an observer is told `join` when a user appears in the view and `leave`
//! when its last connection anywhere is gone. A gateway that stops
//! heartbeating is dropped from every view after the configured timeout,
//! and its members leave (a crash sends no goodbye, so the others decide).
//!
//! Presence notices are events of kind
//! [`EventKind::Presence`](crate::event::EventKind::Presence): they
//! travel through the same mailboxes as events, never into history.

pub mod cluster;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use switchboard_config::Topic;
use tokio::time::Instant;

use crate::event::Event;
use crate::hub::ConnId;
use crate::mailbox::Mailbox;

/// Largest client-supplied member info, as JSON bytes.
pub const MAX_INFO_BYTES: usize = 1024;
/// A member's `lastSeen` is sent to other gateways at most this often.
const LAST_SEEN_EVERY: Duration = Duration::from_secs(10);

/// (tenant, topic): presence never crosses tenants.
pub type Key = (Arc<str>, Topic);

/// One gateway's view of one user on one topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Connections of the user on that gateway (0: it left).
    pub conns: u32,
    /// What the client said about itself when joining (e.g. `name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Value>,
    /// Unix milliseconds of its last join or heartbeat.
    pub last_seen: i64,
    /// Orders the owning gateway's changes (later wins).
    pub version: u64,
}

#[derive(Debug)]
struct LocalConn {
    user: Arc<str>,
    info: Option<Value>,
    last_seen: i64,
}

#[derive(Default)]
struct View {
    observers: HashMap<ConnId, Arc<Mailbox>>,
    /// (gateway, user) → entry; tombstones (conns 0) keep their version.
    entries: HashMap<(Arc<str>, Arc<str>), Entry>,
    /// Observers waiting for the view's first sync (cluster mode).
    pending: Vec<ConnId>,
    /// Set once the other gateways' members were merged in.
    ready: bool,
    /// Members listed before only counts are sent.
    cap: u32,
    /// The cluster subscription feeding this view.
    feed: Option<tokio::task::JoinHandle<()>>,
    /// Above the cap: a count-only sync is scheduled.
    count_due: bool,
}

impl View {
    fn present(&self, user: &str) -> bool {
        self.entries
            .iter()
            .any(|((_, u), e)| &**u == user && e.conns > 0)
    }

    /// Present users, each with its connections summed over gateways.
    fn members(&self) -> Vec<(Arc<str>, Entry)> {
        let mut users: HashMap<Arc<str>, Entry> = HashMap::new();
        for ((_, user), e) in &self.entries {
            if e.conns == 0 {
                continue;
            }
            users
                .entry(user.clone())
                .and_modify(|m| {
                    m.conns += e.conns;
                    m.last_seen = m.last_seen.max(e.last_seen);
                    if m.info.is_none() {
                        m.info.clone_from(&e.info);
                    }
                })
                .or_insert_with(|| e.clone());
        }
        let mut v: Vec<_> = users.into_iter().collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    fn count(&self) -> usize {
        let mut users: Vec<&Arc<str>> = self
            .entries
            .iter()
            .filter(|(_, e)| e.conns > 0)
            .map(|((_, u), _)| u)
            .collect();
        users.sort();
        users.dedup();
        users.len()
    }
}

/// A member as sent to clients: `id`, `connections`, `lastSeen` and the
/// client's info fields (seed 004 reads `id`, `name`, `lastSeen`).
fn member_json(user: &str, e: &Entry) -> Value {
    let mut m = Map::new();
    if let Some(Value::Object(info)) = &e.info {
        m.extend(info.clone());
    }
    m.insert("id".into(), user.into());
    m.insert("connections".into(), e.conns.into());
    m.insert("lastSeen".into(), e.last_seen.into());
    Value::Object(m)
}

/// This gateway's members, per topic, per connection.
type Locals = HashMap<Key, HashMap<ConnId, LocalConn>>;

#[derive(Default)]
struct State {
    /// This gateway's members, per topic, per connection.
    local: Locals,
    /// When a user's lastSeen was last sent to the other gateways.
    last_sent: HashMap<(Key, Arc<str>), Instant>,
    views: HashMap<Key, View>,
    /// Other gateways and when each was last heard from.
    pods: HashMap<Arc<str>, Instant>,
}

/// A change of this gateway's members, for the other gateways.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Delta {
    /// The gateway that owns the entry.
    pub pod: String,
    /// The user.
    pub user: String,
    /// Its entry on that gateway.
    pub entry: Entry,
}

/// This process's presence (see the module docs).
pub struct Presence {
    /// This gateway's id in the cluster (new at every start).
    pub pod: Arc<str>,
    region: Arc<str>,
    state: Mutex<State>,
    version: std::sync::atomic::AtomicU64,
    link: OnceLock<cluster::Link>,
    /// Itself, to schedule count-only syncs.
    me: std::sync::Weak<Presence>,
}

/// Above the members cap, observers get at most one count-only sync per
/// this interval instead of a notice per join or leave.
pub const COUNT_EVERY: Duration = Duration::from_secs(1);

fn now_ms() -> i64 {
    (time::OffsetDateTime::now_utc().unix_timestamp_nanos() / 1_000_000) as i64
}

impl Presence {
    /// Presence for a gateway of `region` (embedded until [`cluster::attach`]).
    pub fn new(region: Arc<str>) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            pod: uuid::Uuid::new_v4().simple().to_string().into(),
            region,
            state: Mutex::default(),
            version: std::sync::atomic::AtomicU64::new(0),
            link: OnceLock::new(),
            me: me.clone(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn next_version(&self) -> u64 {
        self.version
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// This gateway's entry for `user` on `key`, from its connections.
    fn local_entry(&self, local: &Locals, key: &Key, user: &str) -> Entry {
        let mut entry = Entry {
            conns: 0,
            info: None,
            last_seen: 0,
            version: self.next_version(),
        };
        for c in local.get(key).into_iter().flat_map(|m| m.values()) {
            if &*c.user == user {
                entry.conns += 1;
                entry.last_seen = entry.last_seen.max(c.last_seen);
                if c.info.is_some() {
                    entry.info.clone_from(&c.info);
                }
            }
        }
        entry
    }

    /// Connection `conn` of `user` joins `key` with optional `info`.
    pub fn join(&self, key: Key, conn: ConnId, user: Arc<str>, info: Option<Value>) {
        let mut st = self.lock();
        st.local.entry(key.clone()).or_default().insert(
            conn,
            LocalConn {
                user: user.clone(),
                info,
                last_seen: now_ms(),
            },
        );
        self.changed(&mut st, &key, user);
    }

    /// Connection `conn` leaves `key` (a no-op when it had not joined).
    pub fn leave(&self, key: &Key, conn: ConnId) {
        let mut st = self.lock();
        let Some(members) = st.local.get_mut(key) else {
            return;
        };
        let Some(gone) = members.remove(&conn) else {
            return;
        };
        if members.is_empty() {
            st.local.remove(key);
        }
        st.last_sent.remove(&(key.clone(), gone.user.clone()));
        self.changed(&mut st, key, gone.user);
    }

    /// A client heartbeat: refresh `lastSeen` (sent to other gateways at
    /// most every ten seconds).
    pub fn heartbeat(&self, key: &Key, conn: ConnId) -> bool {
        let mut st = self.lock();
        let Some(c) = st.local.get_mut(key).and_then(|m| m.get_mut(&conn)) else {
            return false;
        };
        c.last_seen = now_ms();
        let user = c.user.clone();
        let due = st
            .last_sent
            .get(&(key.clone(), user.clone()))
            .is_none_or(|t| t.elapsed() >= LAST_SEEN_EVERY);
        if due {
            self.changed(&mut st, key, user);
        }
        true
    }

    /// Apply this gateway's new entry for `user` here and send it on.
    fn changed(&self, st: &mut State, key: &Key, user: Arc<str>) {
        let entry = self.local_entry(&st.local, key, &user);
        st.last_sent
            .insert((key.clone(), user.clone()), Instant::now());
        if entry.conns == 0 {
            st.last_sent.remove(&(key.clone(), user.clone()));
        }
        if let Some(view) = st.views.get_mut(key) {
            self.apply(key, view, self.pod.clone(), user.clone(), entry.clone());
        }
        if let Some(link) = self.link.get() {
            link.send_delta(
                key,
                Delta {
                    pod: self.pod.to_string(),
                    user: user.to_string(),
                    entry,
                },
            );
        }
    }

    /// Put an entry into a view; tell its observers when a user appeared
    /// or disappeared.
    fn apply(&self, key: &Key, view: &mut View, pod: Arc<str>, user: Arc<str>, entry: Entry) {
        let slot = (pod, user.clone());
        if view
            .entries
            .get(&slot)
            .is_some_and(|old| old.version >= entry.version)
        {
            return;
        }
        let before = view.present(&user);
        view.entries.insert(slot, entry);
        let after = view.present(&user);
        if before == after || !view.ready {
            return;
        }
        let kind = if after { Notice::Join } else { Notice::Leave };
        let count = view.count();
        let cap = view.cap as usize;
        if count > cap {
            // A big topic: counts only, coalesced.
            self.schedule_count(key, view);
            return;
        }
        if !after && count == cap {
            // Back to the cap from above: observers had counts only, so
            // the members are listed again (and a pending count dropped).
            view.count_due = false;
            let payload = Self::sync_payload(view);
            self.notify(key, view.observers.values(), Notice::Sync, &payload);
            return;
        }
        let mut payload = json!({ "count": count });
        if count <= view.cap as usize || !after {
            let e = view
                .members()
                .into_iter()
                .find(|(u, _)| *u == user)
                .map(|(_, e)| e)
                .unwrap_or(Entry {
                    conns: 0,
                    info: None,
                    last_seen: now_ms(),
                    version: 0,
                });
            if count <= view.cap as usize {
                payload["user"] = member_json(&user, &e);
            }
        }
        self.notify(key, view.observers.values(), kind, &payload);
    }

    fn notify<'a>(
        &self,
        key: &Key,
        to: impl Iterator<Item = &'a Arc<Mailbox>>,
        kind: Notice,
        payload: &Value,
    ) {
        let notice = Arc::new(Event::notice(
            key.0.clone(),
            key.1.clone(),
            self.region.clone(),
            kind.types(),
            payload,
            time::OffsetDateTime::now_utc(),
        ));
        for mailbox in to {
            mailbox.offer(&notice);
        }
    }

    /// Send the observers of a view above its cap one count-only sync
    /// within [`COUNT_EVERY`] (the first change schedules it).
    fn schedule_count(&self, key: &Key, view: &mut View) {
        if view.count_due {
            return;
        }
        let Some(me) = self.me.upgrade() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        view.count_due = true;
        let key = key.clone();
        rt.spawn(async move {
            tokio::time::sleep(COUNT_EVERY).await;
            let mut st = me.lock();
            if let Some(view) = st.views.get_mut(&key)
                && view.count_due
            {
                view.count_due = false;
                let payload = Self::sync_payload(view);
                me.notify(&key, view.observers.values(), Notice::Sync, &payload);
            }
        });
    }

    fn sync_payload(view: &View) -> Value {
        let count = view.count();
        let users: Vec<Value> = if count <= view.cap as usize {
            view.members()
                .iter()
                .map(|(u, e)| member_json(u, e))
                .collect()
        } else {
            Vec::new()
        };
        json!({ "users": users, "count": count, "truncated": count > view.cap as usize })
    }

    /// A connection starts observing `key`: it gets `sync` (the current
    /// members) now, or once the other gateways answered, then `join` and
    /// `leave`. `cap`: members listed before only counts are sent.
    pub fn observe(self: &Arc<Self>, key: Key, conn: ConnId, mailbox: Arc<Mailbox>, cap: u32) {
        let mut st = self.lock();
        let st = &mut *st;
        let created = !st.views.contains_key(&key);
        let view = st.views.entry(key.clone()).or_default();
        view.cap = cap;
        view.observers.insert(conn, mailbox.clone());
        if created {
            // This gateway's own members first.
            let users: Vec<Arc<str>> = st
                .local
                .get(&key)
                .into_iter()
                .flat_map(|m| m.values().map(|c| c.user.clone()))
                .collect();
            for user in users {
                let entry = self.local_entry(&st.local, &key, &user);
                view.entries.insert((self.pod.clone(), user), entry);
            }
            match self.link.get() {
                Some(link) => {
                    view.pending.push(conn);
                    view.feed = Some(link.open_view(self.clone(), key.clone()));
                }
                None => view.ready = true,
            }
        } else if !view.ready {
            view.pending.push(conn);
        }
        if view.ready {
            let payload = Self::sync_payload(view);
            self.notify(&key, std::iter::once(&mailbox), Notice::Sync, &payload);
        }
    }

    /// A connection stops observing `key`; the last one drops the view.
    pub fn unobserve(&self, key: &Key, conn: ConnId) {
        let mut st = self.lock();
        let Some(view) = st.views.get_mut(key) else {
            return;
        };
        view.observers.remove(&conn);
        view.pending.retain(|c| *c != conn);
        if view.observers.is_empty()
            && let Some(view) = st.views.remove(key)
            && let Some(feed) = view.feed
        {
            feed.abort();
        }
    }

    /// Entries of another gateway arrived (a delta or a sync answer).
    pub(crate) fn merge(&self, key: &Key, pod: Arc<str>, members: Vec<(Arc<str>, Entry)>) {
        if pod == self.pod {
            return;
        }
        let mut st = self.lock();
        st.pods.entry(pod.clone()).or_insert_with(Instant::now);
        if let Some(view) = st.views.get_mut(key) {
            for (user, entry) in members {
                self.apply(key, view, pod.clone(), user, entry);
            }
        }
    }

    /// The view's first sync is complete: tell the observers waiting for it.
    pub(crate) fn view_ready(&self, key: &Key) {
        let mut st = self.lock();
        let Some(view) = st.views.get_mut(key) else {
            return;
        };
        view.ready = true;
        let payload = Self::sync_payload(view);
        let waiting: Vec<Arc<Mailbox>> = view
            .pending
            .drain(..)
            .filter_map(|c| view.observers.get(&c).cloned())
            .collect();
        self.notify(key, waiting.iter(), Notice::Sync, &payload);
    }

    /// This gateway's members of `key`, as a sync answer.
    pub(crate) fn local_members(&self, key: &Key) -> Vec<(String, Entry)> {
        let st = self.lock();
        let mut users: Vec<Arc<str>> = st
            .local
            .get(key)
            .into_iter()
            .flat_map(|m| m.values().map(|c| c.user.clone()))
            .collect();
        users.sort();
        users.dedup();
        users
            .into_iter()
            .map(|u| {
                let e = self.local_entry(&st.local, key, &u);
                (u.to_string(), e)
            })
            .collect()
    }

    /// Another gateway is alive. Returns true when it was not known (new,
    /// or back after a partition): views then sync again.
    pub(crate) fn heard(&self, pod: &str) -> bool {
        if pod == &*self.pod {
            return false;
        }
        let mut st = self.lock();
        st.pods.insert(pod.into(), Instant::now()).is_none()
    }

    /// Gateways not heard from for `timeout`: dropped, their members leave.
    pub(crate) fn expire(&self, timeout: Duration) -> Vec<Arc<str>> {
        let mut st = self.lock();
        let st = &mut *st;
        let dead: Vec<Arc<str>> = st
            .pods
            .iter()
            .filter(|(_, t)| t.elapsed() >= timeout)
            .map(|(p, _)| p.clone())
            .collect();
        for pod in &dead {
            st.pods.remove(pod);
            for (key, view) in st.views.iter_mut() {
                let gone: Vec<(Arc<str>, Entry)> = view
                    .entries
                    .iter()
                    .filter(|((p, _), e)| p == pod && e.conns > 0)
                    .map(|((_, u), e)| {
                        (
                            u.clone(),
                            Entry {
                                conns: 0,
                                version: e.version + 1,
                                ..e.clone()
                            },
                        )
                    })
                    .collect();
                for (user, entry) in gone {
                    self.apply(key, view, pod.clone(), user, entry);
                }
                // Its tombstones go too: a gateway that comes back starts
                // over (its versions continue, so nothing stale returns).
                view.entries.retain(|(p, _), _| p != pod);
            }
        }
        dead
    }

    /// Gateways heard from (for tests and the sync wait).
    pub fn known_pods(&self) -> usize {
        self.lock().pods.len()
    }

    /// Send every local member again (new versions): after this gateway's
    /// NATS connection was re-established, deltas sent while it was down
    /// may have been lost.
    pub(crate) fn reannounce(&self) {
        let mut st = self.lock();
        let st = &mut *st;
        let members: Vec<(Key, Arc<str>)> = st
            .local
            .iter()
            .flat_map(|(k, m)| m.values().map(move |c| (k.clone(), c.user.clone())))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for (key, user) in members {
            self.changed(st, &key, user);
        }
    }

    /// Keys with a view (to sync again after a partition).
    pub(crate) fn viewed(&self) -> Vec<Key> {
        self.lock().views.keys().cloned().collect()
    }
}

/// The kinds of presence notice.
#[derive(Debug, Clone, Copy)]
enum Notice {
    Join,
    Leave,
    Sync,
}

impl Notice {
    /// (seed 001 type, seed 004 type).
    fn types(self) -> (&'static str, &'static str) {
        match self {
            Notice::Join => ("presence.join", "presence:join"),
            Notice::Leave => ("presence.leave", "presence:leave"),
            Notice::Sync => ("presence.sync", "presence:sync"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventKind;

    fn key(t: &str) -> Key {
        ("acme".into(), Topic::parse(t).unwrap())
    }

    fn frames(m: &Mailbox) -> Vec<Value> {
        std::iter::from_fn(|| m.try_take().ok().flatten())
            .map(|e| {
                assert_eq!(e.kind, EventKind::Presence);
                serde_json::from_str(&e.channel_frame()).unwrap()
            })
            .collect()
    }

    #[test]
    fn join_sync_leave_on_one_gateway() {
        let p = Presence::new("eu".into());
        let k = key("presence:doc/1");
        p.join(k.clone(), 1, "alice".into(), Some(json!({"name": "Alice"})));
        let watcher = Arc::new(Mailbox::new(16, None, "bob".into()));
        p.observe(k.clone(), 2, watcher.clone(), 100);
        let got = frames(&watcher);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["type"], "presence:sync");
        assert_eq!(got[0]["channel"], "presence:doc/1");
        assert_eq!(got[0]["payload"]["users"][0]["id"], "alice");
        assert_eq!(got[0]["payload"]["users"][0]["name"], "Alice");
        // A second connection of alice: no join (she is already present).
        p.join(k.clone(), 3, "alice".into(), None);
        p.join(k.clone(), 2, "bob".into(), None);
        let got = frames(&watcher);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["type"], "presence:join");
        assert_eq!(got[0]["payload"]["user"]["id"], "bob");
        assert_eq!(got[0]["payload"]["count"], 2);
        p.leave(&k, 1);
        assert!(frames(&watcher).is_empty(), "alice still has a connection");
        p.leave(&k, 3);
        let got = frames(&watcher);
        assert_eq!(got[0]["type"], "presence:leave");
        assert_eq!(got[0]["payload"]["user"]["id"], "alice");
        assert_eq!(got[0]["payload"]["count"], 1);
    }

    #[tokio::test(start_paused = true)]
    async fn above_the_cap_counts_are_coalesced() {
        let p = Presence::new("eu".into());
        let k = key("presence:big");
        for i in 0..5 {
            p.join(k.clone(), i, format!("u{i}").into(), None);
        }
        let w = Arc::new(Mailbox::new(16, None, "w".into()));
        p.observe(k.clone(), 99, w.clone(), 3);
        let got = frames(&w);
        assert_eq!(got[0]["payload"]["count"], 5);
        assert_eq!(got[0]["payload"]["truncated"], true);
        assert_eq!(got[0]["payload"]["users"], json!([]));
        // Ten changes above the cap: nothing at once, one count within a second.
        for i in 10..20 {
            p.join(k.clone(), i, format!("u{i}").into(), None);
        }
        p.leave(&k, 10);
        assert!(frames(&w).is_empty());
        tokio::time::sleep(COUNT_EVERY + Duration::from_millis(10)).await;
        let got = frames(&w);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["type"], "presence:sync");
        assert_eq!(got[0]["payload"]["count"], 14);
        // Back down to the cap: the members are listed again, at once.
        for i in (0..5).chain(11..17) {
            p.leave(&k, i);
        }
        let got = frames(&w);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["type"], "presence:sync");
        assert_eq!(got[0]["payload"]["count"], 3);
        assert_eq!(got[0]["payload"]["users"].as_array().unwrap().len(), 3);
        // Under the cap, notices per change again.
        p.leave(&k, 18);
        let got = frames(&w);
        assert_eq!(got[0]["type"], "presence:leave");
        assert_eq!(got[0]["payload"]["user"]["id"], "u18");
        tokio::time::sleep(COUNT_EVERY * 2).await;
        assert!(frames(&w).is_empty(), "the pending count was dropped");
    }

    #[test]
    fn tenants_do_not_share_presence() {
        let p = Presence::new("eu".into());
        let t = Topic::parse("presence:doc").unwrap();
        p.join(("a".into(), t.clone()), 1, "alice".into(), None);
        let w = Arc::new(Mailbox::new(16, None, "w".into()));
        p.observe(("b".into(), t.clone()), 2, w.clone(), 100);
        p.join(("a".into(), t), 3, "carol".into(), None);
        let got = frames(&w);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0]["payload"]["count"], 0);
    }

    #[test]
    fn a_silent_gateway_is_dropped_and_its_members_leave() {
        let p = Presence::new("eu".into());
        let k = key("presence:doc");
        let w = Arc::new(Mailbox::new(16, None, "w".into()));
        p.observe(k.clone(), 1, w.clone(), 100);
        frames(&w);
        let entry = Entry {
            conns: 1,
            info: None,
            last_seen: 1,
            version: 1,
        };
        p.merge(&k, "other".into(), vec![("zed".into(), entry.clone())]);
        assert_eq!(frames(&w)[0]["type"], "presence:join");
        // An older version of the same entry changes nothing.
        p.merge(
            &k,
            "other".into(),
            vec![(
                "zed".into(),
                Entry {
                    conns: 0,
                    version: 0,
                    ..entry
                },
            )],
        );
        assert!(frames(&w).is_empty());
        assert!(p.expire(Duration::from_secs(3600)).is_empty());
        let dead = p.expire(Duration::ZERO);
        assert_eq!(dead, vec![Arc::<str>::from("other")]);
        let got = frames(&w);
        assert_eq!(got[0]["type"], "presence:leave");
        assert_eq!(got[0]["payload"]["user"]["id"], "zed");
    }
}
