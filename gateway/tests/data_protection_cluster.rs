//! Data protection in cluster mode, checked in the JetStream streams
//! themselves (not only in what clients receive): erasure in every
//! region's stream, the notices, the block across gateways, per-event
//! retention (message TTLs), residency (a pinned tenant's events are never
//! sourced to another region), and an erasure whose gateway is killed
//! midway being finished by another.

mod common;

use std::time::Duration;

use common::nats::*;
use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};

/// Every stored event of `tenant` in region `region`'s stream:
/// (subject, body), read with a consumer of our own.
async fn stored(url: &str, region: &str, tenant: &str) -> Vec<(String, Value)> {
    use async_nats::jetstream::consumer;
    let client = async_nats::connect(url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(format!("SB_{region}")).await.unwrap();
    let mut reader = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: format!("sb.ev.*.{tenant}.>"),
            ack_policy: consumer::AckPolicy::None,
            memory_storage: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut pending = reader.cached_info().num_pending;
    let mut out = Vec::new();
    // Read every message the consumer counted: an empty batch (a busy
    // server answering late) is tried again until a deadline, never taken
    // for the end of the stream. An erasure under way may delete messages
    // that were counted: after an empty batch the count is asked again, so
    // a deleted message is not waited for.
    let deadline = tokio::time::Instant::now() + DEADLINE * 2;
    while pending > 0 {
        let mut batch = reader
            .fetch()
            .max_messages(500)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        let mut read = 0;
        while let Some(Ok(m)) = batch.next().await {
            pending = m.info().unwrap().pending;
            read += 1;
            out.push((
                m.subject.to_string(),
                serde_json::from_slice(&m.payload).unwrap(),
            ));
        }
        drop(batch);
        if read == 0 {
            pending = reader.info().await.unwrap().num_pending;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{region}: {pending} stored messages of {tenant} not read in time"
        );
    }
    let _ = stream.delete_consumer(&reader.cached_info().name).await;
    out
}

fn owners(events: &[(String, Value)]) -> Vec<String> {
    let mut v: Vec<String> = events
        .iter()
        .map(|(_, b)| b["data"]["owner"].as_str().unwrap_or("?").to_owned())
        .collect();
    v.sort();
    v
}

async fn publish_on(base: &str, tenant: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/api/realtime/publish/"))
        .bearer_auth(token(tenant, &["publish"]))
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// Publish an event of `owner` (its data subject), retrying while the
/// stream is being created.
async fn publish_for(base: &str, tenant: &str, owner: &str, i: u32, gdpr: Value) -> String {
    let mut gdpr = gdpr;
    gdpr["data_subject_id"] = json!(owner);
    let body = json!({"event_type": "orders.created", "data": {"owner": owner, "i": i}, "gdpr_context": gdpr});
    let deadline = tokio::time::Instant::now() + DEADLINE * 3;
    loop {
        let (status, answer) = publish_on(base, tenant, body.clone()).await;
        if status == 201 {
            return answer["event_id"].as_str().unwrap().to_owned();
        }
        assert!(
            status == 503 && tokio::time::Instant::now() < deadline,
            "{status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn erase(base: &str, tenant: &str, subject: &str) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}/api/realtime/erase/"))
        .bearer_auth(token(tenant, &["erase"]))
        .json(&json!({"data_subject_id": subject}))
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

const POLICY: &str = "tenants:
  acme:
    subscribe: [{pattern: \">\"}]
    publish: [{pattern: \">\"}]
  euco:
    subscribe: [{pattern: \">\"}]
    publish: [{pattern: \">\"}]
    residency: [eu]
";

#[tokio::test]
async fn two_regions_erasure_retention_and_residency_in_the_streams() {
    let dir = TempDir::new("dp-regions");
    let clusters = supercluster(&dir, &["eu", "us"]).await;
    let (eu, us) = (&clusters[0], &clusters[1]);
    let policy = dir.0.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let yaml = |region: &str, c: &Cluster| {
        format!(
            "{}  placement_cluster: {region}\npolicy_file: {}\ndata_protection:\n  retention_day_seconds: 2\n",
            nats_yaml(region, &c.urls(), &["eu", "us"], 3),
            policy.display()
        )
    };
    let gw_eu = GatewayProc::start(&dir, "gw-eu", &yaml("eu", eu));
    let gw_us = GatewayProc::start(&dir, "gw-us", &yaml("us", us));
    gw_eu.wait_ready().await;
    gw_us.wait_ready().await;
    let (eu_url, us_url) = (eu.urls()[0].clone(), us.urls()[0].clone());

    let mut holder = Client::connect(&gw_us.ws(&format!("token={}", token("acme", &[])))).await;
    holder.recv_type("connection.established").await;
    holder.subscribe(&["orders.*"]).await;

    // Events of two data subjects, published in both regions.
    for i in 0..3 {
        publish_for(&gw_eu.http(), "acme", "alice", i, json!({})).await;
        publish_for(&gw_eu.http(), "acme", "bob", i, json!({})).await;
    }
    publish_for(&gw_us.http(), "acme", "alice", 3, json!({})).await;
    publish_for(&gw_us.http(), "acme", "bob", 3, json!({})).await;
    let seen = tokio::time::timeout(Duration::from_secs(30), holder.events(8))
        .await
        .expect("every event reaches the us connection");
    let mut alice_in_us: Vec<String> = seen
        .iter()
        .filter(|e| e["data"]["owner"] == "alice")
        .map(|e| e["event_id"].as_str().unwrap().to_owned())
        .collect();
    alice_in_us.sort();
    for (url, region) in [(&eu_url, "eu"), (&us_url, "us")] {
        eventually(&format!("8 events in {region}'s stream"), || async {
            stored(url, region, "acme").await.len() == 8
        })
        .await;
    }

    // Erase alice through the eu gateway: gone from both regions' streams.
    let (status, answer) = erase(&gw_eu.http(), "acme", "alice").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"], "completed", "{answer}");
    assert_eq!(
        answer["erased"]["regions"],
        json!({"eu": 4, "us": 4}),
        "{answer}"
    );
    for (url, region) in [(&eu_url, "eu"), (&us_url, "us")] {
        let left = stored(url, region, "acme").await;
        assert_eq!(owners(&left), ["bob"; 4], "{region}: {left:?}");
    }

    // The us connection is told which of the ids it holds are gone.
    let mut notified = Vec::new();
    while notified.len() < alice_in_us.len() {
        let n = holder.recv_type("data.erased").await;
        for id in n["data"]["data"]["event_ids"].as_array().unwrap() {
            notified.push(id.as_str().unwrap().to_owned());
        }
    }
    notified.sort();
    assert_eq!(notified, alice_in_us);

    // Replay in us skips them; new publishes for alice are refused in both
    // regions once the block reached each gateway.
    let (_, page) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=orders.*&cursor=0-0&timeout=0",
            gw_us.http()
        ),
        Some(&token("acme", &[])),
    )
    .await;
    let replayed: Vec<&str> = page["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["data"]["owner"].as_str().unwrap())
        .collect();
    assert_eq!(replayed, ["bob"; 4], "{page}");
    for gw in [&gw_eu, &gw_us] {
        eventually("the block reaches every gateway", || async {
            let (status, body) = publish_on(
                &gw.http(),
                "acme",
                json!({"event_type": "orders.created", "data": {}, "gdpr_context": {"data_subject_id": "alice"}}),
            )
            .await;
            assert_ne!(status, 201, "published for an erased subject: {body}");
            status == 403 && body["error"]["code"] == "data_subject_erased"
        })
        .await;
    }
    // Erasing again finds nothing left.
    let (_, again) = erase(&gw_us.http(), "acme", "alice").await;
    assert_eq!(
        again["erased"]["regions"],
        json!({"eu": 0, "us": 0}),
        "{again}"
    );

    // Residency: euco is pinned to eu. Its events stay in eu's stream while
    // acme's, published after them, reach us's.
    publish_for(&gw_eu.http(), "euco", "erin", 0, json!({})).await;
    publish_for(&gw_eu.http(), "euco", "erin", 1, json!({})).await;
    publish_for(&gw_eu.http(), "acme", "marker", 0, json!({})).await;
    eventually("the marker is sourced to us", || async {
        owners(&stored(&us_url, "us", "acme").await).contains(&"marker".to_owned())
    })
    .await;
    assert_eq!(stored(&eu_url, "eu", "euco").await.len(), 2);
    assert_eq!(
        stored(&us_url, "us", "euco").await,
        Vec::<(String, Value)>::new(),
        "a resident tenant's events were copied to another region"
    );
    let (status, body) = publish_on(
        &gw_us.http(),
        "euco",
        json!({"event_type": "orders.created", "data": {}}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("residency_violation")),
        "{body}"
    );
    let mut refused = Client::connect(&gw_us.ws(&format!("token={}", token("euco", &[])))).await;
    assert_eq!(refused.closed().await.0, 4013);
    let mut served = Client::connect(&gw_eu.ws(&format!("token={}", token("euco", &[])))).await;
    served.recv_type("connection.established").await;

    // Retention: an event kept one (two-second) day leaves both streams.
    publish_for(
        &gw_eu.http(),
        "acme",
        "short",
        0,
        json!({"retention_days": 1}),
    )
    .await;
    eventually("the short event is sourced to us", || async {
        owners(&stored(&us_url, "us", "acme").await).contains(&"short".to_owned())
    })
    .await;
    for (url, region) in [(&eu_url, "eu"), (&us_url, "us")] {
        eventually(
            &format!("the short event leaves {region}'s stream"),
            || async { !owners(&stored(url, region, "acme").await).contains(&"short".to_owned()) },
        )
        .await;
        let left = owners(&stored(url, region, "acme").await);
        assert_eq!(left.len(), 5, "only the short one went: {left:?}");
    }
}

#[tokio::test]
async fn an_erasure_interrupted_by_a_crash_is_finished_by_another_gateway() {
    let dir = TempDir::new("dp-crash");
    let nats = single(&dir).await;
    let url = nats.urls()[0].clone();
    let audit_b = dir.0.join("audit-b.jsonl");
    let base = nats_yaml("eu", &nats.urls(), &["eu"], 1);
    // A paced erasure: slow enough to kill its gateway midway.
    let mut gw_a = GatewayProc::start(
        &dir,
        "gw-a",
        &format!("{base}data_protection:\n  erase_pace_ms: 300\n"),
    );
    let gw_b = GatewayProc::start(
        &dir,
        "gw-b",
        &format!(
            "{base}data_protection:\n  audit_file: {}\n",
            audit_b.display()
        ),
    );
    gw_a.wait_ready().await;
    gw_b.wait_ready().await;
    for i in 0..20 {
        publish_for(&gw_a.http(), "acme", "alice", i, json!({})).await;
    }
    publish_for(&gw_a.http(), "acme", "bob", 0, json!({})).await;
    assert_eq!(stored(&url, "eu", "acme").await.len(), 21);

    let base_a = gw_a.http();
    let request = tokio::spawn(async move { erase(&base_a, "acme", "alice").await });
    eventually("the erasure has started", || async {
        stored(&url, "eu", "acme").await.len() < 21
    })
    .await;
    gw_a.kill();
    let _ = request.await; // the connection died with the gateway
    let midway = stored(&url, "eu", "acme").await.len();
    assert!(
        midway > 1,
        "the erasure finished before the crash ({midway} left)"
    );
    // Publishes for alice are blocked already (the block came first).
    let (status, body) = publish_on(
        &gw_b.http(),
        "acme",
        json!({"event_type": "orders.created", "data": {}, "gdpr_context": {"data_subject_id": "alice"}}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("data_subject_erased")),
        "{body}"
    );

    // The other gateway finds the abandoned erasure and finishes it.
    eventually("the erasure is finished by gw-b", || async {
        std::fs::read_to_string(&audit_b).is_ok_and(|t| t.contains("\"completed\""))
    })
    .await;
    let left = stored(&url, "eu", "acme").await;
    assert_eq!(owners(&left), ["bob"], "{left:?}");
    let record: Value = serde_json::from_str(
        std::fs::read_to_string(&audit_b)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(record["resumed"], 1, "{record}");
    assert_eq!(record["data_subject_id"], "alice");
    assert_eq!(
        record["erased"]["regions"]["eu"].as_u64().unwrap() as usize,
        midway - 1,
        "it erased what was left: {record}"
    );
}

/// A gateway whose clients hold a topic answers resumes on it from what it
/// received live. An erasure empties that, so a resume from before it gets
/// none of the erased events even when the subject is not blocked
/// afterwards (`block_seconds: 0`), which is the only other thing keeping
/// them out.
#[tokio::test]
async fn a_resume_after_an_erasure_gets_none_of_the_erased_events() {
    let dir = TempDir::new("dp-window");
    let nats = single(&dir).await;
    let gw = GatewayProc::start(&dir, "gw", &nats_yaml("local", &nats.urls(), &[], 1));
    gw.wait_ready().await;
    let mut holder = Client::connect(&gw.ws(&format!("token={}", token("acme", &[])))).await;
    holder.recv_type("connection.established").await;
    holder.subscribe(&["orders.created"]).await;
    let cursor = publish_for(&gw.http(), "acme", "carol", 0, json!({})).await;
    for i in 1..4 {
        publish_for(&gw.http(), "acme", "alice", i, json!({})).await;
        publish_for(&gw.http(), "acme", "bob", i, json!({})).await;
    }
    assert_eq!(holder.events(7).await.len(), 7);

    let r = reqwest::Client::new()
        .post(format!("{}/api/realtime/erase/", gw.http()))
        .bearer_auth(token("acme", &["erase"]))
        .json(&json!({"data_subject_id": "alice", "block_seconds": 0}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let answer: Value = r.json().await.unwrap();
    assert_eq!(answer["state"], "completed", "{answer}");

    let query = format!("token={}&cursor={cursor}", token("acme", &[]));
    let mut client = Client::connect(&gw.ws(&query)).await;
    client.recv_type("connection.established").await;
    client.subscribe(&["orders.created"]).await;
    let mut owners = Vec::new();
    loop {
        let m = client.recv().await;
        match m["type"].as_str() {
            Some("event") => owners.push(m["data"]["data"]["owner"].as_str().unwrap().to_owned()),
            Some("replay.complete") => break,
            Some("resume.gap") => panic!("gap: {m}"),
            _ => {}
        }
    }
    assert_eq!(owners, ["bob"; 3]);
}
