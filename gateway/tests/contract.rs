//! The broker contract: every behaviour clients rely on, run against both
//! brokers: the embedded one and NATS/JetStream (a real single-node
//! nats-server per test). Each scenario drives a real gateway router over
//! real sockets.

mod common;

use std::time::Duration;

use common::nats::{TempDir, single};
use common::*;
use serde_json::json;
use switchboard_gateway::config::{GatewayConfig, NatsConfig};

/// A gateway on the chosen broker, and what keeps its NATS alive.
struct Env {
    gw: Gateway,
    _nats: Option<(common::nats::Cluster, TempDir)>,
}

async fn env(nats: bool, tweak: impl FnOnce(&mut GatewayConfig)) -> Env {
    let mut cfg = config();
    tweak(&mut cfg);
    if !nats {
        let gw = Gateway::start(cfg).await;
        return Env { gw, _nats: None };
    }
    let dir = TempDir::new("contract");
    let cluster = single(&dir).await;
    cfg.nats = Some(NatsConfig {
        urls: cluster.urls(),
        ..NatsConfig::default()
    });
    let gw = Gateway::start(cfg).await;
    gw.wait_ready().await;
    Env {
        gw,
        _nats: Some((cluster, dir)),
    }
}

macro_rules! contract {
    ($($name:ident($tweak:expr, $body:expr);)*) => {
        mod embedded {
            use super::*;
            $(#[tokio::test] async fn $name() { let e = env(false, $tweak).await; ($body)(e).await; })*
        }
        mod nats {
            use super::*;
            $(#[tokio::test] async fn $name() { let e = env(true, $tweak).await; ($body)(e).await; })*
        }
    };
}

fn defaults(_: &mut GatewayConfig) {}

async fn overlapping_patterns_deliver_once_in_order(e: Env) {
    let gw = &e.gw;
    let mut c = Client::open(gw, "acme").await;
    c.subscribe(&["deal.*", "deal.stage.updated", "deal.*.updated", "*"])
        .await;
    let mut sent = Vec::new();
    for i in 0..20 {
        let topic = if i % 2 == 0 {
            "deal.stage.updated"
        } else {
            "deal.owner.changed"
        };
        sent.push(publish_ok(gw, "acme", topic, json!({"i": i})).await);
    }
    assert_eq!(ids(&c.events(20).await), sent);
    let marker = publish_ok(gw, "acme", "zzz.marker", json!({})).await;
    assert_eq!(ids(&c.events(1).await), [marker], "no duplicate was queued");
}

async fn tenants_are_walls(e: Env) {
    let gw = &e.gw;
    let mut a = Client::open(gw, "acme").await;
    a.subscribe(&["*"]).await;
    let mut b = Client::open(gw, "a.b").await; // a tenant with a dot must not alias anything
    b.subscribe(&["*"]).await;
    let secret = publish_ok(gw, "a.b", "x.y", json!({"secret": 1})).await;
    assert_eq!(ids(&b.events(1).await), std::slice::from_ref(&secret));
    a.send(json!({"type": "cursor.update", "cursor": secret}))
        .await;
    let m = a.recv().await;
    assert_ne!(m["type"], "event", "{m}");
    let own = publish_ok(gw, "acme", "x.y", json!({})).await;
    let next = a.recv_type("event").await;
    assert_eq!(next["data"]["event_id"], own.as_str());
}

async fn resume_gets_exactly_the_missed_events(e: Env) {
    let gw = &e.gw;
    let first = publish_ok(gw, "acme", "r.a", json!({"n": 0})).await;
    let mut missed = Vec::new();
    for n in 1..=5 {
        missed.push(publish_ok(gw, "acme", "r.a", json!({"n": n})).await);
        publish_ok(gw, "acme", "other.topic", json!({})).await;
        publish_ok(gw, "globex", "r.a", json!({})).await;
    }
    let mut c = Client::open(gw, "acme").await;
    c.subscribe(&["r.*"]).await;
    c.send(json!({"type": "cursor.update", "cursor": first}))
        .await;
    assert_eq!(ids(&c.events(5).await), missed);
    let done = c.recv_type("replay.complete").await;
    assert_eq!(done["data"]["replayed"], 5);
    let live = publish_ok(gw, "acme", "r.a", json!({})).await;
    assert_eq!(ids(&c.events(1).await), [live]);
}

/// Resuming several exact topics (cluster: read with one filter per topic)
/// and overlapping patterns (read per tenant, filtered here) both give
/// exactly the missed events of those topics, in order.
async fn resume_over_several_topics(e: Env) {
    let gw = &e.gw;
    let first = publish_ok(gw, "acme", "m.a", json!({})).await;
    let (mut exact, mut wide) = (Vec::new(), Vec::new());
    for n in 0..3 {
        for topic in ["m.a", "m.b", "m.c", "m.x.y"] {
            let id = publish_ok(gw, "acme", topic, json!({ "n": n })).await;
            if topic == "m.a" || topic == "m.b" {
                exact.push(id.clone());
            }
            // A trailing `*` matches the rest of the topic, m.x.y included.
            wide.push(id);
        }
    }
    let mut c = Client::open(gw, "acme").await;
    c.subscribe(&["m.a", "m.b"]).await;
    c.send(json!({"type": "cursor.update", "cursor": first.clone()}))
        .await;
    assert_eq!(ids(&c.events(exact.len()).await), exact);
    assert_eq!(c.recv_type("replay.complete").await["data"]["replayed"], 6);

    let mut d = Client::open(gw, "acme").await;
    d.subscribe(&["m.a", "m.*"]).await;
    d.send(json!({"type": "cursor.update", "cursor": first}))
        .await;
    assert_eq!(ids(&d.events(wide.len()).await), wide);
    assert_eq!(d.recv_type("replay.complete").await["data"]["replayed"], 12);
}

async fn seam_has_no_gap_or_duplicate_under_load(e: Env) {
    let gw = &e.gw;
    let first = publish_ok(gw, "acme", "seam.x", json!({"i": 0})).await;
    let publisher = {
        let url = gw.http();
        let t = token("acme", &["publish"]);
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            for i in 1..=150 {
                let r = http
                    .post(format!("{url}/api/realtime/publish/"))
                    .bearer_auth(&t)
                    .json(&json!({"event_type": "seam.x", "data": {"i": i}}))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(30)).await;
    let mut c =
        Client::connect(&gw.ws(&format!("token={}&cursor={first}", token("acme", &[])))).await;
    c.recv_type("connection.established").await;
    c.subscribe(&["seam.*"]).await;
    let mut got = Vec::new();
    while got.len() < 150 {
        let m = c.recv().await;
        if m["type"] == "event" {
            got.push(m["data"]["data"]["i"].as_i64().unwrap());
        }
    }
    publisher.await.unwrap();
    assert_eq!(got, (1..=150).collect::<Vec<_>>());
}

async fn idempotency_is_per_tenant(e: Env) {
    let gw = &e.gw;
    let body = json!({"event_type": "pay.done", "data": {"v": 1}, "idempotency_key": "op-1"});
    let (s1, b1) = publish(gw, &token("acme", &["publish"]), body.clone()).await;
    let (s2, b2) = publish(gw, &token("acme", &["publish"]), body.clone()).await;
    let (s3, b3) = publish(gw, &token("globex", &["publish"]), body).await;
    assert_eq!((s1, s2, s3), (201, 200, 201));
    assert_eq!(b1["event_id"], b2["event_id"]);
    assert_eq!(b2["duplicate"], true);
    assert_eq!(
        b3["duplicate"], false,
        "the same key from another tenant is its own event"
    );
    // Stored once: a replay from before it finds one copy.
    let mut c = Client::open(gw, "acme").await;
    c.subscribe(&["pay.*"]).await;
    let marker = publish_ok(gw, "acme", "pay.marker", json!({})).await;
    c.events(1).await;
    let (_, body) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=pay.*&cursor={}&timeout=0",
            gw.http(),
            foreign_start(&b1)
        ),
        Some(&token("acme", &[])),
    )
    .await;
    let got = ids(body["events"].as_array().unwrap());
    assert_eq!(got, [b1["event_id"].as_str().unwrap().to_owned(), marker]);
}

/// The cursor just before an event id (`<epoch>-<seq-1>`).
fn foreign_start(published: &serde_json::Value) -> String {
    let id = published["event_id"].as_str().unwrap();
    let (epoch, seq) = id.split_once('-').unwrap();
    format!("{epoch}-{}", seq.parse::<u64>().unwrap() - 1)
}

async fn unknown_cursors_are_a_gap(e: Env) {
    let gw = &e.gw;
    let kept = publish_ok(gw, "acme", "g.x", json!({})).await;
    let mut c = Client::open(gw, "acme").await;
    c.subscribe(&["g.*"]).await;
    for bad in ["ffff-1", "not-a-cursor", "0-0"] {
        c.send(json!({"type": "cursor.update", "cursor": bad}))
            .await;
        let gap = c.recv().await;
        assert_eq!(
            (gap["type"].as_str(), gap["data"]["reason"].as_str()),
            (Some("resume.gap"), Some("unknown")),
            "{bad}"
        );
        assert_eq!(
            ids(&c.events(1).await),
            std::slice::from_ref(&kept),
            "what is retained follows"
        );
        c.recv_type("replay.complete").await;
    }
}

async fn expired_cursors_are_a_gap(e: Env) {
    let gw = &e.gw;
    let old = publish_ok(gw, "acme", "g.x", json!({})).await;
    publish_ok(gw, "acme", "g.x", json!({"lost": true})).await;
    // Retention is 2 s: wait until both are gone (that is the behaviour under test).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let fresh = publish_ok(gw, "acme", "g.x", json!({})).await;
    let (_, body) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=g.*&cursor={old}&timeout=0",
            gw.http()
        ),
        Some(&token("acme", &[])),
    )
    .await;
    assert_eq!(body["resume_gap"]["reason"], "expired", "{body}");
    assert_eq!(ids(body["events"].as_array().unwrap()), [fresh]);
}

async fn long_poll_and_sse_share_cursors(e: Env) {
    let gw = &e.gw;
    let t = token("acme", &[]);
    let e1 = publish_ok(gw, "acme", "s.a", json!({})).await;
    let e2 = publish_ok(gw, "acme", "s.a", json!({})).await;
    let (_, body) = get_json(
        &format!("{}/api/realtime/poll/?topics=s.*&cursor={e1}", gw.http()),
        Some(&t),
    )
    .await;
    assert_eq!(
        ids(body["events"].as_array().unwrap()),
        std::slice::from_ref(&e2)
    );
    let resp = reqwest::Client::new()
        .get(format!(
            "{}/api/realtime/sse/?topics=s.*&token={t}",
            gw.http()
        ))
        .header("Last-Event-ID", &e1)
        .send()
        .await
        .unwrap();
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    read_sse_until(&mut stream, &mut text, &format!("id: {e2}")).await;
    assert!(!text.contains(&format!("id: {e1}\n")));
}

async fn clients_can_ask_for_one_region(e: Env) {
    let gw = &e.gw;
    let mut only_eu =
        Client::connect(&gw.ws(&format!("token={}&region=eu-west-1", token("acme", &[])))).await;
    only_eu.recv_type("connection.established").await;
    only_eu.subscribe(&["reg.*"]).await;
    let p = token("acme", &["publish"]);
    publish(
        gw,
        &p,
        json!({"event_type": "reg.a", "region": "us-east-1"}),
    )
    .await;
    let (_, eu) = publish(
        gw,
        &p,
        json!({"event_type": "reg.a", "region": "eu-west-1"}),
    )
    .await;
    let got = only_eu.events(1).await;
    assert_eq!(got[0]["event_id"], eu["event_id"]);
    assert_eq!(got[0]["metadata"]["region"], "eu-west-1");
}

/// Snapshots: the newest event of each matching topic, from the broker's
/// store (JetStream's last message per subject in cluster mode), never
/// another user's private channel or another tenant's topic; then a
/// subscription with `snapshot: true` gets the same first, live after.
async fn snapshots_give_the_last_value_per_topic(e: Env) {
    let gw = &e.gw;
    publish_ok(gw, "acme", "doc.1", json!({"v": 1})).await;
    let d1 = publish_ok(gw, "acme", "doc.1", json!({"v": 2})).await;
    let d2 = publish_ok(gw, "acme", "doc.2", json!({"v": 1})).await;
    publish_ok(gw, "acme", "user:bob", json!({"secret": 1})).await;
    publish_ok(gw, "globex", "doc.3", json!({"v": 1})).await;
    publish_ok(gw, "acme", "other.x", json!({})).await;
    let url = format!(
        "{}/api/realtime/snapshot/?topics=doc.*,user:alice",
        gw.http()
    );
    let (status, body) = get_json(&url, Some(&user_token("acme", "alice"))).await;
    assert_eq!(status, 200, "{body}");
    let got: Vec<(&str, i64)> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event_id"].as_str().unwrap(),
                e["data"]["v"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, [(d1.as_str(), 2), (d2.as_str(), 1)], "{body}");
    assert_eq!(body["has_more"], false);
    // The cursor continues after the snapshot: a poll from it gets only what follows.
    let cursor = body["cursor"].as_str().unwrap().to_owned();
    let d3 = publish_ok(gw, "acme", "doc.1", json!({"v": 3})).await;
    let (_, page) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=doc.*&cursor={cursor}&timeout=0",
            gw.http()
        ),
        Some(&user_token("acme", "alice")),
    )
    .await;
    assert_eq!(
        ids(page["events"].as_array().unwrap()),
        std::slice::from_ref(&d3),
        "{page}"
    );
    // A topic the policy refuses is refused here too.
    let (status, _) = get_json(
        &format!("{}/api/realtime/snapshot/?topics=user:bob", gw.http()),
        Some(&user_token("acme", "alice")),
    )
    .await;
    assert_eq!(status, 403);
    // Over WebSocket: the last values first, then live.
    let mut c = Client::connect(&gw.ws(&format!("token={}", user_token("acme", "alice")))).await;
    c.recv_type("connection.established").await;
    c.send(json!({"type": "subscribe", "topics": ["doc.*"], "snapshot": true}))
        .await;
    c.recv_type("subscription.confirmed").await;
    let first = c.events(2).await;
    assert_eq!(ids(&first), [d2, d3], "doc.2's and doc.1's newest");
    let live = publish_ok(gw, "acme", "doc.2", json!({"v": 2})).await;
    assert_eq!(ids(&c.events(1).await), [live]);
}

/// A user channel and a client publish behave the same on both brokers.
async fn user_channels_and_client_publish(e: Env) {
    let gw = &e.gw;
    let mut alice =
        Client::connect(&gw.ws(&format!("token={}", user_token("acme", "alice")))).await;
    alice.recv_type("connection.established").await;
    let mut bob = Client::connect(&gw.ws(&format!("token={}", user_token("acme", "bob")))).await;
    bob.recv_type("connection.established").await;
    bob.subscribe(&[">"]).await;
    bob.send(json!({"type": "publish", "topic": "user:alice", "data": {"hi": 1}, "requestId": 1}))
        .await;
    let ack = bob.recv_type("publish.ack").await;
    let id = ack["data"]["event_id"].as_str().unwrap().to_owned();
    let dm = alice.events(1).await.remove(0);
    assert_eq!(dm["event_id"], id.as_str());
    assert_eq!(dm["metadata"]["publisher"], "bob");
    let marker = publish_ok(gw, "acme", "zzz.marker", json!({})).await;
    assert_eq!(
        ids(&bob.events(1).await),
        [marker],
        "bob's `>` never delivers alice's channel"
    );
}

/// Seed 002's poll: `{events, hasMore, nextEventId}`, X-Tenant-ID checked.
async fn seed_002_poll(e: Env) {
    let gw = &e.gw;
    let url = |q: &str| format!("{}/api/events/poll?{q}", gw.http());
    let get = |u: String, tenant: &'static str| async move {
        let r = reqwest::Client::new()
            .get(u)
            .bearer_auth(token("acme", &[]))
            .header("X-Tenant-ID", tenant)
            .send()
            .await
            .unwrap();
        let s = r.status().as_u16();
        (s, r.json::<serde_json::Value>().await.unwrap())
    };
    let (status, first) = get(url(""), "acme").await;
    assert_eq!(status, 200, "{first}");
    assert_eq!(first["events"], json!([]));
    let start = first["nextEventId"].as_str().unwrap().to_owned();
    let mut sent = Vec::new();
    for i in 0..3 {
        sent.push(publish_ok(gw, "acme", "task.updated", json!({"i": i})).await);
    }
    let (_, page) = get(url(&format!("lastEventId={start}&limit=2")), "acme").await;
    assert_eq!(ids(page["events"].as_array().unwrap()), sent[..2]);
    assert_eq!(page["hasMore"], true, "{page}");
    let next = page["nextEventId"].as_str().unwrap().to_owned();
    let (_, page) = get(url(&format!("lastEventId={next}")), "acme").await;
    assert_eq!(ids(page["events"].as_array().unwrap()), sent[2..]);
    assert_eq!(page["hasMore"], false);
    let (status, _) = get(url(""), "globex").await;
    assert_eq!(status, 401, "X-Tenant-ID must be the token's tenant");
}

/// Presence on one gateway behaves the same on both brokers (in cluster
/// mode the view also asks NATS for other gateways' members).
async fn presence_join_sync_leave(e: Env) {
    let gw = &e.gw;
    let open = |user: &str| gw.ws(&format!("token={}", user_token("acme", user)));
    let mut alice = Client::connect(&open("alice")).await;
    alice.recv_type("connection.established").await;
    alice
        .send(json!({"type": "presence.join", "topic": "presence:doc", "info": {"name": "A"}}))
        .await;
    let sync = alice.recv_type("presence.sync").await;
    assert_eq!(sync["data"]["data"]["users"][0]["id"], "alice", "{sync}");
    let mut bob = Client::connect(&open("bob")).await;
    bob.recv_type("connection.established").await;
    bob.send(json!({"type": "presence.join", "topic": "presence:doc"}))
        .await;
    assert_eq!(
        bob.recv_type("presence.sync").await["data"]["data"]["count"],
        2
    );
    assert_eq!(
        alice.recv_type("presence.join").await["data"]["data"]["user"]["id"],
        "bob"
    );
    drop(bob);
    assert_eq!(
        alice.recv_type("presence.leave").await["data"]["data"]["user"]["id"],
        "bob"
    );
}

contract! {
    presence(defaults, presence_join_sync_leave);
    snapshots(defaults, snapshots_give_the_last_value_per_topic);
    user_channels(defaults, user_channels_and_client_publish);
    seed_002(defaults, seed_002_poll);
    overlapping(defaults, overlapping_patterns_deliver_once_in_order);
    tenants(defaults, tenants_are_walls);
    resume(defaults, resume_gets_exactly_the_missed_events);
    resume_topics(defaults, resume_over_several_topics);
    seam(defaults, seam_has_no_gap_or_duplicate_under_load);
    idempotency(defaults, idempotency_is_per_tenant);
    unknown_cursor(defaults, unknown_cursors_are_a_gap);
    expired_cursor(|c: &mut GatewayConfig| c.history.retention_seconds = 2, expired_cursors_are_a_gap);
    poll_and_sse(defaults, long_poll_and_sse_share_cursors);
    region_filter(defaults, clients_can_ask_for_one_region);
}
