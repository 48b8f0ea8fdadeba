//! Data protection in the embedded mode: erasure by data subject (history,
//! idempotency records, notices, the block, the audit trail, tenant
//! walls), retention per event, and residency. Cluster mode is in
//! `data_protection_cluster.rs`.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

async fn post(gw: &Gateway, path: &str, token: &str, body: Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{}{path}", gw.http()))
        .bearer_auth(token)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn publish_for(gw: &Gateway, tenant: &str, topic: &str, subject: &str, i: u32) -> String {
    let (status, body) = publish(
        gw,
        &token(tenant, &["publish"]),
        json!({
            "event_type": topic,
            "data": {"i": i, "owner": subject},
            "idempotency_key": format!("{subject}-{i}"),
            "gdpr_context": {"consent": true, "purpose": "orders", "data_subject_id": subject},
        }),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    body["event_id"].as_str().unwrap().to_owned()
}

/// Every event of `tenant` the long-poll replays from the start, by owner.
async fn history(gw: &Gateway, tenant: &str) -> Vec<(String, String)> {
    let (status, body) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=orders.*&cursor=0-0&timeout=0",
            gw.http()
        ),
        Some(&token(tenant, &[])),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["event_id"].as_str().unwrap().to_owned(),
                e["data"]["owner"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn erasure_removes_a_subjects_events_notifies_holders_and_blocks_new_ones() {
    let audit = std::env::temp_dir().join(format!("sb-audit-{}.jsonl", std::process::id()));
    let _ = std::fs::remove_file(&audit);
    let mut config = config();
    config.data_protection.audit_file = Some(audit.clone());
    let gw = Gateway::start(config).await;
    let mut holder = Client::open(&gw, "acme").await;
    holder.subscribe(&["orders.*"]).await;

    let mut alice = Vec::new();
    let mut bob = Vec::new();
    for i in 0..3 {
        alice.push(publish_for(&gw, "acme", "orders.created", "alice", i).await);
        bob.push(publish_for(&gw, "acme", "orders.paid", "bob", i).await);
    }
    // The same subject id in another tenant is another person.
    let other = publish_for(&gw, "globex", "orders.created", "alice", 0).await;
    assert_eq!(holder.events(6).await.len(), 6);

    // Who may erase: the erase scope or platform, on its own tenant.
    let body = json!({"data_subject_id": "alice"});
    let (status, refused) = post(
        &gw,
        "/api/realtime/erase/",
        &token("acme", &["publish"]),
        body.clone(),
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{refused}"
    );
    let (status, refused) = post(
        &gw,
        "/api/realtime/erase/",
        &token("globex", &["erase"]),
        json!({"data_subject_id": "alice", "tenant": "acme"}),
    )
    .await;
    assert_eq!(status, 403, "another tenant's erase token: {refused}");
    let (status, bad) = post(
        &gw,
        "/api/realtime/erase/",
        &token("acme", &["erase"]),
        json!({"data_subject_id": true}),
    )
    .await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (400, Some("invalid_request")),
        "{bad}"
    );
    let (status, bad) = post(
        &gw,
        "/api/realtime/erase/",
        &token("acme", &["erase"]),
        json!({"subject": "alice"}),
    )
    .await;
    assert_eq!(
        (status, bad["error"]["code"].as_str()),
        (400, Some("malformed_body")),
        "{bad}"
    );
    assert_eq!(
        history(&gw, "acme").await.len(),
        6,
        "refusals erased nothing"
    );

    // A long-poll waiting meanwhile answers with stored events only.
    let waiting = {
        let url = format!(
            "{}/api/realtime/poll/?topics=orders.*&cursor={}&timeout=8",
            gw.http(),
            bob[2]
        );
        let t = token("acme", &[]);
        tokio::spawn(async move { get_json(&url, Some(&t)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await; // let it start waiting
    let (status, answer) = post(
        &gw,
        "/api/realtime/erase/",
        &token("acme", &["erase"]),
        body.clone(),
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["state"], "completed");
    assert_eq!(answer["erased"]["regions"]["local"], 3, "{answer}");
    assert_eq!(answer["erased"]["dedup_records"], 3, "{answer}");
    assert!(answer["blocked_until"].is_string(), "{answer}");

    // The connection holding them is told which ids are gone.
    let notice = holder.recv_type("data.erased").await;
    assert_eq!(notice["data"]["topic"], "orders.created");
    assert_eq!(
        notice["data"]["data"]["event_ids"],
        json!(alice),
        "{notice}"
    );
    holder.expect_silence(Duration::from_millis(300)).await;

    // History keeps bob's only; the other tenant's alice is untouched.
    let left = history(&gw, "acme").await;
    assert_eq!(
        left,
        bob.iter()
            .map(|id| (id.clone(), "bob".to_owned()))
            .collect::<Vec<_>>()
    );
    let theirs = history(&gw, "globex").await;
    assert_eq!(theirs, [(other, "alice".to_owned())]);
    // Replay from before the first erased event skips them, without a gap.
    let (_, page) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=orders.*&cursor={}&timeout=0",
            gw.http(),
            alice[0]
        ),
        Some(&token("acme", &[])),
    )
    .await;
    assert!(page.get("resume_gap").is_none_or(Value::is_null), "{page}");
    assert_eq!(page["events"].as_array().unwrap().len(), 3, "{page}");

    // New publishes for the subject are refused while blocked, others pass.
    let (status, refused) = publish(
        &gw,
        &token("acme", &["publish"]),
        json!({"event_type": "orders.created", "data": {}, "gdpr_context": {"data_subject_id": "alice"}}),
    )
    .await;
    assert_eq!(
        (status, refused["error"]["code"].as_str()),
        (403, Some("data_subject_erased")),
        "{refused}"
    );
    let carol = publish_for(&gw, "acme", "orders.created", "carol", 0).await;
    let (status, polled) = waiting.await.unwrap();
    assert_eq!(status, 200, "{polled}");
    assert_eq!(
        ids(polled["events"].as_array().unwrap()),
        [carol],
        "{polled}"
    );
    publish_for(&gw, "globex", "orders.created", "alice", 1).await;

    // Asking again is idempotent: nothing left to erase.
    let (status, again) = post(
        &gw,
        "/api/realtime/erase/",
        &token("acme", &["platform"]),
        body.clone(),
    )
    .await;
    assert_eq!(status, 200, "{again}");
    assert_eq!(again["erased"]["regions"]["local"], 0, "{again}");

    // Lifting the block: the subject may publish again, and its old
    // idempotency keys were forgotten with its events (a new event, not a
    // duplicate of an erased one).
    let (status, _) = post(
        &gw,
        "/api/realtime/erase/",
        &token("acme", &["erase"]),
        json!({"data_subject_id": "alice", "lift_block": true}),
    )
    .await;
    assert_eq!(status, 200);
    let (status, fresh) = publish(
        &gw,
        &token("acme", &["publish"]),
        json!({"event_type": "orders.created", "data": {"owner": "alice"}, "idempotency_key": "alice-0",
               "gdpr_context": {"data_subject_id": "alice"}}),
    )
    .await;
    assert_eq!(status, 201, "{fresh}");
    assert_eq!(fresh["duplicate"], false);

    // The audit trail: who, which subject, what; never the erased data.
    let lines = std::fs::read_to_string(&audit).unwrap();
    let records: Vec<Value> = lines
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{lines}");
    assert_eq!(records[0]["tenant"], "acme");
    assert_eq!(records[0]["data_subject_id"], "alice");
    assert_eq!(records[0]["outcome"], "completed");
    assert_eq!(records[0]["erased"]["regions"]["local"], 3);
    assert!(
        records[0]["requested_by"]
            .as_str()
            .unwrap()
            .contains("acme")
    );
    assert!(
        !lines.contains("owner"),
        "no event data in the audit trail: {lines}"
    );
    let _ = std::fs::remove_file(&audit);
}

#[tokio::test]
async fn gdpr_contexts_that_cannot_be_honoured_are_refused() {
    let gw = Gateway::start(config()).await;
    for bad in [
        json!("yes"),
        json!({"retention_days": 0}),
        json!({"retention_days": "30"}),
        json!({"data_subject_id": {"id": 1}}),
    ] {
        let (status, body) = publish(
            &gw,
            &token("acme", &["publish"]),
            json!({"event_type": "orders.created", "data": {}, "gdpr_context": bad}),
        )
        .await;
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{body}"
        );
    }
}

#[tokio::test]
async fn events_leave_history_when_their_retention_ends() {
    let mut config = config();
    // A "day" of one second, to watch retention act.
    config.data_protection.retention_day_seconds = 1;
    let gw = Gateway::start(config).await;
    let publisher = token("acme", &["publish"]);
    let send = |data: Value, gdpr: Value| {
        let gw = &gw;
        let publisher = &publisher;
        async move {
            let (status, body) = publish(
                gw,
                publisher,
                json!({"event_type": "orders.created", "data": data, "gdpr_context": gdpr}),
            )
            .await;
            assert_eq!(status, 201, "{body}");
            body["event_id"].as_str().unwrap().to_owned()
        }
    };
    let first = send(json!({"owner": "kept-1"}), Value::Null).await;
    let short = send(json!({"owner": "short"}), json!({"retention_days": 1})).await;
    let kept = send(json!({"owner": "kept-2"}), json!({"retention_days": 30})).await;
    assert_eq!(history(&gw, "acme").await.len(), 3);

    let deadline = tokio::time::Instant::now() + DEADLINE;
    while history(&gw, "acme").await.len() == 3 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the short event never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left: Vec<String> = history(&gw, "acme")
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert_eq!(
        left,
        [first.clone(), kept.clone()],
        "only the short one is gone"
    );

    // A resume that would have delivered it is told so...
    let (_, page) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=orders.*&cursor={first}&timeout=0",
            gw.http()
        ),
        Some(&token("acme", &[])),
    )
    .await;
    assert_eq!(page["resume_gap"]["reason"], "expired", "{page}");
    assert_eq!(page["events"][0]["event_id"], kept.as_str(), "{page}");
    // ...one that would not (another topic, or already past it) is not.
    let (_, page) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=orders.*&cursor={short}&timeout=0",
            gw.http()
        ),
        Some(&token("acme", &[])),
    )
    .await;
    assert!(page.get("resume_gap").is_none_or(Value::is_null), "{page}");
    let (_, page) = get_json(
        &format!(
            "{}/api/realtime/poll/?topics=other.*&cursor={first}&timeout=0",
            gw.http()
        ),
        Some(&token("acme", &[])),
    )
    .await;
    assert!(page.get("resume_gap").is_none_or(Value::is_null), "{page}");
    // The WebSocket resume says the same.
    let mut c = Client::open(&gw, "acme").await;
    c.send(json!({"type": "subscribe", "topics": ["orders.*"], "cursor": first}))
        .await;
    let gap = c.recv_type("resume.gap").await;
    assert_eq!(gap["data"]["reason"], "expired", "{gap}");
}

#[tokio::test]
async fn a_tenants_maximum_retention_caps_what_events_ask_for() {
    let dir = std::env::temp_dir().join(format!("sb-dp-policy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "tenants:\n  acme:\n    subscribe: [{pattern: \">\"}]\n    publish: [{pattern: \">\"}]\n    max_retention_days: 1\n",
    )
    .unwrap();
    let mut config = config();
    config.data_protection.retention_day_seconds = 1;
    config.policy_file = Some(policy);
    let gw = Gateway::start(config).await;
    let (status, body) = publish(
        &gw,
        &token("acme", &["publish"]),
        json!({"event_type": "orders.created", "data": {"owner": "x"}, "gdpr_context": {"retention_days": 3650}}),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(history(&gw, "acme").await.len(), 1);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !history(&gw, "acme").await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tenant's cap was not applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_tenant_pinned_to_other_regions_is_refused_here() {
    let dir = std::env::temp_dir().join(format!("sb-dp-res-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "tenants:\n  euco:\n    subscribe: [{pattern: \">\"}]\n    publish: [{pattern: \">\"}]\n    residency: [eu]\n  usco:\n    subscribe: [{pattern: \">\"}]\n    publish: [{pattern: \">\"}]\n    residency: [us]\n",
    )
    .unwrap();
    let mut config = config();
    config.region = "eu".into();
    config.policy_file = Some(policy);
    let gw = Gateway::start(config).await;

    // Resident here: served.
    let mut c = Client::open(&gw, "euco").await;
    c.subscribe(&["orders.*"]).await;
    publish_ok(&gw, "euco", "orders.created", json!({})).await;
    assert_eq!(c.events(1).await.len(), 1);

    // Pinned to us: WebSocket, SSE, long-poll and publish are refused.
    let mut c = Client::connect(&gw.ws(&format!("token={}", token("usco", &[])))).await;
    let (code, reason) = c.closed().await;
    assert_eq!(code, 4013, "{reason}");
    let r = reqwest::Client::new()
        .get(format!("{}/api/realtime/sse/?topics=orders.*", gw.http()))
        .bearer_auth(token("usco", &[]))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "residency_violation", "{body}");
    let (status, body) = get_json(
        &format!("{}/api/realtime/poll/?topics=orders.*&timeout=0", gw.http()),
        Some(&token("usco", &[])),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("residency_violation")),
        "{body}"
    );
    let (status, body) = publish(
        &gw,
        &token("usco", &["publish"]),
        json!({"event_type": "orders.created", "data": {}}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("residency_violation")),
        "{body}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_residency_with_a_bad_region_is_refused_at_load() {
    let err = switchboard_gateway::config::PolicyBundle::from_yaml(
        "tenants:\n  a:\n    residency: [\"e u\"]\n    max_retention_days: 0\n",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("residency region"), "{err}");
    assert!(err.contains("max_retention_days"), "{err}");
}
