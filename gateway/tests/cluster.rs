//! Cluster mode end to end: real `switchboard` processes on real nats-server
//! topologies (single node, 3-node cluster, two 3-node clusters linked as
//! regions), real WebSocket and HTTP clients.

mod common;

use std::time::Duration;

use common::nats::*;
use common::*;
use serde_json::{Value, json};

async fn publish_to(base: &str, tenant: &str, topic: &str, data: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/api/realtime/publish/"))
        .bearer_auth(token(tenant, &["publish"]))
        .json(&json!({"event_type": topic, "data": data}))
        .send()
        .await
        .unwrap();
    let s = r.status().as_u16();
    (s, r.json().await.unwrap_or(Value::Null))
}

/// Publish, retrying while the cluster is failing over; returns the event id.
async fn publish_retrying(base: &str, tenant: &str, topic: &str, data: Value) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (s, b) = publish_to(base, tenant, topic, data.clone()).await;
        if s == 201 {
            return b["event_id"].as_str().unwrap().to_owned();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "publish kept failing: {s} {b}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A streaming publish connection to `gw` with an acme publisher's token.
/// The `i` of every event a resuming client gets until `replay.complete`
/// (a `resume.gap` fails the test).
async fn replayed(client: &mut Client) -> Vec<i64> {
    let mut got = Vec::new();
    loop {
        let m = client.recv().await;
        match m["type"].as_str() {
            Some("event") => got.push(m["data"]["data"]["i"].as_i64().unwrap()),
            Some("replay.complete") => return got,
            Some("resume.gap") => panic!("gap: {m}"),
            _ => {}
        }
    }
}

/// One gateway, ready, on a single nats-server.
async fn gateway_on_single_nats(dir: &TempDir) -> (Cluster, GatewayProc) {
    let nats = single(dir).await;
    let gw = GatewayProc::start(dir, "gw", &nats_yaml("local", &nats.urls(), &[], 1));
    gw.wait_ready().await;
    (nats, gw)
}

/// A 3-node NATS cluster and two ready gateways: gw1 knows only n0 (it
/// discovers the others), gw2 only n1.
async fn gateways_on_two_nodes_of_three(dir: &TempDir) -> (Cluster, GatewayProc, GatewayProc) {
    let nats = cluster3(dir, "local").await;
    let gw1 = GatewayProc::start(dir, "gw1", &nats_yaml("local", &nats.urls()[..1], &[], 3));
    let gw2 = GatewayProc::start(dir, "gw2", &nats_yaml("local", &nats.urls()[1..2], &[], 3));
    gw1.wait_ready().await;
    gw2.wait_ready().await;
    (nats, gw1, gw2)
}

async fn publish_stream(gw: &GatewayProc) -> PublishStream {
    PublishStream::open(
        &gw.http().replacen("http", "ws", 1),
        Some(&token("acme", &["publish"])),
    )
    .await
    .expect("publisher token opens a stream")
}

async fn open_on(gw: &GatewayProc, tenant: &str, query: &str, topics: &[&str]) -> Client {
    let mut c = Client::connect(&gw.ws(&format!("token={}{query}", token(tenant, &[])))).await;
    c.recv_type("connection.established").await;
    c.subscribe(topics).await;
    c
}

/// Per-subscription message counts of every client connection of a server.
async fn subscriptions(server: &NatsServer) -> Vec<(String, u64)> {
    let connz = server.monitor("connz?subs=detail").await;
    let mut out = Vec::new();
    for c in connz["connections"].as_array().into_iter().flatten() {
        for s in c["subscriptions_list_detail"]
            .as_array()
            .into_iter()
            .flatten()
        {
            out.push((
                s["subject"].as_str().unwrap_or_default().to_owned(),
                s["msgs"].as_u64().unwrap_or(0),
            ));
        }
    }
    out
}

#[tokio::test]
async fn interest_routing_sends_each_gateway_only_what_it_wants() {
    let dir = TempDir::new("interest");
    let nats = single(&dir).await;
    let yaml = nats_yaml("local", &nats.urls(), &[], 1);
    let gw1 = GatewayProc::start(&dir, "gw1", &yaml);
    let gw2 = GatewayProc::start(&dir, "gw2", &yaml);
    gw1.wait_ready().await;
    gw2.wait_ready().await;

    // Overlapping patterns on gw1; an unrelated one on gw2 (and a second
    // connection there with the same pattern: still one NATS subscription).
    let mut deals = open_on(&gw1, "acme", "", &["deal.*", "deal.stage.updated"]).await;
    let _contacts = open_on(&gw2, "acme", "", &["contact.*"]).await;
    let _contacts2 = open_on(&gw2, "acme", "", &["contact.*"]).await;
    let deal_subject = "sb.rp.local.sb.ev.*.acme.deal.>";
    let exact_subject = "sb.rp.local.sb.ev.*.acme.deal.stage.updated";
    let contact_subject = "sb.rp.local.sb.ev.*.acme.contact.>";
    let subs = subscriptions(&nats.servers[0]).await;
    assert_eq!(
        subs.iter().filter(|(s, _)| s == contact_subject).count(),
        1,
        "one NATS subscription per distinct interest: {subs:?}"
    );
    assert_eq!(
        subs.iter().filter(|(s, _)| s == deal_subject).count(),
        1,
        "{subs:?}"
    );

    let mut sent = Vec::new();
    for i in 0..10 {
        sent.push(
            publish_retrying(&gw2.http(), "acme", "deal.stage.updated", json!({"i": i})).await,
        );
    }
    assert_eq!(
        ids(&deals.events(10).await),
        sent,
        "each event once, despite two matching patterns"
    );
    let marker = publish_retrying(&gw2.http(), "acme", "deal.marker", json!({})).await;
    assert_eq!(ids(&deals.events(1).await), [marker]);

    // NATS's own counters: gw1's subscriptions got the deal events; gw2's got none.
    let subs = subscriptions(&nats.servers[0]).await;
    let msgs = |subject: &str| {
        subs.iter()
            .filter(|(s, _)| s == subject)
            .map(|(_, m)| *m)
            .sum::<u64>()
    };
    assert_eq!(msgs(deal_subject), 11);
    assert_eq!(msgs(exact_subject), 10);
    assert_eq!(
        msgs(contact_subject),
        0,
        "a gateway with no subscriber for a topic receives nothing for it"
    );

    // The last local subscriber leaving drops the NATS subscription.
    drop(deals);
    eventually("gw1 unsubscribed from deal.*", || async {
        !subscriptions(&nats.servers[0])
            .await
            .iter()
            .any(|(s, _)| s == deal_subject)
    })
    .await;
}

#[tokio::test]
async fn a_killed_gateway_loses_nothing_clients_resume_on_another() {
    let dir = TempDir::new("killgw");
    let nats = single(&dir).await;
    let yaml = nats_yaml("local", &nats.urls(), &[], 1);
    let mut gw1 = GatewayProc::start(&dir, "gw1", &yaml);
    let gw2 = GatewayProc::start(&dir, "gw2", &yaml);
    gw1.wait_ready().await;
    gw2.wait_ready().await;
    let mut c = open_on(&gw1, "acme", "", &["s.*"]).await;
    let total = 120;
    let publisher = {
        let base = gw2.http();
        tokio::spawn(async move {
            for i in 0..total {
                publish_retrying(&base, "acme", "s.x", json!({"i": i})).await;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let mut got: Vec<i64> = Vec::new();
    let mut last = String::new();
    while got.len() < 30 {
        let e = c.events(1).await.remove(0);
        got.push(e["data"]["i"].as_i64().unwrap());
        last = e["event_id"].as_str().unwrap().to_owned();
    }
    gw1.kill();
    // The client notices and resumes on the other gateway with its cursor.
    let mut c =
        Client::connect(&gw2.ws(&format!("token={}&cursor={last}", token("acme", &[])))).await;
    c.recv_type("connection.established").await;
    c.subscribe(&["s.*"]).await;
    while got.len() < total {
        let m = c.recv().await;
        if m["type"] == "event" {
            got.push(m["data"]["data"]["i"].as_i64().unwrap());
        }
    }
    publisher.await.unwrap();
    assert_eq!(
        got,
        (0..total as i64).collect::<Vec<_>>(),
        "nothing lost, nothing twice, in order"
    );
}

#[tokio::test]
async fn losing_one_nats_node_of_three_does_not_stop_delivery() {
    let dir = TempDir::new("node");
    let (mut nats, gw1, gw2) = gateways_on_two_nodes_of_three(&dir).await;
    let mut c = open_on(&gw1, "acme", "", &["n.*"]).await;
    let before = publish_retrying(&gw2.http(), "acme", "n.x", json!({"i": 0})).await;
    assert_eq!(ids(&c.events(1).await), [before]);

    nats.servers[0].kill();
    let mut sent = Vec::new();
    for i in 1..=20 {
        sent.push(publish_retrying(&gw2.http(), "acme", "n.x", json!({"i": i})).await);
    }
    // Without any client action: gw1 fails over to n1/n2, re-subscribes and
    // catches up on what was stored meanwhile.
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while got.len() < sent.len() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "got {got:?}\n{}",
            gw1.log()
        );
        if let Ok(m) = tokio::time::timeout(Duration::from_secs(1), c.recv()).await
            && m["type"] == "event"
        {
            got.push(m["data"]["event_id"].as_str().unwrap().to_owned());
        }
    }
    assert_eq!(got, sent);
    eventually("gw1 ready again", || async {
        gw1.ready_status().await == Some(200)
    })
    .await;
}

#[tokio::test]
async fn nats_late_or_restarted_readiness_follows_and_subscriptions_return() {
    let dir = TempDir::new("late");
    let mut nats = single_stopped(&dir);
    let gw = GatewayProc::start(&dir, "gw", &nats_yaml("local", &nats.urls(), &[], 1));
    // Up, but not ready, while NATS is missing.
    eventually("gateway answering", || async {
        gw.ready_status().await.is_some()
    })
    .await;
    assert_eq!(gw.ready_status().await, Some(503));
    let (s, _) = publish_to(&gw.http(), "acme", "l.x", json!({})).await;
    assert_eq!(s, 503);

    nats.servers[0].start();
    gw.wait_ready().await;
    let mut c = open_on(&gw, "acme", "", &["l.*"]).await;
    let first = publish_retrying(&gw.http(), "acme", "l.x", json!({"i": 1})).await;
    assert_eq!(ids(&c.events(1).await), [first]);

    // NATS goes away: readiness turns false, the client stays connected.
    nats.servers[0].kill();
    eventually("not ready without NATS", || async {
        gw.ready_status().await == Some(503)
    })
    .await;
    nats.servers[0].start();
    gw.wait_ready().await;
    // The subscription came back by itself.
    let second = publish_retrying(&gw.http(), "acme", "l.x", json!({"i": 2})).await;
    let got = tokio::time::timeout(Duration::from_secs(20), c.events(1))
        .await
        .expect("event after NATS restart");
    assert_eq!(ids(&got), [second]);
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "switchboard_nats_connected"), 1.0);
    assert!(metric(&m, "switchboard_nats_disconnects_total") >= 1.0);
}

/// NATS that stops answering for a moment (a node failing over, a stalled
/// server) does not hold a new client's `connection.established` back for
/// the bus's request timeout (5 s); the user's private channel is held once
/// NATS answers again, and a direct message sent after the client was told
/// it is connected reaches it, even one NATS stores before the channel is
/// held, and once: a later replay from an older cursor leaves it out.
#[tokio::test]
async fn a_client_connecting_while_nats_does_not_answer_is_told_it_is_connected() {
    let dir = TempDir::new("stalled");
    let (nats, gw) = gateway_on_single_nats(&dir).await;
    let server = &nats.servers[0];
    let start = publish_retrying(&gw.http(), "acme", "x.start", json!({"i": -1})).await;
    publish_retrying(&gw.http(), "acme", "user:alice", json!({"i": 0})).await;

    server.pause(true);
    let mut c = Client::connect(&gw.ws(&format!("token={}", user_token("acme", "alice")))).await;
    let m = c.recv_within(Duration::from_secs(3)).await;
    assert_eq!(m["type"], "connection.established", "{m}");

    // Published now, the message waits at the stalled server behind the
    // channel's subscription; NATS stores it before the gateway learns
    // that the subscription is held.
    let unread = server.unread_bytes();
    let base = gw.http();
    let publish =
        tokio::spawn(async move { publish_to(&base, "acme", "user:alice", json!({"i": 1})).await });
    eventually("the publish waits at the stalled server", || async {
        server.unread_bytes() > unread
    })
    .await;
    server.pause(false);
    let (status, body) = publish.await.expect("publish task");
    assert_eq!(status, 201, "{body}");
    let during = body["event_id"].as_str().expect("event id").to_owned();
    assert_eq!(ids(&c.events(1).await), [during]);

    let after = publish_retrying(&gw.http(), "acme", "user:alice", json!({"i": 2})).await;
    assert_eq!(ids(&c.events(1).await), [after]);

    // Replaying from before the connection: the direct message sent before
    // it, not the ones it already got.
    c.send(json!({"type": "subscribe", "topics": ["x.a"]}))
        .await;
    assert_eq!(c.recv().await["type"], "subscription.confirmed");
    c.send(json!({"type": "cursor.update", "cursor": start}))
        .await;
    assert_eq!(replayed(&mut c).await, [0]);
}

#[tokio::test]
async fn regions_share_events_and_recover_from_a_cut_link() {
    let dir = TempDir::new("regions");
    let clusters = supercluster(&dir, &["eu", "us"]).await;
    let (eu, us) = (&clusters[0], &clusters[1]);
    let region_yaml = |region: &str, c: &Cluster| {
        format!(
            "{}  placement_cluster: {region}\n",
            nats_yaml(region, &c.urls(), &["eu", "us"], 3)
        )
    };
    let gw_eu = GatewayProc::start(&dir, "gw-eu", &region_yaml("eu", eu));
    let gw_us = GatewayProc::start(&dir, "gw-us", &region_yaml("us", us));
    gw_eu.wait_ready().await;
    gw_us.wait_ready().await;

    let mut all_eu = open_on(&gw_eu, "acme", "", &["x.*"]).await;
    let mut only_us = open_on(&gw_eu, "acme", "&region=us", &["x.*"]).await;
    let mut all_us = open_on(&gw_us, "acme", "", &["x.*"]).await;

    let from_us = publish_retrying(&gw_us.http(), "acme", "x.a", json!({"from": "us"})).await;
    let e = tokio::time::timeout(Duration::from_secs(30), all_eu.events(1))
        .await
        .expect("cross-region event")
        .remove(0);
    assert_eq!(e["metadata"]["region"], "us");
    assert_eq!(e["data"]["from"], "us");
    let eu_cursor = e["event_id"].as_str().unwrap().to_owned();
    assert_ne!(
        eu_cursor, from_us,
        "cursors are positions in the region's own history"
    );
    assert_eq!(only_us.events(1).await[0]["metadata"]["region"], "us");
    assert_eq!(all_us.events(1).await[0]["event_id"], from_us.as_str());

    let from_eu = publish_retrying(&gw_eu.http(), "acme", "x.a", json!({"from": "eu"})).await;
    assert_eq!(ids(&all_eu.events(1).await), [from_eu]);
    assert_eq!(all_us.events(1).await[0]["metadata"]["region"], "eu");

    // Cut the link between the regions.
    eu.cut_links();
    us.cut_links();
    let mut us_during = Vec::new();
    for i in 0..3 {
        us_during.push(publish_retrying(&gw_us.http(), "acme", "x.cut", json!({"i": i})).await);
    }
    let eu_during = publish_retrying(&gw_eu.http(), "acme", "x.cut", json!({"local": true})).await;
    // Each region keeps serving its own events.
    assert_eq!(ids(&all_us.events(3).await), us_during);
    let local = all_eu.events(1).await;
    assert_eq!(ids(&local), [eu_during]);

    // While cut, eu's history really lacks the us events.
    let (_, body) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=x.cut&cursor={eu_cursor}&timeout=0",
            gw_eu.http()
        ),
        Some(&token("acme", &[])),
    )
    .await;
    assert_eq!(
        body["events"].as_array().unwrap().len(),
        1,
        "only eu's own event: {body}"
    );

    // Restore: the missed cross-region events arrive, in their order, and
    // are replayable by cursor in the region's history.
    eu.restore_links();
    us.restore_links();
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while got.len() < 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "missed events never arrived: {got:?}"
        );
        if let Ok(m) = tokio::time::timeout(Duration::from_secs(1), all_eu.recv()).await
            && m["type"] == "event"
        {
            assert_eq!(m["data"]["metadata"]["region"], "us");
            got.push(m["data"]["data"]["i"].as_i64().unwrap());
        }
    }
    assert_eq!(got, [0, 1, 2]);
    let (_, body) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=x.cut&cursor={eu_cursor}&timeout=0",
            gw_eu.http()
        ),
        Some(&token("acme", &[])),
    )
    .await;
    let replayed: Vec<&Value> = body["events"].as_array().unwrap().iter().collect();
    assert_eq!(replayed.len(), 4, "{body}");
}

#[tokio::test]
async fn nats_credentials_are_used_and_required() {
    let dir = TempDir::new("auth");
    let nats = single_with_token(&dir, "n4ts-t0ken").await;
    let token_file = dir.0.join("nats.token");
    std::fs::write(&token_file, "n4ts-t0ken\n").unwrap();
    let good = GatewayProc::start(
        &dir,
        "good",
        &format!(
            "{}  token_file: \"{}\"\n",
            nats_yaml("local", &nats.urls(), &[], 1),
            token_file.display()
        ),
    );
    let bad = GatewayProc::start(&dir, "bad", &nats_yaml("local", &nats.urls(), &[], 1));
    good.wait_ready().await;
    let mut c = open_on(&good, "acme", "", &["a.*"]).await;
    let id = publish_retrying(&good.http(), "acme", "a.b", json!({})).await;
    assert_eq!(ids(&c.events(1).await), [id]);
    // Without the token the gateway never becomes ready, and says why.
    eventually("bad gateway answering", || async {
        bad.ready_status().await.is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(bad.ready_status().await, Some(503));
    assert!(
        bad.log().to_lowercase().contains("authorization"),
        "{}",
        bad.log()
    );
}

/// NATS refuses a subscription its permissions deny with an asynchronous
/// error and nothing else: the subscription would look fine and deliver
/// nothing. The gateway must not confirm it, on any transport.
#[tokio::test]
async fn a_subscription_nats_refuses_is_an_error_not_a_confirmation() {
    let dir = TempDir::new("nats-perms");
    let nats = single_with_conf(
        &dir,
        r#"authorization { users = [ { user: gw, password: pw, permissions: { subscribe: { deny: ["sb.rp.*.sb.ev.*.blocked.>"] } } } ] }"#,
    )
    .await;
    let password = dir.0.join("nats.password");
    std::fs::write(&password, "pw\n").unwrap();
    let gw = GatewayProc::start(
        &dir,
        "gw",
        &format!(
            "{}  user: gw\n  password_file: \"{}\"\n",
            nats_yaml("local", &nats.urls(), &[], 1),
            password.display()
        ),
    );
    gw.wait_ready().await;

    // WebSocket: an error naming the refusal, and no confirmation.
    let mut c = Client::connect(&gw.ws(&format!("token={}", token("blocked", &[])))).await;
    c.recv_type("connection.established").await;
    c.send(json!({"type": "subscribe", "topics": ["deal.*"], "requestId": 7}))
        .await;
    let error = c.recv().await;
    assert_eq!(error["type"], "error", "{error}");
    assert_eq!(error["data"]["code"], "bus_unavailable", "{error}");
    assert_eq!(error["requestId"], 7);
    assert!(
        error["data"]["message"]
            .as_str()
            .unwrap()
            .contains("may not subscribe"),
        "{error}"
    );
    c.expect_silence(Duration::from_millis(300)).await;

    // SSE and long-poll: 503 bus_unavailable instead of a stream that
    // never delivers.
    let http = reqwest::Client::new();
    for path in ["sse", "poll"] {
        let r = http
            .get(format!(
                "{}/api/realtime/{path}/?topics=deal.*&timeout=1&token={}",
                gw.http(),
                token("blocked", &[])
            ))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 503, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"]["code"], "bus_unavailable", "{path}: {body}");
    }

    // Another tenant on the same gateway is served as usual.
    let mut ok = open_on(&gw, "acme", "", &["deal.*"]).await;
    let id = publish_retrying(&gw.http(), "acme", "deal.won", json!({})).await;
    assert_eq!(ids(&ok.events(1).await), [id]);
}

/// Right after two regions start, an event published in one reaches the
/// other's connections within seconds, at one replica and at three (with
/// one replica the first events used to wait ~40 s for JetStream to retry
/// sourcing a stream that did not exist yet).
async fn regions_exchange_events_right_after_start(replicas: usize) {
    let dir = TempDir::new(&format!("regions-start-r{replicas}"));
    let clusters = supercluster(&dir, &["eu", "us"]).await;
    let (eu, us) = (&clusters[0], &clusters[1]);
    // The defaults: no placement_cluster.
    let yaml = |region: &str, c: &Cluster| nats_yaml(region, &c.urls(), &["eu", "us"], replicas);
    let gw_eu = GatewayProc::start(&dir, "gw-eu", &yaml("eu", eu));
    gw_eu.wait_ready().await;
    // The second region comes up later: eu's stream has been trying to
    // source a stream that did not exist yet.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let gw_us = GatewayProc::start(&dir, "gw-us", &yaml("us", us));
    gw_us.wait_ready().await;
    let mut in_eu = open_on(&gw_eu, "acme", "", &["x.*"]).await;
    let mut in_us = open_on(&gw_us, "acme", "", &["x.*"]).await;
    let started = tokio::time::Instant::now();
    let from_us = publish_retrying(&gw_us.http(), "acme", "x.a", json!({"from": "us"})).await;
    let from_eu = publish_retrying(&gw_eu.http(), "acme", "x.a", json!({"from": "eu"})).await;
    // Each side: its own event, and the other region's, in time.
    let budget = Duration::from_secs(10);
    let got_eu = tokio::time::timeout(budget, in_eu.events(2))
        .await
        .unwrap_or_else(|_| panic!("r{replicas}: eu did not get both events within {budget:?}"));
    let got_us = tokio::time::timeout(budget, in_us.events(2))
        .await
        .unwrap_or_else(|_| panic!("r{replicas}: us did not get both events within {budget:?}"));
    let regions = |got: &[Value]| {
        let mut r: Vec<String> = got
            .iter()
            .map(|e| e["metadata"]["region"].as_str().unwrap().to_owned())
            .collect();
        r.sort();
        r
    };
    assert_eq!(regions(&got_eu), ["eu", "us"]);
    assert_eq!(regions(&got_us), ["eu", "us"]);
    assert!(ids(&got_us).contains(&from_us));
    assert!(ids(&got_eu).contains(&from_eu));
    eprintln!(
        "r{replicas}: both regions had both events after {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn regions_exchange_events_right_after_start_with_one_replica() {
    regions_exchange_events_right_after_start(1).await;
}

#[tokio::test]
async fn regions_exchange_events_right_after_start_with_three_replicas() {
    regions_exchange_events_right_after_start(3).await;
}

/// A client cut from eu resumes in us with its eu cursor while both
/// regions publish: every event of both origins exactly once, each
/// origin's in order (the cursor is translated by event identity: origin
/// region and origin sequence, not by position).
#[tokio::test]
async fn a_client_failing_over_to_another_region_resumes_without_gap() {
    let dir = TempDir::new("failover");
    let clusters = supercluster(&dir, &["eu", "us"]).await;
    let (eu, us) = (&clusters[0], &clusters[1]);
    let yaml = |region: &str, c: &Cluster| {
        format!(
            "{}  placement_cluster: {region}\n",
            nats_yaml(region, &c.urls(), &["eu", "us"], 1)
        )
    };
    let gw_eu = GatewayProc::start(&dir, "gw-eu", &yaml("eu", eu));
    let gw_us = GatewayProc::start(&dir, "gw-us", &yaml("us", us));
    gw_eu.wait_ready().await;
    gw_us.wait_ready().await;

    // Events flow both ways before the test starts.
    let mut watch_eu = open_on(&gw_eu, "acme", "", &["warm.*"]).await;
    let mut watch_us = open_on(&gw_us, "acme", "", &["warm.*"]).await;
    publish_retrying(&gw_us.http(), "acme", "warm.up", json!({})).await;
    publish_retrying(&gw_eu.http(), "acme", "warm.up", json!({})).await;
    tokio::time::timeout(Duration::from_secs(30), watch_eu.events(2))
        .await
        .expect("us events reach eu");
    tokio::time::timeout(Duration::from_secs(30), watch_us.events(2))
        .await
        .expect("eu events reach us");

    // Both regions publish 60 events each, interleaved in time.
    const PER_REGION: i64 = 60;
    let publishers: Vec<_> = [("eu", gw_eu.http()), ("us", gw_us.http())]
        .into_iter()
        .map(|(origin, base)| {
            tokio::spawn(async move {
                for n in 0..PER_REGION {
                    publish_retrying(&base, "acme", "x.e", json!({"o": origin, "n": n})).await;
                    tokio::time::sleep(Duration::from_millis(15)).await;
                }
            })
        })
        .collect();

    let key = |e: &Value| {
        (
            e["data"]["o"].as_str().unwrap().to_owned(),
            e["data"]["n"].as_i64().unwrap(),
        )
    };
    // The client reads some events in eu, then its connection is cut.
    let mut in_eu = open_on(&gw_eu, "acme", "", &["x.*"]).await;
    let mut seen: Vec<(String, i64)> = Vec::new();
    let mut cursor = String::new();
    while seen.len() < 30 {
        let e = tokio::time::timeout(Duration::from_secs(30), in_eu.events(1))
            .await
            .expect("events in eu")
            .remove(0);
        seen.push(key(&e));
        cursor = e["event_id"].as_str().unwrap().to_owned();
    }
    drop(in_eu);
    let first_seen = seen.clone();
    // Events go on in both regions while it is away.
    tokio::time::sleep(Duration::from_millis(300)).await;

    // It comes back in us with its eu cursor.
    let mut in_us = open_on(&gw_us, "acme", &format!("&cursor={cursor}"), &["x.*"]).await;
    for p in publishers {
        p.await.unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // Everything published after the client first connected, from both
        // origins, once.
        let complete = ["eu", "us"].iter().all(|o| {
            seen.iter()
                .filter(|(origin, _)| origin == o)
                .map(|(_, n)| *n)
                .max()
                == Some(PER_REGION - 1)
        });
        if complete {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every event arrived after the failover: {seen:?}"
        );
        let Ok(m) = tokio::time::timeout(Duration::from_secs(1), in_us.recv()).await else {
            continue;
        };
        assert_ne!(m["type"], "resume.gap", "the cursor was not honoured: {m}");
        if m["type"] == "event" {
            assert_eq!(m["data"]["event_type"], "x.e");
            seen.push(key(&m["data"]));
        }
    }
    in_us.expect_silence(Duration::from_millis(500)).await;
    // No event twice, none missing, each origin's in its order.
    for origin in ["eu", "us"] {
        let ns: Vec<i64> = seen
            .iter()
            .filter(|(o, _)| o == origin)
            .map(|(_, n)| *n)
            .collect();
        let from = ns[0];
        let expected: Vec<i64> = (from..PER_REGION).collect();
        assert_eq!(
            ns, expected,
            "{origin}: events lost, repeated or out of order (before the cut: {first_seen:?})"
        );
    }
}

/// Clients resuming together (a dead gateway's) are answered from one read
/// of their tenant's recent history, not a JetStream read each, and each
/// still gets exactly what it missed on its own topics.
#[tokio::test]
async fn resumes_arriving_together_share_one_history_read() {
    let dir = TempDir::new("shared-resume");
    let (_nats, gw) = gateway_on_single_nats(&dir).await;
    // 60 events over 6 topics; a cursor after each.
    let mut cursors = Vec::new();
    for i in 0..60 {
        let topic = format!("r.t{}", i % 6);
        cursors.push((
            i,
            publish_retrying(&gw.http(), "acme", &topic, json!({"i": i})).await,
        ));
    }
    // Another tenant's events in between are never part of acme's replays.
    publish_retrying(&gw.http(), "other", "r.t0", json!({"i": -1})).await;
    let before = gw.metrics().await;
    const CLIENTS: usize = 120;
    let resumes: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let (k, cursor) = cursors[(c * 7) % 50].clone();
            let topic = format!("r.t{}", c % 6);
            let url = gw.ws(&format!("token={}&cursor={cursor}", token("acme", &[])));
            tokio::spawn(async move {
                let mut client = Client::connect(&url).await;
                client.recv_type("connection.established").await;
                client.subscribe(&[topic.as_str()]).await;
                let got = replayed(&mut client).await;
                let expected: Vec<i64> =
                    ((k + 1)..60).filter(|i| i % 6 == (c % 6) as i64).collect();
                assert_eq!(got, expected, "client {c} after event {k} on {topic}");
            })
        })
        .collect();
    for r in resumes {
        r.await.unwrap();
    }
    let after = gw.metrics().await;
    let shared = reads_between(&before, &after, "shared");
    let reads = reads_between(&before, &after, "shared_read");
    let own = reads_between(&before, &after, "own");
    eprintln!("{CLIENTS} resumes: {shared} pages shared, {reads} JetStream reads, {own} own reads");
    assert!(
        shared >= CLIENTS as f64,
        "every resume read the shared copy: {shared}"
    );
    assert_eq!(own, 0.0, "no resume read on its own");
    assert!(
        reads <= 12.0,
        "{CLIENTS} resumes took {reads} JetStream reads (one each before)"
    );
}

/// How many reads into the shared recent range `gw` has made.
async fn shared_reads(gw: &GatewayProc) -> f64 {
    metric(
        &gw.metrics().await,
        r#"switchboard_history_reads_total{path="shared_read"}"#,
    )
}

/// A read of the tenant's recent range that takes longer than a copy is
/// used for (2 s: a slow link, a busy server) still answers the resumes
/// that waited on it. The copy's age was counted from when its read
/// began, so each waiting resume found it stale and read the range again,
/// one after the other.
#[tokio::test]
async fn a_slow_read_of_the_recent_range_still_answers_the_resumes_waiting_on_it() {
    const N: usize = 10;
    // 6 pulls of 256 over a link of 150 ms each way: a read of 3 to 4 s,
    // longer than a copy is used (2 s).
    const BEHIND: i64 = 1_500;
    let dir = TempDir::new("slow-shared");
    let (_nats, _far, gw) = gateway_far_from_nats(&dir, Duration::from_millis(150)).await;
    let cursor = publish_retrying(&gw.http(), "acme", "order.x", json!({"i": 0})).await;
    publish_retrying(&gw.http(), "acme", "order.x", json!({"i": 1})).await;
    let mut stream = publish_stream(&gw).await;
    for i in 0..BEHIND {
        stream
            .feed(&json!({"ref": i, "event_type": "bulk.y", "data": {"i": i}}))
            .await;
    }
    stream.flush().await;
    stream.expect_published(BEHIND as usize).await;

    let query = format!("token={}&cursor={cursor}", token("acme", &[]));
    let mut clients = futures_util::future::join_all((0..N).map(|_| async {
        let mut c = Client::connect(&gw.ws(&query)).await;
        c.recv_type("connection.established").await;
        c
    }))
    .await;
    let before = shared_reads(&gw).await;
    let started = tokio::time::Instant::now();
    let replays = futures_util::future::join_all(clients.iter_mut().map(|c| async {
        c.subscribe(&["order.x"]).await;
        replayed(c).await
    }));
    let replays = tokio::time::timeout(Duration::from_secs(60), replays)
        .await
        .expect("the resumes finish");
    let took = started.elapsed();
    let reads = shared_reads(&gw).await - before;
    eprintln!("{N} resumes: {reads} reads of the recent range in {took:?}");
    assert!(
        replays.iter().all(|r| r == &[1]),
        "each resume replays what it missed on its topic: {replays:?}"
    );
    assert!(
        reads <= 2.0,
        "{N} resumes read the recent range {reads} times (in {took:?})"
    );
}

#[tokio::test]
async fn a_publish_stream_on_one_gateway_reaches_clients_of_another_in_order() {
    let dir = TempDir::new("stream");
    let nats = single(&dir).await;
    let yaml = nats_yaml("local", &nats.urls(), &[], 1);
    let gw1 = GatewayProc::start(&dir, "gw1", &yaml);
    let gw2 = GatewayProc::start(&dir, "gw2", &yaml);
    gw1.wait_ready().await;
    gw2.wait_ready().await;
    let mut far = open_on(&gw2, "acme", "", &["order.*"]).await;
    let mut near = open_on(&gw1, "acme", "", &["order.created"]).await;

    let mut stream = publish_stream(&gw1).await;
    // All in flight at once: NATS hands gw2 the events in bursts.
    const N: i64 = 300;
    for i in 0..N {
        let topic = if i % 2 == 0 {
            "order.created"
        } else {
            "order.paid"
        };
        stream
            .feed(&json!({"ref": i, "event_type": topic, "data": {"n": i}}))
            .await;
    }
    stream.flush().await;
    stream.expect_published(N as usize).await;
    let got: Vec<i64> = far
        .events(N as usize)
        .await
        .iter()
        .map(|e| e["data"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(
        got,
        (0..N).collect::<Vec<_>>(),
        "every event once, in order"
    );
    let created: Vec<i64> = near
        .events(N as usize / 2)
        .await
        .iter()
        .map(|e| e["data"]["n"].as_i64().unwrap())
        .collect();
    assert_eq!(created, (0..N).step_by(2).collect::<Vec<_>>());
    far.expect_silence(Duration::from_millis(300)).await;
    near.expect_silence(Duration::from_millis(300)).await;
}

async fn get_json_owned(url: String, token: String) -> (u16, Value) {
    get_json(&url, Some(&token)).await
}

/// A single NATS node and a ready gateway that reaches it through a link
/// with `one_way` latency each way.
async fn gateway_far_from_nats(
    dir: &TempDir,
    one_way: Duration,
) -> (Cluster, LatencyProxy, GatewayProc) {
    let nats = single(dir).await;
    let port = nats.servers[0]
        .url()
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let far = LatencyProxy::start(port, one_way).await;
    let yaml = nats_yaml("local", &[format!("nats://127.0.0.1:{}", far.port)], &[], 1);
    let gw = GatewayProc::start(dir, "gw", &yaml);
    gw.wait_ready().await;
    (nats, far, gw)
}

/// A client that moves to a gateway whose live delivery lags the one it
/// left (the event it saw last is still on its way to the new gateway) does
/// not get that event again live, and its resume point does not go back.
/// Found as one duplicate in 9.4 million deliveries of the 100k scale-out,
/// whose clients resume on the next gateway at once.
#[tokio::test]
async fn a_client_moving_to_a_lagging_gateway_does_not_get_its_last_event_again() {
    const ONE_WAY: Duration = Duration::from_millis(400);
    let dir = TempDir::new("lagging");
    let (nats, _far, lagging) = gateway_far_from_nats(&dir, ONE_WAY).await;
    let near = GatewayProc::start(&dir, "near", &nats_yaml("local", &nats.urls(), &[], 1));
    near.wait_ready().await;
    // Another client holds the topic on the lagging gateway, so its
    // upstream subscription (and where its live delivery began) is older
    // than the event below.
    let mut holder = open_on(&lagging, "acme", "", &["deal.won"]).await;
    let mut client = open_on(&near, "acme", "", &["deal.won"]).await;
    let id = publish_retrying(&near.http(), "acme", "deal.won", json!({"i": 1})).await;
    let got = client.events(1).await;
    // When the lagging gateway routes it (its other client gets it).
    let routed = tokio::spawn(async move {
        let e = holder.events(1).await;
        (
            tokio::time::Instant::now(),
            e[0]["event_id"].clone(),
            holder,
        )
    });
    assert_eq!(got[0]["event_id"], id.as_str());
    drop(client);

    // At once to the lagging gateway, from the cursor of that event: a
    // long-poll (waiting up to 1.5 s for anything new)...
    let poll = tokio::spawn(get_json_owned(
        format!(
            "{}/api/realtime/poll/?topics=deal.won&cursor={id}&timeout=1.5",
            lagging.http()
        ),
        token("acme", &[]),
    ));
    // ...and a WebSocket.
    let url = lagging.ws(&format!("token={}&cursor={id}", token("acme", &[])));
    let mut moved = Client::connect(&url).await;
    moved.recv_type("connection.established").await;
    let subscribing = tokio::time::Instant::now();
    moved.subscribe(&["deal.won"]).await;
    // Nothing to replay: the answer comes first.
    let done = moved.recv().await;
    assert_eq!(done["type"], "replay.complete", "{done}");
    assert_eq!(done["data"]["replayed"], 0, "{done}");
    assert_eq!(
        done["data"]["cursor"],
        id.as_str(),
        "the resume point stays where the client was: {done}"
    );
    // The lagging gateway routed the event well after the moved client's
    // subscription reached it (else this test proves nothing).
    let (routed_at, routed_id, _holder) = routed.await.unwrap();
    assert_eq!(routed_id, id.as_str());
    assert!(
        routed_at > subscribing + ONE_WAY / 4,
        "routed {:?} after the subscribe was sent",
        routed_at - subscribing
    );
    moved.expect_silence(Duration::from_millis(300)).await;
    let (status, body) = poll.await.unwrap();
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"], json!([]), "nothing new: {body}");
    assert_eq!(
        body["cursor"],
        id.as_str(),
        "the next poll's cursor: {body}"
    );
    // Live delivery goes on.
    let next = publish_retrying(&near.http(), "acme", "deal.won", json!({"i": 2})).await;
    assert_eq!(moved.events(1).await[0]["event_id"], next.as_str());
    moved.expect_silence(Duration::from_millis(300)).await;
}

/// A burst of events costs one round trip to JetStream, not one per event:
/// with 60 ms between the gateway and NATS, 100 events published one after
/// another would take 6 s; the streaming publish (and a batch) has them all
/// in flight at once.
#[tokio::test]
async fn a_burst_of_publishes_costs_one_round_trip_to_jetstream_not_one_per_event() {
    const N: usize = 100;
    const ONE_WAY: Duration = Duration::from_millis(30);
    // Sequential publishing needs N round trips: 6 s. The bound leaves the
    // pipelined path (a few round trips) ample room on a loaded machine.
    const BOUND: Duration = Duration::from_secs(3);
    let dir = TempDir::new("pipeline");
    let (_nats, _far, gw) = gateway_far_from_nats(&dir, ONE_WAY).await;
    let mut client = open_on(&gw, "acme", "", &["order.*"]).await;

    let mut stream = publish_stream(&gw).await;
    let started = tokio::time::Instant::now();
    for i in 0..N {
        stream
            .feed(&json!({"ref": i, "event_type": "order.created", "data": {"n": i}}))
            .await;
    }
    stream.flush().await;
    stream.expect_published(N).await;
    let streamed = started.elapsed();
    assert!(
        streamed < BOUND,
        "{N} streamed events took {streamed:?} with {ONE_WAY:?} each way to NATS"
    );

    let started = tokio::time::Instant::now();
    let events: Vec<Value> = (N..2 * N)
        .map(|i| json!({"event_type": "order.created", "data": {"n": i}}))
        .collect();
    let r = reqwest::Client::new()
        .post(format!("{}/api/realtime/publish/", gw.http()))
        .bearer_auth(token("acme", &["publish"]))
        .json(&json!({ "events": events }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let body: Value = r.json().await.unwrap();
    let results = body["results"].as_array().unwrap();
    assert_eq!(results.len(), N);
    assert!(results.iter().all(|r| r["event_id"].is_string()), "{body}");
    let batched = started.elapsed();
    assert!(
        batched < BOUND,
        "a batch of {N} took {batched:?} with {ONE_WAY:?} each way to NATS"
    );

    // Stored and delivered in the order published.
    let got: Vec<u64> = client
        .events(2 * N)
        .await
        .iter()
        .map(|e| e["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(got, (0..2 * N as u64).collect::<Vec<_>>());
    let ids: Vec<u64> = results
        .iter()
        .map(|r| {
            r["cursor"]
                .as_str()
                .unwrap()
                .rsplit('-')
                .next()
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "cursors in publish order: {ids:?}"
    );
}

/// The subject of the next JetStream API request `api` sees about the
/// stream `stream` (one of the subject's tokens).
async fn next_request(api: &mut async_nats::Subscriber, stream: &str) -> String {
    use futures_util::StreamExt;
    loop {
        let m = tokio::time::timeout(Duration::from_secs(5), api.next())
            .await
            .expect("a JetStream API request within 5 s")
            .expect("the watcher's subscription is open");
        if m.subject.split('.').any(|token| token == stream) {
            return m.subject.to_string();
        }
    }
}

/// What a client's resume costs JetStream's API (the requests every
/// gateway of a region sends to the same meta leader): a storm multiplies
/// it by the clients resuming. The requests are counted by subject on
/// `$JS.API.>`, so the gateway's own once-a-second head refresh (a stream
/// info request) is told apart by timing: each resume starts right after
/// one, and ends when its consumer's delete has been sent. (The server's
/// `jsz` API total is no exact count: it leaves out pulls, and a window
/// around one resume also caught a late delete or that refresh.)
#[tokio::test]
async fn a_lone_resume_costs_few_jetstream_api_requests() {
    let dir = TempDir::new("resume-api");
    let (nats, gw) = gateway_on_single_nats(&dir).await;
    // Tenants of their own: no resume finds another's shared copy.
    const TENANTS: [&str; 3] = ["t1", "t2", "t3"];
    let mut cursors = Vec::new();
    for tenant in TENANTS {
        let mut ids = Vec::new();
        for i in 0..6 {
            ids.push(publish_retrying(&gw.http(), tenant, "r.t0", json!({"i": i})).await);
        }
        cursors.push(ids[2].clone());
    }
    // The region's history stream; other streams' requests (e.g. the
    // erasure bucket's watcher renewing its consumer) are not the resume's.
    const STREAM: &str = "SB_local";
    let watcher = async_nats::connect(nats.servers[0].url()).await.unwrap();
    let mut api = watcher.subscribe("$JS.API.>").await.unwrap();
    watcher.flush().await.unwrap();
    let mut costs = Vec::new();
    for (tenant, cursor) in TENANTS.iter().zip(&cursors) {
        // Everything before (the previous resume's late delete included)
        // is over once the refresh's stream info arrives; the next refresh
        // is a second away.
        while !next_request(&mut api, STREAM)
            .await
            .contains(".STREAM.INFO.")
        {}
        let started = tokio::time::Instant::now();
        let mut client = open_on(&gw, tenant, &format!("&cursor={cursor}"), &["r.t0"]).await;
        let got = replayed(&mut client).await;
        assert_eq!(got, vec![3, 4, 5], "{tenant}");
        let mut requests: Vec<String> = Vec::new();
        while !requests.iter().any(|s| s.contains(".CONSUMER.DELETE.")) {
            requests.push(next_request(&mut api, STREAM).await);
        }
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "the resume outlasted the refresh interval, so its count is not its own: {requests:?}"
        );
        let kind = |k: &str| requests.iter().filter(|s| s.contains(k)).count();
        // The stream's state for each subscription's live seam (the
        // user's own channel at connect, then the topic) and once for the
        // history range; one consumer created, read in one pull, deleted.
        let counts = [
            kind(".STREAM.INFO."),
            kind(".CONSUMER.CREATE."),
            kind(".CONSUMER.MSG.NEXT."),
            kind(".CONSUMER.DELETE."),
        ];
        assert_eq!(
            (counts, requests.len()),
            ([3, 1, 1, 1], 6),
            "{tenant}: [stream infos, consumer creates, pulls, deletes], total: {requests:?}"
        );
        costs.push(requests.len());

        // A second client right behind it (a storm's next resume): its
        // subscriptions' interests are held and the tenant's copy is fresh
        // and holds its cursor, so it asks JetStream nothing. The window
        // ends at a marker the watcher sends itself; the gateway's
        // once-a-second refresh may fall into it, once at most.
        let mut second = open_on(&gw, tenant, &format!("&cursor={cursor}"), &["r.t0"]).await;
        assert_eq!(
            replayed(&mut second).await,
            vec![3, 4, 5],
            "{tenant}, second"
        );
        let marker = format!("$JS.API.MARKER.{STREAM}");
        watcher.publish(marker.clone(), "".into()).await.unwrap();
        watcher.flush().await.unwrap();
        let mut behind: Vec<String> = Vec::new();
        loop {
            let request = next_request(&mut api, STREAM).await;
            if request == marker {
                break;
            }
            behind.push(request);
        }
        assert!(
            behind.len() <= 1 && behind.iter().all(|s| s.contains(".STREAM.INFO.")),
            "{tenant}: the resume behind a fresh copy sent {behind:?}"
        );
        drop((client, second));
    }
    eprintln!("JetStream API requests per resume: {costs:?}");
}

/// Clients resuming together from a recent cursor share the reads of
/// their tenant's recent history while events keep coming: each resume
/// reads up to the head as it found it on arrival. (Reading up to the head
/// as it was once the previous read was done, every resume queued behind a
/// read found the head moved on and read again: one JetStream read after
/// another, 9 or 10 for these 40 resumes, instead of 1 or 2.)
#[tokio::test]
async fn resumes_arriving_together_share_history_reads_while_events_keep_coming() {
    const N: usize = 40;
    const ONE_WAY: Duration = Duration::from_millis(50);
    let dir = TempDir::new("shared-reads");
    let (_nats, _far, gw) = gateway_far_from_nats(&dir, ONE_WAY).await;

    let mut first = open_on(&gw, "acme", "", &["order.x"]).await;
    publish_retrying(&gw.http(), "acme", "order.x", json!({"i": 0})).await;
    let cursor = first.events(1).await[0]["event_id"]
        .as_str()
        .unwrap()
        .to_owned();
    publish_retrying(&gw.http(), "acme", "order.x", json!({"i": 1})).await;
    first.events(1).await;

    // Events keep coming on another topic: the stream's head moves on
    // while the resumes read.
    let publisher = {
        let base = gw.http();
        tokio::spawn(async move {
            for i in 0.. {
                publish_retrying(&base, "acme", "order.y", json!({"i": i})).await;
            }
        })
    };
    let query = format!("token={}&cursor={cursor}", token("acme", &[]));
    // A first resume reads the tenant's recent range: the copy the others
    // are then answered from (and read into as the head moves on).
    let mut c = Client::connect(&gw.ws(&query)).await;
    c.recv_type("connection.established").await;
    c.subscribe(&["order.x"]).await;
    assert_eq!(replayed(&mut c).await, [1]);
    let before = shared_reads(&gw).await;
    let started = tokio::time::Instant::now();
    let replays = futures_util::future::join_all((0..N).map(|_| async {
        let mut c = Client::connect(&gw.ws(&query)).await;
        c.recv_type("connection.established").await;
        c.subscribe(&["order.x"]).await;
        replayed(&mut c).await
    }));
    let replays = tokio::time::timeout(Duration::from_secs(60), replays)
        .await
        .expect("the resumes finish");
    let took = started.elapsed();
    publisher.abort();
    let reads = shared_reads(&gw).await - before;
    assert!(
        replays.iter().all(|r| r == &[1]),
        "each resume replays what it missed: {replays:?}"
    );
    assert!(
        reads <= 3.0,
        "{N} resumes arriving together read the history {reads} times (in {took:?})"
    );
}

/// The change of a history-read counter between two scrapes of a gateway.
fn reads_between(before: &str, after: &str, path: &str) -> f64 {
    let name = format!("switchboard_history_reads_total{{path=\"{path}\"}}");
    metric(after, &name) - metric(before, &name)
}

/// Publish `n` events of acme over a publish stream: every `every`-th on
/// `topic` (data `i`), the others on a topic no client holds.
async fn publish_mixed(gw: &GatewayProc, n: i64, every: i64, topic: &str) -> Vec<i64> {
    let mut stream = publish_stream(gw).await;
    for i in 0..n {
        let event_type = if i % every == 0 { topic } else { "w.unheld" };
        stream
            .feed(&json!({"ref": i, "event_type": event_type, "data": {"i": i}}))
            .await;
    }
    stream.flush().await;
    stream.expect_published(n as usize).await;
    (0..n).filter(|i| i % every == 0).collect()
}

/// A client that moves to a gateway whose other clients hold its topic
/// resumes from what that gateway already received live, however far
/// behind its cursor is: here further than the tenant's shared recent
/// range reaches (4,096 positions), which cost nats-server a consumer of
/// its own per resume, and under a burst collapsed the 100k scale-out
/// (docs/scaling.md). Then live delivery follows, nothing twice.
#[tokio::test]
async fn a_resume_on_a_topic_the_gateway_routes_is_answered_from_what_it_received_live() {
    let dir = TempDir::new("window");
    let (_nats, gw) = gateway_on_single_nats(&dir).await;
    let mut holder = open_on(&gw, "acme", "", &["w.t0"]).await;
    let cursor = publish_retrying(&gw.http(), "acme", "w.t0", json!({"i": -1})).await;
    assert_eq!(ids(&holder.events(1).await), std::slice::from_ref(&cursor));
    let expected = publish_mixed(&gw, 5_000, 100, "w.t0").await;
    // The holder had them live: the gateway has received them all.
    assert_eq!(holder.events(expected.len()).await.len(), expected.len());

    let before = gw.metrics().await;
    let mut client = open_on(&gw, "acme", &format!("&cursor={cursor}"), &["w.t0"]).await;
    assert_eq!(replayed(&mut client).await, expected);
    let after = gw.metrics().await;
    let (window, own, shared) = (
        reads_between(&before, &after, "window"),
        reads_between(&before, &after, "own"),
        reads_between(&before, &after, "shared_read"),
    );
    assert!(
        window >= 1.0 && own == 0.0 && shared == 0.0,
        "reads: {window} from the window, {own} own, {shared} of the recent range"
    );
    let next = publish_retrying(&gw.http(), "acme", "w.t0", json!({"i": 5_000})).await;
    assert_eq!(ids(&client.events(1).await), [next]);
    client.expect_silence(Duration::from_millis(300)).await;
}

/// Two patterns of a tenant that overlap (`w.*` and `w.t0`): an event both
/// match reaches the hub through whichever subscription delivers it
/// first, so neither window can promise to hold everything dispatched
/// before a registration. The resume reads JetStream, and loses nothing.
#[tokio::test]
async fn overlapping_patterns_resume_from_the_stream() {
    let dir = TempDir::new("window-overlap");
    let (_nats, gw) = gateway_on_single_nats(&dir).await;
    let mut wide = open_on(&gw, "acme", "", &["w.*"]).await;
    let _narrow = open_on(&gw, "acme", "", &["w.t0"]).await;
    let cursor = publish_retrying(&gw.http(), "acme", "w.t0", json!({"i": -1})).await;
    assert_eq!(ids(&wide.events(1).await), std::slice::from_ref(&cursor));
    let expected = publish_mixed(&gw, 300, 10, "w.t0").await;
    assert_eq!(wide.events(300).await.len(), 300);

    let before = gw.metrics().await;
    let mut client = open_on(&gw, "acme", &format!("&cursor={cursor}"), &["w.t0"]).await;
    assert_eq!(replayed(&mut client).await, expected);
    let after = gw.metrics().await;
    assert_eq!(
        reads_between(&before, &after, "window"),
        0.0,
        "an overlapped window answered a resume"
    );
}

/// What a gateway missed while its NATS node was down reaches it in the
/// catch-up, not through its subscriptions: a window that spanned the
/// outage would answer a resume without those events. A cursor from
/// before the outage resumes with everything, from the stream.
#[tokio::test]
async fn a_resume_from_before_a_nats_outage_gets_what_was_stored_meanwhile() {
    let dir = TempDir::new("window-outage");
    let (mut nats, gw1, gw2) = gateways_on_two_nodes_of_three(&dir).await;
    let mut holder = open_on(&gw1, "acme", "", &["w.t0"]).await;
    let cursor = publish_retrying(&gw2.http(), "acme", "w.t0", json!({"i": 0})).await;
    assert_eq!(ids(&holder.events(1).await), std::slice::from_ref(&cursor));

    nats.servers[0].kill();
    let mut sent = Vec::new();
    for i in 1..=10 {
        publish_retrying(&gw2.http(), "acme", "w.t0", json!({"i": i})).await;
        sent.push(i);
    }
    // After the catch-up, live again through the new subscription.
    assert_eq!(holder.events(10).await.len(), 10);
    eventually("gw1 ready again", || async {
        gw1.ready_status().await == Some(200)
    })
    .await;
    for i in 11..=15 {
        publish_retrying(&gw2.http(), "acme", "w.t0", json!({"i": i})).await;
        sent.push(i);
    }
    assert_eq!(holder.events(5).await.len(), 5);

    let mut client = open_on(&gw1, "acme", &format!("&cursor={cursor}"), &["w.t0"]).await;
    assert_eq!(replayed(&mut client).await, sent);
}
