//! Presence over real sockets: join, sync, leave and heartbeat on one
//! gateway (embedded) and across gateway processes on a real nats-server
//! (cluster mode), including a gateway killed with SIGKILL.

mod common;

use std::time::{Duration, Instant};

use common::nats::*;
use common::*;
use serde_json::{Value, json};
use switchboard_gateway::config::PolicyBundle;

async fn open_url(url: String) -> Client {
    let mut c = Client::connect(&url).await;
    c.recv_type("connection.established").await;
    c
}

/// Join `topic` with `info` (native form); returns the sync that follows.
async fn join(c: &mut Client, topic: &str, info: Value) -> Value {
    c.send(json!({"type": "presence.join", "topic": topic, "info": info, "requestId": "j"}))
        .await;
    let ok = c.recv_type("subscription.confirmed").await;
    assert_eq!(ok["data"]["topics"], json!([topic]), "{ok}");
    c.recv_type("presence.sync").await
}

/// The member ids of a sync notice, sorted.
fn member_ids(sync: &Value) -> Vec<String> {
    let mut ids: Vec<String> = sync["data"]["data"]["users"]
        .as_array()
        .unwrap_or_else(|| panic!("no users in {sync}"))
        .iter()
        .map(|u| u["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn members_join_sync_and_leave_when_their_last_connection_goes() {
    let gw = Gateway::default().await;
    let url = |user: &str| gw.ws(&format!("token={}", user_token("acme", user)));
    let mut alice = open_url(url("alice")).await;
    let sync = join(&mut alice, "presence:doc-1", json!({"name": "Alice"})).await;
    assert_eq!(member_ids(&sync), ["alice"]);
    let me = &sync["data"]["data"]["users"][0];
    assert_eq!(
        (me["name"].as_str(), me["connections"].as_u64()),
        (Some("Alice"), Some(1))
    );
    assert!(me["lastSeen"].as_i64().unwrap() > 1_700_000_000_000, "{me}");

    let mut bob = open_url(url("bob")).await;
    let sync = join(&mut bob, "presence:doc-1", json!({"name": "Bob"})).await;
    assert_eq!(member_ids(&sync), ["alice", "bob"]);
    let joined = alice.recv_type("presence.join").await;
    assert_eq!(joined["data"]["topic"], "presence:doc-1");
    assert_eq!(joined["data"]["data"]["user"]["id"], "bob");
    assert_eq!(joined["data"]["data"]["user"]["name"], "Bob");
    assert_eq!(joined["data"]["data"]["count"], 2);

    // A second connection of alice: no new member, no notice.
    let mut alice2 = open_url(url("alice")).await;
    join(&mut alice2, "presence:doc-1", json!({"name": "Alice"})).await;
    // A heartbeat is silent; one for a topic not joined is an error.
    alice2
        .send(json!({"type": "presence.heartbeat", "topic": "presence:doc-1"}))
        .await;
    alice2
        .send(json!({"type": "presence.heartbeat", "topic": "presence:doc-2", "requestId": 3}))
        .await;
    let m = alice2.recv().await;
    assert_eq!(
        (m["type"].as_str(), m["requestId"].as_i64()),
        (Some("error"), Some(3)),
        "{m}"
    );

    drop(alice);
    // bob sees nothing for alice's first connection; her last one leaving is a leave.
    alice2
        .send(json!({"type": "presence.leave", "topic": "presence:doc-1", "requestId": "l"}))
        .await;
    assert_eq!(alice2.recv_type("presence.left").await["requestId"], "l");
    let left = bob.recv().await;
    assert_eq!(left["type"], "presence.leave", "{left}");
    assert_eq!(left["data"]["data"]["user"]["id"], "alice");
    assert_eq!(left["data"]["data"]["count"], 1);

    // A viewer that only subscribes (does not join) sees the members too.
    let mut viewer = open_url(url("carol")).await;
    viewer.subscribe(&["presence:doc-1"]).await;
    let sync = viewer.recv_type("presence.sync").await;
    assert_eq!(member_ids(&sync), ["bob"]);
    drop(bob);
    let left = viewer.recv_type("presence.leave").await;
    assert_eq!(left["data"]["data"]["user"]["id"], "bob");
    assert_eq!(left["data"]["data"]["count"], 0);
}

#[tokio::test]
async fn seed_004_presence_frames() {
    let gw = Gateway::default().await;
    let mut alice = open_url(gw.ws(&format!("token={}", user_token("acme", "alice")))).await;
    alice
        .send(json!({"type": "presence:join", "channel": "presence:workspace/tasks", "payload": {"name": "Alice"}, "requestId": "r1"}))
        .await;
    let ok = alice.recv().await;
    assert_eq!(
        (
            ok["type"].as_str(),
            ok["channel"].as_str(),
            ok["requestId"].as_str()
        ),
        (
            Some("subscribed"),
            Some("presence:workspace/tasks"),
            Some("r1")
        )
    );
    let sync = alice.recv().await;
    assert_eq!(sync["type"], "presence:sync", "{sync}");
    assert_eq!(sync["channel"], "presence:workspace/tasks");
    assert_eq!(sync["payload"]["users"][0]["id"], "alice");
    assert_eq!(sync["payload"]["users"][0]["name"], "Alice");
    assert!(sync["timestamp"].as_i64().is_some(), "{sync}");
}

#[tokio::test]
async fn presence_is_refused_where_it_does_not_apply_and_never_crosses_tenants() {
    let gw = Gateway::default().await;
    gw.node.set_policy(
        PolicyBundle::from_yaml(
            r#"
tenants:
  acme:
    subscribe: [{pattern: ">"}, {pattern: "room.*", class: presence}]
    limits: {max_presence_members: 2}
  globex:
    subscribe: [{pattern: ">"}]
"#,
        )
        .unwrap(),
    );
    let url = |t: &str, u: &str| gw.ws(&format!("token={}", user_token(t, u)));
    let mut a = open_url(url("acme", "alice")).await;
    // Not a presence topic.
    a.send(json!({"type": "presence.join", "topic": "deal.x", "requestId": 1}))
        .await;
    let m = a.recv().await;
    assert_eq!(
        (m["type"].as_str(), m["requestId"].as_i64()),
        (Some("error"), Some(1)),
        "{m}"
    );
    // Info must be a small object.
    a.send(json!({"type": "presence.join", "topic": "room.1", "info": "x".repeat(2000), "requestId": 2}))
        .await;
    assert_eq!(a.recv().await["type"], "error");
    // Class `presence` in the policy makes room.1 a presence topic.
    assert_eq!(
        member_ids(&join(&mut a, "room.1", json!({})).await),
        ["alice"]
    );

    // globex's member of the same name sees only globex.
    let mut g = open_url(url("globex", "gina")).await;
    g.send(json!({"type": "presence.join", "topic": "presence:room.1"}))
        .await;
    g.recv_type("subscription.confirmed").await;
    assert_eq!(member_ids(&g.recv_type("presence.sync").await), ["gina"]);
    let mut g2 = open_url(url("globex", "gus")).await;
    g2.send(json!({"type": "presence.join", "topic": "room.1"}))
        .await;
    // Not a presence topic for globex (no class), so refused there.
    assert_eq!(g2.recv().await["type"], "error");

    // Above acme's cap of 2 members only counts are sent.
    let mut b = open_url(url("acme", "bob")).await;
    join(&mut b, "room.1", json!({})).await;
    let mut c = open_url(url("acme", "carl")).await;
    let sync = join(&mut c, "room.1", json!({})).await;
    assert_eq!(sync["data"]["data"]["count"], 3, "{sync}");
    assert_eq!(sync["data"]["data"]["users"], json!([]));
    assert_eq!(sync["data"]["data"]["truncated"], true);
    g.expect_silence(Duration::from_millis(200)).await;
}

/// Wait until each gateway hears the others' presence heartbeats (right
/// after a start, a sync can miss members of gateways not heard yet: they
/// arrive as joins within a heartbeat).
async fn gateways_know_each_other(gws: &[&GatewayProc]) {
    for gw in gws {
        eventually("presence heartbeats heard", || async {
            metric(&scrape(&gw.admin()).await, "switchboard_presence_gateways")
                == (gws.len() - 1) as f64
        })
        .await;
    }
}

fn presence_yaml(nats: &Cluster) -> String {
    format!(
        "{}presence:\n  heartbeat_seconds: 1\n  timeout_seconds: 3\n",
        nats_yaml("local", &nats.urls(), &[], 1)
    )
}

#[tokio::test]
async fn presence_spans_gateways_and_a_killed_gateway_s_members_leave_within_the_timeout() {
    let dir = TempDir::new("presence");
    let nats = single(&dir).await;
    let yaml = presence_yaml(&nats);
    let mut gw1 = GatewayProc::start(&dir, "gw1", &yaml);
    let gw2 = GatewayProc::start(&dir, "gw2", &yaml);
    gw1.wait_ready().await;
    gw2.wait_ready().await;
    gateways_know_each_other(&[&gw1, &gw2]).await;
    let on = |gw: &GatewayProc, user: &str| gw.ws(&format!("token={}", user_token("acme", user)));

    let mut alice = open_url(on(&gw1, "alice")).await;
    assert_eq!(
        member_ids(&join(&mut alice, "presence:doc", json!({"name": "A"})).await),
        ["alice"]
    );
    // bob on the other gateway sees alice in his sync, and alice sees him join.
    let mut bob = open_url(on(&gw2, "bob")).await;
    let sync = join(&mut bob, "presence:doc", json!({"name": "B"})).await;
    assert_eq!(member_ids(&sync), ["alice", "bob"], "{sync}");
    assert_eq!(
        alice.recv_type("presence.join").await["data"]["data"]["user"]["name"],
        "B"
    );
    // Leaving on one gateway is seen on the other.
    alice
        .send(json!({"type": "presence.leave", "topic": "presence:doc"}))
        .await;
    assert_eq!(
        bob.recv_type("presence.leave").await["data"]["data"]["user"]["id"],
        "alice"
    );
    // A direct message published on gw1 reaches bob's connection on gw2.
    let (status, body) = {
        let r = reqwest::Client::new()
            .post(format!("{}/api/realtime/publish/", gw1.http()))
            .bearer_auth(token("acme", &["publish"]))
            .json(&json!({"event_type": "user:bob", "data": {"text": "hi"}}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 201, "{body}");
    assert_eq!(bob.events(1).await[0]["event_type"], "user:bob");

    // alice joins again on gw1; gw1 dies without a word.
    let mut alice = open_url(on(&gw1, "alice")).await;
    join(&mut alice, "presence:doc", json!({"name": "A"})).await;
    assert_eq!(
        bob.recv_type("presence.join").await["data"]["data"]["user"]["id"],
        "alice"
    );
    let killed = Instant::now();
    gw1.kill();
    let left = bob.recv_type("presence.leave").await;
    let after = killed.elapsed();
    println!("leave seen {after:?} after SIGKILL");
    assert_eq!(left["data"]["data"]["user"]["id"], "alice");
    assert!(
        after <= Duration::from_secs(5),
        "the leave came {after:?} after the kill (timeout 3 s, heartbeat 1 s)"
    );
    // A new viewer on the surviving gateway sees only bob.
    let mut carol = open_url(on(&gw2, "carol")).await;
    carol.subscribe(&["presence:doc"]).await;
    assert_eq!(member_ids(&carol.recv_type("presence.sync").await), ["bob"]);
}

/// The members a fresh observer on `gw` is told about.
async fn members_seen_on(gw: &GatewayProc, topic: &str) -> Vec<String> {
    let mut c = open_url(gw.ws(&format!("token={}", user_token("acme", "observer")))).await;
    c.subscribe(&[topic]).await;
    member_ids(&c.recv_type("presence.sync").await)
}

#[tokio::test]
async fn presence_recovers_when_a_nats_node_dies() {
    let dir = TempDir::new("presence-node");
    let mut nats = cluster3(&dir, "local").await;
    let yaml = |urls: &[String]| {
        format!(
            "{}presence:\n  heartbeat_seconds: 1\n  timeout_seconds: 3\n",
            nats_yaml("local", urls, &[], 3)
        )
    };
    // gw1 knows only n0 (it discovers the others); gw2 only n1.
    let gw1 = GatewayProc::start(&dir, "gw1", &yaml(&nats.urls()[..1]));
    let gw2 = GatewayProc::start(&dir, "gw2", &yaml(&nats.urls()[1..2]));
    gw1.wait_ready().await;
    gw2.wait_ready().await;
    gateways_know_each_other(&[&gw1, &gw2]).await;
    let on = |gw: &GatewayProc, user: &str| gw.ws(&format!("token={}", user_token("acme", user)));
    let mut alice = open_url(on(&gw1, "alice")).await;
    join(&mut alice, "presence:doc", json!({})).await;
    let mut bob = open_url(on(&gw2, "bob")).await;
    assert_eq!(
        member_ids(&join(&mut bob, "presence:doc", json!({})).await),
        ["alice", "bob"]
    );

    nats.servers[0].kill();
    // A member who joins on gw1 after the kill reaches bob once gw1 failed
    // over to n1/n2 (and only then: gw1 has no other way to tell gw2).
    // (While gw1 fails over, subscribing waits for NATS, up to its request
    // timeouts, or is refused with bus_unavailable: the client tries again.)
    let mut dave = open_url(on(&gw1, "dave")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        dave.send(json!({"type": "presence.join", "topic": "presence:doc"}))
            .await;
        let m = dave.recv_within(Duration::from_secs(30)).await;
        if m["type"] == "subscription.confirmed" {
            break;
        }
        assert_eq!(m["data"]["code"], "bus_unavailable", "{m}");
        assert!(tokio::time::Instant::now() < deadline, "join kept failing");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    loop {
        let m = bob.recv().await;
        if m["type"] == "presence.join" && m["data"]["data"]["user"]["id"] == "dave" {
            break;
        }
    }
    // Whatever the gateways decided while they could not hear each other,
    // both views come back to every member.
    for gw in [&gw1, &gw2] {
        eventually("every member seen again", || async {
            members_seen_on(gw, "presence:doc").await == ["alice", "bob", "dave"]
        })
        .await;
    }
    // And changes flow again: alice leaves, bob is told.
    alice
        .send(json!({"type": "presence.leave", "topic": "presence:doc"}))
        .await;
    eventually("alice gone everywhere", || async {
        members_seen_on(&gw2, "presence:doc").await == ["bob", "dave"]
    })
    .await;
}

#[tokio::test]
async fn presence_spans_regions() {
    let dir = TempDir::new("presence-regions");
    let clusters = supercluster(&dir, &["eu", "us"]).await;
    let (eu, us) = (&clusters[0], &clusters[1]);
    let region_yaml = |region: &str, c: &Cluster| {
        format!(
            "{}  placement_cluster: {region}\npresence:\n  heartbeat_seconds: 1\n  timeout_seconds: 3\n",
            nats_yaml(region, &c.urls(), &["eu", "us"], 3)
        )
    };
    let gw_eu = GatewayProc::start(&dir, "gw-eu", &region_yaml("eu", eu));
    let gw_us = GatewayProc::start(&dir, "gw-us", &region_yaml("us", us));
    gw_eu.wait_ready().await;
    gw_us.wait_ready().await;
    gateways_know_each_other(&[&gw_eu, &gw_us]).await;
    let on = |gw: &GatewayProc, user: &str| gw.ws(&format!("token={}", user_token("acme", user)));
    let mut alice = open_url(on(&gw_eu, "alice")).await;
    join(&mut alice, "presence:doc", json!({"name": "A"})).await;
    assert_eq!(members_seen_on(&gw_us, "presence:doc").await, ["alice"]);
    let mut bob = open_url(on(&gw_us, "bob")).await;
    assert_eq!(
        member_ids(&join(&mut bob, "presence:doc", json!({})).await),
        ["alice", "bob"]
    );
    assert_eq!(
        alice.recv_type("presence.join").await["data"]["data"]["user"]["id"],
        "bob"
    );
    drop(alice);
    assert_eq!(
        bob.recv_type("presence.leave").await["data"]["data"]["user"]["id"],
        "alice"
    );
    // Another tenant's view of the same topic stays empty in both regions.
    let mut g = open_url(gw_eu.ws(&format!("token={}", user_token("globex", "gina")))).await;
    g.subscribe(&["presence:doc"]).await;
    assert_eq!(
        member_ids(&g.recv_type("presence.sync").await),
        Vec::<String>::new()
    );
}
