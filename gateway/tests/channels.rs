//! Seed 004's wire form both ways, private user channels and publishing
//! from the client, over real sockets on one gateway (embedded).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};
use switchboard_gateway::config::PolicyBundle;

/// Connect as `user` of `tenant` and read `connection.established`.
async fn open_as(gw: &Gateway, tenant: &str, user: &str) -> Client {
    let mut c = Client::connect(&gw.ws(&format!("token={}", user_token(tenant, user)))).await;
    c.recv_type("connection.established").await;
    c
}

/// Publish through the HTTP API as a backend of `tenant`; the event id.
async fn publish_body(gw: &Gateway, tenant: &str, body: Value) -> String {
    let (status, answer) = publish(gw, &token(tenant, &["publish"]), body).await;
    assert_eq!(status, 201, "{answer}");
    answer["event_id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn seed_004_message_types_reach_channel_form_and_native_subscribers() {
    let gw = Gateway::default().await;
    let mut seed4 = open_as(&gw, "acme", "alice").await;
    seed4
        .send(json!({"type": "subscribe", "channel": "entity:Task:123", "requestId": "r1", "timestamp": 1}))
        .await;
    assert_eq!(seed4.recv_type("subscribed").await["requestId"], "r1");
    let mut native = open_as(&gw, "acme", "bob").await;
    native.subscribe(&["entity:Task:123"]).await;

    // Seed 004's backend body: channel, type, payload.
    let id = publish_body(
        &gw,
        "acme",
        json!({"channel": "entity:Task:123", "type": "entity:created", "payload": {"title": "New task"}}),
    )
    .await;
    let m = seed4.recv().await;
    assert_eq!(m["type"], "entity:created", "{m}");
    assert_eq!(m["channel"], "entity:Task:123");
    assert_eq!(m["payload"], json!({"title": "New task"}));
    assert_eq!(m["cursor"], id.as_str());
    assert!(m["timestamp"].as_i64().unwrap() > 1_700_000_000_000, "{m}");
    // Seed 001's envelope for the other, the message type in metadata.
    let e = native.events(1).await.remove(0);
    assert_eq!(e["event_id"], id.as_str());
    assert_eq!(e["data"], json!({"title": "New task"}));
    assert_eq!(e["metadata"]["message_type"], "entity:created");

    // A message type is one short token of visible text.
    let (status, answer) = publish(
        &gw,
        &token("acme", &["publish"]),
        json!({"channel": "entity:Task:123", "type": "x".repeat(65), "payload": {}}),
    )
    .await;
    assert_eq!(status, 400, "{answer}");
    assert_eq!(answer["error"]["code"], "invalid_request");
}

#[tokio::test]
async fn a_user_channel_reaches_every_connection_of_that_user_and_nobody_else() {
    let gw = Gateway::default().await;
    let mut alice1 = open_as(&gw, "acme", "alice").await;
    let mut alice2 = open_as(&gw, "acme", "alice").await;
    // Her own sub-channels she may name.
    alice1.subscribe(&["user:alice.>"]).await;
    // Bob listens to everything his tenant has, with every wildcard form.
    let mut bob = open_as(&gw, "acme", "bob").await;
    bob.subscribe(&[">", "*", "*.>"]).await;
    // Same user id in another tenant.
    let mut other_alice = open_as(&gw, "globex", "alice").await;
    other_alice.subscribe(&[">"]).await;

    // Naming another user's channel is refused, in any form.
    for pattern in ["user:alice", "user:alice.>", "user:alice.inbox"] {
        bob.send(json!({"type": "subscribe", "topics": [pattern]}))
            .await;
        let m = bob.recv().await;
        assert_eq!(
            (m["type"].as_str(), m["data"]["code"].as_str()),
            (Some("error"), Some("topic_not_allowed")),
            "{pattern}: {m}"
        );
    }

    let start = publish_ok(&gw, "acme", "deal.start", json!({}));
    let start = start.await;
    assert_eq!(ids(&bob.events(1).await), std::slice::from_ref(&start));
    let dm = publish_body(
        &gw,
        "acme",
        json!({"event_type": "user:alice", "data": {"text": "hi"}}),
    )
    .await;
    let nested = publish_body(
        &gw,
        "acme",
        json!({"event_type": "user:alice.inbox", "data": {"text": "hi again"}}),
    )
    .await;
    assert_eq!(ids(&alice1.events(2).await), [dm.clone(), nested.clone()]);
    assert_eq!(ids(&alice2.events(1).await), std::slice::from_ref(&dm));
    // A marker bob may see proves the user channel events were not queued for him.
    let marker = publish_ok(&gw, "acme", "deal.marker", json!({})).await;
    assert_eq!(ids(&bob.events(1).await), std::slice::from_ref(&marker));
    other_alice.expect_silence(Duration::from_millis(200)).await;

    // Not by replay either: bob resumes from the start with `>`.
    let mut replay = Client::connect(&gw.ws(&format!(
        "token={}&cursor={start}",
        user_token("acme", "bob")
    )))
    .await;
    replay.recv_type("connection.established").await;
    replay.subscribe(&[">"]).await;
    let m = replay.recv().await;
    assert_eq!(m["type"], "event", "{m}");
    assert_eq!(
        m["data"]["event_id"],
        marker.as_str(),
        "only the marker is replayed"
    );
    // Nor by long-poll or SSE.
    let (status, page) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=>&cursor={start}&timeout=0",
            gw.http()
        ),
        Some(&user_token("acme", "bob")),
    )
    .await;
    assert_eq!(status, 200, "{page}");
    let polled: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event_id"].as_str().unwrap())
        .collect();
    assert_eq!(polled, [marker.as_str()]);
    // Alice's own long-poll holds both.
    let (_, page) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=>&cursor={start}&timeout=0",
            gw.http()
        ),
        Some(&user_token("acme", "alice")),
    )
    .await;
    assert_eq!(page["events"].as_array().unwrap().len(), 3, "{page}");

    // The own channel is held implicitly: not listed, not counted.
    assert_eq!(
        metric(&gw.metrics().await, "switchboard_subscriptions_active"),
        6.0,
        "bob's 3, alice1's 1, other_alice's 1 and replay's 1"
    );
}

#[tokio::test]
async fn a_client_publish_is_acknowledged_and_names_its_sender() {
    let gw = Gateway::default().await;
    let mut bob = open_as(&gw, "acme", "bob").await;
    bob.subscribe(&["chat.>"]).await;
    let mut alice = open_as(&gw, "acme", "alice").await;
    alice
        .send(json!({"type": "publish", "topic": "chat.room1", "data": {"text": "hello"}, "idempotencyKey": "m-1", "requestId": 9}))
        .await;
    let ack = alice.recv_type("publish.ack").await;
    assert_eq!(ack["requestId"], 9, "{ack}");
    assert_eq!(ack["data"]["topic"], "chat.room1");
    assert_eq!(ack["data"]["duplicate"], false);
    let id = ack["data"]["event_id"].as_str().unwrap().to_owned();
    let e = bob.events(1).await.remove(0);
    assert_eq!(e["event_id"], id.as_str());
    assert_eq!(
        e["metadata"]["publisher"], "alice",
        "the gateway stamps the sender"
    );
    // The same key again: acknowledged as a duplicate, delivered once.
    alice
        .send(json!({"type": "publish", "topic": "chat.room1", "data": {"text": "hello"}, "idempotencyKey": "m-1"}))
        .await;
    let again = alice.recv_type("publish.ack").await;
    assert_eq!(
        (
            again["data"]["duplicate"].as_bool(),
            again["data"]["event_id"].as_str()
        ),
        (Some(true), Some(id.as_str()))
    );
    // A direct message from a client, in seed 004's form.
    alice
        .send(json!({"type": "publish", "channel": "user:bob", "messageType": "chat:dm", "payload": {"text": "psst"}}))
        .await;
    alice.recv_type("publish.ack").await;
    let dm = bob.events(1).await.remove(0);
    assert_eq!(
        (
            dm["event_type"].as_str(),
            dm["metadata"]["publisher"].as_str()
        ),
        (Some("user:bob"), Some("alice"))
    );
    bob.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test]
async fn client_publishing_follows_its_own_allowlist_and_never_reaches_critical_topics() {
    let gw = Gateway::default().await;
    gw.node.set_policy(
        PolicyBundle::from_yaml(
            r#"
tenants:
  acme:
    subscribe: [{pattern: ">"}, {pattern: "payment.>", class: critical}]
    publish: [{pattern: ">"}]
    client_publish: [{pattern: "chat.>"}, {pattern: "payment.>"}]
  globex:
    subscribe: [{pattern: ">"}]
    publish: [{pattern: ">"}]
"#,
        )
        .unwrap(),
    );
    let mut alice = open_as(&gw, "acme", "alice").await;
    let refused = |topic: &'static str| json!({"type": "publish", "topic": topic, "data": {}, "requestId": topic});
    for topic in ["deal.created", "payment.captured"] {
        alice.send(refused(topic)).await;
        let m = alice.recv().await;
        assert_eq!(
            (
                m["type"].as_str(),
                m["data"]["code"].as_str(),
                m["requestId"].as_str()
            ),
            (Some("error"), Some("forbidden"), Some(topic)),
            "{m}"
        );
    }
    alice.send(refused("chat.ok")).await;
    assert_eq!(alice.recv().await["type"], "publish.ack");
    // A tenant whose policy names no client topics: clients publish nothing.
    let mut g = open_as(&gw, "globex", "carol").await;
    g.send(json!({"type": "publish", "topic": "chat.x", "data": {}}))
        .await;
    assert_eq!(g.recv().await["data"]["code"], "forbidden");
}

#[tokio::test]
async fn the_implicit_user_channel_speaks_the_form_the_client_speaks() {
    let gw = Gateway::default().await;
    let mut native = open_as(&gw, "acme", "alice").await;
    let mut seed4 = open_as(&gw, "acme", "alice").await;
    seed4
        .send(json!({"type": "subscribe", "channel": "entity:Task"}))
        .await;
    seed4.recv_type("subscribed").await;
    publish_body(
        &gw,
        "acme",
        json!({"channel": "user:alice", "type": "notification:new", "payload": {"n": 1}}),
    )
    .await;
    let m = seed4.recv().await;
    assert_eq!(
        (m["type"].as_str(), m["channel"].as_str()),
        (Some("notification:new"), Some("user:alice")),
        "{m}"
    );
    let e = native.events(1).await.remove(0);
    assert_eq!(e["event_type"], "user:alice");
}
