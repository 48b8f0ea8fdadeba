//! History, cursors and resume over WebSocket, long-poll and SSE; idempotency.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

#[tokio::test]
async fn reconnect_with_cursor_update_gets_exactly_the_missed_events_then_live() {
    let gw = Gateway::default().await;
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["deal.*"]).await;
    let first = publish_ok(&gw, "acme", "deal.a", json!({"n": 1})).await;
    let seen = c.events(1).await;
    assert_eq!(ids(&seen), std::slice::from_ref(&first));
    drop(c);

    // Missed while away: deal events interleaved with an unsubscribed topic.
    let mut missed = Vec::new();
    for n in 2..=5 {
        missed.push(publish_ok(&gw, "acme", "deal.a", json!({"n": n})).await);
        publish_ok(&gw, "acme", "contact.x", json!({})).await;
    }

    // The seed client's order: subscribe on open, then send the stored cursor.
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["deal.*"]).await;
    c.send(json!({"type": "cursor.update", "cursor": first}))
        .await;
    let replayed = c.events(4).await;
    assert_eq!(ids(&replayed), missed);
    let done = c.recv_type("replay.complete").await;
    assert_eq!(done["data"]["replayed"], 4);
    assert_eq!(done["data"]["cursor"], missed[3].as_str());
    let live = publish_ok(&gw, "acme", "deal.a", json!({"n": 6})).await;
    assert_eq!(ids(&c.events(1).await), [live]);
}

// The seam under concurrent publishing is in contract.rs (both brokers).

#[tokio::test]
async fn expired_and_unknown_cursors_get_a_resume_gap() {
    let mut cfg = config();
    cfg.history.max_events_per_tenant = 3;
    let gw = Gateway::start(cfg).await;
    let old = publish_ok(&gw, "acme", "g.x", json!({"i": 0})).await;
    let mut kept = Vec::new();
    for i in 1..=4 {
        kept.push(publish_ok(&gw, "acme", "g.x", json!({"i": i})).await);
    }
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["g.*"]).await;
    c.send(json!({"type": "cursor.update", "cursor": old, "requestId": "r"}))
        .await;
    let gap = c.recv().await;
    assert_eq!(gap["type"], "resume.gap", "{gap}");
    assert_eq!(gap["data"]["reason"], "expired");
    assert_eq!(gap["requestId"], "r");
    // What is still retained follows, so the client loses no more than it must.
    assert_eq!(ids(&c.events(3).await), kept[1..]);

    c.send(json!({"type": "cursor.update", "cursor": "ffff-1"}))
        .await;
    let gap = c.recv_type("resume.gap").await;
    assert_eq!(gap["data"]["reason"], "unknown");
    c.send(json!({"type": "cursor.update", "cursor": "3f0a4c1e-5b7d-4c1e-9a3f-uuid"}))
        .await;
    assert_eq!(c.recv_type("resume.gap").await["data"]["reason"], "unknown");
}

#[tokio::test]
async fn idempotency_key_stores_and_delivers_once_per_tenant() {
    let gw = Gateway::default().await;
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["pay.*"]).await;
    let body = json!({"event_type": "pay.done", "data": {}, "idempotency_key": "op-1"});
    let (s1, b1) = publish(&gw, &token("acme", &["publish"]), body.clone()).await;
    let (s2, b2) = publish(&gw, &token("acme", &["publish"]), body.clone()).await;
    assert_eq!((s1, s2), (201, 200));
    assert_eq!(b1["event_id"], b2["event_id"]);
    assert_eq!(b2["duplicate"], true);
    // Another tenant's identical key is its own event.
    let (s3, b3) = publish(&gw, &token("globex", &["publish"]), body).await;
    assert_eq!(s3, 201);
    assert_eq!(b3["duplicate"], false);
    let marker = publish_ok(&gw, "acme", "pay.marker", json!({})).await;
    let got = c.events(2).await;
    assert_eq!(
        ids(&got),
        [b1["event_id"].as_str().unwrap().to_owned(), marker]
    );
    let m = gw.metrics().await;
    assert_eq!(metric(&m, "switchboard_event_deduplicated_total"), 1.0);
    assert_eq!(metric(&m, "switchboard_event_published_total"), 3.0);
}

fn poll_url(gw: &Gateway, q: &str) -> String {
    format!("{}/api/realtime/poll/?{q}", gw.http())
}

#[tokio::test]
async fn long_poll_follows_the_seed_and_shares_cursors() {
    let gw = Gateway::default().await;
    let t = token("acme", &[]);
    let e1 = publish_ok(&gw, "acme", "deal.stage.updated", json!({"n": 1})).await;
    let e2 = publish_ok(&gw, "acme", "deal.stage.updated", json!({"n": 2})).await;
    publish_ok(&gw, "acme", "other.thing", json!({})).await;
    let (s, body) = get_json(
        &poll_url(
            &gw,
            &format!("topics=deal.stage.*,timeline.object.*&cursor={e1}&company_id=acme"),
        ),
        Some(&t),
    )
    .await;
    assert_eq!(s, 200, "{body}");
    assert_eq!(
        ids(body["events"].as_array().unwrap()),
        std::slice::from_ref(&e2)
    );
    assert_eq!(body["cursor"], e2.as_str());
    assert_eq!(body["has_more"], false);
    assert!(body["timestamp"].is_string());
    assert_eq!(body["events"][0]["metadata"]["region"], "local");

    // Nothing new: waits, and an event published meanwhile completes it.
    let waiter = {
        let url = poll_url(&gw, &format!("topics=deal.stage.*&cursor={e2}&timeout=10"));
        let t = t.clone();
        tokio::spawn(async move { get_json(&url, Some(&t)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let e3 = publish_ok(&gw, "acme", "deal.stage.updated", json!({"n": 3})).await;
    let (s, body) = tokio::time::timeout(DEADLINE, waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(s, 200);
    assert_eq!(
        ids(body["events"].as_array().unwrap()),
        std::slice::from_ref(&e3)
    );

    // A WebSocket client can resume from a long-poll cursor, and vice versa.
    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["deal.stage.*"]).await;
    c.send(json!({"type": "cursor.update", "cursor": e2})).await;
    assert_eq!(ids(&c.events(1).await), [e3]);

    // Timeout with nothing: empty events and a cursor that loses nothing.
    let started = std::time::Instant::now();
    let (_, body) = get_json(&poll_url(&gw, "topics=quiet.*&timeout=1"), Some(&t)).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(body["events"], json!([]));
    let quiet_cursor = body["cursor"].as_str().unwrap().to_owned();
    let q = publish_ok(&gw, "acme", "quiet.now", json!({})).await;
    let (_, body) = get_json(
        &poll_url(&gw, &format!("topics=quiet.*&cursor={quiet_cursor}")),
        Some(&t),
    )
    .await;
    assert_eq!(ids(body["events"].as_array().unwrap()), [q]);
}

#[tokio::test]
async fn long_poll_errors_are_clear() {
    let gw = Gateway::default().await;
    let t = token("acme", &[]);
    let (s, b) = get_json(&poll_url(&gw, "topics=a"), None).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (401, Some("unauthorized"))
    );
    let (s, b) = get_json(&poll_url(&gw, ""), Some(&t)).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_topic"))
    );
    let (s, b) = get_json(&poll_url(&gw, "topics=a..b"), Some(&t)).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_topic"))
    );
    let (s, b) = get_json(&poll_url(&gw, "topics=a&timeout=abc"), Some(&t)).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_timeout"))
    );
    let (s, _) = get_json(&poll_url(&gw, "topics=a&company_id=globex"), Some(&t)).await;
    assert_eq!(s, 401);
    // An unknown cursor is an explicit gap, answered with what is retained.
    let kept = publish_ok(&gw, "acme", "a", json!({})).await;
    let (s, b) = get_json(
        &poll_url(&gw, "topics=a&timeout=1&cursor=not-ours"),
        Some(&t),
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(b["resume_gap"]["reason"], "unknown");
    let (_, b) = get_json(&poll_url(&gw, "topics=a&timeout=1&cursor=ffff-3"), Some(&t)).await;
    assert_eq!(b["resume_gap"]["reason"], "unknown");
    assert_eq!(ids(b["events"].as_array().unwrap()), [kept]);
}

#[tokio::test]
async fn sse_streams_with_ids_and_resumes_from_last_event_id() {
    let gw = Gateway::default().await;
    let t = token("acme", &[]);
    let e1 = publish_ok(&gw, "acme", "s.a", json!({"n": 1})).await;
    let e2 = publish_ok(&gw, "acme", "s.a", json!({"n": 2})).await;
    let resp = reqwest::Client::new()
        .get(format!(
            "{}/api/realtime/sse/?topics=s.*&token={t}",
            gw.http()
        ))
        .header("Last-Event-ID", &e1)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let mut body = resp.bytes_stream();
    let mut text = String::new();
    // Replayed e2 first, then live e3.
    read_sse_until(&mut body, &mut text, &format!("id: {e2}")).await;
    let e3 = publish_ok(&gw, "acme", "s.a", json!({"n": 3})).await;
    read_sse_until(&mut body, &mut text, &format!("id: {e3}")).await;
    assert!(
        !text.contains(&format!("id: {e1}\n")),
        "the Last-Event-ID event itself is not resent"
    );
    let datas: Vec<Value> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str(d).ok())
        .filter(|v: &Value| v.get("event_id").is_some())
        .collect();
    assert_eq!(ids(&datas), [e2, e3]);
}

#[tokio::test]
async fn tenants_never_see_each_other() {
    let gw = Gateway::default().await;
    let mut a = Client::open(&gw, "acme").await;
    a.subscribe(&["*"]).await;
    let mut b = Client::open(&gw, "globex").await;
    b.subscribe(&["*"]).await;
    let b_event = publish_ok(&gw, "globex", "deal.secret", json!({"secret": true})).await;
    assert_eq!(ids(&b.events(1).await), std::slice::from_ref(&b_event));

    // acme's wildcard, its cursor replay and its long-poll see nothing of globex.
    let ta = token("acme", &[]);
    a.send(json!({"type": "cursor.update", "cursor": b_event}))
        .await;
    let gap_or_done = a.recv().await;
    assert_ne!(gap_or_done["type"], "event", "{gap_or_done}");
    let (_, body) = get_json(&poll_url(&gw, "topics=*&timeout=0&cursor=0-0"), Some(&ta)).await;
    assert!(body["events"].as_array().unwrap().is_empty(), "{body}");
    let a_event = publish_ok(&gw, "acme", "deal.own", json!({})).await;
    assert_eq!(ids(&a.events(1).await), [a_event]);

    // Publishing into another tenant needs a platform token.
    let (s, body) = publish(
        &gw,
        &token("acme", &["publish"]),
        json!({"event_type": "x", "tenant": "globex"}),
    )
    .await;
    assert_eq!(s, 403, "{body}");
    assert!(!body.to_string().contains("secret"));
    let (s, _) = publish(
        &gw,
        &token("acme", &["publish"]),
        json!({"event_type": "x", "company_id": "globex"}),
    )
    .await;
    assert_eq!(s, 403);
    let (s, _) = publish(
        &gw,
        &token("ops", &["publish", "platform"]),
        json!({"event_type": "deal.from_platform", "tenant": "globex"}),
    )
    .await;
    assert_eq!(s, 201);
    assert_eq!(b.events(1).await[0]["event_type"], "deal.from_platform");
    a.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn publish_api_validates_and_batches() {
    let gw = Gateway::default().await;
    let p = token("acme", &["publish"]);
    let (s, b) = publish(
        &gw,
        &token("acme", &["subscribe"]),
        json!({"event_type": "a"}),
    )
    .await;
    assert_eq!((s, b["error"]["code"].as_str()), (403, Some("forbidden")));
    let (s, b) = publish(&gw, &p, json!({"event_type": "a.*"})).await;
    assert_eq!(
        (s, b["error"]["code"].as_str()),
        (400, Some("invalid_topic"))
    );
    let (s, _) = publish(&gw, &p, json!({"data": {}})).await;
    assert_eq!(s, 400);
    let (s, _) = publish(&gw, &p, json!({"event_type": "a", "region": "eu west"})).await;
    assert_eq!(s, 400);
    let r = reqwest::Client::new()
        .post(format!("{}/api/realtime/publish/", gw.http()))
        .bearer_auth(&p)
        .body("{oops")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let (s, b) = publish(
        &gw,
        &p,
        json!({"event_type": "a", "data": "x".repeat(2 * 1024 * 1024)}),
    )
    .await;
    assert!(s == 413, "{s} {b}");
    // A company_id that is neither a string nor a number is an error, not
    // silently ignored.
    for bad in [json!(["acme"]), json!({"id": 1}), json!(true)] {
        let (s, b) = publish(&gw, &p, json!({"event_type": "a", "company_id": bad})).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (400, Some("invalid_request")),
            "{b}"
        );
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("company_id"),
            "{b}"
        );
    }
    // The limit is the whole event's, not only its data.
    let mut watcher = Client::open(&gw, "acme").await;
    watcher.subscribe(&["big.*"]).await;
    for (field, value) in [
        ("gdpr_context", json!({"purpose": "x".repeat(1_100_000)})),
        ("idempotency_key", json!("k".repeat(1_100_000))),
    ] {
        let mut body = json!({"event_type": "big.one", "data": {}});
        body[field] = value;
        let (s, b) = publish(&gw, &p, body).await;
        assert_eq!(
            (s, b["error"]["code"].as_str()),
            (413, Some("message_too_large")),
            "{field}: {b}"
        );
    }
    let small = publish_ok(&gw, "acme", "big.ok", json!({})).await;
    assert_eq!(
        ids(&watcher.events(1).await),
        [small],
        "nothing oversized was fanned out"
    );

    let mut c = Client::open(&gw, "acme").await;
    c.subscribe(&["batch.*"]).await;
    let (s, b) = publish(
        &gw,
        &p,
        json!({"events": [
            {"event_type": "batch.one", "data": {"i": 1}},
            {"event_type": "not valid"},
            {"event_type": "batch.two", "data": {"i": 2}},
        ]}),
    )
    .await;
    assert_eq!(s, 200);
    let results = b["results"].as_array().unwrap();
    assert!(results[0]["event_id"].is_string());
    assert_eq!(results[1]["error"]["code"], "invalid_topic");
    let got = c.events(2).await;
    assert_eq!(
        got.iter()
            .map(|e| e["event_type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["batch.one", "batch.two"]
    );
}

/// Requests refused before a handler runs (duplicate query parameters, a
/// body over the limit) get the same JSON error shape as every other error.
#[tokio::test]
async fn refused_queries_and_bodies_answer_in_json() {
    let gw = Gateway::default().await;
    let t = token("acme", &["publish"]);
    for path in [
        "/api/realtime/poll/?topics=a&topics=b&timeout=0",
        "/api/realtime/sse/?topics=a&cursor=x&cursor=y",
        "/ws?token=a&token=b",
    ] {
        let r = reqwest::Client::new()
            .get(format!("{}{path}", gw.http()))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{path}");
        let b: serde_json::Value = r.json().await.unwrap_or_default();
        assert_eq!(b["error"]["code"], "invalid_query", "{path}: {b}");
        assert!(
            b["error"]["message"]
                .as_str()
                .unwrap()
                .contains("duplicate"),
            "{path}: {b}"
        );
    }
    let r = reqwest::Client::new()
        .post(format!("{}/api/realtime/publish/", gw.http()))
        .bearer_auth(&t)
        .header("content-type", "application/json")
        .body(vec![b' '; 8 * 1024 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    let b: serde_json::Value = r.json().await.unwrap_or_default();
    assert_eq!(b["error"]["code"], "body_too_large", "{b}");
}
