//! The streaming publish API (`/api/realtime/publish/stream`): many events
//! in flight on one WebSocket, one answer per frame in order, the same
//! checks as the HTTP API, and clean refusals.

mod common;

use std::time::Duration;

use common::{Client, Gateway, PublishStream, token, token_ttl};
use futures_util::SinkExt;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// Open a stream on `gw` with the token as `Authorization: Bearer`.
async fn open(gw: &Gateway, token: Option<&str>) -> Result<PublishStream, u16> {
    PublishStream::open(&format!("ws://{}", gw.addr), token).await
}

#[tokio::test]
async fn many_frames_in_flight_are_published_in_order_with_one_answer_each() {
    let gw = Gateway::default().await;
    let mut sub = Client::open(&gw, "acme").await;
    sub.subscribe(&["deal.updated", "deal.created"]).await;
    let mut stream = open(&gw, Some(&token("acme", &["publish"])))
        .await
        .expect("publisher token opens a stream");

    // Everything is sent before any answer is read.
    const N: usize = 400;
    for i in 0..N {
        let frame = json!({ "ref": i, "event_type": "deal.updated", "data": { "n": i } });
        stream.feed(&frame).await;
    }
    let extra = [
        // A batch in one frame.
        json!({ "ref": "batch", "events": [
            { "event_type": "deal.created", "data": { "n": N } },
            { "event_type": "not a topic!", "data": {} },
            { "event_type": "deal.created", "data": { "n": N + 1 } },
        ]}),
        // Refused: another tenant's event, an invalid topic, not JSON.
        json!({ "ref": "other-tenant", "event_type": "deal.updated", "company_id": "globex", "data": {} }),
        json!({ "ref": "bad-topic", "event_type": "a..b", "data": {} }),
    ];
    for frame in &extra {
        stream.feed(frame).await;
    }
    stream
        .ws
        .feed(Message::Text("{not json".into()))
        .await
        .unwrap();
    // A duplicate by idempotency key.
    for r in ["dup-1", "dup-2"] {
        let frame = json!({ "ref": r, "event_type": "deal.updated", "idempotency_key": "k1", "data": { "n": -1 } });
        stream.feed(&frame).await;
    }
    stream.flush().await;

    let mut last_seq = 0u64;
    for i in 0..N {
        let a = stream.answer().await;
        assert_eq!(a["ref"], json!(i), "answers come in frame order: {a}");
        assert_eq!(a["duplicate"], false, "{a}");
        let seq: u64 = a["cursor"]
            .as_str()
            .unwrap()
            .rsplit('-')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(seq > last_seq, "stored in frame order: {a}");
        last_seq = seq;
    }
    let batch = stream.answer().await;
    assert_eq!(batch["ref"], "batch");
    let results = batch["results"].as_array().unwrap();
    assert_eq!(results.len(), 3, "{batch}");
    assert!(results[0]["event_id"].is_string() && results[2]["event_id"].is_string());
    assert_eq!(results[1]["error"]["code"], "invalid_topic", "{batch}");

    let other = stream.answer().await;
    assert_eq!(other["ref"], "other-tenant");
    assert_eq!(other["error"]["status"], 403, "{other}");
    let bad = stream.answer().await;
    assert_eq!(bad["ref"], "bad-topic");
    assert_eq!(bad["error"]["code"], "invalid_topic", "{bad}");
    let garbage = stream.answer().await;
    assert_eq!(garbage["ref"], Value::Null);
    assert_eq!(garbage["error"]["code"], "malformed_body", "{garbage}");
    let d1 = stream.answer().await;
    let d2 = stream.answer().await;
    assert_eq!(
        (d1["ref"].as_str(), d1["duplicate"].as_bool()),
        (Some("dup-1"), Some(false))
    );
    assert_eq!(
        (d2["ref"].as_str(), d2["duplicate"].as_bool()),
        (Some("dup-2"), Some(true))
    );
    assert_eq!(d1["event_id"], d2["event_id"]);

    // The subscriber got every published event once, in order.
    let events = sub.events(N + 3).await;
    let ns: Vec<i64> = events
        .iter()
        .map(|e| e["data"]["n"].as_i64().unwrap())
        .collect();
    let mut want: Vec<i64> = (0..(N as i64 + 2)).collect();
    want.push(-1);
    assert_eq!(ns, want);
    sub.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_stream_needs_a_publisher_token() {
    let gw = Gateway::default().await;
    assert_eq!(open(&gw, None).await.err(), Some(401));
    assert_eq!(open(&gw, Some("not-a-jwt")).await.err(), Some(401));
    assert_eq!(
        open(&gw, Some(&token("acme", &["subscribe"]))).await.err(),
        Some(403),
        "a subscriber's token may not publish"
    );
    // `?token=` for clients that cannot set headers.
    let url = format!(
        "ws://{}/api/realtime/publish/stream?token={}",
        gw.addr,
        token("acme", &["publish"])
    );
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("query token");
    let mut ws = PublishStream { ws };
    ws.send(&json!({"ref": 1, "event_type": "x", "data": 1}))
        .await;
    assert!(ws.answer().await["event_id"].is_string());
}

#[tokio::test]
async fn a_tenant_cannot_publish_into_another_through_a_stream() {
    let gw = Gateway::default().await;
    let mut globex = Client::open(&gw, "globex").await;
    globex.subscribe(&[">"]).await;
    let mut stream = open(&gw, Some(&token("acme", &["publish"]))).await.unwrap();
    for (r, body) in [
        (
            "company",
            json!({"event_type": "x", "company_id": "globex", "data": 1}),
        ),
        (
            "tenant",
            json!({"event_type": "x", "tenant": "globex", "data": 1}),
        ),
        (
            "batch",
            json!({"events": [{"event_type": "x", "tenant": "globex", "data": 1}]}),
        ),
    ] {
        let mut frame = body;
        frame["ref"] = json!(r);
        stream.send(&frame).await;
        let a = stream.answer().await;
        assert_eq!(a["ref"], r);
        let error = if r == "batch" {
            &a["results"][0]["error"]
        } else {
            &a["error"]
        };
        assert_eq!(error["status"], 403, "{a}");
    }
    globex.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn an_oversized_frame_closes_the_stream_with_1009_and_what_came_before_is_kept() {
    let mut config = common::config();
    config.limits.max_message_bytes = 1024;
    let gw = Gateway::start(config).await;
    let mut sub = Client::open(&gw, "acme").await;
    sub.subscribe(&["x"]).await;
    let mut stream = open(&gw, Some(&token("acme", &["publish"]))).await.unwrap();
    stream
        .send(&json!({"ref": 1, "event_type": "x", "data": 1}))
        .await;
    assert!(stream.answer().await["event_id"].is_string());
    let huge = "x".repeat(super_limit(1024));
    let _ = stream
        .ws
        .send(Message::Text(
            json!({"event_type": "x", "data": huge}).to_string().into(),
        ))
        .await;
    assert_eq!(stream.close_code().await, 1009);
    assert_eq!(sub.events(1).await[0]["data"], 1);
    sub.expect_silence(Duration::from_millis(300)).await;
    // The gateway serves on.
    let mut again = open(&gw, Some(&token("acme", &["publish"]))).await.unwrap();
    again
        .send(&json!({"ref": 2, "event_type": "x", "data": 2}))
        .await;
    assert_eq!(again.answer().await["ref"], 2);
}

/// More than the stream's frame limit (the HTTP body limit: four events
/// and 64 KiB).
fn super_limit(max_message_bytes: usize) -> usize {
    max_message_bytes * 4 + 64 * 1024 + 1
}

#[tokio::test]
async fn a_stream_closes_with_4001_when_its_token_expires_and_1012_on_drain() {
    let mut gw = Gateway::default().await;
    let mut short = open(&gw, Some(&token_ttl("acme", &["publish"], 2)))
        .await
        .unwrap();
    let mut long = open(&gw, Some(&token("acme", &["publish"]))).await.unwrap();
    assert_eq!(short.close_code().await, 4001);
    gw.trigger_drain();
    assert_eq!(long.close_code().await, 1012);
}
